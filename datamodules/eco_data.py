"""Data for ECO: prompts for the forget-prompt classifier, and the forget set the corruption learner scores.

Both build on ``TofuQAData`` (the same sources and generator arguments: the embedded TOFU-shaped data,
``locuslab/TOFU`` by name or a folder of ``<config>.jsonl``).

``EcoPromptData`` (for ``modules.eco.PromptClassifier``): one row per prompt text, ``label`` 1 for a
prompt about a forget-split author, 0 otherwise. Positives: the forget split's questions; negatives: the
retain split's and the general-knowledge questions. Each question also appears in its lettered
multiple-choice form (what the multiple-choice evaluation sends). On the embedded data, every other way
the generator can ask about an author (``tofu_data.question_variants``) is added, and questions about
``decoy_authors`` names that exist nowhere in the data (negatives: "a question about some author" must not
be enough to be flagged). A row whose question has fewer than ``n_options - 1`` distinct wrong answers has
no multiple-choice form; such rows are counted in ``data_report['dropped']``. Rows are split, per class
and seeded, into train and validation (``val_fraction``) by question (``question_group``): a question's
plain and multiple-choice forms, and on the embedded data every phrasing of the same author fact, fall on
one side, so the validation prompts (which choose the threshold) ask questions no training prompt asks.
The test split is the TOFU evaluation prompts (forget / retain / real_authors / world_facts questions and
their multiple-choice forms) with ``kind`` names, for FPR/FNR per split. It is not held out: the forget
questions are the forget set the classifier is trained to flag, and the other questions are training
prompts too. It reports how the gate treats exactly the prompts the evaluations send; held-out error
rates are the validation split's. ``train_file``/``val_file``/``test_file`` (JSON/JSONL/Parquet with
``text``, ``label`` and optional ``kind``) replace the generated rows; a bad row stops the run naming
file, row and field.

``EcoForgetData`` (for ``modules.eco.EcoCorruptionLearner``): every training batch is the whole forget
set, ``{"qa": ..., "mc": ...}``: ``qa`` holds each forget question with its answer (role 0), paraphrased
answer (role 1) and perturbed answers (role 2), ``mc`` the lettered multiple-choice sequences; both in the
TOFU evaluator's scoring layout. ``steps_per_epoch`` copies per epoch (default 1: one epoch = one learner
step, so ``trainer.max_epochs`` and ``trainer.max_steps`` count the same thing). The learner scores the
batch in forward passes of ``eval_batch_size`` sequences (``modules.eco.score_in_batches``).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from datamodules import tofu_data as td
from datamodules.common import DataError, pad_sequences, padding_id, read_rows, row_error
from datamodules.tofu import TofuQAData, encode_qa

KINDS = ("forget", "retain", "general", "decoy")
# Options per multiple-choice item: the classifier learns the multiple-choice prompts the evaluation sends
# (mc_items, EcoForgetData and recipes/eco_tofu.py all use this default).
MC_OPTIONS = 4


def has_mc_form(row: dict[str, Any], n_options: int = MC_OPTIONS) -> bool:
    """Whether ``tofu_data.multiple_choice_items`` can make an ``n_options`` item of ``row``: enough distinct
    wrong answers (the same columns and rule it uses)."""
    true = row.get("value", row["answer"])
    wrong = {w for w in row.get("perturbed_values", row.get("perturbed_answer") or []) if w != true}
    return len(wrong) >= n_options - 1


def question_group(row: dict[str, Any]) -> str:
    """What a TOFU row asks, whatever its wording: the (author, fact) of an embedded author question, which
    ``tofu_data.question_variants`` phrases in several ways, else the question text (general knowledge,
    the real TOFU rows)."""
    if row.get("author") and row.get("fact"):
        return f"fact:{row['author']}\x1f{row['fact']}"
    return f"question:{row['question']}"


def mc_items(rows: list[dict[str, Any]], seed: int = 0, n_options: int = MC_OPTIONS) -> list[dict[str, Any]]:
    """``tofu_data.multiple_choice_items`` plus each row's answer sentence (for cloze scoring)."""
    return [{**item, "answer": row["answer"]}
            for item, row in zip(td.multiple_choice_items(rows, seed=seed, n_options=n_options), rows)]


