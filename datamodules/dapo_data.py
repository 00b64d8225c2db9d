"""Data shapes of DAPO (``modules/dapo.py``): problems, reasoning steps, the rollout dataset, the advantage
dataset, and the state-wise batching of the actor.

Steps
-----
A response is split on single "\\n" (``split_steps``). Every step keeps its trailing "\\n", so the steps
concatenate back to the response exactly and a state is plain text: ``prompt_text + prefix`` with
``prefix = a_0 + ... + a_{t-1}``. Blank lines are not actions of their own: they join the next step (or
the last one at the end). A line longer than ``max_step_chars`` is cut into pieces of that many
characters (each piece is an action), so no action is unboundedly long. A response without a final
answer splits like any other; its reward is simply 0.

Token ids of a state and an action are always ``encode(prompt_text) + encode(prefix)`` and
``encode(action)`` (+ EOS for a terminal action: ending the response is part of that action), so the
completions of stage 1, the critic, the cached reference log-probs and the actor all condition on the same
state tokens, and π_ref and π_θ score the same action tokens. Those are the text's tokens: where the sampled
tokens do not survive decoding and re-encoding (bytes that are not valid UTF-8, special tokens, another BPE
segmentation) they differ from what the policy emitted; the rollout file counts such samples and
completions (``retokenized``, totalled in its report).

Datasets (JSONL; one row per problem or per state; the column lists are in ``ROLLOUT_COLUMNS`` and
``ADVANTAGE_COLUMNS`` and in the README):

* ``DAPOProblems``  - problems for stage 1 (``predict``: rollouts) and stage 5 (``test``: greedy pass@1).
* ``CriticData``    - stage 2: the states of a rollout file with their Monte-Carlo values.
* ``AdvantageInputData`` - stage 3: states and their candidate actions, to be scored.
* ``ActorData``     - stage 4: the advantage file, batched state-wise (``StateBatchSampler``).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset

from datamodules import arithmetic
from datamodules.common import (
    LOCAL_SUFFIXES,
    DataError,
    DataReport,
    LengthGroupedSampler,
    pad_sequences,
    padding_id,
    read_rows,
    row_error,
    truncate,
)
from datamodules.text import (
    TextDataModule,
    cached_prefix_ids,
    encode_text,
    leading_prefix_length,
    render_chat,
    validate_text,
    with_default_prefix,
)

STEP_SEPARATOR = "\n"

# ----------------------------------------------------------------------------------------------------
# Steps and selection (pure)


def split_steps(text: str, max_step_chars: int = 0) -> list[str]:
    """Split a response into steps on "\\n"; ``"".join(split_steps(text)) == text`` always holds.

    Each step keeps its trailing "\\n". Blank (whitespace-only) lines join the following step, or the last
    step when they trail. With ``max_step_chars > 0`` a longer step is cut into pieces of at most that many
    characters. The empty string has no steps.
    """
    if not text:
        return []
    lines = text.split(STEP_SEPARATOR)
    pieces = [line + STEP_SEPARATOR for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    steps: list[str] = []
    pending = ""
    for piece in pieces:
        if not piece.strip():
            pending += piece
            continue
        steps.append(pending + piece)
        pending = ""
    if pending:
        if steps:
            steps[-1] += pending
        else:
            steps.append(pending)
    if max_step_chars > 0:
        steps = [step[start:start + max_step_chars] for step in steps
                 for start in range(0, len(step), max_step_chars)]
    return steps


def first_step(completion: str, max_step_chars: int = 0) -> str:
    """The candidate action a completion starts with ("" for an empty completion)."""
    steps = split_steps(completion, max_step_chars)
    return steps[0] if steps else ""


def balanced_keep(rewards: Sequence[float], n: int) -> list[int]:
    """Indices of up to ``n`` responses, half correct (reward >= 0.5) and half wrong as far as possible.

    When one side has too few, the other fills the remaining places (n=6 with 1 correct: 1 + 5 wrong).
    The first responses of each kind are taken; the input order is the sampling order, i.e. random.
    """
    correct = [i for i, r in enumerate(rewards) if r >= 0.5]
    wrong = [i for i, r in enumerate(rewards) if r < 0.5]
    take_correct = min(len(correct), max((n + 1) // 2, n - len(wrong)))
    take_wrong = min(len(wrong), n - take_correct)
    return sorted(correct[:take_correct] + wrong[:take_wrong])


def state_prefixes(steps: Sequence[str]) -> list[str]:
    """The assistant text of every non-terminal state of a response: "", a_0, a_0+a_1, ..."""
    return ["".join(steps[:t]) for t in range(len(steps))]


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key``: assigns problems to train/val splits independently of order."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16 ** 12


# ----------------------------------------------------------------------------------------------------
# Tokens of states and actions


def encode_prompt(tokenizer, prompt_text: str) -> list[int]:
    """The prompt's ids, starting with the tokenizer's default BOS once (``with_default_prefix``)."""
    return with_default_prefix(tokenizer, encode_text(tokenizer, prompt_text))


def encode_state(tokenizer, prompt_text: str, prefix: str) -> list[int]:
    return encode_prompt(tokenizer, prompt_text) + (encode_text(tokenizer, prefix) if prefix else [])


def state_tokens(tokenizer, prompt_text: str, prefix: str, max_length: int) -> tuple[list[int], bool]:
    """The state's ids left-truncated to ``max_length`` with its BOS kept in front (what the critic scores
    in stages 2 and 3), and whether they were cut."""
    ids = encode_state(tokenizer, prompt_text, prefix)
    return truncate(ids, max_length, "left", leading_prefix_length(tokenizer, ids))


def bos_mismatch(recorded: Any, tokenizer) -> str | None:
    """Why states whose ref_logprob began with ``recorded`` (an advantage row's ``bos_ids``) do not encode
    as this tokenizer encodes them, or None. Files written before ``bos_ids`` was recorded lack it, and do
    not say whether their states began with a BOS: they pass only for a tokenizer that adds none."""
    if recorded is not None and not (isinstance(recorded, list) and all(type(i) is int for i in recorded)):
        return f"expected a list of token ids, got {recorded!r}"
    expected = cached_prefix_ids(tokenizer)
    if recorded is None and expected:
        return (f"this file predates bos_ids, so it does not say whether its ref_logprob were computed on states "
                f"beginning with the BOS {expected} that this tokenizer adds (older versions left it out, or lost it "
                f"when cutting a long state on the left); rerun stage 3 (advantages)")
    if recorded is not None and recorded != expected:
        return (f"ref_logprob were computed on states beginning with {recorded} and this tokenizer begins them "
                f"with {expected}: another tokenizer than stage 3's reference policy")
    return None


def encode_action(tokenizer, action: str, terminal: bool) -> list[int]:
    ids = encode_text(tokenizer, action) if action else []
    return ids + [tokenizer.eos_token_id] if terminal else ids


def state_action_tokens(tokenizer, prompt_text: str, prefix: str, action: str, terminal: bool,
                        max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of s∘a and labels (−100 except the action's tokens), left-truncated to ``max_length`` with
    the state's BOS kept in front.

    The one definition shared by the cached reference log-probs (stage 3) and the actor (stage 4), so
    log π_θ − log π_ref compares the same tokens.
    """
    state_ids = encode_state(tokenizer, prompt_text, prefix)
    action_ids = encode_action(tokenizer, action, terminal)
    bos = leading_prefix_length(tokenizer, state_ids)
    ids, _ = truncate(state_ids + action_ids, max_length, "left", bos)
    labels, _ = truncate([-100] * len(state_ids) + action_ids, max_length, "left", bos)
    return ids, labels


def prompt_text_for(tokenizer, prompt: str, use_chat_template: bool) -> str:
    """What the policy is conditioned on: the chat template with the generation prompt, or the raw prompt."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
    return prompt


# ----------------------------------------------------------------------------------------------------
# Dataset files

# The one definition of the dataset columns: the README's tables are generated from these
# (``print(columns_markdown())``) and a test checks that written rows have exactly these columns.
# "a[].b" is field b of every element of list a.
ROLLOUT_COLUMNS = {
    "problem_id": "str, unique key of the problem (a restart skips ids already written)",
    "task_kind": "'arithmetic', 'math' or 'code': how `datamodules.verifiers.reward` checks an answer",
    "prompt": "str, the problem as given",
    "prompt_text": "str, the exact text the policy is conditioned on (chat template + generation prompt)",
    "reference": "the gold answer (int or str) or the unit tests (HumanEval prompt, test and entry point)",
    "policy": "str, the generator = completer = pi_ref (model name or folder)",
    "samples": "list, the n1 sampled responses, de-duplicated",
    "samples[].text": "str, the response",
    "samples[].reward": "float, 1.0 correct, 0.0 wrong",
    "samples[].count": "int, how many of the n1 samples had this text",
    "samples[].finished": "bool, ended with EOS (false: cut at max_new_tokens)",
    "samples[].retokenized": "int, of the count, samples whose text encodes to other tokens than were sampled "
                             "(invalid UTF-8, dropped special tokens, another BPE segmentation)",
    "num_samples": "int, n1",
    "num_kept": "int, n: the most responses kept (fewer when the samples hold too few distinct ones)",
    "max_step_chars": "int, the longest step before a line is cut into pieces (0: a step is a line)",
    "sample_accuracy": "float, fraction of the n1 samples that are correct",
    "kept": "list of int, indices into samples of the n kept responses (balanced correct / wrong)",
    "states": "list, every distinct step-prefix state of the kept responses (the prompt alone first)",
    "states[].prefix": "str, the steps a_0..a_{depth-1} concatenated, each with its newline; the state's text "
                       "is prompt_text + prefix",
    "states[].depth": "int, number of steps in prefix",
    "states[].num_completions": "int, m: completions sampled from the state",
    "states[].num_correct": "int, completions that ended correct",
    "states[].mc_value": "float, num_correct / num_completions: the critic's target",
    "states[].candidates": "list, the distinct first steps of the m completions",
    "states[].candidates[].action": "str, the step (with its newline unless the response ended there)",
    "states[].candidates[].terminal": "bool, the completion ended (EOS) right after this step, so its reward "
                                      "is exact",
    "states[].candidates[].count": "int, completions that started with this step",
    "states[].candidates[].num_correct": "int, of those, the ones that ended correct",
    "states[].candidates[].truncated": "int, of those, the ones cut at the token limit inside this step",
    "states[].candidates[].retokenized": "int, of those, the ones whose text encodes to other tokens than were "
                                         "sampled: later stages score the re-encoded text",
}

ADVANTAGE_COLUMNS = {
    "state_id": "str, '<problem_id>/<index of the state in the rollout row>'",
    "problem_id": "str",
    "prompt_text": "str, as in the rollouts",
    "prefix": "str, as in the rollouts",
    "depth": "int, as in the rollouts",
    "mc_value": "float, as in the rollouts",
    "critic_value": "float, the critic's V(s) of the state itself (a diagnostic; not used by the actor)",
    "gap": "float, max advantage - min advantage over the state's candidates",
    "kept": "bool, gap >= min_gap (0.1) and at least 2 candidates: only kept states train the actor",
    "critic": "str, the critic model",
    "reference_policy": "str, the pi_ref model",
    "max_length": "int, the token window (left-truncated) of ref_logprob: the actor's data must use the same",
    "bos_ids": "list of int, the tokenizer's default BOS that began every state when ref_logprob was computed "
               "(empty for a tokenizer without one): the actor's tokenizer must begin them alike",
    "candidates": "list, the state's candidates in the rollout file's order",
    "candidates[].action": "str, as in the rollouts",
    "candidates[].terminal": "bool, as in the rollouts",
    "candidates[].count": "int, as in the rollouts",
    "candidates[].q": "float, Q(s, a): the critic's V(s + action), or the true reward of a terminal action",
    "candidates[].q_source": "'critic' or 'reward' ('monte_carlo' in the q_estimator ablation: the fraction "
                             "of the rollout completions starting with the action that ended correct)",
    "candidates[].advantage": "float, q - mean q over the state's candidates",
    "candidates[].ref_logprob": "float, sum of pi_ref's token log-probs of the action (EOS included when "
                                "terminal); null for states not kept",
    "candidates[].num_tokens": "int, tokens of the action (EOS included when terminal); null for states "
                               "not kept",
}


def columns_markdown() -> str:
    """The README's tables of the rollout and advantage columns, generated from the two dicts above."""
    lines = []
    for title, columns in (("Rollout dataset (stage 1), one row per problem", ROLLOUT_COLUMNS),
                           ("Advantage dataset (stage 3), one row per state", ADVANTAGE_COLUMNS)):
        lines += [f"{title}:", "", "| column | meaning |", "|---|---|"]
        lines += [f"| `{name}` | {text.replace('|', '/')} |" for name, text in columns.items()]
        lines.append("")
    return "\n".join(lines)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a DAPO dataset file (JSONL as the stages write it; JSON or Parquet also read). A malformed line
    is an error naming the file and line (``datamodules.common.read_rows``)."""
    if Path(path).suffix not in LOCAL_SUFFIXES:  # read_rows would take any other name for a hub dataset
        raise DataError(f"{path}: a DAPO dataset file must end in {', '.join(sorted(LOCAL_SUFFIXES))}")
    return read_rows(str(path))


def _field(row: dict, source: str, index: int, name: str, kind: type | tuple[type, ...], where: str = "") -> Any:
    """``row[name]`` checked against ``kind``; errors name the field as ``where + name``."""
    label = f"{where}.{name}" if where else name
    if name not in row or row[name] is None:
        raise row_error(source, index, label, "missing")
    value = row[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise row_error(source, index, label, f"expected {expected}, got {type(value).__name__}")
    return value


def _check_unique(first_rows: dict[str, int], key: str, source: str, index: int, name: str) -> None:
    """Raise when ``key`` was already seen: later stages key their output rows by it, so one would be lost."""
    first = first_rows.setdefault(key, index)
    if first != index:  # one drop reason for every repeat, not one per id
        raise DataError(f"{source}: row {index}, field '{name}': '{key}' is also the {name} of row {first}",
                        reason=f"{name}: repeats an earlier row's")


def _count(row: dict, source: str, index: int, name: str, where: str, low: int,
           high: tuple[str, int] | None = None) -> int:
    """An int field at least ``low`` and, with ``high = (name, value)``, at most that other field's value."""
    value = _field(row, source, index, name, int, where)
    if value < low or (high is not None and value > high[1]):
        allowed = f"in [{low}, {high[0]}={high[1]}]" if high is not None else f"at least {low}"
        raise row_error(source, index, f"{where}.{name}", f"must be {allowed}, got {value}")
    return value


def validate_rollout_row(row: dict, source: str, index: int) -> dict:
    """Check the columns the later stages read; raise ``DataError`` naming the file, row and field."""
    _field(row, source, index, "problem_id", str)
    if not _field(row, source, index, "prompt_text", str).strip():
        raise row_error(source, index, "prompt_text", "empty")
    states = _field(row, source, index, "states", list)
    for s, state in enumerate(states):
        where = f"states[{s}]"
        if not isinstance(state, dict):
            raise row_error(source, index, where, f"expected an object, got {type(state).__name__}")
        _field(state, source, index, "prefix", str, where)
        mc_value = _field(state, source, index, "mc_value", float, where)
        num_completions = _count(state, source, index, "num_completions", where, 1)
        num_correct = _count(state, source, index, "num_correct", where, 0, ("num_completions", num_completions))
        candidates = _field(state, source, index, "candidates", list, where)
        # the critic's target and its AUROC labels (num_correct of num_completions) must tell the same story
        if not abs(mc_value - num_correct / num_completions) <= 1e-6:
            raise row_error(source, index, f"{where}.mc_value", f"{mc_value} is not num_correct / num_completions "
                                                                 f"= {num_correct}/{num_completions}")
        if not candidates:
            raise row_error(source, index, f"{where}.candidates", "empty (every completion starts with a step)")
        for c, candidate in enumerate(candidates):
            cwhere = f"{where}.candidates[{c}]"
            if not isinstance(candidate, dict):
                raise row_error(source, index, cwhere, f"expected an object, got {type(candidate).__name__}")
            _field(candidate, source, index, "action", str, cwhere)
            _field(candidate, source, index, "terminal", bool, cwhere)
            count = _count(candidate, source, index, "count", cwhere, 1)
            _count(candidate, source, index, "num_correct", cwhere, 0, ("count", count))
            for optional in ("truncated", "retokenized"):
                if candidate.get(optional) is not None:
                    _count(candidate, source, index, optional, cwhere, 0, ("count", count))
    return row


def read_rollouts(path: str | Path) -> list[dict[str, Any]]:
    source = str(path)
    rows, first_rows = read_jsonl(path), {}
    for index, row in enumerate(rows):
        validate_rollout_row(row, source, index)
        _check_unique(first_rows, row["problem_id"], source, index, "problem_id")
    return rows


# ----------------------------------------------------------------------------------------------------
# Stage 1 and 5: problems


_INTEGER_TEXT = re.compile(r"[+-]?\d+")


def checked_reference(task_kind: str, value: Any, source: str, index: int, field_name: str) -> Any:
    """The gold answer as ``verifiers.reward`` expects it for ``task_kind`` (an arithmetic answer as an int).

    Checked when the problems are loaded: otherwise a bad answer is coerced (3.7 -> 3, true -> 1) or fails
    inside the reward, after the batch's generation was spent, naming no file or row.
    """
    def bad(rule: str) -> DataError:
        error = row_error(source, index, field_name, f"{rule}, got {value!r:.80}")
        error.reason = f"{field_name}: {rule}"  # dropped rows are counted by rule, not by value
        return error

    if task_kind == "arithmetic":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value.strip()):
            return int(value)
        raise bad("an arithmetic answer must be an integer")
    if task_kind == "math":
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return str(value)
        raise bad("a math answer must be a non-empty string or a finite number")
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, dict) and all(isinstance(value.get(key), str) for key in ("prompt", "test", "entry_point")):
        return value
    raise bad("code tests must be a string of test code or an object with string 'prompt', 'test' and 'entry_point'")


