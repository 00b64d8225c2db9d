"""TOFU question/answer data as a LightningDataModule, for every stage of the TOFU protocol.

``task`` picks what the training batches are:

- ``finetune``: prompt/response SFT rows (the same batch layout as ``SFTData``, so the ``SFT`` module
  trains on them). ``train_split: full`` gives the *target* model, ``train_split: retain90`` (the
  complement of ``forget10``) the *retain* model. ``include_general`` adds the ``real_authors`` and
  ``world_facts`` rows: the embedded tiny model is trained from scratch and knows nothing else, so they are
  learned in the same fine-tuning (default for the embedded data; off for the real TOFU, whose general
  sets test what the pretrained model already knows).
- ``unlearn``: one item per forget row: the forget prompt with its forget answer ``y_f``, the same prompt
  with a template refusal ``y_e`` (``tofu_data.refusal_for``: fixed per sample), and a retain row paired
  with it (re-drawn every epoch, seeded) for the baselines that use retain data. Batch keys:
  ``index`` (B,) the forget row's index (for precomputed reference log-probs), ``forget_*``,
  ``template_*``, ``retain_*`` each with ``input_ids``, ``attention_mask``, ``labels`` (-100 outside the
  answer).

Validation (``finetune`` only) is the teacher-forced loss on ``retain_perturbed``'s answers (rows of the
training set: it tracks memorisation). ``test`` batches are the ground-truth answers of the four
evaluation splits (SFT layout plus ``kind``); the full TOFU protocol (truth ratios, ROUGE, forget quality,
model utility) runs in the ``callbacks.tofu_eval.TofuEvaluation`` callback on ``eval_sets()``.

Data: the embedded generator (``source: embedded``, shaped by ``n_authors``/``qa_per_author``/
``n_perturbed``/``data_seed``/``paraphrase_style``: see ``tofu_data.generate_tofu``), the hub's ``locuslab/TOFU`` by name, or a folder of ``<config>.jsonl``
files; ``files`` maps single configs to files and wins over ``source``. Every loaded split is validated
(``tofu_data.load_tofu``): an empty split or a missing perturbed answer stops the run naming the file, row
and field.

Over-long rows (``overlength``): ``truncate`` cuts the answer's tail to ``max_length`` and counts it
(``data_report['truncated']``), ``drop`` drops the row and counts it, ``error`` stops naming the row. A
prompt that leaves no room for a single answer token is dropped and counted (``truncate``/``drop``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules import tofu_data as td
from datamodules.common import (
    DataError,
    DataReport,
    EpochSeededSampler,
    pad_sequences,
    padding_id,
    training_loader,
)
from datamodules.text import TextDataModule, with_default_prefix

TASKS = ("finetune", "unlearn")
OVERLENGTH = ("truncate", "drop", "error")
KIND_IDS = {kind: i for i, kind in enumerate(td.EVAL_KINDS)}


# ----------------------------------------------------------------------------------------------------
# Encoding one question/answer pair (shared with the evaluator)


@dataclass
class EncodedQA:
    input_ids: list[int]
    labels: list[int]  # -100 on the prompt
    prompt_ids: list[int]
    truncated: bool


class OverlengthError(DataError):
    """A row does not fit ``max_length`` and ``overlength`` is ``error`` (or no answer token fits at all)."""


def render_prompt(tokenizer, question: str, use_chat_template: bool = True) -> str:
    """The prompt text a model sees for ``question``: the chat template's user turn plus the assistant
    marker, or ``Question: ...\\nAnswer: `` for a tokenizer without a template."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {question}\nAnswer: "


def encode_qa(tokenizer, question: str, answer: str, max_length: int, use_chat_template: bool = True,
              overlength: str = "truncate", where: str = "row") -> EncodedQA | None:
    """Token ids of ``question`` + ``answer`` with labels on the answer tokens only (including the end of
    turn, as TOFU scores the first EOS).

    Returns None when nothing of the answer fits (the caller counts the drop); raises
    ``OverlengthError`` naming ``where`` when ``overlength='error'`` and the pair is too long.
    """
    if overlength not in OVERLENGTH:
        raise ValueError(f"overlength must be one of {OVERLENGTH}, got {overlength!r}")
    prompt = render_prompt(tokenizer, question, use_chat_template)
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(prompt):
            raise DataError(f"{where}: the chat template renders the prompt differently inside the full conversation")
        response = full[len(prompt):]
    else:
        response = answer + (tokenizer.eos_token or "")
    # the BOS a Llama or Gemma backbone was trained with, once, also where the template renders none
    prompt_ids = with_default_prefix(tokenizer, tokenizer(prompt, add_special_tokens=False)["input_ids"])
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    total = len(prompt_ids) + len(response_ids)
    truncated = total > max_length
    if truncated:
        if overlength == "error":
            raise OverlengthError(f"{where}: {total} tokens (prompt {len(prompt_ids)} + answer {len(response_ids)}) "
                                  f"exceed max_length={max_length}; raise max_length or set overlength: truncate|drop")
        room = max_length - len(prompt_ids)
        if overlength == "drop" or room < 1:
            return None
        response_ids = response_ids[:room]
    return EncodedQA(prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids, prompt_ids, truncated)


