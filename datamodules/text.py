"""Base of the text data modules: where rows come from, how bad rows are handled, and the loaders.

Rows come from one of three places, in this order of precedence:
1. local files (``train_file``/``val_file``/``test_file``: JSON, JSONL or Parquet);
2. a hub dataset by name (``dataset``, ``dataset_config``, ``*_split``);
3. the embedded generator of the subclass (seeded, nothing to download).

The tokenizer is the model's (``trainer.lightning_module.tokenizer``), so the data always matches the
model it feeds; ``tokenizer`` names one explicitly for use without a trainer.
"""

from __future__ import annotations

import weakref
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from datamodules.common import (
    DataError,
    DataReport,
    check_side,
    kinds_grouping_separates,
    read_rows,
    shards_parameters,
    training_loader,
)

SPLITS = ("train", "val", "test", "predict")


class TextDataModule(pl.LightningDataModule):
    def __init__(self, train_file: str | None = None, val_file: str | None = None,
                 test_file: str | None = None, dataset: str | None = None,
                 dataset_config: str | None = None, train_split: str = "train",
                 val_split: str | None = "validation", test_split: str | None = "test",
                 tokenizer: str | None = None, max_length: int = 512, truncation_side: str = "right",
                 batch_size: int = 32, eval_batch_size: int | None = None, invalid_rows: str = "error",
                 num_workers: int = 0, seed: int = 0, group_by_length: bool = False):
        """``group_by_length``: training batches of items of similar length (``LengthGroupedSampler``),
        so less compute goes to padding; the batches are still drawn at random, but no longer uniformly.
        Where length follows the kind of item (a task with short answers), each batch holds one kind, which
        can cost accuracy on the rarer kinds; the training loader warns where it finds this (``item_kind``;
        README: length-grouped batches)."""
        super().__init__()
        if invalid_rows not in ("error", "drop"):
            raise ValueError(f"invalid_rows must be 'error' or 'drop', got {invalid_rows!r}")
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.dataset, self.dataset_config = dataset, dataset_config
        self.hub_splits = {"train": train_split, "val": val_split, "test": test_split}
        self.tokenizer_name = tokenizer
        self.max_length = max_length
        self.truncation_side = check_side(truncation_side, "truncation_side")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.invalid_rows = invalid_rows
        self.num_workers = num_workers
        self.seed = seed
        self.group_by_length = group_by_length
        self.tokenizer = None
        self.report = DataReport()
        self.datasets: dict[str, list[dict[str, Any]]] = {}

    # -- subclass interface ----------------------------------------------------------------------------
    def embedded_rows(self, split: str) -> list[dict[str, Any]] | None:
        """Rows of the embedded default for a split, or None if it has no such split."""
        return None

    def encode(self, row: dict[str, Any], split: str, source: str, index: int) -> dict[str, Any] | None:
        """Validate and tokenize one row. Raise ``DataError`` for a bad row (dropped and counted when
        ``invalid_rows='drop'``); return None only after counting the reason in ``self.report``."""
        raise NotImplementedError

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def item_length(self, item: dict[str, Any]) -> int:
        """The padded width an encoded item needs in a batch (for ``group_by_length``)."""
        raise NotImplementedError(f"{type(self).__name__} does not support group_by_length")

    def item_kind(self, item: dict[str, Any]) -> str | None:
        """The kind of an encoded item (a preference pair's subset), whose mixing in grouped batches
        ``group_by_length`` checks; None where the data have no kinds."""
        return None

    # -- sources ---------------------------------------------------------------------------------------
    def source_rows(self, split: str) -> tuple[list[dict[str, Any]] | None, str]:
        if self.files.get(split):
            return read_rows(self.files[split]), self.files[split]
        if self.dataset and self.hub_splits.get(split):
            return read_rows(self.dataset, self.hub_splits[split], self.dataset_config), \
                f"{self.dataset}[{self.hub_splits[split]}]"
        if self.files["train"] or self.dataset:
            return None, ""  # a user-provided dataset without this split
        return self.embedded_rows(split) or None, f"embedded:{type(self).__name__}[{split}]"  # size 0: no split

    def has_split(self, split: str) -> bool:
        """Whether ``split`` has a source (a file, a hub split or the embedded data); reads no file."""
        if self.files.get(split):
            return True
        if self.files["train"] or self.dataset:
            return bool(self.dataset and self.hub_splits.get(split))
        return bool(self.embedded_rows(split))

    # whether batches need the tokenizer's own pad token: a reward or value read at the last non-pad token
    # (others pad with datamodules.common.padding_id, EOS where there is no pad token, since padding is masked)
    pads_batches = False

    def resolve_tokenizer(self):
        """The module's tokenizer (the same object, with the pad token the module gave it), else
        ``tokenizer`` by name, prepared as the module prepares its own; one set already is kept. With
        ``pads_batches`` a tokenizer without a pad token is an error naming it."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if self.tokenizer is None and self.tokenizer_name is None and getattr(module, "tokenizer", None) is not None:
            self.tokenizer = module.tokenizer
        elif self.tokenizer is None:
            from modules.lm import ensure_distinct_pad_token, load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer_name or "tiny")
            prepare = getattr(module, "prepare_tokenizer", None)
            if prepare is not None:
                prepare(self.tokenizer)  # as the module prepared its own, so the two agree on the pad token's id
            elif self.pads_batches and module is None:
                # alone, as the modules that pool at the last non-pad token do to theirs (a module without
                # prepare_tokenizer keeps its model's vocabulary: no token is added behind its back)
                ensure_distinct_pad_token(self.tokenizer)
        if self.pads_batches and self.tokenizer.pad_token_id is None:
            name = self.tokenizer_name or getattr(module, "model_name_or_path", None) or "the model's"
            raise DataError(f"tokenizer {name} has no pad token, which {type(self).__name__} needs to batch "
                            f"sequences of different lengths; its module should set one "
                            f"(modules.lm.ensure_distinct_pad_token, as RewardModel and DAPOCritic do)")
        return self.tokenizer

    def load_split(self, split: str) -> list[dict[str, Any]] | None:
        rows, source = self.source_rows(split)
        if rows is None:
            return None
        if not rows:  # an empty split would train or score nothing and still exit 0
            raise DataError(f"{source}: split '{split}' has no rows (empty file?)")
        encoded = []
        for index, row in enumerate(rows):
            try:
                item = self.encode(row, split, source, index)
            except DataError as error:
                if self.invalid_rows == "error":
                    raise
                self.report.drop(split, error.reason)
                continue
            if item is not None:
                encoded.append(item)
        if rows and not encoded:
            raise DataError(f"{source}: all {len(rows)} rows of split '{split}' were dropped; "
                            f"see the counts: {self.report.dropped.get(split)}")
        self.report.rows[split] = len(encoded)
        return encoded

    def setup(self, stage: str) -> None:
        self.resolve_tokenizer()
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",),
                  "predict": ("test",)}.get(stage, ())
        for split in wanted:
            if split not in self.datasets:
                loaded = self.load_split(split)
                if loaded is not None:
                    self.datasets[split] = loaded
        if stage == "fit" and "train" not in self.datasets:
            raise DataError("no training data: set train_file, dataset, or use the embedded default")
        if stage == "validate" and "val" not in self.datasets:  # else `validate` runs nothing and exits 0
            where = ("set val_file, or val_split for the hub dataset" if self.files["train"] or self.dataset
                     else "the embedded data has no validation split here (val_size 0?); set val_file")
            raise DataError(f"no validation data for `validate`: {where} (`test` evaluates the test split)")
        rank_zero_info(f"[{type(self).__name__}] rows: {self.report.rows}; dropped: {self.report.dropped}; "
                       f"truncated: {self.report.truncated}")

    @property
    def data_report(self) -> dict[str, Any]:
        return self.report.as_dict()

    # -- loaders ---------------------------------------------------------------------------------------
    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        data = self.datasets[split]
        if shuffle:  # training: a seeded order per epoch, resumable mid-epoch
            lengths = [self.item_length(item) for item in data] if self.group_by_length else None
            if lengths is not None:
                self._warn_if_grouping_separates_kinds(data, lengths, batch_size)
            return training_loader(data, batch_size, self.collate, self.seed, self.trainer, self.num_workers, lengths)
        return DataLoader(data, batch_size=batch_size, collate_fn=self.collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def _warn_if_grouping_separates_kinds(self, data: list[dict[str, Any]], lengths: list[int], batch_size: int) -> None:
        kinds = [self.item_kind(item) for item in data]
        if None in kinds or len(set(kinds)) < 2:
            return
        separated = kinds_grouping_separates(lengths, kinds, batch_size, self.seed)
        if separated:
            shares = ", ".join(f"{kind!r} is in {grouped:.0%} of the batches (uniform: {uniform:.0%})"
                               for kind, (grouped, uniform) in separated.items())
            rank_zero_warn(f"group_by_length: length follows the subset here, so grouped batches keep the subsets "
                           f"apart: {shares}. Each step then trains on fewer subsets at once, which cost a rare "
                           "subset its accuracy in the curation recipe (README: length-grouped batches); "
                           "set group_by_length=false if it does here.")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self):
        return self._loader("val", self.eval_batch_size, shuffle=False) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        if "test" not in self.datasets:
            raise DataError("no test data: set test_file or test_split")
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        loader = self.test_dataloader()
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1 or not shards_parameters(trainer.strategy):
            return loader
        # a sharded model's forward is collective, so every process must run as many batches as the others;
        # Lightning's predict split leaves some a batch short (a hang). Pad by repeating rows, as for test:
        # the outputs carry row ids, by which the scorer's merge drops the repeats
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                     shuffle=False, drop_last=False)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


# ----------------------------------------------------------------------------------------------------
# Conversations

ROLES = ("system", "user", "assistant")


def validate_text(value: Any, source: str, index: int, field_name: str) -> str:
    from datamodules.common import row_error

    if value is None:
        raise row_error(source, index, field_name, "missing")
    if not isinstance(value, str):
        raise row_error(source, index, field_name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise row_error(source, index, field_name, "empty")
    return value


def validate_messages(value: Any, source: str, index: int, field_name: str) -> list[dict[str, str]]:
    """A list of ``{role, content}`` with known roles and non-empty string content."""
    from datamodules.common import row_error

    if not isinstance(value, list) or not value:
        raise row_error(source, index, field_name, "expected a non-empty list of {role, content} messages")
    for turn, message in enumerate(value):
        where = f"{field_name}[{turn}]"
        if not isinstance(message, dict):
            raise row_error(source, index, where, f"expected an object, got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise row_error(source, index, f"{where}.role", f"unknown role {message.get('role')!r}; use one of {ROLES}")
        validate_text(message.get("content"), source, index, f"{where}.content")
    return value


def render_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def default_prefix_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts in front of a text by default (Llama's and Gemma's BOS; none for
    Qwen), found by encoding a probe text with and without special tokens. Plain text that is encoded with
    ``add_special_tokens=False`` (``encode_text``) needs them prepended, as the model saw in pre-training."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    special = set(tokenizer.all_special_ids)
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start]) if all(token in special for token in full[:start]) else []
    return []


_PREFIXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its default_prefix_ids


def cached_prefix_ids(tokenizer) -> list[int]:
    """``default_prefix_ids``, computed once per tokenizer object (its BOS handling is not changed after)."""
    if tokenizer not in _PREFIXES:
        _PREFIXES[tokenizer] = default_prefix_ids(tokenizer)
    return _PREFIXES[tokenizer]


def with_default_prefix(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` starting with the tokenizer's ``default_prefix_ids`` (the BOS a Llama or Gemma backbone was
    trained with), added once: unchanged if they already start so, as a chat template that renders the BOS
    makes them. Every text the models see goes through this (``encode_prompt``, the preference sides, SFT
    prompts), so one that lacks its BOS, plain text or a template without one, gets it."""
    prefix = cached_prefix_ids(tokenizer)
    return ids if ids[:len(prefix)] == prefix else prefix + ids


def leading_prefix_length(tokenizer, ids: list[int]) -> int:
    """How many of ``ids``' first ids are the tokenizer's default prefix: ``truncate``'s ``keep_first``, so
    that cutting a long text on the left keeps its BOS at the start."""
    prefix = cached_prefix_ids(tokenizer)
    return len(prefix) if prefix and ids[:len(prefix)] == prefix else 0


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of already-formatted text. The chat template carries any BOS, so the tokenizer must not
    add another (a doubled BOS shifts every reward)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
