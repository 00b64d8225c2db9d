"""The default progress bar, with a description that makes sense for step-limited runs.

Lightning's rich bar labels the training bar ``Epoch E/max_epochs-1``; a run limited by ``max_steps`` has
``max_epochs = -1``, which it prints as ``Epoch 0/-2``. This bar prints ``Epoch 0 (step limit 800)`` instead.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


def train_description(current_epoch: int, max_epochs: int | None, max_steps: int) -> str:
    description = f"Epoch {current_epoch}"
    if max_epochs is not None and max_epochs > 0:
        description += f"/{max_epochs - 1}"
    if max_steps > 0:
        description += f" (step limit {max_steps})"
    return description


class StepAwareRichProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        description = train_description(current_epoch, self.trainer.max_epochs, self.trainer.max_steps)
        # as Lightning pads it: the training and validation bars keep one width, so the lines do not flicker
        return f"{description:{len(self.validation_description)}}"
