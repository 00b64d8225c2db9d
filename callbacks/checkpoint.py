"""Checkpointing whose ``last.ckpt`` really is the latest state."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that refreshes ``last.ckpt`` at every checkpointing point and at the end of fit.

    Lightning 2.5+ rewrites ``last`` only when a top-k checkpoint was written at the same step, so once
    the monitored metric stops improving ``--ckpt_path last`` would resume from an old step and redo (or
    lose) work. Marking the step as saved after the top-k pass makes the epoch-end and validation-end
    hooks write ``last`` every time.

    A fit that ``max_steps`` ends between checkpointing points (``max_steps`` not a multiple of
    ``val_check_interval``) also writes ``last`` at its final step, from the batch's end, where the loop
    state is still mid-epoch: a resume with a larger ``max_steps`` goes on with the epoch's next batch. So
    does a fit whose last epochs ran past the last epoch-end checkpoint (``max_epochs`` not a multiple of
    ``check_val_every_n_epoch``). Without a monitored metric the latest checkpoint is the best one, so the
    top-k checkpoint is written there too, and the export and ``test_after_fit`` use the model the fit
    ended with. A monitored best keeps its validated step: the final weights have no score of their own.
    With ``save_last: link``, ``last`` links to the latest top-k checkpoint instead.
    """

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        self._last_global_step_saved = trainer.global_step

    def _save_final(self, trainer) -> None:
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None:
            self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if 0 < trainer.max_steps <= trainer.global_step and not self._should_skip_saving_checkpoint(trainer):
            saved_before = self._last_global_step_saved
            self._save_final(trainer)
            # a validation at this same step still writes its checkpoints (with its score) after this one
            self._last_global_step_saved = saved_before

    def on_train_end(self, trainer, pl_module) -> None:
        # the last epoch ran to its end after the last checkpoint (a fit cut mid-epoch by should_stop or
        # max_time is left to Lightning: saved here, its loop state would skip the rest of that epoch)
        ran_to_epoch_end = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if ran_to_epoch_end and not self._should_skip_saving_checkpoint(trainer):
            self._save_final(trainer)
        super().on_train_end(trainer, pl_module)
