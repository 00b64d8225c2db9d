"""Supervised fine-tuning of a causal LM, loss on response tokens only.

Used for the warm-up policy of DAPO (the embedded arithmetic task) and for TOFU-style target and
retain models. ``test`` reports greedy exact-match accuracy when the data module can check answers.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from datamodules.common import padding_id
from modules import lm
from modules.base import EvalRows, HFModule


def response_nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed next-token cross-entropy over labelled (response) tokens, and their count.

    ``logits`` (B, T, V) at position t predict ``labels`` at t+1.
    """
    shifted_logits, shifted_labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.size(-1)), shifted_labels.reshape(-1),
                          ignore_index=ignore_index, reduction="none").view(shifted_labels.shape)
    return nll.sum(1), (shifted_labels != ignore_index).sum(1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, dict]:
    """Token-averaged next-token cross-entropy over labelled (response) tokens of the batch."""
    nll, tokens = response_nll(logits, labels, ignore_index)
    count = tokens.sum()
    loss = nll.sum() / count.clamp(min=1)
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
                 batch_size=len(batch["reference"]), sync_dist=True)  # all processes' tokens
        return loss

    @torch.no_grad()
    def generate(self, prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor,
                 max_new_tokens: int | None = None) -> list[str]:
        """Greedy completions (decoded, special tokens removed) of left-padded prompts."""
        output = self.model.generate(
            input_ids=prompt_input_ids, attention_mask=prompt_attention_mask, do_sample=False,
            max_new_tokens=max_new_tokens or self.max_new_tokens, pad_token_id=padding_id(self.tokenizer),
            eos_token_id=self.tokenizer.eos_token_id, **lm.generation_sync_kwargs(self.model))
        return self.tokenizer.batch_decode(output[:, prompt_input_ids.shape[1]:], skip_special_tokens=True)

    def _evaluate(self, batch: dict[str, Any], stage: str, with_generation: bool) -> None:
        # per row: response-token NLL sum and count, and greedy correctness (-1: not generated); the metrics
        # come at epoch end from the distinct rows of all ranks (the distributed sampler repeats some)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        nll, tokens = response_nll(logits, batch["labels"])
        correct = torch.full((len(nll),), -1.0, device=self.device)
        checker = getattr(self.trainer.datamodule, "is_correct", None)
        if with_generation and checker is not None:
            completions = self.generate(batch["prompt_input_ids"], batch["prompt_attention_mask"])
            verdicts = [checker(reference, completion) for reference, completion in zip(batch["reference"], completions)]
            if verdicts and verdicts[0] is not None:
                correct = torch.tensor([float(v) for v in verdicts], device=self.device)
        self._eval_rows.add(batch.get("row_id"), [nll, tokens, correct], self.global_rank)

    def _start_eval(self) -> None:
        self._eval_rows = EvalRows(columns=3)  # response NLL sum, response tokens, correct (-1: not judged)

    def _end_eval(self, stage: str) -> None:
        rows = self._eval_rows.gather(self.trainer.strategy, self.device)
        if not len(rows):
            return
        # equal on all ranks already; sync_dist only keeps Lightning's epoch-level distributed check quiet
        self.log(f"{stage}/loss", (rows[:, 1].sum() / rows[:, 2].sum().clamp(min=1)).float(), prog_bar=True, sync_dist=True)
        judged = rows[:, 3] >= 0
        if judged.any():
            self.log(f"{stage}/accuracy", rows[judged, 3].mean().float(), prog_bar=True, sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.generate_on_validation)

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test", True)

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")


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
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first (its folder is there, not empty): keep it
        shutil.rmtree(tmp)
        if not (path / "config.json").exists():
            raise
    return path
