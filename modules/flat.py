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

import torch
import torch.nn.functional as F

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
