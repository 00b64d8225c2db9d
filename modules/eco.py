"""ECO (Liu et al., 2024): unlearning at inference time with embedding-corrupted prompts. No weight of the
language model changes; what is learned is a prompt classifier and the corruption strength.

1. Pure functions first: the corruptions of selected token embeddings (``CORRUPTIONS``), token selection,
   the class weights of the classifier's loss, threshold choice and calibration, and the zeroth-order
   gradient estimates (central finite difference for a scalar, random directions for a vector) and the
   coarse search over log-spaced strengths that can pick the learner's starting point.
2. ``EmbeddingCorruptionHook``: a forward hook on a model's input embeddings that corrupts selected
   positions of selected rows during one armed forward call (the prefill), never the decode steps.
3. ``EcoLM``: the inference wrapper around any Hugging Face causal LM. A prompt classifier gates each
   prompt; flagged prompts are corrupted during prefill; unflagged prompts run exactly the bare model.
   Implements the TOFU evaluator's ``EvalLM`` protocol (``score_tokens``, ``generate_answers``) and plain
   ``generate``; its settings (gate, threshold, corruption, strength, the classifier itself) save to and
   load from one folder.
4. ``PromptClassifier`` (LightningModule): a sequence classifier (HF name/path or the tiny preset),
   class-weighted cross-entropy, threshold chosen on validation data (or calibrated to a target
   false-positive rate), FPR/FNR logged.
5. ``EcoCorruptionLearner`` (LightningModule): learns the strength with forward passes only; objective =
   |metric of the corrupted model on the forget set - target| (the retain model's value, or chance accuracy
   for multiple choice), or the KS distance between the corrupted model's forget truth ratios and the
   retain model's (``truth_ratio_ks``: the distribution TOFU's forget quality tests).

Random draws (the noise, ``rand_noise_rand_n``'s dimensions, ``shuffle``'s order) come from one generator
per prompt, seeded by the settings' seed and the prompt's token ids: a prompt is corrupted the same way
whatever batch it is in, so the learner's numbers are the evaluator's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from datamodules.common import padding_id
from modules import lm
from modules.base import HFModule, gather_objects

# ----------------------------------------------------------------------------------------------------
# Corruption functions: (embeds (B, T, D), select (B, T) bool, strength, dims, generator) -> new tensor.
# Positions outside ``select`` keep their exact values (torch.where, never arithmetic with a zero).


def _check_select(embeds: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    if embeds.dim() != 3:
        raise ValueError(f"embeddings must be (batch, tokens, dims), got shape {tuple(embeds.shape)}")
    if select.shape != embeds.shape[:2]:
        raise ValueError(f"selection mask {tuple(select.shape)} does not match embeddings {tuple(embeds.shape[:2])}")
    return select.to(device=embeds.device, dtype=torch.bool)


def _check_dims(dims: int, width: int) -> int:
    if not 1 <= dims <= width:
        raise ValueError(f"dims must be in 1..{width} (the embedding width), got {dims}")
    return int(dims)


Generators = torch.Generator | Sequence[torch.Generator] | None


def _row_generators(generator: Generators, rows: int) -> list[torch.Generator] | None:
    """The per-row generators, checked; None when ``generator`` is None or a single generator."""
    if generator is None or isinstance(generator, torch.Generator):
        return None
    generators = list(generator)
    if len(generators) != rows:
        raise ValueError(f"{len(generators)} per-row generators for a batch of {rows} rows")
    if any(g.device.type != "cpu" for g in generators):
        raise ValueError("per-row generators must be CPU generators (the noise is drawn on the CPU, then moved)")
    return generators


def _draw(tail: tuple[int, ...], select: torch.Tensor, generator: Generators, like: torch.Tensor,
          sample: Callable[..., torch.Tensor] = torch.randn) -> torch.Tensor:
    """(B, T, *tail) float32 random values. ``generator`` is None or one generator for the whole block, or
    one CPU generator per row: row b then draws from its own generator for its selected positions only, in
    position order (zeros elsewhere), so a row's values depend neither on its padding nor on the other rows
    of the batch, nor on the device."""
    rows, width = select.shape
    generators = _row_generators(generator, rows)
    if generators is None:
        return sample((rows, width, *tail), generator=generator, device=like.device, dtype=torch.float32)
    values = torch.zeros((rows, width, *tail), dtype=torch.float32)
    for row, row_generator in enumerate(generators):
        positions = torch.nonzero(select[row].cpu()).flatten()
        values[row, positions] = sample((positions.numel(), *tail), generator=row_generator, dtype=torch.float32)
    return values.to(like.device)


def _noise(tail: tuple[int, ...], select: torch.Tensor, strength, generator: Generators, like: torch.Tensor) -> torch.Tensor:
    scale = torch.as_tensor(strength, dtype=torch.float32, device=like.device)
    return _draw(tail, select, generator, like) * scale


def rand_noise_first_n(embeds: torch.Tensor, select: torch.Tensor, strength: float | Sequence[float] | torch.Tensor,
                       dims: int = 1, generator: Generators = None) -> torch.Tensor:
    """e_t[:n] += N(0, s^2) on selected tokens. ``strength`` is a scalar or one standard deviation per
    dimension (length ``dims``: the vector version the learner tunes). ``generator``: one for the whole
    tensor, or one per row (see ``_draw``)."""
    select = _check_select(embeds, select)
    n = _check_dims(dims, embeds.shape[-1])
    scale = torch.as_tensor(strength, dtype=torch.float32)
    if scale.dim() > 1 or (scale.dim() == 1 and scale.numel() != n):
        raise ValueError(f"strength must be a scalar or {n} values (one per corrupted dimension), got shape {tuple(scale.shape)}")
    head = embeds[..., :n]
    noisy = (head.float() + _noise((n,), select, scale, generator, embeds)).to(embeds.dtype)
    out = embeds.clone()
    out[..., :n] = torch.where(select.unsqueeze(-1), noisy, head)
    return out


def rand_noise_rand_n(embeds: torch.Tensor, select: torch.Tensor, strength: float, dims: int = 1,
                      generator: Generators = None) -> torch.Tensor:
    """N(0, s^2) added to ``dims`` dimensions drawn at random for each selected token."""
    select = _check_select(embeds, select)
    n = _check_dims(dims, embeds.shape[-1])
    if torch.as_tensor(strength).numel() != 1:
        raise ValueError("rand_noise_rand_n takes a scalar strength (its dimensions change from token to token)")
    width = embeds.shape[-1]
    generators = _row_generators(generator, embeds.shape[0])
    if generators is None:
        ranks, noise = _draw((width,), select, generator, embeds, torch.rand), _noise((width,), select, strength, generator, embeds)
    else:  # each row's generator: its ranks, then its noise
        drawn = [(_draw((width,), select[row:row + 1], [g], embeds, torch.rand),
                  _noise((width,), select[row:row + 1], strength, [g], embeds)) for row, g in enumerate(generators)]
        ranks, noise = torch.cat([r for r, _ in drawn]), torch.cat([z for _, z in drawn])
    chosen = torch.zeros_like(embeds, dtype=torch.bool).scatter_(-1, ranks.topk(n, dim=-1).indices, True)
    noisy = (embeds.float() + noise).to(embeds.dtype)
    return torch.where(chosen & select.unsqueeze(-1), noisy, embeds)


def _top_k_dims(embeds: torch.Tensor, k: int) -> torch.Tensor:
    index = embeds.abs().topk(k, dim=-1).indices
    return torch.zeros_like(embeds, dtype=torch.bool).scatter_(-1, index, True)


def zero_out_top_k(embeds: torch.Tensor, select: torch.Tensor, strength: Any = None, dims: int = 1,
                   generator: Generators = None) -> torch.Tensor:
    """The ``dims`` (k) entries of largest magnitude of each selected token set to 0 (strength unused)."""
    select = _check_select(embeds, select)
    chosen = _top_k_dims(embeds, _check_dims(dims, embeds.shape[-1])) & select.unsqueeze(-1)
    return torch.where(chosen, torch.zeros_like(embeds), embeds)


def flip_sign_top_k(embeds: torch.Tensor, select: torch.Tensor, strength: Any = None, dims: int = 1,
                    generator: Generators = None) -> torch.Tensor:
    """The ``dims`` (k) entries of largest magnitude of each selected token negated (strength unused)."""
    select = _check_select(embeds, select)
    chosen = _top_k_dims(embeds, _check_dims(dims, embeds.shape[-1])) & select.unsqueeze(-1)
    return torch.where(chosen, -embeds, embeds)


def _permute_selected(embeds: torch.Tensor, select: torch.Tensor, order: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """Row b's selected tokens reordered by ``order(b, count)``."""
    out = embeds.clone()
    for row in range(embeds.shape[0]):
        positions = torch.nonzero(select[row]).flatten()
        if positions.numel() > 1:
            out[row, positions] = embeds[row, positions[order(row, positions.numel()).to(positions.device)]]
    return out


