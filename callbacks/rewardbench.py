"""RewardBench category scores at the end of ``test``: to TensorBoard, the run summary and a JSON file.

``RewardModel`` logs strict per-subset accuracy as ``test/accuracy/<subset>`` (also for a single subset);
this callback reads those, weighs them as ``datamodules.rewardbench`` says
(RewardBench's fixed counts for its own subsets, math-prm counted equal to the six code subsets; the
number of rows for any other subset), and logs ``test/rewardbench/<category>`` and
``test/rewardbench/overall`` (plain mean of the categories). The JSON (``<log_dir>/rewardbench.json`` by
default) holds every subset's accuracy, size, weight and category.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from datamodules.rewardbench import DEFAULT_CATEGORIES, category_scores, subset_weights


def metric_key(category: str) -> str:
    return "test/rewardbench/" + category.lower().replace(" ", "_")


class RewardBenchScores(pl.Callback):
    def __init__(self, categories: dict[str, list[str]] | None = None, output_file: str | None = None):
        """``categories``: category -> subsets; default the datamodule's ``categories`` if it has them,
        else RewardBench's plus the generated set's. ``output_file``: default ``<log_dir>/rewardbench.json``."""
        self.categories = categories
        self.output_file = output_file
        self.result: dict[str, Any] | None = None

    def _subset_sizes(self, datamodule) -> dict[str, int]:
        if hasattr(datamodule, "subset_sizes"):
            return datamodule.subset_sizes()
        names = list(getattr(datamodule, "subset_names", None) or ["all"])
        counts = Counter(item.get("subset", 0) for item in getattr(datamodule, "datasets", {}).get("test", []))
        return {names[index]: count for index, count in sorted(counts.items())}

    def _categories(self, datamodule) -> dict[str, list[str]]:
        return self.categories or getattr(datamodule, "categories", None) or DEFAULT_CATEGORIES

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fail before the evaluation, not after it, on subsets no category knows."""
        sizes = self._subset_sizes(trainer.datamodule)
        if not sizes:
            raise ValueError("empty evaluation set: the test split has no pairs")
        known = {subset for subsets in self._categories(trainer.datamodule).values() for subset in subsets}
        unknown = sorted(set(sizes) - known)
        if unknown:
            raise ValueError(f"unknown subset name(s) {unknown}: not in any RewardBench category. Known subsets: "
                             f"{sorted(known)}; map new ones with RewardBenchScores(categories=...)")

    def compute(self, trainer: pl.Trainer) -> dict[str, Any]:
        datamodule = trainer.datamodule
        sizes = self._subset_sizes(datamodule)
        if not sizes:
            raise ValueError("empty evaluation set: the test split has no pairs")
        metrics = trainer.callback_metrics
        absent = [name for name in sizes if f"test/accuracy/{name}" not in metrics]
        if absent:
            raise RuntimeError(f"no test/accuracy/<subset> metric for {absent}; RewardBenchScores needs a "
                               f"module that logs per-subset accuracy (RewardModel does)")
        accuracy = {name: float(metrics[f"test/accuracy/{name}"]) for name in sizes}
        result = category_scores(accuracy, subset_weights(sizes), self._categories(datamodule))
        for subset, entry in result["subsets"].items():
            entry["pairs"] = sizes[subset]
        return result

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        result = self.compute(trainer)
        self.result = result
        logged = {metric_key(name): value for name, value in result["categories"].items()}
        logged["test/rewardbench/overall"] = result["overall"]
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
            logger.save()
        import torch

        for key, value in logged.items():  # so the run summary written after this callback holds them
            trainer.callback_metrics[key] = torch.tensor(value)
        path = Path(self.output_file) if self.output_file else Path(trainer.log_dir or trainer.default_root_dir) / "rewardbench.json"
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**result, "checkpoint": trainer.ckpt_path}, indent=2))
            table = ", ".join(f"{name} {value:.3f}" for name, value in result["categories"].items())
            missing = f" (missing: {', '.join(result['missing_categories'])})" if result["missing_categories"] else ""
            rank_zero_info(f"[RewardBench] {table}; overall {result['overall']:.3f}{missing} -> {path}")
