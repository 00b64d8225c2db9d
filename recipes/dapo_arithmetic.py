"""DAPO end to end on the embedded arithmetic task, every stage an ordinary ``cli.py`` run.

0. SFT the tiny preset, validating every 50 steps until the validation accuracy reaches 50%, and keep the
   checkpoint whose validation accuracy is nearest 50%: a clearly imperfect policy (or ``--policy PATH``:
   any causal LM);
1. rollouts (predict), 2. critic (fit + export), 3. advantages (predict), 4. actor (fit + export),
5. greedy pass@1 on the 500 held-out problems (the SFT test split) for every policy;
plus the rejection-sampling fine-tuning (RFT) baseline: SFT of the same policy on the correct responses
of the same stage-1 rollouts, and optionally a second DAPO round (the round-1 actor becomes generator,
completer and pi_ref; the critic warm-starts from round 1's; fresh problems).

Prints a table and writes ``<out>/results.md`` and ``<out>/results.json`` (accuracies with 95% intervals,
dataset and critic/actor metrics, wall time per stage, the machine's load average). A stage done earlier
with the same command is skipped, so an interrupted recipe continues where it stopped; one whose command
changed (another seed, learning rate ...) is redone with everything after it (``--fresh`` starts over,
``--redo actor_round1`` reruns named stages and everything that depends on them).

    python recipes/dapo_arithmetic.py                  # 5 min on the shared 2-core CPU at load 1-2 (10 at load 2-4)
    python recipes/dapo_arithmetic.py --rounds 2       # +7 min
    python recipes/dapo_arithmetic.py --eval-split val  # tuning: evaluate on the SFT validation split
    python recipes/dapo_arithmetic.py --seeds 0,1,2    # stages 1-5 and RFT once per seed, one stage-0 policy

Every evaluation writes its per-problem answers (``test_generations.jsonl`` in its log folder), and the
results pair the policies on the same problems: problems won and lost, and the exact McNemar p-value.
With several ``--seeds``, stage 0 runs once and each seed (rollout sampling, critic and actor data order,
the critic's validation problems, RFT data order) gets ``<out>/seed<S>/`` with its own results; the
top-level results add a row per seed and the mean and spread of the differences over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from recipes.common import distinct_values, mean_sd  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/dapo")
    p.add_argument("--policy", default=None, help="skip stage 0 and use this policy (folder or hub name)")
    p.add_argument("--sft-steps", type=int, default=450, help="stage 0 schedule length (cosine decay over it)")
    p.add_argument("--sft-val-every", type=int, default=50, help="stage 0 validation (and checkpoint) interval")
    p.add_argument("--sft-target-accuracy", type=float, default=0.5,
                   help="stage 0 keeps the checkpoint whose validation accuracy is nearest this: a clearly "
                        "imperfect policy whatever the machine's numerics")
    p.add_argument("--seeds", type=lambda text: distinct_values(text, int, "--seeds"), default=[0],
                   help="comma-separated seeds of everything after stage 0 (one: <out> itself; several: <out>/seed<S>)")
    p.add_argument("--rounds", type=int, default=1, choices=(1, 2))
    p.add_argument("--problems", type=int, default=256, help="rollout problems per round")
    p.add_argument("--n1", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--critic-epochs", type=int, default=4)
    p.add_argument("--critic-lr", type=float, default=5e-4)
    # beta, actor and RFT learning rates: chosen on the validation split (--eval-split val), see the README
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--min-gap", type=float, default=0.1)
    p.add_argument("--q-estimator", default="critic", choices=("critic", "monte_carlo"),
                   help="Q of a non-terminal step: the critic (DAPO) or, as an ablation, the rollouts' Monte-Carlo "
                        "estimate (on an existing --out add --redo advantages_round1)")
    p.add_argument("--actor-lr", type=float, default=3e-5)
    p.add_argument("--actor-epochs", type=int, default=2)
    p.add_argument("--actor-batch-states", type=int, default=8)
    p.add_argument("--rft-lr", type=float, default=1e-5)
    p.add_argument("--rft-epochs", type=int, default=2)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--eval-split", default="test", choices=("test", "val"),
                   help="evaluate every policy on the SFT test split (report) or its validation split (tuning)")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    p.add_argument("--redo", default="", help="comma-separated stage names to rerun (with their dependants)")
    p.add_argument("--only-dapo", action="store_true", help="skip the RFT baseline")
    p.add_argument("--sft-only", action="store_true", help="stop after stage 0 and its evaluation (to calibrate --sft-steps)")
    return p.parse_args(argv)


class Recipe:
    def __init__(self, args):
        self.args = args
        self.out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
        self.python = sys.executable
        self.timings: dict[str, dict] = {}
        self.redo = {s for s in args.redo.split(",") if s}
        self.seed = args.seeds[0]
        self.policy_deps: tuple[str, ...] = ()  # the stages behind --policy, when a multi-seed run passes its own
        # each results label's evaluation stage (its per-problem answers are read for the paired comparisons)
        self.evaluation_names = {"SFT policy (stage 0)": "sft", "DAPO round 1": "dapo_round1",
                                 "DAPO round 2": "dapo_round2", "RFT baseline (round-1 rollouts)": "rft"}

    # -- running stages ------------------------------------------------------------------------------
    def done_marker(self, name: str) -> Path:
        return self.out / "stages" / f"{name}.json"

    def stage(self, name: str, command: list[str], depends: tuple[str, ...] = (), outputs: tuple[Path, ...] = (),
              resumable: bool = False) -> dict:
        """Run one CLI command unless its marker exists with the same command (and neither it nor a dependency
        is redone); a marker recording other arguments (another seed, learning rate ...) redoes the stage.

        ``outputs`` (files or folders) are deleted before a run, so a rerun does not pick up what an earlier
        run left (Lightning would version a second ``last.ckpt``); for a ``resumable`` stage (the predict
        stages, which skip rows already written) only when the stage is redone, so an interrupted one
        continues."""
        marker = self.done_marker(name)
        arguments = command[1:]  # the interpreter's path aside: the same settings on another machine match
        if any(d in self.redo for d in depends):
            self.redo.add(name)
        if marker.exists() and name not in self.redo:
            record = json.loads(marker.read_text())
            # markers written before commands were recorded have none and match anything
            if record.get("arguments", arguments) == arguments:
                print(f"[skip] {name}: done earlier ({record['seconds']:.0f} s)", flush=True)
                self.timings[name] = record
                return record
            print(f"[redo] {name}: its settings differ from the recorded run's", flush=True)
            self.redo.add(name)  # and so everything that depends on it
        for output in outputs if not resumable or name in self.redo else ():
            if output.is_dir():
                shutil.rmtree(output)
            elif output.exists():
                output.unlink()
        log = self.out / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        load_before = os.getloadavg()[0]
        print(f"[run ] {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        with open(log, "w") as handle:
            result = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            tail = log.read_text()[-3000:]
            raise SystemExit(f"stage {name} failed (exit {result.returncode}); log {log}:\n{tail}")
        record = {"seconds": seconds, "load_before": load_before, "load_after": os.getloadavg()[0], "log": str(log),
                  "arguments": arguments}
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(record))
        self.timings[name] = record
        print(f"[done] {name}: {seconds:.0f} s", flush=True)
        return record

    def cli(self, subcommand: str, config: str, log_name: str, *overrides: str, checkpoint: bool = False,
            export: Path | None = None) -> list[str]:
        """A ``cli.py`` command writing under ``--out`` only. A fit exports its best (else last) checkpoint to
        ``export``, or nothing (never to the config's default folder, which another run may own)."""
        command = [self.python, "cli.py", subcommand, "--config", config,
                   f"--trainer.logger.init_args.save_dir={self.out / 'logs'}",
                   f"--trainer.logger.init_args.name={log_name}", "--trainer.logger.init_args.version=0",
                   "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
        if checkpoint:
            command.append(f"--checkpoint.dirpath={self.out / log_name / 'checkpoints'}")
        if subcommand == "fit":
            command.append(f"--export.dirpath={export if export is not None else 'null'}")
        if subcommand == "predict":
            command += ["--return_predictions", "false"]
        return command + list(overrides)

    def seed_overrides(self, holder: str) -> list[str]:
        """The run's seed for a stage after stage 0: Lightning's, and the sampling seed of the rollout module or
        the data order (and validation split) seed of the data module. Seed 0 repeats the configs' own."""
        return [f"--seed_everything={self.seed}", f"--{holder}.init_args.seed={self.seed}"]

    def export(self, name: str, checkpoint: Path, target: Path, depends: tuple[str, ...]) -> Path:
        self.stage(name, [self.python, "cli.py", "export", str(checkpoint), str(target)], depends, (target,))
        return target

    @staticmethod
    def dataset_files(output: Path) -> tuple[Path, ...]:
        """A predict stage's merged file, shards and report."""
        return (output, output.with_name(output.stem + ".shards"), output.with_name(output.stem + ".report.json"))

    @staticmethod
    def closest_checkpoint(folder: Path, target: float) -> tuple[Path, float]:
        """The ``sft-<step>-<val accuracy>.ckpt`` whose accuracy is nearest ``target`` (earliest on ties)."""
        found = []
        for path in folder.glob("sft-*-*.ckpt"):
            _, step, accuracy = path.stem.split("-")
            found.append((abs(float(accuracy) - target), int(step), path, float(accuracy)))
        if not found:
            raise SystemExit(f"no validated SFT checkpoint in {folder}")
        _, _, path, accuracy = min(found)
        return path, accuracy

    def log_folder(self, log_name: str) -> Path:
        return self.out / "logs" / log_name / "version_0"

    def summary(self, log_name: str) -> dict:
        path = self.log_folder(log_name) / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def evaluation_name(self, name: str) -> str:
        # an evaluation of another split is its own stage: a test evaluation already done is not reused
        return name if self.args.eval_split == "test" else f"{name}_{self.args.eval_split}"

    def metrics(self, log_name: str, stage: str) -> dict:
        return self.summary(log_name).get("stages", {}).get(stage, {}).get("metrics", {})

    def evaluate(self, name: str, policy: Path | str, depends: tuple[str, ...]) -> float:
        name = self.evaluation_name(name)
        log_name = f"eval/{name}"
        self.stage(f"eval_{name}", self.cli("test", "configs/dapo/evaluate.yaml", log_name,
                                            f"--model.init_args.model={policy}",
                                            f"--data.init_args.test_size={self.args.test_size}",
                                            f"--data.init_args.eval_split={self.args.eval_split}"), depends)
        self.eval_problems = sum(self.summary(log_name)["stages"]["test"]["data"]["rows"].values())
        return self.metrics(log_name, "test")["test/accuracy"]

    # -- the method ----------------------------------------------------------------------------------
    def run(self) -> dict:
        args = self.args
        if args.fresh and self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        started, load_start = time.perf_counter(), os.getloadavg()
        results: dict = {"settings": vars(args), "policies": {}}

        # 0. the policy
        if args.policy:
            policy = args.policy
            sft_deps: tuple[str, ...] = self.policy_deps
        else:
            self.stage("sft", self.cli("fit", "configs/sft/arithmetic.yaml", "sft",
                                       f"--trainer.max_steps={args.sft_steps}",
                                       f"--trainer.val_check_interval={args.sft_val_every}",
                                       "--checkpoint.save_top_k=-1", "--checkpoint.auto_insert_metric_name=false",
                                       "--checkpoint.filename=sft-{step}-{val/accuracy:.4f}",
                                       # stop at the first validation at or above the target: later steps
                                       # could only give checkpoints farther from it
                                       "--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
                                       "--trainer.callbacks.monitor=val/accuracy", "--trainer.callbacks.mode=max",
                                       f"--trainer.callbacks.stopping_threshold={args.sft_target_accuracy}",
                                       "--trainer.callbacks.patience=1000000",
                                       "--test_after_fit=false", f"--data.init_args.test_size={args.test_size}",
                                       checkpoint=True), outputs=(self.out / "sft/checkpoints",))
            checkpoint, accuracy = self.closest_checkpoint(self.out / "sft/checkpoints", args.sft_target_accuracy)
            results["sft_checkpoint"] = {"path": str(checkpoint), "val_accuracy": accuracy}
            policy = str(self.export("sft_export", checkpoint, self.out / "sft/export", ("sft",)))
            sft_deps = ("sft_export",)
        results["policies"]["SFT policy (stage 0)"] = self.evaluate("sft", policy, sft_deps)
        results["policy"] = policy
        if args.sft_only:
            return self.finish(results, started, load_start)
        if len(args.seeds) > 1:
            return self.run_seeds(policy, sft_deps, results, started, load_start)
        results["seed"] = self.seed

        reference, reference_deps = policy, sft_deps
        critic_init, critic_deps = policy, sft_deps
        for round_index in range(1, args.rounds + 1):
            reference, reference_deps, critic_init, critic_deps = self.dapo_round(
                round_index, reference, reference_deps, critic_init, critic_deps, results)
            results["policies"][f"DAPO round {round_index}"] = self.evaluate(
                f"dapo_round{round_index}", reference, reference_deps)
            if round_index == 1 and not args.only_dapo:
                results["policies"]["RFT baseline (round-1 rollouts)"] = self.rft(policy, sft_deps)
        return self.finish(results, started, load_start)

    def run_seeds(self, policy: str, policy_deps: tuple[str, ...], results: dict, started: float, load_start) -> dict:
        """Stages 1-5 and RFT once per seed from the one stage-0 policy, each in ``<out>/seed<S>``."""
        per_seed = {}
        for seed in self.args.seeds:
            print(f"[seed] {seed}", flush=True)
            sub = Recipe(argparse.Namespace(**{**vars(self.args), "out": str(self.out / f"seed{seed}"), "policy": policy,
                                               "seeds": [seed], "fresh": False}))
            # a redone stage 0 (or a stage named in --redo) redoes it in every seed; what one seed redoes because
            # its own settings changed stays in that seed
            sub.redo, sub.policy_deps = set(self.redo), policy_deps
            per_seed[seed] = sub.run()
        results["seeds"] = {seed: {"policies": r["policies"], "paired": r["paired"],
                                   "stage_seconds_total": r["stage_seconds_total"]} for seed, r in per_seed.items()}
        results["over_seeds"] = over_seeds(per_seed)
        return self.finish(results, started, load_start)

    def finish(self, results: dict, started: float, load_start) -> dict:
        results["wall_seconds"] = time.perf_counter() - started
        results["load_average_start"], results["load_average_end"] = load_start, os.getloadavg()
        results["stages"] = self.timings
        results["eval_split"], results["eval_problems"] = self.args.eval_split, self.eval_problems
        results["paired"] = self.paired(results["policies"])
        self.write(results)
        return results

    def generations(self, name: str) -> dict[str, bool]:
        """problem id -> correct, from an evaluation's per-problem file."""
        from modules.dapo import TEST_GENERATIONS_FILE

        path = self.log_folder(f"eval/{self.evaluation_name(name)}") / TEST_GENERATIONS_FILE
        if not path.exists():
            return {}
        from datamodules.dapo_data import read_jsonl

        return {row["problem_id"]: row["correct"] for row in read_jsonl(path)}

    def paired(self, policies: dict[str, float]) -> list[dict]:
        """Each later policy against the SFT policy, and DAPO round 1 against RFT, on the same problems."""
        answers = {label: self.generations(name) for label, name in self.evaluation_names.items() if label in policies}
        pairs = [(label, "SFT policy (stage 0)") for label in answers if label != "SFT policy (stage 0)"]
        if "RFT baseline (round-1 rollouts)" in answers and "DAPO round 1" in answers:
            pairs.append(("DAPO round 1", "RFT baseline (round-1 rollouts)"))
        out = []
        for first, second in pairs:
            a, b = answers[first], answers[second]
            if not a or a.keys() != b.keys():  # evaluations written before per-problem files existed
                continue
            won = sum(a[key] and not b[key] for key in a)
            lost = sum(b[key] and not a[key] for key in a)
            out.append({"policy": first, "against": second, "won": won, "lost": lost,
                        "difference": (won - lost) / len(a), "p_value": mcnemar_exact(won, lost)})
        return out

    def dapo_round(self, r: int, policy: str, policy_deps, critic_init: str, critic_deps, results: dict):
        args, base = self.args, self.out / f"round{r}"
        rollouts, advantages = base / "rollouts.jsonl", base / "advantages.jsonl"
        tag = f"round{r}"
        # 1. rollouts: fresh problems each round
        self.stage(f"rollouts_{tag}", self.cli(
            "predict", "configs/dapo/rollouts.yaml", f"{tag}/rollouts",
            f"--trainer.callbacks.init_args.output={rollouts}", f"--model.init_args.model={policy}",
            f"--model.init_args.n1={args.n1}", f"--model.init_args.n={args.n}", f"--model.init_args.m={args.m}",
            f"--model.init_args.temperature={args.temperature}", f"--data.init_args.rollout_size={args.problems}",
            f"--data.init_args.rollout_offset={(r - 1) * args.problems}",
            # the splits are drawn in order (train, val, test, rollout): the rollout problems stay disjoint
            # from the evaluated test problems only if this run draws the same test split
            f"--data.init_args.test_size={args.test_size}", *self.seed_overrides("model")), policy_deps,
            self.dataset_files(rollouts), resumable=True)
        # 2. critic
        self.stage(f"critic_{tag}", self.cli(
            "fit", "configs/dapo/critic.yaml", f"{tag}/critic", f"--model.init_args.model={critic_init}",
            f"--data.init_args.data_file={rollouts}", f"--trainer.max_epochs={args.critic_epochs}",
            f"--model.init_args.optimizer.init_args.lr={args.critic_lr}", *self.seed_overrides("data"), checkpoint=True,
            export=base / "critic/export"), critic_deps + (f"rollouts_{tag}",),
            (base / "critic/checkpoints", base / "critic/export"))
        critic = base / "critic/export"  # the best checkpoint by validation BCE (the last without validation)
        # 3. advantages (+ cached pi_ref log-probs)
        self.stage(f"advantages_{tag}", self.cli(
            "predict", "configs/dapo/advantages.yaml", f"{tag}/advantages",
            f"--trainer.callbacks.init_args.output={advantages}", f"--model.init_args.critic={critic}",
            f"--model.init_args.reference={policy}", f"--model.init_args.min_gap={args.min_gap}",
            f"--model.init_args.q_estimator={args.q_estimator}",
            f"--data.init_args.data_file={rollouts}"), (f"critic_{tag}",), self.dataset_files(advantages),
            resumable=True)
        # 4. actor, initialised from pi_ref
        self.stage(f"actor_{tag}", self.cli(
            "fit", "configs/dapo/actor.yaml", f"{tag}/actor", f"--model.init_args.model={policy}",
            f"--model.init_args.beta={args.beta}", f"--model.init_args.optimizer.init_args.lr={args.actor_lr}",
            f"--data.init_args.data_file={advantages}", f"--data.init_args.min_gap={args.min_gap}",
            f"--data.init_args.batch_size={args.actor_batch_states}", f"--trainer.max_epochs={args.actor_epochs}",
            *self.seed_overrides("data"), checkpoint=True, export=base / "actor/export"), (f"advantages_{tag}",),
            (base / "actor/checkpoints", base / "actor/export"))
        actor = base / "actor/export"  # the last checkpoint (no monitored metric)
        results[tag] = {
            "rollouts": json.loads((base / "rollouts.report.json").read_text()),
            "advantages": json.loads((base / "advantages.report.json").read_text()),
            "critic": {k: v for k, v in self.metrics(f"{tag}/critic", "fit").items() if k.startswith("val/")},
            "actor": {k: v for k, v in self.metrics(f"{tag}/actor", "fit").items() if k.startswith(("train/", "val/"))},
        }
        return str(actor), (f"actor_{tag}",), str(critic), (f"critic_{tag}",)

    def rft(self, policy: str, policy_deps) -> float:
        from datamodules.dapo_data import read_rollouts, rejection_sampling_rows

        args, base = self.args, self.out / "rft"
        data = base / "rft.jsonl"
        base.mkdir(parents=True, exist_ok=True)
        rows = rejection_sampling_rows(read_rollouts(self.out / "round1/rollouts.jsonl"))
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        self.rft_rows = len(rows)
        if not rows:  # nothing to fine-tune on: the baseline is the policy itself
            print("[note] RFT: the rollouts hold no correct response; the baseline equals the policy", flush=True)
            self.evaluation_names["RFT baseline (round-1 rollouts)"] = "sft"
            return self.evaluate("sft", policy, policy_deps)
        self.stage("rft", self.cli("fit", "configs/dapo/rft.yaml", "rft", f"--model.init_args.model={policy}",
                                   f"--data.init_args.train_file={data}", f"--trainer.max_epochs={args.rft_epochs}",
                                   f"--model.init_args.optimizer.init_args.lr={args.rft_lr}",
                                   *self.seed_overrides("data"), checkpoint=True,
                                   export=base / "export"),
                   policy_deps + ("rollouts_round1",), (base / "checkpoints", base / "export"))
        return self.evaluate("rft", base / "export", ("rft",))

    # -- reporting -----------------------------------------------------------------------------------
    def write(self, results: dict) -> None:
        n = results["eval_problems"]
        base = results["policies"]["SFT policy (stage 0)"]
        lines = ["# DAPO on the embedded arithmetic task", "",
                 f"Greedy pass@1 on {n} held-out problems (the SFT {results['eval_split']} split); 95% Wilson "
                 "intervals.", "",
                 "| policy | accuracy | 95% interval | vs SFT |", "|---|---|---|---|"]
        rank = {"SFT": 0, "DAPO": 1, "RFT": 2}
        order = sorted(results["policies"], key=lambda name: (rank.get(name.split()[0], 3), name))
        results["policies"] = {name: results["policies"][name] for name in order}
        for name, accuracy in results["policies"].items():
            low, high = wilson(accuracy, n)
            lines.append(f"| {name} | {accuracy:.3f} | {low:.3f}-{high:.3f} | {accuracy - base:+.3f} |")
        if results["paired"]:
            lines += ["", "Paired on the same problems (problems only the first policy solved / only the second; "
                      "exact two-sided McNemar test):", "", "| policy | against | won | lost | difference | p |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {row['policy']} | {row['against']} | {row['won']} | {row['lost']} | {row['difference']:+.3f} "
                      f"| {row['p_value']:.3g} |" for row in results["paired"]]
        if "over_seeds" in results:
            lines += ["", seeds_markdown(results)]
        if hasattr(self, "rft_rows"):
            results["rft_training_rows"] = self.rft_rows
        results["stage_seconds_total"] = (sum(record["seconds"] for record in results["stages"].values())
                                          + sum(run["stage_seconds_total"] for run in results.get("seeds", {}).values()))
        lines += ["", f"Wall time: {results['stage_seconds_total'] / 60:.1f} min over all stages "
                  f"({results['wall_seconds'] / 60:.1f} min in this invocation; skipped stages count their "
                  f"earlier time{'; each seed has its own table in seed<S>/results.md' if 'seeds' in results else ''}). "
                  f"Load average (1 min) at start "
                  f"{results['load_average_start'][0]:.2f}, at end {results['load_average_end'][0]:.2f} "
                  f"on {os.cpu_count()} CPUs.", "", "| stage | seconds | load before | load after |", "|---|---|---|---|"]
        for name, record in results["stages"].items():
            lines.append(f"| {name} | {record['seconds']:.0f} | {record['load_before']:.2f} | {record['load_after']:.2f} |")
        for r in (1, 2):
            info = results.get(f"round{r}")
            if info:
                lines += ["", f"## Round {r}", "", "```json", json.dumps(info, indent=1), "```"]
        text = "\n".join(lines) + "\n"
        (self.out / "results.md").write_text(text)
        (self.out / "results.json").write_text(json.dumps(results, indent=2))
        print("\n" + text)


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    if n <= 0:
        return float("nan"), float("nan")
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(won: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: the discordant problems as a fair-coin binomial."""
    n = won + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(won, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def over_seeds(per_seed: dict[int, dict]) -> dict:
    """Mean and sample standard deviation over seeds of every policy's accuracy and every paired difference."""
    def spread(values: list[float]) -> dict:
        return {**mean_sd(values), "values": values}

    runs = list(per_seed.values())
    out = {"accuracy": {name: spread([r["policies"][name] for r in runs]) for name in runs[0]["policies"]}}
    out["difference"] = {}
    paired = [{f"{p['policy']} - {p['against']}": p for p in r["paired"]} for r in runs]
    for key in paired[0]:
        if all(key in run for run in paired):  # a pair some seed could not make is left out
            values = [run[key]["difference"] for run in paired]
            out["difference"][key] = {**spread(values), "p_values": [run[key]["p_value"] for run in paired],
                                      "seeds_ahead": sum(v > 0 for v in values),
                                      "seeds_behind": sum(v < 0 for v in values)}
    return out


def seeds_markdown(results: dict) -> str:
    seeds, summary = results["seeds"], results["over_seeds"]
    names = list(summary["accuracy"])
    lines = [f"Over {len(seeds)} seeds of stages 1-5 and RFT (one stage-0 policy): accuracy per seed, then the mean "
             "and sample standard deviation.", "", "| seed | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {seed} | " + " | ".join(f"{run['policies'][name]:.3f}" for name in names) + " |"
              for seed, run in seeds.items()]
    lines.append("| mean ± sd | " + " | ".join(f"{summary['accuracy'][name]['mean']:.3f} ± "
                                              f"{summary['accuracy'][name]['sd']:.3f}" for name in names) + " |")
    lines += ["", "| difference | mean ± sd over seeds | seeds ahead / behind | per seed (McNemar p) |", "|---|---|---|---|"]
    for key, value in summary["difference"].items():
        per_seed = ", ".join(f"{difference:+.3f} ({p:.2g})" for difference, p in zip(value["values"], value["p_values"]))
        lines.append(f"| {key} | {value['mean']:+.3f} ± {value['sd']:.3f} | {value['seeds_ahead']} / "
                     f"{value['seeds_behind']} | {per_seed} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    return Recipe(parse_args(argv)).run()


if __name__ == "__main__":
    main()
