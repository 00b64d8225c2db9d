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
``subset`` (B) as indices into ``subset_names``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from datamodules import arithmetic
from datamodules.common import pad_sequences, row_error, truncate
from datamodules.text import TextDataModule, encode_text, render_chat, validate_messages, validate_text


class PreferenceData(TextDataModule):
    def __init__(self, chosen_field: str = "chosen", rejected_field: str = "rejected",
                 prompt_field: str = "prompt", eval_truncation_side: str = "left",
                 train_size: int = 6000, val_size: int = 300, test_size: int = 600,
                 subsets: tuple[str, ...] = arithmetic.PAIR_SUBSETS,
                 train_subset_weights: Optional[dict[str, float]] = None, **kwargs):
        """Preference data. ``eval_truncation_side`` applies to val/test (RewardBench truncates on the
        left, keeping the responses). ``train_size``..``train_subset_weights`` shape the embedded
        arithmetic pairs: val/test draw the subsets uniformly, training may weight them (e.g. fewer of
        the trivial format pairs)."""
        super().__init__(**kwargs)
        self.chosen_field, self.rejected_field, self.prompt_field = chosen_field, rejected_field, prompt_field
        self.eval_truncation_side = eval_truncation_side
        self.embedded_sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.embedded_subsets = tuple(subsets)
        self.train_subset_weights = train_subset_weights
        self.subset_names: list[str] = []

    def embedded_rows(self, split: str) -> Optional[list[dict[str, Any]]]:
        split = "test" if split == "predict" else split
        problems = arithmetic.generate_splits(self.embedded_sizes, seed=self.seed)
        offset = {"train": 1, "val": 2, "test": 3}[split]
        return arithmetic.preference_rows(problems[split], self.embedded_subsets, seed=self.seed * 10 + offset,
                                          weights=self.train_subset_weights if split == "train" else None)

    # -- one side of a pair as token ids -------------------------------------------------------------
    def _side_ids(self, row: dict[str, Any], field: str, source: str, index: int) -> list[int]:
        value, prompt = row.get(field), row.get(self.prompt_field)
        tokenizer = self.tokenizer
        if isinstance(value, list) or isinstance(prompt, list):
            messages: list[dict[str, str]] = []
            if prompt is not None:
                messages += (validate_messages(prompt, source, index, self.prompt_field) if isinstance(prompt, list)
                             else [{"role": "user", "content": validate_text(prompt, source, index, self.prompt_field)}])
            messages += (validate_messages(value, source, index, field) if isinstance(value, list)
                         else [{"role": "assistant", "content": validate_text(value, source, index, field)}])
            if messages[-1]["role"] != "assistant":
                raise row_error(source, index, field, "the conversation must end with an assistant turn")
            text = render_chat(tokenizer, messages)
        else:
            response = validate_text(value, source, index, field)
            if prompt is not None:
                prompt = validate_text(prompt, source, index, self.prompt_field)
                if tokenizer.chat_template:
                    text = render_chat(tokenizer, [{"role": "user", "content": prompt},
                                                   {"role": "assistant", "content": response}])
                else:
                    text = prompt + response + (tokenizer.eos_token or "")
            else:
                text = response + (tokenizer.eos_token or "")
        return encode_text(tokenizer, text)

    def encode(self, row: dict[str, Any], split: str, source: str, index: int) -> Optional[dict[str, Any]]:
        for field in (self.chosen_field, self.rejected_field):
            if field not in row or row[field] is None:
                raise row_error(source, index, field, "missing")
        chosen = self._side_ids(row, self.chosen_field, source, index)
        rejected = self._side_ids(row, self.rejected_field, source, index)
        if chosen == rejected:
            raise row_error(source, index, self.rejected_field, "identical to chosen")
        margin = row.get("margin", 0.0)
        if margin is None:
            margin = 0.0
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not math.isfinite(margin):
            raise row_error(source, index, "margin", f"expected a finite number, got {margin!r}")
        side = self.truncation_side if split == "train" else self.eval_truncation_side
        chosen, cut_chosen = truncate(chosen, self.max_length, side)
        rejected, cut_rejected = truncate(rejected, self.max_length, side)
        if cut_chosen or cut_rejected:
            self.report.truncated[split] = self.report.truncated.get(split, 0) + 1
            if chosen == rejected:
                self.report.drop(split, "chosen and rejected identical after truncation to max_length")
                return None
        subset = row.get("subset")
        if subset is not None and not isinstance(subset, str):
            raise row_error(source, index, "subset", f"expected a string, got {type(subset).__name__}")
        subset = subset or "all"
        if subset not in self.subset_names:
            self.subset_names.append(subset)
        return {"chosen": chosen, "rejected": rejected, "margin": float(margin),
                "subset": self.subset_names.index(subset)}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = [item["chosen"] for item in items] + [item["rejected"] for item in items]
        return {
            "input_ids": pad_sequences(sequences, self.tokenizer.pad_token_id),
            "attention_mask": pad_sequences([[1] * len(sequence) for sequence in sequences], 0),
            "margin": torch.tensor([item["margin"] for item in items], dtype=torch.float32),
            "subset": torch.tensor([item["subset"] for item in items], dtype=torch.long),
        }
