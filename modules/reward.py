"""Bradley-Terry reward model (Skywork-Reward), with the loss variants the paper compared.

A causal-LM backbone with a one-output score head read at the last non-pad token
(``AutoModelForSequenceClassification(num_labels=1)``). The tokenizer always gets a pad token distinct
from EOS, since pooling at "the last non-pad token" cannot work when EOS looks like padding.
Chosen and rejected rows go through the model in one forward pass (2B rows), or, with ``length_chunks``,
in that many passes over rows of similar length, each padded only to its own longest row.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from modules import lm
from modules.base import EvalRows, HFModule

LOSSES = ("bt", "bt_temperature", "focal", "hinge")


def preference_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                    kind: str = "bt", temperature: float = 1.0, gamma: float = 2.0, hinge_margin: float = 1.0,
                    center_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pairwise reward loss on scalar rewards (B,) of the chosen and rejected responses.

    With z = r_c − r_r − margin:
    - ``bt``: −log σ(z)
    - ``bt_temperature``: −log σ(z / T)
    - ``focal``: −(1 − σ(z))^γ · log σ(z)
    - ``hinge``: max(0, hinge_margin − z)
    plus ``center_coef`` · mean((r_c + r_r)²), which pins the reward scale near zero.
    Accuracy is strict: a tie counts as wrong.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown reward loss {kind!r}; choose one of {LOSSES}")
    chosen, rejected = chosen.float(), rejected.float()
    delta = chosen - rejected
    z = delta - margin.float() if margin is not None else delta
    if kind == "bt":
        per_pair = -F.logsigmoid(z)
    elif kind == "bt_temperature":
        per_pair = -F.logsigmoid(z / temperature)
    elif kind == "focal":
        per_pair = -((1 - torch.sigmoid(z)) ** gamma) * F.logsigmoid(z)
    else:
        per_pair = F.relu(hinge_margin - z)
    loss = per_pair.mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    rewards = torch.cat([chosen, rejected]).detach()
    metrics = {
        "loss": loss.detach(),
        "accuracy": (delta > 0).float().mean().detach(),
        "margin": delta.mean().detach(),
        "reward_chosen": chosen.mean().detach(),
        "reward_rejected": rejected.mean().detach(),
        "reward_min": rewards.min(),
        "reward_mean": rewards.mean(),
        "reward_max": rewards.max(),
    }
    return loss, metrics


def length_chunks_of(lengths: torch.Tensor, chunks: int) -> list[torch.Tensor]:
    """Row indices cut into ``chunks`` parts of similar length (sorted, then split evenly; fewer parts
    for fewer rows)."""
    order = torch.argsort(lengths, stable=True)
    return [part for part in order.tensor_split(min(chunks, len(order))) if len(part)]


def padding_layout(attention_mask: torch.Tensor) -> str | None:
    """'right' or 'left' where every row's ones are contiguous at that side (a row may be all ones), else None."""
    real, width = attention_mask.bool(), attention_mask.shape[1]
    positions = torch.arange(width, device=attention_mask.device)
    lengths = real.sum(-1, keepdim=True)
    if torch.equal(real, positions < lengths):
        return "right"
    if torch.equal(real, positions >= width - lengths):
        return "left"
    return None


