"""TOFU end to end on the embedded data: target, retain model, their evaluations, and forget10 unlearned
with FLAT (each divergence) and the gradient-ascent and NPO baselines; one results table.

    python recipes/tofu_flat.py                     # everything, into runs/tofu
    python recipes/tofu_flat.py --reuse             # keep target/retain models and evaluations already there
    python recipes/tofu_flat.py --methods flat_kl,ga --unlearn-epochs 3
    python recipes/tofu_flat.py --reuse --unlearn-lr 1e-4,3e-4,1e-3   # every method at each learning rate,
                                                                      # compared at matched utility over all

Every stage is an ordinary cli.py run (in this process, to pay the imports once) with the shipped configs
and a few overrides, so each one can be rerun alone with the command the recipe prints:

    1. fit    configs/tofu/target.yaml   -> <out>/target/export   (save_pretrained folder)
    2. fit    configs/tofu/retain.yaml   -> <out>/retain/export
    3. test   configs/tofu/eval.yaml     -> <out>/retain/eval/test.json, <out>/target/eval/test.json
    4. fit    configs/flat/unlearn.yaml  -> <out>/unlearn/<method>/eval/epoch_XXX.json (one per epoch)

Writes <out>/results.md and <out>/results.json: Forget Quality (KS p-value of the forget-split truth
ratios against the retain model's), Model Utility, forget ROUGE-L recall and forget Prob for every model,
with wall times and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recipes.common import distinct_values  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name -> overrides of configs/flat/unlearn.yaml
METHODS: dict[str, list[str]] = {
    "flat_kl": ["--model.init_args.loss=flat", "--model.init_args.divergence=kl"],
    "flat_js": ["--model.init_args.loss=flat", "--model.init_args.divergence=js"],
    "flat_pearson": ["--model.init_args.loss=flat", "--model.init_args.divergence=pearson"],
    "flat_tv": ["--model.init_args.loss=flat", "--model.init_args.divergence=tv"],
    "ga": ["--model.init_args.loss=ga"],
    "gd": ["--model.init_args.loss=gd"],
    "ga_kl": ["--model.init_args.loss=ga_kl"],
    "npo": ["--model.init_args.loss=npo"],
    "idk": ["--model.init_args.loss=idk"],
    "dpo": ["--model.init_args.loss=dpo"],
}
DEFAULT_METHODS = "flat_kl,flat_js,flat_pearson,flat_tv,ga,npo"


def learning_rates(text: str) -> list[float]:
    rates = distinct_values(text, float, "--unlearn-lr")
    if min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"--unlearn-lr needs positive learning rates, got {text!r}")
    return rates


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/tofu", help="output folder (default runs/tofu)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from {list(METHODS)}")
    p.add_argument("--reuse", action="store_true", help="skip target/retain stages whose outputs exist")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables from an earlier run's files")
    p.add_argument("--jobs", type=int, default=2,
                   help="stages run at once as subprocesses (target | retain, then the unlearning runs); 1: all "
                        "in this process, one after the other")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: a tiny model gains little from more, and loses a lot when the "
                        "cores are shared)")
    p.add_argument("--n-authors", type=int, default=20)
    p.add_argument("--qa-per-author", type=int, default=16)
    p.add_argument("--paraphrase-style", default="answer_prefix", choices=["answer_prefix", "reworded"],
                   help="wording of the embedded paraphrased/perturbed answers (datamodules/tofu_data.py)")
    p.add_argument("--finetune-epochs", type=int, default=30)
    p.add_argument("--finetune-lr", type=float, default=3e-3)
    p.add_argument("--unlearn-epochs", type=int, default=5)
    p.add_argument("--unlearn-lr", type=learning_rates, default=[1e-4],
                   help="one learning rate, or several (comma-separated): every method is then unlearned at each, "
                        "into unlearn/<method>_lr<lr>, and a table compares the methods at matched utility over all "
                        "of their learning rates and epochs")
    p.add_argument("--unlearn-batch-size", type=int, default=8)
    p.add_argument("--npo-beta", type=float, default=0.1)
    p.add_argument("--extra", action="append", default=[],
                   help="more overrides for every unlearning run, e.g. --extra=--trainer.max_steps=3")
    return p.parse_args(argv)


def load_averages() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class Recipe:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.data = [f"--data.init_args.n_authors={args.n_authors}",
                     f"--data.init_args.qa_per_author={args.qa_per_author}",
                     f"--data.init_args.paraphrase_style={args.paraphrase_style}"]
        self.quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
        self.timings: dict[str, float] = {}
        self.methods = [m for m in args.methods.split(",") if m]

    def cli(self, stage: str, subcommand: str, config: str, *overrides: str) -> None:
        """Run one cli.py stage: in this process (``--jobs 1``) or as a subprocess with its own log."""
        args = [subcommand, "--config", str(ROOT / config), *self.quiet, *self.data, *overrides]
        print(f"=== {stage}: python cli.py {shlex.join(args)}", flush=True)
        started = time.perf_counter()
        if self.args.jobs == 1:
            import cli

            argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when sys.argv holds the recipe's flags
            try:
                cli.main(args)
            finally:
                sys.argv = argv
        else:
            log = self.out / "logs" / f"{stage}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(self.args.threads), "PYTHONUNBUFFERED": "1"}
            with open(log, "w") as handle:
                code = subprocess.call([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, env=env,
                                       stdout=handle, stderr=subprocess.STDOUT)
            if code:
                tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
                raise RuntimeError(f"stage {stage} failed (exit {code}); log {log}:\n{tail}")
        self.timings[stage] = round(time.perf_counter() - started, 1)
        print(f"=== {stage}: done in {self.timings[stage]} s", flush=True)

    def logger(self, name: str) -> list[str]:
        return [f"--trainer.logger.init_args.save_dir={self.out}", f"--trainer.logger.init_args.name={name}"]

    # -- stages ----------------------------------------------------------------------------------------
    def finetune(self, name: str) -> Path:
        from modules.lm import export_checkpoint

        export = self.out / name / "export"
        if self.args.reuse and (export / "config.json").exists():
            print(f"=== {name}: reusing {export}")
            return export
        checkpoints = self.out / name / "checkpoints"
        for stale in checkpoints.glob("last*.ckpt"):  # never export an older run's checkpoint
            stale.unlink()
        self.cli(name, "fit", f"configs/tofu/{name}.yaml", *self.logger(name),
                 f"--checkpoint.dirpath={checkpoints}", f"--trainer.max_epochs={self.args.finetune_epochs}",
                 f"--model.init_args.optimizer.init_args.lr={self.args.finetune_lr}")
        export_checkpoint(str(checkpoints / "last.ckpt"), str(export))
        return export

    def evaluate(self, name: str, retain_eval: Path | None) -> Path:
        result = self.out / name / "eval" / "test.json"
        if self.args.reuse and result.exists():
            from modules.tofu_eval import ROUGE_METHOD

            if json.loads(result.read_text()).get("rouge") == ROUGE_METHOD:
                print(f"=== eval {name}: reusing {result}")
                return result
            print(f"=== eval {name}: {result} has ROUGE-L of an older method: evaluating again")
        overrides = [*self.logger(f"{name}/eval_logs"), f"--model.init_args.model={self.out / name / 'export'}",
                     f"--trainer.callbacks.init_args.save_dir={result.parent}",
                     f"--trainer.callbacks.init_args.model_name={name}"]
        if retain_eval is not None:
            overrides.append(f"--trainer.callbacks.init_args.retain_eval={retain_eval}")
        self.cli(f"eval_{name}", "test", "configs/tofu/eval.yaml", *overrides)
        return result

    def runs(self) -> dict[str, tuple[str, float]]:
        """Run name -> (method, learning rate): the method's own name with one learning rate, else
        ``<method>_lr<lr>`` for each."""
        rates, methods = self.args.unlearn_lr, self.methods
        if len(rates) == 1:
            return {method: (method, rates[0]) for method in methods}
        return {f"{method}_lr{rate:g}": (method, rate) for method in methods for rate in rates}

    def unlearn(self, name: str, method: str, lr: float, target: Path, retain_eval: Path) -> Path:
        folder = self.out / "unlearn" / name
        a = self.args
        self.cli(name, "fit", "configs/flat/unlearn.yaml", *self.logger(f"unlearn/{name}"), *METHODS[method],
                 f"--model.init_args.model={target}", f"--model.init_args.beta={a.npo_beta}",
                 f"--model.init_args.optimizer.init_args.lr={lr}",
                 f"--trainer.max_epochs={a.unlearn_epochs}", f"--data.init_args.batch_size={a.unlearn_batch_size}",
                 f"--checkpoint.dirpath={folder / 'checkpoints'}",
                 f"--trainer.callbacks.init_args.save_dir={folder / 'eval'}",
                 f"--trainer.callbacks.init_args.retain_eval={retain_eval}",
                 f"--trainer.callbacks.init_args.model_name={name}", *a.extra)
        return self.last_epoch_file(name)

    # -- the whole thing -------------------------------------------------------------------------------
    def parallel(self, calls: list[tuple]) -> list:
        """``fn(*args)`` for each call, ``--jobs`` at a time (in order, in this thread, for ``--jobs 1``)."""
        if self.args.jobs == 1:
            return [fn(*args) for fn, *args in calls]
        with ThreadPoolExecutor(max_workers=self.args.jobs) as pool:
            futures = [pool.submit(fn, *args) for fn, *args in calls]
            return [future.result() for future in futures]

    def run(self) -> dict:
        import torch

        torch.set_num_threads(self.args.threads)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
        if self.args.report_only:  # rebuild the table from the files of an earlier run
            previous = json.loads((self.out / "results.json").read_text()) if (self.out / "results.json").exists() else {}
            self.timings = previous.get("stage_seconds", {})
            files = {"target": self.out / "target" / "eval" / "test.json",
                     "retain": self.out / "retain" / "eval" / "test.json"}
            files.update({name: self.last_epoch_file(name) for name in self.runs()})
            return self.report(files, previous.get("total_seconds"), previous.get("machine", {}))
        load_start = load_averages()
        started = time.perf_counter()
        target, _ = self.parallel([(self.finetune, "target"), (self.finetune, "retain")])
        retain_eval = self.evaluate("retain", None)
        runs = self.runs()
        evaluated = self.parallel([(self.evaluate, "target", retain_eval)] +
                                  [(self.unlearn, name, method, lr, target, retain_eval)
                                   for name, (method, lr) in runs.items()])
        files = {"target": evaluated[0], "retain": retain_eval, **dict(zip(runs, evaluated[1:]))}
        total = round(time.perf_counter() - started, 1)
        machine = {"cpus": os.cpu_count(), "torch_threads": self.args.threads, "jobs": self.args.jobs,
                   "load_average_start": load_start, "load_average_end": load_averages(), "nice": os.nice(0),
                   "platform": platform.platform()}
        return self.report(files, total, machine)

    def last_epoch_file(self, name: str) -> Path:
        folder = self.out / "unlearn" / name / "eval"
        return folder / f"{json.loads((folder / 'history.json').read_text())[-1]['tag']}.json"

    @staticmethod
    def row(name: str, report: dict, **extra) -> dict:
        return {"model": name, "forget_quality": report["forget_quality"], "model_utility": report["model_utility"],
                "forget_rougeL_recall": report["forget/rougeL_recall"], "forget_prob": report["forget/prob"],
                "forget_truth_ratio": report["forget/truth_ratio"],
                "retain_rougeL_recall": report["retain/rougeL_recall"], **extra}

    def report(self, files: dict[str, Path], total, machine: dict) -> dict:
        from modules.tofu_eval import forget_quality, load_eval, reference_truth_ratios

        reference = reference_truth_ratios(files["retain"])
        rows, matched, histories = [], [], {}
        for name, path in files.items():
            body = load_eval(path)
            report = body["report"]
            if name == "retain":  # the reference itself: KS of a sample against itself
                report = {**report, **forget_quality(reference, reference)}
            rows.append(self.row(name, report, epoch=body.get("epoch"), file=str(path),
                                 train_seconds=self.timings.get(name)))
        target_utility = rows[0]["model_utility"]
        runs = self.runs()  # the unlearning runs' names in files
        for name in list(files)[2:]:
            history = json.loads((Path(files[name]).parent / "history.json").read_text())
            histories[name] = [{"tag": h["tag"], **self.row(name, h["report"]), "lr": runs[name][1]} for h in history]
            matched.append(utility_matched(histories[name], target_utility) or {"model": name, "epoch": None})
        result = {"rows": rows, "utility_matched": matched, "histories": histories, "total_seconds": total,
                  "stage_seconds": self.timings, "machine": machine, "settings": vars(self.args)}
        if len(self.args.unlearn_lr) > 1:  # each method at its best learning rate and epoch
            result["utility_matched_over_lrs"] = [
                utility_matched([h for name, (m, _) in runs.items() if m == method for h in histories[name]],
                                target_utility)
                or {"model": method, "epoch": None}
                for method in self.methods]
        self.write(result)
        return result

    def write(self, result: dict) -> None:
        header = ["| model | Forget Quality | Model Utility | forget ROUGE-L | forget Prob | retain ROUGE-L | stage s |",
                  "|---|---|---|---|---|---|---|"]

        def fmt(row: dict, last: str) -> str:
            fq = row["forget_quality"]
            return (f"| {row['model']} | {'n/a' if fq is None else f'{fq:.3g}'} | {row['model_utility']:.4f} | "
                    f"{row['forget_rougeL_recall']:.3f} | {row['forget_prob']:.3f} | "
                    f"{row['retain_rougeL_recall']:.3f} | {last} |")

        no_epoch_kept = "| {} | no epoch kept 90% of the utility | | | | | |"
        lines = header + [fmt(row, "-" if row["train_seconds"] is None else str(row["train_seconds"]))
                          for row in result["rows"]]
        machine, s = result["machine"], result["settings"]
        lines += ["", f"Wall time {result['total_seconds']} s on {machine.get('cpus')} CPUs ({machine.get('jobs')} "
                      f"stages at once, {machine.get('torch_threads')} torch thread(s) each), nice {machine.get('nice')}; "
                      f"load average (1/5/15 min) at start {machine.get('load_average_start')}, at end "
                      f"{machine.get('load_average_end')}.",
                  f"Data: {s['n_authors']} authors x {s['qa_per_author']} QA ({s.get('paraphrase_style')} paraphrases), "
                  f"forget10; fine-tuning "
                  f"{s['finetune_epochs']} epochs at lr {s['finetune_lr']}; unlearning {s['unlearn_epochs']} epochs, "
                  f"lr {', '.join(f'{r:g}' for r in s['unlearn_lr'])}, batch {s['unlearn_batch_size']}, NPO beta {s['npo_beta']}. "
                  f"Unlearned models are reported after their last epoch."]
        if result["utility_matched"]:
            lines += ["", "Best epoch per method with Model Utility >= 90% of the target's (selected on the "
                          "evaluation itself):", "", header[0].replace("stage s", "epoch"), header[1]]
            for row in result["utility_matched"]:
                lines.append(fmt(row, row["epoch"]) if row["epoch"] else no_epoch_kept.format(row["model"]))
        if result.get("utility_matched_over_lrs"):
            lines += ["", f"Each method at its best learning rate ({', '.join(f'{r:g}' for r in s['unlearn_lr'])}) and "
                          "epoch, Model Utility >= 90% of the target's:", "",
                      header[0].replace("stage s", "lr, epoch"), header[1]]
            for row in result["utility_matched_over_lrs"]:
                lines.append(fmt({**row, "model": row["model"].rsplit("_lr", 1)[0]}, f"{row['lr']:g}, {row['epoch']}")
                             if row["epoch"] else no_epoch_kept.format(row["model"]))
        table = "\n".join(lines)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.md").write_text(table + "\n")
        (self.out / "results.json").write_text(json.dumps(result, indent=1))
        print("\n" + table)


def utility_matched(history: list[dict], target_utility: float) -> dict | None:
    """The same rule for every method: the evaluation of highest forget quality among those that keep at least
    90% of the target's utility (selected on the evaluation itself, so optimistic); among equal forget
    qualities (a KS p-value moves in coarse steps), the one that kept more utility. None when none keeps it."""
    kept = [h for h in history if h["model_utility"] >= 0.9 * target_utility]
    if not kept:
        return None
    best = max(kept, key=lambda h: (h["forget_quality"], h["model_utility"]))
    return {**best, "epoch": best["tag"]}


def main(argv=None) -> dict:
    return Recipe(parse_args(argv)).run()


if __name__ == "__main__":
    main()