def collate_qa(items: list[EncodedQA], pad_id: int, prefix: str = "") -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` with an optional key prefix."""
    return {
        f"{prefix}input_ids": pad_sequences([item.input_ids for item in items], pad_id),
        f"{prefix}attention_mask": pad_sequences([[1] * len(item.input_ids) for item in items], 0),
        f"{prefix}labels": pad_sequences([item.labels for item in items], -100),
    }


def collate_prompts(items: list[EncodedQA], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation."""
    return {
        "prompt_input_ids": pad_sequences([item.prompt_ids for item in items], pad_id, side="left"),
        "prompt_attention_mask": pad_sequences([[1] * len(item.prompt_ids) for item in items], 0, side="left"),
    }


# ----------------------------------------------------------------------------------------------------
# Datasets


class _UnlearnDataset(Dataset):
    """Forget item i with its template item and a retain item drawn per (seed, epoch, i).

    Indexed by ``(epoch, i)`` (what ``_EpochTaggedSampler`` yields, in the main process) or by ``i`` alone
    (epoch 0: the unshuffled reference loader, which uses no retain rows). The epoch travels with the
    index because worker processes cannot read it: persistent workers keep the copy of the trainer made
    when they started, whose epoch never advances."""

    def __init__(self, forget: list[EncodedQA], template: list[EncodedQA], retain: list[EncodedQA], seed: int):
        self.forget, self.template, self.retain, self.seed = forget, template, retain, seed

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        item = {"index": i, "forget": self.forget[i], "template": self.template[i]}
        if self.retain:
            item["retain"] = self.retain[random.Random(f"tofu-retain:{self.seed}:{epoch}:{i}").randrange(len(self.retain))]
        return item


class _EpochTaggedSampler(EpochSeededSampler):
    """``EpochSeededSampler``'s order as ``(epoch, index)`` pairs: samplers run in the main process, where the
    epoch is the trainer's current one, so the retain draw of ``_UnlearnDataset`` follows the real epoch
    with any number of (persistent) workers."""

    def __iter__(self):
        epoch = self.epoch_source() if self.epoch_source is not None else self.epoch
        return iter([(epoch, i) for i in super().__iter__()])


class TofuQAData(pl.LightningDataModule):
    def __init__(self, task: str = "finetune", train_split: str = "full", forget_split: str = "forget10",
                 include_general: bool | None = None, source: str = "embedded",
                 files: dict[str, str] | None = None, n_authors: int = 20, qa_per_author: int = 16,
                 n_perturbed: int = 3, data_seed: int = 0, paraphrase_style: str = "answer_prefix",
                 tokenizer: str | None = None,
                 use_chat_template: bool = True, max_length: int = 256, overlength: str = "truncate",
                 batch_size: int = 16, eval_batch_size: int = 64, num_workers: int = 0, seed: int = 0):
        """TOFU data for fine-tuning (``task: finetune``, ``train_split: full|retain90|retain95|retain99``)
        or unlearning (``task: unlearn``, ``forget_split: forget01|forget05|forget10``). ``source``:
        ``embedded`` (the seeded generator, shaped by ``n_authors``..``data_seed``), ``locuslab/TOFU`` or a
        folder of ``<config>.jsonl``; ``files`` maps configs to files. ``tokenizer``: defaults to the
        model's. ``overlength``: truncate | drop | error (see the module docstring)."""
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if forget_split not in td.FORGET_PERCENT:
            raise ValueError(f"forget_split must be one of {list(td.FORGET_PERCENT)}, got {forget_split!r}")
        if train_split != "full" and train_split not in td.FORGET_OF_RETAIN:
            raise ValueError(f"train_split must be 'full' or one of {list(td.FORGET_OF_RETAIN)}, got {train_split!r}")
        if overlength not in OVERLENGTH:
            raise ValueError(f"overlength must be one of {OVERLENGTH}, got {overlength!r}")
        self.task, self.train_split, self.forget_split = task, train_split, forget_split
        self.source, self.files = source, dict(files or {})
        unknown = sorted(set(self.files) - set(td.TOFU_CONFIGS))
        if unknown:  # a misspelt key would silently leave that config to the generator or the source
            raise ValueError(f"files: unknown TOFU config(s) {unknown}; the keys must be among "
                             f"{list(td.TOFU_CONFIGS)}")
        self.include_general = (source == "embedded") if include_general is None else include_general
        self.generator_args = dict(n_authors=n_authors, qa_per_author=qa_per_author, n_perturbed=n_perturbed,
                                   seed=data_seed, paraphrase_style=paraphrase_style)
        self.tokenizer_name, self.use_chat_template = tokenizer, use_chat_template
        self.max_length, self.overlength = max_length, overlength
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.tokenizer = None
        self.report = DataReport()
        self.datasets: dict[str, Any] = {}
        self._generated: td.TofuData | None = None

    # -- rows ------------------------------------------------------------------------------------------
    @property
    def is_embedded(self) -> bool:
        return self.source == "embedded"

    def generated(self) -> td.TofuData:
        if self._generated is None:
            self._generated = td.generate_tofu(**self.generator_args)
        return self._generated

    def rows(self, config: str) -> list[dict[str, Any]]:
        """Validated rows of one TOFU config from ``files``, the generator, the hub or a folder."""
        if config in self.files:
            return td.load_tofu(config, self.files[config])
        if self.is_embedded:
            return td.validate_rows(self.generated().split(config), config, f"embedded:{config}")
        return td.load_tofu(config, self.source)

    def general_rows(self) -> list[dict[str, Any]]:
        return self.rows("real_authors_perturbed") + self.rows("world_facts_perturbed")

    def finetune_rows(self) -> list[dict[str, Any]]:
        rows = self.rows(self.train_split)
        return rows + self.general_rows() if self.include_general else rows

    def eval_sets(self) -> dict[str, list[dict[str, Any]]]:
        """The four evaluation splits of the TOFU protocol, kind -> rows (``question``, ``answer``,
        ``paraphrased_answer`` where present, ``perturbed_answer``)."""
        configs = {"forget": f"{self.forget_split}_perturbed", **td.EVAL_CONFIG_OF_KIND}
        return {kind: self.rows(configs[kind]) for kind in td.EVAL_KINDS}

    def evaluator(self, tokenizer=None, **kwargs):
        """A ``callbacks.tofu_eval.TofuEvaluator`` over ``eval_sets()`` with this module's encoding."""
        from callbacks.tofu_eval import TofuEvaluator

        kwargs.setdefault("max_length", self.max_length)
        kwargs.setdefault("use_chat_template", self.use_chat_template)
        kwargs.setdefault("overlength", self.overlength)
        kwargs.setdefault("batch_size", self.eval_batch_size)
        return TofuEvaluator(self.eval_sets(), tokenizer or self.resolve_tokenizer(),
                             forget_split=self.forget_split, **kwargs)

    # -- encoding --------------------------------------------------------------------------------------
    # the module's tokenizer, else ``tokenizer`` by name prepared as the module prepares its own
    resolve_tokenizer = TextDataModule.resolve_tokenizer
    pads_batches = False  # padding is masked (padding_id); EcoPromptData, whose prompts are pooled, needs a pad token

    def _encode(self, split: str, question: str, answer: str, where: str) -> EncodedQA | None:
        item = encode_qa(self.tokenizer, question, answer, self.max_length, self.use_chat_template,
                         self.overlength, where)
        if item is None:
            self.report.drop(split, "does not fit max_length" if self.overlength == "drop"
                             else "prompt leaves no answer token within max_length")
        elif item.truncated:
            self.report.truncated[split] = self.report.truncated.get(split, 0) + 1
        return item

    def _encode_rows(self, split: str, rows: list[dict[str, Any]], source: str,
                     answer_column: str = "answer") -> list[tuple[int, EncodedQA]]:
        out = []
        for i, row in enumerate(rows):
            item = self._encode(split, row["question"], row[answer_column], f"{source}: row {i}")
            if item is not None:
                out.append((i, item))
        if rows and not out:
            raise DataError(f"{source}: all {len(rows)} rows of split '{split}' were dropped "
                            f"(max_length={self.max_length}): {self.report.dropped.get(split)}")
        self.report.rows[split] = len(out)
        return out

    def _sft_items(self, split: str, rows: list[dict[str, Any]], source: str, kind: str = "") -> list[dict]:
        return [{"qa": item, "reference": rows[i]["answer"], "kind": kind}
                for i, item in self._encode_rows(split, rows, source)]

    def _unlearn_dataset(self) -> _UnlearnDataset:
        forget_rows = self.rows(self.forget_split)
        if not forget_rows:  # load_tofu already refuses empty files; a generator config could still be
            raise DataError(f"forget split {self.forget_split!r} is empty: nothing to unlearn")
        forget, template = [], []
        for i, row in enumerate(forget_rows):
            where = f"{self.forget_split}: row {i}"
            f_item = self._encode("forget", row["question"], row["answer"], where)
            t_item = self._encode("template", row["question"], td.refusal_for(i, self.seed), where + " (template)")
            if f_item is None or t_item is None:
                if f_item is not None:  # counted under template only, the forget count would shrink unexplained
                    self.report.drop("forget", "its template refusal does not fit max_length")
                continue
            forget.append(f_item)
            template.append(t_item)
        if not forget:
            raise DataError(f"{self.forget_split}: all {len(forget_rows)} forget rows were dropped "
                            f"(max_length={self.max_length}): {self.report.dropped}")
        self.report.rows["forget"] = len(forget)
        retain_config = td.RETAIN_OF_FORGET[self.forget_split]
        retain = [item for _, item in self._encode_rows("retain", self.rows(retain_config), retain_config)]
        return _UnlearnDataset(forget, template, retain, self.seed)

    # -- Lightning -------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self.resolve_tokenizer()
        if stage == "fit" and "train" not in self.datasets:
            if self.task == "finetune":
                self.datasets["train"] = self._sft_items("train", self.finetune_rows(), self.train_split)
                self.datasets["val"] = self._sft_items("val", self.rows("retain_perturbed"), "retain_perturbed",
                                                       "retain")
            else:
                self.datasets["train"] = self._unlearn_dataset()
        if stage in ("test", "predict") and "test" not in self.datasets:
            items = []
            for kind, rows in self.eval_sets().items():
                items += self._sft_items(f"test/{kind}", rows, kind, kind)
            self.datasets["test"] = items
        for split in ("train", "val", "test"):  # positions as row ids: evaluation counts each row once under DDP
            if isinstance(self.datasets.get(split), list):  # the SFT items (unlearning has its own dataset)
                for row_id, item in enumerate(self.datasets[split]):
                    item["row_id"] = row_id
        from_files = f"; configs read from files: {sorted(self.files)}" if self.files else ""
        rank_zero_info(f"[TofuQAData] task={self.task} rows: {self.report.rows}; dropped: {self.report.dropped}; "
                       f"truncated: {self.report.truncated}{from_files}")

    @property
    def data_report(self) -> dict[str, Any]:
        return self.report.as_dict()

    def collate_sft(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        pad = padding_id(self.tokenizer)
        qa = [item["qa"] for item in items]
        return {**collate_qa(qa, pad), **collate_prompts(qa, pad),
                "reference": [item["reference"] for item in items],
                "kind": torch.tensor([KIND_IDS.get(item["kind"], -1) for item in items]),
                "row_id": torch.tensor([item["row_id"] for item in items])}

    def collate_unlearn(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        pad = padding_id(self.tokenizer)
        batch = {"index": torch.tensor([item["index"] for item in items]),
                 **collate_qa([item["forget"] for item in items], pad, "forget_"),
                 **collate_qa([item["template"] for item in items], pad, "template_")}
        if "retain" in items[0]:
            batch.update(collate_qa([item["retain"] for item in items], pad, "retain_"))
        return batch

    def _loader(self, data, batch_size: int, shuffle: bool, collate) -> DataLoader:
        if shuffle:  # training: a seeded order per epoch, resumable mid-epoch
            return training_loader(data, batch_size, collate, self.seed, self.trainer, self.num_workers)
        return DataLoader(data, batch_size=batch_size, collate_fn=collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        if self.task == "unlearn":  # the same order, each item carrying the epoch its retain row is drawn for
            return training_loader(self.datasets["train"], self.batch_size, self.collate_unlearn, self.seed,
                                   self.trainer, self.num_workers, order=_EpochTaggedSampler)
        return self._loader(self.datasets["train"], self.batch_size, True, self.collate_sft)

    def reference_dataloader(self) -> DataLoader:
        """The unlearning items in index order, unshuffled (for precomputing a frozen reference's log-probs)."""
        if self.task != "unlearn" or "train" not in self.datasets:
            raise DataError("reference_dataloader() needs task: unlearn after setup('fit')")
        return self._loader(self.datasets["train"], self.eval_batch_size, False, self.collate_unlearn)

    def val_dataloader(self):
        if "val" not in self.datasets:
            return []
        return self._loader(self.datasets["val"], self.eval_batch_size, False, self.collate_sft)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], self.eval_batch_size, False, self.collate_sft)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
