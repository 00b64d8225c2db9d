"""DAPO pieces in isolation: golden values of the losses, metrics and advantages (expected numbers worked
out by hand in the comments), step splitting, the balanced selection, the state-wise sampler under two
simulated DDP ranks, the generation engine against HF ``generate``, the writer's shards, bad input."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from datamodules.common import DataError
from datamodules.dapo_data import (
    ActorData,
    DAPOProblems,
    StateBatchSampler,
    _StateBatches,
    balanced_keep,
    first_step,
    read_rollouts,
    split_steps,
    state_action_tokens,
    state_prefixes,
)
from modules.dapo import (
    RolloutEngine,
    base_rate_bce,
    critic_loss,
    dapo_actor_loss,
    expected_calibration_error,
    sibling_advantages,
    weighted_auroc,
)

# ----------------------------------------------------------------------------------------------------
# Golden values


def test_critic_loss_is_bce_on_soft_targets():
    # z = 0 -> V = 0.5: -(0.25 ln 0.5 + 0.75 ln 0.5) = ln 2 = 0.6931472
    # z = ln 3 -> V = 0.75, target 1: -ln 0.75 = 0.2876821
    logits = torch.tensor([0.0, math.log(3.0)])
    loss, metrics = critic_loss(logits, torch.tensor([0.25, 1.0]))
    assert loss.item() == pytest.approx((0.6931472 + 0.2876821) / 2, abs=1e-6)
    assert metrics["mae"].item() == pytest.approx(0.25, abs=1e-6)  # |0.5-0.25|, |0.75-1|
    assert metrics["value_mean"].item() == pytest.approx(0.625, abs=1e-6)


def test_critic_loss_is_minimal_at_the_target_not_at_rounding():
    # soft targets: the best prediction for MC = 0.25 is V = 0.25, not 0
    target = torch.tensor([0.25])
    losses = {v: critic_loss(torch.logit(torch.tensor([v])), target)[0].item() for v in (0.05, 0.25, 0.5)}
    assert losses[0.25] < losses[0.05] and losses[0.25] < losses[0.5]


def test_actor_loss_eq12_golden():
    # log-ratios 0.5, 0, -1; targets A/beta = 1, -1, 2; residuals -0.5, 1, -3; 1/2 r^2 = 0.125, 0.5, 4.5
    # state 0 = mean(0.125, 0.5) = 0.3125, state 1 = 4.5; loss = mean over states = 2.40625
    loss, metrics = dapo_actor_loss(policy_logps=torch.tensor([-1.0, -2.0, -3.0]),
                                    ref_logps=torch.tensor([-1.5, -2.0, -2.0]),
                                    advantages=torch.tensor([0.1, -0.1, 0.2]),
                                    state_index=torch.tensor([0, 0, 1]), beta=0.1)
    assert loss.item() == pytest.approx(2.40625, abs=1e-6)
    assert metrics["sign_accuracy"].item() == pytest.approx(1 / 3, abs=1e-6)  # +/+ agrees; 0 vs -, - vs + do not
    assert metrics["log_ratio_mean"].item() == pytest.approx(-1 / 6, abs=1e-6)
    assert metrics["target_abs_mean"].item() == pytest.approx(4 / 3, abs=1e-6)


def test_actor_loss_weights_states_equally_and_candidates_uniformly():
    # state 0 has 3 candidates with residual 1 each (1/2 each), state 1 one candidate with residual 3 (4.5):
    # per-state means 0.5 and 4.5 -> 2.5; a plain mean over the 4 rows would give (1.5 + 4.5) / 4 = 1.5
    advantages = torch.tensor([0.0, 0.0, 0.0, 0.0])
    policy = torch.tensor([1.0, -1.0, 1.0, 3.0])
    loss, _ = dapo_actor_loss(policy, torch.zeros(4), advantages, torch.tensor([0, 0, 0, 1]), beta=0.01)
    assert loss.item() == pytest.approx(2.5, abs=1e-6)


def test_actor_loss_gradient_pushes_the_log_ratio_towards_advantage_over_beta():
    policy = torch.tensor([-2.0, -2.0], requires_grad=True)
    loss, _ = dapo_actor_loss(policy, torch.tensor([-2.0, -2.0]), torch.tensor([0.5, -0.5]), torch.tensor([0, 0]), 0.01)
    loss.backward()
    # dL/dlogpi_i = (1/M)(r_i - A_i/beta) = 0.5 * (0 - 50), 0.5 * (0 + 50)
    assert policy.grad.tolist() == pytest.approx([-25.0, 25.0])


def test_sibling_mean_advantages_and_gap():
    # state 0: Q = 1, 0, 0.5 -> mean 0.5 -> A = 0.5, -0.5, 0; gap 1
    # state 1: Q = 0.2, 0.4 -> mean 0.3 -> A = -0.1, 0.1; gap 0.2
    advantages, gaps = sibling_advantages(torch.tensor([1.0, 0.0, 0.5, 0.2, 0.4]), torch.tensor([0, 0, 0, 1, 1]))
    assert advantages.tolist() == pytest.approx([0.5, -0.5, 0.0, -0.1, 0.1])
    assert gaps.tolist() == pytest.approx([1.0, 0.2])
    # a single candidate has advantage 0 and gap 0 (such a state is dropped by the 0.1 filter)
    advantages, gaps = sibling_advantages(torch.tensor([0.7]), torch.tensor([0]))
    assert advantages.tolist() == [0.0] and gaps.tolist() == [0.0]


def test_base_rate_bce_is_the_entropy_of_the_mean_target():
    # mean 0.25: (3 * -ln 0.75 + -ln 0.25) / 4 = H(0.25) = 0.5623351
    assert base_rate_bce(torch.tensor([0.0, 0.0, 0.0, 1.0])).item() == pytest.approx(0.5623351, abs=1e-6)
    # soft targets around 0.5: -ln 0.5 for each, whatever the spread
    assert base_rate_bce(torch.tensor([0.2, 0.8, 0.5, 0.5])).item() == pytest.approx(0.6931472, abs=1e-6)


def test_weighted_auroc_golden():
    # scores 0.1 (0 pos, 2 neg), 0.5 (1 pos, 1 neg), 0.9 (2 pos, 0 neg); P = N = 3
    # wins: pos@0.5 > neg@0.1: 1*2; tie pos@0.5 ~ neg@0.5: 0.5*1*1; pos@0.9 > all 3 negs: 2*3 -> 8.5 / 9
    auroc = weighted_auroc(torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.0, 1.0, 2.0]), torch.tensor([2.0, 1.0, 0.0]))
    assert auroc == pytest.approx(8.5 / 9)
    # equal scores everywhere: chance
    assert weighted_auroc(torch.tensor([0.3, 0.3]), torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])) == 0.5
    assert math.isnan(weighted_auroc(torch.tensor([0.3]), torch.tensor([0.0]), torch.tensor([4.0])))


def test_expected_calibration_error_golden():
    # 10 bins: 0.05 -> bin 0 (target 0), 0.15 -> bin 1 (target 0.5), 0.95 -> bin 9 (target 1)
    # (0.05 + 0.35 + 0.05) / 3 = 0.15
    ece = expected_calibration_error(torch.tensor([0.05, 0.15, 0.95]), torch.tensor([0.0, 0.5, 1.0]), 10)
    assert ece == pytest.approx(0.15)
    # two states in bin 2: |mean value - mean target| = |0.25 - 0.25| = 0, although each is off by 0.08
    assert expected_calibration_error(torch.tensor([0.21, 0.29]), torch.tensor([0.29, 0.21])) == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------------------------------
# Steps


@pytest.mark.parametrize("text, steps", [
    ("7+5=12\n12-3=9\nAnswer: 9", ["7+5=12\n", "12-3=9\n", "Answer: 9"]),
    ("7+5=12\n\n12-3=9\n", ["7+5=12\n", "\n12-3=9\n"]),           # a blank line joins the next step
    ("\n\n7+5=12\nAnswer: 12\n\n", ["\n\n7+5=12\n", "Answer: 12\n\n"]),  # leading / trailing blank lines
    ("7+5=12\n12-3=", ["7+5=12\n", "12-3="]),                     # no final answer: split all the same
    ("   \n\n", ["   \n\n"]),                                       # only blank lines: one step
    ("", []),
])
def test_split_steps(text, steps):
    assert split_steps(text) == steps
    assert "".join(split_steps(text)) == text


def test_over_long_steps_are_cut_and_still_concatenate():
    text = "1+1=2\n" + "9" * 25 + "\nAnswer: 2"
    steps = split_steps(text, max_step_chars=10)
    assert steps == ["1+1=2\n", "9" * 10, "9" * 10, "99999\n", "Answer: 2"]
    assert "".join(steps) == text
    assert all(len(step) <= 10 for step in steps)
    assert first_step("9" * 25, 10) == "9" * 10


def test_state_prefixes_are_the_non_terminal_states():
    steps = split_steps("a\nb\nAnswer: 3")
    assert state_prefixes(steps) == ["", "a\n", "a\nb\n"]


@pytest.mark.parametrize("rewards, n, kept", [
    ([1, 1, 1, 0, 0, 0, 0], 4, [0, 1, 3, 4]),   # 2 correct + 2 wrong
    ([1, 0, 0, 0, 0], 4, [0, 1, 2, 3]),          # 1 correct, wrong ones fill up
    ([1, 1, 1, 1, 0], 4, [0, 1, 2, 4]),          # 1 wrong, correct ones fill up
    ([1, 1, 1], 2, [0, 1]),
    ([0, 0], 6, [0, 1]),                          # fewer than n: keep all
])
def test_balanced_keep(rewards, n, kept):
    assert balanced_keep(rewards, n) == kept


# ----------------------------------------------------------------------------------------------------
# State-wise batches under two simulated DDP ranks


def advantage_rows(sizes: list[int]) -> list[dict]:
    rows = []
    for s, size in enumerate(sizes):
        rows.append({"state_id": f"p{s}/0", "problem_id": f"p{s}", "prompt_text": "<|user|>Q<|end|><|assistant|>",
                     "prefix": "1+1=2\n" * (s % 2), "gap": 0.5, "kept": True,
                     "candidates": [{"action": f"{s}+{c}={s + c}\n", "terminal": False, "advantage": 0.1 * c - 0.05,
                                     "ref_logprob": -1.0 - c} for c in range(size)]})
    return rows


@pytest.mark.parametrize("num_states", [12, 11])
def test_state_batch_sampler_two_ranks_disjoint_and_complete(num_states):
    samplers = [StateBatchSampler(num_states, 2, num_replicas=2, rank=r, shuffle=True, seed=3) for r in (0, 1)]
    for epoch in (0, 1):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        batches = [list(sampler) for sampler in samplers]
        assert len(batches[0]) == len(batches[1]) == len(samplers[0])  # same number of steps on both ranks
        seen = [[i for batch in rank_batches for i in batch] for rank_batches in batches]
        assert set(seen[0]) | set(seen[1]) == set(range(num_states))
        if num_states % 4 == 0:  # divisible: no padding, disjoint
            assert not set(seen[0]) & set(seen[1])
            assert len(seen[0]) + len(seen[1]) == num_states
    # the order changes with the epoch
    a = StateBatchSampler(num_states, 2, 2, 0, seed=3)
    b = StateBatchSampler(num_states, 2, 2, 0, seed=3)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_state_batches_padding_a_process_are_marked_so_evaluation_counts_each_state_once():
    ranks = [list(StateBatchSampler(5, 2, num_replicas=2, rank=r, shuffle=False).batches_with_repeats())
             for r in (0, 1)]
    assert ranks == [[([0, 1], False), ([4], False)], [([2, 3], False), ([4], True)]]  # the last batch again
    counted = sorted(i for batches in ranks for indices, repeated in batches if not repeated for i in indices)
    assert counted == [0, 1, 2, 3, 4]
    batches = _StateBatches([{"candidates": [0, 1]}] * 5, StateBatchSampler(5, 2, 2, 1, shuffle=False),
                            lambda states: {"states": len(states)})
    assert list(batches) == [{"states": 2, "repeated": False}, {"states": 1, "repeated": True}]


def test_actor_validation_gives_a_repeated_batch_no_weight(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from modules.dapo import DAPOActor

    path = tmp_path / "advantages.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in advantage_rows([2, 3, 4])))
    data = ActorData(str(path), val_fraction=0.0)
    actor = DAPOActor(model="tiny")
    data.tokenizer = actor.tokenizer
    data.setup("fit")
    states = data.datasets["train"]
    first, other = data.collate(states[:2]), data.collate(states[2:])

    def validate(batches):
        trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        return trainer.validate(actor, dataloaders=DataLoader(batches, batch_size=None), verbose=False)[0]

    alone = validate([{**first, "repeated": False}])
    padded = validate([{**first, "repeated": False}, {**other, "repeated": True}])
    counted = validate([{**first, "repeated": False}, {**other, "repeated": False}])
    assert padded == pytest.approx(alone) and counted["val/loss"] != pytest.approx(alone["val/loss"])


def test_actor_batches_keep_every_state_whole_on_each_rank(tmp_path):
    from modules.lm import load_tokenizer

    sizes = [2, 3, 5, 2, 4, 3, 2, 6]
    path = tmp_path / "advantages.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in advantage_rows(sizes)))
    data = ActorData(str(path), val_fraction=0.0, batch_size=3)
    data.tokenizer = load_tokenizer("tiny")
    data.setup("fit")
    states = data.datasets["train"]
    covered = []
    for rank in (0, 1):
        sampler = StateBatchSampler(len(states), 3, num_replicas=2, rank=rank, shuffle=True, seed=0)
        for indices, batch in zip(sampler, _StateBatches(states, sampler, data.collate)):
            counts = torch.bincount(batch["state_index"]).tolist()
            assert counts == [len(states[i]["candidates"]) for i in indices]  # every candidate of every state
            covered.append((rank, indices))
    by_rank = [{i for r, idx in covered if r == rank for i in idx} for rank in (0, 1)]
    assert by_rank[0] | by_rank[1] == set(range(len(sizes)))


def test_grouped_state_batches_pad_less_and_keep_states_whole(tmp_path):
    from modules.lm import load_tokenizer

    rows = advantage_rows([2, 3] * 24)
    for s, row in enumerate(rows):  # prefixes of 0..11 steps: states of very different lengths
        row["prefix"] = "1+1=2\n" * (s % 12)
    path = tmp_path / "advantages.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def padding_share(group_by_length, world=1):
        data = ActorData(str(path), val_fraction=0.0, batch_size=4, group_by_length=group_by_length)
        data.tokenizer = load_tokenizer("tiny")
        data.setup("fit")
        states = data.datasets["train"]
        longest = [max(len(c["input_ids"]) for c in state["candidates"]) for state in states]
        padded = real = 0
        steps, seen = [], []
        for rank in range(world):
            progress = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(
                current=SimpleNamespace(ready=0))))  # a fresh epoch, not a resume
            data.trainer = SimpleNamespace(world_size=world, global_rank=rank, current_epoch=1, fit_loop=progress,
                                           num_training_batches=len(states))
            loader = data.train_dataloader()
            batches = list(loader)
            indices = list(loader.dataset.sampler)  # the epoch the loader set: the trainer's
            for batch_indices, batch in zip(indices, batches, strict=True):
                assert torch.bincount(batch["state_index"]).tolist() == \
                    [len(states[i]["candidates"]) for i in batch_indices]  # states stay whole
                padded += batch["attention_mask"].numel()
                real += batch["attention_mask"].sum().item()
            steps.append([max(longest[i] for i in batch_indices) for batch_indices in indices])
            seen += [i for batch_indices in indices for i in batch_indices]
        assert sorted(seen) == list(range(len(states)))  # 48 states in batches of 4 per process: each once
        return 1 - real / padded, steps

    uniform, _ = padding_share(False)
    grouped, _ = padding_share(True)
    assert grouped < 0.5 * uniform, (uniform, grouped)
    _, steps = padding_share(True, world=2)  # the two processes' batches of a step come from one length group
    assert max(abs(a - b) for a, b in zip(*steps)) < max(steps[0]) - min(steps[0])


def test_rollouts_count_samples_whose_text_does_not_give_back_the_sampled_tokens():
    from modules.dapo import DAPORollouts, Generation
    from modules.lm import load_tokenizer

    rollouts = SimpleNamespace(tokenizer=load_tokenizer("tiny"))
    ids = rollouts.tokenizer("1+2=3\n", add_special_tokens=False)["input_ids"]
    assert DAPORollouts.retokenized(rollouts, Generation(ids, "1+2=3\n", True)) == 0
    lone_byte = rollouts.tokenizer("é", add_special_tokens=False)["input_ids"][:1]  # half of a 2-byte character
    text = rollouts.tokenizer.decode(ids + lone_byte, skip_special_tokens=True)
    assert text.endswith("\ufffd")  # decoding replaced the invalid byte
    assert DAPORollouts.retokenized(rollouts, Generation(ids + lone_byte, text, False)) == 1
    report = DAPORollouts.dataset_report([{"sample_accuracy": 1.0, "samples": [{"retokenized": 1}], "states": [
        {"mc_value": 1.0, "candidates": [{"terminal": False, "truncated": 0, "retokenized": 2}]}]}])
    assert (report["retokenized_samples"], report["retokenized_completions"]) == (1, 2)
    older = DAPORollouts.dataset_report([{"sample_accuracy": 1.0, "samples": [{}], "states": [
        {"mc_value": 1.0, "candidates": [{"terminal": False, "truncated": 0}]}]}])
    assert older["retokenized_completions"] is None  # not recorded, not zero


def test_actor_drops_and_counts_a_candidate_with_an_empty_non_terminal_action(tmp_path):
    from modules.lm import load_tokenizer

    rows = advantage_rows([3])
    rows[0]["candidates"][0]["action"] = ""
    path = tmp_path / "advantages.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    data = ActorData(str(path), val_fraction=0.0)
    data.tokenizer = load_tokenizer("tiny")
    data.setup("fit")
    [state] = data.datasets["train"]
    assert len(state["candidates"]) == 2
    assert data.report.dropped == {"train": {"candidate with an empty non-terminal action": 1}}


def test_actor_data_refuses_reference_logprobs_of_another_token_window(tmp_path):
    from modules.lm import load_tokenizer

    rows = advantage_rows([2, 2])
    rows[0]["max_length"], rows[1]["max_length"] = 128, 64
    path = tmp_path / "advantages.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = ActorData(str(path), val_fraction=0.0, max_length=128)
    data.tokenizer = load_tokenizer("tiny")
    with pytest.raises(DataError, match=r"advantages.jsonl: row 1, field 'max_length': ref_logprob was computed in "
                                        r"a window of 64 tokens .*set --data.init_args.max_length=64"):
        data.setup("fit")


def test_actor_labels_mark_exactly_the_action_tokens():
    from modules.lm import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    ids, labels = state_action_tokens(tokenizer, "<|user|>Q<|end|><|assistant|>", "1+1=2\n", "Answer: 2", True, 512)
    action = [t for t in labels if t != -100]
    assert tokenizer.decode(action) == "Answer: 2<|end|>"  # a terminal action includes ending the response
    assert ids[-len(action):] == action
    # left truncation keeps the action
    ids, labels = state_action_tokens(tokenizer, "<|user|>Q<|end|><|assistant|>", "1+1=2\n", "Answer: 2", False, 12)
    assert len(ids) == 12 and sum(t != -100 for t in labels) == 9


# ----------------------------------------------------------------------------------------------------
# Data files: errors name the file, row and field


def test_readme_lists_every_dataset_column():
    from pathlib import Path

    from datamodules.dapo_data import columns_markdown

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    # regenerate the README's tables with print(columns_markdown()) after changing the column dicts
    assert columns_markdown() in readme


def test_bad_rollout_row_names_file_row_and_field(tmp_path):
    good = {"problem_id": "a", "prompt_text": "Q", "states": [
        {"prefix": "", "mc_value": 0.5, "num_completions": 2, "num_correct": 1,
         "candidates": [{"action": "x\n", "terminal": False, "count": 2, "num_correct": 1}]}]}
    bad = json.loads(json.dumps(good))
    del bad["states"][0]["mc_value"]
    path = tmp_path / "rollouts.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"rollouts.jsonl: row 1, field 'states\[0\].mc_value': missing"):
        read_rollouts(path)
    bad = json.loads(json.dumps(good))
    bad["states"][0]["candidates"][0]["terminal"] = "yes"
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"row 0, field 'states\[0\].candidates\[0\].terminal': expected bool"):
        read_rollouts(path)
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_rollouts(path)
    text_file = tmp_path / "rollouts.txt"  # not taken for the name of a hub dataset
    text_file.write_text(json.dumps(good) + "\n")
    with pytest.raises(DataError, match=r"rollouts.txt: a DAPO dataset file must end in \.json, \.jsonl, \.parquet"):
        read_rollouts(text_file)


def write_rows(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def rollout_row(problem_id: str = "a", num_correct: int = 1) -> dict:
    return {"problem_id": problem_id, "prompt_text": "Q", "states": [
        {"prefix": "", "mc_value": num_correct / 2, "num_completions": 2, "num_correct": num_correct,
         "candidates": [{"action": "x\n", "terminal": False, "count": 2, "num_correct": num_correct}]}]}


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(num_correct=99, mc_value=1.0),
     r"field 'states\[0\].num_correct': must be in \[0, num_completions=2\], got 99"),
    (lambda s: s.update(num_correct=-3), r"field 'states\[0\].num_correct': must be in \[0, num_completions=2\], got -3"),
    (lambda s: s.update(mc_value=0.9), r"field 'states\[0\].mc_value': 0.9 is not num_correct / num_completions = 1/2"),
    (lambda s: s.update(mc_value=float("nan")), r"field 'states\[0\].mc_value': nan is not"),
    (lambda s: s["candidates"][0].update(count=0), r"field 'states\[0\].candidates\[0\].count': must be at least 1"),
    (lambda s: s["candidates"][0].update(count=-5), r"field 'states\[0\].candidates\[0\].count': must be at least 1"),
    (lambda s: s["candidates"][0].update(num_correct=3),
     r"field 'states\[0\].candidates\[0\].num_correct': must be in \[0, count=2\], got 3"),
    (lambda s: s.update(candidates=[]), r"field 'states\[0\].candidates': empty"),
])
def test_rollout_counts_must_be_possible_and_agree(tmp_path, change, message):
    bad = rollout_row("b")
    change(bad["states"][0])
    path = write_rows(tmp_path / "rollouts.jsonl", [rollout_row("a"), bad])
    with pytest.raises(DataError, match=r"rollouts.jsonl: row 1, " + message):
        read_rollouts(path)


def test_rollout_problem_ids_must_be_unique(tmp_path):
    path = write_rows(tmp_path / "rollouts.jsonl", [rollout_row("a"), rollout_row("b"), rollout_row("a", 2)])
    with pytest.raises(DataError, match=r"rollouts.jsonl: row 2, field 'problem_id': 'a' is also the problem_id of row 0"):
        read_rollouts(path)


def test_problem_answers_are_checked_when_loaded(tmp_path):
    rows = [{"id": "ok-int", "prompt": "Compute 1+2.", "answer": 3},
            {"id": "ok-text", "prompt": "Compute 1+2.", "answer": " -3 "},
            {"id": "ok-float", "prompt": "Compute 1+2.", "answer": 3.0},
            {"id": "fraction", "prompt": "Compute 1+2.", "answer": 3.7},
            {"id": "bool", "prompt": "Compute 1+2.", "answer": True},
            {"id": "text", "prompt": "Compute 1+2.", "answer": "abc"},
            {"id": "list", "prompt": "Compute 1+2.", "answer": [3]}]
    path = write_rows(tmp_path / "problems.jsonl", rows)
    with pytest.raises(DataError, match=r"problems.jsonl: row 3, field 'answer': an arithmetic answer must be an "
                                        r"integer, got 3.7"):
        DAPOProblems(train_file=str(path), tokenizer="tiny").setup("predict")
    problems = DAPOProblems(train_file=str(path), tokenizer="tiny", invalid_rows="drop")
    problems.setup("predict")
    assert [item["reference"] for item in problems.datasets["predict"]] == [3, -3, 3]  # what check_answer expects
    assert problems.report.dropped["predict"] == {"answer: an arithmetic answer must be an integer": 4}
    # a math answer is text; a number is accepted as its text, a list is not
    math_rows = write_rows(tmp_path / "math.jsonl", [{"prompt": "p", "answer": 0.5}, {"prompt": "p", "answer": ["1"]}])
    with pytest.raises(DataError, match=r"math.jsonl: row 1, field 'answer': a math answer must be"):
        DAPOProblems(task_kind="math", train_file=str(math_rows), tokenizer="tiny").setup("predict")
    twice = write_rows(tmp_path / "twice.jsonl", [rows[0], rows[1], {**rows[2], "id": "ok-int"}])
    with pytest.raises(DataError, match=r"twice.jsonl: row 2, field 'id': 'ok-int' is also the id of row 0"):
        DAPOProblems(train_file=str(twice), tokenizer="tiny").setup("predict")


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(gap=None), r"field 'gap': missing"),
    (lambda r: r.update(gap="big"), r"field 'gap': expected float, got str"),
    (lambda r: r.update(gap=float("nan")), r"field 'gap': expected a finite number >= 0, got nan"),
    (lambda r: r.pop("kept"), r"field 'kept': missing"),
    (lambda r: r.update(kept="false"), r"field 'kept': expected bool, got str"),
    (lambda r: r["candidates"].__setitem__(0, 5), r"field 'candidates\[0\]': expected an object, got int"),
    (lambda r: r["candidates"][1].update(terminal="no"), r"field 'candidates\[1\].terminal': expected bool, got str"),
    (lambda r: r.update(state_id="p0/0"), r"field 'state_id': 'p0/0' is also the state_id of row 0"),
    (lambda r: r["candidates"][1].update(ref_logprob=0.5),
     r"field 'candidates\[1\].ref_logprob': 0.5 > 0 is not a log-probability"),
])
def test_actor_data_checks_the_types_of_gap_kept_and_candidates(tmp_path, change, message):
    from modules.lm import load_tokenizer

    rows = advantage_rows([2, 2])
    change(rows[1])
    path = write_rows(tmp_path / "advantages.jsonl", rows)
    data = ActorData(str(path), val_fraction=0.0)
    data.tokenizer = load_tokenizer("tiny")
    with pytest.raises(DataError, match=r"advantages.jsonl: row 1, " + message):
        data.setup("fit")


def test_actor_data_rejects_a_missing_reference_logprob(tmp_path):
    from modules.lm import load_tokenizer

    rows = advantage_rows([2, 2])
    rows[1]["candidates"][1]["ref_logprob"] = None
    path = tmp_path / "advantages.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = ActorData(str(path), val_fraction=0.0)
    data.tokenizer = load_tokenizer("tiny")
    with pytest.raises(DataError, match=r"row 1, field 'candidates\[1\].ref_logprob': expected a finite number"):
        data.setup("fit")


def test_actor_data_counts_the_states_it_drops(tmp_path):
    from modules.lm import load_tokenizer

    rows = advantage_rows([2, 3, 1])
    rows[0]["gap"], rows[0]["kept"] = 0.05, False
    path = tmp_path / "advantages.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = ActorData(str(path), val_fraction=0.0)
    data.tokenizer = load_tokenizer("tiny")
    data.setup("fit")
    assert data.report.rows["train"] == 1
    assert data.report.dropped["train"] == {"advantage gap below 0.1": 1, "fewer than 2 candidates": 1}
    rows[1]["kept"] = False  # a large gap, but stage 3 did not keep the state: not reported as a small gap
    data = ActorData(str(write_rows(path, rows)), val_fraction=0.0, min_gap=0.05)
    data.tokenizer = load_tokenizer("tiny")
    with pytest.raises(DataError, match="no state left for training"):
        data.setup("fit")
    assert data.report.dropped["train"] == {"kept is false in the advantage file": 2, "fewer than 2 candidates": 1}


def test_problems_hold_out_exactly_the_sft_test_split():
    from datamodules.sft_data import SFTData
    from modules.lm import load_tokenizer

    problems, sft = DAPOProblems(rollout_size=50), SFTData(train_size=6000)  # the sizes of configs/sft
    sft_rows = {split: {row["prompt"] for row in sft.embedded_rows(split)} for split in ("train", "val", "test")}
    test = [row["prompt"] for row in problems.embedded_rows("test")]
    rollout = {row["prompt"] for row in problems.embedded_rows("predict")}
    assert set(test) == sft_rows["test"] and len(test) == 500
    assert len(rollout) == 50 and not rollout & (sft_rows["train"] | sft_rows["val"] | sft_rows["test"])
    problems.tokenizer = load_tokenizer("tiny")
    item = problems.encode(problems.embedded_rows("test")[0], "test", "embedded", 0)
    assert item["prompt_text"].startswith("<|user|>Compute ") and item["prompt_text"].endswith("<|assistant|>")


def test_eval_split_val_evaluates_the_sft_validation_problems():
    from datamodules.sft_data import SFTData

    problems = DAPOProblems(eval_split="val", tokenizer="tiny")
    problems.setup("test")
    batch = next(iter(problems.test_dataloader()))
    val_prompts = {row["prompt"] for row in SFTData(train_size=6000).embedded_rows("val")}
    assert len(problems.datasets["val"]) == 256 and "test" not in problems.datasets
    assert set(batch["prompt"]) <= val_prompts
    with pytest.raises(ValueError, match="eval_split must be 'test' or 'val'"):
        DAPOProblems(eval_split="train")


# ----------------------------------------------------------------------------------------------------
# The generation engine


@pytest.fixture(scope="module")
def tiny():
    from modules import lm

    torch.manual_seed(0)
    return lm.load_model("tiny").eval(), lm.load_tokenizer("tiny")


def test_engine_greedy_matches_hf_generate_with_left_padding(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"]
               for text in ("<|user|>Compute 1+2.<|end|><|assistant|>", "ab", "<|user|>Compute 17+25-3+8.<|end|><|assistant|>")]
    engine = RolloutEngine(model, tokenizer, max_batch_sequences=8)
    outputs = engine.generate(prompts, [1, 3, 2], max_new_tokens=10, temperature=0.0)
    assert [len(o) for o in outputs] == [1, 3, 2]
    with torch.no_grad():
        for prompt, generations in zip(prompts, outputs):
            reference = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            expected = reference[0, len(prompt):].tolist()
            if tokenizer.eos_token_id in expected:
                expected = expected[:expected.index(tokenizer.eos_token_id)]
            for generation in generations:  # the expanded cache gives every sample the same greedy path
                assert generation.token_ids == expected
                assert generation.finished == (len(expected) < 10)


def test_engine_sampling_is_seeded_and_chunks_large_requests(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer("<|user|>Hi<|end|><|assistant|>", add_special_tokens=False)["input_ids"], [5, 6, 7]]
    engine = RolloutEngine(model, tokenizer, max_batch_sequences=4)  # 7 samples -> chunks of at most 4 rows
    draw = lambda seed: engine.generate(prompts, [5, 2], 6, temperature=1.0,  # noqa: E731
                                        generator=torch.Generator().manual_seed(seed))
    first, again, other = draw(1), draw(1), draw(2)
    assert [len(x) for x in first] == [5, 2]
    tokens = lambda out: [g.token_ids for gens in out for g in gens]  # noqa: E731
    assert tokens(first) == tokens(again) and tokens(first) != tokens(other)
    for generation in (g for gens in first for g in gens):
        assert generation.finished or len(generation.token_ids) == 6
        assert tokenizer.eos_token_id not in generation.token_ids


# ----------------------------------------------------------------------------------------------------
# The sharded writer


def test_writer_merges_shards_skips_done_keys_and_ignores_a_cut_line(tmp_path):
    from callbacks.rollout_writer import ShardedJsonlWriter, _drop_partial_tail

    writer = ShardedJsonlWriter(str(tmp_path / "rollouts.jsonl"))
    writer.shard_dir.mkdir()
    writer.shard_path(0).write_text('{"problem_id": "b", "v": 1}\n{"problem_id": "a", "v": 2}\n{"problem_id": "c", "v"')
    writer.shard_path(1).write_text('{"problem_id": "d", "v": 3}\n{"problem_id": "a", "v": 4}\n')
    assert writer.done_keys() == {"a", "b", "d"}  # the cut row "c" is not done
    _drop_partial_tail(writer.shard_path(0))
    assert writer.shard_path(0).read_text().endswith('"v": 2}\n')
    merged = [json.loads(line) for line in writer.merge().read_text().splitlines()]
    assert [row["problem_id"] for row in merged] == ["a", "b", "d"]
    assert merged[0]["v"] == 2  # one row per key


def test_writer_refuses_to_resume_rows_written_with_other_settings(tmp_path, caplog):
    import logging

    from callbacks.rollout_writer import ShardedJsonlWriter
    from modules.dapo import DAPORollouts

    module = DAPORollouts(model="tiny", n1=3, n=2, m=2)
    trainer = SimpleNamespace(global_rank=0)
    output = tmp_path / "rollouts.jsonl"
    done = dict(rollout_row("a"), policy="tiny", num_samples=3, sample_accuracy=0.5)
    done["states"][0]["candidates"][0]["truncated"] = 0
    for change, field, recorded in [({"policy": "runs/dapo/sft/export"}, "policy", "'runs/dapo/sft/export'"),
                                    ({"num_samples": 16}, "num_samples", "16"), ({"num_kept": 6}, "num_kept", "6"),
                                    ({"max_step_chars": 256}, "max_step_chars", "256")]:
        write_rows(output, [done, dict(done, problem_id="b", **change)])
        with pytest.raises(DataError, match=rf"rollouts.jsonl: row 1, field '{field}': written by an earlier run with "
                                            rf"{recorded}, .*Delete .*rollouts.jsonl .*or choose another output"):
            ShardedJsonlWriter(str(output)).setup(trainer, module, "predict")
    other_m = json.loads(json.dumps(done))
    other_m["states"][0]["num_completions"] = 8
    write_rows(output, [done])
    writer = ShardedJsonlWriter(str(output))
    writer.shard_dir.mkdir()
    write_rows(writer.shard_path(1), [dict(other_m, problem_id="c")])  # a shard of another process counts too
    with pytest.raises(DataError, match=r"rank1.jsonl: row 0, field 'states\[0\].num_completions'"):
        writer.setup(trainer, module, "predict")

    writer.shard_path(1).unlink()
    write_rows(output, [dict(done, num_kept=2, max_step_chars=0)])  # recorded and equal (the rows above lacked them)
    with caplog.at_level(logging.INFO):
        writer.setup(trainer, module, "predict")  # the same settings: resume
        assert module.skip_keys == {"a"}
        module.predict_step({"problem_id": ["a"]}, 0)  # nothing left to do: no generation
        assert module.num_skipped == 1
        strategy = SimpleNamespace(reduce=lambda tensor, reduce_op: tensor, barrier=lambda: None,
                                   broadcast=lambda value, src=0: value)
        writer.on_predict_end(SimpleNamespace(global_rank=0, is_global_zero=True, strategy=strategy), module)
    assert "0 rows written, 1 problem_ids skipped (already written)" in caplog.text


def test_advantage_rows_of_another_q_estimator_are_not_resumed(tmp_path):
    from callbacks.rollout_writer import ShardedJsonlWriter
    from modules.dapo import DAPOAdvantages

    row = dict(advantage_rows([2])[0], critic="tiny", reference_policy="tiny", max_length=512)
    for candidate, source in zip(row["candidates"], ("reward", "critic")):
        candidate["q_source"] = source
    output = write_rows(tmp_path / "advantages.jsonl", [row])
    writer = ShardedJsonlWriter(str(output), key="state_id")
    module = DAPOAdvantages(critic="tiny", reference="tiny", q_estimator="monte_carlo")
    with pytest.raises(DataError, match=r"advantages.jsonl: row 0, field 'candidates\[1\].q_source': written by an "
                                        r"earlier run with 'critic', this run has 'monte_carlo'"):
        writer.setup(SimpleNamespace(global_rank=0), module, "predict")
    assert DAPOAdvantages(critic="tiny", reference="tiny").resume_mismatch(row) is None
    assert DAPOAdvantages(critic="tiny", reference="tiny", max_length=128).resume_mismatch(row) == \
        ("max_length", 512, 128)
    # rows whose states began with a BOS that this reference tokenizer (tiny: none) does not add
    assert DAPOAdvantages(critic="tiny", reference="tiny").resume_mismatch(dict(row, bos_ids=[0])) == \
        ("bos_ids", [0], [])
    assert DAPOAdvantages(critic="tiny", reference="tiny").resume_mismatch(dict(row, bos_ids=7)) == ("bos_ids", 7, [])
