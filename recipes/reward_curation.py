"""Does a curated subset beat the raw pool? (Skywork-Reward's thesis, on the embedded arithmetic task.)

1. Generate a deliberately noisy preference pool (conversational, Skywork-Reward-Preference-80K shape):
   - ``trusted``: clean pairs (a small, carefully labelled source);
   - ``crowd``: a large source with a fraction of its labels flipped, exact and whitespace-variant
     duplicates, and a few invalid rows (chosen == rejected, an empty response);
   - ``synthetic``: low-value pairs, both responses wrong (the label says nothing about correctness);
   - ``forum``: pairs whose prompts are the evaluation prompts, verbatim or wrapped in longer text.
   The held-out evaluation set is RewardBench-shaped (``datamodules/rewardbench.generated_rows``:
   5 subsets in 4 categories), on problems disjoint from the pool.
2. Train a judge reward model on the trusted source, score the pool with it (``predict``,
   ``RewardScorer``), and curate: drop invalid -> deduplicate -> decontaminate against the evaluation
   prompts -> consistency filter on crowd and synthetic -> top fraction by mean judge score per category
   (paper defaults: 30% math/code, 10% other) with per-source offsets.
3. Train the same model for the same number of steps (same batch size, learning rate, seed) on the raw
   pool and on the curated subset, and test both on the evaluation set: strict accuracy, per-subset and
   RewardBench category scores.

Prints the tables and writes ``results.md`` and ``results.json`` to ``--out``::

    python recipes/reward_curation.py                 # about 3 minutes on an idle 2-core CPU, 15+ when shared
    python recipes/reward_curation.py --steps 20 --judge-steps 10 --pool-scale 0.2 --out /tmp/curation_quick
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASE_CONFIG = str(ROOT / "configs/reward/bt.yaml")
SCORE_CONFIG = str(ROOT / "configs/curation/score.yaml")
WRAPPERS = ("Here is a question from an evaluation set. {prompt} Please show every step.",
            "{prompt} I found this one online and want the worked solution.")


# ----------------------------------------------------------------------------------------------------
# The noisy pool


def conversation(prompt: str, chosen: str, rejected: str, **extra: Any) -> dict[str, Any]:
    user = {"role": "user", "content": prompt}
    return {"chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}], **extra}


def respace(text: str) -> str:
    """A whitespace variant: the same words, different spacing (a near-duplicate a tokenizer still sees)."""
    return text.replace("\n", " \n").replace(". ", ".  ") + " "


def build_data(scale: float, flip_fraction: float, seed: int) -> dict[str, Any]:
    from datamodules import arithmetic
    from datamodules.rewardbench import GENERATED_SUBSETS, generated_pair, generated_rows

    sizes = {name: max(5, int(count * scale)) for name, count in
             {"trusted": 400, "crowd": 2000, "synthetic": 500, "eval": 500}.items()}
    problems = arithmetic.generate_splits(sizes, seed=seed)
    rng = random.Random(seed)
    eval_rows = generated_rows(problems["eval"], seed=seed + 1)

    def clean_pairs(name: str, source: str) -> list[dict[str, Any]]:
        rows = []
        for number, problem in enumerate(problems[name]):
            subset = GENERATED_SUBSETS[number % len(GENERATED_SUBSETS)]
            pair = generated_pair(problem, subset, rng)
            rows.append(conversation(pair["prompt"], pair["chosen"], pair["rejected"], subset=subset, source=source))
        return rows

    trusted = clean_pairs("trusted", "trusted")
    crowd = clean_pairs("crowd", "crowd")
    flipped = rng.sample(range(len(crowd)), int(flip_fraction * len(crowd)))
    for index in flipped:
        row = crowd[index]
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    synthetic = []
    for problem in problems["synthetic"]:  # both responses wrong, in two different ways
        first, second = rng.sample(["format", "consistency", "arithmetic"], 2)
        synthetic.append(conversation(problem.question, arithmetic.rejected_solution(problem, first, rng),
                                      arithmetic.rejected_solution(problem, second, rng),
                                      subset="both-wrong", source="synthetic"))
    exact_copies = [json.loads(json.dumps(row)) for row in rng.sample(crowd + synthetic, len(crowd) // 7)]
    spaced_copies = []
    for row in rng.sample(crowd + synthetic, len(crowd) // 10):
        copy = json.loads(json.dumps(row))
        for side in ("chosen", "rejected"):
            copy[side][0]["content"] = respace(copy[side][0]["content"])
            copy[side][1]["content"] = respace(copy[side][1]["content"])
        spaced_copies.append(copy)
    leaked = []
    for number, row in enumerate(rng.sample(eval_rows, max(2, len(eval_rows) // 5))):
        prompt = row["prompt"] if number % 2 == 0 else WRAPPERS[number % 4 // 2].format(prompt=row["prompt"])
        leaked.append(conversation(prompt, row["chosen"], row["rejected"], subset=row["subset"], source="forum"))
    invalid = []
    for number, row in enumerate(rng.sample(crowd, max(2, len(crowd) // 70))):
        copy = json.loads(json.dumps(row))
        if number % 2 == 0:
            copy["rejected"] = copy["chosen"]
        else:
            copy["rejected"][1]["content"] = " "
        invalid.append(copy)
    pool = trusted + crowd + synthetic + exact_copies + spaced_copies + leaked + invalid
    random.Random(seed + 2).shuffle(pool)
    composition = {"trusted (clean)": len(trusted), "crowd": len(crowd), "crowd labels flipped": len(flipped),
                   "synthetic (both responses wrong)": len(synthetic), "exact duplicates": len(exact_copies),
                   "whitespace-variant duplicates": len(spaced_copies),
                   "forum (evaluation prompts, half wrapped in text)": len(leaked),
                   "invalid (chosen == rejected or empty)": len(invalid), "pool total": len(pool),
                   "evaluation pairs (held out)": len(eval_rows)}
    return {"pool": pool, "trusted": trusted, "eval": eval_rows, "composition": composition}


# ----------------------------------------------------------------------------------------------------
# Runs through cli.py


def run_args(out: Path, name: str) -> list[str]:
    return [f"--trainer.logger.init_args.save_dir={out / 'runs'}", f"--trainer.logger.init_args.name={name}",
            f"--checkpoint.dirpath={out / 'runs' / name / 'checkpoints'}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]


def fit_and_test(out: Path, name: str, train_file: Path, eval_file: Path, args) -> dict[str, Any]:
    """Fit for ``args.steps`` (or ``judge_steps``) on ``train_file``, then test the final weights on the
    evaluation set with RewardBench category scores."""
    import cli

    steps = args.judge_steps if name == "judge" else args.steps
    started = time.time()
    result = cli.main([
        "fit", "--config", BASE_CONFIG, *run_args(out, name),
        f"--model.init_args.model={args.model}", f"--data.init_args.train_file={train_file}",
        f"--data.init_args.test_file={eval_file}", "--data.init_args.invalid_rows=drop",
        f"--data.init_args.batch_size={args.batch_size}", f"--trainer.max_steps={steps}",
        "--trainer.val_check_interval=null", "--checkpoint.monitor=null", "--checkpoint.filename=final",
        f"--checkpoint.every_n_train_steps={steps}",
        "--export.dirpath=null", "--test_after_fit=true", f"--seed_everything={args.seed}",
        "--trainer.callbacks+=callbacks.rewardbench.RewardBenchScores",
    ])
    log_dir = Path(result.trainer.log_dir)
    summary = json.loads((log_dir / "summary.json").read_text())
    rewardbench = json.loads((log_dir / "rewardbench.json").read_text())
    test = summary["stages"]["test"]["metrics"]
    return {
        "train_file": str(train_file), "train_pairs": summary["stages"]["fit"]["data"]["rows"]["train"],
        "dropped_when_loading": summary["stages"]["fit"]["data"].get("dropped", {}),
        "steps": summary["stages"]["fit"]["global_step"], "seconds": round(time.time() - started, 1),
        "accuracy": test["test/accuracy"], "final_train_loss": summary["stages"]["fit"]["metrics"].get("train/loss"),
        "per_subset": {subset: entry["accuracy"] for subset, entry in rewardbench["subsets"].items()},
        "categories": rewardbench["categories"], "overall": rewardbench["overall"],
        "checkpoint": summary["stages"]["test"]["checkpoint"],
    }


def score_pool(out: Path, pool_file: Path, checkpoint: str, args) -> dict[str, Any]:
    import cli

    scored = out / "pool.scored.jsonl"
    cli.main(["predict", "--config", SCORE_CONFIG, *run_args(out, "score"), f"--model.init_args.model={args.model}",
              f"--model.init_args.checkpoint={checkpoint}", f"--data.init_args.input_file={pool_file}",
              f"--model.init_args.output_file={scored}", "--model.init_args.score_prefix=judge",
              "--data.init_args.max_length=128"])
    return json.loads(Path(f"{scored}.report.json").read_text())


def curation_steps(eval_file: Path, args) -> list:
    from datamodules.curation import ConsistencyFilter, Decontaminate, Deduplicate, DropInvalid, SelectByScore

    return [DropInvalid(), Deduplicate(normalize_whitespace=True), Decontaminate(eval_files=[str(eval_file)], ngram=8),
            ConsistencyFilter(sources=["crowd", "synthetic"], score_prefix="judge"),
            SelectByScore(fractions={"math": args.math_fraction, "code": 0.3, "other": 0.1}, score_prefix="judge",
                          source_offsets={"crowd": -0.05, "synthetic": -0.1})]


# ----------------------------------------------------------------------------------------------------
# Report


def markdown(results: dict[str, Any]) -> str:
    from datamodules.curation import report_table

    raw, curated = results["runs"]["raw"], results["runs"]["curated"]
    categories = list(raw["categories"])
    lines = [f"# Reward-data curation on the embedded arithmetic task ({results['date']})", "",
             f"Model `{results['settings']['model']}`, {results['settings']['steps']} steps of batch "
             f"{results['settings']['batch_size']} for both runs, seed {results['settings']['seed']}; CPU load "
             f"average at start/end: {results['load_average']['start']} / {results['load_average']['end']}; "
             f"total {results['seconds']:.0f} s.", "", "## Held-out evaluation (RewardBench-shaped, strict accuracy)", "",
             "| training data | pairs | accuracy | " + " | ".join(categories) + " | overall (mean of categories) |",
             "|---|---|---|" + "---|" * len(categories) + "---|"]
    arms = [("raw pool", raw), ("curated", curated)]
    if "curated_without_selection" in results["runs"]:
        arms.append(("curated without score selection (ablation)", results["runs"]["curated_without_selection"]))
    for name, run in arms:
        lines.append(f"| {name} | {run['train_pairs']} | {run['accuracy']:.3f} | "
                     + " | ".join(f"{run['categories'].get(c, float('nan')):.3f}" for c in categories)
                     + f" | {run['overall']:.3f} |")
    judge = results["runs"]["judge"]
    lines += ["", f"Judge (trained on the trusted source, {judge['train_pairs']} pairs, {judge['steps']} steps): "
              f"accuracy {judge['accuracy']:.3f}, overall {judge['overall']:.3f}.", "",
              "Per subset: " + "; ".join(f"{subset} {raw['per_subset'][subset]:.3f} -> {curated['per_subset'][subset]:.3f}"
                                         for subset in raw["per_subset"]), "",
              "## Pool", "", "| part | rows |", "|---|---|"]
    lines += [f"| {part} | {count} |" for part, count in results["composition"].items()]
    lines += ["", "## What each curation step removed", "", report_table(results["curation"]), "",
              f"Scoring: {results['scoring']['scored_rows']} of {results['scoring']['input_rows']} pairs scored "
              f"(unscored: {results['scoring']['unscored_by_reason'] or 'none'}); the judge ranks "
              f"{results['scoring']['accuracy_on_labels']:.3f} of the pool's labels correct."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "curation"))
    parser.add_argument("--model", default="tiny",
                        help="backbone of all three reward models; tiny-sft is bt.yaml's (built once, on first use, "
                             "by an 800-step SFT run that this recipe's time budget does not include)")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of the raw and the curated run")
    parser.add_argument("--judge-steps", type=int, default=60, help="optimizer steps of the judge")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pool-scale", type=float, default=1.0, help="multiplies every part of the pool")
    parser.add_argument("--flip-fraction", type=float, default=0.3, help="crowd labels flipped")
    parser.add_argument("--math-fraction", type=float, default=0.3, help="top fraction of math prompts kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ablation-no-selection", action="store_true",
                        help="also train on the pool curated without the score-based selection step")
    args = parser.parse_args(argv)

    from datamodules.curation import report_table, run_pipeline, write_json, write_rows

    started, load_start = time.time(), os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(args.pool_scale, args.flip_fraction, args.seed)
    pool_file, eval_file, trusted_file = out / "pool.jsonl", out / "eval.jsonl", out / "trusted.jsonl"
    write_rows(pool_file, data["pool"])
    write_rows(eval_file, data["eval"])
    write_rows(trusted_file, data["trusted"])

    runs: dict[str, Any] = {"judge": fit_and_test(out, "judge", trusted_file, eval_file, args)}
    scoring = score_pool(out, pool_file, runs["judge"]["checkpoint"], args)
    curation = run_pipeline(str(out / "pool.scored.jsonl"), str(out / "curated"), curation_steps(eval_file, args))
    print(report_table(curation))
    runs["raw"] = fit_and_test(out, "raw", pool_file, eval_file, args)
    runs["curated"] = fit_and_test(out, "curated", Path(curation["output_file"]), eval_file, args)
    if args.ablation_no_selection:
        before_selection = Path(curation["steps"][-2]["output_file"])
        runs["curated_without_selection"] = fit_and_test(out, "curated_without_selection", before_selection,
                                                         eval_file, args)

    results = {
        "date": time.strftime("%Y-%m-%d"), "settings": vars(args), "composition": data["composition"],
        "scoring": {key: scoring[key] for key in ("input_rows", "scored_rows", "unscored_by_reason",
                                                  "accuracy_on_labels", "by_source")},
        "curation": curation, "runs": runs, "seconds": time.time() - started,
        "load_average": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
    }
    write_json(out / "results.json", results)
    text = markdown(results)
    (out / "results.md").write_text(text)
    print("\n" + text)
    return results


if __name__ == "__main__":
    main()
