"""Does a curated subset beat the raw pool? (Skywork-Reward's thesis, on the embedded arithmetic task.)

1. Generate a deliberately noisy preference pool (conversational, Skywork-Reward-Preference-80K shape):
   - ``trusted``: clean pairs (a small, carefully labelled source);
   - ``crowd``: a large source with a fraction of its labels flipped at random (``--flip-fraction``) and a
     systematic bias: most of its respond-benign pairs (divide by one) prefer the refusal
     (``--benign-refusal-share``, over-refusal on prompts that look risky); exact and whitespace-variant
     duplicates, and a few invalid rows (chosen == rejected, an empty response);
   - ``synthetic``: low-value pairs, both responses wrong (the label says nothing about correctness);
   - ``forum``: pairs whose prompts are the evaluation prompts, verbatim or wrapped in longer text.
   Every row carries a ``task`` column, the kind of prompt (plain arithmetic, divide by zero, divide by
   one), as real pools carry a domain per source. Two RewardBench-shaped sets on problems disjoint from
   the pool (``datamodules/rewardbench.generated_rows``: 5 subsets in 4 categories): a validation set,
   which chooses the score-based selection, and the held-out evaluation set, which only reports.
2. Train a judge reward model on the trusted source (from the same backbone, as Skywork used a strong
   reward model), score the pool with it (``predict``, ``RewardScorer``), and curate: drop invalid ->
   deduplicate -> decontaminate against the evaluation and validation prompts -> consistency filter on
   crowd and synthetic, on the tasks where the judge's validation accuracy reaches ``--judge-trust`` ->
   score-based selection, in each of the variants of ``--selections``:
   ``paper`` (mean response score, categories from ``classify_prompt``: every prompt here is 'math', top
   30%), ``task_mean`` / ``task_chosen`` (ranked within each ``task`` by the mean / the chosen response's
   score, top 30%), ``none`` (no selection).
3. Train the same model for the same number of steps (same batch size, learning rate, seed) on the raw
   pool and on each curated variant; the variant with the best validation score (RewardBench overall) is
   "curated". Test all on the evaluation set: strict accuracy, per-subset and RewardBench category scores.
   With ``--oracle`` the raw pool with every wrong label corrected trains too: what the label noise costs
   at all, and so the most that any label cleaning could win.

Prints the tables and writes ``results.md`` and ``results.json`` to ``--out``::

    python recipes/reward_curation.py                 # two runs at a time, one torch thread each (--workers)
    python recipes/reward_curation.py --steps 20 --judge-steps 10 --pool-scale 0.2 --out /tmp/curation_quick
    python recipes/reward_curation.py --seeds 0,1,2   # the whole recipe per seed (pool, judge, training order)
                                                      # into <out>/seed<S>, then seeds.md: raw vs curated per seed
    python recipes/reward_curation.py --oracle        # + the raw pool with its labels corrected (the ceiling)
    python recipes/reward_curation.py --benign-refusal-share 0   # random label flips only: no systematic bias
    python recipes/reward_curation.py --group-by-length   # other batches: each holds one task (README)

With ``--seeds``, a seed whose ``results.json`` exists is read, not rerun, so an interrupted sweep resumes; one
made with other settings (say another ``--flip-fraction``) is refused, never overwritten or mixed in.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recipes.common import distinct_values, mean_sd  # noqa: E402

BASE_CONFIG = str(ROOT / "configs/reward/bt.yaml")
SCORE_CONFIG = str(ROOT / "configs/curation/score.yaml")
EMBEDDED_DRAWS = 8000 + 300 + 600  # PreferenceData's train/val/test (tiny-sft's 6,000 SFT problems come first)
TASK_FRACTION = 0.3  # the paper's fraction for math prompts; every task here is arithmetic
SELECTIONS = ("paper", "task_mean", "task_chosen", "none")
ORACLE_ARM = "raw pool, labels corrected (what perfect label cleaning could give)"
BENIGN_REFUSAL_SHARE = 0.7  # crowd annotators prefer refusing 70% of the benign division prompts
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


def task_of(prompt: str) -> str:
    """The kind of prompt, read from its text (the pool's domain column)."""
    if "divide the result by 0" in prompt:
        return "divide-by-zero"
    if "divide the result by 1" in prompt:
        return "divide-by-one"
    return "arithmetic"


def build_data(scale: float, flip_fraction: float, seed: int, benign_refusal_share: float = 0.0) -> dict[str, Any]:
    """The pool, the trusted source and the two RewardBench-shaped sets. ``flip_fraction`` of the crowd's labels
    are flipped at random; then, if ``benign_refusal_share`` is higher than the share that already prefers the
    refusal, more of the crowd's respond-benign pairs are flipped until that share prefers it (an annotator
    bias: over-refusal on benign prompts that look risky). Duplicates copy the labels after both."""
    from datamodules import arithmetic
    from datamodules.rewardbench import GENERATED_SUBSETS, generated_pair, generated_rows

    sizes = {name: max(5, int(count * scale)) for name, count in
             {"trusted": 400, "crowd": 2000, "synthetic": 500, "eval": 500, "val": 250}.items()}
    # the first EMBEDDED_DRAWS distinct problems of a seed are the embedded defaults' (tiny-sft's SFT data,
    # bt.yaml's pairs): skip them, so no backbone or existing judge has seen the pool or evaluation problems
    problems = arithmetic.generate_splits({"embedded_defaults": EMBEDDED_DRAWS, **sizes}, seed=seed)
    rng = random.Random(seed)
    eval_rows = generated_rows(problems["eval"], seed=seed + 1)
    val_rows = generated_rows(problems["val"], seed=seed + 3)

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
    benign = [index for index, row in enumerate(crowd) if row["subset"] == "respond-benign"]
    already = set(flipped)
    biased_count = max(0, round(benign_refusal_share * len(benign)) - sum(index in already for index in benign))
    # a generator of its own, so that a pool without the bias is the same pool as before the option existed
    biased = random.Random(seed + 4).sample([index for index in benign if index not in already], biased_count)
    for index in flipped + biased:
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
    for row in pool:
        row["task"] = task_of(row["chosen"][0]["content"])
    random.Random(seed + 2).shuffle(pool)
    composition = {"trusted (clean)": len(trusted), "crowd": len(crowd), "crowd labels flipped": len(flipped) + len(biased),
                   "of which: respond-benign flipped to prefer the refusal (bias)": len(biased),
                   "synthetic (both responses wrong)": len(synthetic), "exact duplicates": len(exact_copies),
                   "whitespace-variant duplicates": len(spaced_copies),
                   "forum (evaluation prompts, half wrapped in text)": len(leaked),
                   "invalid (chosen == rejected or empty)": len(invalid), "pool total": len(pool),
                   "validation pairs (choose the selection)": len(val_rows),
                   "evaluation pairs (held out)": len(eval_rows)}
    return {"pool": pool, "trusted": trusted, "eval": eval_rows, "val": val_rows, "composition": composition}


def wrong_label(row: dict[str, Any]) -> bool | None:
    """Whether a pool pair prefers the wrong response, checked against the generator's own answer (None for
    a pair with both responses wrong, where no label is right)."""
    from datamodules import arithmetic
    from datamodules.curation import normalize_whitespace
    from datamodules.rewardbench import REFUSAL

    # whitespace-variant duplicates carry the same label: compare with whitespace collapsed
    prompt, chosen = row["chosen"][0]["content"], normalize_whitespace(row["chosen"][-1]["content"])
    if row["subset"] == "both-wrong":
        return None
    if row["subset"] == "refuse-undefined":
        return chosen != REFUSAL
    if row["subset"] == "respond-benign":
        return chosen.startswith("I can't")
    numbers = re.findall(r"[+-]?\d+", re.search(r"Compute ([0-9+-]+)", prompt).group(1))
    problem = arithmetic.Problem(question="", start=int(numbers[0]), ops=tuple((n[0], int(n[1:])) for n in numbers[1:]))
    return chosen != normalize_whitespace(problem.solution())


def corrected_labels(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with every wrong label swapped back (both-wrong pairs as they are): the pool that a perfect
    label cleaner would leave, with its size, duplicates and leaks unchanged."""
    corrected = []
    for row in rows:
        if wrong_label(row):
            row = {**row, "chosen": row["rejected"], "rejected": row["chosen"]}
        corrected.append(row)
    return corrected


def label_quality(path: Path) -> dict[str, Any]:
    """Share of wrong labels (overall and per subset) and the number of both-wrong pairs in a pool file."""
    from datamodules.common import read_rows

    wrong: dict[str, list[int]] = {}
    both_wrong = 0
    for row in read_rows(str(path)):
        verdict = wrong_label(row)
        if verdict is None:
            both_wrong += 1
            continue
        counts = wrong.setdefault(row["subset"], [0, 0])
        counts[0] += verdict
        counts[1] += 1
    labelled = sum(total for _, total in wrong.values())
    return {"wrong_label_share": sum(bad for bad, _ in wrong.values()) / labelled if labelled else None,
            "per_subset": {subset: bad / total for subset, (bad, total) in sorted(wrong.items())},
            "both_wrong_pairs": both_wrong}


# ----------------------------------------------------------------------------------------------------
# Runs through cli.py


def run_args(out: Path, name: str) -> list[str]:
    return [f"--trainer.logger.init_args.save_dir={out / 'runs'}", f"--trainer.logger.init_args.name={name}",
            f"--checkpoint.dirpath={out / 'runs' / name / 'checkpoints'}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]


def validation_scores(metrics: dict[str, Any], val_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """RewardBench categories and overall of the validation set, from the per-subset accuracies a fit logs."""
    from collections import Counter

    from datamodules.rewardbench import category_scores, subset_weights

    sizes = dict(Counter(row["subset"] for row in val_rows))
    accuracy = {subset: metrics[f"val/accuracy/{subset}"] for subset in sorted(sizes)}
    scores = category_scores(accuracy, subset_weights(sizes))
    return {"accuracy": metrics["val/accuracy"], "per_subset": accuracy, "categories": scores["categories"],
            "overall": scores["overall"]}


def fit_and_test(out: Path, name: str, train_file: Path, data: dict[str, Any], args) -> dict[str, Any]:
    """Fit for ``args.steps`` (or ``judge_steps``) on ``train_file``, validate once at the end, then test the
    final weights on the evaluation set with RewardBench category scores."""
    import cli

    steps = args.judge_steps if name == "judge" else args.steps
    started = time.time()
    result = cli.main([
        "fit", "--config", BASE_CONFIG, *run_args(out, name),
        f"--model.init_args.model={args.model}", f"--data.init_args.train_file={train_file}",
        f"--data.init_args.val_file={data['val_file']}", f"--data.init_args.test_file={data['eval_file']}",
        "--data.init_args.invalid_rows=drop", f"--data.init_args.batch_size={args.batch_size}",
        f"--data.init_args.group_by_length={args.group_by_length}", f"--model.init_args.length_chunks={args.length_chunks}",
        f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}", "--checkpoint.monitor=null",
        "--checkpoint.filename=final", f"--checkpoint.every_n_train_steps={steps}",
        "--export.dirpath=null", "--test_after_fit=true", f"--seed_everything={args.seed}",
        "--trainer.callbacks+=callbacks.rewardbench.RewardBenchScores",
    ])
    log_dir = Path(result.trainer.log_dir)
    summary = json.loads((log_dir / "summary.json").read_text())
    rewardbench = json.loads((log_dir / "rewardbench.json").read_text())
    fit, test = summary["stages"]["fit"], summary["stages"]["test"]["metrics"]
    return {
        "train_file": str(train_file), "train_pairs": fit["data"]["rows"]["train"],
        "dropped_when_loading": fit["data"].get("dropped", {}), "steps": fit["global_step"],
        "epochs": round(fit["global_step"] * args.batch_size / fit["data"]["rows"]["train"], 2),
        "seconds": round(time.time() - started, 1), "final_train_loss": fit["metrics"].get("train/loss"),
        "validation": validation_scores(fit["metrics"], data["val"]),
        "accuracy": test["test/accuracy"],
        "per_subset": {subset: entry["accuracy"] for subset, entry in rewardbench["subsets"].items()},
        "categories": rewardbench["categories"], "overall": rewardbench["overall"],
        "checkpoint": summary["stages"]["test"]["checkpoint"],
    }


def one_thread_per_worker() -> None:
    """Runs share the cores: one torch thread per process, as more threads than free cores make OpenMP spin."""
    import torch

    torch.set_num_threads(1)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes."""
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def test_checkpoint(out: Path, name: str, checkpoint: str, data: dict[str, Any]) -> dict[str, Any]:
    """An existing reward model (a RewardModel checkpoint) as the judge: its validation and held-out scores."""
    import cli

    scores = {}
    for stage, split_file in (("validate", data["val_file"]), ("test", data["eval_file"])):
        result = cli.main([stage, "--config", BASE_CONFIG, *run_args(out, f"{name}_{stage}"), f"--ckpt_path={checkpoint}",
                           f"--data.init_args.val_file={data['val_file']}", f"--data.init_args.test_file={split_file}",
                           "--trainer.callbacks+=callbacks.rewardbench.RewardBenchScores"])
        log_dir = Path(result.trainer.log_dir)
        scores[stage] = json.loads((log_dir / "summary.json").read_text())["stages"][stage]["metrics"]
        if stage == "test":
            rewardbench = json.loads((log_dir / "rewardbench.json").read_text())
    return {"checkpoint": checkpoint, "train_pairs": None, "steps": None, "epochs": None,
            "validation": validation_scores(scores["validate"], data["val"]), "accuracy": scores["test"]["test/accuracy"],
            "per_subset": {subset: entry["accuracy"] for subset, entry in rewardbench["subsets"].items()},
            "categories": rewardbench["categories"], "overall": rewardbench["overall"]}


def score_pool(out: Path, pool_file: Path, checkpoint: str, args) -> dict[str, Any]:
    import cli

    scored = out / "pool.scored.jsonl"
    cli.main(["predict", "--config", SCORE_CONFIG, *run_args(out, "score"), f"--model.init_args.model={args.model}",
              f"--model.init_args.checkpoint={checkpoint}", f"--data.init_args.input_file={pool_file}",
              f"--model.init_args.output_file={scored}", "--model.init_args.score_prefix=judge",
              "--data.init_args.max_length=128"])
    return json.loads(Path(f"{scored}.report.json").read_text())


def judge_accuracy_per_task(judge: dict[str, Any], val_rows: list[dict[str, Any]]) -> dict[str, float]:
    """The judge's validation accuracy per task (pairs-weighted over the validation subsets of each task)."""
    pairs: dict[str, int] = {}
    correct: dict[str, float] = {}
    for row in val_rows:
        task = task_of(row["prompt"])
        pairs[task] = pairs.get(task, 0) + 1
        correct[task] = correct.get(task, 0.0) + judge["validation"]["per_subset"][row["subset"]]
    return {task: correct[task] / pairs[task] for task in sorted(pairs)}


def filter_steps(eval_files: list[Path], checked_tasks: list[str] | None) -> list:
    """The stages before score-based selection; the consistency filter checks only ``checked_tasks``."""
    from datamodules.curation import ConsistencyFilter, Decontaminate, Deduplicate, DropInvalid

    gate = {} if checked_tasks is None else {"category_field": "task", "categories": checked_tasks}
    return [DropInvalid(), Deduplicate(normalize_whitespace=True),
            # the evaluation prompts are two-word formulas ("Compute 1+7-8+7."), specific enough to count
            # inside a longer prompt (the default, 4 words, is for everyday prompts such as RewardBench's)
            Decontaminate(eval_files=[str(path) for path in eval_files], ngram=8, min_short_prompt_words=2),
            ConsistencyFilter(sources=["crowd", "synthetic"], score_prefix="judge", **gate)]


def selection_step(name: str):
    """Score-based selection of a variant (None for ``none``); per-source offsets as in the paper."""
    from datamodules.curation import SelectByScore

    offsets = {"crowd": -0.05, "synthetic": -0.1}
    if name == "paper":
        return SelectByScore(fractions={"math": TASK_FRACTION, "code": 0.3, "other": 0.1}, score_prefix="judge",
                             source_offsets=offsets)
    if name in ("task_mean", "task_chosen"):
        fractions = {task: TASK_FRACTION for task in ("arithmetic", "divide-by-zero", "divide-by-one")}
        return SelectByScore(fractions=fractions, category_field="task", score_prefix="judge", source_offsets=offsets,
                             prompt_score=name.removeprefix("task_"))
    if name == "none":
        return None
    raise SystemExit(f"unknown selection {name!r}; choose from {SELECTIONS}")


# ----------------------------------------------------------------------------------------------------
# Report


def subset_table(runs: list[tuple[str, dict[str, Any]]], key: str | None = None) -> list[str]:
    """One row per run: pairs, epochs, accuracy, per-subset accuracy, categories, overall."""
    first = runs[0][1] if key is None else runs[0][1][key]
    subsets, categories = list(first["per_subset"]), list(first["categories"])
    lines = ["| training data | pairs | epochs | accuracy | " + " | ".join(subsets) + " | "
             + " | ".join(categories) + " | overall |", "|---" * (5 + len(subsets) + len(categories)) + "|"]
    for name, run in runs:
        scores = run if key is None else run[key]
        lines.append(f"| {name} | {run['train_pairs']} | {run['epochs']} | {scores['accuracy']:.3f} | "
                     + " | ".join(f"{scores['per_subset'][s]:.3f}" for s in subsets) + " | "
                     + " | ".join(f"{scores['categories'].get(c, float('nan')):.3f}" for c in categories)
                     + f" | {scores['overall']:.3f} |")
    return lines


def batching(settings: dict[str, Any]) -> str:
    """How the runs' batches were drawn and passed, as a phrase for the results' header."""
    chunks = settings.get("length_chunks", 1)
    return ((" (batches grouped by length)" if settings.get("group_by_length") else " (uniform batches)")
            + (f", each batch in {chunks} passes of similar length" if chunks > 1 else ""))


def markdown(results: dict[str, Any]) -> str:
    from datamodules.curation import report_table

    runs, settings, chosen = results["runs"], results["settings"], results["chosen_selection"]
    arms = [("raw pool", runs["raw"])] + [(f"curated, selection {name}" + (" (chosen)" if name == chosen else ""),
                                           runs[f"curated_{name}"]) for name in settings["selections"]]
    if "raw_labels_corrected" in runs:
        arms.insert(1, (ORACLE_ARM, runs["raw_labels_corrected"]))
    judge = runs["judge"]
    lines = [f"# Reward-data curation on the embedded arithmetic task ({results['date']})", "",
             f"Model `{settings['model']}`, {settings['steps']} steps of batch {settings['batch_size']} for every "
             f"run{batching(settings)}, seed {settings['seed']}; CPU load average at start/end: {results['load_average']['start']} / "
             f"{results['load_average']['end']}; total {results['seconds']:.0f} s of wall time, "
             f"{results['cpu_seconds']:.0f} s of CPU time ({results.get('workers', 1)} runs at a time, one torch thread "
             "each).", "",
             f"## Held-out evaluation: raw pool vs curated (selection `{chosen}`, chosen on validation)", "",
             *subset_table([("raw pool", runs["raw"]), (f"curated ({chosen})", runs[f"curated_{chosen}"])]), "",
             "## Every arm: held-out evaluation", "", *subset_table(arms), "",
             "## Every arm: validation (chooses the selection)", "", *subset_table(arms, "validation"), "",
             (f"Judge: the existing reward model `{settings['judge_checkpoint']}`" if settings["judge_checkpoint"] else
              f"Judge: `{settings['model']}` trained on the trusted source, {judge['train_pairs']} pairs, {judge['steps']} "
              f"steps") + f"; held-out accuracy {judge['accuracy']:.3f}, overall {judge['overall']:.3f}; per subset "
             + ", ".join(f"{k} {v:.3f}" for k, v in judge["per_subset"].items()) + ". Validation accuracy per task: "
             + ", ".join(f"{k} {v:.3f}" for k, v in results["judge_validation_accuracy_per_task"].items())
             + f"; the consistency filter checks {results['consistency_checked_tasks'] or 'every task'} "
             f"(trust threshold {settings['judge_trust']}).", "",
             "## Pool", "", "| part | rows |", "|---|---|"]
    lines += [f"| {part} | {count} |" for part, count in results["composition"].items()]
    lines += ["", "## What each curation step removed (filters, then the chosen selection)", "",
              report_table(results["curation"][chosen]), "",
              f"Scoring: {results['scoring']['scored_rows']} of {results['scoring']['input_rows']} pairs scored "
              f"(unscored: {results['scoring']['unscored_by_reason'] or 'none'}); the judge ranks "
              f"{results['scoring']['accuracy_on_labels']:.3f} of the pool's labels correct.", "",
              "## Wrong labels (checked against the generator's answers)", "",
              "| data | wrong labels | " + " | ".join(results["selection_input_per_subset"]) + " |",
              "|---" * (2 + len(results["selection_input_per_subset"])) + "|"]
    for name, quality in results["label_quality"].items():
        lines.append(f"| {name} | {quality['wrong_label_share']:.3f} | " + " | ".join(
            f"{quality['both_wrong_pairs']} pairs" if subset == "both-wrong" else f"{quality['per_subset'].get(subset, float('nan')):.2f}"
            for subset in results["selection_input_per_subset"]) + " |")
    lines += ["", "## What each selection variant kept, per subset (pairs in -> kept)", "",
              "| selection | " + " | ".join(results["selection_input_per_subset"]) + " |",
              "|---" * (1 + len(results["selection_input_per_subset"])) + "|"]
    for name, kept in results["selection_kept_per_subset"].items():
        lines.append(f"| {name} | " + " | ".join(f"{count} -> {kept.get(subset, 0)}" for subset, count
                                                 in results["selection_input_per_subset"].items()) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "curation"))
    parser.add_argument("--model", default="tiny-sft",
                        help="backbone of every reward model (judge and arms), bt.yaml's; built once, on first use, "
                             "by an 800-step SFT run that the recipe's time budget does not include")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of the raw and every curated run")
    parser.add_argument("--judge-steps", type=int, default=100, help="optimizer steps of the judge")
    parser.add_argument("--judge-checkpoint", default=None,
                        help="an existing reward model (RewardModel checkpoint, e.g. bt.yaml's best.ckpt) as the judge, "
                             "as Skywork scored its pool with strong reward models; default: train one on the trusted source")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--group-by-length", action="store_true",
                        help="batches of pairs of similar length (the data's group_by_length) in every run: other "
                             "batches, no faster than the length chunks, and here length follows the task, so each "
                             "batch holds one task and the minority task is learned worse (README)")
    parser.add_argument("--length-chunks", type=int, default=4,
                        help="each batch through the model in this many passes over pairs' rows of similar length "
                             "(RewardModel.length_chunks): the same batches, less padding")
    parser.add_argument("--pool-scale", type=float, default=1.0, help="multiplies every part of the pool")
    parser.add_argument("--flip-fraction", type=float, default=0.3, help="crowd labels flipped at random")
    parser.add_argument("--benign-refusal-share", type=float, default=BENIGN_REFUSAL_SHARE,
                        help="share of the crowd's respond-benign pairs (divide by one) labelled with the refusal "
                             "preferred: a systematic annotator bias, unlike the random flips (0: random flips only)")
    parser.add_argument("--oracle", action="store_true",
                        help="also train on the raw pool with every wrong label corrected: how much label noise "
                             "costs at all, the most any label cleaning could win (one more run, 2-3 minutes)")
    parser.add_argument("--selections", default=",".join(SELECTIONS),
                        help=f"comma-separated selection variants to train and compare on validation: {SELECTIONS}")
    parser.add_argument("--judge-trust", type=float, default=0.8,
                        help="the consistency filter checks only the tasks where the judge's validation accuracy "
                             "reaches this (a judge near or below chance removes correct labels as often as flipped "
                             "ones); a negative value checks every task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=lambda text: distinct_values(text, int, "--seeds"), default=None,
                        help="comma-separated seeds: the whole recipe once per seed into <out>/seed<S>, and a summary "
                             "over seeds (seeds.md, seeds.json) in <out>")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="reward-model runs trained at the same time, in separate processes with one torch thread "
                             "each (the raw run beside the judge, then the curated variants); 1 runs them in turn")
    args = parser.parse_args(argv)
    for name in ("workers", "length_chunks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("flip_fraction", "benign_refusal_share"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must lie in [0, 1]")
    if args.judge_trust is not None and args.judge_trust < 0:
        args.judge_trust = None
    args.selections = [name.strip() for name in args.selections.split(",") if name.strip()]
    for name in args.selections:
        selection_step(name)  # unknown names fail before any work
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.seeds is not None:
        return run_seeds(args, args.seeds)
    return run(args)


