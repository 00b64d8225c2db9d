"""Less padding two ways, against uniformly random batches, in one run.

Our reward-model ``fit`` (cli.py, bt.yaml, the tiny preset as a sequence classifier) trains the same number of
steps on the same pairs three times:
- ``uniform``: the usual random batches, one padded forward pass per batch;
- ``grouped``: batches of pairs of similar length (``--data.init_args.group_by_length=true``,
  ``datamodules.common.LengthGroupedSampler``): other batches, so other losses;
- ``chunked``: the uniform batches, each run through the model in ``--length-chunks`` passes over rows of
  similar length (``--model.init_args.length_chunks``): the same batches, so the same losses up to
  rounding, which the bench checks step by step.
Runs alternate (uniform, grouped, chunked, uniform, ...) so the shared machine's load hits all alike. Two
data sets:

- ``embedded``: the arithmetic preference pairs of bt.yaml (128 tokens at most, lengths fairly even);
- ``long_tail``: generated pairs whose prompt and response lengths follow log-normal distributions (median
  prompt 60 and response 120 tokens, cut at 512 tokens), the shape of real chat preference data, where most
  pairs are short and a few are long.

Prints, per data set: the share of padded positions the model computes, pairs/s (median over runs), each
way's speed over uniform's, and the largest per-step loss difference between chunked and uniform.

    python bench/length_grouping.py               # ~5 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no out up what about into than "
         "them can only other new some could time these two may then do first any my now such like our over").split()


def long_tail_rows(count: int, seed: int) -> list[dict[str, str]]:
    """Pairs of random words, one token per character with the byte tokenizer; lengths log-normal."""
    rng = random.Random(seed)

    def text(median_chars: float) -> str:
        target = max(8, int(rng.lognormvariate(0.0, 0.9) * median_chars))
        words: list[str] = []
        while sum(len(word) + 1 for word in words) < target:
            words.append(rng.choice(WORDS))
        return " ".join(words)

    return [{"prompt": text(60), "chosen": text(120), "rejected": text(120)} for _ in range(count)]


KINDS = ("uniform", "grouped", "chunked")


def fit(model_dir: Path, data_file: Path, kind: str, out: Path, name: str, args, max_length: int,
        batch_size: int) -> dict[str, Any]:
    import lightning.pytorch as pl
    from reward_vs_trl import fit_reward_model

    chunks = args.length_chunks if kind == "chunked" else 1

    record: dict[str, Any] = {"positions": 0, "real": 0, "losses": []}

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            record["losses"].append(outputs["loss"].item())
            if step == args.warmup:
                record["start"], record["cpu_start"] = time.perf_counter(), time.process_time()
            elif step > args.warmup:
                # the model's passes over the batch (several with chunks), each as wide as its longest row
                record["positions"] += sum(rows * width for rows, width, _ in pl_module.training_forward_shapes(batch))
                record["real"] += int(batch["attention_mask"].sum())
                if step == args.steps:
                    record["end"], record["cpu_end"] = time.perf_counter(), time.process_time()

    fit_reward_model(model_dir, data_file, batch_size, max_length, args.steps, args.seed, out, name, Clock(),
                     [f"--data.init_args.group_by_length={str(kind == 'grouped').lower()}",
                      f"--model.init_args.length_chunks={chunks}"])
    timed = args.steps - args.warmup
    seconds, cpu_seconds = record["end"] - record["start"], record["cpu_end"] - record["cpu_start"]
    return {"pairs_per_s": timed * batch_size / seconds, "pairs_per_cpu_s": timed * batch_size / cpu_seconds,
            "padded_share": 1 - record["real"] / record["positions"], "positions": record["positions"],
            "mean_loss_last_10": statistics.fmean(record["losses"][-10:]), "losses": record["losses"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="embedded,long_tail", help="comma-separated: embedded, long_tail")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the uniform, grouped and chunked runs")
    parser.add_argument("--length-chunks", type=int, default=4, help="passes per batch of the chunked runs")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for logs and results.json (default: a temporary one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from reward_vs_trl import save_start_model, write_pairs

    from datamodules.common import write_rows

    out = Path(args.out or tempfile.mkdtemp(prefix="length_grouping_"))
    out.mkdir(parents=True, exist_ok=True)
    model_dir = save_start_model(out, gpu=False, seed=args.seed)
    settings = {"embedded": (write_pairs(out, gpu=False, pairs=args.pairs, seq_len=0, seed=args.seed), 128, 32),
                "long_tail": (write_rows(out / "long_tail.jsonl", long_tail_rows(args.pairs, args.seed)), 512, 8)}
    summary: dict[str, Any] = {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                               "torch_threads": torch.get_num_threads(), "data": {}}
    for data_name in args.data.split(","):
        data_file, max_length, batch_size = settings[data_name]
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
        for round_index in range(args.rounds):
            for kind in KINDS:
                runs[kind].append(fit(model_dir, data_file, kind, out, f"{data_name}_{kind}_{round_index}",
                                      args, max_length, batch_size))
        medians = {kind: statistics.median(run["pairs_per_s"] for run in runs[kind]) for kind in runs}
        summary["data"][data_name] = {
            "max_length": max_length, "batch_size": batch_size, "runs": runs, "median_pairs_per_s": medians,
            "ratio": medians["grouped"] / medians["uniform"], "chunked_ratio": medians["chunked"] / medians["uniform"],
            # the same batches: the same loss every step, up to the rounding of narrower passes
            "chunked_loss_difference_max": max(abs(a - b) for a, b in zip(runs["chunked"][0]["losses"],
                                                                           runs["uniform"][0]["losses"])),
        }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{args.steps - args.warmup} timed steps per run, {args.rounds} alternating rounds, "
          f"{summary['torch_threads']} torch thread(s); results in {out / 'results.json'}")
    print(f"| data | batch × max length | padded positions: uniform, grouped, chunked ({args.length_chunks} passes) | "
          "pairs/s uniform [runs] | pairs/s grouped [runs] | pairs/s chunked [runs] | grouped / uniform | "
          "chunked / uniform | chunked − uniform loss, largest per step |")
    print("|---" * 9 + "|")
    for data_name, result in summary["data"].items():
        runs = result["runs"]
        listing = {kind: ", ".join(f"{run['pairs_per_s']:.1f}" for run in runs[kind]) for kind in runs}
        print(f"| {data_name} | {result['batch_size']} × {result['max_length']} | "
              + ", ".join(f"{runs[kind][0]['padded_share']:.1%}" for kind in KINDS) + " | "
              + " | ".join(f"{result['median_pairs_per_s'][kind]:.1f} [{listing[kind]}]" for kind in KINDS)
              + f" | {result['ratio']:.2f}x | {result['chunked_ratio']:.2f}x | {result['chunked_loss_difference_max']:.1e} |")
    return summary


if __name__ == "__main__":
    main()
