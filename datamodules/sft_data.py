"""Prompt/response data for supervised fine-tuning, loss on response tokens only.

Accepted row shapes:
- plain: ``{"prompt": str, "response": str}`` (``completion`` is accepted for ``response``);
- chat: ``{"messages": [{"role", "content"}, ...]}``; the last turn must be the assistant's and is the
  response, everything before it is the prompt.
Plain rows are wrapped as a user/assistant exchange when the tokenizer has a chat template
(``use_chat_template``), else the response follows the prompt directly and ends with EOS.

Batches: ``input_ids``, ``attention_mask``, ``labels`` (-100 on prompt and padding), and for generation
``prompt_input_ids``/``prompt_attention_mask`` (left-padded) and ``reference`` (the expected response,
or the exact answer for the arithmetic task).
"""

from __future__ import annotations

from typing import Any

import torch

from datamodules import arithmetic
from datamodules.common import pad_sequences, padding_id, row_error, truncate
from datamodules.text import (
    TextDataModule,
    encode_text,
    leading_prefix_length,
    render_chat,
    validate_messages,
    validate_text,
    with_default_prefix,
)


class SFTData(TextDataModule):
    def __init__(self, prompt_field: str = "prompt", response_field: str = "response",
                 messages_field: str = "messages", use_chat_template: bool = True,
                 train_size: int = 4000, val_size: int = 256, test_size: int = 500,
                 min_steps: int = 2, max_steps: int = 3, **kwargs):
        """``train_size``..``max_steps`` shape the embedded arithmetic task (used when no file or hub
        dataset is given). Other arguments: see ``TextDataModule``."""
        super().__init__(**kwargs)
        self.prompt_field, self.response_field, self.messages_field = prompt_field, response_field, messages_field
        self.use_chat_template = use_chat_template
        self.arithmetic_sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.arithmetic_steps = (min_steps, max_steps)
        self._arithmetic: dict[str, list[arithmetic.Problem]] | None = None

    # the embedded task is checkable exactly, so `test` reports accuracy, not just loss
    @property
    def is_embedded(self) -> bool:
        return not (self.files["train"] or self.dataset)

    def embedded_rows(self, split: str) -> list[dict[str, Any]] | None:
        if self._arithmetic is None:
            self._arithmetic = arithmetic.generate_splits(
                self.arithmetic_sizes, seed=self.seed, min_steps=self.arithmetic_steps[0],
                max_steps=self.arithmetic_steps[1])
        if split == "predict":
            split = "test"
        return [problem.as_row() for problem in self._arithmetic.get(split, [])] or None

    def is_correct(self, reference: str, completion: str) -> bool | None:
        """Exact answer check for the embedded task; None where no checker applies."""
        if not self.is_embedded:
            return None
        return arithmetic.check_answer(int(reference), completion)

    def split_row(self, row: dict[str, Any], source: str, index: int) -> tuple[str, str]:
        """(prompt text, response text), both formatted for the tokenizer."""
        tokenizer = self.tokenizer
        if self.messages_field in row:
            messages = validate_messages(row[self.messages_field], source, index, self.messages_field)
            if messages[-1]["role"] != "assistant":
                raise row_error(source, index, f"{self.messages_field}[{len(messages) - 1}].role",
                                "the last message must be the assistant's response")
            if len(messages) < 2:
                raise row_error(source, index, self.messages_field,
                                "only the assistant's response: at least one message must come before it")
            try:
                prompt = render_chat(tokenizer, messages[:-1], add_generation_prompt=True)
                full = render_chat(tokenizer, messages)
            except Exception as error:  # jinja / transformers errors (e.g. a role the template does not allow)
                raise row_error(source, index, self.messages_field,
                                f"the tokenizer's chat template refused it ({type(error).__name__}: {error})") from None
        else:
            response_key = self.response_field if self.response_field in row else "completion"
            prompt_text = validate_text(row.get(self.prompt_field), source, index, self.prompt_field)
            response_text = validate_text(row.get(response_key), source, index, self.response_field)
            if self.use_chat_template and tokenizer.chat_template:
                user = [{"role": "user", "content": prompt_text}]
                prompt = render_chat(tokenizer, user, add_generation_prompt=True)
                full = render_chat(tokenizer, user + [{"role": "assistant", "content": response_text}])
            else:
                prompt, full = prompt_text, prompt_text + response_text + (tokenizer.eos_token or "")
        if not full.startswith(prompt):
            raise row_error(source, index, self.messages_field,
                            "the chat template renders the prompt differently inside the full conversation")
        return prompt, full[len(prompt):]

    def encode(self, row: dict[str, Any], split: str, source: str, index: int) -> dict[str, Any] | None:
        prompt, response = self.split_row(row, source, index)
        # the tokenizer's default BOS once, as TRL's SFT gets it (a chat template that renders it is not doubled)
        prompt_ids = with_default_prefix(self.tokenizer, encode_text(self.tokenizer, prompt))
        response_ids = encode_text(self.tokenizer, response)
        bos = leading_prefix_length(self.tokenizer, prompt_ids)  # a left cut keeps it (``truncate``)
        ids, was_truncated = truncate(prompt_ids + response_ids, self.max_length, self.truncation_side, bos)
        labels, _ = truncate([-100] * len(prompt_ids) + response_ids, self.max_length, self.truncation_side, bos)
        if was_truncated:
            self.report.truncated[split] = self.report.truncated.get(split, 0) + 1
        if all(label == -100 for label in labels):
            self.report.drop(split, "no response token left after truncation to max_length")
            return None
        reference = str(row["answer"]) if self.is_embedded else response
        prompt_ids, _ = truncate(prompt_ids, self.max_length, "left", bos)  # what generation conditions on
        # row_id: the row's index in its split, so evaluation counts each row once under DDP
        return {"input_ids": ids, "labels": labels, "prompt_ids": prompt_ids, "reference": reference, "row_id": index}

    def item_length(self, item: dict[str, Any]) -> int:
        return len(item["input_ids"])

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        pad = padding_id(self.tokenizer)  # masked everywhere: EOS serves a tokenizer without a pad token
        input_ids = pad_sequences([item["input_ids"] for item in items], pad)
        prompt_ids = pad_sequences([item["prompt_ids"] for item in items], pad, side="left")
        lengths = [len(item["input_ids"]) for item in items]
        attention = pad_sequences([[1] * n for n in lengths], 0)
        prompt_attention = pad_sequences([[1] * len(item["prompt_ids"]) for item in items], 0, side="left")
        return {
            "input_ids": input_ids, "attention_mask": attention,
            "labels": pad_sequences([item["labels"] for item in items], -100),
            "prompt_input_ids": prompt_ids, "prompt_attention_mask": prompt_attention,
            "reference": [item["reference"] for item in items],
            "row_id": torch.tensor([item["row_id"] for item in items], dtype=torch.long),
        }
