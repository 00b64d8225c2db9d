"""Scoring stage of the reward-data curation: both responses of every pair scored by a reward model.

``predict`` with ``RewardScorer`` on ``PreferenceScoringData`` writes the input rows with two new columns,
``<score_prefix>_chosen`` and ``<score_prefix>_rejected``, plus a JSON report (rows scored, rows left
unscored per source and reason). The reward model is any of:
- a checkpoint of ours: ``--model.init_args.checkpoint runs/reward/bt/checkpoints/best.ckpt`` (its
  backbone name comes from the checkpoint). Not the CLI's ``--ckpt_path``: LightningCLI rebuilds the model
  from the checkpoint's own class (``RewardModel``), which would replace this scorer;
- a Hugging Face sequence classifier by name or path: ``--model.init_args.model Skywork/Skywork-Reward-...``
  or a folder written by ``python cli.py export``.

Under DDP every rank scores its shard of the pairs and writes ``<output>.rank<N>.jsonl``; rank 0 merges
the shards by row id (dropping the repeats the distributed sampler pads with) and deletes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from datamodules.curation import PairFields, attach_scores, check_output_path, read_score_shards, write_json, write_rows
from modules.base import on_rank_zero_for_all
from modules.reward import RewardModel


def checkpoint_hparams(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (a DeepSpeed folder: export it first with "
                                f"`python cli.py export CKPT OUT` and pass OUT as model)")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {})


class RewardScorer(RewardModel):
    def __init__(self, output_file: str = "runs/curation/scored.jsonl", score_prefix: str = "score",
                 report_file: str | None = None, checkpoint: str | None = None, **kwargs):
        """``output_file`` (.jsonl/.json/.parquet) gets the scored rows, ``report_file`` (default
        ``<output_file>.report.json``) the report. ``checkpoint``: a Lightning checkpoint of a reward model
        of ours, whose backbone name (``model``) replaces the configured one. Other arguments: ``RewardModel``.
        Both output paths are checked in ``setup``, before the weights load and any pair is scored."""
        if checkpoint is not None:
            trained_from = checkpoint_hparams(checkpoint).get("model")
            if trained_from is None:
                raise ValueError(f"{checkpoint}: no 'model' in its hyper_parameters; is it a RewardModel checkpoint?")
            kwargs["model"] = trained_from
        super().__init__(**kwargs)
        self.checkpoint = checkpoint
        if not score_prefix.isidentifier():
            raise ValueError(f"score_prefix must be a plain column-name prefix, got {score_prefix!r}")
        self.output_file, self.score_prefix = output_file, score_prefix
        self.report_file = report_file or f"{output_file}.report.json"
        self._scores: list[torch.Tensor] = []

    def setup(self, stage: str) -> None:
        # here rather than in __init__, where the CLI's parser would bury the message in its own error
        check_output_path(self.output_file, "output_file")
        check_output_path(self.report_file, "report_file", row_file=False)
        super().setup(stage)

    def configure_model(self) -> None:
        fresh = self.model is None
        super().configure_model()
        if fresh and self.checkpoint is not None:
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
            self.load_state_dict(state, strict=True)
            self.model.newly_initialized_weights = []  # every weight, the head included, is the checkpoint's

    def on_predict_epoch_start(self) -> None:
        self._scores = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """(pairs, 3): row id, reward of chosen, reward of rejected (float64, so row ids stay exact)."""
        chosen, rejected = self.pair_rewards(batch)  # not predict_step: the subset names would be thrown away
        scores = torch.stack([batch["row_id"].double(), chosen.double(), rejected.double()], 1).cpu()
        self._scores.append(scores)
        return scores

    def _shard_path(self, rank: int) -> Path:
        return Path(f"{self.output_file}.rank{rank}.jsonl")

    def on_predict_epoch_end(self) -> None:
        scores = torch.cat(self._scores) if self._scores else torch.zeros(0, 3, dtype=torch.float64)
        shard = self._shard_path(self.global_rank)
        shard.parent.mkdir(parents=True, exist_ok=True)
        with shard.open("w") as handle:
            for row_id, chosen, rejected in scores.tolist():
                handle.write(json.dumps([int(row_id), chosen, rejected]) + "\n")
        self.trainer.strategy.barrier("scores written")
        on_rank_zero_for_all(self.trainer, lambda: self.merge(self.trainer.world_size), "merging the scores")

    def merge(self, world_size: int) -> dict[str, Any]:
        """Join the per-rank score shards onto the input rows; write the scored rows and the report."""
        datamodule = self.trainer.datamodule
        rows, origin = datamodule.source_rows("test")
        shards = [self._shard_path(rank) for rank in range(world_size)]
        fields = PairFields(datamodule.prompt_field, datamodule.chosen_field, datamodule.rejected_field)
        scored, counts = attach_scores(rows, read_score_shards(shards), origin, self.score_prefix, fields)
        write_rows(self.output_file, scored)
        report = {
            "step": "score", "input_file": origin, "output_file": str(self.output_file),
            "model": self.model_name_or_path, "checkpoint": self.checkpoint or self.trainer.ckpt_path, **counts,
            "world_size": world_size, "max_length": datamodule.max_length,
            "truncation_side": datamodule.eval_truncation_side, "data_report": datamodule.data_report,
        }
        write_json(self.report_file, report)
        for shard in shards:
            shard.unlink()
        return report
