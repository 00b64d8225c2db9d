"""A machine-readable record of every run: final metrics plus the manifest needed to trust them.

``<log_dir>/summary.json`` holds one section per stage that ran in the process (fit, validate, test,
predict) and a manifest: package versions, world size, precision, effective batch size, seed, the
resolved config, and the checkpoint evaluated. Results tables are rebuilt from these files.

Each evaluation stage records how many batches it ran and the ``limit_*_batches`` in force, so a metric of a
partial evaluation cannot pass for the full one. A run that fails before any training, validation, test or
predict loop started (bad data, a missing input) removes the log folder it had just created (an event
file, the saved config), so the next run of the config does not move on to ``version_N+1``.

It also checks that a fit trained something: a sample of every trainable tensor is compared before and
after, and a run in which nothing changed (zero learning rate, frozen weights) is reported loudly.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from callbacks.throughput import Throughput

PACKAGES = ("torch", "lightning", "transformers", "torchmetrics", "datasets", "bitsandbytes", "tokenizers",
            "jsonargparse", "tensorboard", "numpy")
SAMPLES_PER_TENSOR = 64
# the trainer's names for each evaluation stage's loop: limit_<key>_batches, num_<key>_batches
EVALUATION_BATCH_KEYS = {"validate": "val", "test": "test", "predict": "predict"}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _jsonable(value: Any) -> Any:
    """A metric as strict JSON: tensors become numbers or lists, and NaN/inf the strings "nan"/"inf" (bare
    NaN is not JSON, and strict parsers refuse it)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _epochs_trained(trainer: pl.Trainer) -> float | None:
    """Passes over the training data, fractional, from the batches trained (a resumed run's included):
    Lightning's epoch counter also counts an epoch that ``max_steps`` cut short."""
    batches_per_epoch = trainer.num_training_batches
    if not batches_per_epoch or not math.isfinite(batches_per_epoch):
        return None
    return round(trainer.fit_loop.epoch_loop.batch_progress.total.completed / batches_per_epoch, 4)


def parameter_size(param: torch.Tensor) -> int:
    """Elements of a parameter. Under DeepSpeed ZeRO-3 a parameter is an empty placeholder (numel() == 0)
    between forwards; its real size is ``ds_numel``."""
    size = getattr(param, "ds_numel", None)
    return int(size) if size is not None else param.numel()


def local_values(param: torch.Tensor) -> torch.Tensor | None:
    """The values of a parameter this process holds, flat: the parameter itself, or under ZeRO-3 this
    process's partition (``ds_tensor``); None where it holds none."""
    if param.numel() > 0:
        return param.detach().reshape(-1)
    shard = getattr(param, "ds_tensor", None)
    if isinstance(shard, torch.Tensor) and shard.numel() > 0:
        return shard.detach().reshape(-1)
    return None


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


