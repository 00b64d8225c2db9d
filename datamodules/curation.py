"""Skywork-Reward data curation as stages that read a preference dataset and write a new one plus a report.

Every stage takes rows of any of the four preference shapes (see ``datamodules/preference.py``) from a
JSONL/JSON/Parquet file and writes the rows it kept (same shape, same columns) and a JSON report of what it
kept and removed, per source and per reason. The stages, in the order the Skywork-Reward paper applies them
to its 378K pool:

| stage | keeps |
|---|---|
| ``DropInvalid`` | pairs that pass the reward datamodule's rules (``preference.validate_pair``: no missing/empty side, known roles, chosen != rejected) |
| ``Deduplicate`` | the first of identical pairs (exactly, or after collapsing whitespace) |
| ``Decontaminate`` | pairs whose prompt shares no run of ``ngram`` words (default 8: "more than 7") with an evaluation prompt, contains no whole shorter one of at least ``min_short_prompt_words`` (4) words, and equals no shorter one |
| ``ConsistencyFilter`` | pairs of the named sources that a given reward model ranks correctly (strict) |
| ``SelectByScore`` | prompts in the top fraction of their category by mean response score (30% math/code, 10% other) |

Scores come from a separate ``predict`` run (``modules/reward_scoring.py``, ``configs/curation/score.yaml``)
that adds ``<prefix>_chosen``/``<prefix>_rejected`` columns; the score-based stages read those columns.

Three ways to run the stages:
- pure functions: ``run_pipeline(input_file, output_dir, steps)`` / ``run_step(step, input_file, output_file)``;
- curation only, from a config: ``python datamodules/curation.py --config configs/curation/skywork.yaml``;
- curate then train in one ``fit``: ``python cli.py fit --config configs/curation/skywork.yaml``
  (``CuratedPreferenceData`` curates in ``prepare_data`` and trains on the result).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # ``python datamodules/curation.py``: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datamodules.common import LOCAL_SUFFIXES, DataError, read_rows, row_error, write_rows  # noqa: E402
from datamodules.preference import PreferenceData, validate_pair  # noqa: E402

DEFAULT_FRACTIONS = {"math": 0.3, "code": 0.3, "other": 0.1}
UNKNOWN_SOURCE = "unknown"


# ----------------------------------------------------------------------------------------------------
# Rows: fields, validation, text views


@dataclass(frozen=True)
class PairFields:
    """Column names of a preference dataset."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    source: str = "source"


@dataclass(frozen=True)
class PairText:
    """The plain text of a pair: prompt turns and each response, message contents joined by newlines."""

    prompt: str
    chosen: str
    rejected: str


def pair_problem(row: dict[str, Any], index: int, origin: str, fields: PairFields = PairFields()) -> DataError | None:
    """The first rule of the reward datamodule that ``row`` breaks (``preference.validate_pair``), as a
    ``DataError``; None if the pair is valid."""
    try:
        validate_pair(row, origin, index, fields.prompt, fields.chosen, fields.rejected)
    except DataError as error:
        return error
    return None


def _contents(messages: Sequence[dict[str, Any]]) -> str:
    return "\n".join(str(message["content"]) for message in messages)


def _common_prefix_length(a: Sequence, b: Sequence) -> int:
    length = 0
    for left, right in zip(a, b):
        if left != right:
            break
        length += 1
    return length


def pair_text(row: dict[str, Any], fields: PairFields = PairFields(), origin: str | None = None,
              index: int | None = None) -> PairText:
    """Prompt and responses of a valid row of any shape; ``origin`` and ``index`` (the row's file and
    number) go into the error for a row it cannot read.

    An implicit prompt is the part both sides share: the common leading messages of two conversations, or
    for two strings their common prefix cut back to the last whitespace (so no half word becomes prompt).
    """
    chosen, rejected, prompt = row[fields.chosen], row[fields.rejected], row.get(fields.prompt)
    if prompt is not None:
        prompt_text = _contents(prompt) if isinstance(prompt, list) else prompt
        chosen_text = _contents(chosen) if isinstance(chosen, list) else chosen
        rejected_text = _contents(rejected) if isinstance(rejected, list) else rejected
        return PairText(prompt_text, chosen_text, rejected_text)
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared = _common_prefix_length(chosen, rejected)
        return PairText(_contents(chosen[:shared]), _contents(chosen[shared:]), _contents(rejected[shared:]))
    if isinstance(chosen, str) and isinstance(rejected, str):
        shared = _common_prefix_length(chosen, rejected)
        while shared > 0 and not chosen[shared - 1].isspace():
            shared -= 1
        return PairText(chosen[:shared].strip(), chosen[shared:], rejected[shared:])
    problem = "missing: the row mixes a message list and a string, so it needs an explicit prompt"
    if origin is not None and index is not None:
        raise row_error(origin, index, fields.prompt, problem)
    raise DataError(f"row mixes a message list and a string without a '{fields.prompt}' column",
                    reason=f"{fields.prompt}: {problem}")


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def row_source(row: dict[str, Any], fields: PairFields = PairFields()) -> str:
    value = row.get(fields.source)
    return UNKNOWN_SOURCE if value is None or value == "" else str(value)


def check_sources_exist(names: Sequence[str], setting: str, rows: list[dict[str, Any]], fields: PairFields,
                        origin: str) -> None:
    """Raise a ``DataError`` if any of ``names`` (the sources a stage's ``setting`` names) is the source of
    no row: a misspelt source would otherwise match nothing and the stage would do nothing, silently."""
    present = sorted({row_source(row, fields) for row in rows})
    unknown = [name for name in names if name not in present]
    if unknown:
        raise DataError(f"{origin}: {setting} {unknown}: no row has these in its '{fields.source}' column "
                        f"(sources present: {present})")


# ----------------------------------------------------------------------------------------------------
# Word n-grams (decontamination)

_EDGE_PUNCTUATION = "\"'`.,;:!?()[]{}<>«»“”‘’"


def words(text: str) -> list[str]:
    """Whitespace-separated words, lower-cased, with punctuation stripped from their ends.

    Splitting on whitespace only keeps formulas whole ("7+5-3" is one word), so two different arithmetic
    problems never look alike word by word.
    """
    out = []
    for token in text.lower().split():
        token = token.strip(_EDGE_PUNCTUATION)
        if token:
            out.append(token)
    return out


