"""Export the best (else last) checkpoint of a fit as a Hugging Face ``save_pretrained`` folder, so the
next stage (reward model from SFT, actor from policy, unlearning from target) loads it by path."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from modules.base import on_rank_zero_for_all


class ExportPretrained(pl.Callback):
    def __init__(self, dirpath: str | None = None):
        """``dirpath``: where to write the folder; None exports nothing."""
        self.dirpath = dirpath

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.dirpath or not hasattr(pl_module, "export_pretrained"):
            return
        callback = trainer.checkpoint_callback
        checkpoint = callback and (callback.best_model_path or callback.last_model_path)

        def export() -> None:
            if checkpoint:
                from modules.lm import export_checkpoint

                # from the checkpoint, on one process: also right under FSDP/DeepSpeed, where the live module
                # holds only a shard
                export_checkpoint(checkpoint, self.dirpath)
            else:
                pl_module.export_pretrained(self.dirpath)
            rank_zero_info(f"exported {checkpoint or 'final weights'} -> {self.dirpath}")

        on_rank_zero_for_all(trainer, export, f"the export to {self.dirpath}")