class RewardModel(HFModule):
    model_kind = "sequence_classification"

    def __init__(self, loss: str = "bt", temperature: float = 1.0, focal_gamma: float = 2.0,
                 hinge_margin: float = 1.0, center_coef: float = 0.0, length_chunks: int = 1, **kwargs):
        """Loss settings: see ``preference_loss``. ``length_chunks``: run each batch's rows through the
        model in this many passes, over rows of similar length, each padded only to its own longest row: the
        same rewards, loss and gradients up to rounding, with less compute spent on padding, and (unlike the
        data's ``group_by_length``) the same pairs in every step. Each pass keeps its activations until the
        backward pass, as one pass would. Under ``compile`` every new width compiles again, and under FSDP
        every pass gathers the sharded parameters again. Other arguments: ``HFModule``."""
        if loss not in LOSSES:
            raise ValueError(f"unknown reward loss {loss!r}; choose one of {LOSSES}")
        if length_chunks < 1:
            raise ValueError(f"length_chunks must be at least 1, got {length_chunks}")
        super().__init__(**kwargs)
        self.length_chunks = length_chunks
        # the last batch's passes: the throughput callback asks for them before the training step does
        self._passes_of: tuple[torch.Tensor, list[tuple[torch.Tensor, slice]] | None] | None = None
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.loss_kwargs = dict(kind=loss, temperature=temperature, gamma=focal_gamma,
                                hinge_margin=hinge_margin, center_coef=center_coef)
        self._eval_rows = EvalRows(columns=4)  # subset, chosen reward, rejected reward, margin
        self.subset_counts: dict[str, dict[str, int]] = {}

    def prepare_tokenizer(self, tokenizer) -> None:
        lm.ensure_distinct_pad_token(tokenizer)

    def forward_passes(self, attention_mask: torch.Tensor) -> list[tuple[torch.Tensor, slice]] | None:
        """The passes through the model that ``length_chunks`` makes of a batch: (rows, columns) each, the
        columns cut to the longest row of the pass; None for one pass over the whole batch (no chunks, one
        row, or a mask whose rows are not padded at one side)."""
        if self.length_chunks == 1 or len(attention_mask) < 2:
            return None
        if self._passes_of is not None and self._passes_of[0] is attention_mask:
            return self._passes_of[1]
        layout, passes = padding_layout(attention_mask), None
        if layout is not None:
            lengths, full = attention_mask.sum(-1), attention_mask.shape[1]
            passes = []
            for rows in length_chunks_of(lengths, self.length_chunks):
                width = int(lengths[rows].max())  # one device sync per pass: its width sets the tensor shapes
                passes.append((rows, slice(None, width) if layout == "right" else slice(full - width, None)))
        self._passes_of = (attention_mask, passes)
        return passes

    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        passes = self.forward_passes(attention_mask)
        if passes is None:
            return self._forward_rewards(input_ids, attention_mask)
        rewards = [self._forward_rewards(input_ids[rows, columns], attention_mask[rows, columns]) for rows, columns in passes]
        return torch.cat(rewards)[torch.argsort(torch.cat([rows for rows, _ in passes]))]  # back in the batch's order

    def training_forward_shapes(self, batch: dict[str, Any]) -> list[tuple[int, int, torch.Tensor | None]]:
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        passes = self.forward_passes(mask) if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if passes is None:
            return super().training_forward_shapes(batch)
        return [(len(rows), mask[rows, columns].shape[1], mask[rows, columns].sum()) for rows, columns in passes]

    def _forward_rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # use_cache=False: a KV cache is useless here, and with activation checkpointing the recomputed
        # forward would append to it and double the key length
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.squeeze(-1).float()

    def pair_rewards(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = self.rewards(batch["input_ids"], batch["attention_mask"])
        pairs = rewards.shape[0] // 2
        return rewards[:pairs], rewards[pairs:]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        chosen, rejected = self.pair_rewards(batch)
        loss, metrics = preference_loss(chosen, rejected, batch.get("margin"), **self.loss_kwargs)
        self.log_dict({f"train/{key}": value for key, value in metrics.items()}, batch_size=len(chosen))
        # all processes' tokens (sync_dist sums them), as the name says; rank 0's alone would undercount
        self.log("train/tokens", batch["attention_mask"].sum().float(), reduce_fx="sum", batch_size=len(chosen),
                 sync_dist=True)
        return loss

    # -- evaluation with per-subset accuracy -----------------------------------------------------------
    def _subset_names(self) -> list[str]:
        return list(getattr(self.trainer.datamodule, "subset_names", None) or ["all"])

    def _start_eval(self) -> None:
        self._eval_rows = EvalRows(columns=4)

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        # keep each pair's rewards; the metrics are computed once per epoch over the distinct pairs of all
        # ranks (the distributed sampler repeats some pairs to even out the ranks)
        chosen, rejected = self.pair_rewards(batch)
        margin = batch.get("margin")
        self._eval_rows.add(batch.get("row_id"), [batch["subset"].to(self.device), chosen, rejected,
                                                  margin.to(self.device) if margin is not None else torch.zeros_like(chosen)],
                            self.global_rank)

    def _end_eval(self, stage: str) -> dict[str, float]:
        rows = self._eval_rows.gather(self.trainer.strategy, self.device)
        names = self._subset_names()
        if len(rows):
            chosen, rejected, margin = rows[:, 2].float(), rows[:, 3].float(), rows[:, 4].float()
            _, metrics = preference_loss(chosen, rejected, margin, **self.loss_kwargs)
            # equal on all ranks already (computed from every rank's pairs); sync_dist only keeps Lightning's
            # epoch-level distributed check quiet, the mean of equal values being that value
            self.log_dict({f"{stage}/{key}": value for key, value in metrics.items()}, sync_dist=True)
        subset = rows[:, 1].long()
        pairs = torch.bincount(subset, minlength=len(names)).tolist()
        correct = torch.bincount(subset[rows[:, 2].float() > rows[:, 3].float()], minlength=len(names)).tolist()
        # the exact counts behind the logged accuracies (logged metrics are floats)
        self.subset_counts = {name: {"pairs": pairs[i], "correct": correct[i]} for i, name in enumerate(names) if pairs[i]}
        per_subset = {name: counts["correct"] / counts["pairs"] for name, counts in self.subset_counts.items()}
        for name, value in per_subset.items():  # also with one subset, so every run logs the same keys
            self.log(f"{stage}/accuracy/{name}", value, sync_dist=True)
        return per_subset

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Rewards of each pair, with the rows' ``row_id`` (index in their file) and ``subset`` name where the
        data has them."""
        chosen, rejected = self.pair_rewards(batch)
        out: dict[str, Any] = {"reward_chosen": chosen.cpu(), "reward_rejected": rejected.cpu()}
        if "row_id" in batch:
            out["row_id"] = batch["row_id"].cpu()
        names = self._subset_names() if self._trainer is not None else ["all"]
        if "subset" in batch and names != ["all"]:
            out["subset"] = [names[index] for index in batch["subset"].tolist()]
        return out