class DAPOProblems(TextDataModule):
    """Problems to roll out (``predict``) and held-out problems to evaluate (``test``).

    Embedded default: the arithmetic task, drawn exactly as ``SFTData`` draws it (``train_size``,
    ``val_size``, ``test_size`` and ``seed`` must equal the SFT run's, so ``test`` is the SFT held-out set),
    plus a disjoint ``rollout`` split drawn after them: problems the policy never saw in SFT.
    ``rollout_offset``/``rollout_size`` pick a slice of it.

    ``eval_split``: what ``test`` evaluates, ``test`` (default) or ``val`` (the SFT validation problems, or
    ``val_file``): tune on ``val``, report ``test``. Files: ``train_file`` holds the problems to roll out,
    ``test_file`` (``val_file``) the evaluation problems (JSON, JSONL or Parquet). ``row_format``: ``plain`` (``prompt_field`` + ``answer_field``, optional ``id_field``),
    ``math`` (MATH ``problem``/``solution`` with a boxed answer), ``gsm8k`` (``question``/``answer`` ending
    in "#### N"), ``humaneval`` (``task_id``, ``prompt``, ``test``, ``entry_point``; the response continues the
    prompt). ``task_kind`` selects the answer check (``datamodules.verifiers.reward``); the gold answer is checked
    for it when loaded (``checked_reference``: an integer for ``arithmetic``), a bad one is an error or, with
    ``invalid_rows='drop'``, dropped and counted.

    Batches: ``problem_id``, ``prompt``, ``prompt_text``, ``prompt_ids`` (lists, unpadded), ``reference``,
    ``task_kind``.
    """

    ROW_FORMATS = ("plain", "math", "gsm8k", "humaneval")

    def __init__(self, task_kind: str = "arithmetic", row_format: str = "plain", prompt_field: str = "prompt",
                 answer_field: str = "answer", id_field: str = "id", use_chat_template: bool = True,
                 train_size: int = 6000, val_size: int = 256, test_size: int = 500, rollout_size: int = 256,
                 rollout_offset: int = 0, min_steps: int = 2, max_steps: int = 3, eval_split: str = "test",
                 **kwargs):
        kwargs.setdefault("batch_size", 8)
        kwargs.setdefault("val_split", None)
        super().__init__(**kwargs)
        from datamodules.verifiers import TASK_KINDS

        if task_kind not in TASK_KINDS:
            raise ValueError(f"task_kind must be one of {TASK_KINDS}, got {task_kind!r}")
        if row_format not in self.ROW_FORMATS:
            raise ValueError(f"row_format must be one of {self.ROW_FORMATS}, got {row_format!r}")
        self.task_kind, self.row_format = task_kind, row_format
        self.prompt_field, self.answer_field, self.id_field = prompt_field, answer_field, id_field
        self._first_row_of_id: dict[str, dict[str, int]] = {}  # source -> problem_id -> first row
        self.use_chat_template = use_chat_template
        self.sizes = {"train": train_size, "val": val_size, "test": test_size, "rollout": rollout_offset + rollout_size}
        self.rollout_offset = rollout_offset
        self.arithmetic_steps = (min_steps, max_steps)
        if eval_split not in ("test", "val"):
            raise ValueError(f"eval_split must be 'test' or 'val', got {eval_split!r}")
        self.eval_split = eval_split  # 'val': tune on the SFT validation problems, keep 'test' for the report
        self._arithmetic: dict[str, list[arithmetic.Problem]] | None = None

    def embedded_rows(self, split: str) -> list[dict[str, Any]] | None:
        if self._arithmetic is None:
            self._arithmetic = arithmetic.generate_splits(self.sizes, seed=self.seed, min_steps=self.arithmetic_steps[0],
                                                          max_steps=self.arithmetic_steps[1])
        if split == "predict":
            problems = self._arithmetic["rollout"][self.rollout_offset:]
            return [dict(p.as_row(), id=f"rollout-{self.rollout_offset + i:06d}") for i, p in enumerate(problems)]
        problems = self._arithmetic.get(split, [])
        return [dict(p.as_row(), id=f"{split}-{i:06d}") for i, p in enumerate(problems)] or None

    def source_rows(self, split: str):
        if split == "predict":  # rollouts read the training problems
            if self.files["train"]:
                return read_rows(self.files["train"]), self.files["train"]
            if self.dataset:
                return read_rows(self.dataset, self.hub_splits["train"], self.dataset_config), \
                    f"{self.dataset}[{self.hub_splits['train']}]"
            return self.embedded_rows("predict"), "embedded:DAPOProblems[rollout]"
        return super().source_rows(split)

    def encode(self, row: dict[str, Any], split: str, source: str, index: int) -> dict[str, Any] | None:
        from datamodules import verifiers

        row_id = f"{source}:{index}"
        try:
            if self.row_format == "math":
                problem = verifiers.math_problem_from_row(row, row_id)
                prompt, reference = problem.question, problem.answer
            elif self.row_format == "gsm8k":
                problem = verifiers.gsm8k_problem_from_row(row, row_id)
                prompt, reference = problem.question, problem.answer
            elif self.row_format == "humaneval":
                for name in ("prompt", "test", "entry_point"):
                    validate_text(row.get(name), source, index, name)
                prompt = row["prompt"]
                reference = {key: row[key] for key in ("prompt", "test", "entry_point")}
            else:
                prompt = validate_text(row.get(self.prompt_field), source, index, self.prompt_field)
                if self.answer_field not in row or row[self.answer_field] is None:
                    raise row_error(source, index, self.answer_field, "missing")
                reference = row[self.answer_field]
        except verifiers.RowFormatError as error:
            raise DataError(f"{source}: {error}", reason=str(error).split(": ", 1)[-1]) from None
        answer_field = {"plain": self.answer_field, "math": "solution", "gsm8k": "answer", "humaneval": "test"}
        reference = checked_reference(self.task_kind, reference, source, index, answer_field[self.row_format])
        problem_id = row.get(self.id_field) if self.row_format != "humaneval" else row.get("task_id")
        problem_id = str(problem_id) if problem_id is not None else f"{Path(source).name}:{index}"
        _check_unique(self._first_row_of_id.setdefault(source, {}), problem_id, source, index,
                      "task_id" if self.row_format == "humaneval" else self.id_field)
        prompt_text = prompt_text_for(self.tokenizer, prompt, self.use_chat_template and self.row_format != "humaneval")
        prompt_ids = encode_prompt(self.tokenizer, prompt_text)
        if len(prompt_ids) > self.max_length:
            self.report.drop(split, "prompt longer than max_length")
            return None
        return {"problem_id": problem_id, "prompt": prompt, "prompt_text": prompt_text, "prompt_ids": prompt_ids,
                "reference": reference, "task_kind": self.task_kind}

    def setup(self, stage: str) -> None:
        self.resolve_tokenizer()
        split = {"predict": "predict", "test": self.eval_split, "validate": self.eval_split}.get(stage)
        if split is None:
            raise ValueError(f"DAPOProblems serves 'predict' (rollouts) and 'test' (evaluation), not {stage!r}")
        if split not in self.datasets:
            loaded = self.load_split(split)
            if loaded is None:
                raise DataError(f"no problems for '{stage}': set {'train_file' if split == 'predict' else split + '_file'}")
            self.datasets[split] = loaded
        rank_zero_info(f"[DAPOProblems] rows: {self.report.rows}; dropped: {self.report.dropped}")

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {key: [item[key] for item in items] for key in items[0]}

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["predict"], batch_size=self.batch_size, shuffle=False, collate_fn=self.collate,
                          num_workers=self.num_workers)

    def val_dataloader(self):
        return []

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets[self.eval_split], batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self.collate, num_workers=self.num_workers)


