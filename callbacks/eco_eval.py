"""Multiple-choice evaluation (WMDP/MMLU style) on any ``EvalLM``: the bare model, a model folder or ECO's
wrapper, through the same ``score_tokens`` protocol as the TOFU evaluator.

Items come from ``datamodules.tofu_data.multiple_choice_items`` (``question``, ``options``, ``letters``,
``answer_index``, ``prompt``). Two scorings:

- ``letter`` (the benchmark convention): the prompt lists the options and ends with ``Answer:``; the
  answer is the letter with the highest log-prob as the first answer token (top logit over the letters).
- ``option`` (cloze): the plain question, each option written into the item's answer sentence; the answer
  is the option with the lowest mean token NLL. A model never taught the lettered format (the embedded
  tiny model, trained from scratch on question/answer pairs) answers ``letter`` items at chance whatever
  it knows; ``option`` shows what it knows.

Every sequence is teacher-forced: one sequence per (item, option), so an object that only scores tokens
can be evaluated; the classifier of a wrapper sees the prompt text in ``batch["questions"]``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from datamodules.common import padding_id
from datamodules.tofu import EncodedQA, collate_qa, encode_qa

SCORINGS = ("letter", "option")


def option_answer(item: Mapping[str, Any], option: str) -> str:
    """The item's answer sentence with the true value replaced by ``option`` (the option itself when the
    item carries no sentence)."""
    sentence, true = item.get("answer"), item["options"][item["answer_index"]]
    if not sentence or true not in sentence:
        return option
    head, _, tail = sentence.rpartition(true)
    return head + option + tail


def encode_multiple_choice(items: Sequence[Mapping[str, Any]], tokenizer, scoring: str = "letter",
                           max_length: int = 256, use_chat_template: bool = True) -> dict[str, Any]:
    """Every (item, option) sequence: ``encoded`` (EncodedQA list), ``questions`` (the text a gate sees),
    ``rows`` (item index), ``options`` (option index), ``answer_index`` (per item). Sequences that do not
    fit ``max_length`` raise, naming the item (a multiple-choice item cannot lose an option)."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring!r}")
    encoded, questions, rows, options = [], [], [], []
    for i, item in enumerate(items):
        for j, (letter, option) in enumerate(zip(item["letters"], item["options"])):
            if scoring == "letter":
                prompt, answer = item["prompt"], letter
            else:
                prompt, answer = item["question"], option_answer(item, option)
            qa = encode_qa(tokenizer, prompt, answer, max_length, use_chat_template, "error", f"mc item {i}")
            encoded.append(qa)
            questions.append(prompt)
            rows.append(i)
            options.append(j)
    return {"encoded": encoded, "questions": questions, "rows": rows, "options": options,
            "answer_index": [int(item["answer_index"]) for item in items], "scoring": scoring}


def score_batch(encoded: Sequence[EncodedQA], questions: Sequence[str], pad_id: int) -> dict[str, Any]:
    """The TOFU evaluator's scoring layout for a list of sequences."""
    batch = collate_qa(list(encoded), pad_id)
    batch["prompt_lengths"] = torch.tensor([len(item.prompt_ids) for item in encoded])
    batch["questions"] = list(questions)
    return batch


def option_scores(logp: torch.Tensor, labels: torch.Tensor, scoring: str) -> np.ndarray:
    """Per sequence: the first answer token's log-prob (``letter``) or minus the mean answer NLL (``option``)."""
    mask = labels[:, 1:] != -100
    if scoring == "letter":
        first = mask & (mask.cumsum(-1) == 1)
        return (logp * first).sum(-1).double().numpy()
    return ((logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)).double().numpy()


def choose_options(scores: Sequence[float], rows: Sequence[int], options: Sequence[int], n_items: int) -> np.ndarray:
    """The highest-scoring option of each item (first one on ties)."""
    best, choice = np.full(n_items, -np.inf), np.full(n_items, -1)
    for score, row, option in zip(scores, rows, options):
        if score > best[row]:
            best[row], choice[row] = score, option
    return choice


class MultipleChoiceEvaluator:
    def __init__(self, items: Sequence[Mapping[str, Any]], tokenizer, scoring: str = "letter", max_length: int = 256,
                 use_chat_template: bool = True, batch_size: int = 64):
        if not items:
            raise ValueError("multiple-choice evaluation needs at least one item")
        self.items, self.tokenizer, self.scoring, self.batch_size = list(items), tokenizer, scoring, batch_size
        self.encoded = encode_multiple_choice(items, tokenizer, scoring, max_length, use_chat_template)
        self.chance = float(np.mean([1.0 / len(item["options"]) for item in items]))

    def batches(self):
        enc, pad = self.encoded, padding_id(self.tokenizer)
        order = sorted(range(len(enc["encoded"])), key=lambda j: len(enc["encoded"][j].input_ids))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            yield idx, score_batch([enc["encoded"][j] for j in idx], [enc["questions"][j] for j in idx], pad)

    def evaluate(self, model: Any) -> dict[str, Any]:
        """Accuracy of ``model`` (anything ``callbacks.tofu_eval.as_eval_lm`` accepts): ``accuracy``,
        ``chance``, ``n``, ``choices`` (chosen option per item), ``flagged`` (fraction of sequences a gate
        flagged, when the model reports ``last_flags``), ``seconds``."""
        from callbacks.tofu_eval import as_eval_lm

        lm = as_eval_lm(model, self.tokenizer)
        started = time.perf_counter()
        scores = np.empty(len(self.encoded["encoded"]))
        flagged = []
        for idx, batch in self.batches():
            logp = lm.score_tokens(batch)
            scores[idx] = option_scores(logp.float().cpu(), batch["labels"], self.scoring)
            if getattr(lm, "last_flags", None) is not None:
                flagged += lm.last_flags.tolist()
        n = len(self.items)
        choice = choose_options(scores, self.encoded["rows"], self.encoded["options"], n)
        answer = np.asarray(self.encoded["answer_index"])
        return {"accuracy": float((choice == answer).mean()), "chance": self.chance, "n": n, "scoring": self.scoring,
                "choices": choice.tolist(), "flagged": float(np.mean(flagged)) if flagged else None,
                "seconds": time.perf_counter() - started}
