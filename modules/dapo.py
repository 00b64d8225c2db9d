"""DAPO: Direct Advantage Policy Optimization (Liu, Wang et al., arXiv 2412.18279), step-level offline RL.

A response is a sequence of steps (lines, see ``datamodules.dapo_data.split_steps``); a state is the prompt
plus the steps so far; reward 1 if the final answer is correct, given at the end. DAPO trains a critic to
convergence on fixed Monte-Carlo targets, then trains the actor offline on (state, action, advantage,
reference log-prob) rows. Every stage is one ordinary CLI run whose output is a file:

====  =========================  ===========================================================  ==========================
stage  command                    what it does                                                 output
====  =========================  ===========================================================  ==========================
1     predict ``DAPORollouts``   per problem n1 samples, keep n balanced, m completions per    rollouts JSONL
                                 step-prefix state: MC value + de-duplicated candidate steps   (``ROLLOUT_COLUMNS``)
2     fit ``DAPOCritic``         causal LM + scalar head at the last token, BCE on MC values   checkpoint -> export
3     predict ``DAPOAdvantages`` Q_i = V(s+a_i) (true reward if terminal), A = Q - mean Q,     advantages JSONL
                                 gap filter, cached log pi_ref(a|s)                            (``ADVANTAGE_COLUMNS``)
4     fit ``DAPOActor``          Eq. 12: 1/2 (log pi/pi_ref - A/beta)^2, state-wise batches    checkpoint -> export
5     test ``DAPOPolicy``        greedy pass@1 of any policy on held-out problems              summary.json
====  =========================  ===========================================================  ==========================

    python cli.py predict --config configs/dapo/rollouts.yaml --return_predictions false
    python cli.py fit     --config configs/dapo/critic.yaml
    python cli.py export  runs/dapo/critic/checkpoints/last.ckpt runs/dapo/critic/export
    python cli.py predict --config configs/dapo/advantages.yaml --return_predictions false
    python cli.py fit     --config configs/dapo/actor.yaml
    python cli.py export  runs/dapo/actor/checkpoints/last.ckpt runs/dapo/actor/export
    python cli.py test    --config configs/dapo/evaluate.yaml --model.init_args.model runs/dapo/actor/export

Iteration: rerun the stages with the actor export as the policy (generator, completer and pi_ref).
``recipes/dapo_arithmetic.py`` chains everything for the embedded arithmetic task.

Rollouts are written by ``callbacks.rollout_writer.ShardedJsonlWriter``: one append-only JSONL shard per
process (each DDP rank rolls out its own problems), rows keyed by problem id so a restarted run skips
what is done, merged into the output file at the end (sorted by key, counts in ``<stem>.report.json``).

The columns of the rollout dataset (one row per problem) and of the advantage dataset (one row per state)
are defined once, in ``ROLLOUT_COLUMNS`` and ``ADVANTAGE_COLUMNS`` of ``datamodules/dapo_data.py``; the
README's tables are generated from them (``datamodules.dapo_data.columns_markdown``).

The generation engine (``RolloutEngine``) batches many prompts x many samples with a KV cache and left
padding; a state is prefilled once and its cache expanded to its m samples; finished rows leave the batch.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from datamodules.common import padding_id, shards_parameters, write_rows
from datamodules.dapo_data import (
    balanced_keep,
    bos_mismatch,
    encode_state,
    encode_text,
    first_step,
    split_steps,
    state_action_tokens,
    state_prefixes,
    state_tokens,
)
from datamodules.text import cached_prefix_ids
from modules import lm
from modules.base import EvalRows, HFModule, gather_objects

TEST_GENERATIONS_FILE = "test_generations.jsonl"  # DAPOPolicy's per-problem test results, in the log folder

# ====================================================================================================
# Losses and metrics (pure)


def critic_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BCE with soft targets: −[MC·log σ(z) + (1−MC)·log(1−σ(z))], mean over states.

    ``logits`` z (B,) are the critic's outputs before the sigmoid; ``targets`` (B,) are Monte-Carlo values
    in [0, 1]. Not MSE: V is a probability. Computed from logits for numerical stability.
    """
    logits, targets = logits.float(), targets.float()
    loss = F.binary_cross_entropy_with_logits(logits, targets)
    values = torch.sigmoid(logits).detach()
    return loss, {"bce": loss.detach(), "mae": (values - targets).abs().mean(), "value_mean": values.mean(),
                  "target_mean": targets.mean()}


def base_rate_bce(targets: torch.Tensor) -> torch.Tensor:
    """The BCE of a constant critic that predicts the targets' mean for every state: the bar a critic must
    clear to have learned anything about states (``1 − bce / base_rate_bce`` is its skill)."""
    targets = targets.float()
    mean = targets.mean().clamp(1e-6, 1 - 1e-6)
    return F.binary_cross_entropy(mean.expand_as(targets), targets)


