"""Reward-model training throughput on a GPU: our RewardModel under the Lightning Trainer on the
Qwen2-0.5B shape (hidden 896, 24 layers, 14/2 heads, MLP 4864, vocabulary 151,936; random weights, random
token pairs, 1024 tokens per side, 8 pairs per step), in several settings, each timed over the same steps
after warm-up.

    python bench/reward_gpu.py                         # all variants
    python bench/reward_gpu.py --variants autocast,autocast_adamw8bit --steps 30
    python bench/reward_gpu.py --cpu-smoke             # every code path on a 2-layer model on the CPU (tests)

MFU = tokens/s x (6 N_non-embedding + 12 layers hidden seq) / the GPU's dense bf16 peak FLOP/s (from
``callbacks.throughput``, else 989e12 of an H100/H200 SXM, the usual MFU convention). Prints one JSON line
per variant (a failed one with its error) and a table.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)
SMOKE_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=128)
DEFAULT_PEAK_FLOPS = 989e12  # dense bf16 of an H100/H200 SXM, where the GPU's name is not in our table
# name -> (precision, optimizer, compile, optimizer arguments beyond lr, RewardModel arguments). In our modules
# torch's AdamW left at its defaults runs fused on CUDA ("autocast_foreach" forces torch's own default
# instead) and Llama-style RMSNorms run as torch's fused kernel ("autocast_model_norms" keeps the model's own)
VARIANTS = {
    "autocast": ("bf16-mixed", "torch.optim.AdamW", False, {}, {}),
    "autocast_foreach": ("bf16-mixed", "torch.optim.AdamW", False, {"foreach": True}, {}),
    "autocast_model_norms": ("bf16-mixed", "torch.optim.AdamW", False, {}, {"fused_norms": False}),
    "autocast_adamw8bit": ("bf16-mixed", "bitsandbytes.optim.AdamW8bit", False, {}, {}),
    "bf16_weights": ("bf16-true", "torch.optim.AdamW", False, {}, {}),
    "autocast_compile": ("bf16-mixed", "torch.optim.AdamW", True, {}, {}),
    "bf16_weights_compile": ("bf16-true", "torch.optim.AdamW", True, {}, {}),
}


class RandomPairs(pl.LightningDataModule):
    """Random token pairs with no padding; ids avoid the special tokens so pooling reads the last token."""

    def __init__(self, pairs: int, seq: int, vocab: int, steps: int):
        super().__init__()
        self.pairs, self.seq, self.vocab, self.steps = pairs, seq, vocab, steps

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        batches = [{"input_ids": torch.randint(300, self.vocab, (2 * self.pairs, self.seq), generator=generator),
                    "attention_mask": torch.ones(2 * self.pairs, self.seq, dtype=torch.long),
                    "margin": torch.zeros(self.pairs), "subset": torch.zeros(self.pairs, dtype=torch.long)}
                   for _ in range(4)]
        # batch_size=None: the items are already batches (a plain list would read as several loaders)
        return torch.utils.data.DataLoader([batches[i % 4] for i in range(self.steps)], batch_size=None)


class StepTimer(pl.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.tokens, self.timed_steps = warmup, None, 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()
        if self.start is not None:
            self.tokens += batch["input_ids"].numel()
            self.timed_steps += 1

    def on_train_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def run_variant(name: str, model_dir: str, steps: int, warmup: int, pairs: int, seq: int, shape: dict,
                accelerator: str = "gpu") -> dict:
    import importlib

    from callbacks.throughput import Throughput, peak_flops_by_name, training_flops
    from modules.reward import RewardModel

    precision, optimizer_path, compile_model, optimizer_kwargs, model_kwargs = VARIANTS[name]
    module_name, _, class_name = optimizer_path.rpartition(".")
    optimizer_cls = getattr(importlib.import_module(module_name), class_name)
    torch.manual_seed(0)
    model = RewardModel(model=model_dir, attn_implementation="sdpa", compile=compile_model, **model_kwargs,
                        optimizer=functools.partial(optimizer_cls, lr=1e-5, **optimizer_kwargs))
    timer = StepTimer(warmup)
    # the training-run callback measures the same steps: its figures should agree with the timer's
    monitor = Throughput(warmup_steps=warmup, log_every_n_steps=steps)
    # clipping at 1.0 as bt.yaml and TRL's RewardTrainer do: it is part of every step's cost
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=warmup + steps,
                         gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer, monitor])
    trainer.fit(model, datamodule=RandomPairs(pairs, seq, shape["vocab_size"], warmup + steps))
    tokens_per_s = timer.tokens / timer.seconds
    optimizer = trainer.optimizers[0]
    state_dtypes = sorted({str(t.dtype) for state in optimizer.state.values() for t in state.values()
                           if torch.is_tensor(t) and t.numel() > 1})
    flops_per_token = training_flops(1, seq, model.model_flops_shape) / seq  # 6 N + 12 L H seq
    peak_flops = (peak_flops_by_name(torch.cuda.get_device_name()) if accelerator == "gpu" else None) or DEFAULT_PEAK_FLOPS
    result = {"variant": name, "precision": precision, "optimizer": optimizer_path, "compile": compile_model,
              "fused_norms": model_kwargs.get("fused_norms", True),
              "fused": optimizer.defaults.get("fused"), "foreach": optimizer.defaults.get("foreach"),
              "tokens_per_s": tokens_per_s, "pairs_per_s": tokens_per_s / (2 * seq),
              "mfu": tokens_per_s * flops_per_token / peak_flops,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if accelerator == "gpu" else float("nan"),
              "timed_steps": timer.timed_steps,
              "optimizer_state_dtypes": state_dtypes,
              "fused_norm_layers": sum(isinstance(module.__dict__.get("forward"), functools.partial)
                                       for module in model.model.modules()),
              "callback_padded_tokens_per_s": monitor.summary["padded_tokens_per_s"],
              "callback_mfu": monitor.summary.get("mfu"),
              "device": torch.cuda.get_device_name() if accelerator == "gpu" else "cpu"}
    del trainer, model, optimizer
    gc.collect()  # the trainer and the module refer to each other: only a collection frees the weights and state
    torch._dynamo.reset()
    if accelerator == "gpu":
        torch.cuda.empty_cache()
    return result


def write_model_dir(folder: Path, shape: dict) -> str:
    """Config of the Qwen2-0.5B shape (no weights: loaded with fresh random weights) + our tokenizer."""
    from transformers import Qwen2Config

    from modules.lm import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    tokenizer.save_pretrained(folder)
    Qwen2Config(**shape, pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="a 2-layer model, 2 timed steps, on the CPU: checks the script, not the speed")
    args = parser.parse_args()
    shape, accelerator = QWEN2_05B, "gpu"
    if args.cpu_smoke:
        shape, accelerator = SMOKE_SHAPE, "cpu"
        args.steps, args.warmup, args.pairs, args.seq = 2, 1, 2, 32
    elif not torch.cuda.is_available():
        sys.exit("bench/reward_gpu.py needs a CUDA GPU (or --cpu-smoke)")
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        model_dir = write_model_dir(Path(folder), shape)
        for name in args.variants.split(","):
            try:
                result = run_variant(name, model_dir, args.steps, args.warmup, args.pairs, args.seq, shape, accelerator)
            except Exception as error:  # one variant's failure (out of memory, a compile error) must not cost the rest
                traceback.print_exc()
                result = {"variant": name, "error": f"{type(error).__name__}: {error}"[:2000]}
            if "error" in result:  # outside the except block, whose traceback would keep the variant's tensors alive
                gc.collect()
                torch._dynamo.reset()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            print(json.dumps(result), flush=True)
            results.append(result)
            if args.out:  # after every variant: a run cut short keeps what it measured
                Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n{'variant':24}{'tokens/s':>12}{'pairs/s':>10}{'MFU':>8}{'peak GiB':>10}")
    for r in results:
        if "error" in r:
            print(f"{r['variant']:24}FAILED: {r['error'][:200]}")
        else:
            print(f"{r['variant']:24}{r['tokens_per_s']:>12,.0f}{r['pairs_per_s']:>10.1f}{r['mfu']:>8.1%}"
                  f"{r['peak_gib']:>10.1f}")
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
