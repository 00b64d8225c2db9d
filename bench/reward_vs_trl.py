"""Reward-model training throughput: our ``fit`` (cli.py, RewardModel) against TRL's RewardTrainer, in one run.

Both sides start from the same saved weights (one sequence-classification model written once), train on the
same token ids (ours tokenizes; TRL gets our ids as ``chosen_ids``/``rejected_ids``) in the same batch order
(TRL's sampler is swapped for ours), with the same batch size, learning rate, AdamW betas and weight decay,
constant schedule, gradient clipping 1.0 and seed. Each side keeps its own defaults otherwise (TRL: fused
AdamW; ours: torch AdamW as configured in bt.yaml, fused, and torch's fused RMSNorm kernel). TRL's gradient
checkpointing (its default) is off unless ``--trl-gradient-checkpointing``, since ours does not checkpoint.

Each *arm* is a trainer with optional settings: ``ours``, ``trl``, ``ours+compile+bf16w`` (torch.compile of
the model, bf16 parameters without autocast), ``trl+compile+bf16w`` ... Each of our arms is compared with
the baseline arm ``trl`` (TRL at its default settings, gradient checkpointing aside) and, where one was run,
with the TRL arm of the same settings (like for like, with the two loss curves checked against each other). Runs alternate, forwards in
even repeats and backwards in odd ones (ours, TRL, TRL, ours, ...), so machine load and warm caches hit the
arms alike; the table gives each run, the median and the best run of each arm, throughput per
CPU-second of the process (a shared CPU's load changes wall time far more than CPU time), and the median
step time over every timed step of an arm's runs (a burst of load slows some steps, not the median one). A failing arm is
recorded with its error and the others go on; with ``--json`` the summary is rewritten after every run, so
a run cut short keeps what it measured.

    python bench/reward_vs_trl.py                       # CPU: the tiny preset, arithmetic pairs, ~3-5 minutes
    python bench/reward_vs_trl.py --gpu-qwen2-0.5b      # GPU: trl, ours, ours+compile+bf16w, twice each

GPU mode: Qwen2-0.5B shape (hidden 896, 24 layers, 14/2 heads, MLP 4864, vocab 151,936, tied embeddings),
random weights built from a config (no network), random tokens (random letters through the embedded byte
tokenizer, one token each: the ids span only the byte range, which costs the same), 1024 tokens per side,
8 pairs per step, AdamW lr 1e-5, bf16 autocast unless the arm has ``bf16w``; steps 11-30 timed. Prints
tokens/s, pairs/s, MFU = tokens/s x (6 N_non-embedding + 12 layers hidden seq) / the GPU's dense bf16 peak,
the peak memory above what was allocated before the arm, and the ratios against the targets of issue 3
(ours >= 1.1x TRL by default, >= 1.6x with compile + bf16 weights). Both sides read the loss back every step
(ours for the loss curve, TRL through ``logging_steps=1``), one device sync per step each.
TRL is the optional ``bench`` extra: ``pip install -e .[bench]``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import statistics
import string
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

DEFAULT_PEAK_FLOPS = 989e12  # dense bf16 of an H100/H200 SXM, where the GPU's name is not in our table
QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151_936, tie_word_embeddings=True, max_position_embeddings=32768,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6)
BASELINE = "trl"
# issue 3's GPU targets: ours against TRL at its default settings (gradient checkpointing off, as in ours)
GPU_TARGETS = {"ours": 1.1, "ours+compile+bf16w": 1.6}
# largest per-step loss difference two arms of the same settings may show: float32 on the CPU agrees to
# rounding; under bf16 the two models' kernels round differently from the first step on
LOSS_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}
SETTINGS = ("compile", "bf16w")


@dataclass(frozen=True)
class Arm:
    """One trainer with its settings, named ``trainer[+compile][+bf16w]``."""

    trainer: str
    compile: bool = False
    bf16_weights: bool = False

    @property
    def setting(self) -> str:
        parts = [name for name, on in zip(SETTINGS, (self.compile, self.bf16_weights)) if on]
        return "+".join(parts)

    @property
    def name(self) -> str:
        return self.trainer + (f"+{self.setting}" if self.setting else "")


def parse_arms(text: str, gpu: bool) -> list[Arm]:
    """``ours,trl,ours+compile+bf16w`` -> arms; raises ValueError naming what is wrong."""
    arms = []
    for token in (part.strip() for part in text.split(",")):
        trainer, *settings = token.split("+")
        unknown = sorted(set(settings) - set(SETTINGS))
        if trainer not in ("ours", "trl") or unknown or len(set(settings)) != len(settings):
            raise ValueError(f"arm {token!r}: expected ours or trl, optionally followed by +compile and/or +bf16w")
        if "bf16w" in settings and not gpu:
            raise ValueError(f"arm {token!r}: bf16 weights (+bf16w) are a GPU-mode option (--gpu-qwen2-0.5b)")
        arm = Arm(trainer, "compile" in settings, "bf16w" in settings)
        if arm in arms:
            raise ValueError(f"arm {arm.name!r} is named twice")
        arms.append(arm)
    return arms


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock:
    """Wall time at the end of every optimizer step (the clock synchronises a GPU only at the two timing
    marks; reading the loss back syncs every step, on both sides alike), each timed step's duration, and the
    loss of every step."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.start = self.end = None
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        self.tokens = 0

    def step_done(self, step: int, loss: float | None, step_tokens: list[int]) -> None:
        if loss is not None:
            self.losses.append(loss)
        if step == self.warmup:
            sync()
            self.start, self.cpu_start = time.perf_counter(), time.process_time()
            self.last = self.start
        elif step > self.warmup:
            self.tokens += step_tokens[step - 1]
            if step == self.steps:
                sync()
                self.end, self.cpu_end = time.perf_counter(), time.process_time()
            now = time.perf_counter()
            self.step_seconds.append(now - self.last)
            self.last = now

    def result(self, pairs_per_step: int) -> dict[str, Any]:
        seconds = self.end - self.start
        timed = self.steps - self.warmup
        cpu_seconds = self.cpu_end - self.cpu_start  # CPU time of this process, all threads: less load-sensitive
        return {"seconds": seconds, "cpu_seconds": cpu_seconds, "timed_steps": timed,
                "pairs_per_s": timed * pairs_per_step / seconds, "pairs_per_cpu_s": timed * pairs_per_step / cpu_seconds,
                "tokens_per_s": self.tokens / seconds, "final_loss": self.losses[-1],
                "mean_loss_last_10": statistics.fmean(self.losses[-10:]), "losses": self.losses,
                "step_seconds": self.step_seconds}


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


