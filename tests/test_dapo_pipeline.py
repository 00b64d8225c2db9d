"""DAPO stages 1-5 end to end through cli.py on three problems with the tiny preset: rollouts (and a
restart after a cut write), critic, advantages with cached reference log-probs, actor, evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from datamodules.common import DataError
from datamodules.dapo_data import (
    ADVANTAGE_COLUMNS,
    ROLLOUT_COLUMNS,
    read_jsonl,
    read_rollouts,
    split_steps,
    state_action_tokens,
)

M = 3
ROLLOUTS = ["--model.init_args.model=tiny", "--model.init_args.n1=3", "--model.init_args.n=2", f"--model.init_args.m={M}",
            "--model.init_args.max_new_tokens=6", "--model.init_args.completion_max_new_tokens=6",
            "--data.init_args.rollout_size=3", "--data.init_args.batch_size=2", "--return_predictions=false"]


def summary_metrics(tmp_path, name: str, stage: str) -> dict:
    [path] = list((tmp_path / name).glob("version_*/summary.json"))
    return json.loads(path.read_text())["stages"][stage]["metrics"]


def check_rollout_rows(rows: list[dict]) -> None:
    assert [row["problem_id"] for row in rows] == ["rollout-000000", "rollout-000001", "rollout-000002"]
    for row in rows:
        assert sum(sample["count"] for sample in row["samples"]) == row["num_samples"] == 3
        kept_texts = [row["samples"][i]["text"] for i in row["kept"]]
        assert 1 <= len(kept_texts) <= 2
        prefixes = [state["prefix"] for state in row["states"]]
        assert len(prefixes) == len(set(prefixes)) and "" in prefixes  # distinct states, s_0 = the prompt
        for state in row["states"]:
            assert any(text.startswith(state["prefix"]) for text in kept_texts)
            assert len(split_steps(state["prefix"], 64)) == state["depth"]
            assert sum(c["count"] for c in state["candidates"]) == state["num_completions"] == M
            assert state["mc_value"] == state["num_correct"] / M


def column_paths(rows: list[dict]) -> set[str]:
    """Every column a row holds, nested ones written as in the column dicts: "states[].candidates[].action"."""
    paths: set[str] = set()

    def walk(value, prefix: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                path = f"{prefix}.{key}" if prefix else key
                paths.add(path)
                if path != "reference":  # a HumanEval reference is a mapping, but one column
                    walk(item, path)
        elif isinstance(value, list):
            for item in value:
                walk(item, prefix + "[]")

    for row in rows:
        walk(row, "")
    return paths


def give_outcomes(path) -> None:
    """A random tiny policy never answers correctly. Mark the first candidate of each state as a correct
    terminal step and the second as a wrong one, so the critic sees both classes and the advantages have
    exact terminal rewards (gap 1 wherever a state has two candidates)."""
    rows = read_rollouts(path)
    for row in rows:
        for state in row["states"]:
            candidates = state["candidates"]
            for candidate in candidates:
                candidate["num_correct"] = 0
            if len(candidates) >= 2:
                candidates[0].update(terminal=True, num_correct=candidates[0]["count"])
                candidates[1].update(terminal=True)
            if len(candidates) >= 3 and not candidates[2]["terminal"]:  # a step that succeeded 1 time in 2
                candidates[2].update(count=2, num_correct=1)
            state["num_correct"] = sum(candidate["num_correct"] for candidate in candidates)
            state["mc_value"] = state["num_correct"] / state["num_completions"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_stages_one_to_five_end_to_end(run_cli, tmp_path):
    rollouts = tmp_path / "rollouts.jsonl"
    # 1. rollouts
    run_cli("predict", "configs/dapo/rollouts.yaml", *ROLLOUTS, f"--trainer.callbacks.init_args.output={rollouts}",
            name="rollouts")
    rows = read_rollouts(rollouts)
    check_rollout_rows(rows)
    assert column_paths(rows) == set(ROLLOUT_COLUMNS)  # the documented columns, no more, no fewer
    report = json.loads((tmp_path / "rollouts.report.json").read_text())
    assert report["problems"] == 3 and report["states"] == sum(len(r["states"]) for r in rows)
    assert report["retokenized_completions"] == sum(c["retokenized"] for r in rows for s in r["states"]
                                                    for c in s["candidates"])

    # a crash cut the last row in half: the rerun redoes that problem only, with the same samples
    shard = tmp_path / "rollouts.shards" / "rank0.jsonl"
    text = shard.read_text()
    shard.write_text(text[:text.rindex("{") + 40])
    rollouts.unlink()
    cli = run_cli("predict", "configs/dapo/rollouts.yaml", *ROLLOUTS, f"--trainer.callbacks.init_args.output={rollouts}",
                  name="rollouts_again")
    [writer] = [c for c in cli.trainer.callbacks if type(c).__name__ == "ShardedJsonlWriter"]
    assert writer.rows_written == 1 and cli.model.num_skipped == 2
    assert read_rollouts(rollouts) == rows
    # rows sampled with other settings are not reused: the rerun is refused before any generation
    with pytest.raises(DataError, match=r"rollouts.jsonl: row 0, field 'num_samples': written by an earlier run with 3, "
                                        r"this run has 4\. Delete .*rollouts.jsonl"):
        run_cli("predict", "configs/dapo/rollouts.yaml", *ROLLOUTS, "--model.init_args.n1=4",
                f"--trainer.callbacks.init_args.output={rollouts}", name="rollouts_other_n1")
    assert read_rollouts(rollouts) == rows

    # 2. critic
    give_outcomes(rollouts)
    critic = run_cli("fit", "configs/dapo/critic.yaml", "--model.init_args.model=tiny", f"--data.init_args.data_file={rollouts}",
                     "--data.init_args.batch_size=4", "--trainer.max_epochs=1", "--data.init_args.group_by_length=true",
                     name="critic")
    assert type(critic.datamodule.train_dataloader().sampler).__name__ == "LengthGroupedSampler"
    critic_metrics = summary_metrics(tmp_path, "critic", "fit")
    for key in ("train/bce", "val/bce", "val/mae", "val/ece", "val/bce_base_rate", "val/bce_skill"):
        assert key in critic_metrics
    assert critic_metrics["val/bce_skill"] == pytest.approx(1 - critic_metrics["val/bce"] / critic_metrics["val/bce_base_rate"])
    from cli import export_main

    export_main([str(tmp_path / "critic" / "checkpoints" / "best.ckpt"), str(tmp_path / "critic_export")])

    # 3. advantages
    advantages = tmp_path / "advantages.jsonl"
    run_cli("predict", "configs/dapo/advantages.yaml", f"--trainer.callbacks.init_args.output={advantages}",
            f"--model.init_args.critic={tmp_path / 'critic_export'}", "--model.init_args.reference=tiny",
            f"--data.init_args.data_file={rollouts}", "--return_predictions=false", name="advantages")
    states = read_jsonl(advantages)
    rollout_states = {f"{row['problem_id']}/{i}": s for row in read_rollouts(rollouts) for i, s in enumerate(row["states"])}
    assert {s["state_id"] for s in states} == set(rollout_states)
    assert column_paths(states) == set(ADVANTAGE_COLUMNS)
    for state in states:
        candidates = state["candidates"]
        advantages_of = [c["advantage"] for c in candidates]
        assert sum(advantages_of) == pytest.approx(0.0, abs=1e-6)  # baseline = mean of the siblings
        assert state["gap"] == pytest.approx(max(advantages_of) - min(advantages_of))
        assert state["kept"] == (state["gap"] >= 0.1 and len(candidates) >= 2)
        for candidate, source in zip(candidates, rollout_states[state["state_id"]]["candidates"]):
            if source["terminal"]:
                assert candidate["q_source"] == "reward" and candidate["q"] == source["num_correct"] / source["count"]
            else:
                assert candidate["q_source"] == "critic" and 0.0 < candidate["q"] < 1.0
            assert (candidate["ref_logprob"] is not None) == state["kept"]
    kept = [s for s in states if s["kept"]]
    assert kept, "every state with two candidates has terminal rewards 1 and 0: gap 1"

    # the cached log pi_ref(a|s) is the tiny model's summed log-prob of the step's tokens
    from modules import lm

    model, tokenizer = lm.load_model("tiny").eval(), lm.load_tokenizer("tiny")
    candidate = kept[0]["candidates"][0]
    ids, labels = state_action_tokens(tokenizer, kept[0]["prompt_text"], kept[0]["prefix"], candidate["action"],
                                      candidate["terminal"], 128)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    expected = sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if labels[t] != -100)
    assert candidate["ref_logprob"] == pytest.approx(expected, abs=1e-3)

    # the Monte-Carlo ablation takes Q of a non-terminal step from the rollout completions that started with it
    mc_advantages = tmp_path / "advantages_mc.jsonl"
    run_cli("predict", "configs/dapo/advantages.yaml", f"--trainer.callbacks.init_args.output={mc_advantages}",
            f"--model.init_args.critic={tmp_path / 'critic_export'}", "--model.init_args.reference=tiny",
            "--model.init_args.q_estimator=monte_carlo", f"--data.init_args.data_file={rollouts}",
            "--return_predictions=false", name="advantages_mc")
    partial_steps = 0
    for state in read_jsonl(mc_advantages):
        for candidate, source in zip(state["candidates"], rollout_states[state["state_id"]]["candidates"]):
            assert candidate["q"] == source["num_correct"] / source["count"]
            assert candidate["q_source"] == ("reward" if source["terminal"] else "monte_carlo")
            partial_steps += candidate["q_source"] == "monte_carlo" and candidate["q"] == 0.5
    assert partial_steps > 0  # the ratio itself was exercised, not only 0 / count

    # 4. actor: before training pi == pi_ref, so the log-ratio on the cached data is 0
    actor = ["--model.init_args.model=tiny", f"--data.init_args.data_file={advantages}", "--data.init_args.batch_size=2"]
    run_cli("validate", "configs/dapo/actor.yaml", *actor, "--data.init_args.val_fraction=0.99", name="actor_before")
    before = summary_metrics(tmp_path, "actor_before", "validate")
    assert abs(before["val/log_ratio_mean"]) < 1e-3 and before["val/log_ratio_abs_mean"] < 1e-3
    assert before["val/sign_accuracy"] == 0.0  # a zero log-ratio has no sign
    with pytest.warns(UserWarning, match="test_after_fit skipped: ActorData has no test data"):  # not a crash
        run_cli("fit", "configs/dapo/actor.yaml", *actor, "--trainer.max_epochs=2", "--test_after_fit=true",
                "--model.init_args.optimizer.init_args.lr=1e-3", name="actor")
    after = summary_metrics(tmp_path, "actor", "fit")
    assert after["train/log_ratio_abs_mean"] > 1e-3  # the policy moved away from pi_ref
    assert 0.0 <= after["train/sign_accuracy"] <= 1.0 and "val/loss" in after

    # 5. greedy pass@1 of the trained actor
    export_main([str(tmp_path / "actor" / "checkpoints" / "last.ckpt"), str(tmp_path / "actor_export")])
    run_cli("test", "configs/dapo/evaluate.yaml", f"--model.init_args.model={tmp_path / 'actor_export'}",
            "--data.init_args.test_size=4", "--model.init_args.max_new_tokens=6", name="evaluate")
    metrics = summary_metrics(tmp_path, "evaluate", "test")
    assert 0.0 <= metrics["test/accuracy"] <= 1.0 and "test/finished" in metrics
    [generations] = list((tmp_path / "evaluate").glob("version_*/test_generations.jsonl"))
    rows = [json.loads(line) for line in generations.read_text().splitlines()]
    assert len({row["problem_id"] for row in rows}) == len(rows) == 4
    assert metrics["test/accuracy"] == pytest.approx(sum(row["correct"] for row in rows) / 4)
    assert all(isinstance(row["response"], str) and 0 < row["response_tokens"] <= 6 for row in rows)
