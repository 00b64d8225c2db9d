"""Training throughput and model FLOPs utilisation (MFU), logged to TensorBoard under ``perf/``.

Every ``log_every_n_steps`` optimizer steps (at least 10 unless set) after a short warm-up, for the window
since the last log:

- ``perf/step_time_s``: wall seconds per optimizer step (validation runs excluded, checkpointing included);
- ``perf/tokens_per_s``: non-pad tokens through the trained model, all processes together;
- ``perf/padded_tokens_per_s``: token positions computed (pads included), all processes together;
- ``perf/sequences_per_s``: rows through the trained model, all processes together;
- ``perf/mfu``: model FLOPs per second over the peak of all devices, where the peak is known;
- ``perf/peak_memory_gib``: the largest GPU memory this process has allocated (CUDA only).

Model FLOPs of a decoder trained on rows of padded length T: T · (6 N + 12 L H T) per row, N the
non-embedding parameters, L layers, H hidden size (PaLM's count, as in shared/PERFORMANCE.md).
Activation-checkpointing recomputation and frozen reference models are not counted, as MFU conventions
require. A module says what its training step sends through the model with
``training_forward_shapes(batch)``; ``HFModule`` implements it. Only GPUs are synchronised, and only at
the window's ends, so the measurement does not stall the pipeline. The whole run's figures (after the
warm-up) go into ``summary.json`` under the fit stage's ``throughput``.
"""

from __future__ import annotations

import re
import time
from typing import Any

import lightning.pytorch as pl
import torch

# Dense bf16 tensor-core peaks (FLOP/s) by the model name torch reports, matched as whole words (so "L4"
# is not "L40S"), most specific first
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
    ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12),
)
DEFAULT_MIN_WINDOW = 10  # steps: a window per step would synchronise the GPU every step


def peak_flops_of(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops_by_name(torch.cuda.get_device_name(device))


def peak_flops_by_name(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_FLOPS if re.search(rf"\b{re.escape(key)}\b", name)), None)


