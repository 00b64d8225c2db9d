"""Checkpointing whose ``last.ckpt`` really is the latest state."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that refreshes ``last.ckpt`` at every checkpointing point and at the end of fit.

    Lightning 2.5+ rewrites ``last`` only when a top-k checkpoint was written at the same step, so once
    the monitored metric stops improving ``--ckpt_path last`` would resume from an old step and redo (or
    lose) work. Marking the step as saved after the top-k pass makes the epoch-end and validation-end
    hooks write ``last`` every time.

    A fit that stops between checkpointing points (``max_steps`` not a multiple of ``val_check_interval``,
    or mid-epoch with epoch-end checkpoints) also writes ``last`` at its final step. Without a monitored
    metric the latest checkpoint is the best one, so the top-k checkpoint is written there too, and the
    export and ``test_after_fit`` use the model the fit ended with. With a monitor, the top-k checkpoints
    keep their validated steps: the final weights have no score of their own.
    """

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        self._last_global_step_saved = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skips a step already saved, and fast_dev_run
            candidates = self._monitor_candidates(trainer)
            if self.monitor is None:
                self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