# ----------------------------------------------------------------------------------------------------
# Shared by the stages that read a rollout or advantage file


class _StatesData(pl.LightningDataModule):
    """Reads one JSONL dataset, splits problems into train/val by a hash of their id, pads batches."""

    def __init__(self, data_file: str, val_fraction: float = 0.1, max_length: int = 512, batch_size: int = 32,
                 eval_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 tokenizer: str | None = None):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.data_file, self.val_fraction, self.max_length = data_file, val_fraction, max_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed, self.tokenizer_name = num_workers, seed, tokenizer
        self.tokenizer = None
        self.report = DataReport()
        self.datasets: dict[str, list] = {}

    resolve_tokenizer = TextDataModule.resolve_tokenizer  # the model's tokenizer, else ``tokenizer`` by name
    pads_batches = False  # padding is masked here (padding_id); CriticData, whose value is pooled, needs a pad token

    def split_of(self, problem_id: str) -> str:
        return "val" if stable_fraction(f"{self.seed}:{problem_id}") < self.val_fraction else "train"

    def count_truncated(self, split: str) -> None:
        self.report.truncated[split] = self.report.truncated.get(split, 0) + 1

    @property
    def data_report(self) -> dict[str, Any]:
        return self.report.as_dict()


# ----------------------------------------------------------------------------------------------------
# Stage 2: the critic's states


