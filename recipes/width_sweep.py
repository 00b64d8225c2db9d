"""Does the double-descent peak need an optimizer that reaches a low loss at the threshold?

Sweeps the factors of Liu & Flanigan (arXiv 2312.03951) on scikit-learn digits with label noise: solver
(min-norm closed form, truncated pseudo-inverse, ridge, gradient-based), optimizer (GD with and without
momentum, Adam, AdamW8bit), step budget, learning rate, batch size, feature normalization (and the
conditioning of the inputs), and the init scale of a two-layer network. Every setting is one
``cli.py fit`` run that trains its whole width grid (5 seeds) at once; the step-budget rows are read from
the evaluations a long run makes along the way.

For each setting the table gives, from the median curves over seeds: the peak-to-valley ratio of the
test error (largest test error within 1.5x of the threshold over the best test error at widths below
that window; > 1 means a peak), the test error at the peak, the same ratio for the test loss (MSE), the
train loss and kappa at the threshold width, and the best test error anywhere. For the two-layer rows
kappa is that of the output Jacobian (square at the parameter threshold). Writes ``table.md``, ``table.csv``, ``results.json`` and
``width_sweep_recipe.png`` (all curves, and peak height against train loss at the threshold) to --out.

    python recipes/width_sweep.py                      # about 6-10 minutes on a 2-core CPU
    python recipes/width_sweep.py --only min_norm,ridge_1e-3 --out runs/width_sweep_recipe_quick
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLOSED_FORM = str(ROOT / "configs/width_sweep/rf_closed_form.yaml")
RF_SGD = str(ROOT / "configs/width_sweep/rf_sgd.yaml")
TWO_LAYER = str(ROOT / "configs/width_sweep/two_layer_adam.yaml")


def optimizer(class_path: str, **init_args) -> list[str]:
    return ["--model.init_args.optimizer", json.dumps({"class_path": class_path, "init_args": init_args})]


SGD_MOMENTUM = optimizer("torch.optim.SGD", lr=0.03, momentum=0.9)
RAW_PIXELS = ["--data.init_args.standardize", "false"]  # pixels in [0, 1]: uncentred inputs, poorly conditioned features


def settings(steps: int) -> list[dict]:
    """name, factor, config, overrides; ``budgets`` lists extra step counts read from the run's history.

    Learning rates are the largest the widest width tolerates (2000 steps, 5 seeds, no divergence) for
    full-batch GD with momentum 0.9; plain GD and minibatches need smaller ones to stay stable."""
    gd = ["--trainer.max_steps", str(steps)]
    unit = max(1, steps // 20)
    two_layer = ["--data.init_args.n_train", "100", "--model.init_args.num_widths", "16",
                 "--model.init_args.width_max_ratio", "8", "--trainer.max_steps", str(steps),
                 "--model.init_args.eval_every_n_steps", "0", "--model.init_args.kappa", "jacobian"]
    return [
        dict(name="min_norm", factor="solver", config=CLOSED_FORM, overrides=[]),
        dict(name="min_norm_rcond_1e-3", factor="solver", config=CLOSED_FORM,
             overrides=["--model.init_args.rcond", "1e-3"]),
        dict(name="ridge_1e-3", factor="solver", config=CLOSED_FORM,
             overrides=["--model.init_args.solver", "ridge", "--model.init_args.ridge_alpha", "1e-3"]),
        dict(name="ridge_1e-2", factor="solver", config=CLOSED_FORM,
             overrides=["--model.init_args.solver", "ridge", "--model.init_args.ridge_alpha", "1e-2"]),
        dict(name="gd_momentum", factor="budget", config=RF_SGD, overrides=gd + SGD_MOMENTUM,
             budgets=[2 * unit, 5 * unit, 10 * unit]),
        dict(name="gd_no_momentum", factor="optimizer", config=RF_SGD,
             overrides=gd + optimizer("torch.optim.SGD", lr=0.015, momentum=0.0)),
        dict(name="adam", factor="optimizer", config=RF_SGD, overrides=gd + optimizer("torch.optim.Adam", lr=0.01)),
        dict(name="adamw8bit", factor="optimizer", config=RF_SGD,
             overrides=gd + optimizer("bitsandbytes.optim.AdamW8bit", lr=0.01, weight_decay=0.0)),
        dict(name="gd_momentum_lr_0.003", factor="learning rate", config=RF_SGD,
             overrides=gd + optimizer("torch.optim.SGD", lr=0.003, momentum=0.9)),
        dict(name="sgd_momentum_lr_0.003_batch_32", factor="batch size", config=RF_SGD,
             overrides=gd + optimizer("torch.optim.SGD", lr=0.003, momentum=0.9) + ["--data.init_args.batch_size", "32"]),
        dict(name="batchnorm_lr_0.003_batch_32", factor="normalization", config=RF_SGD,
             overrides=gd + optimizer("torch.optim.SGD", lr=0.003, momentum=0.9)
             + ["--data.init_args.batch_size", "32", "--model.init_args.normalization", "batchnorm"]),
        dict(name="raw_pixels_no_norm", factor="normalization", config=RF_SGD,
             overrides=gd + RAW_PIXELS + optimizer("torch.optim.SGD", lr=0.02, momentum=0.9)
             + ["--model.init_args.normalization", "none"]),
        dict(name="raw_pixels_standardized", factor="normalization", config=RF_SGD,
             overrides=gd + RAW_PIXELS + optimizer("torch.optim.SGD", lr=0.02, momentum=0.9)
             + ["--model.init_args.normalization", "standardize"]),
        dict(name="raw_pixels_min_norm", factor="normalization", config=CLOSED_FORM, overrides=RAW_PIXELS),
        dict(name="two_layer_init_1", factor="init scale", config=TWO_LAYER,
             overrides=two_layer + ["--model.init_args.init_scale", "1.0"]),
        dict(name="two_layer_init_0.25", factor="init scale", config=TWO_LAYER,
             overrides=two_layer + ["--model.init_args.init_scale", "0.25"]),
    ]


def row_from(name: str, factor: str, steps: int, result: dict, summary: dict, describe: dict, seconds: float) -> dict:
    widths = np.asarray(result["widths"], dtype=float)
    return {
        "setting": name, "factor": factor, "model": describe["model"], "solver": describe.get("solver"),
        "steps": steps, "n": describe["data"]["n_train"], "threshold": summary["threshold"],
        "peak_to_valley": summary["peak_to_valley"], "peak_test_error": summary["peak_test_error"],
        "loss_peak_to_valley": summary["loss_peak_to_valley"],
        "peak_width": summary["peak_width"], "train_loss_at_threshold": summary["train_loss_at_threshold"],
        "kappa_at_threshold": summary["kappa_at_threshold"], "min_test_error": summary["min_test_error"],
        "seconds": seconds, "curve_width_over_threshold": (widths / result["threshold"]).tolist(),
    }


def run_setting(setting: dict, out: Path, common: list[str]) -> tuple[list[dict], dict]:
    import cli
    from modules.width_sweep import threshold_summary

    args = ["fit", "--config", setting["config"], *common, *setting["overrides"],
            "--trainer.logger.init_args.save_dir", str(out / "runs"),
            "--trainer.logger.init_args.name", setting["name"],
            "--checkpoint.dirpath", str(out / "runs" / setting["name"] / "checkpoints")]
    budgets = setting.get("budgets", [])
    if budgets:
        args += ["--model.init_args.eval_every_n_steps", str(math.gcd(*budgets))]
    start = time.perf_counter()
    try:
        run = cli.main(args)
    except cli.NonFiniteLossError as error:  # a result too: this setting finds no low-loss solution
        print(f"{setting['name']} diverged: {error}", flush=True)
        return [{"setting": setting["name"], "factor": setting["factor"], "model": "diverged", "solver": "gradient",
                 "steps": None, "n": None, **{name: math.nan for name, _ in COLUMNS[5:]}}], {}
    seconds = time.perf_counter() - start
    model = run.model
    result, describe = model.result, model.describe()
    steps = result["steps"] if describe.get("solver") == "gradient" else None
    rows = [row_from(setting["name"], setting["factor"], steps, result, result["summary"], describe, seconds)]
    curves = {setting["name"]: {"x": rows[0]["curve_width_over_threshold"], "test_error": result["median"]["test_error"],
                                "train_loss": result["median"]["train_loss"]}}
    for entry in result["history"]:  # the same run evaluated after fewer steps
        if entry["step"] in budgets:
            summary = threshold_summary(np.asarray(result["widths"]), result["threshold"], np.asarray(entry["test_error"]),
                                        np.asarray(entry["train_loss"]), np.asarray(result["median"]["kappa"]),
                                        model.threshold_window, test_loss=np.asarray(entry["test_loss"]))
            name = f"{setting['name']}@{entry['step']}"
            rows.append(row_from(name, setting["factor"], entry["step"], result, summary, describe, math.nan))
            curves[name] = {"x": rows[0]["curve_width_over_threshold"], "test_error": entry["test_error"],
                            "train_loss": entry["train_loss"]}
    return rows, curves


COLUMNS = [("setting", "{}"), ("factor", "{}"), ("solver", "{}"), ("steps", "{}"), ("n", "{}"),
           ("peak_to_valley", "{:.2f}"), ("peak_test_error", "{:.3f}"), ("loss_peak_to_valley", "{:.2f}"),
           ("train_loss_at_threshold", "{:.2e}"),
           ("kappa_at_threshold", "{:.3g}"), ("min_test_error", "{:.3f}"), ("seconds", "{:.0f}")]


def format_table(rows: list[dict]) -> str:
    header = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for name, fmt in COLUMNS:
            value = row[name]
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            cells.append("-" if missing else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rank_correlation(rows: list[dict]) -> tuple[float, int]:
    """Spearman correlation across random-feature settings of train loss at the threshold vs peak-to-valley
    (the thesis predicts a strong negative one: lower loss at P = n, higher peak)."""
    from scipy.stats import spearmanr

    pairs = [(r["train_loss_at_threshold"], r["peak_to_valley"]) for r in rows
             if r["model"] == "RandomFeatureSweep" and math.isfinite(r["peak_to_valley"])]
    if len(pairs) < 3:
        return math.nan, len(pairs)
    loss, ratio = zip(*pairs)
    return float(spearmanr(np.log10(np.maximum(loss, 1e-30)), ratio).statistic), len(pairs)


def plot(rows: list[dict], curves: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.6), layout="constrained")
    ax_error, ax_loss, ax_scatter = fig.subplots(1, 3)
    colors = {}
    cmap = __import__("matplotlib").colormaps["tab20"]
    for index, (name, curve) in enumerate(curves.items()):
        colors[name] = cmap(index % 20)
        style = "--" if "two_layer" in name else "-"
        ax_error.plot(curve["x"], curve["test_error"], style, lw=1.1, color=colors[name], label=name)
        ax_loss.plot(curve["x"], np.maximum(curve["train_loss"], 1e-30), style, lw=1.1, color=colors[name])
    for ax in (ax_error, ax_loss):
        ax.axvline(1.0, color="k", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("width / interpolation threshold")
    ax_error.set_ylabel("test error (median of 5 seeds)")
    ax_loss.set_ylabel("train loss")
    ax_loss.set_yscale("log")
    ax_error.legend(fontsize=6, ncol=2)
    for row in rows:
        if math.isfinite(row["peak_to_valley"]):
            ax_scatter.scatter(row["train_loss_at_threshold"], row["peak_to_valley"], color=colors[row["setting"]],
                               marker="^" if row["model"] == "TwoLayerSweep" else "o")
            ax_scatter.annotate(row["setting"], (row["train_loss_at_threshold"], row["peak_to_valley"]), fontsize=5)
    ax_scatter.set_xscale("symlog", linthresh=1e-4)
    ax_scatter.set_xlabel("train loss at the threshold")
    ax_scatter.set_ylabel("peak-to-valley ratio of test error")
    ax_scatter.axhline(1.0, color="k", ls=":", lw=1)
    fig.suptitle("Width sweeps on digits (n=150, 20% label noise): the peak needs a low train loss at P = n")
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/width_sweep_recipe", help="output folder")
    parser.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    parser.add_argument("--steps", type=int, default=1500, help="step budget of the gradient-based runs")
    parser.add_argument("--n-train", type=int, default=150, help="digits training set size n")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    args = parser.parse_args(argv)
    sys.argv = sys.argv[:1]  # LightningCLI is driven by explicit args below; keep it from seeing ours

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--data.init_args.n_train", str(args.n_train), "--data.init_args.label_noise", "0.2",
              "--model.init_args.num_widths", "24", "--model.init_args.width_max_ratio", "3.0",
              "--model.init_args.num_seeds", "5", "--trainer.enable_progress_bar", "false",
              "--trainer.enable_model_summary", "false"]
    chosen = settings(args.steps)
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {s["name"] for s in chosen}
        if unknown:
            parser.error(f"--only: unknown settings {sorted(unknown)}; known: {[s['name'] for s in chosen]}")
        chosen = [s for s in chosen if s["name"] in names]
    rows, curves = [], {}
    started = time.perf_counter()
    for setting in chosen:
        new_rows, new_curves = run_setting(setting, out, common)
        rows += new_rows
        curves.update(new_curves)
        print(f"[{time.perf_counter() - started:6.0f}s] {setting['name']}: peak-to-valley "
              f"{new_rows[0]['peak_to_valley']:.2f}, train loss at threshold {new_rows[0]['train_loss_at_threshold']:.2e}",
              flush=True)
    table = format_table(rows)
    rho, count = rank_correlation(rows)
    footer = (f"\nSpearman correlation over {count} random-feature rows between log train loss at the threshold "
              f"and peak-to-valley: {rho:.2f}\nTotal wall time: {time.perf_counter() - started:.0f} s")
    print("\n" + table + footer)
    (out / "table.md").write_text(table + "\n" + footer + "\n")
    with open(out / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[name for name, _ in COLUMNS])
        writer.writeheader()
        writer.writerows({name: row[name] for name, _ in COLUMNS} for row in rows)
    (out / "results.json").write_text(json.dumps({"rows": rows, "curves": curves, "spearman": rho}, indent=1,
                                                 default=lambda v: None))
    plot(rows, curves, out / "width_sweep_recipe.png")
    print(f"wrote {out / 'table.md'}, {out / 'width_sweep_recipe.png'}")
    return rows


if __name__ == "__main__":
    main()