# where the results go and how fast they come, not what they are
SETTINGS_NOT_COMPARED = ("out", "seed", "seeds", "workers")


def settings_differences(stored: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The settings in which a finished seed's ``results.json`` differs from this command's (a setting
    it does not record counts as different: it was made before that setting existed)."""
    missing = object()
    differences = []
    for name, value in vars(args).items():
        recorded = stored.get(name, missing)
        if name not in SETTINGS_NOT_COMPARED and recorded != value:
            differences.append(f"{name} {'not recorded' if recorded is missing else recorded} (now {value})")
    return differences


def run_seeds(args: argparse.Namespace, seeds: list[int]) -> dict[str, Any]:
    """The recipe once per seed, then the raw-against-curated comparison over seeds."""
    out = Path(args.out)
    per_seed = {}
    for seed in seeds:
        folder = out / f"seed{seed}"
        if (folder / "results.json").exists():
            print(f"[seed {seed}] reading {folder / 'results.json'}", flush=True)
            per_seed[seed] = json.loads((folder / "results.json").read_text())
            differences = settings_differences(per_seed[seed].get("settings", {}), args)
            if differences:  # a finished run is never overwritten, nor mixed into a summary of other settings
                raise SystemExit(f"{folder / 'results.json'} was made with other settings: {'; '.join(differences)}. "
                                 f"Use another --out, or move that folder away to rerun the seed.")
        else:
            print(f"[seed {seed}] running into {folder}", flush=True)
            per_seed[seed] = run(argparse.Namespace(**{**vars(args), "seed": seed, "out": str(folder), "seeds": None}))
    summary = seeds_summary(per_seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(summary, indent=1))
    text = seeds_markdown(summary)
    (out / "seeds.md").write_text(text)
    print("\n" + text)
    return summary


SEED_SUMMARY_KEYS = ("raw_accuracy", "curated_accuracy", "difference", "overall_difference")  # mean ± sd over seeds


def seeds_summary(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per seed: held-out accuracy and RewardBench overall of the raw pool and of the curated variant chosen on
    validation, and the wrong-label share of their training data; then mean and sample sd over seeds."""
    rows = []
    for seed, results in per_seed.items():
        chosen = results["chosen_selection"]
        raw, curated = results["runs"]["raw"], results["runs"][f"curated_{chosen}"]
        quality = results["label_quality"]
        curated_quality = quality.get(f"selection {chosen}", quality["after the filters"])
        rows.append({"seed": seed, "chosen_selection": chosen, "raw_accuracy": raw["accuracy"],
                     "curated_accuracy": curated["accuracy"], "difference": curated["accuracy"] - raw["accuracy"],
                     "raw_overall": raw["overall"], "curated_overall": curated["overall"],
                     "overall_difference": curated["overall"] - raw["overall"], "curated_pairs": curated["train_pairs"],
                     "raw_pairs": raw["train_pairs"], "raw_wrong_labels": quality["raw pool"]["wrong_label_share"],
                     "curated_wrong_labels": curated_quality["wrong_label_share"],
                     "corrected_accuracy": results["runs"].get("raw_labels_corrected", {}).get("accuracy")})

    summary = {"seeds": rows, "curated_ahead": sum(row["difference"] > 0 for row in rows),
               "curated_behind": sum(row["difference"] < 0 for row in rows),
               **{key: mean_sd([row[key] for row in rows]) for key in SEED_SUMMARY_KEYS}}
    if all(row["corrected_accuracy"] is not None for row in rows):  # runs made with --oracle
        summary["corrected_accuracy"] = mean_sd([row["corrected_accuracy"] for row in rows])
    return summary


def seeds_markdown(summary: dict[str, Any]) -> str:
    def share(value: float | None) -> str:  # None: no pair with a checkable answer
        return "-" if value is None else f"{value:.1%}"

    lines = ["# Raw pool against the curated set, over seeds (held-out evaluation)", "",
             "| seed | selection | raw accuracy | curated accuracy | difference | RewardBench overall, raw / curated "
             "| pairs, raw / curated | wrong labels, raw -> curated | raw, labels corrected |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in summary["seeds"]:
        corrected = "-" if row["corrected_accuracy"] is None else f"{row['corrected_accuracy']:.3f}"
        lines.append(f"| {row['seed']} | {row['chosen_selection']} | {row['raw_accuracy']:.3f} | "
                     f"{row['curated_accuracy']:.3f} | {row['difference']:+.3f} | {row['raw_overall']:.3f} / "
                     f"{row['curated_overall']:.3f} | {row['raw_pairs']} / {row['curated_pairs']} | "
                     f"{share(row['raw_wrong_labels'])} -> {share(row['curated_wrong_labels'])} | {corrected} |")
    mean = {key: summary[key] for key in SEED_SUMMARY_KEYS}
    corrected = summary.get("corrected_accuracy")
    lines.append(f"| mean ± sd | | {mean['raw_accuracy']['mean']:.3f} ± {mean['raw_accuracy']['sd']:.3f} | "
                 f"{mean['curated_accuracy']['mean']:.3f} ± {mean['curated_accuracy']['sd']:.3f} | "
                 f"{mean['difference']['mean']:+.3f} ± {mean['difference']['sd']:.3f} | "
                 f"{mean['overall_difference']['mean']:+.3f} (difference) | | | "
                 + ("-" if corrected is None else f"{corrected['mean']:.3f} ± {corrected['sd']:.3f}") + " |")
    lines += ["", f"Curated ahead in {summary['curated_ahead']} of {len(summary['seeds'])} seeds, behind in "
                  f"{summary['curated_behind']}."]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import multiprocessing
    from collections import Counter
    from concurrent.futures import ProcessPoolExecutor

    from datamodules.common import read_rows
    from datamodules.curation import run_pipeline, run_step, write_json, write_rows

    started, cpu_started, load_start = time.time(), cpu_seconds(), os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(args.pool_scale, args.flip_fraction, args.seed, args.benign_refusal_share)
    pool_file, trusted_file = out / "pool.jsonl", out / "trusted.jsonl"
    corrected_file = out / "pool.labels_corrected.jsonl"
    data["eval_file"], data["val_file"] = out / "eval.jsonl", out / "val.jsonl"
    write_rows(pool_file, data["pool"])
    write_rows(data["eval_file"], data["eval"])
    write_rows(data["val_file"], data["val"])
    write_rows(trusted_file, data["trusted"])
    if args.oracle:
        write_rows(corrected_file, corrected_labels(data["pool"]))

    # Every run is seeded on its own, so running them side by side changes their timing, not their results.
    import torch

    threads = torch.get_num_threads()
    one_thread_per_worker()
    pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=one_thread_per_worker)
    baselines = {"raw": pool_file, **({"raw_labels_corrected": corrected_file} if args.oracle else {})}

    def submit_baselines() -> dict[str, Any]:
        return {name: pool.submit(fit_and_test, out, name, train_file, data, args) for name, train_file in baselines.items()}

    try:
        # the raw pool (and its corrected copy) need no judge: with a second worker they train beside the judge
        baseline_runs = submit_baselines() if args.workers > 1 else {}
        if args.judge_checkpoint:
            runs: dict[str, Any] = {"judge": test_checkpoint(out, "judge", args.judge_checkpoint, data)}
        else:
            runs = {"judge": fit_and_test(out, "judge", trusted_file, data, args)}
        scoring = score_pool(out, pool_file, runs["judge"]["checkpoint"], args)
        judge_per_task = judge_accuracy_per_task(runs["judge"], data["val"])
        checked_tasks = (None if args.judge_trust is None else
                         [task for task, accuracy in judge_per_task.items() if accuracy >= args.judge_trust])
        filtered = run_pipeline(str(out / "pool.scored.jsonl"), str(out / "curated"),
                                filter_steps([data["eval_file"], data["val_file"]], checked_tasks))
        filtered_file = Path(filtered["output_file"])
        selection_input = dict(sorted(Counter(row["subset"] for row in read_rows(str(filtered_file))).items()))
        curation, kept_per_subset, train_files = {}, {}, {}
        for name in args.selections:
            step = selection_step(name)
            if step is None:
                curation[name], train_files[name] = filtered, filtered_file
                kept_per_subset[name] = selection_input
                continue
            selected = out / "curated" / f"select_{name}.jsonl"
            report = run_step(step, str(filtered_file), str(selected))
            curation[name] = {**filtered, "steps": filtered["steps"] + [report], "output_file": str(selected),
                              "output_rows": report["kept_rows"],
                              "sources": {source: {"input": counts["input"], "output": report["by_source"].get(
                                  source, {"kept": 0})["kept"]} for source, counts in filtered["sources"].items()}}
            kept_per_subset[name] = {subset: entry["kept"] for subset, entry in report["details"]["per_subset"].items()}
            train_files[name] = selected

        quality = {"raw pool": label_quality(pool_file),
                   **({"raw pool, labels corrected": label_quality(corrected_file)} if args.oracle else {}),
                   "after the filters": label_quality(filtered_file),
                   **{f"selection {name}": label_quality(train_files[name]) for name in args.selections if name != "none"}}
        baseline_runs = baseline_runs or submit_baselines()
        curated_runs = {f"curated_{name}": pool.submit(fit_and_test, out, f"curated_{name}", train_files[name], data, args)
                        for name in args.selections}
        for name, run in {**baseline_runs, **curated_runs}.items():
            runs[name] = run.result()
    finally:
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(threads)
    chosen = max(args.selections, key=lambda name: (runs[f"curated_{name}"]["validation"]["overall"],
                                                    runs[f"curated_{name}"]["validation"]["accuracy"]))

    results = {
        "date": time.strftime("%Y-%m-%d"), "settings": vars(args), "composition": data["composition"],
        "scoring": {key: scoring[key] for key in ("input_rows", "scored_rows", "unscored_by_reason",
                                                  "accuracy_on_labels", "by_source")},
        "judge_validation_accuracy_per_task": judge_per_task, "consistency_checked_tasks": checked_tasks,
        "curation": curation, "chosen_selection": chosen, "selection_input_per_subset": selection_input,
        "selection_kept_per_subset": kept_per_subset, "label_quality": quality, "runs": runs, "seconds": time.time() - started,
        "cpu_seconds": cpu_seconds() - cpu_started, "workers": args.workers,
        "load_average": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
    }
    write_json(out / "results.json", results)
    text = markdown(results)
    (out / "results.md").write_text(text)
    print("\n" + text)
    return results


if __name__ == "__main__":
    main()