class CriticData(_StatesData):
    """States of a rollout file (``data_file``) with their Monte-Carlo values, for the critic.

    Items: ``input_ids`` (prompt + prefix, left-truncated to ``max_length`` so the last token, where the
    value is read, is kept), ``target`` = mc_value, ``num_correct`` and ``num_completions`` (for the AUROC of
    predicting whether a trajectory sampled from the state ends correct). Problems go to ``val`` with
    probability ``val_fraction`` (by a hash of their id). ``group_by_length``: training batches of states
    of similar length (see ``TextDataModule``).
    """

    pads_batches = True  # the critic reads the value at the last non-pad token (DAPOCritic gives its own)

    def __init__(self, *args: Any, group_by_length: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.group_by_length = group_by_length

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        tokenizer = self.resolve_tokenizer()
        rows = read_rollouts(self.data_file)
        if not rows:
            raise DataError(f"{self.data_file}: no rollouts")
        self.datasets = {"train": [], "val": []}
        for row in rows:
            split = self.split_of(row["problem_id"])
            for state in row["states"]:
                ids, was_truncated = state_tokens(tokenizer, row["prompt_text"], state["prefix"], self.max_length)
                if was_truncated:
                    self.count_truncated(split)
                self.datasets[split].append({"input_ids": ids, "target": float(state["mc_value"]),
                                             "num_correct": state["num_correct"],
                                             "num_completions": state["num_completions"]})
        for split, items in self.datasets.items():
            self.report.rows[split] = len(items)
            for row_id, item in enumerate(items):  # so validation under DDP counts each state once
                item["row_id"] = row_id
        if stage == "fit" and not self.datasets["train"]:
            raise DataError(f"{self.data_file}: no training states (all {len(rows)} problems went to val)")
        rank_zero_info(f"[CriticData] states: {self.report.rows}; truncated: {self.report.truncated}")

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": pad_sequences([item["input_ids"] for item in items], pad),
            "attention_mask": pad_sequences([[1] * len(item["input_ids"]) for item in items], 0),
            "target": torch.tensor([item["target"] for item in items]),
            "num_correct": torch.tensor([item["num_correct"] for item in items], dtype=torch.float),
            "num_completions": torch.tensor([item["num_completions"] for item in items], dtype=torch.float),
            "row_id": torch.tensor([item["row_id"] for item in items], dtype=torch.long),
        }

    def train_dataloader(self) -> DataLoader:
        from datamodules.common import training_loader

        data = self.datasets["train"]
        lengths = [len(item["input_ids"]) for item in data] if self.group_by_length else None
        return training_loader(data, self.batch_size, self.collate, self.seed, self.trainer, self.num_workers, lengths)

    def val_dataloader(self):
        if not self.datasets.get("val"):
            return []
        return DataLoader(self.datasets["val"], batch_size=self.eval_batch_size, collate_fn=self.collate,
                          num_workers=self.num_workers)


