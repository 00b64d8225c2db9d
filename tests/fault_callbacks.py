"""Faults injected into subprocess runs by the reliability tests (``--trainer.callbacks+=fault_callbacks.X``)."""

import os
import signal

import torch
from lightning.pytorch import Callback


class SigkillAtStep(Callback):
    """Kills its own process with SIGKILL, as a crash or preemption would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class NanLossOnRank(Callback):
    """Makes the training loss NaN on one process only, from ``step`` on (a bad batch on one GPU)."""

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            loss.data.fill_(torch.nan)
