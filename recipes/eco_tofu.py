"""ECO end to end on the embedded TOFU-shaped data: the forget-prompt classifier, the learned corruption
strength, and the wrapped target model evaluated next to the FLAT recipe's models.

    python recipes/eco_tofu.py                      # reuses runs/tofu (builds it with the FLAT recipe's stages if absent)
    python recipes/eco_tofu.py --metric answer_prob --learn-steps 15
    python recipes/eco_tofu.py --compare-metrics ""   # only the --metric objective
    python recipes/eco_tofu.py --reuse --relearn      # keep the classifier, learn the strengths again
    python recipes/eco_tofu.py --init-scan ""         # the learner starts at --strength, no initial scan

Stages (each an ordinary cli.py run, printed with its command line; the two run side by side):

    1. (if absent) the FLAT recipe's target and retain models and their TOFU evaluations, in --tofu
    2. fit  configs/eco/classifier.yaml  -> <out>/classifier/export (classifier + chosen threshold)
    3. fit  configs/eco/learn.yaml       -> <out>/learn/settings    (learned strength, --metric objective)
       and the same for each --compare-metrics objective -> <out>/learn_<metric>/settings
    4. in this process: the ECO wrapper (target model + classifier + strength, saved to <out>/wrapper),
       the TOFU evaluation, multiple-choice accuracy on the forget authors and on general facts, and the
       classifier's FPR/FNR; the same multiple-choice numbers for the target and the retain model; a row
       per comparison objective (the same classifier, that objective's strength).

Writes <out>/results.md and <out>/results.json.

    python recipes/eco_tofu.py --scan-only          # the learner's objectives over a grid of strengths

``--scan-only`` needs the target and retain models and writes <out>/scan.md and <out>/scan.json: for each
strength in ``--scan-strengths`` the corrupted target's mean forget truth-ratio score (and its distance to
the retain model's), the KS statistic against the retain model's forget truth ratios, and the forget
quality that implies (the learner's view of the landscape; every forget prompt corrupted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tofu_flat  # noqa: E402  (the FLAT recipe: its stages build the target and retain models)

METRICS = ("truth_ratio_ks", "truth_ratio", "answer_prob", "mc_accuracy")  # modules.eco.METRICS, without importing torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/eco")
    p.add_argument("--tofu", default="runs/tofu", help="the FLAT recipe's folder (target, retain, evaluations)")
    p.add_argument("--jobs", type=int, default=2, help="stages at once (classifier | learner); 1: in this process")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-authors", type=int, default=20)
    p.add_argument("--qa-per-author", type=int, default=16)
    p.add_argument("--paraphrase-style", default="answer_prefix", choices=["answer_prefix", "reworded"])
    p.add_argument("--classifier-model", default=None,
                   help="classifier backbone (default: the TOFU target model, which has read the author names)")
    p.add_argument("--classifier-epochs", type=int, default=4)
    p.add_argument("--target-fpr", type=float, default=None, help="calibrate the threshold to this FPR")
    p.add_argument("--metric", default="truth_ratio_ks", choices=METRICS,
                   help="the learner's objective for the ECO row (truth_ratio_ks: KS distance to the retain "
                        "model's forget truth ratios, the distribution forget quality tests)")
    p.add_argument("--compare-metrics", default="truth_ratio",
                   help="comma-separated objectives also learned and evaluated, one row each ('' for none)")
    p.add_argument("--corruption", default="rand_noise_first_n")
    p.add_argument("--dims", type=int, default=1)
    p.add_argument("--strength", type=float, default=1.0, help="initial strength s0")
    p.add_argument("--lr", type=float, default=1000.0)
    p.add_argument("--learn-steps", type=int, default=10, help="learner steps (trainer.max_steps)")
    p.add_argument("--init-scan", default=None,
                   help="comma-separated strengths the learner scans before its steps, starting from the best "
                        "(default: the config's init_scan; '' for no scan)")
    p.add_argument("--reuse", action="store_true", help="skip ECO stages whose outputs exist")
    p.add_argument("--relearn", action="store_true", help="with --reuse, run the learner stages again anyway")
    p.add_argument("--scan-only", action="store_true", help="only scan the objectives over --scan-strengths")
    p.add_argument("--scan-strengths", default="0.0001,1,2,3,5,10,21,30,50,79,100,300,1000,3000,10000")
    return p.parse_args(argv)


def flat_recipe(args: argparse.Namespace, out: str) -> tofu_flat.Recipe:
    flat_args = tofu_flat.parse_args(["--out", out, "--reuse", "--jobs", str(args.jobs), "--threads", str(args.threads),
                                      "--n-authors", str(args.n_authors), "--qa-per-author", str(args.qa_per_author),
                                      "--paraphrase-style", args.paraphrase_style])
    return tofu_flat.Recipe(flat_args)


class NameGate:
    """An oracle gate for the ablation row: p(forget) = 1 exactly for prompts naming a forget author."""

    def __init__(self, names):
        self.names = list(names)

    def probabilities(self, texts):
        import torch

        return torch.tensor([float(any(name in text for name in self.names)) for text in texts])


def load_averages():
    return tofu_flat.load_averages()


def run(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), load_averages()
    out = Path(args.out)
    timings: dict[str, float] = {}

    # 1. the FLAT recipe's target and retain models (reused when present)
    flat = flat_recipe(args, args.tofu)
    tic = time.perf_counter()
    target, retain = flat.parallel([(flat.finetune, "target"), (flat.finetune, "retain")])
    retain_eval = flat.evaluate("retain", None)
    target_eval = flat.evaluate("target", retain_eval)
    timings["tofu_models"] = round(time.perf_counter() - tic, 1)

    # 2-3. classifier and strength, side by side
    runner = flat_recipe(args, args.out)
    classifier_export = out / "classifier" / "export"
    compared = [m for m in args.compare_metrics.split(",") if m and m != args.metric]
    unknown = [m for m in compared if m not in METRICS]
    if unknown:
        raise SystemExit(f"--compare-metrics: unknown objectives {unknown}; choose from {list(METRICS)}")
    learn_dirs = {args.metric: out / "learn", **{m: out / f"learn_{m}" for m in compared}}

    reused: list[str] = []

    def classifier_stage():
        if args.reuse and (classifier_export / "eco_classifier.json").exists():
            print(f"=== classifier: reusing {classifier_export}")
            reused.append("classifier")
            return
        overrides = [*runner.logger("classifier"), f"--checkpoint.dirpath={out / 'classifier' / 'checkpoints'}",
                     f"--export.dirpath={classifier_export}", f"--trainer.max_epochs={args.classifier_epochs}",
                     f"--model.init_args.model={args.classifier_model or target}"]
        if args.target_fpr is not None:
            overrides.append(f"--model.init_args.target_fpr={args.target_fpr}")
        for stale in (out / "classifier" / "checkpoints").glob("last*.ckpt"):
            stale.unlink()
        runner.cli("classifier", "fit", "configs/eco/classifier.yaml", *overrides)

    def learner_stage(metric: str):
        folder = learn_dirs[metric]
        stage = folder.name
        if args.reuse and not args.relearn and (folder / "settings" / "eco.json").exists():
            print(f"=== {stage}: reusing {folder / 'settings'}")
            reused.append(stage)
            return
        scan_override = []
        if args.init_scan is not None:
            values = [float(v) for v in args.init_scan.split(",") if v]
            scan_override = [f"--model.init_args.init_scan={json.dumps(values) if values else 'null'}"]
        runner.cli(stage, "fit", "configs/eco/learn.yaml", *runner.logger(stage), *scan_override,
                   f"--checkpoint.dirpath={folder / 'checkpoints'}", f"--model.init_args.model={target}",
                   f"--model.init_args.retain_eval={retain_eval}", f"--model.init_args.metric={metric}",
                   f"--model.init_args.corruption={args.corruption}", f"--model.init_args.dims={args.dims}",
                   f"--model.init_args.strength={args.strength}", f"--model.init_args.lr={args.lr}",
                   f"--model.init_args.settings_dir={folder / 'settings'}", f"--trainer.max_steps={args.learn_steps}")

    runner.parallel([(classifier_stage,), *((learner_stage, metric) for metric in learn_dirs)])
    timings.update(runner.timings)

    # 4. evaluation
    tic = time.perf_counter()
    result = evaluate(args, out, target, retain, retain_eval, target_eval, classifier_export, learn_dirs)
    timings["evaluation"] = round(time.perf_counter() - tic, 1)
    result.update(total_seconds=round(time.perf_counter() - started, 1), stage_seconds=timings, reused_stages=reused,
                  machine={"cpus": os.cpu_count(), "torch_threads": args.threads, "jobs": args.jobs, "nice": os.nice(0),
                           "load_average_start": load_start, "load_average_end": load_averages()},
                  settings=vars(args))
    write(result, out, Path(args.tofu))
    return result


def evaluate(args, out: Path, target: Path, retain: Path, retain_eval: Path, target_eval: Path,
             classifier_export: Path, learn_dirs: dict[str, Path]) -> dict:
    from callbacks.eco_eval import MultipleChoiceEvaluator
    from callbacks.tofu_eval import HFEvalLM
    from datamodules.eco_data import EcoPromptData, mc_items
    from modules import eco
    from modules.lm import load_model, load_tokenizer
    from modules.tofu_eval import load_eval, reference_truth_ratios

    data_args = dict(n_authors=args.n_authors, qa_per_author=args.qa_per_author, paraphrase_style=args.paraphrase_style)
    prompts = EcoPromptData(**data_args)
    generated = prompts.generated()
    forget_names = [generated.authors[i]["name"] for i in generated.forget_authors[prompts.forget_split]]
    tokenizer = load_tokenizer(str(target))
    evaluator = prompts.evaluator(tokenizer)
    retain_ratios = reference_truth_ratios(retain_eval, prompts.forget_split)
    mc_sets = {"forget": mc_items(prompts.rows(f"{prompts.forget_split}_perturbed")), "general": mc_items(prompts.general_rows())}
    mc_evaluators = {(split, scoring): MultipleChoiceEvaluator(items, tokenizer, scoring)
                     for split, items in mc_sets.items() for scoring in ("letter", "option")}

    def multiple_choice(lm) -> dict:
        return {f"{split}_{scoring}": ev.evaluate(lm)["accuracy"] for (split, scoring), ev in mc_evaluators.items()}

    # the ECO wrapper: target model + classifier + learned strength (one per learned objective)
    gate = eco.PromptGate.load(classifier_export)
    threshold = eco.classifier_threshold(classifier_export)
    target_model = load_model(str(target), tokenizer=tokenizer).eval()

    def wrapped(metric: str) -> tuple[eco.EcoSettings, eco.EcoLM]:
        learned, _ = eco.load_settings(learn_dirs[metric] / "settings")
        settings = eco.EcoSettings(**{**asdict(learned), "gate": "classifier", "threshold": threshold,
                                      "classifier_source": str(classifier_export)})
        return settings, eco.EcoLM(target_model, tokenizer, settings, gate)

    settings, wrapper = wrapped(args.metric)
    wrapper.save(out / "wrapper")
    oracle = eco.EcoLM(target_model, tokenizer, eco.EcoSettings(**{**asdict(settings), "threshold": 0.5}), NameGate(forget_names))
    wrappers = {"eco": wrapper, "eco_oracle_gate": oracle,
                **{f"eco_{metric}_objective": wrapped(metric)[1] for metric in learn_dirs if metric != args.metric}}

    # classifier error rates: held-out validation prompts and the prompts the evaluations send
    val_rows, eval_rows = prompts.split_rows()["val"], prompts.evaluation_rows()
    classifier = {}
    for name, rows in (("validation", val_rows), ("evaluation", eval_rows)):
        scores = gate.probabilities([r["text"] for r in rows]).numpy()
        classifier[name] = eco.error_rates(scores, [r["label"] for r in rows], threshold)
        classifier[name]["flag_rate_by_kind"] = {
            kind: float((scores[[r["kind"] == kind for r in rows]] > threshold).mean())
            for kind in sorted({r["kind"] for r in rows})}
    classifier["threshold"] = threshold

    rows = []
    for name, path in (("target", target_eval), ("retain", retain_eval)):
        body = load_eval(path)
        report = body["report"]
        if name == "retain":
            from modules.tofu_eval import forget_quality

            report = {**report, **forget_quality(retain_ratios, retain_ratios)}
        lm = HFEvalLM(load_model(str(target if name == "target" else retain), tokenizer=tokenizer).eval(), tokenizer)
        rows.append(row(name, report, multiple_choice(lm)))
    for name, lm in wrappers.items():
        tic = time.perf_counter()
        result = evaluator.evaluate(lm, retain_ratios)
        evaluator.save(out / "eval" / f"{name}.json", result, model=name, retain_truth_ratios=retain_ratios)
        rows.append(row(name, result["report"], multiple_choice(lm), seconds=round(time.perf_counter() - tic, 1)))
    learned = {}
    for metric, folder in learn_dirs.items():
        settings_learned, _ = eco.load_settings(folder / "settings")
        learning = json.loads((folder / "settings" / "learning.json").read_text())
        best = min(learning["history"], key=lambda h: h["objective"])
        learned[metric] = {"strength": settings_learned.strength, "corruption": settings_learned.corruption,
                           "dims": settings_learned.dims, "metric": learning["metric"], "target": learning["target"],
                           "best_objective": learning["best_objective"], "best_metric": best["metric"],
                           "steps": learning["steps"], "history": learning["history"],
                           "forward_passes": learning.get("forward_passes"),
                           "scan_forward_passes": learning.get("scan_forward_passes", 0)}
    return {"rows": rows, "classifier": classifier, "primary_metric": args.metric, "learned": learned}


def row(name: str, report: dict, mc: dict, **extra) -> dict:
    return {"model": name, "forget_quality": report["forget_quality"], "model_utility": report["model_utility"],
            "forget_rougeL_recall": report["forget/rougeL_recall"], "forget_truth_ratio": report["forget/truth_ratio"],
            "forget_ks_statistic": report.get("ks_statistic"),
            "retain_rougeL_recall": report["retain/rougeL_recall"], **{f"mc_{k}": v for k, v in mc.items()}, **extra}


def write(result: dict, out: Path, tofu: Path) -> None:
    def num(value, fmt=".3f"):
        return "n/a" if value is None else format(value, fmt)

    lines = ["| model | Forget Quality | Model Utility | forget ROUGE-L | retain ROUGE-L | forget MC letter / option "
             "| general MC letter / option |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {num(r['forget_quality'], '.3g')} | {r['model_utility']:.4f} | "
                     f"{r['forget_rougeL_recall']:.3f} | {r['retain_rougeL_recall']:.3f} | "
                     f"{r['mc_forget_letter']:.3f} / {r['mc_forget_option']:.3f} | "
                     f"{r['mc_general_letter']:.3f} / {r['mc_general_option']:.3f} |")
    flat_results = tofu / "results.json"
    if flat_results.exists():  # the FLAT recipe's unlearned models, from its own table (no MC evaluation)
        for r in json.loads(flat_results.read_text())["rows"]:
            if r["model"] not in ("target", "retain"):
                lines.append(f"| {r['model']} (FLAT recipe) | {num(r['forget_quality'], '.3g')} | {r['model_utility']:.4f} | "
                             f"{r['forget_rougeL_recall']:.3f} | {r['retain_rougeL_recall']:.3f} | - | - |")
    c = result["classifier"]
    lines += ["", f"Classifier (threshold {c['threshold']:.4g}): held-out validation prompts FPR "
                  f"{c['validation']['fpr']:.4f} ({c['validation']['n_negative']} negatives), FNR "
                  f"{c['validation']['fnr']:.4f} ({c['validation']['n_positive']} positives); evaluation prompts FPR "
                  f"{c['evaluation']['fpr']:.4f}, FNR {c['evaluation']['fnr']:.4f}; flag rate by kind "
                  f"{json.dumps({k: round(v, 4) for k, v in c['evaluation']['flag_rate_by_kind'].items()})}.",
              "Chance for the 4-option multiple choice: 0.250.",
              *(learned_line(metric, learned, result["rows"], metric == result["primary_metric"])
                for metric, learned in result["learned"].items()),
              f"Wall time {result['total_seconds']} s (stages {json.dumps(result['stage_seconds'])}"
              f"{'; reused from an earlier run: ' + ', '.join(result['reused_stages']) if result['reused_stages'] else ''}); "
              f"{result['machine']['cpus']} CPUs, {result['machine']['jobs']} stages at once, "
              f"{result['machine']['torch_threads']} torch thread(s), nice {result['machine']['nice']}; load average "
              f"at start {result['machine']['load_average_start']}, at end {result['machine']['load_average_end']}."]
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(result, indent=1, default=float))
    print("\n" + table)


def learned_line(metric: str, learned: dict, rows: list[dict], primary: bool) -> str:
    """What the learner found, next to the evaluator's value of the same quantity (they agree now that a
    prompt's noise does not depend on its batch)."""
    strength = learned["strength"]
    strength = ", ".join(f"{v:.4g}" for v in strength) if isinstance(strength, list) else f"{strength:.4g}"
    name = "eco" if primary else f"eco_{metric}_objective"
    evaluated = next(r for r in rows if r["model"] == name)
    evaluator_value = {"truth_ratio": evaluated["forget_truth_ratio"], "truth_ratio_ks": evaluated["forget_ks_statistic"]}.get(metric)
    check = "" if evaluator_value is None else f"; the evaluator's value at that strength {evaluator_value:.4f}"
    scanned = [h for h in learned["history"] if h.get("scan")]
    scan = ""
    if scanned:
        # a vector strength scans a common scale: every entry holds the scanned value
        points = ", ".join(f"{(h['strength'][0] if isinstance(h['strength'], list) else h['strength']):g}: "
                           f"{h['objective']:.4f}" for h in scanned)
        scan = (f" Initial scan ({learned['scan_forward_passes']} forward passes of the "
                f"{learned['forward_passes']} in all), J at s = {points}.")
    return (f"Learned ({name}): {learned['corruption']} on {learned['dims']} dims, strength {strength} after "
            f"{learned['steps']} steps (metric {metric}, target {learned['target']:.4f}, best |metric - target| "
            f"{learned['best_objective']:.4f}, the learner's metric {learned['best_metric']:.4f}{check}).{scan}")