# ----------------------------------------------------------------------------------------------------
# Stage 3: states and candidates to score


class AdvantageInputData(_StatesData):
    """The states of a rollout file (``data_file``) with their candidate actions, for ``predict``.

    Batches are lists of states (``batch_size`` states each); the scoring module tokenizes. States whose
    candidates are all alike (fewer than 2 candidates) are still passed on: they get gap 0 and are
    recorded as dropped, so the advantage file accounts for every state.
    """

    def __init__(self, data_file: str, batch_size: int = 16, **kwargs):
        kwargs.setdefault("val_fraction", 0.0)
        super().__init__(data_file, batch_size=batch_size, **kwargs)

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        self.resolve_tokenizer()
        rows = read_rollouts(self.data_file)
        states = []
        for row in rows:
            for index, state in enumerate(row["states"]):
                states.append({"state_id": f"{row['problem_id']}/{index}", "problem_id": row["problem_id"],
                               "prompt_text": row["prompt_text"], "prefix": state["prefix"],
                               "depth": state.get("depth", index), "mc_value": state["mc_value"],
                               "candidates": state["candidates"]})
        self.datasets = {"predict": states}
        self.report.rows["predict"] = len(states)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["predict"], batch_size=self.batch_size, shuffle=False,
                          collate_fn=lambda items: items, num_workers=self.num_workers)


