"""Preference pairs for reward models, in all four shapes:

| shape | row |
|---|---|
| standard, implicit prompt | ``{"chosen": str, "rejected": str}`` (prompt included in both texts) |
| conversational, implicit prompt | ``chosen``/``rejected`` are message lists sharing the prompt turns (Skywork-Reward-Preference-80K) |
| standard, explicit prompt | ``{"prompt": str, "chosen": str, "rejected": str}`` |
| conversational, explicit prompt | ``prompt`` and the two responses are message lists |

Optional columns: ``margin`` (float, used inside the Bradley-Terry sigmoid), ``subset`` (per-subset
accuracy), ``source``. Invalid rows (missing or non-string field, empty side, unknown role, chosen
identical to rejected) stop the run with file, row and field, or are dropped and counted
(``invalid_rows: drop``). Truncated pairs are counted, never silently dropped.

Batches hold chosen rows first, then rejected: ``input_ids`` (2B, T), ``attention_mask``, ``margin`` (B),
``subset`` (B) as indices into ``subset_names``, ``row_id`` (B) the rows' indices in their file.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from datamodules import arithmetic
from datamodules.common import check_side, pad_sequences, row_error, truncate
from datamodules.text import (
    TextDataModule,
    encode_text,
    leading_prefix_length,
    render_chat,
    validate_messages,
    validate_text,
    with_default_prefix,
)


def _turns(side: str | list[dict[str, Any]]) -> list[tuple[str, str]]:
    """A response side as (role, content) turns: a plain string is one assistant turn."""
    return [("assistant", side)] if isinstance(side, str) else [(turn["role"], turn["content"]) for turn in side]


def validate_pair(row: dict[str, Any], source: str, index: int, prompt_field: str = "prompt",
                  chosen_field: str = "chosen", rejected_field: str = "rejected") -> None:
    """Raise a ``DataError`` naming source, row and field for the first rule a preference row breaks.

    The one set of rules for a valid pair, used by ``PreferenceData`` before it tokenizes and by the
    curation step ``DropInvalid``: both sides present; a string non-empty; a message list of known roles
    with non-empty content, ending with an assistant turn; a string and a message list only together with
    a prompt; chosen different from rejected; ``prompt`` (if present) a non-empty string or message list;
    ``margin`` a finite number; ``subset`` a string.
    """
    prompt = row.get(prompt_field)
    if prompt is not None:
        if isinstance(prompt, list):
            validate_messages(prompt, source, index, prompt_field)
        else:
            validate_text(prompt, source, index, prompt_field)
    for name in (chosen_field, rejected_field):
        value = row.get(name)
        if value is None:
            raise row_error(source, index, name, "missing")
        if isinstance(value, list):
            validate_messages(value, source, index, name)
            if value[-1]["role"] != "assistant":
                raise row_error(source, index, name, "the conversation must end with an assistant turn")
        else:
            validate_text(value, source, index, name)
    # without a prompt, a string side carries its prompt inside the text and a message side in its turns:
    # the two sides share no prompt, and curation could not tell what the prompt is
    if prompt is None and isinstance(row[chosen_field], list) != isinstance(row[rejected_field], list):
        list_side, text_side = ((chosen_field, rejected_field) if isinstance(row[chosen_field], list)
                                else (rejected_field, chosen_field))
        raise row_error(source, index, prompt_field,
                        f"missing: '{list_side}' is a message list and '{text_side}' a string; "
                        f"a pair that mixes the two needs a '{prompt_field}' column")
    if row[chosen_field] == row[rejected_field]:
        raise row_error(source, index, rejected_field, "identical to chosen")
    if _turns(row[chosen_field]) == _turns(row[rejected_field]):  # e.g. "4" and [{"role": "assistant", "content": "4"}]
        raise row_error(source, index, rejected_field, "identical to chosen once formatted")
    margin = row.get("margin")
    if margin is not None and (not isinstance(margin, (int, float)) or isinstance(margin, bool)
                               or not math.isfinite(margin)):
        raise row_error(source, index, "margin", f"expected a finite number, got {margin!r}")
    subset = row.get("subset")
    if subset is not None and not isinstance(subset, str):
        raise row_error(source, index, "subset", f"expected a string, got {type(subset).__name__}")


class PreferenceData(TextDataModule):
    pads_batches = True

    def __init__(self, chosen_field: str = "chosen", rejected_field: str = "rejected",
                 prompt_field: str = "prompt", eval_truncation_side: str = "left",
                 train_size: int = 6000, val_size: int = 300, test_size: int = 600,
                 subsets: tuple[str, ...] = arithmetic.PAIR_SUBSETS,
                 train_subset_weights: dict[str, float] | None = None, **kwargs):
        """Preference data. ``eval_truncation_side`` applies to val/test (RewardBench truncates on the
        left, keeping the responses). ``train_size``..``train_subset_weights`` shape the embedded
        arithmetic pairs: val/test draw the subsets uniformly, training may weight them (e.g. fewer of
        the trivial format pairs)."""
        super().__init__(**kwargs)
        self.chosen_field, self.rejected_field, self.prompt_field = chosen_field, rejected_field, prompt_field
        self.eval_truncation_side = check_side(eval_truncation_side, "eval_truncation_side")
        self.embedded_sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.embedded_subsets = tuple(subsets)
        self.train_subset_weights = train_subset_weights
        self.subset_names: list[str] = []

    def embedded_rows(self, split: str) -> list[dict[str, Any]] | None:
        split = "test" if split == "predict" else split
        problems = arithmetic.generate_splits(self.embedded_sizes, seed=self.seed)
        offset = {"train": 1, "val": 2, "test": 3}[split]
        return arithmetic.preference_rows(problems[split], self.embedded_subsets, seed=self.seed * 10 + offset,
                                          weights=self.train_subset_weights if split == "train" else None)

    # -- one side of a pair as token ids -------------------------------------------------------------
    def _side_ids(self, row: dict[str, Any], field: str) -> list[int]:
        """Token ids of one side of a pair that ``validate_pair`` accepted."""
        value, prompt = row[field], row.get(self.prompt_field)
        tokenizer = self.tokenizer
        if isinstance(value, list) or isinstance(prompt, list):
            messages: list[dict[str, str]] = []
            if prompt is not None:
                messages += prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            messages += value if isinstance(value, list) else [{"role": "assistant", "content": value}]
            return with_default_prefix(tokenizer, encode_text(tokenizer, render_chat(tokenizer, messages)))
        if prompt is not None and tokenizer.chat_template:
            return with_default_prefix(tokenizer, encode_text(tokenizer, render_chat(
                tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": value}])))
        return with_default_prefix(tokenizer, encode_text(tokenizer, (prompt or "") + value + (tokenizer.eos_token or "")))

    def encode(self, row: dict[str, Any], split: str, source: str, index: int) -> dict[str, Any] | None:
        validate_pair(row, source, index, self.prompt_field, self.chosen_field, self.rejected_field)
        chosen = self._side_ids(row, self.chosen_field)
        rejected = self._side_ids(row, self.rejected_field)
        if chosen == rejected:  # a backstop for other sides that render alike (validate_pair catches string vs message)
            raise row_error(source, index, self.rejected_field, "identical to chosen once formatted")
        side = self.truncation_side if split == "train" else self.eval_truncation_side
        chosen, cut_chosen = self._truncate(chosen, side)
        rejected, cut_rejected = self._truncate(rejected, side)
        if cut_chosen or cut_rejected:
            self.report.truncated[split] = self.report.truncated.get(split, 0) + 1
            if chosen == rejected:
                self.report.drop(split, "chosen and rejected identical after truncation to max_length")
                return None
        subset = row.get("subset") or "all"
        if subset not in self.subset_names:
            self.subset_names.append(subset)
        # row_id: the row's index in its file, so predictions can be joined back onto the rows
        return {"chosen": chosen, "rejected": rejected, "margin": float(row.get("margin") or 0.0),
                "subset": self.subset_names.index(subset), "row_id": index}

    def _truncate(self, ids: list[int], side: str) -> tuple[list[int], bool]:
        return truncate(ids, self.max_length, side, keep_first=leading_prefix_length(self.tokenizer, ids))

    def item_length(self, item: dict[str, Any]) -> int:
        return max(len(item["chosen"]), len(item["rejected"]))  # both sides go into the same padded batch

    def item_kind(self, item: dict[str, Any]) -> str | None:
        return self.subset_names[item["subset"]]

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = [item["chosen"] for item in items] + [item["rejected"] for item in items]
        return {
            "input_ids": pad_sequences(sequences, self.tokenizer.pad_token_id),
            "attention_mask": pad_sequences([[1] * len(sequence) for sequence in sequences], 0),
            "margin": torch.tensor([item["margin"] for item in items], dtype=torch.float32),
            "subset": torch.tensor([item["subset"] for item in items], dtype=torch.long),
            "row_id": torch.tensor([item["row_id"] for item in items], dtype=torch.long),
        }
