"""What every trainable method shares: optimizer/scheduler construction and the HF-model life cycle.

Optimizers and schedulers arrive as callables from the config (``class_path: torch.optim.AdamW`` or
``bitsandbytes.optim.AdamW8bit``) and are built in ``configure_optimizers``, i.e. after
``configure_model`` and after FSDP/DeepSpeed have wrapped the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.optim.lr_scheduler import LambdaLR

from modules import lm


def gather_objects(trainer: Any, value: Any) -> list[Any]:
    """``value`` from every process, in rank order (``[value]`` on one process): for per-row results that are
    not tensors. A collective call under DDP: every process must make it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
        shares: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(shares, value)
        return shares
    return [value]


def on_rank_zero_for_all(trainer: Any, work: Callable[[], Any], what: str) -> None:
    """``work()`` on process 0 while the others wait, with its failure raised on every process. A failure on
    process 0 alone would leave the others waiting at their next collective (a hang under NCCL). The
    broadcast of the outcome is the barrier; on one process it is a plain call."""
    error: Exception | None = None
    if trainer.is_global_zero:
        try:
            work()
        except Exception as raised:
            error = raised
    failure = trainer.strategy.broadcast(None if error is None else f"{type(error).__name__}: {error}", src=0)
    if error is not None:
        raise error
    if failure is not None:
        raise RuntimeError(f"{what} failed on process 0: {failure}")


def gather_unique_rows(local: torch.Tensor, strategy) -> torch.Tensor:
    """Every rank's rows of ``local`` (N_rank, C; column 0 a row id), each row id once, sorted by id.

    Under DDP/FSDP the evaluation sampler pads every rank to the same length by repeating rows, so
    counting every evaluated row would count some pairs twice. The ranks may hold different numbers of
    rows, so each rank pads its block to the largest before the all-gather.
    """
    if strategy.world_size > 1:
        sizes = strategy.all_gather(torch.tensor([local.shape[0]], device=local.device)).reshape(-1).tolist()
        padded = torch.zeros(max(sizes), local.shape[1], dtype=local.dtype, device=local.device)
        padded[:local.shape[0]] = local
        gathered = strategy.all_gather(padded)
        local = torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)])
    order = torch.argsort(local[:, 0], stable=True)
    rows = local[order]
    first = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    first[1:] = rows[1:, 0] != rows[:-1, 0]
    return rows[first]


class EvalRows:
    """One evaluation epoch's per-row records, gathered at its end from every rank with each row once.

    Column 0 is the row id (the batch's ``row_id``). Batches without row ids get ids unique per rank:
    nothing is merged then, and a row the sampler repeats counts as often as it was evaluated.
    """

    def __init__(self, columns: int):
        self.columns = columns
        self.blocks: list[torch.Tensor] = []
        self.unnumbered = 0

    def add(self, row_id: torch.Tensor | None, columns: list[torch.Tensor], rank: int) -> None:
        rows, device = len(columns[0]), columns[0].device
        if row_id is None:
            row_id = torch.arange(rows, device=device) + self.unnumbered + rank * 2 ** 40
            self.unnumbered += rows
        self.blocks.append(torch.stack([row_id.to(device).double(), *(column.double() for column in columns)], 1))

    def gather(self, strategy, device: torch.device) -> torch.Tensor:
        local = (torch.cat(self.blocks) if self.blocks
                 else torch.zeros(0, self.columns + 1, dtype=torch.float64, device=device))
        self.blocks, self.unnumbered = [], 0
        return gather_unique_rows(local, strategy)


