"""Stop a run the moment its loss stops being a number, before the bad step reaches the weights."""

from __future__ import annotations

import lightning.pytorch as pl
import torch


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss is NaN or infinite; cli.py prints it without a traceback."""


class NonFiniteLossGuard(pl.Callback):
    """Checks the loss before backward, so the optimizer never applies a NaN step and the last
    checkpoint on disk stays the last good one. Under DDP every process stops together: the decision is
    shared, since a process that went on into backward would wait for the gradients of one that left."""

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        finite_here = bool(torch.isfinite(loss).all())
        finite = finite_here if trainer.world_size == 1 else \
            trainer.strategy.reduce_boolean_decision(finite_here, all=True)
        if finite:
            return
        value = loss.detach().float().item() if not finite_here else "finite here, not on another process"
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none saved yet"
        raise NonFiniteLossError(
            f"non-finite training loss ({value}) at global step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_progress.current.ready - 1}); "
            f"stopping. Last good checkpoint: {checkpoint}. Lower the learning rate, enable gradient "
            f"clipping (trainer.gradient_clip_val) or check the data of this step.")