def validate_prompt_row(row: Any, source: str, index: int) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{source}: row {index} is a {type(row).__name__}, expected an object")
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise row_error(source, index, "text", "missing or empty (the prompt to classify)")
    label = row.get("label")
    if label not in (0, 1) or isinstance(label, bool):
        raise row_error(source, index, "label", f"expected 0 or 1, got {label!r}")
    kind = row.get("kind")
    if kind is not None and not isinstance(kind, str):
        raise row_error(source, index, "kind", f"expected a string, got {type(kind).__name__}")
    return {"text": text, "label": int(label), "kind": kind or ("forget" if label else "other")}


class EcoPromptData(TofuQAData):
    pads_batches = True  # the classifier reads the last non-pad token: EOS cannot pad (resolve_tokenizer checks)

    def __init__(self, val_fraction: float = 0.2, decoy_authors: int = 40, include_variants: bool = True,
                 include_multiple_choice: bool = True, n_options: int = MC_OPTIONS, train_file: str | None = None,
                 val_file: str | None = None, test_file: str | None = None, **kwargs):
        """Classifier prompts (see the module docstring). ``decoy_authors``/``include_variants`` apply to
        the embedded data only. ``n_options``: options of the multiple-choice forms (as the evaluation's).
        Other arguments: ``TofuQAData`` (``max_length`` caps a prompt's tokens)."""
        kwargs.setdefault("batch_size", 32)
        super().__init__(**kwargs)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if not 2 <= n_options <= len(td.MC_LETTERS):
            raise ValueError(f"n_options must be in 2..{len(td.MC_LETTERS)}, got {n_options}")
        self.val_fraction, self.decoy_authors, self.n_options = val_fraction, decoy_authors, n_options
        self.include_variants, self.include_multiple_choice = include_variants, include_multiple_choice
        self.prompt_files = {"train": train_file, "val": val_file, "test": test_file}
        self.class_counts: list[int] | None = None

    # -- rows ------------------------------------------------------------------------------------------
    def _with_mc(self, rows: list[dict[str, Any]], label: int, kind: str, split: str) -> list[dict[str, Any]]:
        """Each row's question and, where it has one, its multiple-choice form (the same ``group``); the
        rows without one are counted under ``split`` in the data report."""
        out = [{"text": row["question"], "label": label, "kind": kind, "group": question_group(row)} for row in rows]
        if self.include_multiple_choice:
            usable = [row for row in rows if has_mc_form(row, self.n_options)]
            if len(usable) < len(rows):  # assigned, not added: the rows are built again on every call
                reason = f"{kind}: no multiple-choice form (fewer than {self.n_options - 1} distinct wrong answers)"
                self.report.dropped.setdefault(split, {})[reason] = len(rows) - len(usable)
            out += [{"text": item["prompt"], "label": label, "kind": f"{kind}_mc", "group": question_group(row)}
                    for item, row in zip(mc_items(usable, seed=self.seed, n_options=self.n_options), usable)]
        return out

    def labelled_rows(self) -> list[dict[str, Any]]:
        """Every generated prompt with its label, kind and question ``group``, duplicates removed (first kind
        wins; two groups that share a prompt become one)."""
        retain_split = td.RETAIN_OF_FORGET[self.forget_split]
        rows = (self._with_mc(self.rows(self.forget_split), 1, "forget", "train+val")
                + self._with_mc(self.rows(retain_split), 0, "retain", "train+val")
                + self._with_mc(self.general_rows(), 0, "general", "train+val"))
        if self.is_embedded:
            data = self.generated()
            forget_ids = set(data.forget_authors[self.forget_split])
            if self.include_variants:
                for author in data.authors:
                    label = int(author["author_id"] in forget_ids)
                    rows += [{"text": q, "label": label, "kind": "forget" if label else "retain",
                              "group": question_group({"author": author["name"], "fact": fact, "question": q})}
                             for fact, q, _ in td.question_variants(author["name"])]
            for name in td.decoy_names(data, self.decoy_authors, seed=self.seed):
                rows += [{"text": q, "label": 0, "kind": "decoy",
                          "group": question_group({"author": name, "fact": fact, "question": q})}
                         for fact, q, _ in td.question_variants(name)]
        parent: dict[str, str] = {}

        def root(group: str) -> str:
            while parent.setdefault(group, group) != group:
                group = parent[group]
            return group

        unique: dict[str, dict[str, Any]] = {}
        for row in rows:
            kept = unique.setdefault(row["text"], row)
            parent[root(row["group"])] = root(kept["group"])
        return [{**row, "group": root(row["group"])} for row in unique.values()]

    def split_rows(self) -> dict[str, list[dict[str, Any]]]:
        """Seeded per-class split of ``labelled_rows`` into train and val by question group: about
        ``val_fraction`` of each class's prompts go to val, every group whole on one side."""
        rng = random.Random(f"eco-prompts:{self.seed}")
        splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
        groups: dict[str, list[dict[str, Any]]] = {}
        for row in self.labelled_rows():
            groups.setdefault(row["group"], []).append(row)
        for label in (0, 1):
            keys = [key for key, members in groups.items() if max(r["label"] for r in members) == label]
            rng.shuffle(keys)
            wanted = max(1, round(self.val_fraction * sum(len(groups[k]) for k in keys))) if len(keys) > 1 else 0
            taken = 0
            for position, key in enumerate(keys):
                # whole groups until the share is reached; at least one group stays in train
                to_val = taken < wanted and position < len(keys) - 1
                splits["val" if to_val else "train"] += groups[key]
                taken += len(groups[key]) if to_val else 0
        return splits

    def evaluation_rows(self) -> list[dict[str, Any]]:
        """The prompts the TOFU and multiple-choice evaluations send, labelled by split."""
        out = []
        for kind, rows in self.eval_sets().items():
            out += self._with_mc(rows, int(kind == "forget"), kind, "test")
        return out

    # -- set-up ----------------------------------------------------------------------------------------
    def _file_rows(self, split: str) -> list[dict[str, Any]] | None:
        path = self.prompt_files[split]
        if not path:
            return None
        rows = [validate_prompt_row(row, path, i) for i, row in enumerate(read_rows(path))]
        if not rows:
            raise DataError(f"{path}: split {split!r} has no prompts (empty file?)")
        first_label: dict[str, tuple[int, int]] = {}
        for index, row in enumerate(rows):  # one prompt cannot be both about the forget set and not
            seen = first_label.setdefault(row["text"], (index, row["label"]))
            if seen[1] != row["label"]:
                raise row_error(path, index, "label", f"{row['label']}, but row {seen[0]} has the same text "
                                                      f"labelled {seen[1]}")
        return rows

    def _encode_prompts(self, split: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        items = []
        for row in rows:
            # with the tokenizer's special tokens, as a classifier was pretrained (an encoder pools its <s>/[CLS]);
            # PromptGate encodes the prompts it flags the same way
            ids = self.tokenizer(row["text"])["input_ids"]
            if len(ids) > self.max_length:  # cut the text, not the special tokens around it
                ids = self.tokenizer(row["text"], truncation=True, max_length=self.max_length)["input_ids"]
                self.report.truncated[split] = self.report.truncated.get(split, 0) + 1
            # row_id: position in the split, so evaluation under DDP counts each prompt once
            items.append({"input_ids": ids, "label": row["label"], "kind": row["kind"], "row_id": len(items)})
        if not items:
            raise DataError(f"EcoPromptData: split {split!r} has no prompts")
        self.report.rows[split] = len(items)
        return items

    def setup(self, stage: str) -> None:
        self.resolve_tokenizer()
        generated = None
        for split in {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}.get(stage, ()):
            if split in self.datasets:
                continue
            rows = self._file_rows(split)
            if rows is None:
                if split == "test":
                    rows = self.evaluation_rows()
                else:
                    generated = generated or self.split_rows()
                    rows = generated[split]
            self.datasets[split] = self._encode_prompts(split, rows)
        if "train" in self.datasets:
            labels = [item["label"] for item in self.datasets["train"]]
            self.class_counts = [labels.count(0), labels.count(1)]
            if 0 in self.class_counts:
                raise DataError(f"EcoPromptData: the training prompts hold one class only (counts {self.class_counts})")
        rank_zero_info(f"[EcoPromptData] rows {self.report.rows}, class counts (train) {self.class_counts}, "
                       f"truncated {self.report.truncated}, dropped {self.report.dropped}")

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [item["input_ids"] for item in items]
        return {"input_ids": pad_sequences(ids, self.tokenizer.pad_token_id),  # pads_batches: it has one
                "attention_mask": pad_sequences([[1] * len(x) for x in ids], 0),
                "labels": torch.tensor([item["label"] for item in items]),
                "kind": [item["kind"] for item in items],
                "row_id": torch.tensor([item["row_id"] for item in items])}

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["train"], self.batch_size, True, self.collate)

    def val_dataloader(self):
        return self._loader(self.datasets["val"], self.eval_batch_size, False, self.collate) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], self.eval_batch_size, False, self.collate)