# ----------------------------------------------------------------------------------------------------
# Stage 4: the actor's state-wise batches


class StateBatchSampler:
    """Batches of whole states: all candidates of a state are always in the same batch.

    ``states_per_batch`` states per batch, in a permutation fixed by (seed, epoch) when ``shuffle``. Under
    DDP each of ``num_replicas`` processes takes every ``num_replicas``-th batch starting at its ``rank``;
    the batch list is padded by repeating its last batches (or cut, with ``drop_last``) so every process
    runs the same number of steps. Yields lists of state indices.

    ``lengths`` (one per state, when shuffling): the permutation is a ``LengthGroupedSampler``'s, whose groups
    are the ``num_replicas`` batches of one step, so the processes of a step pad to similar widths.
    """

    def __init__(self, num_states: int, states_per_batch: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 lengths: Sequence[int] | None = None):
        if states_per_batch <= 0:
            raise ValueError(f"states_per_batch must be positive, got {states_per_batch}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if num_states == 0:
            raise ValueError("no states to batch")
        if lengths is not None and len(lengths) != num_states:
            raise ValueError(f"{len(lengths)} lengths for {num_states} states")
        self.num_states, self.states_per_batch = num_states, states_per_batch
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.grouped = LengthGroupedSampler(lengths, states_per_batch * num_replicas, seed,
                                            epoch_source=lambda: self.epoch) if lengths is not None else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        if self.shuffle and self.grouped is not None:
            order = list(self.grouped)
        elif self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_states, generator=generator).tolist()
        else:
            order = list(range(self.num_states))
        return [order[i:i + self.states_per_batch] for i in range(0, self.num_states, self.states_per_batch)]

    def __len__(self) -> int:
        batches = math.ceil(self.num_states / self.states_per_batch)
        return batches // self.num_replicas if self.drop_last else math.ceil(batches / self.num_replicas)

    def batches_with_repeats(self) -> Iterator[tuple[list[int], bool]]:
        """This process's batches, each with whether it repeats a batch to pad the processes' step counts."""
        batches = self._all_batches()
        real = len(batches)
        total = len(self) * self.num_replicas
        if total > real:  # pad: every process must take the same number of steps; repeat the last batches
            # (the shortest ones, where lengths group them: the longest group comes first)
            batches = batches + [batches[(real - 1 - i) % real] for i in range(total - real)]
        return ((batches[i], i >= real) for i in range(self.rank, total, self.num_replicas))

    def __iter__(self) -> Iterator[list[int]]:
        return (indices for indices, _ in self.batches_with_repeats())


