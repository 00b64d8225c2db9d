"""Used by the resume test: kills its own process with SIGKILL, as a crash or preemption would."""

import os
import signal

from lightning.pytorch import Callback


class SigkillAtStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
