"""Supervised fine-tuning of a causal LM, loss on response tokens only.

Used for the warm-up policy of DAPO (the embedded arithmetic task) and for TOFU-style target and
retain models. ``test`` reports greedy exact-match accuracy when the data module can check answers.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from modules.base import HFModule


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, dict]:
    """Token-averaged next-token cross-entropy over labelled (response) tokens.

    ``logits`` (B, T, V) at position t predict ``labels`` at t+1.
    """
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    count = (shifted_labels != ignore_index).sum()
    loss = F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.size(-1)), shifted_labels.reshape(-1),
                           ignore_index=ignore_index, reduction="sum") / count.clamp(min=1)
    return loss, {"loss": loss.detach(), "response_tokens": count.detach()}


class SFT(HFModule):
    def __init__(self, max_new_tokens: int = 64, generate_on_validation: bool = True, **kwargs):
        """``max_new_tokens``: generation budget of the accuracy evaluation. Other arguments: ``HFModule``."""
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.max_new_tokens = max_new_tokens
        self.generate_on_validation = generate_on_validation

    def forward_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            use_cache=False).logits  # no cache: it would grow under activation checkpointing
        return sft_loss(logits, batch["labels"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, metrics = self.forward_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["reference"]))
        self.log("train/response_tokens", metrics["response_tokens"].float(), reduce_fx="sum",
                 batch_size=len(batch["reference"]))
        return loss

    @torch.no_grad()
    def generate(self, prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor,
                 max_new_tokens: Optional[int] = None) -> list[str]:
        """Greedy completions (decoded, special tokens removed) of left-padded prompts."""
        output = self.model.generate(
            input_ids=prompt_input_ids, attention_mask=prompt_attention_mask, do_sample=False,
            max_new_tokens=max_new_tokens or self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.batch_decode(output[:, prompt_input_ids.shape[1]:], skip_special_tokens=True)

    def _evaluate(self, batch: dict[str, Any], stage: str, with_generation: bool) -> None:
        batch_size = len(batch["reference"])
        loss, _ = self.forward_loss(batch)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=True)
        checker = getattr(self.trainer.datamodule, "is_correct", None)
        if not with_generation or checker is None:
            return
        completions = self.generate(batch["prompt_input_ids"], batch["prompt_attention_mask"])
        verdicts = [checker(reference, completion) for reference, completion in zip(batch["reference"], completions)]
        if verdicts and verdicts[0] is not None:
            accuracy = torch.tensor([float(v) for v in verdicts]).mean()
            self.log(f"{stage}/accuracy", accuracy, prog_bar=True, batch_size=batch_size, sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.generate_on_validation)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test", True)


# distinct arithmetic problems the tiny-sft preset is fine-tuned on (the first ones a seed draws)
PRESET_SFT_PROBLEMS = 6000


def build_arithmetic_preset(base: str, path: str | Path, steps: int = 800, seed: int = 0) -> Path:
    """Fine-tune ``base`` briefly on the embedded arithmetic task and save it at ``path`` (the
    ``tiny-sft`` preset). Deterministic in ``seed``; the caller's random state is left untouched."""
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import rank_zero_info

    from datamodules.sft_data import SFTData
    from modules.base import WarmupSchedule

    path = Path(path)
    rank_zero_info(f"building preset {path.name}: {steps} SFT steps of {base} on the arithmetic task (once)")
    module = SFT(model=base, generate_on_validation=False,
                 optimizer=functools.partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.01, betas=(0.9, 0.98)),
                 lr_scheduler=functools.partial(WarmupSchedule, warmup_steps=40, min_lr_ratio=0.1))
    data = SFTData(tokenizer=base, train_size=PRESET_SFT_PROBLEMS, val_size=0, test_size=0, batch_size=32, max_length=128, seed=seed)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, devices=1, num_sanity_val_steps=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        trainer.fit(module, datamodule=data)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    module.export_pretrained(tmp)
    if path.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, path)
    return path