class _StateBatches(IterableDataset):
    """Collated batches from a ``StateBatchSampler``. Being iterable, Lightning leaves the sharding to the
    sampler instead of inserting a per-item ``DistributedSampler`` that would split states apart. A batch that
    only pads a process's step count carries ``repeated: True`` (evaluation gives it no weight)."""

    def __init__(self, states: list, sampler: StateBatchSampler, collate, epoch_source=None):
        self.states, self.sampler, self.collate, self.epoch_source = states, sampler, collate, epoch_source

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        if self.epoch_source is not None:
            self.sampler.set_epoch(self.epoch_source())
        for indices, repeated in self.sampler.batches_with_repeats():
            yield {**self.collate([self.states[i] for i in indices]), "repeated": repeated}


class ActorData(_StatesData):
    """The advantage file (``data_file``) for the actor, batched state-wise.

    Keeps states with ``kept`` true, a gap of at least ``min_gap`` and at least two candidates with a cached
    ``ref_logprob``; drops and counts the rest. A state's candidates are weighted uniformly (each state
    counts once in the loss, see ``modules.dapo.dapo_actor_loss``). Each batch holds ``batch_size`` whole
    states (``StateBatchSampler``), sharded across DDP processes by the sampler.

    Batch tensors (one row per candidate): ``input_ids``, ``attention_mask``, ``labels`` (-100 except the
    action's tokens), ``advantage``, ``ref_logprob``, ``state_index`` (0..states-1 within the batch).

    ``group_by_length``: training batches of states whose longest candidates have similar lengths (as
    ``CriticData``'s), so the batch pads less.
    """

    def __init__(self, data_file: str, min_gap: float = 0.1, batch_size: int = 8, group_by_length: bool = False,
                 **kwargs):
        super().__init__(data_file, batch_size=batch_size, **kwargs)
        self.min_gap, self.group_by_length = min_gap, group_by_length

    def encode_state_row(self, row: dict, split: str, source: str, index: int) -> dict | None:
        for name, kind in (("state_id", str), ("prompt_text", str), ("prefix", str), ("candidates", list)):
            _field(row, source, index, name, kind)
        kept = _field(row, source, index, "kept", bool)
        gap = _field(row, source, index, "gap", float)
        if not math.isfinite(gap) or gap < 0:
            raise row_error(source, index, "gap", f"expected a finite number >= 0, got {gap}")
        for c, candidate in enumerate(row["candidates"]):
            where = f"candidates[{c}]"
            if not isinstance(candidate, dict):
                raise row_error(source, index, where, f"expected an object, got {type(candidate).__name__}")
            _field(candidate, source, index, "action", str, where)
            if candidate.get("terminal") is not None:  # absent: not terminal (hand-written files omit it)
                _field(candidate, source, index, "terminal", bool, where)
        window = row.get("max_length")  # absent in files written before it was recorded
        if window is not None and window != self.max_length:
            raise row_error(source, index, "max_length", f"ref_logprob was computed in a window of {window} tokens "
                            f"and this actor data has max_length {self.max_length}: with another window a long "
                            f"state's π_θ and π_ref see different context (set --data.init_args.max_length={window})")
        mismatch = bos_mismatch(row.get("bos_ids"), self.tokenizer)
        if mismatch:
            raise row_error(source, index, "bos_ids", mismatch)
        if gap < self.min_gap:
            self.report.drop(split, f"advantage gap below {self.min_gap}")
            return None
        if not kept:  # e.g. a single candidate, or stage 3 ran with a higher min_gap
            self.report.drop(split, "kept is false in the advantage file")
            return None
        state_ids = encode_state(self.tokenizer, row["prompt_text"], row["prefix"])
        bos = leading_prefix_length(self.tokenizer, state_ids)  # kept in front when the window cuts the state
        candidates = []
        for c, candidate in enumerate(row["candidates"]):
            where = f"candidates[{c}]"
            for name in ("advantage", "ref_logprob"):
                value = candidate.get(name)
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                    raise row_error(source, index, f"{where}.{name}", f"expected a finite number, got {value!r}")
            if candidate["ref_logprob"] > 0:  # a summed log-probability cannot exceed 0
                raise row_error(source, index, f"{where}.ref_logprob",
                                f"{candidate['ref_logprob']!r} > 0 is not a log-probability")
            terminal = bool(candidate.get("terminal"))
            if not candidate["action"] and not terminal:
                # nothing to score: a completion cut before its first character (e.g. only dropped special
                # tokens); stage 1 writes it like any candidate, so it is counted here, not refused
                self.report.drop(split, "candidate with an empty non-terminal action")
                continue
            action_length = len(encode_action(self.tokenizer, candidate["action"], terminal))
            if action_length + bos >= self.max_length:
                self.report.drop(split, "action leaves no room for its state within max_length")
                return None
            if len(state_ids) + action_length > self.max_length:
                self.count_truncated(split)
            ids, labels = state_action_tokens(self.tokenizer, row["prompt_text"], row["prefix"], candidate["action"],
                                              terminal, self.max_length)
            candidates.append({"input_ids": ids, "labels": labels, "advantage": float(candidate["advantage"]),
                               "ref_logprob": float(candidate["ref_logprob"])})
        if len(candidates) < 2:
            self.report.drop(split, "fewer than 2 candidates")
            return None
        return {"state_id": row["state_id"], "candidates": candidates}

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        self.resolve_tokenizer()
        rows = read_jsonl(self.data_file)
        self.datasets = {"train": [], "val": []}
        first_rows: dict[str, int] = {}
        for index, row in enumerate(rows):
            state_id = _field(row, self.data_file, index, "state_id", str)
            _check_unique(first_rows, state_id, self.data_file, index, "state_id")
            split = self.split_of(str(row.get("problem_id", state_id)))
            state = self.encode_state_row(row, split, self.data_file, index)
            if state is not None:
                self.datasets[split].append(state)
        for split, items in self.datasets.items():
            self.report.rows[split] = len(items)
        if stage == "fit" and not self.datasets["train"]:
            raise DataError(f"{self.data_file}: no state left for training; dropped: {self.report.dropped}")
        rank_zero_info(f"[ActorData] states: {self.report.rows}; dropped: {self.report.dropped}; "
                       f"truncated: {self.report.truncated}")

    def collate(self, states: list[dict]) -> dict[str, torch.Tensor]:
        rows = [(index, candidate) for index, state in enumerate(states) for candidate in state["candidates"]]
        pad = padding_id(self.tokenizer)  # masked (attention 0, label -100): EOS serves a tokenizer without one
        return {
            "input_ids": pad_sequences([c["input_ids"] for _, c in rows], pad),
            "attention_mask": pad_sequences([[1] * len(c["input_ids"]) for _, c in rows], 0),
            "labels": pad_sequences([c["labels"] for _, c in rows], -100),
            "advantage": torch.tensor([c["advantage"] for _, c in rows]),
            "ref_logprob": torch.tensor([c["ref_logprob"] for _, c in rows]),
            "state_index": torch.tensor([index for index, _ in rows]),
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        states = self.datasets[split]
        lengths = ([max(len(candidate["input_ids"]) for candidate in state["candidates"]) for state in states]
                   if shuffle and self.group_by_length else None)
        sampler = StateBatchSampler(len(states), self.batch_size if shuffle else self.eval_batch_size,
                                    num_replicas=world, rank=rank, shuffle=shuffle, seed=self.seed, lengths=lengths)
        epoch_source = (lambda: trainer.current_epoch) if trainer is not None and shuffle else None
        batches = _StateBatches(states, sampler, self.collate, epoch_source)
        if shuffle:  # training: resumable mid-epoch
            from datamodules.common import ResumableDataLoader

            return ResumableDataLoader(batches, batch_size=None, num_workers=0, trainer=trainer)
        return DataLoader(batches, batch_size=None, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False) if self.datasets.get("val") else []


# ----------------------------------------------------------------------------------------------------
# The rejection-sampling fine-tuning baseline


def rejection_sampling_rows(rollout_rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """SFT rows ``{prompt, response}`` from the distinct correct sampled responses of a rollout file (the
    RFT baseline trains on exactly the stage-1 data DAPO uses)."""
    rows = []
    for row in rollout_rows:
        for sample in row.get("samples", []):
            if sample["reward"] >= 0.5 and sample["text"].strip():
                rows.append({"prompt": row["prompt"], "response": sample["text"], "problem_id": row["problem_id"]})
    return rows
