"""Used by the FSDP test: Lightning's own FSDPStrategy run on CPU processes (gloo), and a probe of what
FSDP did to the model, so configs/trainer/fsdp.yaml is exercised on a machine without a GPU.

torch's FSDP1 runs on CPU when it is told the device is the CPU; Lightning passes only the device index
(None on a CPU), and its accelerator check refuses FSDP on a CPU by exact class, so a subclass that
supplies the device is all it takes. Its full-state-dict checkpoints gather with offload_to_cpu=True,
which on a CPU frees the memory the gathered tensors still view (a segfault), so here they gather
without it. Everything else (wrapping, activation checkpointing, clipping, gathering the full state
dict on rank 0) is Lightning's and torch's own code path.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.strategies import FSDPStrategy


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import fully_sharded_data_parallel as fsdp_module

        find_device = fsdp_module._init_device_handle

        def on_cpu(state, module, ignored_params, device_id):
            return find_device(state, module, ignored_params, torch.device("cpu") if device_id is None else device_id)

        with mock.patch.object(fsdp_module, "_init_device_handle", on_cpu):
            return super()._setup_model(model)

    def setup_environment(self) -> None:
        # for this process's lifetime: every full-state-dict save and load gathers without CPU offload
        from lightning.pytorch.strategies import fsdp as lightning_fsdp

        lightning_fsdp._get_full_state_dict_context = _full_state_dict_context_without_offload
        super().setup_environment()


def _full_state_dict_context_without_offload(module, world_size, rank0_only=True):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))


def _global_grad_norm(module: torch.nn.Module) -> float:
    # with use_orig_params each rank's .grad views hold only its own shard: sum the squares over ranks
    squares = sum((p.grad.detach().float() ** 2).sum() for p in module.parameters() if p.grad is not None)
    squares = torch.as_tensor(squares, dtype=torch.float64)
    dist.all_reduce(squares)
    return float(squares.sqrt())


class FSDPProbe(Callback):
    """Writes to ``path`` (rank 0) the FSDP units, checkpoint-wrapped layers and, per step, the global
    gradient norm before and after the trainer's clipping."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.record: dict = {"steps": []}

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
        from torch.distributed.fsdp import FullyShardedDataParallel

        modules = list(trainer.strategy.model.modules())
        self.record["fsdp_units"] = sum(isinstance(m, FullyShardedDataParallel) for m in modules)
        self.record["checkpointed_layers"] = sorted({type(m._checkpoint_wrapped_module).__name__
                                                     for m in modules if isinstance(m, CheckpointWrapper)})
        self.record["checkpointed_count"] = sum(isinstance(m, CheckpointWrapper) for m in modules)
        self.record["world_size"] = trainer.world_size
        # transformers' generate keeps every process stepping until all are done only for FSDP-managed models
        self.record["generate_syncs_processes"] = bool(getattr(pl_module.model, "_is_fsdp_managed_module", False))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # called before clipping
        self.record["steps"].append({"before_clip": _global_grad_norm(pl_module)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # gradients stay until next step
        self.record["steps"][-1]["after_clip"] = _global_grad_norm(pl_module)

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.path.write_text(json.dumps(self.record))