def scan(args: argparse.Namespace) -> dict:
    """Both objectives of the learner over a grid of strengths (see the module docstring)."""
    import torch

    from datamodules.eco_data import EcoForgetData
    from modules import eco
    from modules.lm import load_model, load_tokenizer
    from modules.tofu_eval import forget_quality, forget_truth_ratio_score, load_eval, reference_truth_ratios

    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), load_averages()
    flat = flat_recipe(args, args.tofu)
    target, _ = flat.parallel([(flat.finetune, "target"), (flat.finetune, "retain")])
    retain_eval = flat.evaluate("retain", None)
    data = EcoForgetData(n_authors=args.n_authors, qa_per_author=args.qa_per_author,
                         paraphrase_style=args.paraphrase_style)
    data.tokenizer = tokenizer = load_tokenizer(str(target))
    batch = data.forget_batch()
    reference = reference_truth_ratios(retain_eval, data.forget_split)
    retain_score = float(load_eval(retain_eval)["report"]["forget/truth_ratio"])
    wrapper = eco.EcoLM(load_model(str(target), tokenizer=tokenizer).eval(), tokenizer,
                        eco.EcoSettings(corruption=args.corruption, dims=args.dims, gate="all"))
    flags = torch.ones(len(batch["qa"]["questions"]), dtype=torch.bool)
    points = []
    for strength in [float(v) for v in args.scan_strengths.split(",") if v]:
        scores = eco.score_in_batches(wrapper, batch["qa"], flags, strength, data.eval_batch_size)
        ratios = eco.forget_truth_ratios(batch, scores)
        score = float(forget_truth_ratio_score(ratios).mean())
        points.append({"strength": strength, "truth_ratio_score": score, "distance_to_retain": abs(score - retain_score),
                       "ks_statistic": eco.ks_statistic(ratios, reference),
                       "forget_quality": forget_quality(ratios, reference)["forget_quality"]})
    lines = [f"Objectives over strengths: {args.corruption} on {args.dims} dims, every forget prompt corrupted "
             f"(retain model's mean forget truth-ratio score {retain_score:.4f}).", "",
             "| strength | mean truth-ratio score | distance to retain (truth_ratio J) | KS statistic (truth_ratio_ks J) "
             "| forget quality |", "|---|---|---|---|---|"]
    lines += [f"| {p['strength']:g} | {p['truth_ratio_score']:.4f} | {p['distance_to_retain']:.4f} | "
              f"{p['ks_statistic']:.4f} | {p['forget_quality']:.3g} |" for p in points]
    lines.append(f"\nWall time {time.perf_counter() - started:.1f} s; load average at start {load_start}, "
                 f"at end {load_averages()}.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scan.md").write_text("\n".join(lines) + "\n")
    result = {"points": points, "retain_truth_ratio_score": retain_score, "settings": vars(args)}
    (out / "scan.json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines))
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    return scan(args) if args.scan_only else run(args)


if __name__ == "__main__":
    main()
