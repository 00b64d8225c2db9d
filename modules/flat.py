"""FLAT — Forget data only Loss AdjustmenT (Wang et al., ICLR 2025, arXiv 2410.11143), and the unlearning
baselines it is compared with, as selectable losses.

FLAT needs neither retain data nor a reference model. For each forget prompt x_f it compares the
model's per-sample MEAN token probability of a template answer y_e ("I don't know"-style), P_e, with that
of the forget answer y_f, P_f, and minimises the negated variational bound of an f-divergence:

    L = mean over samples of [ -g(P_e) + f*(g(P_f)) ]

so the template answer is pulled up with weight g'(P_e) and the forget answer pushed down with weight
(f*∘g)'(P_f). Both weights stay bounded as P_f -> 0, which is why FLAT does not run away the way gradient
ascent does.

Pure loss functions first; the LightningModule follows the marker at the bottom.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from datamodules.common import padding_id, shards_parameters
from modules import lm
from modules.base import EvalRows, HFModule, run_in_root_forward
from modules.lm import token_logprobs

LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------------
# Per-sample mean token probability (FLAT's P_e and P_f)


def mean_token_prob_from_logprobs(token_logprob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over answer tokens of exp(token log-prob), per sample (B,), in [0, 1].

    This is FLAT's P: the mean of token probabilities, not exp of the mean log-prob (that is TOFU's Prob).
    A row without answer tokens raises: its P would silently be 0, which looks like perfect forgetting.
    """
    mask = mask.to(token_logprob.dtype)
    count = mask.sum(-1)
    if bool((count == 0).any()):
        rows = torch.nonzero(count == 0).flatten().tolist()
        raise ValueError(f"rows {rows} have no answer tokens (answer truncated away?); drop or count them upstream")
    return (token_logprob.exp() * mask).sum(-1) / count


def mean_token_prob(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """FLAT's P from a forward pass: ``logits`` (B, T, V) predict ``labels`` (B, T) shifted by one; only
    labelled (answer) tokens count."""
    return mean_token_prob_from_logprobs(token_logprobs(logits, labels, ignore_index), labels[:, 1:] != ignore_index)


# ----------------------------------------------------------------------------------------------------
# FLAT


@dataclass(frozen=True)
class Divergence:
    """An f-divergence in FLAT's variational form: activation g and the conjugate composed with it, f*∘g,
    with their derivatives (the per-sample importance weights of the two terms)."""

    name: str
    g: Callable[[torch.Tensor], torch.Tensor]
    conjugate_of_g: Callable[[torch.Tensor], torch.Tensor]
    g_prime: Callable[[torch.Tensor], torch.Tensor]
    conjugate_of_g_prime: Callable[[torch.Tensor], torch.Tensor]


DIVERGENCES: dict[str, Divergence] = {
    "kl": Divergence("kl", g=lambda v: v, conjugate_of_g=lambda v: torch.exp(v - 1),
                     g_prime=torch.ones_like, conjugate_of_g_prime=lambda v: torch.exp(v - 1)),
    "pearson": Divergence("pearson", g=lambda v: v, conjugate_of_g=lambda v: v * v / 4 + v,
                          g_prime=torch.ones_like, conjugate_of_g_prime=lambda v: v / 2 + 1),
    "js": Divergence("js", g=lambda v: LOG2 - F.softplus(-v), conjugate_of_g=lambda v: F.softplus(v) - LOG2,
                     g_prime=lambda v: torch.sigmoid(-v), conjugate_of_g_prime=torch.sigmoid),
    "tv": Divergence("tv", g=lambda v: 0.5 * torch.tanh(v), conjugate_of_g=lambda v: 0.5 * torch.tanh(v),
                     g_prime=lambda v: 0.5 * (1 - torch.tanh(v) ** 2),
                     conjugate_of_g_prime=lambda v: 0.5 * (1 - torch.tanh(v) ** 2)),
}
_ALIASES = {"kullback_leibler": "kl", "pearson_chi2": "pearson", "chi2": "pearson", "jensen_shannon": "js",
            "jensen-shannon": "js", "total_variation": "tv", "total-variation": "tv"}
# Present in the released code but with the wrong sign for this bound: training on them raises P_f.
_WRONG_SIGN = ("reverse_kl", "reverse-kl", "rkl", "hellinger", "squared_hellinger", "neyman", "neyman_chi2")


def get_divergence(name: str) -> Divergence:
    key = name.lower().strip()
    key = _ALIASES.get(key, key)
    if key in DIVERGENCES:
        return DIVERGENCES[key]
    if key in _WRONG_SIGN:
        raise ValueError(f"divergence {name!r} is not supported: its form in the released FLAT code has the "
                         f"wrong sign (it would raise the forget answer's probability); use one of {sorted(DIVERGENCES)}")
    raise ValueError(f"unknown divergence {name!r}; use one of {sorted(DIVERGENCES)}")


def flat_loss(p_template: torch.Tensor, p_forget: torch.Tensor, divergence: str = "kl") -> tuple[torch.Tensor, dict]:
    """L = mean[-g(P_e) + f*(g(P_f))] over samples.

    ``p_template`` P_e and ``p_forget`` P_f: per-sample mean token probabilities (B,) of the template and
    the forget answer to the same forget prompts, in [0, 1] (``mean_token_prob``). Metrics: the mean
    probabilities, the two terms and the mean importance weights g'(P_e) and (f*∘g)'(P_f).
    """
    div = get_divergence(divergence)
    if p_template.shape != p_forget.shape or p_template.dim() != 1:
        raise ValueError(f"p_template and p_forget must both be (B,), got {tuple(p_template.shape)} "
                         f"and {tuple(p_forget.shape)}")
    template_term = -div.g(p_template)
    forget_term = div.conjugate_of_g(p_forget)
    loss = (template_term + forget_term).mean()
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "p_template": p_template.detach().mean(),
            "p_forget": p_forget.detach().mean(),
            "template_term": template_term.detach().mean(),
            "forget_term": forget_term.detach().mean(),
            "weight_template": div.g_prime(p_template.detach()).mean(),
            "weight_forget": div.conjugate_of_g_prime(p_forget.detach()).mean(),
        }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------