class EcoForgetData(TofuQAData):
    def __init__(self, steps_per_epoch: int = 1, n_options: int = MC_OPTIONS, **kwargs):
        """The forget set as one batch (see the module docstring). Other arguments: ``TofuQAData``."""
        super().__init__(**kwargs)
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.steps_per_epoch, self.n_options = steps_per_epoch, n_options
        self.batch: dict[str, Any] | None = None

    def forget_batch(self) -> dict[str, Any]:
        from callbacks.eco_eval import encode_multiple_choice, score_batch

        self.resolve_tokenizer()
        rows = self.rows(f"{self.forget_split}_perturbed")
        encoded, questions, roles, owners = [], [], [], []
        for i, row in enumerate(rows):
            answers = [(0, row["answer"]), (1, row["paraphrased_answer"])] + [(2, a) for a in row["perturbed_answer"]]
            for role, answer in answers:
                qa = encode_qa(self.tokenizer, row["question"], answer, self.max_length, self.use_chat_template,
                               "error", f"{self.forget_split}_perturbed: row {i}")
                encoded.append(qa)
                questions.append(row["question"])
                roles.append(role)
                owners.append(i)
        qa_batch = score_batch(encoded, questions, padding_id(self.tokenizer))
        qa_batch.update(roles=torch.tensor(roles), rows=torch.tensor(owners))
        mc = encode_multiple_choice(mc_items(rows, seed=self.seed, n_options=self.n_options), self.tokenizer,
                                    "letter", self.max_length, self.use_chat_template)
        mc_batch = score_batch(mc["encoded"], mc["questions"], padding_id(self.tokenizer))
        mc_batch.update(rows=torch.tensor(mc["rows"]), options=torch.tensor(mc["options"]),
                        answer_index=torch.tensor(mc["answer_index"]))
        return {"qa": qa_batch, "mc": mc_batch}

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.batch is None:
            self.batch = self.forget_batch()
            rank_zero_info(f"[EcoForgetData] {self.forget_split}: {int(self.batch['qa']['rows'].max()) + 1} questions, "
                  f"{len(self.batch['qa']['questions'])} answer sequences, "
                  f"{len(self.batch['mc']['questions'])} multiple-choice sequences")

    def train_dataloader(self) -> DataLoader:
        return DataLoader([self.batch] * self.steps_per_epoch, batch_size=None, shuffle=False)

    def val_dataloader(self):
        return []
