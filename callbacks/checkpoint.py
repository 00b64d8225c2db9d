"""Checkpointing whose ``last.ckpt`` really is the latest state."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that refreshes ``last.ckpt`` at every checkpointing point.

    Lightning 2.5+ rewrites ``last`` only when a top-k checkpoint was written at the same step, so once
    the monitored metric stops improving ``--ckpt_path last`` would resume from an old step and redo (or
    lose) work. Marking the step as saved after the top-k pass makes the epoch-end and validation-end
    hooks write ``last`` every time.
    """

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        self._last_global_step_saved = trainer.global_step
