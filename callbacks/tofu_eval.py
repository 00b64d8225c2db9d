"""The TOFU evaluation protocol on any language model: a model-agnostic evaluator and a Lightning callback.

``TofuEvaluator`` holds the four tokenised evaluation splits (forget, retain, real_authors, world_facts)
and scores *any* object that implements the ``EvalLM`` protocol:

    score_tokens(batch)            -> (B, T-1) log-prob of each next token of batch["input_ids"]
    generate_answers(batch, n)     -> list of B greedy answers (decoded text, at most n new tokens)

Score batches carry ``input_ids``, ``attention_mask``, ``labels`` (-100 outside the answer),
``prompt_lengths`` and ``questions`` (the raw question text, e.g. for a prompt classifier); generation
batches carry left-padded ``prompt_input_ids``/``prompt_attention_mask`` and ``questions``. ``as_eval_lm``
adapts a Hugging Face causal LM, a LightningModule holding one (``.model``/``.tokenizer``) or a
``save_pretrained`` folder; an inference-time wrapper (ECO) implements the two methods itself.

Per sample it computes the mean token NLL of the answer, of the truth ratio's base answer and of every
perturbed answer (teacher forced) and the ROUGE-L recall of the greedy answer; ``modules.tofu_eval`` turns
them into Prob, truth ratio, Forget Quality (KS test against a saved retain-model evaluation) and Model
Utility. Results are saved in the ``save_eval`` layout plus the generations and the truncation counts.

``TofuEvaluation`` (callback) runs it every ``every_n_epochs`` training epochs (optionally also before
the first step) and at the end of ``test``; it logs ``val/...`` or ``test/...`` scalars (forget quality
and its log10, model utility, each split's prob / rougeL_recall / truth_ratio) to every logger and
writes one JSON per evaluation (``epoch_003.json``, ``start.json``, ``test.json``) and ``history.json``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from datamodules import tofu_data as td
from datamodules.common import padding_id
from datamodules.tofu import OVERLENGTH, EncodedQA, collate_prompts, collate_qa, encode_qa
from modules import tofu_eval as te
from modules.base import run_in_root_forward
from modules.lm import generation_sync_kwargs

# the config whose validation rules apply to each evaluation split
_VALIDATION_CONFIG = {"forget": "forget10_perturbed", "retain": "retain_perturbed",
                      "real_authors": "real_authors_perturbed", "world_facts": "world_facts_perturbed"}


# ----------------------------------------------------------------------------------------------------
# What the evaluator needs from a model


@runtime_checkable
class EvalLM(Protocol):
    def score_tokens(self, batch: dict[str, Any]) -> torch.Tensor: ...

    def generate_answers(self, batch: dict[str, Any], max_new_tokens: int) -> list[str]: ...


class HFEvalLM:
    """``EvalLM`` over a Hugging Face causal LM and its tokenizer (eval mode is the caller's business)."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.pad_id = padding_id(tokenizer)
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        # only a whole matrix tells the vocabulary size (FSDP and ZeRO-3 hold flat shards here)
        rows = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None
        if rows is not None and self.pad_id >= rows:  # an index error deep inside the model otherwise
            raise ValueError(f"the tokenizer pads with id {self.pad_id}, beyond the model's {rows} embeddings (a pad "
                             f"token added to the tokenizer only?); load the model with modules.lm.load_model("
                             f"path, tokenizer=tokenizer), which resizes them")

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score_tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        from modules.lm import token_logprobs

        device = self._device()
        logits = self.model(input_ids=batch["input_ids"].to(device),
                            attention_mask=batch["attention_mask"].to(device)).logits
        return token_logprobs(logits, batch["labels"].to(device)).float().cpu()

    @torch.no_grad()
    def generate_answers(self, batch: dict[str, Any], max_new_tokens: int) -> list[str]:
        device = self._device()
        prompt = batch["prompt_input_ids"].to(device)
        output = self.model.generate(
            input_ids=prompt, attention_mask=batch["prompt_attention_mask"].to(device), do_sample=False,
            max_new_tokens=max_new_tokens, pad_token_id=self.pad_id, eos_token_id=self.tokenizer.eos_token_id,
            **generation_sync_kwargs(self.model))
        return self.tokenizer.batch_decode(output[:, prompt.shape[1]:], skip_special_tokens=True)


def as_eval_lm(obj: Any, tokenizer=None) -> EvalLM:
    """Adapt ``obj`` to ``EvalLM``: an object with ``score_tokens``/``generate_answers`` is returned as is;
    a LightningModule with ``.model`` (and ``.tokenizer``), a HF causal LM (``tokenizer`` required) or a
    path/name loadable by ``modules.lm.load_model`` is wrapped in ``HFEvalLM``."""
    if isinstance(obj, EvalLM):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        from modules.lm import load_model, load_tokenizer

        tokenizer = tokenizer or load_tokenizer(str(obj))
        return HFEvalLM(load_model(str(obj), tokenizer=tokenizer).eval(), tokenizer)
    if isinstance(obj, pl.LightningModule) and isinstance(getattr(obj, "model", None), torch.nn.Module):
        return HFEvalLM(obj.model, tokenizer or obj.tokenizer)
    if isinstance(obj, torch.nn.Module) and hasattr(obj, "generate"):
        if tokenizer is None:
            raise ValueError("a bare Hugging Face model needs its tokenizer: as_eval_lm(model, tokenizer)")
        return HFEvalLM(obj, tokenizer)
    raise TypeError(f"cannot evaluate a {type(obj).__name__}: give a HF causal LM, a LightningModule with "
                    f".model, a model folder, or an object with score_tokens() and generate_answers()")


# ----------------------------------------------------------------------------------------------------
# The evaluator


class TofuEvaluator:
    """Tokenised TOFU evaluation splits and the loop that scores a model on them.

    ``sets``: kind -> rows (``question``, ``answer``, ``paraphrased_answer`` on forget/retain,
    ``perturbed_answer`` list); any subset of the kinds that includes the three utility splits (the forget
    split is optional). Rows are validated (missing or empty perturbed answers raise ``TofuDataError``
    naming split, row and field). ``overlength``: ``truncate`` (cut answers to ``max_length``, counted per
    split), ``drop`` (drop the sample, counted) or ``error``. ``max_new_tokens=None``: the longest
    ground-truth answer (in tokens) plus 8.
    """

    def __init__(self, sets: Mapping[str, Sequence[Mapping[str, Any]]], tokenizer, forget_split: str | None = None,
                 max_length: int = 256, batch_size: int = 64, max_new_tokens: int | None = None,
                 use_chat_template: bool = True, overlength: str = "truncate"):
        unknown = set(sets) - set(te.EVAL_KINDS)
        if unknown:
            raise ValueError(f"unknown evaluation splits {sorted(unknown)}; expected some of {te.EVAL_KINDS}")
        missing = [kind for kind in te.UTILITY_KINDS if kind not in sets]
        if missing:
            raise ValueError(f"model utility needs the splits {list(te.UTILITY_KINDS)}; missing {missing}")
        if overlength not in OVERLENGTH:
            raise ValueError(f"overlength must be one of {OVERLENGTH}, got {overlength!r}")
        self.tokenizer, self.forget_split = tokenizer, forget_split
        self.pad_id = padding_id(tokenizer)  # the pad token's id, else EOS's (padding is masked)
        self.max_length, self.batch_size = max_length, batch_size
        self.kinds = [kind for kind in te.EVAL_KINDS if kind in sets]
        # per kind: kept rows, and per kept row the (gt, base, perturbed...) encodings
        self.rows: dict[str, list[Mapping[str, Any]]] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self.requests: list[EncodedQA] = []  # every teacher-forced sequence
        self.request_questions: list[str] = []
        self.slots: dict[str, list[tuple[int, int, list[int]]]] = {}  # kind -> [(gt, base, [perturbed])]
        longest_answer = 1
        for kind in self.kinds:
            rows = td.validate_rows(list(sets[kind]), _VALIDATION_CONFIG[kind], f"eval:{kind}")
            base_column = td.BASE_ANSWER_COLUMN[kind]
            kept, slots, truncated, dropped = [], [], 0, 0
            for i, row in enumerate(rows):
                base = row.get(base_column)
                if not isinstance(base, str) or not base.strip():
                    raise td.TofuDataError(f"eval:{kind}: row {i}: field {base_column!r}: missing (the truth ratio's base answer)")
                answers = [row["answer"], base, *row["perturbed_answer"]]
                encoded = [encode_qa(tokenizer, row["question"], a, max_length, use_chat_template, overlength,
                                     f"eval:{kind}: row {i}") for a in answers]
                if any(e is None for e in encoded):
                    dropped += 1
                    continue
                truncated += any(e.truncated for e in encoded)
                start = len(self.requests)
                self.requests.extend(encoded)
                self.request_questions.extend([row["question"]] * len(encoded))
                slots.append((start, start + 1, list(range(start + 2, start + len(encoded)))))
                kept.append(row)
                longest_answer = max(longest_answer, sum(label != -100 for label in encoded[0].labels))
            if not kept:
                raise td.TofuDataError(f"eval:{kind}: all {len(rows)} samples were dropped (max_length={max_length})")
            self.rows[kind], self.slots[kind] = kept, slots
            self.counts[kind] = {"n": len(kept), "truncated": truncated, "dropped": dropped}
        self.max_new_tokens = max_new_tokens or longest_answer + 8
        # score in batches of similar length (less padding), scatter back by index
        self._order = sorted(range(len(self.requests)), key=lambda j: len(self.requests[j].input_ids))

    @classmethod
    def from_datamodule(cls, datamodule, tokenizer=None, **kwargs) -> TofuEvaluator:
        return datamodule.evaluator(tokenizer, **kwargs)

    def __repr__(self) -> str:
        return (f"TofuEvaluator(forget_split={self.forget_split!r}, samples={ {k: c['n'] for k, c in self.counts.items()} }, "
                f"sequences={len(self.requests)}, max_new_tokens={self.max_new_tokens})")

    # -- the loop ----------------------------------------------------------------------------------------
    def score_batches(self):
        """(indices into ``requests``, score batch) in length order."""
        pad = self.pad_id
        for start in range(0, len(self._order), self.batch_size):
            idx = self._order[start:start + self.batch_size]
            items = [self.requests[j] for j in idx]
            batch = collate_qa(items, pad)
            batch["prompt_lengths"] = torch.tensor([len(item.prompt_ids) for item in items])
            batch["questions"] = [self.request_questions[j] for j in idx]
            yield idx, batch

    def generation_batches(self):
        """(kind, row indices, generation batch) for every split."""
        pad = self.pad_id
        for kind in self.kinds:
            slots = self.slots[kind]
            for start in range(0, len(slots), self.batch_size):
                chunk = list(range(start, min(start + self.batch_size, len(slots))))
                items = [self.requests[slots[i][0]] for i in chunk]
                batch = collate_prompts(items, pad)
                batch["questions"] = [self.rows[kind][i]["question"] for i in chunk]
                yield kind, chunk, batch

    def evaluate(self, model: Any, retain_truth_ratios: Any = None, generate: bool = True) -> dict[str, Any]:
        """Score ``model`` (anything ``as_eval_lm`` accepts) on every split.

        Returns ``{"splits": kind -> per-sample arrays (gt_nll, base_nll, perturbed_nll, rougeL_recall),
        "report": tofu_report(...), "generations": kind -> list[str], "counts": kind -> {n, truncated,
        dropped}, "seconds": float}``. ``retain_truth_ratios``: the retain model's forget-split truth
        ratios (``modules.tofu_eval.reference_truth_ratios``); without them forget quality is None.
        ``generate=False`` skips generation (ROUGE reported as 0: for quick probes only).
        """
        lm = as_eval_lm(model, self.tokenizer)
        started = time.perf_counter()
        nll = np.empty(len(self.requests), dtype=np.float64)
        for idx, batch in self.score_batches():
            logp = lm.score_tokens(batch)
            mask = batch["labels"][:, 1:] != -100
            nll[idx] = te.mean_answer_nll(logp.float(), mask.to(logp.device)).double().cpu().numpy()
        if not np.isfinite(nll).all():
            raise ValueError("non-finite answer NLL: the model produced NaN/inf log-probs")
        generations = {kind: [""] * len(self.rows[kind]) for kind in self.kinds}
        if generate:
            for kind, chunk, batch in self.generation_batches():
                for i, text in zip(chunk, lm.generate_answers(batch, self.max_new_tokens)):
                    generations[kind][i] = text
        splits = {}
        for kind in self.kinds:
            slots = self.slots[kind]
            splits[kind] = {
                "gt_nll": nll[[gt for gt, _, _ in slots]],
                "base_nll": nll[[base for _, base, _ in slots]],
                "perturbed_nll": [nll[p].tolist() for _, _, p in slots],
                "rougeL_recall": np.array([te.rouge_l_recall(generations[kind][i], row["answer"])
                                           for i, row in enumerate(self.rows[kind])]),
            }
        if retain_truth_ratios is not None and "forget" not in splits:
            raise ValueError("forget quality needs the 'forget' evaluation split")
        report = te.tofu_report(splits, retain_truth_ratios)
        fq = report.get("forget_quality")
        report["log10_forget_quality"] = math.log10(max(fq, 1e-300)) if fq is not None else None
        return {"splits": splits, "report": report, "generations": generations,
                "counts": {k: dict(v) for k, v in self.counts.items()}, "seconds": time.perf_counter() - started}

    def save(self, path: str | os.PathLike, result: Mapping[str, Any], model: str = "",
             retain_truth_ratios: Any = None, **extra: Any) -> dict[str, Any]:
        """Write ``result`` in the ``save_eval`` layout (+ generations, counts, seconds and ``extra``)."""
        body = te.save_eval(path, result["splits"], self.forget_split, model=model,
                            retain_forget_truth_ratios=retain_truth_ratios,
                            extra={"generations": result["generations"], "counts": result["counts"],
                                   "seconds": result["seconds"],
                                   "log10_forget_quality": result["report"].get("log10_forget_quality"), **extra})
        return body


# ----------------------------------------------------------------------------------------------------
# The callback


def report_metrics(report: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """``{prefix}/forget_quality``, ``{prefix}/model_utility``, ``{prefix}/forget/prob`` ... (finite only)."""
    return {f"{prefix}/{key}": value for key, value in te.report_scalars(report).items()
            if not key.endswith("/n")}


class TofuEvaluation(pl.Callback):
    def __init__(self, retain_eval: str | None = None, save_dir: str | None = None, every_n_epochs: int = 1,
                 at_start: bool = False, max_new_tokens: int | None = None, batch_size: int | None = None,
                 model_name: str | None = None):
        """TOFU evaluation during ``fit`` (every ``every_n_epochs`` epochs and after the last; ``at_start``:
        also before the first step) and at the end of ``test``.

        ``retain_eval``: the retain model's saved evaluation (``test.json`` of its evaluation run) for Forget
        Quality; its forget split must match the data module's. ``save_dir``: where the JSON files go
        (default ``<log_dir>/tofu_eval``). ``max_new_tokens``/``batch_size``: generation budget and batch
        size (defaults: longest answer + 8, the data module's ``eval_batch_size``). ``model_name``: a label
        stored in the files (default: the module's model path).
        """
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.retain_eval, self.save_dir = retain_eval, save_dir
        self.every_n_epochs, self.at_start = every_n_epochs, at_start
        self.max_new_tokens, self.batch_size, self.model_name = max_new_tokens, batch_size, model_name
        self.evaluator: TofuEvaluator | None = None
        self.retain_truth_ratios: np.ndarray | None = None
        self.history: list[dict[str, Any]] = []
        self.last: dict[str, Any] | None = None

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "eval_sets"):
            raise TypeError(f"TofuEvaluation needs a data module with eval_sets() (TofuQAData), got {type(datamodule).__name__}")
        if self.retain_eval is not None and self.retain_truth_ratios is None:  # fail before any training
            self.retain_truth_ratios = te.reference_truth_ratios(self.retain_eval, datamodule.forget_split)

    def _evaluator(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> TofuEvaluator:
        if self.evaluator is None:
            kwargs = {"max_new_tokens": self.max_new_tokens}
            if self.batch_size:
                kwargs["batch_size"] = self.batch_size
            self.evaluator = trainer.datamodule.evaluator(getattr(pl_module, "tokenizer", None), **kwargs)
            rank_zero_info(f"[TofuEvaluation] {self.evaluator}")
        return self.evaluator

    def _dir(self, trainer: pl.Trainer) -> Path:
        if self.save_dir:
            return Path(self.save_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "tofu_eval"

    # -- one evaluation -------------------------------------------------------------------------------
    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> dict[str, Any]:
        evaluator = self._evaluator(trainer, pl_module)
        was_training = pl_module.training
        pl_module.eval()
        try:
            result = run_in_root_forward(trainer, pl_module,
                                         lambda: evaluator.evaluate(pl_module, self.retain_truth_ratios))
        finally:
            pl_module.train(was_training)
        result["tag"], result["epoch"], result["global_step"] = tag, trainer.current_epoch, trainer.global_step
        self.last = result
        directory = self._dir(trainer)  # trainer.log_dir is collective under DDP: every rank asks
        if trainer.is_global_zero:
            model = self.model_name or str(getattr(pl_module, "model_name_or_path", ""))
            evaluator.save(directory / f"{tag}.json", result, model=model,
                           retain_truth_ratios=self.retain_truth_ratios, tag=tag, epoch=trainer.current_epoch,
                           global_step=trainer.global_step, retain_eval=self.retain_eval)
            self.history.append({"tag": tag, "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                                 "report": result["report"], "seconds": result["seconds"]})
            (directory / "history.json").write_text(json.dumps(self.history, indent=1))
        report = result["report"]
        fq = report["forget_quality"]
        rank_zero_info(f"[TofuEvaluation] {tag}: forget quality {fq if fq is None else f'{fq:.3g}'}, "
                       f"model utility {report['model_utility']:.4f}, forget ROUGE-L "
                       f"{report.get('forget/rougeL_recall', float('nan')):.3f} ({result['seconds']:.1f} s)")
        return result

    # -- resuming: history.json goes on with the evaluations before the checkpoint ------------------------
    @property
    def state_key(self) -> str:  # one per evaluation setting, so a trainer may hold several
        return self._generate_state_key(save_dir=self.save_dir, retain_eval=self.retain_eval,
                                        every_n_epochs=self.every_n_epochs, at_start=self.at_start)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    # -- hooks -----------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.at_start:
            return
        result = self.run(trainer, pl_module, "start")
        for logger in trainer.loggers:  # self.log is not allowed in on_train_start
            logger.log_metrics(report_metrics(result["report"], "val"), step=trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        # the fit's last epoch, also one that max_steps ends (a step-limited fit has max_epochs -1)
        last = ((trainer.max_epochs or 0) > 0 and epoch >= trainer.max_epochs) or \
            (trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps)
        if epoch % self.every_n_epochs and not last:
            return
        result = self.run(trainer, pl_module, f"epoch_{epoch:03d}")
        pl_module.log_dict(report_metrics(result["report"], "val"))
        pl_module.log("val/eval_seconds", float(result["seconds"]))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        result = self.run(trainer, pl_module, "test")
        pl_module.log_dict(report_metrics(result["report"], "test"))
        for kind, counts in result["counts"].items():
            pl_module.log(f"test/{kind}/truncated", float(counts["truncated"]))
            pl_module.log(f"test/{kind}/dropped", float(counts["dropped"]))

