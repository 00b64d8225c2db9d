"""Reward-model training throughput: our ``fit`` (cli.py, RewardModel) against TRL's RewardTrainer, in one run.

Both sides start from the same saved weights (one sequence-classification model written once), train on the
same token ids (ours tokenizes; TRL gets our ids as ``chosen_ids``/``rejected_ids``) in the same batch order
(TRL's sampler is swapped for ours), with the same batch size, learning rate, AdamW betas and weight decay,
constant schedule, gradient clipping 1.0 and seed. Each side keeps its own defaults otherwise (TRL: fused
AdamW; ours: torch AdamW as configured in bt.yaml, fused on a GPU, and torch's fused RMSNorm kernel). TRL's gradient checkpointing (its default) is off unless
``--trl-gradient-checkpointing``, since ours does not checkpoint. Runs alternate (ours, TRL, ours, TRL, ...)
so machine load hits both alike; the table gives each run, the median and the best run of each, and
throughput per CPU-second of the process (a shared CPU's load changes wall time far more than CPU time).

    python bench/reward_vs_trl.py                       # CPU: the tiny preset, arithmetic pairs, ~3-5 minutes
    python bench/reward_vs_trl.py --gpu-qwen2-0.5b      # GPU: the Qwen2-0.5B shape, random weights/tokens
    python bench/reward_vs_trl.py --gpu-qwen2-0.5b --compile --bf16-weights

GPU mode: Qwen2-0.5B shape (hidden 896, 24 layers, 14/2 heads, MLP 4864, vocab 151,936, tied embeddings),
random weights built from a config (no network), random tokens (random letters through the embedded byte
tokenizer, one token each: the ids span only the byte range, which costs the same), 1024 tokens per side,
8 pairs per step,
AdamW lr 1e-5, bf16 autocast (``--bf16-weights``: bf16 parameters, no autocast); steps 11-30 timed. Prints
tokens/s, pairs/s, MFU = tokens/s x (6 N_non-embedding + 12 layers hidden seq) / 989 TFLOP/s, peak memory.
TRL is the optional ``bench`` extra: ``pip install -e .[bench]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

PEAK_FLOPS = 989e12  # dense bf16 of an H100/H200 SXM, the usual MFU denominator
QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151_936, tie_word_embeddings=True, max_position_embeddings=32768,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock:
    """Wall time at the end of every optimizer step (synchronised on a GPU only at the two timing marks,
    so the clock itself does not stall the pipeline) and the loss of every step."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.start = self.end = None
        self.losses: list[float] = []
        self.tokens = 0

    def step_done(self, step: int, loss: float | None, step_tokens: list[int]) -> None:
        if loss is not None:
            self.losses.append(loss)
        if step == self.warmup:
            sync()
            self.start, self.cpu_start = time.perf_counter(), time.process_time()
        elif step > self.warmup:
            self.tokens += step_tokens[step - 1]
            if step == self.steps:
                sync()
                self.end, self.cpu_end = time.perf_counter(), time.process_time()

    def result(self, pairs_per_step: int) -> dict[str, Any]:
        seconds = self.end - self.start
        timed = self.steps - self.warmup
        cpu_seconds = self.cpu_end - self.cpu_start  # CPU time of this process, all threads: less load-sensitive
        return {"seconds": seconds, "cpu_seconds": cpu_seconds, "timed_steps": timed,
                "pairs_per_s": timed * pairs_per_step / seconds, "pairs_per_cpu_s": timed * pairs_per_step / cpu_seconds,
                "tokens_per_s": self.tokens / seconds, "final_loss": self.losses[-1],
                "mean_loss_last_10": statistics.fmean(self.losses[-10:]), "losses": self.losses}


# ----------------------------------------------------------------------------------------------------
# Shared model and data


