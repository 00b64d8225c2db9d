"""Vectorised width sweep vs one separate Lightning fit per width, identical settings, in one process.

Both sides run through ``cli.main`` with the same config, seeds, data, batches and step budget; the only
difference is ``widths``: the whole grid in one run, or ``[P]`` in a run per width. Reports the wall time
of each, their ratio (goal: >= 10x) and the largest difference between the two sets of per-seed curves.

    python bench/width_sweep_speed.py                    # ~2-4 minutes on a 2-core CPU
    python bench/width_sweep_speed.py --solver min_norm  # the closed-form solver instead of SGD
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METRICS = ("train_loss", "test_loss", "test_error", "kappa", "readout_norm")


def fit(config: str, common: list[str], name: str, widths: list[int] | None, out: Path):
    import cli

    args = ["fit", "--config", config, *common, "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.logger.init_args.name", name]
    if widths is not None:
        args += ["--model.init_args.widths", json.dumps(widths)]
    return cli.main(args)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--solver", choices=["gradient", "min_norm"], default="gradient")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (gradient solver)")
    parser.add_argument("--num-widths", type=int, default=30)
    parser.add_argument("--n-train", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/bench/width_sweep_speed")
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # LightningCLI is driven by explicit args below; keep it from seeing ours

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    gradient = args.solver == "gradient"
    config = str(ROOT / ("configs/width_sweep/rf_sgd.yaml" if gradient else "configs/width_sweep/rf_closed_form.yaml"))
    common = ["--data.init_args.n_train", str(args.n_train), "--model.init_args.num_widths", str(args.num_widths),
              "--model.init_args.width_max_ratio", "3.0", "--model.init_args.num_seeds", str(args.seeds),
              "--model.init_args.eval_every_n_steps", "0", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "50"]
    if gradient:
        common += ["--trainer.max_steps", str(args.steps), "--model.init_args.optimizer",
                   json.dumps({"class_path": "torch.optim.SGD", "init_args": {"lr": 0.03, "momentum": 0.9}})]

    fit(config, [*common, "--trainer.max_steps", "2"] if gradient else common, "warmup", [5, 10], out)  # imports, caches

    start = time.perf_counter()
    sweep = fit(config, common, "vectorised", None, out)
    vectorised_s = time.perf_counter() - start
    widths = list(sweep.model.widths)
    grid = {k: np.asarray(v) for k, v in sweep.model.result["per_seed"].items()}

    start = time.perf_counter()
    separate = {k: np.zeros_like(v) for k, v in grid.items()}
    for index, width in enumerate(widths):
        alone = fit(config, common, f"separate/width_{width}", [width], out)
        for key, values in alone.model.result["per_seed"].items():
            separate[key][:, index] = np.asarray(values)[:, 0]
    separate_s = time.perf_counter() - start

    differences = {}
    for key in METRICS:
        a, b = grid[key], separate[key]
        finite = np.isfinite(a) & np.isfinite(b)
        differences[key] = {"max_abs": float(np.max(np.abs(a - b)[finite])),
                            "max_rel": float(np.max((np.abs(a - b) / np.maximum(np.abs(b), 1e-12))[finite]))}
    report = {"solver": args.solver, "steps": args.steps if gradient else 1, "widths": len(widths),
              "seeds": args.seeds, "n_train": args.n_train, "threads": args.threads,
              "vectorised_s": vectorised_s, "separate_s": separate_s, "speedup": separate_s / vectorised_s,
              "max_curve_difference": differences}
    print(f"\n{len(widths)} widths x {args.seeds} seeds, solver={args.solver}"
          + (f", {args.steps} steps" if gradient else "") + f", n={args.n_train}, threads={args.threads}")
    print(f"vectorised (one fit):  {vectorised_s:7.1f} s")
    print(f"separate ({len(widths)} fits):   {separate_s:7.1f} s")
    print(f"speed-up:              {report['speedup']:7.1f}x  (goal >= 10x)")
    for key, diff in differences.items():
        print(f"largest difference {key:13s} abs {diff['max_abs']:.3g}  rel {diff['max_rel']:.3g}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"report_{args.solver}.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