def training_flops(rows: int, length: int, shape: dict[str, int]) -> float:
    """Model FLOPs (forward + backward) of ``rows`` sequences of ``length`` positions."""
    per_token = 6 * shape["non_embedding_parameters"] + 12 * shape["layers"] * shape["hidden"] * length
    return float(rows * length * per_token)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput(pl.Callback):
    def __init__(self, enabled: bool = True, warmup_steps: int = 2, log_every_n_steps: int | None = None,
                 peak_flops: float | None = None):
        """``warmup_steps``: optimizer steps left out at the start (allocator, kernels, compilation).
        ``log_every_n_steps``: steps per logged window; by default the trainer's, but at least 10. 0: no
        windows, only the whole run in ``summary.json``. ``peak_flops``: one device's peak FLOP/s for MFU
        (known H100/H200/A100/B200/L4/L40/L40S GPUs are looked up; MFU is left out where none is known)."""
        if warmup_steps < 0 or (log_every_n_steps is not None and log_every_n_steps < 0):
            raise ValueError(f"throughput.warmup_steps and log_every_n_steps must be >= 0, got {warmup_steps} "
                             f"and {log_every_n_steps}")
        self.enabled, self.warmup_steps, self.every, self.peak_flops = enabled, warmup_steps, log_every_n_steps, peak_flops
        self.summary: dict[str, Any] | None = None
        self._validation_start: float | None = None

    # -- counting --------------------------------------------------------------------------------------
    def _reset_window(self) -> None:
        self._window = {"padded_tokens": 0.0, "sequences": 0.0, "flops": 0.0}
        self._real_tokens: torch.Tensor | float = 0.0  # a device tensor: reading it would synchronise
        self._window_steps = 0
        self._window_start = time.perf_counter()
        self._paused = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        self._device = pl_module.device
        self._peak = self.peak_flops or peak_flops_of(self._device)
        self._shape = getattr(pl_module, "model_flops_shape", None)
        self._forward_shapes = getattr(pl_module, "training_forward_shapes", None)
        self._first_step, self._last_step = trainer.global_step, trainer.global_step
        self._started = self.warmup_steps == 0
        self._real_counted = True  # false once a forward comes without an attention mask
        self._totals = {"steps": 0, "seconds": 0.0, "tokens": 0.0, "padded_tokens": 0.0, "sequences": 0.0,
                        "flops": 0.0}
        self._validation_start = None
        self.summary = None
        _sync(self._device)
        self._reset_window()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.enabled or self._forward_shapes is None:
            return
        for rows, length, real in self._forward_shapes(batch):
            self._window["padded_tokens"] += rows * length
            self._window["sequences"] += rows
            if self._shape is not None:
                self._window["flops"] += training_flops(rows, length, self._shape)
            if real is None:
                self._real_counted = False
            else:
                self._real_tokens = self._real_tokens + real.detach()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.enabled or trainer.global_step == self._last_step:
            return  # accumulating gradients: the optimizer has not stepped yet
        previous, self._last_step = self._last_step, trainer.global_step
        if not self._started:
            if trainer.global_step - self._first_step >= self.warmup_steps:
                self._started = True
                _sync(self._device)
                self._reset_window()  # the window opens after the warm-up's last step
            return
        self._window_steps += trainer.global_step - previous  # more than one with several optimizers
        every = self.every if self.every is not None else max(trainer.log_every_n_steps, DEFAULT_MIN_WINDOW)
        if every > 0 and trainer.global_step // every != previous // every:
            self._close_window(trainer)

    # validation inside fit is another workload: its time is taken out of the window
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and trainer.state.fn == "fit" and not trainer.sanity_checking:
            _sync(self._device)
            self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and self._validation_start is not None:
            _sync(self._device)
            self._paused += time.perf_counter() - self._validation_start
            self._validation_start = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        if self._started and self._window_steps:
            self._close_window(trainer, log=False)
        totals = self._totals
        if not totals["steps"]:
            return
        seconds = totals["seconds"]
        self.summary = {"steps": totals["steps"], "seconds": seconds, "step_time_s": seconds / totals["steps"],
                        "warmup_steps": self.warmup_steps, **self._rates(totals, seconds, trainer.world_size)}
        if totals["sequences"]:
            self.summary.update(padded_tokens=totals["padded_tokens"], sequences=totals["sequences"],
                                peak_flops_per_device=self._peak, model_flops_shape=self._shape)
            if self._real_counted:
                self.summary["tokens"] = totals["tokens"]

    # -- reporting -------------------------------------------------------------------------------------
    def _rates(self, counts: dict[str, float], seconds: float, world_size: int) -> dict[str, float]:
        if not counts["sequences"]:  # the module says nothing of its forwards: step time only
            return {}
        rates = {"padded_tokens_per_s": counts["padded_tokens"] / seconds, "sequences_per_s": counts["sequences"] / seconds}
        if self._real_counted:
            rates["tokens_per_s"] = counts["tokens"] / seconds
        if self._shape is not None and self._peak:
            rates["mfu"] = counts["flops"] / seconds / (self._peak * world_size)
        return rates

    def _close_window(self, trainer: pl.Trainer, log: bool = True) -> None:
        _sync(self._device)
        seconds = time.perf_counter() - self._window_start - self._paused
        # float64: a window's FLOPs exceed float32's exact integers (MPS has no float64: float32 there)
        dtype = torch.float32 if self._device.type == "mps" else torch.float64
        counts = {**self._window, "tokens": float(self._real_tokens)}
        local = torch.tensor(list(counts.values()), dtype=dtype, device=self._device)
        # every process reaches the same optimizer steps, so this collective is safe here
        window = dict(zip(counts, trainer.strategy.reduce(local, reduce_op="sum").tolist()))
        steps = self._window_steps
        for key, value in window.items():
            self._totals[key] += value
        self._totals["steps"] += steps
        self._totals["seconds"] += seconds
        if log and trainer.is_global_zero and seconds > 0:
            metrics = {f"perf/{key}": value for key, value in self._rates(window, seconds, trainer.world_size).items()}
            metrics["perf/step_time_s"] = seconds / steps
            if self._device.type == "cuda":
                metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(self._device) / 2**30
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        self._reset_window()
