"""Helpers the recipes share: option lists and summaries over repeated runs."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from typing import Any


def distinct_values(text: str, convert: Callable[[str], Any], option: str) -> list[Any]:
    """The comma-separated values of ``option`` (an argparse ``type``): at least one, none repeated."""
    try:
        values = [convert(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{option} takes comma-separated {convert.__name__} values, got {text!r}") from None
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{option} needs distinct values, got {text!r}")
    return values


def mean_sd(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (NaN for a single value) over repeated runs."""
    return {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else float("nan")}
