"""TOFU evaluation math (Maini et al., 2024), as pure functions: no Lightning, no model.

Every probability is *length-normalised*, as in TOFU's code: Prob(a | q) = exp(-mean token NLL of a),
the mean over the answer's tokens. A model's evaluation is four splits (``EVAL_KINDS``: forget, retain,
real_authors, world_facts), each a set of per-sample arrays:

    gt_nll          (N,)         mean token NLL of ``answer``
    base_nll        (N,)         mean token NLL of the truth ratio's base answer: ``paraphrased_answer`` on
                                 forget/retain, ``answer`` on real_authors/world_facts (TOFU's choice;
                                 ``datamodules.tofu_data.BASE_ANSWER_COLUMN``)
    perturbed_nll   (N, K) or a ragged list of N lists: mean token NLL of each perturbed answer
    rougeL_recall   (N,)         ROUGE-L recall of the greedy answer against ``answer``

Saved evaluation JSON (``save_eval``/``load_eval``; the retain model's file feeds Forget Quality)::

    {"format": "tofu-eval/v1",
     "forget_split": "forget10",                 # which forget split the "forget" arrays are about
     "model": "<path or name>",                  # free text
     "rouge": ROUGE_METHOD,                      # how rougeL_recall was computed (absent: unstemmed, older)
     "splits": {"forget": {"gt_nll": [...], "base_nll": [...], "perturbed_nll": [[...], ...],
                           "rougeL_recall": [...], "truth_ratio": [...]},
                "retain": {...}, "real_authors": {...}, "world_facts": {...}},
     "report": {...}}                            # tofu_report's dict

``truth_ratio`` is stored for reading convenience and recomputed from the NLLs when absent.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

EVAL_FORMAT = "tofu-eval/v1"
# how ROUGE-L was computed, recorded in saved evaluations: files without it (before 2026-11-27) compared
# words unstemmed
ROUGE_METHOD = "rougeL recall, Porter-stemmed words (rouge_score use_stemmer=True)"
EVAL_KINDS = ("forget", "retain", "real_authors", "world_facts")
UTILITY_KINDS = ("retain", "real_authors", "world_facts")
SAMPLE_FIELDS = ("gt_nll", "base_nll", "perturbed_nll", "rougeL_recall")


# ----------------------------------------------------------------------------------------------------
# From token log-probs to per-sample numbers (torch; used inside test/predict steps)


def mean_answer_nll(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean NLL over the answer tokens: -sum(logp * mask) / sum(mask), shape (B,).

    ``token_logprobs`` (B, T) as from ``modules.lm.token_logprobs``; ``mask`` (B, T) marks answer tokens.
    A row without any answer token has no probability (its answer was truncated away): that is an error,
    not a silent 0 or 1.
    """
    mask = mask.to(token_logprobs.dtype)
    count = mask.sum(-1)
    if bool((count == 0).any()):
        rows = torch.nonzero(count == 0).flatten().tolist()
        raise ValueError(f"rows {rows} have no answer tokens (answer truncated away?); drop or count them upstream")
    return -(token_logprobs * mask).sum(-1) / count


