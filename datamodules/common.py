"""Plumbing shared by the data modules: reading rows from files or the hub with row-exact errors,
an epoch-seeded sampler (so a resumed run sees the same order), and padding."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler

LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad input data; the message names the source, row and field. ``reason`` is the row-independent
    part, used to count dropped rows by cause."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def row_error(source: str, row: int, field_name: str, problem: str) -> DataError:
    return DataError(f"{source}: row {row}, field '{field_name}': {problem}", reason=f"{field_name}: {problem}")


def read_rows(source: str, split: str = "train", name: str | None = None) -> list[dict[str, Any]]:
    """Rows of a local JSON/JSONL/Parquet file or of a hub dataset (``name`` is its config)."""
    path = Path(source)
    if path.suffix in LOCAL_SUFFIXES:
        if not path.exists():
            raise FileNotFoundError(f"data file not found: {source}")
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json" and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(f"{source}: invalid JSON at line {error.lineno}: {error.msg}") from None
        else:
            rows = []
            for line_number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{source}: line {line_number} is not valid JSON: {error.msg}") from None
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{source}: row {index} is a {type(row).__name__}, expected an object")
        return rows
    if path.is_dir():
        raise DataError(f"{source}: is a folder; point at a .json, .jsonl or .parquet file or a hub dataset name")
    import datasets

    return list(datasets.load_dataset(source, name, split=split))


@dataclass
class DataReport:
    """What the data pipeline kept, dropped and truncated; logged and written to the run summary."""

    rows: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)

    def drop(self, split: str, reason: str) -> None:
        reasons = self.dropped.setdefault(split, {})
        reasons[reason] = reasons.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "dropped": self.dropped, "truncated": self.truncated}


class EpochSeededSampler(Sampler[int]):
    """A random permutation that depends only on (seed, epoch): a run resumed at an epoch boundary sees
    exactly the batches an uninterrupted run would.

    ``epoch_source`` (the trainer's ``current_epoch``) wins over ``set_epoch``: after a resume from a
    checkpoint written at an epoch's end, Lightning passes the count of *processed* epochs to
    ``set_epoch``, which is one behind, and the resumed run would replay the previous epoch's order.
    """

    def __init__(self, length: int, seed: int = 0, epoch_source: Callable[[], int] | None = None):
        self.length, self.seed, self.epoch, self.epoch_source = length, seed, 0, epoch_source

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch_source() if self.epoch_source is not None else self.epoch
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


def pad_sequences(sequences: Sequence[Sequence[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    width = max(len(sequence) for sequence in sequences)
    out = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if side == "right":
            out[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        else:
            out[row, width - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
    return out


def truncate(ids: list[int], max_length: int, side: str) -> tuple[list[int], bool]:
    if len(ids) <= max_length:
        return ids, False
    return (ids[-max_length:] if side == "left" else ids[:max_length]), True


def check_side(value: str, name: str) -> str:
    if value not in ("left", "right"):
        raise ValueError(f"{name} must be 'left' or 'right', got {value!r}")
    return value


def shards_parameters(strategy: Any) -> bool:
    """FSDP and DeepSpeed ZeRO-3 shard the parameters: every forward gathers them from all processes, so
    every process must run the same number of forwards (ZeRO-1/2 keep whole parameters on each)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    return isinstance(strategy, FSDPStrategy) or (isinstance(strategy, DeepSpeedStrategy) and bool(strategy.zero_stage_3))
