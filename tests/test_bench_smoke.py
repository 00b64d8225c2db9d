"""The GPU benchmark scripts' code paths, on the CPU: a GPU session has minutes, not time to debug them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_reward_gpu_bench_runs_every_non_compiled_variant_on_the_cpu():
    variants = ["autocast", "autocast_foreach", "autocast_model_norms", "autocast_adamw8bit", "bf16_weights"]
    done = subprocess.run([sys.executable, "bench/reward_gpu.py", "--cpu-smoke", "--variants", ",".join(variants)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = {row["variant"]: row for row in (json.loads(line) for line in done.stdout.splitlines()
                                               if line.startswith("{"))}
    assert list(results) == variants
    assert all(row["timed_steps"] == 2 and row["tokens_per_s"] > 0 for row in results.values())
    # the Throughput callback times the same steps as the script's own timer (to within their few hooks)
    for row in results.values():
        assert abs(row["callback_padded_tokens_per_s"] / row["tokens_per_s"] - 1) < 0.25
        assert row["callback_mfu"] is None  # no known peak on a CPU
    # 2 decoder layers: two norms each and the final one run fused, unless the variant keeps the model's own
    assert {name: row["fused_norm_layers"] for name, row in results.items()} == {
        name: 0 if name == "autocast_model_norms" else 5 for name in variants}
    assert results["autocast_foreach"]["foreach"] is True
    assert "torch.uint8" in results["autocast_adamw8bit"]["optimizer_state_dtypes"]
    assert results["bf16_weights"]["optimizer_state_dtypes"] == ["torch.bfloat16"]
    assert results["autocast"]["optimizer_state_dtypes"] == ["torch.float32"]


def test_reward_gpu_bench_rejects_unknown_variants():
    done = subprocess.run([sys.executable, "bench/reward_gpu.py", "--cpu-smoke", "--variants", "autocast,fast"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "unknown variants ['fast']" in done.stderr


def test_reward_vs_trl_gpu_mode_runs_on_the_cpu_with_one_layer(tmp_path):
    import pytest

    pytest.importorskip("trl", reason="TRL is the optional bench extra")
    out = tmp_path / "summary.json"
    done = subprocess.run([sys.executable, "bench/reward_vs_trl.py", "--gpu-qwen2-0.5b", "--device", "cpu",
                           "--qwen-layers", "1", "--steps", "3", "--warmup", "1", "--batch-size", "2",
                           "--max-length", "32", "--out", str(tmp_path / "work"), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["mode"] == "gpu-qwen2-0.5b" and summary["settings"]["max_length"] == 32
    # the same start weights, batches and loss on both sides: the losses agree step by step
    assert summary["loss_difference_per_step_max"] < 1e-4
    assert summary["ours"]["pairs_per_s"] > 0 and summary["trl"]["pairs_per_s"] > 0


def test_length_grouping_bench_trains_both_ways_and_grouping_pads_less(tmp_path):
    done = subprocess.run([sys.executable, "bench/length_grouping.py", "--steps", "3", "--warmup", "1", "--rounds", "1",
                           "--pairs", "160", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    for name, result in summary["data"].items():
        uniform, grouped = result["runs"]["uniform"][0], result["runs"]["grouped"][0]
        assert grouped["padded_share"] < uniform["padded_share"], name
        assert grouped["positions"] < uniform["positions"], name
        assert result["ratio"] > 0
    assert "| long_tail | 8 × 512 |" in done.stdout