def answer_prob(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Prob(a | q) = exp(-mean token NLL of a), per sample (B,)."""
    return torch.exp(-mean_answer_nll(token_logprobs, mask))


def answer_nll_from_logits(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean token NLL of the labelled tokens of each row; ``logits`` (B, T, V) predict ``labels`` shifted by one."""
    from modules.lm import token_logprobs

    return mean_answer_nll(token_logprobs(logits, labels, ignore_index), labels[:, 1:] != ignore_index)


# ----------------------------------------------------------------------------------------------------
# Per-sample statistics (numpy)


def _per_sample_means(perturbed_nll: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Mean over each sample's perturbed answers; accepts (N, K) arrays and ragged lists."""
    if isinstance(perturbed_nll, np.ndarray) and perturbed_nll.ndim == 2:
        if perturbed_nll.shape[1] == 0:
            raise ValueError("perturbed_nll has no perturbed answers")
        return perturbed_nll.astype(np.float64).mean(axis=1)
    means = []
    for i, row in enumerate(perturbed_nll):
        row = np.asarray(row, dtype=np.float64)
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"sample {i}: expected a non-empty list of perturbed NLLs, got shape {row.shape}")
        means.append(row.mean())
    return np.asarray(means, dtype=np.float64)


def _vector(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one value per sample, got shape {array.shape}")
    return array


# Bound of |log R| (nats per answer token). exp(709.8) is float64's largest value: a wider gap makes R or 1/R
# infinite, which no JSON file holds and the KS test of forget quality cannot rank. Any gap near the bound
# means "certain" (one answer e^-700 times as likely per token), so clipping changes no reported number
# beyond ties among such samples, where the gap's size carries no information anyway.
LOG_RATIO_LIMIT = 700.0


def truth_ratio(base_nll: Any, perturbed_nll: Any) -> np.ndarray:
    """R = geometric mean over k of Prob(perturbed_k) / Prob(base), per sample.

    With length-normalised probabilities Prob = exp(-NLL): R = exp(NLL_base - mean_k NLL_perturbed_k).
    R < 1: the model prefers the true (paraphrased) answer; R near 1: it cannot tell true from false.
    The log-ratio is clipped to +-``LOG_RATIO_LIMIT``, so R and 1/R stay finite and positive.
    """
    base = _vector(base_nll, "base_nll")
    perturbed_mean = _per_sample_means(perturbed_nll)
    if perturbed_mean.shape != base.shape:
        raise ValueError(f"base_nll has {base.size} samples, perturbed_nll {perturbed_mean.size}")
    return np.exp(np.clip(base - perturbed_mean, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))


def truth_ratio_score(ratios: Any) -> np.ndarray:
    """Utility-side truth-ratio score max(0, 1 - R) per sample: 1 when the perturbed answers are unlikely."""
    return np.maximum(0.0, 1.0 - _vector(ratios, "truth ratios"))


def forget_truth_ratio_score(ratios: Any) -> np.ndarray:
    """The forget split's reported truth-ratio number, min(R, 1/R) per sample (TOFU's choice)."""
    r = _vector(ratios, "truth ratios")
    with np.errstate(divide="ignore"):  # R = 0 (handed in, not from truth_ratio): min(0, inf) = 0, the limit
        return np.minimum(r, 1.0 / r)


def normalized_prob(gt_nll: Any, perturbed_nll: Any) -> np.ndarray:
    """P(a) / (P(a) + sum_k P(a~_k)) with length-normalised probabilities, per sample.

    Used for real_authors and world_facts, where an answer's raw probability says little: the question is
    whether the model ranks the true entity above the wrong ones.
    """
    gt = _vector(gt_nll, "gt_nll")
    rows = list(perturbed_nll)  # rows of an (N, K) array or of a ragged list
    if len(rows) != gt.size:
        raise ValueError(f"gt_nll has {gt.size} samples, perturbed_nll {len(rows)}")
    out = np.empty_like(gt)
    for i, (true_nll, wrong) in enumerate(zip(gt, rows)):
        wrong = np.asarray(wrong, dtype=np.float64)
        if wrong.ndim != 1 or wrong.size == 0:
            raise ValueError(f"sample {i}: expected a non-empty list of perturbed NLLs")
        # divide through by P(a) to stay finite when every probability underflows; a wrong answer infinitely
        # likelier than the true one gives 1 / inf = 0, the limit
        with np.errstate(over="ignore"):
            out[i] = 1.0 / (1.0 + np.exp(true_nll - wrong).sum())
    return out


# ----------------------------------------------------------------------------------------------------
# ROUGE-L recall


_TOKEN = re.compile(r"[a-z0-9]+")


@functools.lru_cache(maxsize=1)
def _porter_stemmer():
    from nltk.stem.porter import PorterStemmer  # NLTK's default mode, the one the rouge_score package uses

    return PorterStemmer()


@functools.lru_cache(maxsize=1 << 16)
def _stem(token: str) -> str:
    return _porter_stemmer().stem(token)


def rouge_tokens(text: str, stem: bool = True) -> list[str]:
    """ROUGE's tokens as TOFU scores them (``rouge_score`` with ``use_stemmer=True``): lowercase alphanumeric
    runs (whitespace and punctuation separate them), each of more than 3 characters Porter-stemmed, so
    "writes" and "write" match. ``stem=False`` keeps the runs as they are."""
    tokens = _TOKEN.findall(text.lower())
    return [_stem(token) if stem and len(token) > 3 else token for token in tokens]


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_recall(prediction: str, reference: str, stem: bool = True) -> float:
    """|LCS(prediction, reference)| / |reference| over ``rouge_tokens``; 0 for a reference without tokens."""
    ref = rouge_tokens(reference, stem)
    if not ref:
        return 0.0
    return _lcs_length(rouge_tokens(prediction, stem), ref) / len(ref)


# ----------------------------------------------------------------------------------------------------
# Forget quality, model utility, the report


def forget_quality(unlearned_truth_ratios: Any, retain_truth_ratios: Any) -> dict[str, float]:
    """Two-sample KS test between the forget-split truth ratios of the unlearned and the retain model.

    Returns ``{"forget_quality": p-value, "ks_statistic": D}``. A high p-value (> 0.05) means the
    unlearned model is statistically indistinguishable from one never trained on the forget set. TOFU's
    code tests 1/R instead of R; KS depends only on ranks, so the p-value is the same.
    """
    from scipy.stats import ks_2samp

    a, b = _vector(unlearned_truth_ratios, "unlearned truth ratios"), _vector(retain_truth_ratios, "retain truth ratios")
    if a.size == 0 or b.size == 0:
        raise ValueError("forget quality needs at least one truth ratio from each model")
    result = ks_2samp(a, b)
    return {"forget_quality": float(result.pvalue), "ks_statistic": float(result.statistic)}


def harmonic_mean(values: Sequence[float]) -> float:
    """n / sum(1/x); 0 as soon as one value is 0 (the limit), an error for negative values."""
    array = _vector(values, "values")
    if array.size == 0:
        raise ValueError("harmonic mean of nothing")
    if (array < 0).any():
        raise ValueError(f"harmonic mean needs non-negative values, got {array.tolist()}")
    if (array == 0).any():
        return 0.0
    return float(array.size / (1.0 / array).sum())


def split_metrics(kind: str, scores: Mapping[str, Any]) -> dict[str, float]:
    """The three TOFU numbers of one split: prob, rougeL_recall, truth_ratio (means over samples).

    prob: mean exp(-gt_nll) on forget/retain, mean normalised probability on real_authors/world_facts.
    truth_ratio: mean max(0, 1 - R) on the utility splits, mean min(R, 1/R) on forget.
    """
    if kind not in EVAL_KINDS:
        raise ValueError(f"unknown split kind {kind!r}; choose one of {EVAL_KINDS}")
    missing = [f for f in SAMPLE_FIELDS if f not in scores]
    if missing:
        raise ValueError(f"split {kind!r}: missing per-sample fields {missing}")
    gt = _vector(scores["gt_nll"], f"{kind}.gt_nll")
    rouge = _vector(scores["rougeL_recall"], f"{kind}.rougeL_recall")
    ratios = truth_ratio(scores["base_nll"], scores["perturbed_nll"])
    if not gt.size == rouge.size == ratios.size:
        raise ValueError(f"split {kind!r}: per-sample fields differ in length "
                         f"(gt_nll {gt.size}, rougeL_recall {rouge.size}, truth ratios {ratios.size})")
    if gt.size == 0:
        raise ValueError(f"split {kind!r} has no samples")
    if kind in ("real_authors", "world_facts"):
        prob = normalized_prob(gt, scores["perturbed_nll"]).mean()
    else:
        prob = np.exp(-gt).mean()
    truth = forget_truth_ratio_score(ratios) if kind == "forget" else truth_ratio_score(ratios)
    return {"prob": float(prob), "rougeL_recall": float(rouge.mean()), "truth_ratio": float(truth.mean()),
            "n": int(gt.size)}


def model_utility(metrics: Mapping[str, Mapping[str, float]]) -> float:
    """Harmonic mean of the nine numbers {retain, real_authors, world_facts} x {prob, rougeL_recall, truth_ratio}."""
    return harmonic_mean([metrics[kind][name] for kind in UTILITY_KINDS
                          for name in ("prob", "rougeL_recall", "truth_ratio")])


def tofu_report(splits: Mapping[str, Mapping[str, Any]], retain_forget_truth_ratios: Any = None) -> dict[str, Any]:
    """The full TOFU report from per-split per-sample arrays (see the module docstring for the fields).

    Keys: ``forget_quality`` and ``ks_statistic`` (None without the retain model's truth ratios),
    ``model_utility``, and ``<kind>/prob``, ``<kind>/rougeL_recall``, ``<kind>/truth_ratio``, ``<kind>/n``
    for every split given. The forget split is optional (utility alone); the three utility splits are not.
    """
    unknown = set(splits) - set(EVAL_KINDS)
    if unknown:
        raise ValueError(f"unknown split kinds {sorted(unknown)}; expected {EVAL_KINDS}")
    missing = [kind for kind in UTILITY_KINDS if kind not in splits]
    if missing:
        raise ValueError(f"model utility needs the splits {list(UTILITY_KINDS)}; missing {missing}")
    metrics = {kind: split_metrics(kind, scores) for kind, scores in splits.items()}
    report: dict[str, Any] = {"forget_quality": None, "ks_statistic": None, "model_utility": model_utility(metrics)}
    if retain_forget_truth_ratios is not None:
        if "forget" not in splits:
            raise ValueError("forget quality needs this model's 'forget' split")
        ratios = truth_ratio(splits["forget"]["base_nll"], splits["forget"]["perturbed_nll"])
        report.update(forget_quality(ratios, retain_forget_truth_ratios))
    for kind in EVAL_KINDS:
        for name, value in metrics.get(kind, {}).items():
            report[f"{kind}/{name}"] = value
    return report


# ----------------------------------------------------------------------------------------------------
# Saved evaluations


def _plain(value: Any) -> Any:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def save_eval(path: str | os.PathLike, splits: Mapping[str, Mapping[str, Any]], forget_split: str | None,
              model: str = "", retain_forget_truth_ratios: Any = None,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write one model's evaluation (per-sample arrays + report) as JSON; returns what was written.

    ``extra``: more top-level entries (generations, truncation counts ...); they may not replace the
    layout's own keys."""
    body = {"format": EVAL_FORMAT, "forget_split": forget_split, "model": model, "rouge": ROUGE_METHOD,
            "splits": {}, "report": tofu_report(splits, retain_forget_truth_ratios)}
    clash = set(extra or {}) & set(body)
    if clash:
        raise ValueError(f"extra entries {sorted(clash)} would overwrite the evaluation layout")
    body.update({key: _plain(value) for key, value in (extra or {}).items()})
    for kind, scores in splits.items():
        entry = {name: _plain(scores[name]) for name in SAMPLE_FIELDS}
        entry["truth_ratio"] = truth_ratio(scores["base_nll"], scores["perturbed_nll"]).tolist()
        body["splits"][kind] = entry
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1, allow_nan=False))
    os.replace(tmp, path)
    return body


def load_eval(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        body = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read a TOFU evaluation: {err}") from None
    if not isinstance(body, dict) or body.get("format") != EVAL_FORMAT:
        raise ValueError(f"{path}: not a {EVAL_FORMAT} evaluation file (format={body.get('format') if isinstance(body, dict) else None!r})")
    return body


def reference_truth_ratios(path: str | os.PathLike, forget_split: str | None = None) -> np.ndarray:
    """The forget-split truth ratios of a saved evaluation (the retain model's, for Forget Quality).

    ``forget_split``: when given, must match the file's, so a forget05 run is never compared against the
    retain model's forget10 numbers.
    """
    body = load_eval(path)
    if forget_split is not None and body.get("forget_split") != forget_split:
        raise ValueError(f"{path}: evaluated on forget split {body.get('forget_split')!r}, not {forget_split!r}")
    forget = body.get("splits", {}).get("forget")
    if forget is None:
        raise ValueError(f"{path}: no 'forget' split in the evaluation")
    if "truth_ratio" in forget:
        ratios = _vector(forget["truth_ratio"], f"{path}: forget.truth_ratio")
    else:
        ratios = truth_ratio(forget["base_nll"], forget["perturbed_nll"])
    if ratios.size == 0 or not np.isfinite(ratios).all() or (ratios <= 0).any():
        raise ValueError(f"{path}: forget truth ratios must be finite and positive")
    return ratios


def report_scalars(report: Mapping[str, Any]) -> dict[str, float]:
    """The report's numeric entries (None and NaN dropped), ready for ``self.log_dict``."""
    return {k: float(v) for k, v in report.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
