"""RewardBench category scores at the end of ``test``: to TensorBoard, the run summary and a JSON file.

``RewardModel`` logs strict per-subset accuracy as ``test/accuracy/<subset>`` (also for a single subset);
this callback reads those, weighs them as ``datamodules.rewardbench`` says
(RewardBench's fixed counts for its own subsets, math-prm counted equal to the six code subsets; the
number of rows for any other subset), and logs ``test/rewardbench/<category>`` and
``test/rewardbench/overall`` (plain mean of the categories). The JSON (``<log_dir>/rewardbench.json`` by
default) holds every subset's accuracy, weight, category and the pairs evaluated (``pairs``; the module's
exact ``subset_counts`` where it has them), and an ``evaluation`` section: pairs evaluated against pairs in
the set, and ``limit_test_batches``. A partial evaluation (``--trainer.limit_test_batches``) is scored on
the subsets it reached, flagged ``complete: false`` with the subsets it missed, and warned about; one that
reached no subset is an error naming the limit.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

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
        limit = getattr(trainer, "limit_test_batches", 1.0)
        limited = bool(getattr(trainer, "fast_dev_run", False)) or not (isinstance(limit, float) and limit == 1.0)
        # the pairs the module really evaluated (RewardModel's exact counts); else the set's sizes
        counts = getattr(getattr(trainer, "lightning_module", None), "subset_counts", None) or {}
        absent = [name for name in sizes if f"test/accuracy/{name}" not in metrics]
        if absent and not limited:
            raise RuntimeError(f"no test/accuracy/<subset> metric for {absent}; RewardBenchScores needs a "
                               f"module that logs per-subset accuracy (RewardModel does)")
        evaluated = [name for name in sizes if name not in absent]
        if not evaluated:
            raise RuntimeError(f"--trainer.limit_test_batches={limit} evaluated no pair of any subset; RewardBench "
                               f"scores need the test set (leave limit_test_batches unset)")
        accuracy = {name: float(metrics[f"test/accuracy/{name}"]) for name in evaluated}
        result = category_scores(accuracy, subset_weights({name: sizes[name] for name in evaluated}),
                                 self._categories(datamodule))
        pairs = {name: counts[name]["pairs"] if name in counts else sizes[name] for name in evaluated}
        for subset, entry in result["subsets"].items():
            entry["pairs"] = pairs[subset]
            if pairs[subset] != sizes[subset]:
                entry["pairs_in_set"] = sizes[subset]
        complete = not absent and all(pairs[name] == sizes[name] for name in evaluated)
        result["evaluation"] = {"complete": complete, "pairs_evaluated": sum(pairs.values()),
                                "pairs_in_set": sum(sizes.values()), "limit_test_batches": limit,
                                "subsets_not_evaluated": absent}
        if not complete:
            why = f"--trainer.limit_test_batches={limit}" if limited else "the module scored fewer pairs than the set has"
            rank_zero_warn(f"RewardBench scores of a partial evaluation ({why}): "
                           f"{sum(pairs.values())} of {sum(sizes.values())} pairs"
                           + (f"; subsets not evaluated: {absent}" if absent else "")
                           + ". They are not the scores of the whole set.")
        return result

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        result = self.compute(trainer)
        self.result = result
        if result["missing_categories"]:
            rank_zero_warn(f"RewardBench: no subset of {result['missing_categories']} in the data, so 'overall' is the "
                           "mean of the other categories, not comparable with the leaderboard's mean of all four")
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
            evaluation = result["evaluation"]
            if not evaluation["complete"]:
                missing += f" [PARTIAL: {evaluation['pairs_evaluated']} of {evaluation['pairs_in_set']} pairs]"
            rank_zero_info(f"[RewardBench] {table}; overall {result['overall']:.3f}{missing} -> {path}")
