"""The DAPO recipe's bookkeeping: seeds, paired comparisons, the over-seeds summary (no model runs)."""

from __future__ import annotations

import json

import pytest

from recipes import dapo_arithmetic as recipe


def test_mcnemar_exact_matches_binomial_tail_values():
    # literals from scipy.stats.binomtest(won, won + lost, 0.5), an independent implementation
    assert recipe.mcnemar_exact(57, 36) == pytest.approx(0.03751423180190034)
    assert recipe.mcnemar_exact(54, 45) == pytest.approx(0.4215233436157701)
    assert recipe.mcnemar_exact(35, 23) == pytest.approx(0.14800580076020603)
    assert recipe.mcnemar_exact(3, 0) == pytest.approx(0.25) == recipe.mcnemar_exact(0, 3)
    assert recipe.mcnemar_exact(0, 0) == 1.0


def test_seed_lists_are_distinct_integers():
    assert recipe.parse_args(["--seeds", "0,1, 2"]).seeds == [0, 1, 2]
    assert recipe.parse_args([]).seeds == [0]
    for bad in ("0,0", "one", ""):
        with pytest.raises(SystemExit):
            recipe.parse_args(["--seeds", bad])


def write_answers(out, name: str, correct: list[bool]) -> None:
    folder = out / "logs" / "eval" / name / "version_0"
    folder.mkdir(parents=True)
    folder.joinpath("test_generations.jsonl").write_text(
        "".join(json.dumps({"problem_id": f"p{i}", "correct": value}) + "\n" for i, value in enumerate(correct)))


def test_policies_are_paired_on_the_same_problems(tmp_path):
    write_answers(tmp_path, "sft", [True, False, False, True, False])
    write_answers(tmp_path, "dapo_round1", [True, True, True, False, False])  # +2 -1 against SFT
    write_answers(tmp_path, "rft", [False, True, False, True, True])  # +2 -1 against SFT
    run = recipe.Recipe(recipe.parse_args(["--out", str(tmp_path)]))
    rows = run.paired({"SFT policy (stage 0)": 0.4, "DAPO round 1": 0.6, "RFT baseline (round-1 rollouts)": 0.6})
    found = {(row["policy"], row["against"]): (row["won"], row["lost"], row["difference"]) for row in rows}
    assert found == {("DAPO round 1", "SFT policy (stage 0)"): (2, 1, pytest.approx(0.2)),
                     ("RFT baseline (round-1 rollouts)", "SFT policy (stage 0)"): (2, 1, pytest.approx(0.2)),
                     ("DAPO round 1", "RFT baseline (round-1 rollouts)"): (2, 2, pytest.approx(0.0))}


def test_evaluations_without_per_problem_files_are_not_paired(tmp_path):
    write_answers(tmp_path, "sft", [True, False])
    run = recipe.Recipe(recipe.parse_args(["--out", str(tmp_path)]))
    assert run.paired({"SFT policy (stage 0)": 0.5, "DAPO round 1": 0.5}) == []


def test_over_seeds_gives_mean_spread_and_direction_of_each_difference():
    def run(sft, dapo, difference, p_value=0.5):
        return {"policies": {"SFT policy (stage 0)": sft, "DAPO round 1": dapo},
                "paired": [{"policy": "DAPO round 1", "against": "SFT policy (stage 0)", "difference": difference,
                            "p_value": p_value}]}

    runs = {0: run(0.5, 0.52, 0.02, 0.3), 1: run(0.5, 0.46, -0.04, 0.04), 2: run(0.5, 0.53, 0.03, 0.2)}
    summary = recipe.over_seeds(runs)
    dapo = summary["accuracy"]["DAPO round 1"]
    assert dapo["mean"] == pytest.approx(0.503333, abs=1e-6)
    assert dapo["sd"] == pytest.approx(0.037859, abs=1e-6)  # sample sd of 0.52, 0.46, 0.53
    difference = summary["difference"]["DAPO round 1 - SFT policy (stage 0)"]
    assert difference["mean"] == pytest.approx(0.003333, abs=1e-6)
    assert (difference["seeds_ahead"], difference["seeds_behind"]) == (2, 1)
    assert "| DAPO round 1 - SFT policy (stage 0) | +0.003 ± 0.038 | 2 / 1 | +0.020 (0.3), -0.040 (0.04), +0.030 (0.2) |" \
        in recipe.seeds_markdown({"seeds": runs, "over_seeds": summary})
    partial = run(0.5, 0.5, 0.0)
    partial["paired"] = []  # e.g. evaluations written before per-problem files existed
    assert recipe.over_seeds({0: run(0.5, 0.52, 0.02), 1: partial})["difference"] == {}
    text = recipe.seeds_markdown({"seeds": {0: run(0.5, 0.52, 0.02)}, "over_seeds": recipe.over_seeds({0: run(0.5, 0.52, 0.02)})})
    assert "| 0 | 0.500 | 0.520 |" in text


def test_seed_overrides_reach_lightning_and_the_stage_seed(tmp_path):
    run = recipe.Recipe(recipe.parse_args(["--out", str(tmp_path), "--seeds", "3"]))
    assert run.seed_overrides("model") == ["--seed_everything=3", "--model.init_args.seed=3"]


def test_a_stage_is_skipped_only_when_its_command_is_unchanged(tmp_path):
    import sys

    log = tmp_path / "ran.txt"

    def command(tag: str) -> list[str]:
        return [sys.executable, "-c", f"open({str(log)!r}, 'a').write({tag!r})"]

    def run(first: str, second: str) -> None:
        stages = recipe.Recipe(recipe.parse_args(["--out", str(tmp_path / "out")]))
        stages.stage("first", command(first))
        stages.stage("second", command(second), depends=("first",))

    run("a", "b")
    run("a", "b")  # the same commands: both skipped
    assert log.read_text() == "ab"
    run("c", "b")  # the first stage's command changed: it and its dependant run again
    assert log.read_text() == "abcb"


def test_rollout_problems_are_drawn_after_the_evaluated_test_split(tmp_path):
    """The rollout split comes after train, val and test in one seeded draw: a rollouts run must draw the test
    split the evaluations use, or with a larger --test-size the rollout problems would be test problems."""
    from datamodules.arithmetic import generate_splits

    run = recipe.Recipe(recipe.parse_args(["--out", str(tmp_path), "--test-size", "1000"]))
    commands = {}

    class Stop(Exception):
        pass

    def record(name, command, *args, **kwargs):
        commands[name] = command
        raise Stop

    run.stage = record
    with pytest.raises(Stop):
        run.dapo_round(1, "policy", (), "critic", (), {})
    overrides = dict(arg.split("=", 1) for arg in commands["rollouts_round1"] if arg.startswith("--data.init_args."))
    sizes = {split: int(overrides.get(f"--data.init_args.{split}_size", default))
             for split, default in (("train", 6000), ("val", 256), ("test", 500), ("rollout", 256))}
    assert sizes["test"] == 1000
    splits = generate_splits(sizes)
    evaluated = generate_splits({"train": 6000, "val": 256, "test": 1000})["test"]
    assert not {p.question for p in splits["rollout"]} & {p.question for p in evaluated}