def expected_calibration_error(values: torch.Tensor, targets: torch.Tensor, num_bins: int = 10) -> float:
    """Σ_b (n_b/N)·|mean value − mean target| over equal-width bins of the predicted value.

    With Monte-Carlo targets the mean target of a bin is the observed success rate of its states.
    """
    values, targets = values.double().flatten(), targets.double().flatten()
    if values.numel() == 0:
        return float("nan")
    bins = (values * num_bins).long().clamp(0, num_bins - 1)
    value_sum = torch.zeros(num_bins, dtype=torch.double).index_add_(0, bins, values)
    target_sum = torch.zeros(num_bins, dtype=torch.double).index_add_(0, bins, targets)
    return float((value_sum - target_sum).abs().sum() / values.numel())


def weighted_auroc(scores: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """AUROC when item i stands for ``positives[i]`` positive and ``negatives[i]`` negative examples, all
    scored ``scores[i]``: P(score of a random positive > score of a random negative), ties counting ½.

    For the critic: item = state, score = V(s), positives/negatives = how many of the trajectories sampled
    from s ended correct/wrong, i.e. the AUROC of predicting a trajectory's final correctness from V(s).
    NaN when there are no positives or no negatives.
    """
    scores, positives, negatives = scores.double().flatten(), positives.double().flatten(), negatives.double().flatten()
    total_pos, total_neg = positives.sum(), negatives.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    unique, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    pos = torch.zeros(len(unique), dtype=torch.double).index_add_(0, inverse, positives)
    neg = torch.zeros(len(unique), dtype=torch.double).index_add_(0, inverse, negatives)
    neg_below = torch.cumsum(neg, 0) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (total_pos * total_neg))