def reverse_order(embeds: torch.Tensor, select: torch.Tensor, strength: Any = None, dims: int = 1,
                  generator: Generators = None) -> torch.Tensor:
    """The selected tokens of each row in reverse order (an ablation: no noise, the same tokens)."""
    select = _check_select(embeds, select)
    return _permute_selected(embeds, select, lambda row, n: torch.arange(n - 1, -1, -1))


def shuffle(embeds: torch.Tensor, select: torch.Tensor, strength: Any = None, dims: int = 1,
            generator: Generators = None) -> torch.Tensor:
    """The selected tokens of each row in a random order (an ablation); with per-row generators each row
    is permuted by its own."""
    select = _check_select(embeds, select)
    generators = _row_generators(generator, embeds.shape[0])
    if generators is None:
        shared = generator if generator is None or generator.device.type == "cpu" else None
        generators = [shared] * embeds.shape[0]
    return _permute_selected(embeds, select, lambda row, n: torch.randperm(n, generator=generators[row]))


CORRUPTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "rand_noise_first_n": rand_noise_first_n, "rand_noise_rand_n": rand_noise_rand_n,
    "zero_out_top_k": zero_out_top_k, "flip_sign_top_k": flip_sign_top_k,
    "reverse_order": reverse_order, "shuffle": shuffle,
}
STRENGTH_CORRUPTIONS = ("rand_noise_first_n", "rand_noise_rand_n")  # the ones a strength means something for
TOKEN_SELECTIONS = ("all_but_last", "entities")


def corruption_function(name: str) -> Callable[..., torch.Tensor]:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {list(CORRUPTIONS)}")
    return CORRUPTIONS[name]