def run_ours(model_dir: Path, data_file: Path, step_tokens: list[int], out: Path, args, arm: Arm,
             name: str) -> dict[str, Any]:
    import lightning.pytorch as pl

    clock = StepClock(args.warmup, args.steps)
    setup: dict[str, Any] = {}

    class Clock(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            optimizer = trainer.optimizers[0]
            setup.update(optimizer=type(optimizer).__name__, fused=optimizer.defaults.get("fused"),
                         foreach=optimizer.defaults.get("foreach"), precision=str(trainer.precision),
                         fused_norm_layers=sum(isinstance(module.__dict__.get("forward"), functools.partial)
                                               for module in pl_module.modules()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"].item() if outputs else None
            clock.step_done(trainer.global_step, loss, step_tokens)

    extra = ["--model.init_args.lr_scheduler=null", f"--model.init_args.optimizer.init_args.lr={args.lr}"]
    if args.gpu_qwen2_05b:
        extra += [f"--trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}", "--trainer.devices=1"]
        extra += (["--trainer.precision=bf16-true", "--model.init_args.dtype=bfloat16"] if arm.bf16_weights
                  else ["--trainer.precision=bf16-mixed"])
    if arm.compile:
        extra.append("--model.init_args.compile=true")
    fit_reward_model(model_dir, data_file, args.batch_size, args.max_length, args.steps, args.seed, out, name, Clock(),
                     extra)
    return clock.result(args.batch_size) | setup


def run_trl(model_dir: Path, pairs: list[dict[str, list[int]]], step_tokens: list[int], out: Path, args, arm: Arm,
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
    dtype = torch.bfloat16 if arm.bf16_weights else torch.float32
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = RewardConfig(
        output_dir=str(out / name), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, adam_beta1=0.9,
        adam_beta2=0.98, max_grad_norm=1.0, seed=args.seed, data_seed=args.seed, logging_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True, max_length=args.max_length,
        gradient_checkpointing=args.trl_gradient_checkpointing, bf16=gpu and not arm.bf16_weights,
        use_cpu=args.device == "cpu", torch_compile=arm.compile, dataloader_num_workers=0, remove_unused_columns=True,
    )
    trainer = SameOrder(model=model, args=config, train_dataset=datasets.Dataset.from_list(pairs),
                        processing_class=tokenizer, callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # no per-step printing: ours prints nothing either
    trainer.train()
    result = clock.result(args.batch_size)
    result["optimizer"] = getattr(config.optim, "value", config.optim)
    result["precision"] = "bf16 weights" if arm.bf16_weights else ("bf16 autocast" if config.bf16 else "fp32")
    del trainer, model
    return result


def release_memory(on_cuda: bool) -> float:
    """Free what the last arm left (reference cycles, compiled graphs, cached blocks); the bytes still allocated."""
    gc.collect()
    torch._dynamo.reset()
    if not on_cuda:
        return 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


# ----------------------------------------------------------------------------------------------------


def non_embedding_parameters(model_dir: Path) -> tuple[int, int, int]:
    counts = json.loads((model_dir / "bench_counts.json").read_text())
    return counts["non_embedding_parameters"], counts["layers"], counts["hidden"]


def check_trl_importable() -> str:
    """TRL's trainer and its data library, imported now: ``import trl`` alone is lazy, and a missing piece would
    otherwise show only after our first arm had run. Returns TRL's version."""
    try:
        import datasets  # noqa: F401
        import trl
        from trl import RewardConfig, RewardTrainer  # noqa: F401
    except Exception as error:  # an ImportError, or a version clash raised while importing
        sys.exit(f"TRL's RewardTrainer cannot be imported ({type(error).__name__}: {error}); "
                 "install the bench extra: pip install -e .[bench]")
    return trl.__version__


def run_order(arms: list[Arm], repeats: int) -> list[tuple[int, Arm]]:
    """Forwards in even repeats, backwards in odd ones: A B C, C B A, A B C ..."""
    return [(repeat, arm) for repeat in range(repeats) for arm in (arms if repeat % 2 == 0 else arms[::-1])]


def summarise(runs: dict[str, list[dict[str, Any]]], arms: list[Arm], args, context: dict[str, Any]) -> dict[str, Any]:
    """Per-arm medians and bests, ratios against the baseline and like for like, loss agreement; from the runs so
    far (an arm with no finished run reports its errors only)."""
    gpu = args.gpu_qwen2_05b
    summary: dict[str, Any] = dict(context)
    summary["arms"] = {}
    for arm in arms:
        finished = [r for r in runs[arm.name] if "error" not in r]
        entry: dict[str, Any] = {"errors": [r["error"] for r in runs[arm.name] if "error" in r]}
        if finished:
            entry |= {
                "pairs_per_s": statistics.median(r["pairs_per_s"] for r in finished),
                "best_pairs_per_s": max(r["pairs_per_s"] for r in finished),
                "pairs_per_cpu_s": statistics.median(r["pairs_per_cpu_s"] for r in finished),
                # a burst of load from another process slows a few steps: the median step leaves them out
                "median_step_seconds": statistics.median(t for r in finished for t in r["step_seconds"]),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in finished),
                "final_loss": finished[-1]["final_loss"], "mean_loss_last_10": finished[-1]["mean_loss_last_10"],
                "runs_pairs_per_s": [round(r["pairs_per_s"], 3) for r in finished],
                "setup": {key: finished[-1].get(key) for key in
                          ("optimizer", "fused", "foreach", "precision", "fused_norm_layers") if key in finished[-1]},
            }
            entry["mfu"] = entry["tokens_per_s"] * context["flops_per_token"] / context["peak_flops"] if gpu else None
            if args.device == "cuda":
                entry["peak_memory_gib"] = max(r["peak_memory_gib"] for r in finished)
        summary["arms"][arm.name] = entry
    measured = {name: entry for name, entry in summary["arms"].items() if "pairs_per_s" in entry}
    comparisons = []
    for arm in arms:
        if arm.name not in measured:
            continue
        against = [BASELINE] if arm.trainer == "ours" else []
        twin = Arm("trl", arm.compile, arm.bf16_weights).name
        if arm.trainer == "ours" and twin != BASELINE:
            against.append(twin)
        for other in against:
            if other not in measured:
                continue
            ours, theirs = measured[arm.name], measured[other]
            row = {"arm": arm.name, "against": other,
                   "ratio_median": ours["pairs_per_s"] / theirs["pairs_per_s"],
                   "ratio_best": ours["best_pairs_per_s"] / theirs["best_pairs_per_s"],
                   "ratio_per_cpu_second": ours["pairs_per_cpu_s"] / theirs["pairs_per_cpu_s"],
                   "ratio_median_step": theirs["median_step_seconds"] / ours["median_step_seconds"]}
            if args.device == "cuda" and gpu and other == BASELINE and arm.name in GPU_TARGETS:
                row["target"] = GPU_TARGETS[arm.name]
                row["target_met"] = row["ratio_median"] >= row["target"]
            if other == twin:  # the same settings on both sides: the same loss curve, step for step
                a, b = (next(r for r in reversed(runs[name]) if "error" not in r)["losses"] for name in (arm.name, other))
                tolerance = LOSS_TOLERANCE["bf16" if gpu else "fp32"]
                difference = max((abs(x - y) for x, y in zip(a, b)), default=math.nan)  # nan: no loss recorded
                row["loss_difference_per_step_max"] = difference
                row["loss_tolerance"] = tolerance
                row["losses_agree"] = difference <= tolerance
            comparisons.append(row)
    summary["comparisons"] = comparisons
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-qwen2-0.5b", dest="gpu_qwen2_05b", action="store_true",
                        help="the Qwen2-0.5B shape (hidden 896, 24 layers) on a GPU")
    parser.add_argument("--arms", default=None,
                        help="comma-separated trainer[+compile][+bf16w] (CPU: ours,trl; GPU: trl,ours,ours+compile+bf16w)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's default; ours has none")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (CPU 40, GPU 30)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (CPU 5, GPU 10)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (CPU 32, GPU 8)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per side (CPU 128, GPU 1024)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating runs of each arm (CPU 3, GPU 2)")
    parser.add_argument("--lr", type=float, default=None, help="CPU 3e-4 (bt.yaml), GPU 1e-5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="GPU mode on the CPU, to smoke-test it (with --qwen-layers 1)")
    parser.add_argument("--qwen-layers", type=int, default=None, help="fewer layers of the Qwen2 shape (smoke test)")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the results here, after every run")
    args = parser.parse_args(argv)
    gpu = args.gpu_qwen2_05b
    for key, cpu_value, gpu_value in (("steps", 40, 30), ("warmup", 5, 10), ("batch_size", 32, 8),
                                      ("max_length", 128, 1024), ("repeats", 3, 2), ("lr", 3e-4, 1e-5),
                                      ("arms", "ours,trl", "trl,ours,ours+compile+bf16w")):
        if getattr(args, key) is None:
            setattr(args, key, gpu_value if gpu else cpu_value)
    try:
        arms = parse_arms(args.arms, gpu)
    except ValueError as error:
        parser.error(str(error))
    args.device = args.device or ("cuda" if gpu else "cpu")
    if gpu and args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--gpu-qwen2-0.5b needs a CUDA device")
    trl_version = check_trl_importable() if any(arm.trainer == "trl" for arm in arms) else None

    import lightning
    import transformers

    from callbacks.throughput import peak_flops_by_name

    out = Path(args.out or tempfile.mkdtemp(prefix="reward_vs_trl_"))
    out.mkdir(parents=True, exist_ok=True)
    model_dir = save_start_model(out, gpu, args.seed, args.device, args.qwen_layers)
    pairs_needed = args.steps * args.batch_size
    data_file = write_pairs(out, gpu, pairs_needed, args.max_length, args.seed)
    pairs = tokenized_pairs(model_dir, data_file, args.max_length)
    step_tokens = padded_tokens_per_step(pairs, args.batch_size, args.steps, args.seed)
    on_cuda = args.device == "cuda"
    device = torch.cuda.get_device_name() if on_cuda else f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"
    n_params, layers, hidden = non_embedding_parameters(model_dir)
    context: dict[str, Any] = {
        "mode": "gpu-qwen2-0.5b" if gpu else "cpu-tiny",
        "settings": {key: value for key, value in vars(args).items() if key not in ("out", "json")},
        "non_embedding_parameters": n_params, "flops_per_token": 6 * n_params + 12 * layers * hidden * args.max_length,
        "peak_flops": (peak_flops_by_name(device) if on_cuda else None) or DEFAULT_PEAK_FLOPS,
        "versions": {"trl": trl_version, "torch": torch.__version__, "transformers": transformers.__version__,
                     "lightning": lightning.__version__},
        "device": device, "load_average": {"start": round(os.getloadavg()[0], 2)},
        # on a shared CPU the thread count changes the result more than either trainer does: record it
        "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    runs: dict[str, list[dict[str, Any]]] = {arm.name: [] for arm in arms}
    summary = summarise(runs, arms, args, context)
    for repeat, arm in run_order(arms, args.repeats):
        name = f"{arm.name.replace('+', '_')}_{repeat}"
        allocated_before = release_memory(on_cuda)
        try:
            result = (run_ours(model_dir, data_file, step_tokens, out, args, arm, name) if arm.trainer == "ours"
                      else run_trl(model_dir, pairs, step_tokens, out, args, arm, name))
        except Exception as error:  # one arm's failure (out of memory, a compile error) must not cost the others
            traceback.print_exc()
            runs[arm.name].append({"error": f"{type(error).__name__}: {error}"[:2000], "repeat": repeat})
            print(f"[{name}] FAILED: {type(error).__name__}: {str(error)[:300]}", flush=True)
        else:
            if on_cuda:
                result["peak_memory_gib"] = (torch.cuda.max_memory_allocated() - allocated_before) / 2**30
            runs[arm.name].append(result)
            print(f"[{name}] {result['pairs_per_s']:.2f} pairs/s, {result['tokens_per_s']:.0f} tokens/s, "
                  f"final loss {result['final_loss']:.4f}", flush=True)
        context["load_average"]["end"] = round(os.getloadavg()[0], 2)
        summary = summarise(runs, arms, args, context)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2))
    print_table(summary, arms, gpu)
    return summary


def print_table(summary: dict[str, Any], arms: list[Arm], gpu: bool) -> None:
    settings = summary["settings"]
    versions = summary["versions"]
    print(f"\nReward-model training, {summary['mode']} on {summary['device']}; batch {settings['batch_size']} pairs, "
          f"{settings['max_length']} tokens/side max, {settings['steps']} steps ({settings['warmup']} untimed), "
          f"{settings['repeats']} alternating run(s) per arm, one process (machine load hits every arm alike); "
          f"load average {summary['load_average']['start']} -> {summary['load_average'].get('end')}; "
          f"{summary['torch_threads']} torch thread(s) (OMP_NUM_THREADS={summary['OMP_NUM_THREADS']}); "
          f"TRL {versions['trl']}, torch {versions['torch']}, transformers {versions['transformers']}, "
          f"lightning {versions['lightning']}")
    header = ("| arm | setup | pairs/s, median [each run] | best pairs/s | pairs per CPU-second | median step | "
              "tokens/s (median) | final loss | mean loss, last 10 steps |")
    header += " MFU | peak memory |" if gpu else ""
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for arm in arms:
        entry = summary["arms"][arm.name]
        if "pairs_per_s" not in entry:
            print(f"| {arm.name} | FAILED: {'; '.join(entry['errors'])[:200]} |")
            continue
        setup = ", ".join(f"{key} {value}" for key, value in entry["setup"].items() if value is not None)
        line = (f"| {arm.name} | {setup} | {entry['pairs_per_s']:.2f} {entry['runs_pairs_per_s']} | "
                f"{entry['best_pairs_per_s']:.2f} | {entry['pairs_per_cpu_s']:.2f} | "
                f"{1000 * entry['median_step_seconds']:.1f} ms | {entry['tokens_per_s']:.0f} | "
                f"{entry['final_loss']:.4f} | {entry['mean_loss_last_10']:.4f} |")
        if gpu:
            line += f" {100 * entry['mfu']:.1f}% | {entry.get('peak_memory_gib', float('nan')):.1f} GiB |"
        print(line)
    for row in summary["comparisons"]:
        line = (f"{row['arm']} / {row['against']}: median pairs/s {row['ratio_median']:.3f}, best "
                f"{row['ratio_best']:.3f}, per CPU-second {row['ratio_per_cpu_second']:.3f}, by the median step "
                f"{row['ratio_median_step']:.3f}")
        if "target" in row:
            line += f"; target >= {row['target']}: {'MET' if row['target_met'] else 'NOT MET'}"
        if "losses_agree" in row:
            line += (f"; largest per-step loss difference {row['loss_difference_per_step_max']:.2e} "
                     f"({'AGREE' if row['losses_agree'] else 'DISAGREE'}, tolerance {row['loss_tolerance']:.0e})")
        print(line)


if __name__ == "__main__":
    main()