def sibling_advantages(q_values: torch.Tensor, state_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Â(s, a_i) = Q_i − mean_j Q_j over the candidates of the same state (baseline: siblings, not V(s)).

    ``q_values`` (N,) and ``state_index`` (N,) (which state each candidate belongs to, 0..S-1). Returns the
    advantages (N,) and each state's gap max Â − min Â (S,).
    """
    q_values = q_values.double()
    num_states = int(state_index.max()) + 1
    count = torch.zeros(num_states, dtype=torch.double).index_add_(0, state_index, torch.ones_like(q_values))
    mean = torch.zeros(num_states, dtype=torch.double).index_add_(0, state_index, q_values) / count
    advantages = q_values - mean[state_index]
    high = torch.full((num_states,), -math.inf, dtype=torch.double).scatter_reduce(0, state_index, advantages, "amax")
    low = torch.full((num_states,), math.inf, dtype=torch.double).scatter_reduce(0, state_index, advantages, "amin")
    return advantages, high - low


def dapo_actor_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
                    state_index: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAPO actor loss (Eq. 12): ½ · E_s E_{a~Unif(candidates of s)} [(log π_θ(a|s) − log π_ref(a|s) − Â/β)²].

    ``policy_logps``/``ref_logps`` (N,) are summed token log-probs of each candidate step; ``advantages`` (N,);
    ``state_index`` (N,) groups candidates by state. Each candidate weighs 1/M_s within its state and every
    state weighs the same (uniform over unique candidates). No clipping, no normalisation, no ratio.
    Metrics: sign accuracy = fraction of candidates with Â ≠ 0 whose log-ratio has Â's sign.
    """
    log_ratio = policy_logps.float() - ref_logps.float()
    target = advantages.float() / beta
    per_candidate = 0.5 * (log_ratio - target) ** 2
    num_states = int(state_index.max()) + 1
    count = torch.zeros(num_states, device=log_ratio.device).index_add_(0, state_index, torch.ones_like(log_ratio))
    per_state = torch.zeros(num_states, device=log_ratio.device).index_add_(0, state_index, per_candidate) / count
    present = count > 0
    loss = per_state[present].mean()
    nonzero = advantages != 0
    agree = (torch.sign(log_ratio) == torch.sign(advantages.float())) & nonzero
    sign_accuracy = agree.float().sum() / nonzero.float().sum().clamp(min=1)
    return loss, {"loss": loss.detach(), "sign_accuracy": sign_accuracy.detach(),
                  "log_ratio_mean": log_ratio.mean().detach(), "log_ratio_abs_mean": log_ratio.abs().mean().detach(),
                  "target_abs_mean": target.abs().mean().detach()}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _sum_if_recorded(entries: Sequence[dict[str, Any]], name: str) -> int | None:
    """The sum of an optional count, or None when some entry lacks it (rows of an older file)."""
    return sum(entry[name] for entry in entries) if all(name in entry for entry in entries) else None


# ====================================================================================================
# Batched generation


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finished: bool  # ended with a stop token; False: cut at max_new_tokens


def _forward_kwargs(model) -> dict[str, str]:
    """Names of the cache/logit-slicing arguments, which changed across transformers versions."""
    params = inspect.signature(model.forward).parameters
    return {"cache": "cache" if "cache" in params else "past_key_values",
            "keep": "logits_to_keep" if "logits_to_keep" in params else "num_logits_to_keep"}


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): greedy when temperature <= 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class RolloutEngine:
    """Sampling for many prompts x many samples each, batched, with a KV cache.

    - Prompts are left-padded (position ids follow the attention mask) and prefilled once; the cache,
      mask and last logits are then expanded to the prompt's samples, so the m completions of a state
      share one prefill of the state.
    - Decoding advances every unfinished row by one token per forward pass; rows that produced a stop
      token are removed from the batch (cache rows included) once they are half of it.
    - At most ``max_batch_sequences`` rows are in flight; larger requests run in successive chunks.
    """

    def __init__(self, model, tokenizer, max_batch_sequences: int = 256, stop_token_ids: Sequence[int] = ()):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_sequences = max_batch_sequences
        stops = set(stop_token_ids) | {tokenizer.eos_token_id}
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stops |= set(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
        self.stop_token_ids = sorted(t for t in stops if t is not None)
        self.names = _forward_kwargs(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older transformers: no config argument
            return DynamicCache()

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], num_samples: int | Sequence[int] = 1,
                 max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> list[list[Generation]]:
        """``num_samples[i]`` generations of each prompt (token id lists), in order."""
        counts = [num_samples] * len(prompts) if isinstance(num_samples, int) else list(num_samples)
        if len(counts) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(counts)} sample counts")
        pieces: list[tuple[int, int]] = []  # (prompt index, samples) with no piece above the batch limit
        for index, count in enumerate(counts):
            for start in range(0, count, self.max_batch_sequences):
                pieces.append((index, min(self.max_batch_sequences, count - start)))
        results: list[list[Generation]] = [[] for _ in prompts]
        chunk: list[tuple[int, int]] = []
        for piece in pieces + [None]:
            if piece is None or sum(c for _, c in chunk) + piece[1] > self.max_batch_sequences:
                if chunk:
                    outputs = self._generate_chunk([prompts[i] for i, _ in chunk], [c for _, c in chunk],
                                                   max_new_tokens, temperature, top_p, generator)
                    for (index, _), generations in zip(chunk, outputs):
                        results[index].extend(generations)
                chunk = []
            if piece is not None:
                chunk.append(piece)
        return results

    def _generate_chunk(self, prompts, counts, max_new_tokens, temperature, top_p, generator):
        device, model = self.device, self.model
        pad = padding_id(self.tokenizer)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError("cannot generate from an empty prompt")
            input_ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), device=device)
            mask[row, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **{self.names["cache"]: cache, self.names["keep"]: 1})
        expand = torch.repeat_interleave(torch.arange(len(prompts), device=device),
                                         torch.as_tensor(counts, device=device))
        cache.reorder_cache(expand)  # one prefill per prompt, shared by its samples
        logits = out.logits[:, -1][expand]
        mask, next_position = mask[expand], positions[expand, -1] + 1
        total = expand.numel()
        rows = torch.arange(total, device=device)  # output row of each batch row
        tokens = torch.full((total, max_new_tokens), pad, dtype=torch.long, device=device)
        stopped = torch.zeros(total, dtype=torch.bool, device=device)
        stop_ids = torch.as_tensor(self.stop_token_ids, device=device)
        for step in range(max_new_tokens):
            next_tokens = sample_tokens(logits, temperature, top_p, generator)
            tokens[rows, step] = next_tokens
            stopped[rows] |= torch.isin(next_tokens, stop_ids)
            if step == max_new_tokens - 1:
                break
            running = ~stopped[rows]
            if not running.any():
                break
            if running.sum() * 2 <= running.numel():  # drop finished rows once they are half the batch
                keep = running.nonzero().squeeze(-1)
                cache.reorder_cache(keep)
                rows, mask, next_position, next_tokens = rows[keep], mask[keep], next_position[keep], next_tokens[keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            out = model(input_ids=next_tokens[:, None], attention_mask=mask, position_ids=next_position[:, None],
                        use_cache=True, **{self.names["cache"]: cache})
            logits = out.logits[:, -1]
            next_position = next_position + 1
        return self._collect(tokens.cpu(), counts)

    def _collect(self, tokens: torch.Tensor, counts: list[int]) -> list[list[Generation]]:
        stop = set(self.stop_token_ids)
        sequences, finished = [], []
        for row in tokens.tolist():
            end = next((i for i, t in enumerate(row) if t in stop), None)
            sequences.append(row if end is None else row[:end])
            finished.append(end is not None)
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        out, start = [], 0
        for count in counts:
            out.append([Generation(sequences[i], texts[i], finished[i]) for i in range(start, start + count)])
            start += count
        return out


def batch_seed(seed: int, keys: Sequence[str]) -> int:
    """A sampling seed fixed by the run seed and the problems of a batch (reruns of a batch repeat it)."""
    digest = hashlib.sha256((str(seed) + "\x00" + "\x00".join(keys)).encode()).hexdigest()
    return int(digest[:15], 16)


# ====================================================================================================
# Policies: evaluation (stage 5) and rollouts (stage 1)


def refuse_sharded_generation(module: pl.LightningModule) -> None:
    """The rollout engine and the advantage stage run as many forwards as their data needs, different on
    each process; with sharded parameters every forward waits for all processes, so they would hang."""
    if module.trainer.world_size > 1 and shards_parameters(module.trainer.strategy):
        raise RuntimeError(f"{type(module).__name__} generates or scores a data-dependent number of forwards per "
                           f"process, which {type(module.trainer.strategy).__name__} cannot run (every sharded "
                           "forward waits for all processes). Use one device or DDP (configs/trainer/ddp.yaml); "
                           "training the critic and the actor under FSDP is supported.")


class DAPOPolicy(HFModule):
    """Any causal LM as a policy: ``test`` reports greedy pass@1 on the data module's held-out problems
    (``DAPOProblems``), answers checked by ``datamodules.verifiers.reward``.

    ``max_new_tokens``: generation budget of a response; ``max_batch_sequences``: rows in flight in the
    generation engine. Other arguments: ``HFModule``.
    """

    def __init__(self, max_new_tokens: int = 64, max_batch_sequences: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.max_new_tokens = max_new_tokens
        self.max_batch_sequences = max_batch_sequences
        self._engine: RolloutEngine | None = None

    @property
    def engine(self) -> RolloutEngine:
        if self._engine is None or self._engine.model is not self.model:
            self._engine = RolloutEngine(self.model, self.tokenizer, self.max_batch_sequences)
        return self._engine

    def on_test_start(self) -> None:
        refuse_sharded_generation(self)

    def on_predict_start(self) -> None:
        refuse_sharded_generation(self)

    @staticmethod
    def rewards(task_kinds: Sequence[str], texts: Sequence[str], references: Sequence[Any]) -> list[float]:
        from datamodules import verifiers

        out = [0.0] * len(texts)
        for kind in set(task_kinds):  # one call per kind: code checks run concurrently
            indices = [i for i, k in enumerate(task_kinds) if k == kind]
            for i, value in zip(indices, verifiers.rewards(kind, [texts[i] for i in indices],
                                                           [references[i] for i in indices])):
                out[i] = value
        return out

    def on_test_epoch_start(self) -> None:
        self._test_rows: list[dict[str, Any]] = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        generations = [g[0] for g in self.engine.generate(batch["prompt_ids"], 1, self.max_new_tokens, temperature=0.0)]
        correct = self.rewards(batch["task_kind"], [g.text for g in generations], batch["reference"])
        self._test_rows += [{"problem_id": problem_id, "correct": bool(value), "finished": g.finished,
                             "response_tokens": len(g.token_ids), "response": g.text}
                            for problem_id, value, g in zip(batch["problem_id"], correct, generations)]

    def on_test_epoch_end(self) -> None:
        """Logs pass@1 over the distinct problems of all processes and writes ``<log_dir>/test_generations.jsonl``:
        per problem the greedy response and whether it was correct, for reading the answers and for paired
        comparisons of two policies on the same problems."""
        # the distributed sampler repeats problems to even out the processes: count each once
        first: dict[str, dict[str, Any]] = {}
        for share in gather_objects(self.trainer, self._test_rows):
            for row in share:
                first.setdefault(row["problem_id"], row)
        rows = sorted(first.values(), key=lambda row: row["problem_id"])
        if rows:
            # equal on every process already; sync_dist keeps Lightning's epoch-end check quiet
            for key, name in (("correct", "accuracy"), ("finished", "finished"), ("response_tokens", "response_tokens")):
                self.log(f"test/{name}", sum(float(row[key]) for row in rows) / len(rows), sync_dist=True,
                         prog_bar=name == "accuracy")
        log_dir = self.trainer.log_dir  # on every process: a collective call under DDP
        if self.trainer.is_global_zero and log_dir:
            write_rows(Path(log_dir) / TEST_GENERATIONS_FILE, rows)


class DAPORollouts(DAPOPolicy):
    """Stage 1 (``predict`` over ``DAPOProblems``): the Monte-Carlo rollout dataset, one row per problem.

    Per problem: ``n1`` sampled responses; keep ``n`` distinct ones balancing correct and wrong; split each
    on "\\n" (``max_step_chars`` > 0 also cuts a longer line into pieces); from every distinct step-prefix
    state sample ``m`` completions; MC value = fraction correct; candidates = de-duplicated first steps of the
    completions. The defaults are the paper's (n1 = 32, n = 6, m = 16, a step is a line);
    ``configs/dapo/rollouts.yaml`` halves them for the 2-core CPU.
    The model is the generator, the completer and (later) π_ref. ``temperature``/``top_p`` shape sampling;
    ``max_new_tokens`` bounds a response, ``completion_max_new_tokens`` a completion (default: the same).

    Rows are written by ``callbacks.rollout_writer.ShardedJsonlWriter``, which sets ``skip_keys`` to the
    problem ids already written so a restart skips them; rows written with another policy, ``n1`` or ``m``
    (``resume_mismatch``) make it refuse the run instead.
    """

    def __init__(self, n1: int = 32, n: int = 6, m: int = 16, temperature: float = 1.0, top_p: float = 1.0,
                 completion_max_new_tokens: int | None = None, max_step_chars: int = 0, seed: int = 0,
                 **kwargs):
        super().__init__(**kwargs)
        if min(n1, n, m) <= 0 or n > n1:
            raise ValueError(f"need 0 < n <= n1 and m > 0, got n1={n1}, n={n}, m={m}")
        self.n1, self.n, self.m = n1, n, m
        self.temperature, self.top_p = temperature, top_p
        self.completion_max_new_tokens = completion_max_new_tokens or self.max_new_tokens
        self.max_step_chars, self.seed = max_step_chars, seed
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.skip_keys: set[str] = set()
        self.num_skipped = 0

    def resume_mismatch(self, row: dict[str, Any]) -> tuple[str, Any, Any] | None:
        """(field, recorded, this run's) for the first setting recorded in an existing row that differs."""
        for name, expected in (("policy", self.model_name_or_path), ("num_samples", self.n1)):
            if row.get(name) != expected:
                return name, row.get(name), expected
        # recorded since 2026-11-27 (rows written before lack them)
        for name, expected in (("num_kept", self.n), ("max_step_chars", self.max_step_chars)):
            if name in row and row[name] != expected:
                return name, row[name], expected
        for s, state in enumerate(row.get("states") or []):
            recorded = state.get("num_completions") if isinstance(state, dict) else None
            if recorded != self.m:
                return f"states[{s}].num_completions", recorded, self.m
        return None

    def on_predict_epoch_start(self) -> None:
        self.model.eval()

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        todo = [i for i, key in enumerate(batch["problem_id"]) if key not in self.skip_keys]
        self.num_skipped += len(batch["problem_id"]) - len(todo)
        if not todo:
            return []
        generator = torch.Generator(device=self.device).manual_seed(
            batch_seed(self.seed, [batch["problem_id"][i] for i in todo]))
        sampling = dict(temperature=self.temperature, top_p=self.top_p, generator=generator)
        problems = [{key: batch[key][i] for key in batch} for i in todo]

        # 1. n1 responses per problem, de-duplicated; keep n balancing correct and wrong
        responses = self.engine.generate([p["prompt_ids"] for p in problems], self.n1, self.max_new_tokens, **sampling)
        flat = [(p, g) for p, gens in zip(problems, responses) for g in gens]
        flat_rewards = self.rewards([p["task_kind"] for p, _ in flat], [g.text for _, g in flat],
                                    [p["reference"] for p, _ in flat])
        states: list[tuple[int, str, int]] = []  # (problem position, prefix, depth)
        for position, problem in enumerate(problems):
            unique: OrderedDict[str, dict] = OrderedDict()
            for k in range(self.n1):
                generation, reward = responses[position][k], flat_rewards[position * self.n1 + k]
                entry = unique.setdefault(generation.text, {"text": generation.text, "reward": reward, "count": 0,
                                                            "finished": generation.finished, "retokenized": 0})
                entry["count"] += 1
                entry["retokenized"] += self.retokenized(generation)
            problem["samples"] = list(unique.values())
            problem["kept"] = balanced_keep([s["reward"] for s in problem["samples"]], self.n)
            prefixes: OrderedDict[str, int] = OrderedDict()
            for index in problem["kept"]:
                for depth, prefix in enumerate(state_prefixes(split_steps(problem["samples"][index]["text"],
                                                                          self.max_step_chars))):
                    prefixes.setdefault(prefix, depth)
            states.extend((position, prefix, depth) for prefix, depth in prefixes.items())

        # 2. m completions from every state, one prefill per state
        state_ids = [encode_state(self.tokenizer, problems[p]["prompt_text"], prefix) for p, prefix, _ in states]
        completions = self.engine.generate(state_ids, self.m, self.completion_max_new_tokens, **sampling)
        texts, kinds, references = [], [], []
        for (position, prefix, _), gens in zip(states, completions):
            for g in gens:
                texts.append(prefix + g.text)
                kinds.append(problems[position]["task_kind"])
                references.append(problems[position]["reference"])
        completion_rewards = self.rewards(kinds, texts, references)

        for problem in problems:
            problem["states"] = []
        for s, ((position, prefix, depth), gens) in enumerate(zip(states, completions)):
            rewards = completion_rewards[s * self.m:(s + 1) * self.m]
            candidates: OrderedDict[tuple[str, bool], dict] = OrderedDict()
            for g, reward in zip(gens, rewards):
                action = first_step(g.text, self.max_step_chars)
                terminal = g.finished and action == g.text  # the completion ended right after this step
                entry = candidates.setdefault((action, terminal), {"action": action, "terminal": terminal, "count": 0,
                                                                   "num_correct": 0, "truncated": 0, "retokenized": 0})
                entry["count"] += 1
                entry["retokenized"] += self.retokenized(g)
                entry["num_correct"] += int(reward >= 0.5)
                entry["truncated"] += int(not g.finished and action == g.text)
            correct = sum(int(r >= 0.5) for r in rewards)
            problems[position]["states"].append({
                "prefix": prefix, "depth": depth, "num_completions": self.m, "num_correct": correct,
                "mc_value": correct / self.m, "candidates": list(candidates.values())})

        rows = []
        for problem in problems:
            samples = problem["samples"]
            rows.append({
                "problem_id": problem["problem_id"], "task_kind": problem["task_kind"], "prompt": problem["prompt"],
                "prompt_text": problem["prompt_text"], "reference": problem["reference"],
                "policy": self.model_name_or_path, "samples": samples, "num_samples": self.n1, "num_kept": self.n,
                "max_step_chars": self.max_step_chars,
                "sample_accuracy": sum(s["reward"] * s["count"] for s in samples) / self.n1,
                "kept": problem["kept"], "states": problem["states"]})
        return rows

    def retokenized(self, generation: Generation) -> int:
        """1 if the generation's text encodes to other tokens than were sampled, else 0. The later stages
        score text (states and actions are re-encoded), so such a sample is scored on tokens the policy did
        not emit: bytes that are not valid UTF-8 decode to U+FFFD, special tokens are dropped, and a BPE
        tokenizer may segment the text otherwise. Counted, so the report shows how often it happens."""
        return int(encode_text(self.tokenizer, generation.text) != generation.token_ids)

    @staticmethod
    def dataset_report(rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Counts written next to the merged rollout file."""
        states = [s for row in rows for s in row["states"]]
        candidates = [c for s in states for c in s["candidates"]]
        return {
            "problems": len(rows), "states": len(states), "candidates": len(candidates),
            "sample_accuracy": _mean([row["sample_accuracy"] for row in rows]),
            "problems_all_correct": sum(row["sample_accuracy"] == 1.0 for row in rows),
            "problems_all_wrong": sum(row["sample_accuracy"] == 0.0 for row in rows),
            "candidates_per_state": _mean([len(s["candidates"]) for s in states]),
            "states_with_one_candidate": sum(len(s["candidates"]) == 1 for s in states),
            "mc_value_mean": _mean([s["mc_value"] for s in states]),
            "terminal_candidates": sum(c["terminal"] for c in candidates),
            "truncated_completions": sum(c["truncated"] for c in candidates),
            # files written before this count existed lack it: None, not a made-up 0
            "retokenized_samples": _sum_if_recorded([s for row in rows for s in row.get("samples", [])], "retokenized"),
            "retokenized_completions": _sum_if_recorded(candidates, "retokenized"),
        }


# ====================================================================================================
# Stage 2: the critic


class DAPOCritic(HFModule):
    """V_φ(s) = σ(score head at the last token of s), trained with ``critic_loss`` on ``CriticData``.

    A sequence-classification head (one output) on the causal-LM backbone; the tokenizer gets a pad token
    distinct from EOS, since the head reads the last non-pad token. Warm-start from the policy by passing
    its folder as ``model``. Validation: BCE, MAE, ECE, the AUROC of predicting whether a trajectory
    sampled from a state ends correct (``weighted_auroc``), and the BCE of the constant base-rate critic with
    the skill over it (``base_rate_bce``; skill <= 0: nothing learned about states). Export with ``cli.py export``.
    """

    model_kind = "sequence_classification"

    def __init__(self, calibration_bins: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.calibration_bins = calibration_bins
        self._eval = EvalRows(columns=4)

    def prepare_tokenizer(self, tokenizer) -> None:
        lm.ensure_distinct_pad_token(tokenizer)

    def value_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.squeeze(-1).float()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = critic_loss(self.value_logits(batch["input_ids"], batch["attention_mask"]), batch["target"])
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=len(batch["target"]), prog_bar=False)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._eval = EvalRows(columns=4)  # logit, target, correct and wrong completions

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self.value_logits(batch["input_ids"], batch["attention_mask"])
        self._eval.add(batch.get("row_id"), [logits, batch["target"].float(), batch["num_correct"],
                                             batch["num_completions"] - batch["num_correct"]], self.global_rank)

    def on_validation_epoch_end(self) -> None:
        # over the distinct states of all ranks (the distributed sampler repeats some), so every rank
        # computes the same values; sync_dist only keeps Lightning's epoch-level distributed check quiet
        rows = self._eval.gather(self.trainer.strategy, self.device)
        if not len(rows) or self.trainer.sanity_checking:
            return
        logits, targets, positives, negatives = rows[:, 1:].float().unbind(1)
        _, metrics = critic_loss(logits, targets)
        base_rate = base_rate_bce(targets)
        metrics["bce_base_rate"] = base_rate
        if base_rate > 1e-4:  # every target 0 (or every one 1): no base rate to beat, the skill is undefined
            metrics["bce_skill"] = 1 - metrics["bce"] / base_rate
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=True)
        values = torch.sigmoid(logits).cpu()
        self.log("val/ece", expected_calibration_error(values, targets.cpu(), self.calibration_bins), sync_dist=True)
        auroc = weighted_auroc(values, positives.cpu(), negatives.cpu())
        if math.isfinite(auroc):
            self.log("val/auroc", auroc, sync_dist=True)


# ====================================================================================================
# Stage 3: advantages and cached reference log-probs


def padded_batch(sequences: list[list[int]], pad: int, labels: list[list[int]] | None = None,
                 device: torch.device | None = None) -> dict[str, torch.Tensor]:
    from datamodules.common import pad_sequences

    batch = {"input_ids": pad_sequences(sequences, pad),
             "attention_mask": pad_sequences([[1] * len(s) for s in sequences], 0)}
    if labels is not None:
        batch["labels"] = pad_sequences(labels, -100)
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


class DAPOAdvantages(pl.LightningModule):
    """Stage 3 (``predict`` over ``AdvantageInputData``): one row per state (``ADVANTAGE_COLUMNS``).

    Q_i = V_φ(s∘a_i) from the exported ``critic``, or the true reward for a terminal candidate (known from
    the rollouts); Â_i = Q_i − mean_j Q_j; a state is kept when max Â − min Â ≥ ``min_gap``. For kept states
    the summed step log-probs of the ``reference`` policy (π_ref: the rollout policy) are cached, so the
    actor never loads π_ref. ``rows_per_forward`` bounds a forward pass; ``max_length`` is written to every
    row, and the actor's data refuses another (left truncation is shared, see ``state_action_tokens``).

    ``q_estimator="monte_carlo"`` is an ablation, not the paper's method: Q of a non-terminal candidate is
    the fraction of the rollout completions starting with it that ended correct (unbiased, but from few
    samples); it tells whether the critic or the rest of the pipeline limits the actor.
    """

    Q_ESTIMATORS = ("critic", "monte_carlo")

    def __init__(self, critic: str, reference: str, min_gap: float = 0.1, rows_per_forward: int = 64,
                 max_length: int = 512, dtype: str | None = None, attn_implementation: str | None = "sdpa",
                 trust_remote_code: bool = False, q_estimator: str = "critic"):
        super().__init__()
        if q_estimator not in self.Q_ESTIMATORS:
            raise ValueError(f"q_estimator must be one of {self.Q_ESTIMATORS}, got {q_estimator!r}")
        self.save_hyperparameters()
        self.q_estimator = q_estimator
        self.critic_path, self.reference_path = critic, reference
        self.min_gap, self.rows_per_forward, self.max_length = min_gap, rows_per_forward, max_length
        self.load_kwargs = dict(dtype=dtype, attn_implementation=attn_implementation,
                                trust_remote_code=trust_remote_code)
        self.tokenizer = lm.load_tokenizer(reference, trust_remote_code=trust_remote_code)
        self.critic_tokenizer = lm.load_tokenizer(critic, trust_remote_code=trust_remote_code)
        lm.ensure_distinct_pad_token(self.critic_tokenizer)
        self.critic_model = self.reference_model = None
        self.skip_keys: set[str] = set()
        self.num_skipped = 0

    def resume_mismatch(self, row: dict[str, Any]) -> tuple[str, Any, Any] | None:
        """(field, recorded, this run's) for the first model, window or Q estimator of an existing row that
        differs."""
        for name, expected in (("critic", self.critic_path), ("reference_policy", self.reference_path),
                               ("max_length", self.max_length)):
            if row.get(name) != expected and not (name == "max_length" and row.get(name) is None):
                return name, row.get(name), expected  # (rows written before max_length was recorded lack it)
        if bos_mismatch(row.get("bos_ids"), self.tokenizer):
            return "bos_ids", row.get("bos_ids"), cached_prefix_ids(self.tokenizer)
        for c, candidate in enumerate(row.get("candidates") or []):
            recorded = candidate.get("q_source") if isinstance(candidate, dict) else None
            if recorded not in ("reward", self.q_estimator):  # q_source names the estimator, or exact reward
                return f"candidates[{c}].q_source", recorded, self.q_estimator
        return None

    def on_predict_start(self) -> None:
        refuse_sharded_generation(self)

    def configure_model(self) -> None:
        if self.critic_model is None:
            self.critic_model = lm.load_model(self.critic_path, kind="sequence_classification",
                                              tokenizer=self.critic_tokenizer, **self.load_kwargs).eval()
            self.reference_model = lm.load_model(self.reference_path, kind="causal_lm", **self.load_kwargs).eval()

    @torch.no_grad()
    def critic_values(self, texts: list[tuple[str, str]]) -> list[float]:
        """V_φ of states given as (prompt_text, prefix)."""
        values: list[float] = []
        tok = self.critic_tokenizer
        for start in range(0, len(texts), self.rows_per_forward):
            ids = [state_tokens(tok, p, s, self.max_length)[0] for p, s in texts[start:start + self.rows_per_forward]]
            batch = padded_batch(ids, tok.pad_token_id, device=self.device)
            logits = self.critic_model(**batch).logits.squeeze(-1).float()
            values.extend(torch.sigmoid(logits).tolist())
        return values

    @torch.no_grad()
    def reference_logprobs(self, rows: list[tuple[str, str, str, bool]]) -> tuple[list[float], list[int]]:
        """Summed log π_ref(a|s) and token counts of (prompt_text, prefix, action, terminal) rows."""
        logps, lengths = [], []
        tok = self.tokenizer
        pad = padding_id(tok)
        for start in range(0, len(rows), self.rows_per_forward):
            encoded = [state_action_tokens(tok, *row, max_length=self.max_length)
                       for row in rows[start:start + self.rows_per_forward]]
            batch = padded_batch([e[0] for e in encoded], pad, [e[1] for e in encoded], device=self.device)
            logits = self.reference_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logps.extend(lm.sequence_logprob(logits, batch["labels"], "sum").tolist())
            lengths.extend(sum(label != -100 for label in e[1]) for e in encoded)
        return logps, lengths

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        states = [s for s in batch if s["state_id"] not in self.skip_keys]
        self.num_skipped += len(batch) - len(states)
        if not states:
            return []
        use_critic = self.q_estimator == "critic"
        queries = [(s["prompt_text"], s["prefix"] + c["action"]) for s in states for c in s["candidates"]
                   if use_critic and not c["terminal"]]
        values = iter(self.critic_values(queries + [(s["prompt_text"], s["prefix"]) for s in states]))
        q_values, q_sources, state_index = [], [], []
        for index, state in enumerate(states):
            for candidate in state["candidates"]:
                if candidate["terminal"]:  # the completion ended: its reward is known exactly
                    q_values.append(candidate["num_correct"] / candidate["count"])
                    q_sources.append("reward")
                elif use_critic:
                    q_values.append(next(values))
                    q_sources.append("critic")
                else:  # ablation: the fraction of the completions that started with it that ended correct
                    q_values.append(candidate["num_correct"] / candidate["count"])
                    q_sources.append("monte_carlo")
                state_index.append(index)
        state_values = list(values)  # V(s) of the states themselves, a diagnostic in either mode
        # float64 from the start: a float32 round trip gives Q = (0.2, 0.6, 1.0) a middle advantage of 1.5e-8, not 0
        advantages, gaps = sibling_advantages(torch.tensor(q_values, dtype=torch.float64), torch.tensor(state_index))
        kept = [(gaps[i].item() >= self.min_gap and len(s["candidates"]) >= 2) for i, s in enumerate(states)]
        ref_rows = [(s["prompt_text"], s["prefix"], c["action"], c["terminal"])
                    for s, keep in zip(states, kept) if keep for c in s["candidates"]]
        ref_logps, ref_lengths = self.reference_logprobs(ref_rows)
        ref_iter = iter(zip(ref_logps, ref_lengths))
        rows, flat = [], 0
        for index, state in enumerate(states):
            candidates = []
            for candidate in state["candidates"]:
                logp, length = next(ref_iter) if kept[index] else (None, None)
                candidates.append({"action": candidate["action"], "terminal": candidate["terminal"],
                                   "count": candidate["count"], "q": q_values[flat], "q_source": q_sources[flat],
                                   "advantage": advantages[flat].item(), "ref_logprob": logp, "num_tokens": length})
                flat += 1
            rows.append({"state_id": state["state_id"], "problem_id": state["problem_id"],
                         "prompt_text": state["prompt_text"], "prefix": state["prefix"], "depth": state["depth"],
                         "mc_value": state["mc_value"], "critic_value": state_values[index],
                         "gap": gaps[index].item(), "kept": kept[index], "candidates": candidates,
                         "critic": self.critic_path, "reference_policy": self.reference_path,
                         "max_length": self.max_length, "bos_ids": cached_prefix_ids(self.tokenizer)})
        return rows

    @staticmethod
    def dataset_report(rows: list[dict[str, Any]]) -> dict[str, Any]:
        kept = [r for r in rows if r["kept"]]
        candidates = [c for r in kept for c in r["candidates"]]
        return {
            "states": len(rows), "kept_states": len(kept), "dropped_states": len(rows) - len(kept),
            "dropped_single_candidate": sum(len(r["candidates"]) < 2 for r in rows),
            "kept_candidates": len(candidates), "candidates_per_kept_state": _mean([len(r["candidates"]) for r in kept]),
            "gap_mean_kept": _mean([r["gap"] for r in kept]),
            "abs_advantage_mean": _mean([abs(c["advantage"]) for c in candidates]),
            "terminal_candidates": sum(c["terminal"] for c in candidates),
            "critic_value_vs_mc_mae": _mean([abs(r["critic_value"] - r["mc_value"]) for r in rows]),
        }


# ====================================================================================================
# Stage 4: the actor


class DAPOActor(DAPOPolicy):
    """The policy trained with ``dapo_actor_loss`` (Eq. 12) on ``ActorData`` (the advantage file).

    Initialise from π_ref (the rollout policy's folder as ``model``); π_ref's log-probs come from the data,
    so only one model is in memory. ``beta``: the KL temperature (0.01 in the paper). Logs loss, sign
    accuracy and the mean log-ratio under train/ and val/. ``test`` (greedy pass@1) is inherited.
    """

    def __init__(self, beta: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.beta = beta

    def actor_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        policy_logps = lm.sequence_logprob(logits, batch["labels"], "sum")
        return dapo_actor_loss(policy_logps, batch["ref_logprob"], batch["advantage"], batch["state_index"], self.beta)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self.actor_loss(batch)
        states = int(batch["state_index"].max()) + 1
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=states)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _, metrics = self.actor_loss(batch)
        # a batch repeated only to give every DDP process the same step count weighs nothing: each state once
        states = 0 if batch.get("repeated") else int(batch["state_index"].max()) + 1
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, batch_size=states, sync_dist=True)