class NgramIndex:
    """The word n-grams of a set of evaluation prompts.

    A prompt is contaminated if it shares a run of ``n`` consecutive words with any evaluation prompt. An
    evaluation prompt shorter than ``n`` words has no n-gram; with ``match_short_prompts``:

    - one of at least ``min_short_prompt_words`` words contaminates a prompt that contains all its words,
      in order and adjacent (so a short evaluation prompt wrapped in other text is still caught);
    - a shorter one ("Hello!", "How are you?") only contaminates a prompt equal to it word for word (case
      and edge punctuation aside): as a run inside longer prompts such common words would mark every
      training prompt that happens to use them.
    """

    def __init__(self, prompts: Sequence[str], n: int = 8, match_short_prompts: bool = True,
                 min_short_prompt_words: int = 4):
        if n < 1:
            raise ValueError(f"ngram must be at least 1, got {n}")
        if min_short_prompt_words < 1:
            raise ValueError(f"min_short_prompt_words must be at least 1, got {min_short_prompt_words}")
        self.n, self.min_short_prompt_words = n, min_short_prompt_words
        self.grams: set[tuple[str, ...]] = set()
        self.short: dict[int, set[tuple[str, ...]]] = defaultdict(set)  # matched inside longer prompts
        self.exact: set[tuple[str, ...]] = set()  # matched only by an equal prompt
        for prompt in prompts:
            tokens = words(prompt)
            if len(tokens) >= n:
                self.grams.update(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
            elif tokens and match_short_prompts:
                if len(tokens) >= min_short_prompt_words:
                    self.short[len(tokens)].add(tuple(tokens))
                else:
                    self.exact.add(tuple(tokens))

    def match(self, prompt: str) -> tuple[str, ...] | None:
        """The first shared n-gram (or whole short evaluation prompt) found in ``prompt``, else None."""
        tokens = words(prompt)
        if self.grams:
            for i in range(len(tokens) - self.n + 1):
                gram = tuple(tokens[i:i + self.n])
                if gram in self.grams:
                    return gram
        if tuple(tokens) in self.exact:
            return tuple(tokens)
        for length, grams in self.short.items():
            for i in range(len(tokens) - length + 1):
                gram = tuple(tokens[i:i + length])
                if gram in grams:
                    return gram
        return None


# ----------------------------------------------------------------------------------------------------
# Categories (score-based selection)

_MATH = re.compile(
    r"\d\s*[-+*/^=<>]\s*\d|\\frac|\\sqrt|\$[^$]+\$|\b(?:compute|calculate|solve|equation|integral|derivative|"
    r"probability|polynomial|theorem|prove|sum of|product of|how many|remainder|divisible)\b", re.IGNORECASE)
_CODE = re.compile(
    r"```|\bdef \w+\(|#include|\bfunction\b|\bclass \w+|\b(?:python|javascript|typescript|java|c\+\+|rust|"
    r"golang|sql|code|program|script|compile|regex|algorithm|implement)\b", re.IGNORECASE)


def classify_prompt(prompt: str) -> str:
    """A simple rule: 'code' if the prompt looks like a programming request, else 'math' if it holds a
    formula or a math word, else 'other'. Code wins because code questions often contain arithmetic."""
    if _CODE.search(prompt):
        return "code"
    if _MATH.search(prompt):
        return "math"
    return "other"


def top_count(total: int, fraction: float) -> int:
    """How many of ``total`` prompts a top ``fraction`` keeps: ceil(fraction x total), so a non-empty
    category keeps at least one prompt. A tiny epsilon stops 0.3 x 10 = 3.0000000000000004 rounding up."""
    return min(total, math.ceil(fraction * total - 1e-9))


# ----------------------------------------------------------------------------------------------------
# Stages


@dataclass
class StepResult:
    """Indices (into the stage's input rows) it kept, and the reason for each it removed."""

    kept: list[int]
    removed: dict[int, str]
    details: dict[str, Any]


class CurationStep:
    """One curation stage: a pure function of the rows (plus the stage's settings)."""

    name = "step"

    def params(self) -> dict[str, Any]:
        return {key: value for key, value in vars(self).items() if not key.startswith("_")}

    def check(self, rows: list[dict[str, Any]], fields: PairFields, origin: str) -> None:
        """Raise a ``DataError`` for a setting that does not fit the data (e.g. a source no row has).
        ``run_pipeline`` checks every stage against its input before the first stage runs, so a bad
        setting costs no stage's work; alone, ``apply_step`` checks the stage's own input."""

    def apply(self, rows: list[dict[str, Any]], fields: PairFields, origin: str) -> StepResult:
        raise NotImplementedError

    def _texts(self, rows: list[dict[str, Any]], fields: PairFields, origin: str) -> list[PairText]:
        texts = []
        for index, row in enumerate(rows):
            problem = pair_problem(row, index, origin, fields)
            if problem is not None:
                raise DataError(f"{problem} (stage '{self.name}' needs valid pairs: run DropInvalid first)",
                                reason=problem.reason)
            texts.append(pair_text(row, fields, origin, index))
        return texts


class DropInvalid(CurationStep):
    """Drops the pairs the reward datamodule would reject (see ``pair_problem``); the reason is the rule."""

    name = "drop_invalid"

    def apply(self, rows, fields, origin):
        kept, removed = [], {}
        for index, row in enumerate(rows):
            problem = pair_problem(row, index, origin, fields)
            if problem is None:
                kept.append(index)
            else:
                removed[index] = f"invalid: {problem.reason}"
        return StepResult(kept, removed, {})


class Deduplicate(CurationStep):
    """Keeps the first of identical pairs: exactly identical prompt and responses, and (with
    ``normalize_whitespace``) pairs identical once every run of whitespace is one space."""

    name = "deduplicate"

    def __init__(self, normalize_whitespace: bool = True):
        self.normalize_whitespace = normalize_whitespace

    def apply(self, rows, fields, origin):
        texts = self._texts(rows, fields, origin)
        exact_seen: dict[str, int] = {}
        normal_seen: dict[tuple[str, str, str], int] = {}
        kept, removed, examples = [], {}, []
        for index, (row, text) in enumerate(zip(rows, texts)):
            exact = json.dumps([row.get(fields.prompt), row[fields.chosen], row[fields.rejected]], sort_keys=True)
            normal = (normalize_whitespace(text.prompt), normalize_whitespace(text.chosen),
                      normalize_whitespace(text.rejected))
            if exact in exact_seen:
                removed[index] = "exact duplicate"
                first = exact_seen[exact]
            elif self.normalize_whitespace and normal in normal_seen:
                removed[index] = "duplicate after whitespace normalisation"
                first = normal_seen[normal]
            else:
                exact_seen[exact] = index
                normal_seen.setdefault(normal, index)
                kept.append(index)
                continue
            if len(examples) < 5:
                examples.append({"row": index, "duplicate_of_row": first, "reason": removed[index]})
        return StepResult(kept, removed, {"examples": examples})


class Decontaminate(CurationStep):
    """Drops pairs whose prompt shares a run of ``ngram`` words with any evaluation prompt.

    Evaluation prompts come from files (``eval_files``: JSONL/JSON/Parquet) and/or a hub dataset
    (``eval_dataset``, ``eval_split``). By default (``eval_prompt_field`` unset) a row's prompt is its
    ``prompt`` column or, for a row without one, the implicit prompt of its chosen/rejected pair. A column
    named in ``eval_prompt_field`` is used alone: every row must have it, and a file where no row has it is
    an error naming the file and the column (else a misspelt name would decontaminate against the
    responses' shared text). ``ngram=8`` matches the paper's "more than 7-gram" rule. An evaluation prompt
    shorter than that is matched whole (``match_short_prompts``): inside a longer prompt if it has at least
    ``min_short_prompt_words`` words (default 4), else only by an equal prompt, so "Hello!" or "How are
    you?" does not remove every prompt that uses those words (see ``NgramIndex``); the report counts both
    kinds. An empty evaluation set is an error: decontaminating against nothing would pass silently.
    """

    name = "decontaminate"

    def __init__(self, eval_files: list[str] | None = None, eval_dataset: str | None = None,
                 eval_split: str = "filtered", eval_prompt_field: str | None = None, ngram: int = 8,
                 match_short_prompts: bool = True, min_short_prompt_words: int = 4):
        if ngram < 1:
            raise ValueError(f"ngram must be at least 1, got {ngram}")
        if min_short_prompt_words < 1:
            raise ValueError(f"min_short_prompt_words must be at least 1, got {min_short_prompt_words}")
        self.min_short_prompt_words = min_short_prompt_words
        self.eval_files = list(eval_files or [])
        self.eval_dataset, self.eval_split = eval_dataset, eval_split
        self.eval_prompt_field, self.ngram, self.match_short_prompts = eval_prompt_field, ngram, match_short_prompts
        self._index: NgramIndex | None = None

    def eval_prompts(self) -> list[str]:
        sources: list[tuple[str, list[dict[str, Any]]]] = [(path, read_rows(path)) for path in self.eval_files]
        if self.eval_dataset:
            sources.append((f"{self.eval_dataset}[{self.eval_split}]", read_rows(self.eval_dataset, self.eval_split)))
        if not sources:
            raise DataError("Decontaminate needs an evaluation set: set eval_files or eval_dataset")
        prompts = []
        explicit = self.eval_prompt_field is not None  # a named column: no fallback to chosen/rejected
        field = self.eval_prompt_field or "prompt"
        fields = PairFields(prompt=field)
        for origin, rows in sources:
            if not rows:
                raise DataError(f"{origin}: the evaluation set is empty; nothing to decontaminate against")
            if explicit and not any(field in row for row in rows):
                columns = sorted({key for row in rows for key in row})
                raise DataError(f"{origin}: no row has the column {field!r} that eval_prompt_field names "
                                f"(columns: {columns})")
            for index, row in enumerate(rows):
                value = row.get(field)
                if value is None and not explicit and "chosen" in row and "rejected" in row:
                    value = pair_text(row, fields, origin, index).prompt
                if value is None:
                    raise row_error(origin, index, field, "missing (eval_prompt_field names it)" if explicit else
                                    "missing: an evaluation row needs a prompt or a chosen/rejected pair")
                if isinstance(value, list):
                    if not all(isinstance(turn, dict) and isinstance(turn.get("content"), str) for turn in value):
                        raise row_error(origin, index, field, "expected a message list of {'role', 'content'} "
                                                              "turns with string content")
                    value = _contents(value)
                if not isinstance(value, str):
                    raise row_error(origin, index, field,
                                    f"expected a string or a message list, got {type(value).__name__}")
                prompts.append(value)
        return prompts

    def index(self) -> NgramIndex:
        if self._index is None:
            self._index = NgramIndex(self.eval_prompts(), self.ngram, self.match_short_prompts,
                                     self.min_short_prompt_words)
        return self._index

    def check(self, rows, fields, origin):
        self.index()  # read the evaluation set now: its errors then cost no stage's work

    def params(self) -> dict[str, Any]:
        return {"eval_files": self.eval_files, "eval_dataset": self.eval_dataset, "eval_split": self.eval_split,
                "eval_prompt_field": self.eval_prompt_field, "ngram": self.ngram,
                "match_short_prompts": self.match_short_prompts, "min_short_prompt_words": self.min_short_prompt_words}

    def apply(self, rows, fields, origin):
        texts = self._texts(rows, fields, origin)
        index = self.index()
        kept, removed, examples = [], {}, []
        for row_index, text in enumerate(texts):
            gram = index.match(text.prompt)
            if gram is None:
                kept.append(row_index)
                continue
            if len(gram) == self.ngram:
                removed[row_index] = f"prompt shares a run of {self.ngram} words with an evaluation prompt"
            elif gram in index.exact:
                removed[row_index] = (f"prompt equals a very short evaluation prompt "
                                      f"(fewer than {self.min_short_prompt_words} words)")
            else:
                removed[row_index] = "prompt contains a whole (short) evaluation prompt"
            if len(examples) < 5:
                examples.append({"row": row_index, "shared": " ".join(gram)})
        return StepResult(kept, removed, {"eval_ngrams": len(index.grams),
                                          "short_eval_prompts": sum(len(v) for v in index.short.values()),
                                          "very_short_eval_prompts_matched_only_whole": len(index.exact),
                                          "examples": examples})


def _score(row: dict[str, Any], column: str, index: int, origin: str) -> float:
    value = row.get(column)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        if column not in row:  # no score column: the scores were never attached (or another prefix was)
            hint = "the row has no such column: run the scoring stage first (configs/curation/score.yaml) or check score_prefix"
        else:  # the column is there, so the bad value is in the data as given
            hint = "the value is in the rows as given: fix or drop the row, or score the file again"
        raise row_error(origin, index, column, f"expected a finite score, got {value!r} ({hint})")
    return float(value)


class ConsistencyFilter(CurationStep):
    """Keeps a pair of the listed ``sources`` only if a reward model ranks it correctly: its score of the
    chosen response is strictly above that of the rejected one (a tie is wrong). Pairs of other sources
    pass untouched; ``sources=None`` checks every source. Scores are the ``<score_prefix>_chosen`` /
    ``<score_prefix>_rejected`` columns of a scoring run with that model (in the paper, a model trained on
    the other sources).

    ``category_field`` + ``categories`` restrict the check to pairs whose category is listed: where the
    model ranks no better than chance (or worse) on validation data, removing the pairs it ranks wrong
    removes correct labels as often as flipped ones (or more often), so those categories pass untouched.
    """

    name = "consistency"

    def __init__(self, sources: list[str] | None = None, score_prefix: str = "score",
                 category_field: str | None = None, categories: list[str] | None = None):
        if (category_field is None) != (categories is None):
            raise ValueError("set category_field and categories together (or neither)")
        self.sources = None if sources is None else list(sources)
        self.score_prefix = score_prefix
        self.category_field = category_field
        self.categories = None if categories is None else list(categories)

    def check(self, rows, fields, origin):
        if self.sources is not None:
            check_sources_exist(self.sources, "ConsistencyFilter sources", rows, fields, origin)
        if self.categories is not None:
            # a misspelt category (or column) would match no row, and the filter would check nothing, silently
            checked = [row for row in rows if self.sources is None or row_source(row, fields) in self.sources]
            if checked and not any(self.category_field in row for row in checked):
                raise DataError(f"{origin}: no row of the checked sources has the category column "
                                f"{self.category_field!r} of the consistency filter")
            values = [row[self.category_field] for row in checked if self.category_field in row]
            present = sorted({value for value in values if isinstance(value, Hashable)}, key=repr)
            unknown = [category for category in self.categories if category not in present]
            if unknown:
                raise DataError(f"{origin}: ConsistencyFilter categories {unknown}: no row of the checked sources "
                                f"has these in its {self.category_field!r} column (categories present: {present})")

    def apply(self, rows, fields, origin):
        chosen_column, rejected_column = f"{self.score_prefix}_chosen", f"{self.score_prefix}_rejected"
        kept, removed = [], {}
        checked: Counter = Counter()
        correct: Counter = Counter()
        in_sources = without_category = 0
        for index, row in enumerate(rows):
            if self.sources is not None and row_source(row, fields) not in self.sources:
                kept.append(index)
                continue
            in_sources += 1
            if self.categories is not None and row.get(self.category_field) not in self.categories:
                without_category += self.category_field not in row
                kept.append(index)
                continue
            source = row_source(row, fields)
            right = _score(row, chosen_column, index, origin) > _score(row, rejected_column, index, origin)
            checked[source] += 1
            correct[source] += right
            if right:
                kept.append(index)
            else:
                removed[index] = f"ranked wrong by the reward model '{self.score_prefix}' (chosen <= rejected)"
        if in_sources and without_category == in_sources:  # a misspelt column would silently check nothing
            raise DataError(f"{origin}: no row of the checked sources has the category column "
                            f"{self.category_field!r} of the consistency filter")
        accuracy = {source: correct[source] / checked[source] for source in sorted(checked)}
        # in a pipeline a listed source can be gone by now (earlier stages removed all its pairs): reported
        present = {row_source(row, fields) for row in rows}
        absent = [source for source in self.sources or () if source not in present]
        present_values = [row.get(self.category_field) for row in rows] if self.categories is not None else []
        present_categories = {value for value in present_values if isinstance(value, Hashable)}
        absent_categories = [category for category in self.categories or () if category not in present_categories]
        return StepResult(kept, removed, {"model_accuracy_per_source": accuracy, "checked_per_source": dict(sorted(checked.items())),
                                          "rows_without_category_column": without_category,
                                          "listed_sources_without_rows": absent,
                                          "listed_categories_without_rows": absent_categories})


class SelectByScore(CurationStep):
    """Keeps the prompts whose responses score highest within their category.

    A prompt's score is the mean, over all its pairs, of ``score + source_offsets[source]`` (a negative
    offset makes a weaker source's prompts lose ties against stronger ones), where ``score`` is, with
    ``prompt_score``:

    - ``mean`` (the paper's rule): the mean of both responses of the pair;
    - ``chosen``: the chosen response alone. With one pair per prompt the mean ranks a prompt by its
      rejected response as much as by its chosen one, so the easy pairs (a clearly bad rejected response)
      rank last; the chosen score ranks by the quality of the answer the pair teaches to prefer, so pairs
      whose "chosen" response is itself poor (flipped labels, both responses wrong) rank last.

    Prompts (compared after whitespace normalisation) are ranked within their category, from the
    ``category_field`` column or else ``classify_prompt`` (math/code/other), and the top
    ``fractions[category]`` of them are kept, ``ceil(fraction x count)``, with all their pairs. Equal
    scores keep the prompt seen first. Categories must group prompts whose scores share a scale: the
    report counts what was kept per ``report_field`` value (default ``subset``, if the rows have one) and
    lists the values that lost every pair, the sign that one category mixes several scales.
    """

    name = "select_by_score"
    PROMPT_SCORES = ("mean", "chosen")

    def __init__(self, fractions: dict[str, float] | None = None, category_field: str | None = None,
                 source_offsets: dict[str, float] | None = None, score_prefix: str = "score",
                 prompt_score: str = "mean", report_field: str | None = "subset"):
        self.fractions = dict(DEFAULT_FRACTIONS if fractions is None else fractions)
        for category, fraction in self.fractions.items():
            if not 0 < fraction <= 1:
                raise ValueError(f"fractions['{category}'] must be in (0, 1], got {fraction}")
        if prompt_score not in self.PROMPT_SCORES:
            raise ValueError(f"prompt_score must be one of {self.PROMPT_SCORES}, got {prompt_score!r}")
        self.category_field = category_field
        self.source_offsets = dict(source_offsets or {})
        self.score_prefix = score_prefix
        self.prompt_score = prompt_score
        self.report_field = report_field

    def check(self, rows, fields, origin):
        check_sources_exist(list(self.source_offsets), "SelectByScore source_offsets", rows, fields, origin)

    def _pair_score(self, row: dict[str, Any], index: int, origin: str) -> float:
        chosen = _score(row, f"{self.score_prefix}_chosen", index, origin)
        if self.prompt_score == "chosen":
            return chosen
        return (chosen + _score(row, f"{self.score_prefix}_rejected", index, origin)) / 2

    def apply(self, rows, fields, origin):
        texts = self._texts(rows, fields, origin)
        groups: dict[str, list[int]] = {}
        for index, text in enumerate(texts):
            groups.setdefault(normalize_whitespace(text.prompt), []).append(index)
        by_category: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
        category_of: dict[str, str] = {}
        for order, (prompt, members) in enumerate(groups.items()):
            first = rows[members[0]]
            if self.category_field:
                category = first.get(self.category_field)
                if not isinstance(category, str) or not category:
                    raise row_error(origin, members[0], self.category_field, f"expected a category name, got {category!r}")
            else:
                category = classify_prompt(texts[members[0]].prompt)
            if category not in self.fractions:
                raise row_error(origin, members[0], self.category_field or "prompt",
                                f"category {category!r} has no fraction; set fractions.{category} "
                                f"(known: {sorted(self.fractions)})")
            total = sum(self._pair_score(rows[index], index, origin)
                        + self.source_offsets.get(row_source(rows[index], fields), 0.0) for index in members)
            by_category[category].append((total / len(members), order, prompt))
            category_of[prompt] = category
        kept_prompts: set[str] = set()
        details: dict[str, Any] = {"prompt_score": self.prompt_score, "categories": {}}
        for category, ranked in sorted(by_category.items()):
            ranked.sort(key=lambda item: (-item[0], item[1]))
            keep = top_count(len(ranked), self.fractions[category])
            kept_prompts.update(prompt for _, _, prompt in ranked[:keep])
            details["categories"][category] = {
                "prompts": len(ranked), "kept_prompts": keep, "fraction": self.fractions[category],
                "lowest_kept_score": ranked[keep - 1][0] if keep else None,
                "highest_removed_score": ranked[keep][0] if keep < len(ranked) else None}
        kept, removed = [], {}
        for prompt, members in groups.items():
            for index in members:
                if prompt in kept_prompts:
                    kept.append(index)
                else:
                    category = category_of[prompt]
                    removed[index] = (f"prompt below the top {self.fractions[category]:.0%} of category "
                                      f"'{category}' by {self.prompt_score} score")
        kept.sort()
        if self.report_field and any(self.report_field in row for row in rows):
            details.update(self._retention(rows, kept))
        return StepResult(kept, removed, details)

    def _retention(self, rows: list[dict[str, Any]], kept: list[int]) -> dict[str, Any]:
        """Pairs in and kept per value of ``report_field``, and the values that lost every pair."""
        counts: dict[str, dict[str, int]] = {}
        for row in rows:
            counts.setdefault(str(row.get(self.report_field)), {"input": 0, "kept": 0})["input"] += 1
        for index in kept:
            counts[str(rows[index].get(self.report_field))]["kept"] += 1
        emptied = sorted(value for value, entry in counts.items() if entry["kept"] == 0)
        if emptied:
            warnings.warn(f"select_by_score removed every pair of {self.report_field} {emptied}: their prompts "
                          f"score on another scale than the rest of their category (set category_field)", stacklevel=2)
        return {f"per_{self.report_field}": dict(sorted(counts.items())), f"{self.report_field}_emptied": emptied}


# ----------------------------------------------------------------------------------------------------
# Scores from a (possibly multi-process) predict run


def read_score_shards(paths: Sequence[str | Path]) -> dict[int, tuple[float, float]]:
    """``row_id -> (chosen, rejected)`` from per-rank files of ``[row_id, chosen, rejected]`` lines. A row
    seen twice (under FSDP/ZeRO-3 the sampler pads shards with repeats) keeps its first scores, and must
    agree with them to within what kernels chosen by batch shape may change in bf16 (2e-2)."""
    scores: dict[int, tuple[float, float]] = {}
    for path in paths:
        for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
            row_id, chosen, rejected = json.loads(line)
            if row_id in scores:
                if not all(math.isclose(a, b, rel_tol=2e-2, abs_tol=2e-2) for a, b in zip(scores[row_id], (chosen, rejected))):
                    raise DataError(f"{path}: line {line_number}: row {row_id} was scored twice with different "
                                    f"scores {scores[row_id]} and {(chosen, rejected)}")
                continue
            scores[row_id] = (chosen, rejected)
    return scores


def attach_scores(rows: list[dict[str, Any]], scores: dict[int, tuple[float, float]], origin: str,
                  score_prefix: str = "score", fields: PairFields = PairFields()) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows that have scores, with ``<prefix>_chosen``/``<prefix>_rejected`` added, and a report of the
    rows left unscored, per source and reason (an invalid pair names the broken rule)."""
    chosen_column, rejected_column = f"{score_prefix}_chosen", f"{score_prefix}_rejected"
    unknown = sorted(set(scores) - set(range(len(rows))))
    if unknown:
        raise DataError(f"{origin}: scores for rows {unknown[:5]} that the file does not have ({len(rows)} rows)")
    scored, unscored = [], Counter()
    per_source: dict[str, dict[str, Any]] = {}
    for index, row in enumerate(rows):
        entry = per_source.setdefault(row_source(row, fields), {"input": 0, "scored": 0, "unscored": {}})
        entry["input"] += 1
        if index in scores:
            scored.append({**row, chosen_column: scores[index][0], rejected_column: scores[index][1]})
            entry["scored"] += 1
            continue
        problem = pair_problem(row, index, origin, fields)
        reason = f"invalid: {problem.reason}" if problem is not None else "dropped by the data module (see data_report)"
        unscored[reason] += 1
        entry["unscored"][reason] = entry["unscored"].get(reason, 0) + 1
    correct = sum(1 for row in scored if row[chosen_column] > row[rejected_column])
    report = {"score_columns": [chosen_column, rejected_column], "input_rows": len(rows), "scored_rows": len(scored),
              "unscored_rows": sum(unscored.values()), "unscored_by_reason": dict(unscored.most_common()),
              "by_source": dict(sorted(per_source.items())),
              "accuracy_on_labels": correct / len(scored) if scored else None}
    return scored, report


# ----------------------------------------------------------------------------------------------------
# Running stages on files

ROW_SUFFIXES = (".jsonl", ".json", ".parquet")  # what write_rows writes


def curated_suffix(input_file: str | None) -> str:
    """The suffix of the files a curation of ``input_file`` writes: the input's own where it is a local data
    file, else ``.jsonl``. A hub dataset name has no file suffix, though Path finds one in a dotted name
    ("Skywork/Skywork-Reward-Preference-80K-v0.2" -> ".2")."""
    suffix = Path(input_file or "").suffix.lower()
    return suffix if suffix in LOCAL_SUFFIXES else ".jsonl"


def check_output_path(path: str | Path, what: str, row_file: bool = True) -> Path:
    """Raise a ``ValueError`` naming ``what`` (e.g. ``output_file``) and ``path`` now if writing ``path``
    later would fail: a folder already there, a file where one of its folders should be, no write
    permission, or (``row_file``) a suffix ``write_rows`` cannot write. Called before the work, so a bad
    path costs none of it; creates nothing."""
    path = Path(path)
    if row_file and path.suffix not in ROW_SUFFIXES:
        raise ValueError(f"{what} {path}: write .jsonl, .json or .parquet, not {path.suffix or 'no suffix'!r}")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; give a file path")
    ancestor = path.parent  # the nearest folder on the way that already exists
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{what} {path}: {ancestor} is a file, not a folder" if ancestor == path.parent else
                         f"{what} {path}: {ancestor} is a file, so the folder {path.parent} cannot be created")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: no permission to write in {ancestor}")
    return path


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)
    return path


def step_report(step: CurationStep, rows: list[dict[str, Any]], result: StepResult,
                fields: PairFields) -> dict[str, Any]:
    """Counts per reason and per source of what a stage kept and removed."""
    by_source: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = by_source.setdefault(row_source(row, fields), {"input": 0, "kept": 0, "removed": {}})
        entry["input"] += 1
    for index in result.kept:
        by_source[row_source(rows[index], fields)]["kept"] += 1
    reasons: Counter = Counter()
    for index, reason in result.removed.items():
        reasons[reason] += 1
        removed = by_source[row_source(rows[index], fields)]["removed"]
        removed[reason] = removed.get(reason, 0) + 1
    if len(result.kept) + len(result.removed) != len(rows) or set(result.kept) & set(result.removed):
        raise RuntimeError(f"stage '{step.name}' must keep or remove each of its {len(rows)} rows exactly once")
    return {"step": step.name, "params": step.params(), "input_rows": len(rows), "kept_rows": len(result.kept),
            "removed_rows": len(result.removed), "removed_by_reason": dict(reasons.most_common()),
            "by_source": dict(sorted(by_source.items())), "details": result.details}


def _apply(step: CurationStep, rows: list[dict[str, Any]], fields: PairFields,
           origin: str) -> tuple[list[int], dict[str, Any]]:
    """The indices of the rows a stage keeps (in input order) and its report."""
    result = step.apply(rows, fields, origin)
    report = step_report(step, rows, result, fields)
    return sorted(result.kept), report


def apply_step(step: CurationStep, rows: list[dict[str, Any]], fields: PairFields = PairFields(),
               origin: str = "<rows>") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows a stage keeps (in input order) and its report; the stage's settings are checked against
    ``rows`` first (``CurationStep.check``)."""
    step.check(rows, fields, origin)
    kept, report = _apply(step, rows, fields, origin)
    return [rows[index] for index in kept], report


def run_step(step: CurationStep, input_file: str, output_file: str, report_file: str | None = None,
             fields: PairFields = PairFields()) -> dict[str, Any]:
    """One stage, file to file: writes the kept rows and ``report_file`` (default ``<output>.report.json``).
    The old report goes before the new rows are written, so a run killed in between leaves no report that
    describes other rows."""
    report_path = Path(report_file or f"{output_file}.report.json")
    check_output_path(output_file, "output_file")
    check_output_path(report_path, "report_file", row_file=False)
    rows = read_rows(input_file)
    kept, report = apply_step(step, rows, fields, input_file)
    report_path.unlink(missing_ok=True)
    write_rows(output_file, kept)
    report.update(input_file=str(input_file), output_file=str(output_file))
    write_json(report_path, report)
    return report


def _stage_names() -> set[str]:
    """The ``name`` of every curation stage class defined so far (a user's own subclasses included)."""
    names, pending = set(), [CurationStep]
    while pending:
        cls = pending.pop()
        names.add(cls.name)
        pending.extend(cls.__subclasses__())
    return names


def pipeline_file_pattern() -> re.Pattern:
    """The names run_pipeline writes into its output folder (with the ``.tmp<pid>`` files of an interrupted
    write_rows/write_json): NN_<stage><suffix>, NN_<stage>.report.json, curated<suffix>, report.json, where
    <stage> is a stage's name, so a user's own "2024_pairs.jsonl" there is never taken for one."""
    stages = "|".join(sorted(re.escape(name) for name in _stage_names()))
    return re.compile(rf"(?:\d{{2,}}_(?:{stages})(?:\.report\.json|\.jsonl|\.json|\.parquet)"
                      rf"|curated\.(?:jsonl|json|parquet)|report\.json)(?:\.tmp\d+)?")


def clear_pipeline_outputs(output_dir: str | Path, keep: str | Path | None = None) -> list[Path]:
    """Delete the files an earlier ``run_pipeline`` wrote into ``output_dir`` (names of
    ``pipeline_file_pattern`` only; other files, and ``keep`` (the run's input), stay). ``report.json`` goes
    first and then ``curated.*``, so even a run killed while deleting leaves no report that looks complete."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    pattern, kept = pipeline_file_pattern(), Path(keep).resolve() if keep is not None else None
    found = [path for path in output_dir.iterdir()
             if pattern.fullmatch(path.name) and path.is_file() and path.resolve() != kept]
    found.sort(key=lambda path: (path.name != "report.json", not path.name.startswith("curated."), path.name))
    for path in found:
        path.unlink()
    return found


def read_curation_report(output_dir: str | Path, input_file: str | None = None) -> dict[str, Any]:
    """``report.json`` of the last ``run_pipeline`` into ``output_dir``, with a ``DataError`` unless that
    run finished (and, given ``input_file``, curated that file): see ``run_pipeline``."""
    report_path = Path(output_dir) / "report.json"
    if not report_path.is_file():
        raise DataError(f"{report_path} is missing: no curation run into {output_dir} has finished (the last one "
                        f"failed or was killed, and its stage files there may be partial; or none ran). Curate "
                        f"again: python cli.py fit ..., or python datamodules/curation.py --config ...")
    summary = json.loads(report_path.read_text(encoding="utf-8"))
    if not Path(summary["output_file"]).is_file():
        raise DataError(f"{report_path}: the curated file it reports, {summary['output_file']}, is missing; curate again")
    if input_file is not None and Path(summary["input_file"]).resolve() != Path(input_file).resolve():
        raise DataError(f"{report_path} reports a curation of {summary['input_file']}, not of {input_file}; "
                        f"curate again")
    return summary


def _name_input_row(error: DataError, stage_file: str, input_rows: list[int], input_file: str,
                    after: str) -> DataError:
    """``error`` of a stage that read ``stage_file`` (rows numbered after the earlier stages' removals),
    reworded to lead with the row of ``input_file`` it came from: the row a user can find and fix."""
    message = str(error)
    match = re.match(re.escape(f"{stage_file}: row ") + r"(\d+)", message)
    if match and int(match.group(1)) < len(input_rows):
        row = int(match.group(1))
        message = (f"{input_file}: row {input_rows[row]} (row {row} of {stage_file}, {after})"
                   + message[match.end():])
    elif stage_file in message:
        message += f" ({stage_file} is {after}; its rows are numbered after the earlier stages' removals)"
    return DataError(message, reason=error.reason)


def run_pipeline(input_file: str, output_dir: str, steps: Sequence[CurationStep],
                 fields: PairFields = PairFields(), output_suffix: str | None = None) -> dict[str, Any]:
    """Stages in order; stage i writes ``NN_<name><suffix>`` and ``NN_<name>.report.json``, the last output
    is also ``curated<suffix>``, and ``report.json`` holds every stage's report plus the totals.

    A run replaces the previous one as a whole, so ``output_dir`` never mixes two runs: it first deletes
    what an earlier run wrote there (``clear_pipeline_outputs``: the names above, nothing else) and writes
    ``report.json`` last. So ``report.json`` exists only once a run has finished, and then every file it
    names is from that run; a run that fails or is killed leaves no ``report.json`` and no ``curated.*``
    (readers check with ``read_curation_report``). Before the first stage runs, the output path and every
    stage's settings are checked against the input (``CurationStep.check``). An error in a later stage
    names the row of ``input_file``, besides the row of the stage file it read.
    """
    if not steps:
        raise ValueError("no curation steps given")
    out = Path(output_dir)
    suffix = output_suffix or curated_suffix(input_file)
    check_output_path(out / f"curated{suffix}", "curation output")
    rows = read_rows(input_file)  # before clearing: the input may be an earlier run's output in the same folder
    if not rows:
        raise DataError(f"{input_file}: no rows to curate")
    clear_pipeline_outputs(out, keep=input_file)
    origin = str(input_file)
    for step in steps:
        step.check(rows, fields, origin)
    reports = []
    initial_sources = Counter(row_source(row, fields) for row in rows)
    input_rows = list(range(len(rows)))  # each current row's number in input_file
    for number, step in enumerate(steps, start=1):
        stem = f"{number:02d}_{step.name}"
        try:
            kept_indices, report = _apply(step, rows, fields, origin)
        except DataError as error:
            if number == 1:
                raise
            raise _name_input_row(error, origin, input_rows, str(input_file),
                                  f"the output of stage {number - 1} '{steps[number - 2].name}'") from None
        kept = [rows[index] for index in kept_indices]
        report.update(input_file=origin, output_file=str(write_rows(out / f"{stem}{suffix}", kept)))
        write_json(out / f"{stem}.report.json", report)
        reports.append(report)
        rows, origin = kept, report["output_file"]
        input_rows = [input_rows[index] for index in kept_indices]
    final = write_rows(out / f"curated{suffix}", rows)
    summary = {
        "input_file": str(input_file), "output_file": str(final), "input_rows": sum(initial_sources.values()),
        "output_rows": len(rows), "steps": reports,
        "sources": {source: {"input": count, "output": sum(1 for row in rows if row_source(row, fields) == source)}
                    for source, count in sorted(initial_sources.items())},
    }
    write_json(out / "report.json", summary)  # last: its presence marks a finished run
    return summary


def report_table(summary: dict[str, Any]) -> str:
    """Markdown tables of a pipeline report: rows in and out of each stage and why rows left, overall and
    per source."""
    lines = ["| stage | in | kept | removed | reasons (count) |", "|---|---|---|---|---|"]
    for report in summary["steps"]:
        reasons = "; ".join(f"{reason} ({count})" for reason, count in report["removed_by_reason"].items()) or "-"
        lines.append(f"| {report['step']} | {report['input_rows']} | {report['kept_rows']} | "
                     f"{report['removed_rows']} | {reasons} |")
    lines += ["", "| stage | source | in | kept | removed: reason (count) |", "|---|---|---|---|---|"]
    for report in summary["steps"]:
        for source, counts in report["by_source"].items():
            removed = "; ".join(f"{reason} ({count})" for reason, count in counts["removed"].items()) or "-"
            lines.append(f"| {report['step']} | {source} | {counts['input']} | {counts['kept']} | {removed} |")
    lines += ["", "| source | in | out |", "|---|---|---|"]
    for source, counts in summary["sources"].items():
        lines.append(f"| {source} | {counts['input']} | {counts['output']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Data modules


class CuratedPreferenceData(PreferenceData):
    """``PreferenceData`` that curates its training file first.

    ``prepare_data`` (one process in the whole job) runs ``curation_steps`` on ``train_file`` and writes every
    stage's output and report under ``curation_dir``; training then reads ``curation_dir/curated.*``. The
    curation report goes into the run's ``summary.json`` (``data_report['curation']``). ``setup``, on every
    rank, refuses a ``curation_dir`` whose last run did not finish or curated another file
    (``read_curation_report``). To curate without training: ``python datamodules/curation.py --config
    <this config>``.
    """

    def __init__(self, curation_steps: list[CurationStep] | None = None, curation_dir: str = "runs/curation/curated",
                 source_field: str = "source", **kwargs):
        super().__init__(**kwargs)
        self.curation_steps = list(curation_steps or [])
        self.curation_dir = curation_dir
        self.raw_train_file = self.files["train"]
        self.pair_fields = PairFields(self.prompt_field, self.chosen_field, self.rejected_field, source_field)
        self.curation_summary: dict[str, Any] | None = None
        self._curation_failure: Exception | None = None  # process 0's, raised in setup on every process
        # one curation per job, not per node: nodes sharing a filesystem would clear and rewrite the same folder
        # under each other (every rank then reads the result in setup, after Lightning's barrier)
        self.prepare_data_per_node = False

    def curated_file(self) -> Path:
        return Path(self.curation_dir) / f"curated{curated_suffix(self.raw_train_file)}"

    def curate(self) -> dict[str, Any]:
        if not self.raw_train_file:
            raise DataError("CuratedPreferenceData needs train_file: the preference dataset to curate")
        self.curation_summary = run_pipeline(self.raw_train_file, self.curation_dir, self.curation_steps,
                                             self.pair_fields)
        return self.curation_summary

    def prepare_data(self) -> None:
        self._curation_failure = None
        if not self.curation_steps:
            return
        try:
            self.curate()
        except Exception as error:
            if self.trainer is None or self.trainer.world_size == 1:
                raise
            # only process 0 curates (prepare_data_per_node is off) while the others wait for setup: raised
            # there, on every process, instead of leaving them waiting for this one
            self._curation_failure = error

    def setup(self, stage: str) -> None:
        if self.curation_steps and self.trainer is not None and self.trainer.world_size > 1:
            failure = self._curation_failure
            message = self.trainer.strategy.broadcast(None if failure is None else f"{type(failure).__name__}: "
                                                      f"{failure}", src=0)
            if failure is not None:
                self._curation_failure = None
                raise failure
            if message is not None:
                raise DataError(f"curation failed on process 0: {message}")
        if self.curation_steps and self.raw_train_file:
            # every rank checks the files on disk (ranks other than the curating one have no summary in memory)
            summary = read_curation_report(self.curation_dir, self.raw_train_file)
            if Path(summary["output_file"]).resolve() != self.curated_file().resolve():
                raise DataError(f"{Path(self.curation_dir) / 'report.json'} reports the curated file "
                                f"{summary['output_file']}, not {self.curated_file()}; curate again")
            self.files["train"] = str(self.curated_file())
            if self.curation_summary is None:
                self.curation_summary = summary
        super().setup(stage)

    @property
    def data_report(self) -> dict[str, Any]:
        report = super().data_report
        if self.curation_summary is not None:
            report["curation"] = {key: self.curation_summary[key]
                                  for key in ("input_file", "output_file", "input_rows", "output_rows", "sources")}
            report["curation"]["steps"] = [{key: step[key] for key in ("step", "kept_rows", "removed_rows",
                                                                         "removed_by_reason")}
                                           for step in self.curation_summary["steps"]]
        return report


class PreferenceScoringData(PreferenceData):
    """The pairs of ``input_file`` for a scoring ``predict`` run; the ``row_id`` of every batch (the rows'
    indices in the file) lets per-rank outputs be merged back onto the rows. Invalid rows are dropped and
    counted by default (``invalid_rows: drop``) and reported as unscored. Pairs are sorted longest first:
    less padding per batch, and an out-of-memory error shows on the first batch rather than the last."""

    def __init__(self, input_file: str, invalid_rows: str = "drop", sort_by_length: bool = True, **kwargs):
        for split_file in ("train_file", "val_file", "test_file"):
            if kwargs.get(split_file):
                raise ValueError(f"PreferenceScoringData reads input_file; do not set {split_file}")
        super().__init__(test_file=input_file, invalid_rows=invalid_rows, **kwargs)
        self.input_file = input_file
        self.sort_by_length = sort_by_length

    def load_split(self, split):
        items = super().load_split(split)
        if items and self.sort_by_length:
            items.sort(key=lambda item: -max(len(item["chosen"]), len(item["rejected"])))
        return items


# ----------------------------------------------------------------------------------------------------
# Curation only, from a fit config


def merge_config(base: Any, update: Any) -> Any:
    """``update`` over ``base``: dicts merge key by key, recursively; anything else (lists included, such as
    ``curation_steps``) is replaced whole, as jsonargparse does with several ``--config`` files."""
    if not isinstance(base, dict) or not isinstance(update, dict):
        return update
    merged = dict(base)
    for key, value in update.items():
        merged[key] = merge_config(base.get(key), value) if key in base else value
    return merged


def curation_data_from_config(argv: list[str]) -> CuratedPreferenceData:
    """The ``data`` section of cli.py config files (``--config`` repeatable, later ones win) plus
    ``--data.*`` overrides, instantiated alone: curating needs no model, so none is loaded."""
    import yaml
    from jsonargparse import ArgumentParser

    configs, overrides, position = [], [], 0
    while position < len(argv):
        argument = argv[position]
        if argument == "--config":
            configs.append(argv[position + 1])
            position += 2
            continue
        if argument.startswith("--config="):
            configs.append(argument.split("=", 1)[1])
        elif argument.startswith("--data") and "=" not in argument and position + 1 < len(argv):
            overrides += [argument, argv[position + 1]]  # the space-separated form: --data.init_args.KEY VALUE
            position += 1
        elif argument.startswith("--data"):
            overrides.append(argument)
        else:
            raise SystemExit(f"unexpected argument {argument!r}: give --config FILE and --data.* overrides")
        position += 1
    data: dict[str, Any] = {}
    for config in configs:  # merged in order, later files winning key by key, as cli.py (LightningCLI) does
        loaded = yaml.safe_load(Path(config).read_text()) or {}
        if loaded.get("data") is not None:
            data = merge_config(data, loaded["data"])
    if not data:
        raise SystemExit("no 'data' section in the config(s): nothing to curate")
    parser = ArgumentParser(prog="python datamodules/curation.py")
    parser.add_subclass_arguments(CuratedPreferenceData, "data", required=True)
    parsed = parser.parse_args(["--data", json.dumps(data), *overrides])
    return parser.instantiate_classes(parsed).data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python datamodules/curation.py --config CONFIG [--data.init_args.KEY=VALUE ...]``: run the curation
    stages of a config whose data is ``CuratedPreferenceData`` without training; prints what each removed."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(main.__doc__)
        return {}
    datamodule = curation_data_from_config(args)
    summary = datamodule.curate()
    print(report_table(summary))
    print(f"\ncurated {summary['input_rows']} -> {summary['output_rows']} rows: {summary['output_file']}; "
          f"report: {Path(datamodule.curation_dir) / 'report.json'}")
    return summary


if __name__ == "__main__":
    from cli import run_reporting_errors
    from datamodules.curation import main as package_main  # one copy of the classes, the package's

    run_reporting_errors(package_main)  # bad input: one error line naming file, row and field, as cli.py