# Baselines. Inputs are per-sample log-probs (B,): the MEAN token log-prob for the likelihood losses
# (GA, GD, IdkPO: each sample weighs the same whatever its length), the SUMMED sequence log-prob for the
# preference losses (NPO, DPO: a log-likelihood ratio of whole answers).


def gradient_ascent_loss(forget_logp: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """GA: maximise the forget NLL, i.e. minimise mean log pi(y_f | x_f). Unbounded below: it diverges."""
    loss = forget_logp.mean()
    return loss, {"loss": loss.detach(), "forget_nll": -forget_logp.detach().mean()}


def gradient_difference_loss(forget_logp: torch.Tensor, retain_logp: torch.Tensor,
                             retain_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """GD: -NLL_forget + retain_weight * NLL_retain (ascent on the forget set, descent on the retain set)."""
    forget_term = forget_logp.mean()
    retain_nll = -retain_logp.mean()
    loss = forget_term + retain_weight * retain_nll
    return loss, {"loss": loss.detach(), "forget_nll": -forget_term.detach(), "retain_nll": retain_nll.detach()}


def reference_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(pi_ref || pi_theta) of the next-token distributions, averaged over the positions where
    ``mask`` (B, T) is true. Logits (B, T, V) are aligned with the mask (already shifted); computed in
    float32. The direction is TOFU's "KL" baseline's: the reference's distribution weighs the log-ratio."""
    rows = mask.nonzero()[:, 0]  # only the answer positions: full-vocabulary float32 tensors are large
    policy = F.log_softmax(policy_logits[mask].float(), dim=-1)
    reference = F.log_softmax(reference_logits[mask].float(), dim=-1)
    per_position = (reference.exp() * (reference - policy)).sum(-1)
    totals = torch.zeros(mask.shape[0], dtype=per_position.dtype, device=per_position.device)
    return totals.index_add(0, rows, per_position) / mask.sum(-1).to(per_position.dtype)


def kl_regularised_ga_loss(forget_logp: torch.Tensor, retain_kl: torch.Tensor,
                           kl_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """KL-regularised GA: -NLL_forget + kl_weight * KL(pi_ref || pi_theta) on retain answers (per-sample
    ``reference_kl``), so ascent on the forget set is held back where it moves the retain predictions."""
    forget_term = forget_logp.mean()
    kl = retain_kl.mean()
    loss = forget_term + kl_weight * kl
    return loss, {"loss": loss.detach(), "forget_nll": -forget_term.detach(), "retain_kl": kl.detach()}


def npo_loss(policy_logp: torch.Tensor, reference_logp: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """NPO: -(2/beta) * mean log sigmoid(-beta * (log pi(y_f) - log pi_ref(y_f))).

    Summed sequence log-probs of the forget answers under the model and the frozen reference (which may be
    precomputed). Its gradient is GA's reweighted by how far the model has already moved from the
    reference, so it slows down instead of diverging.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    log_ratio = policy_logp - reference_logp
    loss = -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()
    return loss, {"loss": loss.detach(), "log_ratio": log_ratio.detach().mean(),
                  "forget_logp": policy_logp.detach().mean()}


def idk_loss(refusal_logp: torch.Tensor, retain_logp: torch.Tensor | None = None,
             retain_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """IdkPO as used by FLAT's comparison: NLL of a refusal given each forget prompt, optionally plus the
    retain NLL."""
    refusal_nll = -refusal_logp.mean()
    loss = refusal_nll
    metrics = {"refusal_nll": refusal_nll.detach()}
    if retain_logp is not None:
        retain_nll = -retain_logp.mean()
        loss = loss + retain_weight * retain_nll
        metrics["retain_nll"] = retain_nll.detach()
    metrics["loss"] = loss.detach()
    return loss, metrics


def dpo_loss(policy_chosen_logp: torch.Tensor, policy_rejected_logp: torch.Tensor,
             reference_chosen_logp: torch.Tensor, reference_rejected_logp: torch.Tensor,
             beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """DPO with the refusal as the chosen answer and the forget answer as the rejected one:
    -mean log sigmoid(beta * [(log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))]). Summed log-probs."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    chosen_reward = beta * (policy_chosen_logp - reference_chosen_logp)
    rejected_reward = beta * (policy_rejected_logp - reference_rejected_logp)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    return loss, {"loss": loss.detach(), "reward_margin": margin.detach().mean(),
                  "reward_accuracy": (margin.detach() > 0).float().mean(),
                  "chosen_reward": chosen_reward.detach().mean(), "rejected_reward": rejected_reward.detach().mean()}


# ---- LightningModule ----


LOSSES = ("flat", "ga", "gd", "ga_kl", "npo", "idk", "dpo")
_REFERENCE_LOSSES = ("npo", "dpo", "ga_kl")
_RETAIN_BY_DEFINITION = ("gd", "ga_kl")  # retain data are part of the loss, not an optional extra term


def _answer_stats(token_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample FLAT probability (mean of token probabilities), mean and summed log-prob (B,)."""
    mask = mask.to(token_logp.dtype)
    summed = (token_logp * mask).sum(-1)
    return {"p": mean_token_prob_from_logprobs(token_logp, mask), "mean_logp": summed / mask.sum(-1),
            "sum_logp": summed}


class FlatUnlearner(HFModule):
    """Unlearning on TOFU-style forget data (``TofuQAData(task='unlearn')`` batches) with FLAT or a baseline.

    One concatenated forward pass scores the forget answers, the template refusals and, when the loss uses
    them, the paired retain answers. P_e and P_f (FLAT's mean token probabilities) are logged for every
    loss, so the methods compare on the same scale; FLAT also logs its two terms and importance weights,
    NPO the weight 2*sigmoid(beta * log-ratio) that multiplies gradient ascent's gradient, KL-regularised GA
    the retain KL to the reference.
    """

    def __init__(self, loss: str = "flat", divergence: str = "kl", beta: float = 0.1, retain_weight: float = 1.0,
                 use_retain: bool | None = None, reference: str | None = None,
                 reference_mode: str | None = None, **kwargs):
        """``loss``: flat | ga | gd | ga_kl | npo | idk | dpo. ``divergence`` (FLAT): kl | js | pearson | tv.
        ``beta``: NPO/DPO temperature. ``use_retain``: add ``retain_weight`` x retain NLL (default: only
        for gd and ga_kl, whose definitions include retain data; idk with retain data is IdkPO+RT).
        ``retain_weight``: also the weight of ga_kl's KL term. ``reference`` (NPO/DPO/ga_kl): a model path
        for the frozen reference, default the initial weights (``model``). ``reference_mode``:
        ``precompute`` (NPO/DPO's default: score every forget sample once before the first step and keep
        the numbers, saved in checkpoints) or ``frozen`` (keep a frozen copy and score every batch; the only
        mode for ga_kl, which compares whole next-token distributions on retain rows re-drawn every epoch).
        Other arguments (``model: runs/tofu/target/export``, optimizer ...): ``HFModule``."""
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        get_divergence(divergence)  # unknown or wrong-sign names fail at construction
        if reference_mode is None:
            reference_mode = "frozen" if loss == "ga_kl" else "precompute"
        if reference_mode not in ("precompute", "frozen"):
            raise ValueError(f"reference_mode must be 'precompute' or 'frozen', got {reference_mode!r}")
        if loss == "ga_kl" and reference_mode != "frozen":
            raise ValueError("loss 'ga_kl' compares whole next-token distributions on retain rows drawn anew "
                             "every epoch, which cannot be precomputed: use reference_mode: frozen")
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.loss_name, self.divergence, self.beta = loss, divergence, beta
        self.retain_weight = retain_weight
        self.use_retain = loss in _RETAIN_BY_DEFINITION if use_retain is None else use_retain
        if loss in _RETAIN_BY_DEFINITION and not self.use_retain:
            raise ValueError(f"loss {loss!r} is defined with retain data: use_retain must be true")
        self.reference, self.reference_mode = reference, reference_mode
        self.reference_logps: dict[str, torch.Tensor] | None = None  # "forget"/"template" -> (N,)
        self._frozen_reference: list[torch.nn.Module] = []  # a list: not a submodule, not in the state dict
        self._test_rows = EvalRows(columns=3)  # kind index, P (mean token probability), mean token log-prob

    # -- forward ---------------------------------------------------------------------------------------
    def _parts(self) -> tuple[str, ...]:
        return ("forget", "template", "retain") if self.use_retain else ("forget", "template")

    def score_parts(self, model: torch.nn.Module, batch: dict[str, Any], parts: tuple[str, ...],
                    logits_of: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """One forward over the concatenated parts; per part the ``_answer_stats``. For the part named by
        ``logits_of`` also its shifted logits (rows, own width - 1, V) and the answer mask they align with."""
        missing = [p for p in parts if f"{p}_input_ids" not in batch]
        if missing:
            raise ValueError(f"loss {self.loss_name!r} needs {missing} rows in the batch; the data module gives "
                             f"{sorted(k[:-len('_input_ids')] for k in batch if k.endswith('_input_ids'))}")
        width = max(batch[f"{p}_input_ids"].shape[1] for p in parts)
        pad_id = padding_id(self.tokenizer)

        def widen(tensor: torch.Tensor, value: int) -> torch.Tensor:
            return F.pad(tensor, (0, width - tensor.shape[1]), value=value)

        input_ids = torch.cat([widen(batch[f"{p}_input_ids"], pad_id) for p in parts])
        attention = torch.cat([widen(batch[f"{p}_attention_mask"], 0) for p in parts])
        labels = torch.cat([widen(batch[f"{p}_labels"], -100) for p in parts])
        logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
        logp = token_logprobs(logits, labels)
        mask = labels[:, 1:] != -100
        sizes = [batch[f"{p}_input_ids"].shape[0] for p in parts]
        stats = {p: _answer_stats(lp, m) for p, lp, m in zip(parts, logp.split(sizes), mask.split(sizes))}
        if logits_of is not None:
            # right padding under a causal mask: a part's first positions are what its own forward would give
            start, own_width = sum(sizes[:parts.index(logits_of)]), batch[f"{logits_of}_input_ids"].shape[1]
            rows = slice(start, start + sizes[parts.index(logits_of)])
            stats[logits_of]["shifted_logits"] = logits[rows, :own_width - 1]
            stats[logits_of]["shifted_mask"] = batch[f"{logits_of}_labels"][:, 1:] != -100
        return stats

    # -- the frozen reference (NPO, DPO, KL-regularised GA) -----------------------------------------------
    def _reference_model(self) -> torch.nn.Module:
        if not self._frozen_reference:
            if self.reference is None:
                import copy

                reference = copy.deepcopy(self.model)
            else:
                reference = lm.load_model(self.reference, tokenizer=self.tokenizer, **self.load_kwargs)
            reference.eval().requires_grad_(False).to(self.device)
            self._frozen_reference.append(reference)
        return self._frozen_reference[0]

    @torch.no_grad()
    def _reference_scores(self, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        stats = self.score_parts(model, batch, ("forget", "template"))
        return {"forget": stats["forget"]["sum_logp"], "template": stats["template"]["sum_logp"]}

    def precompute_reference(self) -> None:
        """Score every forget sample once with the reference (the initial weights by default)."""
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "reference_dataloader"):
            raise ValueError("reference_mode 'precompute' needs a data module with reference_dataloader() "
                             "(TofuQAData); use reference_mode: frozen")
        model = self.model if self.reference is None else self._reference_model()
        was_training = model.training
        model.eval()
        forget, template = {}, {}

        def score_every_forget_sample() -> None:
            for batch in datamodule.reference_dataloader():  # the whole set on every process
                batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                # the training step's precision (bf16 autocast ...): the first step's log-ratio is then 0 up to
                # the rounding of a differently padded batch, not a float32-vs-bf16 difference
                with self.trainer.precision_plugin.forward_context():
                    scores = self._reference_scores(model, batch)
                for i, index in enumerate(batch["index"].tolist()):
                    forget[index], template[index] = scores["forget"][i].item(), scores["template"][i].item()

        # outside a training step FSDP keeps the embeddings and head sharded: run inside the root's forward
        run_in_root_forward(self.trainer, self, score_every_forget_sample)
        model.train(was_training)
        self._frozen_reference.clear()  # the numbers are all that is needed
        size = max(forget) + 1
        self.reference_logps = {
            "forget": torch.tensor([forget.get(i, float("nan")) for i in range(size)], dtype=torch.float32),
            "template": torch.tensor([template.get(i, float("nan")) for i in range(size)], dtype=torch.float32),
        }

    @torch.no_grad()
    def reference_retain_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """The frozen reference's shifted logits on the batch's retain rows (ga_kl)."""
        reference = self._reference_model()
        return reference(input_ids=batch["retain_input_ids"], attention_mask=batch["retain_attention_mask"],
                         use_cache=False).logits[:, :-1]

    def reference_for(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.reference_mode == "frozen":
            return self._reference_scores(self._reference_model(), batch)
        index = batch["index"].cpu()
        out = {name: values[index].to(self.device) for name, values in self.reference_logps.items()}
        if any(torch.isnan(v).any() for v in out.values()):
            raise ValueError("no precomputed reference log-prob for some forget samples (data changed since?)")
        return out

    def on_fit_start(self) -> None:
        copies_itself = self.loss_name in _REFERENCE_LOSSES and self.reference_mode == "frozen" and self.reference is None
        if copies_itself and shards_parameters(self.trainer.strategy):
            raise ValueError(f"loss {self.loss_name!r} with reference_mode 'frozen' copies the model as its "
                             f"reference, and under FSDP or DeepSpeed ZeRO-3 each process holds only a shard of it: "
                             f"pass the initial model's path as `reference`"
                             + ("" if self.loss_name == "ga_kl" else " or use reference_mode: precompute"))
        if self.loss_name in _REFERENCE_LOSSES and self.reference_mode == "precompute" and self.reference_logps is None:
            self.precompute_reference()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.reference_logps is not None:  # a resumed run's weights are no longer the reference
            checkpoint["reference_logps"] = self.reference_logps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.reference_logps = checkpoint.get("reference_logps")
        if self.loss_name in _REFERENCE_LOSSES and self.reference_mode == "frozen" and self.reference is None:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn("reference_mode 'frozen' without `reference`: a resumed run would copy the resumed "
                           "weights as its reference; pass the initial model's path as `reference`")

    # -- training --------------------------------------------------------------------------------------
    def training_forward_shapes(self, batch: dict[str, Any]) -> list[tuple[int, int, torch.Tensor | None]]:
        """One forward over the loss's parts, padded to the widest (``score_parts``)."""
        parts = [part for part in self._parts() if f"{part}_input_ids" in batch]
        if not parts:
            return []
        rows = sum(batch[f"{part}_input_ids"].shape[0] for part in parts)
        width = max(batch[f"{part}_input_ids"].shape[1] for part in parts)
        return [(rows, width, sum(batch[f"{part}_attention_mask"].sum() for part in parts))]

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        stats = self.score_parts(self.model, batch, self._parts(),
                                 logits_of="retain" if self.loss_name == "ga_kl" else None)
        forget, template = stats["forget"], stats["template"]
        name = self.loss_name
        if name == "flat":
            loss, metrics = flat_loss(template["p"], forget["p"], self.divergence)
        elif name == "ga":
            loss, metrics = gradient_ascent_loss(forget["mean_logp"])
        elif name == "gd":
            loss, metrics = gradient_difference_loss(forget["mean_logp"], stats["retain"]["mean_logp"],
                                                     self.retain_weight)
        elif name == "ga_kl":
            retain = stats["retain"]
            kl = reference_kl(retain["shifted_logits"], self.reference_retain_logits(batch), retain["shifted_mask"])
            loss, metrics = kl_regularised_ga_loss(forget["mean_logp"], kl, self.retain_weight)
        elif name == "idk":
            retain = stats["retain"]["mean_logp"] if self.use_retain else None
            loss, metrics = idk_loss(template["mean_logp"], retain, self.retain_weight)
        elif name == "npo":
            reference = self.reference_for(batch)
            loss, metrics = npo_loss(forget["sum_logp"], reference["forget"], self.beta)
            metrics["weight_forget"] = (2 * torch.sigmoid(self.beta * (forget["sum_logp"] - reference["forget"]))
                                        ).detach().mean()
        else:  # dpo
            reference = self.reference_for(batch)
            loss, metrics = dpo_loss(template["sum_logp"], forget["sum_logp"], reference["template"],
                                     reference["forget"], self.beta)
        if self.use_retain and name not in (*_RETAIN_BY_DEFINITION, "idk"):
            retain_nll = -stats["retain"]["mean_logp"].mean()
            loss = loss + self.retain_weight * retain_nll
            metrics["retain_nll"], metrics["loss"] = retain_nll.detach(), loss.detach()
        metrics["p_template"] = template["p"].detach().mean()
        metrics["p_forget"] = forget["p"].detach().mean()
        return loss, metrics

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, metrics = self.compute_loss(batch)
        batch_size = len(batch["index"])
        self.log_dict({f"train/{k}": v.float() for k, v in metrics.items() if k != "loss"}, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    # -- test: teacher-forced answer probabilities of the evaluation splits (the full TOFU report comes from
    # the TofuEvaluation callback) ---------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self._test_rows = EvalRows(columns=3)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        stats = _answer_stats(token_logprobs(logits, batch["labels"]), batch["labels"][:, 1:] != -100)
        kinds = batch.get("kind")
        if kinds is None:  # rows of no TOFU split: reported as test/other
            kinds = torch.full_like(stats["p"], -1, dtype=torch.long)
        self._test_rows.add(batch.get("row_id"), [kinds.to(stats["p"].device), stats["p"], stats["mean_logp"]],
                            self.global_rank)

    def on_test_epoch_end(self) -> None:
        # per split over the distinct rows of all ranks (the distributed sampler repeats some to even out the
        # ranks); every rank then holds the same values, sync_dist only keeps Lightning's epoch-end check quiet
        from datamodules.tofu_data import EVAL_KINDS

        rows = self._test_rows.gather(self.trainer.strategy, self.device)
        for k, kind in [*enumerate(EVAL_KINDS), (-1, "other")]:
            selected = rows[:, 1] == k
            if bool(selected.any()):
                self.log(f"test/{kind}/p_answer", rows[selected, 2].mean().float(), sync_dist=True)
                self.log(f"test/{kind}/nll", -rows[selected, 3].mean().float(), sync_dist=True)