class WarmupSchedule(LambdaLR):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` or a constant rate. Stepped per optimizer step.

    ``total_steps=None`` is filled in from the trainer's estimated number of optimizer steps.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, decay: str = "cosine",
                 total_steps: int | None = None, min_lr_ratio: float = 0.0):
        if decay not in ("cosine", "constant", "linear"):
            raise ValueError(f"decay must be 'cosine', 'linear' or 'constant', got {decay!r}")
        self.warmup_steps, self.decay, self.total_steps, self.min_lr_ratio = warmup_steps, decay, total_steps, min_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.decay == "constant" or not self.total_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


def keep_embeddings_in_32bit(model: torch.nn.Module) -> int:
    """Ask bitsandbytes to keep the optimizer state of embedding weights in 32 bits.

    Quantising the state of rarely-updated embedding rows is what destabilises 8-bit Adam; the
    bitsandbytes authors recommend 32-bit state there. Harmless for torch optimizers. Returns the number
    of parameters overridden.
    """
    try:
        from bitsandbytes.optim import GlobalOptimManager
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency, but keep torch-only use working
        return 0
    manager = GlobalOptimManager.get_instance()
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and module.weight.requires_grad:
            manager.override_config(module.weight, key_value_dict={"optim_bits": 32})
            count += 1
    return count


def decay_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Weight decay on matrices only; biases, norms and 1-d parameters get none."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def run_in_root_forward(trainer: pl.Trainer, pl_module: pl.LightningModule, fn: Callable[[], Any]) -> Any:
    """``fn()``, for model calls outside a Lightning step (evaluation in a callback), made inside the
    forward of the strategy's root module.

    Under FSDP the root unit holds the parameters outside the decoder layers (embeddings, final norm,
    heads) as shards, gathered only while its forward runs; the layers' own units gather theirs. Every
    process must run the same ``fn``, as in any FSDP forward. Other strategies call ``fn()`` directly.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    root = trainer.strategy.model
    if not isinstance(trainer.strategy, FSDPStrategy) or root is None or root is pl_module:
        return fn()
    own = vars(pl_module).get("forward")  # a forward set on the instance, if any, comes back afterwards

    def restore() -> None:
        if own is not None:
            pl_module.forward = own
        else:
            vars(pl_module).pop("forward", None)

    def redirected(*args, **kwargs):
        restore()  # before fn, so that fn may call the module itself
        return fn()

    pl_module.forward = redirected  # the root's forward calls the module's forward
    try:
        return root()
    finally:
        restore()


def fused_kernel_applies(optimizer: torch.optim.Optimizer, trainer: Any) -> bool:
    """True for torch's Adam/AdamW left at their implementation defaults (neither ``fused`` nor ``foreach``
    chosen) over CUDA or CPU parameters. torch then picks its multi-tensor loop on a GPU, about a dozen passes
    over the parameters and state per step, and a per-parameter loop on the CPU; the fused kernel makes one
    pass (HF Trainer's default too). On the CPU it steps a 136M-parameter embedding about 6x faster.

    Not with a loss scaler (fp16): a fused optimizer unscales inside its step, after the trainer has clipped
    the still-scaled gradients. Not under DeepSpeed, which steps the optimizer on its own partitions.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    if getattr(trainer.precision_plugin, "scaler", None) is not None or isinstance(trainer.strategy, DeepSpeedStrategy):
        return False
    defaults = optimizer.defaults
    if defaults.get("fused") is not None or defaults.get("foreach") is not None or defaults.get("differentiable"):
        return False
    params = [param for group in optimizer.param_groups for param in group["params"]]
    # on the CPU only contiguous parameters: its fused kernel misreads a gradient whose layout differs from the
    # parameter's (autograd keeps them alike; a gradient set by hand may not)
    return bool(params) and all(param.is_floating_point() and (param.device.type == "cuda" or (
        param.device.type == "cpu" and param.is_contiguous())) for param in params)


class TrainableModule(pl.LightningModule):
    """Base of every method: builds the configured optimizer and step-interval scheduler."""

    def __init__(self, optimizer: OptimizerCallable = torch.optim.AdamW,
                 lr_scheduler: LRSchedulerCallable | None = None):
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler

    def configure_optimizers(self):
        keep_embeddings_in_32bit(self)
        optimizer = self.optimizer_factory(decay_groups(self))
        if fused_kernel_applies(optimizer, self.trainer):  # same update, fewer passes over memory
            optimizer = self.optimizer_factory(decay_groups(self), fused=True)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        if isinstance(scheduler, WarmupSchedule) and scheduler.total_steps is None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision
        from lightning.pytorch.strategies import FSDPStrategy
        from lightning.pytorch.utilities import GradClipAlgorithmType

        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy) and gradient_clip_algorithm in (None, "norm"):
            # FSDP holds gradient shards: only its own method computes the global norm across ranks
            # (Lightning's default clipping refuses to run under FSDP)
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            # bf16 autocast has no loss scale, so the gradients are the true ones whatever the optimizer;
            # Lightning's autocast plugin refuses to clip for fused optimizers, which only fp16's scaler needs
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val,
                                     GradClipAlgorithmType(gradient_clip_algorithm or "norm"))
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


def check_fsdp_wraps_layers(trainer: Any, model: torch.nn.Module) -> None:
    """Under FSDP with a layer-class wrap policy, refuse a model none of whose modules is of those classes:
    FSDP would make the whole model one unit (no per-layer sharding, and no activation checkpointing from
    the same list), silently."""
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, FSDPStrategy):
        return
    classes = getattr(strategy.kwargs.get("auto_wrap_policy"), "_module_classes", None)
    if not classes or any(isinstance(module, tuple(classes)) for module in model.modules()):
        return  # a callable or size-based policy cannot be checked this way
    layers = getattr(model, "_no_split_modules", None) or "see the model's modeling file"
    raise ValueError(f"FSDP auto_wrap_policy names {sorted(c.__name__ for c in classes)}, but {type(model).__name__} "
                     f"has none of them, so FSDP would not shard it layer by layer. Add its decoder layer class "
                     f"({layers}) to the strategy's auto_wrap_policy and activation_checkpointing_policy "
                     f"(configs/trainer/fsdp.yaml)")


class HFModule(TrainableModule):
    """A method around one Hugging Face model, created in ``configure_model`` (so FSDP can shard it)."""

    model_kind = "causal_lm"

    def __init__(self, model: str = "tiny", dtype: str | None = None,
                 attn_implementation: str | None = "sdpa", gradient_checkpointing: bool = False,
                 trust_remote_code: bool = False, compile: bool = False, fused_norms: bool = True,
                 optimizer: OptimizerCallable = torch.optim.AdamW,
                 lr_scheduler: LRSchedulerCallable | None = None):
        """``fused_norms``: Llama-style RMSNorm layers run as torch's fused kernel (``lm.use_fused_rms_norms``;
        same result, fewer passes over memory); false keeps the model's own forward."""
        super().__init__(optimizer, lr_scheduler)
        self.model_name_or_path = model
        self.load_kwargs = dict(dtype=dtype, attn_implementation=attn_implementation,
                                trust_remote_code=trust_remote_code, gradient_checkpointing=gradient_checkpointing,
                                fused_norms=fused_norms)
        self.compile = compile
        self.tokenizer = lm.load_tokenizer(model, trust_remote_code=trust_remote_code)
        self.prepare_tokenizer(self.tokenizer)
        self.model: torch.nn.Module | None = None
        self.model_flops_shape: dict[str, int] | None = None
        self._model_files: dict[str, bytes] | None = None  # what checkpoints carry for export (on_save_checkpoint)

    def prepare_tokenizer(self, tokenizer) -> None:
        """Hook for methods that need special tokens (e.g. a distinct pad token)."""

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = lm.load_model(self.model_name_or_path, kind=self.model_kind, tokenizer=self.tokenizer,
                                   **self.load_kwargs, **self.extra_model_kwargs())
        self.model.train(self.training)  # from_pretrained returns eval mode; follow the LightningModule
        self.model_flops_shape = lm.flops_shape(self.model)  # before any strategy shards the parameters
        check_fsdp_wraps_layers(self._trainer, self.model)
        if self.compile:
            self.model.forward = torch.compile(self.model.forward)

    def extra_model_kwargs(self) -> dict[str, Any]:
        return {}

    def training_forward_shapes(self, batch: dict[str, Any]) -> list[tuple[int, int, torch.Tensor | None]]:
        """Each forward of the trained model in a training step on ``batch``, as (rows, padded length,
        non-pad tokens): what ``callbacks.Throughput`` counts. By default one forward of ``input_ids``."""
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return []
        mask = batch.get("attention_mask")
        return [(ids.shape[0], ids.shape[1], mask.sum() if isinstance(mask, torch.Tensor) else None)]

    def export_pretrained(self, out_dir: str | Path) -> Path:
        """Save model and tokenizer as a folder that ``AutoModel*.from_pretrained`` loads; the folder
        appears whole or not at all (``lm.replace_folder_atomically``)."""
        self.configure_model()
        return lm.replace_folder_atomically(self.write_export, out_dir)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints carry the model's config and the tokenizer's files (``lm.MODEL_FILES_KEY``), so
        ``cli.py export`` needs neither the base model nor the run's working directory."""
        if self.model is not None:
            if self._model_files is None:  # neither config nor tokenizer changes during a run
                self._model_files = lm.model_files(self.model, self.tokenizer)
            checkpoint[lm.MODEL_FILES_KEY] = self._model_files

    def write_export(self, folder: Path) -> None:
        """What an export folder holds; subclasses add their own files."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
