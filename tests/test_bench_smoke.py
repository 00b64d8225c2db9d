"""The GPU benchmark scripts' code paths, on the CPU: a GPU session has minutes, not time to debug them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_reward_gpu_bench_rejects_unknown_variants(monkeypatch):

    bench = _bench_module("reward_gpu")
    monkeypatch.setattr(sys, "argv", ["reward_gpu.py", "--cpu-smoke", "--variants", "autocast,fast"])
    with pytest.raises(SystemExit, match=r"unknown variants \['fast'\]"):
        bench.main()


def test_reward_vs_trl_gpu_mode_runs_on_the_cpu_with_one_layer(tmp_path):

    pytest.importorskip("trl", reason="TRL is the optional bench extra")
    out = tmp_path / "summary.json"
    done = subprocess.run([sys.executable, "bench/reward_vs_trl.py", "--gpu-qwen2-0.5b", "--device", "cpu",
                           "--arms", "trl,ours,ours+bf16w,trl+bf16w", "--repeats", "1",
                           "--qwen-layers", "1", "--steps", "3", "--warmup", "1", "--batch-size", "2",
                           "--max-length", "32", "--out", str(tmp_path / "work"), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["mode"] == "gpu-qwen2-0.5b" and summary["settings"]["max_length"] == 32
    assert all(entry["pairs_per_s"] > 0 and not entry["errors"] for entry in summary["arms"].values())
    assert summary["arms"]["ours+bf16w"]["setup"]["precision"] == "bf16-true"
    rows = {(row["arm"], row["against"]): row for row in summary["comparisons"]}
    # the same start weights, batches and loss on both sides: the losses agree step by step
    assert rows[("ours", "trl")]["loss_difference_per_step_max"] < 1e-4
    assert rows[("ours+bf16w", "trl+bf16w")]["losses_agree"], rows[("ours+bf16w", "trl+bf16w")]
    assert "| ours+bf16w |" in done.stdout and "ours / trl: median pairs/s" in done.stdout


def test_length_grouping_bench_trains_three_ways_and_both_others_pad_less(tmp_path):
    done = subprocess.run([sys.executable, "bench/length_grouping.py", "--steps", "3", "--warmup", "1", "--rounds", "1",
                           "--pairs", "160", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "results.json").read_text())
    for name, result in summary["data"].items():
        uniform, grouped, chunked = (result["runs"][kind][0] for kind in ("uniform", "grouped", "chunked"))
        for fewer in (grouped, chunked):
            assert fewer["padded_share"] < uniform["padded_share"], name
            assert fewer["positions"] < uniform["positions"], name
        assert result["ratio"] > 0 and result["chunked_ratio"] > 0
        assert result["chunked_loss_difference_max"] < 1e-4, name  # the same batches: the same losses
    assert "| long_tail | 8 × 512 |" in done.stdout


def _bench_module(name: str):
    import importlib

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_reward_vs_trl_arms_parse_and_alternate():

    bench = _bench_module("reward_vs_trl")
    arms = bench.parse_arms("trl, ours,ours+compile+bf16w", gpu=True)
    assert [arm.name for arm in arms] == ["trl", "ours", "ours+compile+bf16w"]
    assert arms[2] == bench.Arm("ours", compile=True, bf16_weights=True)
    assert bench.parse_arms("ours+bf16w+compile", gpu=True)[0].name == "ours+compile+bf16w"  # one name per arm
    order = [(repeat, arm.name) for repeat, arm in bench.run_order(arms[:2], 3)]
    assert order == [(0, "trl"), (0, "ours"), (1, "ours"), (1, "trl"), (2, "trl"), (2, "ours")]
    for text, message in [("ours,tlr", "expected ours or trl"), ("ours+fast", "expected ours or trl"),
                          ("ours+compile+compile", "expected ours or trl"), ("ours,ours", "named twice"),
                          ("ours+bf16w", "GPU-mode option")]:
        with pytest.raises(ValueError, match=message):
            bench.parse_arms(text, gpu=text != "ours+bf16w")


def test_reward_vs_trl_summary_compares_with_trl_defaults_and_like_for_like():
    from types import SimpleNamespace

    bench = _bench_module("reward_vs_trl")
    arms = bench.parse_arms("trl,ours,ours+compile+bf16w,trl+compile+bf16w", gpu=True)

    def run(pairs_per_s, losses, **extra):
        return {"pairs_per_s": pairs_per_s, "pairs_per_cpu_s": pairs_per_s / 2, "tokens_per_s": 2048 * pairs_per_s,
                "final_loss": losses[-1], "mean_loss_last_10": sum(losses) / len(losses), "losses": losses,
                "peak_memory_gib": 20.0, "step_seconds": [1 / pairs_per_s, 2 / pairs_per_s, 9.0], **extra}

    runs = {"trl": [run(40.0, [0.7, 0.6]), run(44.0, [0.7, 0.6])],
            "ours": [run(48.0, [0.7, 0.61]), run(46.0, [0.7, 0.61])],
            "ours+compile+bf16w": [{"error": "OutOfMemoryError: ...", "repeat": 0}, run(70.0, [0.7, 0.5])],
            "trl+compile+bf16w": [run(50.0, [0.7, 0.7])]}
    args = SimpleNamespace(gpu_qwen2_05b=True, device="cuda")
    summary = bench.summarise(runs, arms, args, {"flops_per_token": 1e9, "peak_flops": 1e15})
    trl, ours = summary["arms"]["trl"], summary["arms"]["ours"]
    assert trl["pairs_per_s"] == 42.0 and ours["pairs_per_s"] == 47.0 and ours["best_pairs_per_s"] == 48.0
    assert ours["mfu"] == 47.0 * 2048 * 1e9 / 1e15
    assert summary["arms"]["ours+compile+bf16w"]["errors"] == ["OutOfMemoryError: ..."]
    rows = {(row["arm"], row["against"]): row for row in summary["comparisons"]}
    assert set(rows) == {("ours", "trl"), ("ours+compile+bf16w", "trl"), ("ours+compile+bf16w", "trl+compile+bf16w")}
    default = rows[("ours", "trl")]
    assert default["ratio_median"] == 47.0 / 42.0 and default["ratio_best"] == 48.0 / 44.0
    # the median over every timed step of an arm's runs (six here): the slow outlier steps (9 s) do not move it
    ours_step, trl_step = (2 / 48.0 + 2 / 46.0) / 2, (2 / 40.0 + 2 / 44.0) / 2
    assert ours["median_step_seconds"] == pytest.approx(ours_step) and trl["median_step_seconds"] == pytest.approx(trl_step)
    assert default["ratio_median_step"] == pytest.approx(trl_step / ours_step)
    assert default["target"] == 1.1 and default["target_met"] is True  # 1.119 >= 1.1
    # the same settings on both sides: their loss curves are compared step by step (bf16 tolerance)
    assert default["losses_agree"] is True and abs(default["loss_difference_per_step_max"] - 0.01) < 1e-12
    fast = rows[("ours+compile+bf16w", "trl")]
    assert fast["ratio_median"] == 70.0 / 42.0 and fast["target"] == 1.6 and fast["target_met"] is True
    assert "losses_agree" not in fast  # other settings than TRL's defaults: no loss comparison
    twin = rows[("ours+compile+bf16w", "trl+compile+bf16w")]
    assert twin["ratio_median"] == 70.0 / 50.0 and "target" not in twin
    assert twin["losses_agree"] is False and abs(twin["loss_difference_per_step_max"] - 0.2) < 1e-12