def save_start_model(out: Path, gpu: bool, seed: int, device: str = "cuda", layers: int | None = None) -> Path:
    """One sequence-classification model (weights + tokenizer) that both trainers load."""
    from transformers import AutoModelForSequenceClassification, Qwen2Config

    folder = out / "start_model"
    torch.manual_seed(seed)
    from modules import lm

    # the embedded byte-level tokenizer: one token per ASCII character, so random letters are random ids
    tokenizer = lm.load_tokenizer("tiny")
    lm.ensure_distinct_pad_token(tokenizer)
    if gpu:
        shape = QWEN2_05B | ({"num_hidden_layers": layers} if layers else {})
        config = Qwen2Config(**shape, num_labels=1, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        with torch.device(device):  # initialising 0.5B parameters on the CPU takes long
            model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = lm.load_model("tiny", kind="sequence_classification", tokenizer=tokenizer)
    embedding = model.get_input_embeddings().weight.numel()
    counts = {"non_embedding_parameters": sum(p.numel() for p in model.parameters()) - embedding,
              "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size}
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "bench_counts.json").write_text(json.dumps(counts))
    return folder


def write_pairs(out: Path, gpu: bool, pairs: int, seq_len: int, seed: int) -> Path:
    path = out / "pairs.jsonl"
    if gpu:  # random letters (one token each), seq_len - 1 per side: the data module appends EOS
        alphabet = string.ascii_letters + string.digits
        generator = torch.Generator().manual_seed(seed)
        rows = []
        for _ in range(pairs):
            sides = torch.randint(0, len(alphabet), (2, seq_len - 1), generator=generator).tolist()
            rows.append({"chosen": "".join(alphabet[i] for i in sides[0]),
                         "rejected": "".join(alphabet[i] for i in sides[1])})
    else:
        from datamodules import arithmetic

        problems = arithmetic.generate_splits({"train": pairs}, seed=seed)["train"]
        rows = arithmetic.preference_rows(problems, seed=seed)
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def padded_tokens_per_step(pairs: list[dict[str, list[int]]], batch_size: int, steps: int, seed: int) -> list[int]:
    """Token positions each step processes (2 x batch rows, padded to the batch's longest side): the same
    batches on both sides, so the same count."""
    from datamodules.common import EpochSeededSampler

    order = list(EpochSeededSampler(len(pairs), seed))
    lengths = [max(len(pair["chosen_ids"]), len(pair["rejected_ids"])) for pair in pairs]
    return [2 * batch_size * max(lengths[index] for index in order[start:start + batch_size])
            for start in range(0, steps * batch_size, batch_size)]


def tokenized_pairs(model_dir: Path, data_file: Path, max_length: int) -> list[dict[str, list[int]]]:
    """Our data module's token ids of every pair, in file order (what TRL trains on)."""
    from datamodules.preference import PreferenceData

    data = PreferenceData(train_file=str(data_file), tokenizer=str(model_dir), max_length=max_length,
                          truncation_side="right")
    data.resolve_tokenizer()
    items = data.load_split("train")
    return [{"chosen_ids": item["chosen"], "rejected_ids": item["rejected"]} for item in items]


# ----------------------------------------------------------------------------------------------------
# The two trainers


def fit_reward_model(model_dir: Path, data_file: Path, batch_size: int, max_length: int, steps: int, seed: int,
                     out: Path, name: str, callback: Any, extra: Sequence[str] = ()) -> None:
    """Our reward ``fit`` (cli.py, bt.yaml) on ``data_file`` for ``steps`` steps with one more callback and no
    validation, checkpoint, export, progress bar or model summary; logs in ``out/name``."""
    import cli

    defaults = cli.trainer_defaults
    cli.trainer_defaults = lambda: {**defaults(), "callbacks": [callback]}
    try:
        cli.main([
            "fit", "--config", str(ROOT / "configs/reward/bt.yaml"), f"--model.init_args.model={model_dir}",
            f"--data.init_args.train_file={data_file}", f"--data.init_args.batch_size={batch_size}",
            f"--data.init_args.max_length={max_length}", f"--trainer.max_steps={steps}",
            "--trainer.val_check_interval=null", "--test_after_fit=false", f"--seed_everything={seed}",
            f"--data.init_args.seed={seed}", f"--trainer.logger.init_args.save_dir={out}",
            f"--trainer.logger.init_args.name={name}", f"--checkpoint.dirpath={out / name / 'ckpt'}",
            "--checkpoint.monitor=null", "--checkpoint.save_top_k=0", "--checkpoint.save_last=false",
            "--export.dirpath=null", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.num_sanity_val_steps=0", *extra,
        ])
    finally:
        cli.trainer_defaults = defaults


def run_ours(model_dir: Path, data_file: Path, step_tokens: list[int], out: Path, args, name: str) -> dict[str, Any]:
    import lightning.pytorch as pl

    clock = StepClock(args.warmup, args.steps)

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"].item() if (args.record_losses and outputs) else None
            clock.step_done(trainer.global_step, loss, step_tokens)

    extra = ["--model.init_args.lr_scheduler=null", f"--model.init_args.optimizer.init_args.lr={args.lr}"]
    if args.gpu_qwen2_05b:
        extra += [f"--trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}", "--trainer.devices=1"]
        extra += (["--trainer.precision=bf16-true", "--model.init_args.dtype=bfloat16"] if args.bf16_weights
                  else ["--trainer.precision=bf16-mixed"])
    if args.compile:
        extra.append("--model.init_args.compile=true")
    fit_reward_model(model_dir, data_file, args.batch_size, args.max_length, args.steps, args.seed, out, name, Clock(),
                     extra)
    return clock.result(args.batch_size)


def run_trl(model_dir: Path, pairs: list[dict[str, list[int]]], step_tokens: list[int], out: Path, args,
            name: str) -> dict[str, Any]:
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from datamodules.common import EpochSeededSampler

    clock = StepClock(args.warmup, args.steps)

    class SameOrder(RewardTrainer):
        def _get_train_sampler(self, train_dataset=None):  # our sampler: identical batches on both sides
            return EpochSeededSampler(len(train_dataset or self.train_dataset), args.seed)

    class Clock(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

        def on_step_end(self, _args, state, control, **kwargs):
            clock.step_done(state.global_step, None, step_tokens)

    gpu = args.gpu_qwen2_05b
    dtype = torch.bfloat16 if args.bf16_weights else torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = RewardConfig(
        output_dir=str(out / name), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, adam_beta1=0.9,
        adam_beta2=0.98, max_grad_norm=1.0, seed=args.seed, data_seed=args.seed, logging_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True, max_length=args.max_length,
        gradient_checkpointing=args.trl_gradient_checkpointing, bf16=gpu and not args.bf16_weights,
        use_cpu=args.device == "cpu", torch_compile=args.compile, dataloader_num_workers=0, remove_unused_columns=True,
    )
    trainer = SameOrder(model=model, args=config, train_dataset=datasets.Dataset.from_list(pairs),
                        processing_class=tokenizer, callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # no per-step printing: ours prints nothing either
    trainer.train()
    result = clock.result(args.batch_size)
    result["optimizer"] = getattr(config.optim, "value", config.optim)
    del trainer, model
    return result


# ----------------------------------------------------------------------------------------------------


def non_embedding_parameters(model_dir: Path) -> tuple[int, int, int]:
    counts = json.loads((model_dir / "bench_counts.json").read_text())
    return counts["non_embedding_parameters"], counts["layers"], counts["hidden"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-qwen2-0.5b", dest="gpu_qwen2_05b", action="store_true",
                        help="the Qwen2-0.5B shape (hidden 896, 24 layers) on a GPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    parser.add_argument("--bf16-weights", action="store_true", help="bf16 parameters, no autocast (GPU)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's default; ours has none")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (CPU 40, GPU 30)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (CPU 5, GPU 10)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (CPU 32, GPU 8)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per side (CPU 128, GPU 1024)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating runs of each (CPU 3, GPU 1)")
    parser.add_argument("--lr", type=float, default=None, help="CPU 3e-4 (bt.yaml), GPU 1e-5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="GPU mode on the CPU, to smoke-test it (with --qwen-layers 1)")
    parser.add_argument("--qwen-layers", type=int, default=None, help="fewer layers of the Qwen2 shape (smoke test)")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    gpu = args.gpu_qwen2_05b
    for key, cpu_value, gpu_value in (("steps", 40, 30), ("warmup", 5, 10), ("batch_size", 32, 8),
                                      ("max_length", 128, 1024), ("repeats", 3, 1), ("lr", 3e-4, 1e-5)):
        if getattr(args, key) is None:
            setattr(args, key, gpu_value if gpu else cpu_value)
    args.record_losses = True
    args.device = args.device or ("cuda" if gpu else "cpu")
    if gpu and args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--gpu-qwen2-0.5b needs a CUDA device")
    if args.bf16_weights and not gpu:
        sys.exit("--bf16-weights is a GPU option")
    try:
        import trl
    except ImportError:
        sys.exit("TRL is not installed: pip install -e .[bench]")

    out = Path(args.out or tempfile.mkdtemp(prefix="reward_vs_trl_"))
    out.mkdir(parents=True, exist_ok=True)
    model_dir = save_start_model(out, gpu, args.seed, args.device, args.qwen_layers)
    pairs_needed = args.steps * args.batch_size
    data_file = write_pairs(out, gpu, pairs_needed, args.max_length, args.seed)
    pairs = tokenized_pairs(model_dir, data_file, args.max_length)
    step_tokens = padded_tokens_per_step(pairs, args.batch_size, args.steps, args.seed)
    load_start = os.getloadavg()[0]
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
    for repeat in range(args.repeats):
        for side in ("ours", "trl"):
            on_cuda = args.device == "cuda"
            if on_cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            name = f"{side}_{repeat}"
            result = (run_ours(model_dir, data_file, step_tokens, out, args, name) if side == "ours"
                      else run_trl(model_dir, pairs, step_tokens, out, args, name))
            if on_cuda:
                result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            runs[side].append(result)
            gc.collect()
            print(f"[{name}] {result['pairs_per_s']:.2f} pairs/s, {result['tokens_per_s']:.0f} tokens/s, "
                  f"final loss {result['final_loss']:.4f}", flush=True)

    n_params, layers, hidden = non_embedding_parameters(model_dir)
    flops_per_token = 6 * n_params + 12 * layers * hidden * args.max_length
    summary: dict[str, Any] = {"mode": "gpu-qwen2-0.5b" if gpu else "cpu-tiny", "settings": {
        key: value for key, value in vars(args).items() if key not in ("out", "json", "record_losses")},
        "non_embedding_parameters": n_params, "flops_per_token": flops_per_token,
        "trl_version": trl.__version__, "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores",
        "load_average": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        # on a shared CPU the thread count changes the result more than either trainer does: record it
        "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    for side, results in runs.items():
        summary[side] = {
            "pairs_per_s": statistics.median(r["pairs_per_s"] for r in results),
            "best_pairs_per_s": max(r["pairs_per_s"] for r in results),
            "pairs_per_cpu_s": statistics.median(r["pairs_per_cpu_s"] for r in results),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
            "final_loss": results[-1]["final_loss"], "mean_loss_last_10": results[-1]["mean_loss_last_10"],
            "runs_pairs_per_s": [round(r["pairs_per_s"], 3) for r in results],
        }
        summary[side]["mfu"] = summary[side]["tokens_per_s"] * flops_per_token / PEAK_FLOPS if gpu else None
        if args.device == "cuda":
            summary[side]["peak_memory_gb"] = max(r["peak_memory_gb"] for r in results)
        if side == "trl":
            summary[side]["optimizer"] = results[-1]["optimizer"]
    summary["ratio_ours_over_trl"] = summary["ours"]["pairs_per_s"] / summary["trl"]["pairs_per_s"]
    summary["ratio_best_ours_over_best_trl"] = summary["ours"]["best_pairs_per_s"] / summary["trl"]["best_pairs_per_s"]
    summary["ratio_per_cpu_second"] = summary["ours"]["pairs_per_cpu_s"] / summary["trl"]["pairs_per_cpu_s"]
    summary["loss_difference_per_step_max"] = max(
        abs(a - b) for a, b in zip(runs["ours"][-1]["losses"], runs["trl"][-1]["losses"]))
    print_table(summary, gpu)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


def print_table(summary: dict[str, Any], gpu: bool) -> None:
    settings = summary["settings"]
    print(f"\nReward-model training, {summary['mode']} on {summary['device']}; batch {settings['batch_size']} pairs, "
          f"{settings['max_length']} tokens/side max, {settings['steps']} steps ({settings['warmup']} untimed), "
          f"{settings['repeats']} alternating run(s) each, one process (machine load hits both alike); "
          f"load average {summary['load_average']['start']} -> {summary['load_average']['end']}; "
          f"{summary['torch_threads']} torch thread(s) (OMP_NUM_THREADS={summary['OMP_NUM_THREADS']}); "
          f"TRL {summary['trl_version']}, torch {summary['torch']}")
    header = ("| trainer | pairs/s, median [each run] | best pairs/s | pairs per CPU-second | tokens/s (median) | "
              "final loss | mean loss, last 10 steps |")
    header += " MFU | peak memory |" if gpu else ""
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for side, label in (("ours", "ours (cli fit)"), ("trl", f"TRL RewardTrainer ({summary['trl']['optimizer']})")):
        entry = summary[side]
        line = (f"| {label} | {entry['pairs_per_s']:.2f} {entry['runs_pairs_per_s']} | {entry['best_pairs_per_s']:.2f} | "
                f"{entry['pairs_per_cpu_s']:.2f} | {entry['tokens_per_s']:.0f} | {entry['final_loss']:.4f} | "
                f"{entry['mean_loss_last_10']:.4f} |")
        if gpu:
            line += f" {100 * entry['mfu']:.1f}% | {entry.get('peak_memory_gb', float('nan')):.1f} GB |"
        print(line)
    print(f"ratio ours/TRL: median pairs/s {summary['ratio_ours_over_trl']:.3f}, best pairs/s "
          f"{summary['ratio_best_ours_over_best_trl']:.3f}, pairs per CPU-second {summary['ratio_per_cpu_second']:.3f}; "
          f"largest per-step loss difference (last runs): {summary['loss_difference_per_step_max']:.2e}")


if __name__ == "__main__":
    main()
