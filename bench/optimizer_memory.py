"""Optimizer-state bytes per parameter and peak memory: torch AdamW vs bitsandbytes AdamW8bit.

A ~100M-parameter model of the tiny preset's architecture (Qwen2), a few training steps with each
optimizer, each in a fresh process so peak memory is its own. Prints both side by side with the ratio.

    python bench/optimizer_memory.py            # CPU, ~100M parameters
    python bench/optimizer_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OPTIMIZERS = {"torch AdamW": "torch.optim.AdamW", "bnb AdamW8bit": "bitsandbytes.optim.AdamW8bit"}
SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12,
             num_key_value_heads=4, max_position_embeddings=512)


def measure(optimizer_path: str, device: str, steps: int, seq: int, batch: int) -> dict:
    import importlib

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from modules.base import decay_groups, keep_embeddings_in_32bit
    from modules.lm import build_byte_tokenizer

    torch.manual_seed(0)
    vocab = len(build_byte_tokenizer())
    model = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, **SHAPE)).to(device)
    keep_embeddings_in_32bit(model)
    module_name, _, class_name = optimizer_path.rpartition(".")
    optimizer = getattr(importlib.import_module(module_name), class_name)(decay_groups(model), lr=1e-4)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    # a rough figure, first step (state allocation) included: this script measures memory, not speed
    seconds = (time.perf_counter() - start) / steps
    params = sum(p.numel() for p in model.parameters())
    state_bytes = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                      for t in state.values() if torch.is_tensor(t) and t.numel() > 1)
    dtypes = sorted({str(t.dtype) for state in optimizer.state.values() for t in state.values()
                     if torch.is_tensor(t) and t.numel() > 1})
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"parameters": params, "state_bytes": state_bytes, "state_bytes_per_param": state_bytes / params,
            "state_dtypes": dtypes, "peak_bytes": peak, "seconds_per_step": seconds,
            "peak_kind": "cuda max_memory_allocated" if device == "cuda" else "process max RSS"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.device, args.steps, args.seq, args.batch)))
        return
    results = {}
    for label, path in OPTIMIZERS.items():
        command = [sys.executable, __file__, "--worker", path, "--device", args.device, "--steps", str(args.steps),
                   "--seq", str(args.seq), "--batch", str(args.batch)]
        out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
    base, eight = results["torch AdamW"], results["bnb AdamW8bit"]
    print(f"model: Qwen2 {SHAPE}, {base['parameters'] / 1e6:.1f}M parameters, device {args.device}")
    print(f"{'':24}{'torch AdamW':>16}{'bnb AdamW8bit':>16}{'ratio':>10}")
    rows = [("state bytes / param", "state_bytes_per_param", "{:.2f}"),
            ("state MiB", "state_bytes", "{:.0f}"), (f"peak MiB ({base['peak_kind']})", "peak_bytes", "{:.0f}"),
            ("seconds / step (rough)", "seconds_per_step", "{:.3f}")]
    for name, key, fmt in rows:
        scale = 2**20 if key.endswith("bytes") and key != "state_bytes_per_param" else 1
        a, b = base[key] / scale, eight[key] / scale
        print(f"{name:24}{fmt.format(a):>16}{fmt.format(b):>16}{a / b:>9.2f}x")
    print(f"state dtypes: AdamW {base['state_dtypes']}, AdamW8bit {eight['state_dtypes']} "
          "(embeddings keep 32-bit state; tensors under 4096 elements stay 32-bit in bitsandbytes)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
