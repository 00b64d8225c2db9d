"""Append-only JSONL output of a ``predict`` run: sharded by process, restartable, merged at the end.

Used by the DAPO dataset stages (rollouts keyed by ``problem_id``, advantages keyed by ``state_id``):

- every process appends its rows to ``<output stem>.shards/rank<R>.jsonl`` after each batch (flushed and
  fsynced, so a killed run loses at most the batch in flight);
- at start, the keys already present in any shard or in the merged file are handed to the module as
  ``pl_module.skip_keys``; its ``predict_step`` skips them (counting them in ``pl_module.num_skipped``), so a
  restart (with any number of processes) does not redo finished work. A line cut by a crash is removed
  before appending. Rows already there are checked against the settings recorded in them (not every
  setting is): a module with a ``resume_mismatch(row)`` names the first that differs, and the run is refused;
- at the end, rank 0 merges the shards into ``output`` (one row per key, sorted by key) and, if the module
  has a ``dataset_report(rows)``, writes its counts to ``<output stem>.report.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from datamodules.common import DataError
from modules.base import on_rank_zero_for_all


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a shard; a final line without its newline (cut by a crash) is ignored."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    complete = lines[:-1]  # the piece after the last newline is empty or a partial row
    rows = []
    for number, line in enumerate(complete, start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not valid JSON ({error.msg}); the shard is corrupt") from None
    return rows


def _drop_partial_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


class ShardedJsonlWriter(BasePredictionWriter):
    """Writes the rows a ``predict_step`` returns (a list of dicts) to ``output``; see the module doc."""

    def __init__(self, output: str, key: str = "problem_id"):
        super().__init__(write_interval="batch")
        self.output, self.key = Path(output), key
        self._handle = None
        self.rows_written = 0

    @property
    def shard_dir(self) -> Path:
        return self.output.with_name(self.output.stem + ".shards")

    def shard_path(self, rank: int) -> Path:
        return self.shard_dir / f"rank{rank}.jsonl"

    def existing_files(self) -> list[Path]:
        return ([self.output] if self.output.exists() else []) + sorted(self.shard_dir.glob("rank*.jsonl"))

    def existing_rows(self) -> list[dict[str, Any]]:
        return [row for path in self.existing_files() for row in _read_rows(path)]

    def done_keys(self) -> set[str]:
        return {str(row[self.key]) for row in self.existing_rows() if self.key in row}

    def check_resumable(self, pl_module: pl.LightningModule) -> None:
        """Refuse to add to rows an earlier run wrote with other settings (another policy, other sizes):
        skipping their keys would silently mix the two runs in one dataset."""
        mismatch_of = getattr(pl_module, "resume_mismatch", None)
        if mismatch_of is None:
            return
        for path in self.existing_files():
            for index, row in enumerate(_read_rows(path)):
                mismatch = mismatch_of(row)
                if mismatch is not None:
                    field_name, recorded, expected = mismatch
                    raise DataError(
                        f"{path}: row {index}, field '{field_name}': written by an earlier run with {recorded!r}, "
                        f"this run has {expected!r}. Delete {self.output} and {self.shard_dir} (or choose another "
                        f"output) to start over; rerun with the earlier settings to resume.")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self.check_resumable(pl_module)
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        shard = self.shard_path(trainer.global_rank)
        _drop_partial_tail(shard)
        pl_module.skip_keys = self.done_keys()
        pl_module.num_skipped = 0
        if pl_module.skip_keys:
            rank_zero_info(f"[ShardedJsonlWriter] {self.output}: {len(pl_module.skip_keys)} rows already written "
                           f"(same settings); their {self.key}s are skipped")
        self._handle = open(shard, "a", encoding="utf-8")
        self.rows_written = 0

    def write_on_batch_end(self, trainer, pl_module, prediction: list | None, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        if not prediction:
            return
        for row in prediction:
            if self.key not in row:
                raise KeyError(f"predicted row has no '{self.key}' column: {sorted(row)}")
            self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.rows_written += len(prediction)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        counts = torch.tensor([float(getattr(pl_module, "num_skipped", 0)), float(self.rows_written)],
                              device=pl_module.device)
        skipped, written = (int(n) for n in trainer.strategy.reduce(counts, reduce_op="sum").tolist())
        rank_zero_info(f"[ShardedJsonlWriter] {self.output}: {written} rows written, {skipped} {self.key}s skipped "
                       "(already written)")
        trainer.strategy.barrier()
        on_rank_zero_for_all(trainer, lambda: self.merge(pl_module), f"merging the shards into {self.output}")

    def merge(self, pl_module: pl.LightningModule | None = None) -> Path:
        """Write ``output``: the union of the merged file and all shards, one row per key, sorted by key."""
        merged: dict[str, dict[str, Any]] = {}
        for row in self.existing_rows():
            merged.setdefault(str(row[self.key]), row)
        rows = [merged[key] for key in sorted(merged)]
        tmp = self.output.with_name(self.output.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, self.output)
        report = getattr(pl_module, "dataset_report", None)
        if report is not None:
            payload = {"output": str(self.output), "rows": len(rows), **report(rows)}
            self.output.with_name(self.output.stem + ".report.json").write_text(json.dumps(payload, indent=2))
        return self.output