class RunSummary(pl.Callback):
    """Writes ``summary.json`` beside the logs at the end of every stage."""

    def __init__(self, filename: str = "summary.json", check_trained: bool = True):
        self.filename = filename
        self.check_trained = check_trained
        self._param_samples: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._unsampled: list[str] = []  # trainable, but none of their values on this process
        self.warnings: list[str] = []
        self._written: set[Path] = set()  # summaries this process wrote: later stages of it add sections
        self._created_at = time.time()
        self._loop_started = False  # a failure after this keeps the run's logs

    # -- did anything train? -------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loop_started = True
        self._param_samples.clear()
        self._unsampled.clear()
        generator = torch.Generator().manual_seed(0)
        for name, param in pl_module.named_parameters():
            if not param.requires_grad or parameter_size(param) == 0:
                continue
            flat = local_values(param)
            if flat is None:
                self._unsampled.append(name)
                continue
            index = torch.randint(0, flat.numel(), (min(SAMPLES_PER_TENSOR, flat.numel()),), generator=generator)
            self._param_samples[name] = (index, flat[index.to(flat.device)].float().cpu().clone())

    def _untrained_report(self, pl_module: pl.LightningModule) -> str | None:
        if not self._param_samples:
            # trainable parameters held only by other processes cannot be compared here: no verdict
            return None if self._unsampled else "no trainable parameters: nothing was trained"
        params = dict(pl_module.named_parameters())
        unchanged = []
        for name, (index, before) in self._param_samples.items():
            values = local_values(params[name])
            if values is not None and torch.equal(values[index.to(values.device)].float().cpu(), before):
                unchanged.append(name)
        if len(unchanged) == len(self._param_samples):
            return (f"NO TRAINABLE PARAMETER CHANGED in {len(unchanged)} tensors: this run trained nothing "
                    "(zero learning rate, frozen weights, or every step skipped)")
        return None

    # -- writing ---------------------------------------------------------------------------------------
    def _path(self, trainer: pl.Trainer) -> Path | None:
        log_dir = trainer.log_dir or trainer.default_root_dir
        return Path(log_dir) / self.filename if log_dir else None

    def _manifest(self, trainer: pl.Trainer, path: Path) -> dict[str, Any]:
        datamodule = trainer.datamodule
        batch_size = getattr(datamodule, "batch_size", None)
        config_file = path.parent / "config.yaml"
        config = yaml.safe_load(config_file.read_text()) if config_file.exists() else None
        return {
            "versions": package_versions(),
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "strategy": type(trainer.strategy).__name__,
            "precision": trainer.precision,
            "accelerator": type(trainer.accelerator).__name__,
            "batch_size_per_device": batch_size,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "effective_batch_size": (batch_size * trainer.accumulate_grad_batches * trainer.world_size
                                     if isinstance(batch_size, int) else None),
            "seed": int(os.environ["PL_GLOBAL_SEED"]) if "PL_GLOBAL_SEED" in os.environ else None,
            "config": config,
        }

    def _write(self, trainer: pl.Trainer, stage: str, extra: dict[str, Any]) -> None:
        path = self._path(trainer)  # on every rank: trainer.log_dir is a collective call under DDP
        if path is not None:
            self._write_file(trainer, path, stage, extra)

    @rank_zero_only
    def _write_file(self, trainer: pl.Trainer, path: Path, stage: str, extra: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a file this process did not write is an earlier run's (a rerun into a fixed log version): replaced,
        # not merged, so none of its stages or warnings pass for this run's
        payload = json.loads(path.read_text()) if path in self._written and path.exists() else {"stages": {}}
        metrics = {key: _jsonable(value) for key, value in sorted(trainer.callback_metrics.items())
                   if not key.startswith(("train/", "epoch")) or stage == "fit"}
        data_report = getattr(trainer.datamodule, "data_report", None)
        payload["stages"][stage] = {
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "metrics": metrics, **({"data": data_report} if data_report else {}), **extra,
        }
        payload["manifest"] = self._manifest(trainer, path)
        payload["warnings"] = sorted(set(payload.get("warnings", []) + self.warnings))
        write_json_atomic(path, payload)
        self._written.add(path)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.check_trained:
            report = self._untrained_report(pl_module)
            if report:
                self.warnings.append(report)
                rank_zero_warn("\n" + "!" * 100 + f"\n{report}\n" + "!" * 100)
        callback = trainer.checkpoint_callback
        throughput = next((cb.summary for cb in trainer.callbacks if isinstance(cb, Throughput) and cb.summary), None)
        self._write(trainer, "fit", {
            **({"throughput": throughput} if throughput else {}),
            "global_step": trainer.global_step, "epochs_trained": _epochs_trained(trainer),
            "max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs,
            "limit_train_batches": trainer.limit_train_batches, "limit_val_batches": trainer.limit_val_batches,
            "interrupted": trainer.interrupted,
            "best_checkpoint": getattr(callback, "best_model_path", None) or None,
            "best_score": _jsonable(getattr(callback, "best_model_score", None)),
            "last_checkpoint": getattr(callback, "last_model_path", None) or None,
        })

    def _evaluated(self, trainer: pl.Trainer, stage: str) -> None:
        key = EVALUATION_BATCH_KEYS[stage]
        batches = [_jsonable(float(count)) if count == float("inf") else int(count)
                   for count in getattr(trainer, f"num_{key}_batches", None) or []]
        self._write(trainer, stage, {"checkpoint": trainer.ckpt_path, "batches_per_dataloader": batches,
                                     f"limit_{key}_batches": getattr(trainer, f"limit_{key}_batches", None)})

    # -- a failed start leaves no folder behind ------------------------------------------------------------
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._loop_started = True

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loop_started = True

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loop_started = True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not self._loop_started:
            self._remove_fresh_log_dir(trainer)

    @rank_zero_only
    def _remove_fresh_log_dir(self, trainer: pl.Trainer) -> None:
        # the logger's own property, not trainer.log_dir: that one is a collective call, and the other ranks
        # may not be raising
        log_dir = getattr(trainer.logger, "log_dir", None)
        if not log_dir or not Path(log_dir).is_dir():
            return
        files = [path for path in Path(log_dir).rglob("*") if path.is_file()]
        # only what this process wrote (a rerun into a fixed version keeps the earlier run's files), and only
        # what a start writes: event files, the saved config, hparams
        fresh_start = all(path.stat().st_mtime >= self._created_at
                          and (path.name.startswith("events.out.tfevents") or path.name in ("config.yaml", "hparams.yaml"))
                          for path in files)
        if fresh_start:
            shutil.rmtree(log_dir, ignore_errors=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._evaluated(trainer, "validate")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluated(trainer, "test")

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluated(trainer, "predict")