def prompt_seed(seed: int, prompt_ids: Sequence[int]) -> int:
    """A 63-bit seed from ``seed`` and a prompt's token ids (BLAKE2b: stable across processes and machines,
    unlike Python's ``hash``), so a prompt's corruption is a function of the prompt alone."""
    digest = hashlib.blake2b(np.asarray([seed, *prompt_ids], dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def prompt_generators(seed: int, prompt_ids: Sequence[Sequence[int]]) -> list[torch.Generator]:
    """One CPU generator per prompt, seeded by ``prompt_seed``."""
    return [torch.Generator().manual_seed(prompt_seed(seed, ids)) for ids in prompt_ids]


# ----------------------------------------------------------------------------------------------------
# Token selection


def all_but_last(prompt_mask: torch.Tensor) -> torch.Tensor:
    """Every prompt token except the last one of each row (works for left- and right-padded rows)."""
    prompt_mask = prompt_mask.bool()
    positions = torch.arange(prompt_mask.shape[1], device=prompt_mask.device).expand_as(prompt_mask)
    last = torch.where(prompt_mask, positions, torch.full_like(positions, -1)).max(dim=1).values
    return prompt_mask & (positions != last.unsqueeze(1))


def prompt_mask_right_padded(width: int, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """(B, width) mask of the first ``prompt_lengths[b]`` positions (teacher-forced prompt + answer rows)."""
    return torch.arange(width).unsqueeze(0) < prompt_lengths.cpu().unsqueeze(1)


def entity_char_spans(text: str, names: Sequence[str]) -> list[list[int]]:
    """[start, end) of every occurrence of every name in ``text`` (stands in for the paper's NER tagger)."""
    spans = []
    for name in names:
        start = text.find(name)
        while name and start >= 0:
            spans.append([start, start + len(name)])
            start = text.find(name, start + 1)
    return spans


# ----------------------------------------------------------------------------------------------------
# Classifier loss and thresholds


def class_weights(counts: Sequence[int]) -> torch.Tensor:
    """w_c = N / N_c (the paper's weighting): a class seen half as often weighs twice as much."""
    counts_t = torch.as_tensor(list(counts), dtype=torch.float64)
    if (counts_t <= 0).any():
        raise ValueError(f"every class needs at least one training example, got counts {list(counts)}")
    return (counts_t.sum() / counts_t).float()


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_{y_i} CE_i / sum_i w_{y_i} (torch's weighted mean)."""
    return F.cross_entropy(logits.float(), labels, weight=weights.to(logits.device).float())


def error_rates(scores: Any, labels: Any, threshold: float) -> dict[str, float]:
    """Flag when score > threshold. FPR over negatives (label 0), FNR over positives (label 1); NaN when a
    class is absent."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    flagged = s > threshold
    fpr = float(flagged[~y].mean()) if (~y).any() else float("nan")
    fnr = float((~flagged[y]).mean()) if y.any() else float("nan")
    return {"fpr": fpr, "fnr": fnr, "n_negative": int((~y).sum()), "n_positive": int(y.sum())}


def calibrate_threshold(negative_scores: Any, target_fpr: float) -> float:
    """The lowest threshold whose false-positive rate on ``negative_scores`` is at most ``target_fpr``
    (flag when score > threshold): the (m+1)-th largest negative score, m = floor(target_fpr * N)."""
    s = np.sort(np.asarray(negative_scores, dtype=np.float64))[::-1]
    if s.size == 0:
        raise ValueError("threshold calibration needs at least one negative (non-forget) validation prompt")
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    allowed = int(math.floor(target_fpr * s.size + 1e-12))
    return float(s[allowed])


def best_threshold(scores: Any, labels: Any) -> float:
    """The threshold minimising FPR + FNR over the midpoints between sorted distinct scores (ties: lowest
    FPR, then the higher threshold)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if not y.any() or y.all():
        raise ValueError("choosing a threshold needs validation prompts of both classes")
    distinct = np.unique(s)
    candidates = np.concatenate([[distinct[0] - 1e-6], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1]]])
    best, best_key = float(candidates[0]), None
    for tau in candidates:
        rates = error_rates(s, y, tau)
        key = (rates["fpr"] + rates["fnr"], rates["fpr"], -tau)
        if best_key is None or key < best_key:
            best, best_key = float(tau), key
    return best


# ----------------------------------------------------------------------------------------------------
# Zeroth-order gradient estimates


def central_difference(objective: Callable[[float], float], strength: float, epsilon: float,
                       min_strength: float = 0.0) -> tuple[float, float, float]:
    """(gradient, J(s+eps), J(s-)) with s- = max(s - eps, s_min) and gradient [J(s+eps) - J(s-)] / (2 eps).

    The divisor stays 2 eps at the boundary too, as in the paper and its released script (and as
    ``random_direction_gradient`` does): where s - eps falls below s_min the estimate is smaller in magnitude
    than the slope of the chord actually probed, so steps near the smallest strength are damped."""
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    upper, lower = strength + epsilon, max(strength - epsilon, min_strength)
    j_upper, j_lower = float(objective(upper)), float(objective(lower))
    return (j_upper - j_lower) / (2 * epsilon), j_upper, j_lower


def random_directions(dims: int, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` orthonormal random unit vectors in R^dims (rows), count <= dims."""
    if not 1 <= count <= dims:
        raise ValueError(f"directions must be in 1..{dims}, got {count}")
    q, r = torch.linalg.qr(torch.randn(dims, count, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).T.contiguous()


def random_direction_gradient(objective: Callable[[torch.Tensor], float], strength: torch.Tensor, epsilon: float,
                              directions: int = 1, min_strength: float = 0.0,
                              generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """g = (d / k) sum_u [J(s + eps u) - J(max(s - eps u, s_min))] / (2 eps) u over k orthonormal random
    directions u: exact for a quadratic when k = d (and unbiased for smooth J when k < d). Returns the
    estimate and the mean J over the probed points."""
    s = torch.as_tensor(strength, dtype=torch.float64).flatten()
    units = random_directions(s.numel(), directions, generator)
    g, probed = torch.zeros_like(s), []
    for u in units:
        j_plus = float(objective((s + epsilon * u).clamp(min=min_strength)))
        j_minus = float(objective((s - epsilon * u).clamp(min=min_strength)))
        g += (j_plus - j_minus) / (2 * epsilon) * u
        probed += [j_plus, j_minus]
    return g * (s.numel() / directions), float(np.mean(probed))


def coarse_search(objective: Callable[[float], float], strengths: Sequence[float]) -> tuple[float, list[float]]:
    """J at every strength, in the order given; returns (the strength with the lowest J, the J values).
    Ties keep the earlier strength. Meant for objectives that are flat over wide ranges of s (a KS
    statistic over a few dozen values moves in steps), where a finite difference reads a zero gradient and
    a descent started in the wrong place never moves: the search picks the start, descent refines it."""
    if len(strengths) == 0:
        raise ValueError("coarse_search needs at least one strength")
    values = [float(objective(float(s))) for s in strengths]
    best = min(range(len(values)), key=lambda i: (values[i], i))
    return float(strengths[best]), values


# ----------------------------------------------------------------------------------------------------
# The hook


class EmbeddingCorruptionHook:
    """A forward hook on an input-embedding module. Inert until ``arm`` is called; an armed hook corrupts the
    next forward call whose sequence length equals the armed width (the prefill, or a teacher-forced
    forward) at the selected (row, position) pairs, then disarms, so decode steps (one new token each) are
    never touched. ``corrupted_calls``/``seen_calls`` count what it did (tests read them)."""

    def __init__(self, embedding: torch.nn.Module):
        self.handle = embedding.register_forward_hook(self._hook)
        self.armed: dict[str, Any] | None = None
        self.corrupted_calls = 0
        self.seen_calls = 0

    def arm(self, select: torch.Tensor, corrupt: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.armed = {"select": select.bool(), "corrupt": corrupt}

    def disarm(self) -> None:
        self.armed = None

    def remove(self) -> None:
        self.handle.remove()

    def _hook(self, module, inputs, output):
        self.seen_calls += 1
        armed = self.armed
        if armed is None or output.shape[:2] != armed["select"].shape:
            return None
        self.armed = None
        self.corrupted_calls += 1
        return armed["corrupt"](output, armed["select"].to(output.device))


# ----------------------------------------------------------------------------------------------------
# Settings, the gate and the inference wrapper

SETTINGS_FILE = "eco.json"
CLASSIFIER_DIR = "classifier"
GATES = ("classifier", "all", "none")


@dataclass
class EcoSettings:
    """What an ECO deployment needs besides the language model. ``gate``: ``classifier`` (flag when
    p(forget) > threshold), ``all`` (corrupt every prompt: the learner's setting) or ``none``."""

    corruption: str = "rand_noise_first_n"
    strength: float | list[float] = 1.0
    dims: int = 1
    token_selection: str = "all_but_last"
    entity_names: list[str] = field(default_factory=list)
    gate: str = "classifier"
    threshold: float = 0.5
    seed: int = 0  # with a prompt's token ids, seeds that prompt's random draws (prompt_seed)
    classifier_source: str = ""  # where the classifier came from (informational)

    def __post_init__(self):
        corruption_function(self.corruption)
        if self.token_selection not in TOKEN_SELECTIONS:
            raise ValueError(f"token_selection must be one of {TOKEN_SELECTIONS}, got {self.token_selection!r}")
        if self.token_selection == "entities" and not self.entity_names:
            raise ValueError("token_selection 'entities' needs entity_names")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if isinstance(self.strength, (list, tuple)) and self.corruption != "rand_noise_first_n":
            raise ValueError("a vector strength needs corruption 'rand_noise_first_n'")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "settings") -> EcoSettings:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{source}: unknown ECO settings {sorted(unknown)}")
        return cls(**values)


class PromptGate:
    """A sequence classifier (2 labels, label 1 = forget) with its tokenizer: p(forget | text)."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int = 256, batch_size: int = 64):
        # the classifier reads the last token that is not config.pad_token_id: the batches must pad with it
        configured = getattr(getattr(model, "config", None), "pad_token_id", None)
        if tokenizer.pad_token_id is None or (configured is not None and configured != tokenizer.pad_token_id):
            raise ValueError(f"the classifier's tokenizer pads with {tokenizer.pad_token_id!r}, its model reads "
                             f"pad_token_id {configured!r}: a sequence classifier needs one pad token in both (a "
                             f"classifier exported by PromptClassifier has it)")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length, self.batch_size = max_length, batch_size

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> PromptGate:
        tokenizer = lm.load_tokenizer(str(path))
        model = lm.load_model(str(path), kind="sequence_classification", num_labels=2, tokenizer=tokenizer)
        return cls(model, tokenizer, **kwargs)

    @torch.no_grad()
    def probabilities(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start:start + self.batch_size])
            # with special tokens, as EcoPromptData encodes the classifier's training prompts
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            logits = self.model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)).logits
            out.append(torch.softmax(logits.float(), -1)[:, 1].cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def save(self, path: str | os.PathLike) -> None:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


class EcoLM:
    """ECO around a Hugging Face causal LM (see the module docstring). Batches follow the TOFU evaluator's
    layout: scoring batches carry right-padded ``input_ids``/``attention_mask``/``labels`` with
    ``prompt_lengths`` and ``questions``; generation batches left-padded ``prompt_input_ids``/
    ``prompt_attention_mask`` and ``questions``. ``last_flags`` holds the gate's decisions of the last call."""

    GATE_CACHE_SIZE = 4096  # prompts whose classifier probability is kept (evaluators score each prompt many times)

    def __init__(self, model: torch.nn.Module, tokenizer, settings: EcoSettings, gate: PromptGate | None = None):
        if settings.gate == "classifier" and gate is None:
            raise ValueError("gate 'classifier' needs a PromptGate (or use gate 'all' / 'none')")
        self.model, self.tokenizer, self.settings, self.gate = model, tokenizer, settings, gate
        self.hook = EmbeddingCorruptionHook(model.get_input_embeddings())
        self.corrupt_fn = corruption_function(settings.corruption)
        self.last_flags: torch.Tensor | None = None
        self.last_probabilities: torch.Tensor | None = None
        # recent prompts' classifier probabilities, least recently used first (bounded: a server sees endless prompts)
        self._gate_cache: OrderedDict[str, float] = OrderedDict()

    def close(self) -> None:
        """Remove the hook: the model is the bare model again."""
        self.hook.remove()

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- gate and selection ----------------------------------------------------------------------------
    def flags(self, questions: Sequence[str]) -> torch.Tensor:
        if self.settings.gate == "all":
            flags, probs = torch.ones(len(questions), dtype=torch.bool), None
        elif self.settings.gate == "none":
            flags, probs = torch.zeros(len(questions), dtype=torch.bool), None
        else:
            # the TOFU and multiple-choice evaluators score several answers per prompt: classify each once
            missing = list(dict.fromkeys(q for q in questions if q not in self._gate_cache))
            known = {q: self._gate_cache[q] for q in questions if q in self._gate_cache}
            if missing:
                known.update(zip(missing, self.gate.probabilities(missing).tolist()))
            for question, probability in known.items():
                self._gate_cache[question] = probability
                self._gate_cache.move_to_end(question)
            while len(self._gate_cache) > self.GATE_CACHE_SIZE:
                self._gate_cache.popitem(last=False)
            probs = torch.tensor([known[q] for q in questions])
            flags = probs > self.settings.threshold
        self.last_flags, self.last_probabilities = flags, probs
        return flags

    def _entity_mask(self, prompt_ids: Sequence[int], question: str) -> torch.Tensor:
        from datamodules.text import with_default_prefix
        from datamodules.tofu import render_prompt
        from datamodules.tofu_data import spans_to_token_mask

        use_template = bool(getattr(self.tokenizer, "chat_template", None))
        candidates = [render_prompt(self.tokenizer, question, use_template), render_prompt(self.tokenizer, question, False)]
        for text in candidates:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            # encode_qa puts the tokenizer's BOS in front where the rendered text has none: it is no entity
            prefix = len(prompt_ids) - len(enc["input_ids"])
            if list(with_default_prefix(self.tokenizer, list(enc["input_ids"]))) == list(prompt_ids):
                shift = text.find(question)
                spans = [[s + shift, e + shift] for s, e in entity_char_spans(question, self.settings.entity_names)]
                return torch.tensor([False] * prefix + spans_to_token_mask(enc["offset_mapping"], spans),
                                    dtype=torch.bool)
        raise ValueError("entity token selection: the prompt tokens do not match the rendered question "
                         f"{question[:60]!r}; batches must come from the TOFU/multiple-choice encoders")

    def selection(self, prompt_mask: torch.Tensor, prompt_ids: list[list[int]], questions: Sequence[str],
                  flags: torch.Tensor) -> torch.Tensor:
        """(B, T) positions to corrupt: selected prompt tokens of flagged rows only."""
        if self.settings.token_selection == "all_but_last":
            select = all_but_last(prompt_mask)
        else:
            select = torch.zeros_like(prompt_mask, dtype=torch.bool)
            for row in torch.nonzero(flags).flatten().tolist():
                positions = torch.nonzero(prompt_mask[row]).flatten()
                select[row, positions] = self._entity_mask(prompt_ids[row], questions[row])
        return select & flags.unsqueeze(1).to(select.device)

    def corruption(self, prompt_ids: Sequence[Sequence[int]], strength=None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The corruption of one batch: row b's random draws come from a generator seeded by the settings'
        seed and ``prompt_ids[b]``, so a prompt is corrupted the same way alone or in any batch, padded
        left (generation) or right (scoring), and every answer scored after it sees the same prompt."""
        settings = self.settings
        value = settings.strength if strength is None else strength
        if isinstance(value, (list, tuple)):
            value = torch.tensor(value, dtype=torch.float32)

        def corrupt(embeds: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
            return self.corrupt_fn(embeds, select, value, settings.dims, prompt_generators(settings.seed, prompt_ids))

        return corrupt

    def _arm(self, select: torch.Tensor, prompt_ids: Sequence[Sequence[int]], strength=None) -> bool:
        if not bool(select.any()):
            return False
        self.hook.arm(select, self.corruption(prompt_ids, strength))
        return True

    # -- forward passes --------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor,
               questions: Sequence[str], flags: torch.Tensor | None = None, strength=None) -> torch.Tensor:
        """Teacher-forced logits; prompt positions [0, prompt_lengths) of flagged rows are corrupted."""
        flags = self.flags(questions) if flags is None else flags.bool()
        prompt_mask = prompt_mask_right_padded(input_ids.shape[1], prompt_lengths)
        prompt_ids = [input_ids[b, :int(n)].tolist() for b, n in enumerate(prompt_lengths)]
        self._arm(self.selection(prompt_mask, prompt_ids, questions, flags), prompt_ids, strength)
        device = self._device()
        try:
            return self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        finally:
            self.hook.disarm()

    def score_tokens(self, batch: Mapping[str, Any], flags: torch.Tensor | None = None, strength=None) -> torch.Tensor:
        logits = self.logits(batch["input_ids"], batch["attention_mask"], batch["prompt_lengths"], batch["questions"],
                             flags, strength)
        return lm.token_logprobs(logits, batch["labels"].to(logits.device)).float().cpu()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, questions: Sequence[str],
                 flags: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """``model.generate`` on left-padded prompts; flagged prompts are corrupted in the prefill only (the
        KV cache is required, so decode steps embed one new token each and pass through untouched)."""
        if generate_kwargs.get("use_cache") is False:
            raise ValueError("ECO corrupts the prefill only and needs the KV cache (use_cache=True)")
        flags = self.flags(questions) if flags is None else flags.bool()
        prompt_mask = attention_mask.bool().cpu()
        prompt_ids = [input_ids[b][prompt_mask[b]].tolist() for b in range(input_ids.shape[0])]
        self._arm(self.selection(prompt_mask, prompt_ids, questions, flags), prompt_ids)
        device = self._device()
        try:
            return self.model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                       use_cache=True, **generate_kwargs)
        finally:
            self.hook.disarm()

    def generate_answers(self, batch: Mapping[str, Any], max_new_tokens: int, flags: torch.Tensor | None = None) -> list[str]:
        prompt = batch["prompt_input_ids"]
        output = self.generate(prompt, batch["prompt_attention_mask"], batch["questions"], flags, do_sample=False,
                               max_new_tokens=max_new_tokens, pad_token_id=padding_id(self.tokenizer),
                               eos_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.batch_decode(output[:, prompt.shape[1]:], skip_special_tokens=True)

    # -- persistence -----------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """``folder/eco.json`` (the settings) and ``folder/classifier/`` (the gate's model and tokenizer)."""
        return save_settings(folder, self.settings, self.gate)

    @classmethod
    def load(cls, folder: str | os.PathLike, model: torch.nn.Module, tokenizer) -> EcoLM:
        settings, gate = load_settings(folder)
        return cls(model, tokenizer, settings, gate)


def save_settings(folder: str | os.PathLike, settings: EcoSettings, gate: PromptGate | None = None) -> Path:
    """Write the settings (and the gate's classifier) to ``folder``; written to a sibling and renamed, so a
    killed save never leaves a half-written folder."""
    body = {"format": "eco-settings/v1", **asdict(settings)}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        if gate is not None:
            gate.save(tmp / CLASSIFIER_DIR)
        (tmp / SETTINGS_FILE).write_text(json.dumps(body, indent=1))

    return lm.replace_folder_atomically(write, folder, marker=SETTINGS_FILE)


def load_settings(folder: str | os.PathLike) -> tuple[EcoSettings, PromptGate | None]:
    folder = Path(folder)
    path = folder / SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {SETTINGS_FILE}; not an ECO settings folder")
    body = json.loads(path.read_text())
    if body.pop("format", None) != "eco-settings/v1":
        raise ValueError(f"{path}: not an 'eco-settings/v1' file")
    settings = EcoSettings.from_dict(body, str(path))
    gate = PromptGate.load(folder / CLASSIFIER_DIR) if (folder / CLASSIFIER_DIR / "config.json").exists() else None
    return settings, gate


# ----------------------------------------------------------------------------------------------------
# The prompt classifier

CLASSIFIER_FILE = "eco_classifier.json"


class PromptClassifier(HFModule):
    """p(forget | prompt) with a HF sequence classifier (2 labels). Batches: ``input_ids``,
    ``attention_mask``, ``labels`` (1 = forget prompt) and optional ``kind`` names; the data module exposes
    ``class_counts`` (training examples per class) for the weights N / N_c."""

    model_kind = "sequence_classification"

    def __init__(self, target_fpr: float | None = None, threshold: float | None = None,
                 class_weighting: bool = True, **kwargs):
        """``threshold``: fixed; else chosen on validation data after every validation (minimum FPR + FNR),
        or calibrated to ``target_fpr`` on the validation negatives. Other arguments: ``HFModule``."""
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if target_fpr is not None and not 0.0 <= target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
        self.target_fpr, self.fixed_threshold, self.class_weighting = target_fpr, threshold, class_weighting
        self.register_buffer("threshold", torch.tensor(0.5 if threshold is None else float(threshold)))
        self.register_buffer("weights", torch.ones(2))
        self._collected: dict[str, list] = {}

    def prepare_tokenizer(self, tokenizer) -> None:
        # the classifier reads the last non-pad token: pad must exist (Llama-2/3 have none) and differ from EOS
        lm.ensure_distinct_pad_token(tokenizer)

    def extra_model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": 2}

    def setup(self, stage: str) -> None:
        counts = getattr(self.trainer.datamodule, "class_counts", None) if self.trainer is not None else None
        if stage == "fit" and self.class_weighting and counts is not None:
            self.weights.copy_(class_weights(counts))
            rank_zero_info(f"[PromptClassifier] class counts {list(counts)} -> weights {self.weights.tolist()}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = weighted_cross_entropy(logits, batch["labels"], self.weights)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    # per prompt: the classifier's p(forget), the label, the prompt's kind, its row id, its cross-entropy
    _COLUMNS = ("score", "label", "kind", "row_id", "loss")

    def _collect(self, batch: dict[str, Any], stage: str) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"]).float()
        row_id = batch.get("row_id")
        self._collected.setdefault(stage, []).append({
            "score": torch.softmax(logits, -1)[:, 1].cpu().numpy(), "label": batch["labels"].cpu().numpy(),
            "kind": np.array(list(batch.get("kind", [None] * len(logits))), dtype=object),
            "row_id": row_id.cpu().numpy() if row_id is not None else None,
            "loss": F.cross_entropy(logits, batch["labels"], reduction="none").cpu().numpy()})

    def _gather(self, stage: str) -> dict[str, np.ndarray]:
        """``_COLUMNS`` of every prompt of all ranks, each prompt once."""
        parts = self._collected.pop(stage, [])
        # every rank holds a share of the prompts: the threshold, the rates and the loss need all of them
        parts = [part for share in gather_objects(self.trainer, parts) for part in share]
        numbered = bool(parts) and all(part["row_id"] is not None for part in parts)
        columns = {name: np.concatenate([part[name] for part in parts]) if parts else np.zeros(0)
                   for name in self._COLUMNS if name != "row_id" or numbered}
        if numbered:  # the distributed sampler repeats prompts to even out the ranks: keep each once
            _, first = np.unique(columns.pop("row_id"), return_index=True)
            columns = {name: values[first] for name, values in columns.items()}
        return columns

    def _log_loss(self, stage: str, labels: np.ndarray, losses: np.ndarray) -> None:
        """The class-weighted cross-entropy over every prompt once (as ``weighted_cross_entropy``); equal on every
        rank, so sync_dist only keeps Lightning's epoch-end check quiet."""
        weights = self.weights.cpu().numpy()[labels.astype(int)]
        self.log(f"{stage}/loss", float((weights * losses).sum() / weights.sum()), sync_dist=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch, "val")

    def on_validation_epoch_end(self) -> None:
        columns = self._gather("val")
        scores, labels = columns["score"], columns["label"]
        if scores.size == 0 or self.trainer.sanity_checking:
            return
        self._log_loss("val", labels, columns["loss"])
        if self.fixed_threshold is None:
            if self.target_fpr is not None:
                self.threshold.fill_(calibrate_threshold(scores[labels == 0], self.target_fpr))
            else:
                self.threshold.fill_(best_threshold(scores, labels))
        rates = error_rates(scores, labels, float(self.threshold))
        self.log_dict({"val/fpr": rates["fpr"], "val/fnr": rates["fnr"], "val/threshold": float(self.threshold),
                       "val/error": rates["fpr"] + rates["fnr"]})

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._collect(batch, "test")

    def on_test_epoch_end(self) -> None:
        columns = self._gather("test")
        scores, labels, kinds = columns["score"], columns["label"], columns["kind"]
        if scores.size == 0:
            return
        self._log_loss("test", labels, columns["loss"])
        tau = float(self.threshold)
        rates = error_rates(scores, labels, tau)
        self.log_dict({"test/fpr": rates["fpr"], "test/fnr": rates["fnr"], "test/threshold": tau})
        for kind in sorted({kind for kind in kinds if kind is not None}):
            chosen = np.array([k == kind for k in kinds])
            flagged = float((scores[chosen] > tau).mean())
            self.log(f"test/{kind}/flag_rate", flagged)

    def write_export(self, folder: Path) -> None:
        super().write_export(folder)
        (Path(folder) / CLASSIFIER_FILE).write_text(json.dumps(
            {"threshold": float(self.threshold), "target_fpr": self.target_fpr, "source": str(self.model_name_or_path)}))


def classifier_threshold(path: str | os.PathLike) -> float:
    """The threshold an exported ``PromptClassifier`` chose on its validation data."""
    file = Path(path) / CLASSIFIER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {CLASSIFIER_FILE}; export the classifier with cli.py export")
    return float(json.loads(file.read_text())["threshold"])


# ----------------------------------------------------------------------------------------------------
# The corruption learner

METRICS = ("answer_prob", "truth_ratio", "truth_ratio_ks", "mc_accuracy")
DEFAULT_SCORE_BATCH = 64  # sequences per forward pass of the learner when neither it nor its data module says


def reached_stop(metric: float, objective: float, tolerance: float, stop_below: float | None) -> bool:
    """The corruption learner's stopping rule: J within ``tolerance`` of the target, or (one-sided, as the
    released WMDP script stops once accuracy < 0.27) the metric below ``stop_below``."""
    return objective <= tolerance or (stop_below is not None and metric < stop_below)


def ks_statistic(sample: Any, reference: Any) -> float:
    """Two-sample Kolmogorov-Smirnov statistic D = sup_x |F_sample(x) - F_reference(x)| over the two empirical
    CDFs (the distance whose p-value is TOFU's forget quality; for fixed sample sizes the p-value falls as D
    grows). The supremum is reached at a data point, where both CDFs are read with ``side="right"``."""
    a = np.sort(np.asarray(sample, dtype=np.float64).ravel())
    b = np.sort(np.asarray(reference, dtype=np.float64).ravel())
    if a.size == 0 or b.size == 0:
        raise ValueError("the KS statistic needs at least one value in each sample")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("the KS statistic needs finite values")
    points = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, points, side="right") / a.size
    cdf_b = np.searchsorted(b, points, side="right") / b.size
    return float(np.abs(cdf_a - cdf_b).max())


def forget_truth_ratios(batch: Mapping[str, Any], logp: torch.Tensor) -> np.ndarray:
    """Per forget question, TOFU's truth ratio R (paraphrased answer = role 1 against the perturbed answers =
    role 2) from the token log-probs of an ``EcoForgetData`` batch's ``qa`` part."""
    from modules import tofu_eval as te

    part = batch["qa"]
    nll = te.mean_answer_nll(logp.float().cpu(), part["labels"][:, 1:].cpu() != -100).double().numpy()
    roles, rows = part["roles"].cpu().numpy(), part["rows"].cpu().numpy()
    n = int(rows.max()) + 1
    base = np.zeros(n)
    perturbed: list[list[float]] = [[] for _ in range(n)]
    for value, role, row in zip(nll, roles, rows):
        if role == 1:
            base[row] = value
        elif role == 2:
            perturbed[row].append(float(value))
    return te.truth_ratio(base, perturbed)


def forget_metric(metric: str, batch: Mapping[str, Any], logp: torch.Tensor,
                  reference_ratios: np.ndarray | None = None) -> float:
    """The forget-set metric from the token log-probs of a ``datamodules.eco_data.EcoForgetData`` batch
    (``batch["qa"]`` for the answer metrics, ``batch["mc"]`` for multiple choice).

    ``answer_prob``: mean exp(-mean token NLL) of the answers; ``truth_ratio``: mean min(R, 1/R) (TOFU's
    forget number); ``truth_ratio_ks``: the KS statistic between the truth ratios R and
    ``reference_ratios`` (the retain model's); ``mc_accuracy``: fraction of items whose right letter has
    the highest log-prob."""
    from callbacks.eco_eval import choose_options, option_scores
    from modules import tofu_eval as te

    if metric == "mc_accuracy":
        part = {key: value.cpu() if torch.is_tensor(value) else value for key, value in batch["mc"].items()}
        answer = part["answer_index"].numpy()
        choice = choose_options(option_scores(logp.float().cpu(), part["labels"], "letter"), part["rows"].tolist(),
                                part["options"].tolist(), len(answer))
        return float((choice == answer).mean())
    if metric == "answer_prob":
        part = batch["qa"]
        nll = te.mean_answer_nll(logp.float().cpu(), part["labels"][:, 1:].cpu() != -100).double().numpy()
        return float(np.exp(-nll[part["roles"].cpu().numpy() == 0]).mean())
    if metric == "truth_ratio":
        return float(te.forget_truth_ratio_score(forget_truth_ratios(batch, logp)).mean())
    if metric == "truth_ratio_ks":
        if reference_ratios is None:
            raise ValueError("metric 'truth_ratio_ks' needs the retain model's forget truth ratios")
        return ks_statistic(forget_truth_ratios(batch, logp), reference_ratios)
    raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")


def target_from_retain_eval(path: str | os.PathLike, metric: str) -> float:
    """The retain model's value of ``metric`` on the forget split, from its saved TOFU evaluation."""
    from modules.tofu_eval import load_eval

    report = load_eval(path)["report"]
    key = {"answer_prob": "forget/prob", "truth_ratio": "forget/truth_ratio"}.get(metric)
    if key is None:
        raise ValueError(f"metric {metric!r} has no retain-model target in a TOFU evaluation; give target")
    return float(report[key])


def score_in_batches(eco_lm: EcoLM, part: Mapping[str, Any], flags: torch.Tensor, strength, batch_size: int) -> torch.Tensor:
    """``eco_lm.score_tokens`` of a right-padded scoring batch (the TOFU evaluator's layout) in forward passes of
    at most ``batch_size`` rows: rows of similar length together, longest first (an out-of-memory error shows
    at the first pass), each pass cut to its longest row. The (B, T-1) token log-probs come back in ``part``'s
    row order and width. A row's numbers do not depend on the rows beside it (right padding under a causal
    mask, noise drawn per prompt), so they are the one-pass numbers up to float rounding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rows, width = part["input_ids"].shape
    lengths = part["attention_mask"].sum(-1).cpu()
    order = torch.argsort(lengths, descending=True, stable=True)
    out = torch.zeros(rows, width - 1)
    for start in range(0, rows, batch_size):
        index = order[start:start + batch_size]
        cut = int(lengths[index].max())
        chunk = {"input_ids": part["input_ids"][index, :cut], "attention_mask": part["attention_mask"][index, :cut],
                 "labels": part["labels"][index, :cut], "prompt_lengths": part["prompt_lengths"][index],
                 "questions": [part["questions"][i] for i in index.tolist()]}
        out[index, :cut - 1] = eco_lm.score_tokens(chunk, flags=flags[index], strength=strength)
    return out


class EcoCorruptionLearner(pl.LightningModule):
    """Zeroth-order learning of the corruption strength (no gradients, no weight of the LM changes).

    Each training step evaluates J(s) = |metric(corrupted LM on the forget set) - target| at s and at
    s +- epsilon (scalar) or along ``directions`` random unit directions (``vector: true``, one strength per
    corrupted dimension), puts the estimate in ``strength.grad`` and takes one SGD step (lr = ``lr``),
    s <- max(s_min, s - lr * g): a real optimizer step, so ``trainer.max_steps`` counts learner steps.
    With ``init_scan`` (a list of strengths), the first step first evaluates J at each of them and starts
    the descent from the best (``coarse_search``); the scan takes no optimizer step, so ``max_steps`` still
    counts the refinement steps. Every forget prompt is corrupted (the gate is the classifier's job). Logs
    ``train/strength``, ``train/objective``, ``train/metric``, ``train/forward_passes`` (objective
    evaluations so far, scan included) and, per scanned strength, ``scan/strength``, ``scan/objective``,
    ``scan/metric`` (x-axis: the scan index), then ``scan/forward_passes`` and ``scan/best_strength``; at the
    end of fit writes the best strength evaluated (lowest J, scan and finite-difference probes included)
    into ``settings_dir`` as ECO settings without a gate."""

    def __init__(self, model: str = "tiny", corruption: str = "rand_noise_first_n", dims: int = 1,
                 strength: float = 0.1, epsilon: float | None = None, lr: float = 100.0,
                 min_strength: float = 1e-4, vector: bool = False, directions: int = 1,
                 metric: str = "truth_ratio_ks", target: float | None = None, retain_eval: str | None = None,
                 token_selection: str = "all_but_last", entity_names: list[str] | None = None,
                 tolerance: float = 0.0, stop_below: float | None = None, seed: int = 0,
                 settings_dir: str | None = None, dtype: str | None = None, init_scan: list[float] | None = None,
                 batch_size: int | None = None):
        """``metric``: ``truth_ratio_ks`` (the default, as in ``configs/eco/learn.yaml``), ``truth_ratio``,
        ``answer_prob`` or ``mc_accuracy`` (``forget_metric``). ``epsilon``: finite-difference step (default
        0.999 * strength, the released WMDP script's choice). ``target``: the metric's target; default chance
        for ``mc_accuracy`` (1 / options) and the retain model's value from ``retain_eval`` otherwise; ``truth_ratio_ks`` has target 0 (J is the KS
        distance to the retain model's forget truth ratios, read from ``retain_eval``). ``tolerance``: stop
        once J <= tolerance. ``stop_below``: also stop once the metric falls below this value, the released
        WMDP script's one-sided rule (``mc_accuracy``, 4 options: 0.27); the settings written are still those of
        the lowest J evaluated. ``init_scan``: strengths (e.g. log-spaced, [0.1, 1, ..., 10000]) to evaluate
        before the first step; the descent starts from the best of them instead of ``strength``. With
        ``vector: true`` each value is a common scale for every dimension. ``epsilon`` keeps its value (by
        default 0.999 * ``strength``), so the refinement probes the same width around the scan's pick.
        ``batch_size``: sequences per forward pass when scoring the forget set (``score_in_batches``; default
        the data module's ``eval_batch_size``, else 64): real TOFU's forget10 is thousands of sequences."""
        super().__init__()
        self.save_hyperparameters()
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if corruption not in STRENGTH_CORRUPTIONS:
            raise ValueError(f"only {STRENGTH_CORRUPTIONS} have a strength to learn, got {corruption!r}")
        if vector and corruption != "rand_noise_first_n":
            raise ValueError("vector strengths need corruption 'rand_noise_first_n'")
        if metric != "mc_accuracy" and target is None and retain_eval is None:
            raise ValueError(f"metric {metric!r} needs target or retain_eval (the retain model's evaluation)")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if init_scan is not None:
            if len(init_scan) == 0 or any(not math.isfinite(float(v)) or float(v) < min_strength for v in init_scan):
                raise ValueError(f"init_scan must be a non-empty list of finite strengths >= min_strength "
                                 f"({min_strength}), got {init_scan!r}")
        self.automatic_optimization = False
        self.model_name_or_path, self.metric = model, metric
        self.epsilon = 0.999 * strength if epsilon is None else epsilon
        self.reference_ratios: np.ndarray | None = None
        if metric == "truth_ratio_ks":
            from modules.tofu_eval import reference_truth_ratios

            if target not in (None, 0.0) or retain_eval is None:
                raise ValueError("metric 'truth_ratio_ks' has target 0 (the KS distance) and needs retain_eval, "
                                 f"the retain model's evaluation; got target={target!r}, retain_eval={retain_eval!r}")
            self.reference_ratios, target = reference_truth_ratios(retain_eval), 0.0
        elif target is None and metric != "mc_accuracy":
            target = target_from_retain_eval(retain_eval, metric)
        self.target = target
        initial = torch.full((dims,), float(strength)) if vector else torch.tensor(float(strength))
        # a parameter (never given autograd gradients) so an optimizer steps it and Lightning counts steps
        self.strength = torch.nn.Parameter(initial.double(), requires_grad=False)
        self.register_buffer("best_strength", initial.double().clone())
        self.register_buffer("best_objective", torch.tensor(float("inf"), dtype=torch.float64))
        self.tokenizer = lm.load_tokenizer(model)
        self._lm: EcoLM | None = None  # held outside the module tree: never checkpointed nor trained
        self.history: list[dict[str, Any]] = []
        self.forward_passes = 0  # objective evaluations (one pass over the forget set each), scan included
        self.scan_forward_passes = 0

    def configure_model(self) -> None:
        if self._lm is not None:
            return
        hp = self.hparams
        model = lm.load_model(self.model_name_or_path, tokenizer=self.tokenizer, dtype=hp.dtype).eval()
        settings = EcoSettings(corruption=hp.corruption, strength=float(hp.strength), dims=hp.dims,
                               token_selection=hp.token_selection, entity_names=list(hp.entity_names or []),
                               gate="all", seed=hp.seed)
        self._lm = EcoLM(model, self.tokenizer, settings)

    def _check_step_limit(self) -> None:
        from lightning.pytorch.callbacks import Timer

        trainer = self.trainer
        timed = any(isinstance(callback, Timer) for callback in trainer.callbacks)  # trainer.max_time
        # Lightning turns "neither max_steps nor max_epochs" into max_epochs=1000 before any hook runs, so
        # 1000 epochs without max_steps is taken as no limit set
        unlimited_epochs = trainer.max_epochs is None or trainer.max_epochs < 0 or trainer.max_epochs == 1000
        if trainer.max_steps < 0 and unlimited_epochs and not timed:
            raise ValueError("EcoCorruptionLearner needs a step limit: set trainer.max_steps (one step = one pass "
                             "over the forget set) or trainer.max_epochs (data.steps_per_epoch steps each); "
                             "max_epochs 1000 without max_steps is Lightning's default when neither is set, so it "
                             "counts as unset (for 1000 steps, set max_steps)")

    def setup(self, stage: str) -> None:
        # before the strategy wraps the module (DDP refuses one without trainable parameters, with a message
        # about DDP, not about this learner)
        if stage == "fit" and self.trainer.world_size > 1:
            raise ValueError(f"EcoCorruptionLearner runs on one process (each step is a few forward passes over "
                             f"the forget set, and its strength is no parameter DDP could synchronise); got "
                             f"{self.trainer.world_size} processes: set trainer.devices=1 and drop the strategy")

    def on_fit_start(self) -> None:
        self._check_step_limit()
        self.configure_model()
        self._lm.model.to(self.device)
        forget_split = getattr(self.trainer.datamodule, "forget_split", None)
        if self.hparams.retain_eval and forget_split is not None:
            from modules.tofu_eval import load_eval

            evaluated = load_eval(self.hparams.retain_eval).get("forget_split")
            if evaluated != forget_split:
                raise ValueError(f"{self.hparams.retain_eval}: the retain model was evaluated on forget split "
                                 f"{evaluated!r}, the learner scores {forget_split!r}")
        if self.target is None:  # chance accuracy of the multiple-choice items
            self.target = 1.0 / float(self.trainer.datamodule.n_options)
        rank_zero_info(f"[EcoCorruptionLearner] metric {self.metric}, target {self.target:.4f}")

    def configure_optimizers(self):
        return torch.optim.SGD([self.strength], lr=self.hparams.lr)

    def score_batch_size(self) -> int:
        if self.hparams.batch_size is not None:
            return self.hparams.batch_size
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return getattr(datamodule, "eval_batch_size", None) or DEFAULT_SCORE_BATCH

    def metric_value(self, batch: Mapping[str, Any], strength) -> float:
        part = batch["mc" if self.metric == "mc_accuracy" else "qa"]
        value = strength.tolist() if torch.is_tensor(strength) and strength.dim() else float(strength)
        flags = torch.ones(len(part["questions"]), dtype=torch.bool)
        logp = score_in_batches(self._lm, part, flags, value, self.score_batch_size())
        return forget_metric(self.metric, batch, logp, self.reference_ratios)

    def _visit(self, batch: Mapping[str, Any], strength, step: int, probe: bool = False,
               scan: bool = False) -> tuple[float, float]:
        """Score one strength, keep it if it is the best so far, record it; returns (metric, J)."""
        s = torch.as_tensor(strength, dtype=torch.float64).detach().cpu().clone()
        metric = self.metric_value(batch, s)
        self.forward_passes += 1
        j = abs(metric - self.target)
        if j < float(self.best_objective):
            self.best_objective.fill_(j)
            self.best_strength.copy_(s)
        self.history.append({"step": step, "strength": s.tolist(), "objective": j, "metric": metric, "probe": probe,
                             "scan": scan})
        return metric, j

    def _log(self, scalars: Mapping[str, float], step: int) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics(dict(scalars), step=step)

    def _initial_scan(self, batch: Mapping[str, Any]) -> None:
        """Evaluate J at every ``init_scan`` strength and move the strength to the best one."""
        scale = torch.ones_like(self.strength.detach().cpu())  # a vector strength scans a common scale

        def scanned(value: float) -> float:
            index = self.scan_forward_passes
            metric, j = self._visit(batch, scale * value, self.global_step, scan=True)
            self.scan_forward_passes += 1
            self._log({"scan/strength": value, "scan/objective": j, "scan/metric": metric}, step=index)
            return j

        best, values = coarse_search(scanned, [float(v) for v in self.hparams.init_scan])
        with torch.no_grad():
            self.strength.copy_(scale * best)
        self._log({"scan/forward_passes": self.scan_forward_passes, "scan/best_strength": best},
                  step=self.global_step)
        rank_zero_info("[EcoCorruptionLearner] scan: " + ", ".join(
            f"s={v:g}: J={j:.4f}" for v, j in zip(self.hparams.init_scan, values)) + f" -> start at s={best:g}")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        step = self.global_step
        if hp.init_scan and step == 0 and self.scan_forward_passes == 0:
            self._initial_scan(batch)
        s = self.strength.detach().cpu().clone()
        metric_now, j_now = self._visit(batch, s, step)

        def probe(value) -> float:
            return self._visit(batch, value, step, probe=True)[1]

        if hp.vector:
            generator = torch.Generator().manual_seed(hp.seed * 1_000_003 + step)
            grad, _ = random_direction_gradient(probe, s, self.epsilon, hp.directions, hp.min_strength, generator)
        else:
            grad, _, _ = central_difference(probe, float(s), self.epsilon, hp.min_strength)
            grad = torch.tensor(grad, dtype=torch.float64)
        optimizer = self.optimizers()
        self.strength.grad = grad.to(self.strength)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            self.strength.clamp_(min=hp.min_strength)
        self._log({"train/objective": j_now, "train/metric": metric_now, "train/strength": float(s.mean()),
                   "train/gradient": float(torch.as_tensor(grad).norm()), "train/forward_passes": self.forward_passes},
                  step=step)
        if reached_stop(metric_now, j_now, hp.tolerance, hp.stop_below):
            self.trainer.should_stop = True

    def learned_settings(self) -> EcoSettings:
        hp = self.hparams
        s = self.best_strength.tolist()
        return EcoSettings(corruption=hp.corruption, strength=s, dims=hp.dims, token_selection=hp.token_selection,
                           entity_names=list(hp.entity_names or []), gate="all", seed=hp.seed)

    def on_fit_end(self) -> None:
        # the last update was never evaluated: score it so "best" covers every strength visited
        if self.trainer.datamodule is not None and self.trainer.is_global_zero:
            batch = next(iter(self.trainer.datamodule.train_dataloader()))
            self._visit(batch, self.strength.detach().cpu(), self.global_step)
            rank_zero_info(f"[EcoCorruptionLearner] best strength {self.best_strength.tolist()} "
                           f"(objective {float(self.best_objective):.4f}, target {self.target:.4f})")
            if self.hparams.settings_dir:
                folder = save_settings(self.hparams.settings_dir, self.learned_settings())
                (folder / "learning.json").write_text(json.dumps(
                    {"metric": self.metric, "target": self.target, "best_objective": float(self.best_objective),
                     "steps": self.global_step, "forward_passes": self.forward_passes,
                     "scan_forward_passes": self.scan_forward_passes, "history": self.history}, indent=1))
