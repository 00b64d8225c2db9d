"""RewardBench-style evaluation: category weighting against hand computations, the hub adapter on a fixture
with the real column layout, the generated set, bad inputs, and a real `test` run that logs and writes it."""

from __future__ import annotations

import json
import warnings

import pytest
from conftest import ROOT

from datamodules import arithmetic
from datamodules.common import DataError, read_rows
from datamodules.rewardbench import (
    DEFAULT_CATEGORIES,
    GENERATED_CATEGORIES,
    GENERATED_SUBSETS,
    REWARDBENCH_CATEGORIES,
    REWARDBENCH_WEIGHTS,
    RewardBenchData,
    category_scores,
    subset_weights,
)

FIXTURES = ROOT / "tests" / "fixtures"
SAMPLE = FIXTURES / "rewardbench_filtered_sample.jsonl"
HEP = ["hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"]


# -- weighting -----------------------------------------------------------------------------------------

def test_category_scores_match_a_hand_computation():
    accuracy = {
        # Chat: (100*1 + 95*0.5 + 95*0.8 + 28*0.75 + 40*0.6) / 358 = 268.5 / 358 = 0.75
        "alpacaeval-easy": 1.0, "alpacaeval-length": 0.5, "alpacaeval-hard": 0.8, "mt-bench-easy": 0.75,
        "mt-bench-med": 0.6,
        # Chat Hard: (37*1 + 100*0.5 + 134*0.25 + 92*0.5 + 47*0 + 46*1) / 456 = 212.5 / 456
        "mt-bench-hard": 1.0, "llmbar-natural": 0.5, "llmbar-adver-neighbor": 0.25, "llmbar-adver-GPTInst": 0.5,
        "llmbar-adver-GPTOut": 0.0, "llmbar-adver-manual": 1.0,
        # Safety: (100*1 + 100*1 + 154*0.5 + 250*0.8 + 136*0.25) / 740 = 511 / 740
        "refusals-dangerous": 1.0, "refusals-offensive": 1.0, "xstest-should-refuse": 0.5,
        "xstest-should-respond": 0.8, "donotanswer": 0.25,
        # Reasoning: math-prm counts as much as the six hep-* together: 0.5 * 0.9 + 0.5 * mean(0.5..1.0) = 0.825
        "math-prm": 0.9, "hep-cpp": 0.5, "hep-go": 0.6, "hep-java": 0.7, "hep-js": 0.8, "hep-python": 0.9,
        "hep-rust": 1.0,
    }
    sizes = {subset: 1 for subset in accuracy} | {"math-prm": 447}  # the real row count of math-prm
    result = category_scores(accuracy, subset_weights(sizes))
    expected = {"Chat": 0.75, "Chat Hard": 212.5 / 456, "Safety": 511 / 740, "Reasoning": 0.825}
    assert result["categories"] == pytest.approx(expected)
    assert result["overall"] == pytest.approx(sum(expected.values()) / 4)
    assert result["missing_categories"] == []
    assert result["subsets"]["math-prm"] == {"accuracy": 0.9, "weight": 984.0, "category": "Reasoning"}


def test_weights_are_rewardbench_counts_for_its_subsets_and_sizes_for_others():
    assert subset_weights({"math-prm": 447, "hep-go": 3, "arith-format": 120}) == {
        "math-prm": 984.0, "hep-go": 164.0, "arith-format": 120.0}
    assert REWARDBENCH_WEIGHTS["math-prm"] == sum(REWARDBENCH_WEIGHTS[name] for name in HEP)
    assert sorted(sum(REWARDBENCH_CATEGORIES.values(), [])) == sorted(REWARDBENCH_WEIGHTS)


def test_custom_subsets_weigh_by_size_and_missing_categories_are_left_out_of_the_mean():
    # Safety of the generated set: (30 * 1.0 + 10 * 0.2) / 40 = 0.8; Chat Hard and Reasoning absent
    result = category_scores({"arith-format": 0.9, "refuse-undefined": 1.0, "respond-benign": 0.2},
                             subset_weights({"arith-format": 50, "refuse-undefined": 30, "respond-benign": 10}),
                             GENERATED_CATEGORIES)
    assert result["categories"] == pytest.approx({"Chat": 0.9, "Safety": 0.8})
    assert result["overall"] == pytest.approx(0.85)
    assert result["missing_categories"] == ["Chat Hard", "Reasoning"]


def test_bad_inputs_to_the_scoring():
    with pytest.raises(ValueError, match=r"unknown subset name\(s\) \['alpacaeval-medium'\]"):
        category_scores({"alpacaeval-medium": 1.0}, {"alpacaeval-medium": 1.0})
    with pytest.raises(ValueError, match="empty evaluation set"):
        category_scores({}, {})
    with pytest.raises(ValueError, match="is in two categories"):
        category_scores({"a": 1.0}, {"a": 1.0}, {"Chat": ["a"], "Safety": ["a"]})


# -- data ----------------------------------------------------------------------------------------------

def loaded(**kwargs) -> RewardBenchData:
    data = RewardBenchData(tokenizer="tiny", max_length=256, **kwargs)
    data.setup("test")
    return data


def test_fixture_with_the_real_layout_loads_with_left_truncation():
    data = loaded(test_file=str(SAMPLE))
    sizes = data.subset_sizes()
    assert len(sizes) == 23 and sum(sizes.values()) == 26
    assert sizes["math-prm"] == 2 and sizes["hep-python"] == 2 and sizes["donotanswer"] == 1
    assert data.eval_truncation_side == "left"
    assert set(read_rows(str(SAMPLE))[0]) == {"prompt", "chosen", "chosen_model", "rejected", "rejected_model",
                                               "subset", "id"}


def test_left_truncation_keeps_the_responses():
    data = RewardBenchData(tokenizer="tiny", max_length=16)
    data.resolve_tokenizer()
    item = data.encode({"prompt": "a long question " * 10, "chosen": "YES", "rejected": "NO", "subset": "mt-bench-easy"},
                       "test", "row", 0)
    assert data.tokenizer.decode(item["chosen"]).endswith("YES<|end|>")
    assert len(item["chosen"]) == 16 and data.report.truncated["test"] == 1


def test_hub_dataset_by_name_reads_the_filtered_split(monkeypatch):
    calls = []

    def fake_read_rows(source, split="train", name=None):
        calls.append((source, split, name))
        return read_rows(str(SAMPLE))

    monkeypatch.setattr("datamodules.text.read_rows", fake_read_rows)
    data = loaded(dataset="allenai/reward-bench")
    assert calls == [("allenai/reward-bench", "filtered", None)]
    assert sum(data.subset_sizes().values()) == 26


@pytest.mark.parametrize("fixture, message", [
    ("rewardbench_missing_subset.jsonl", r"rewardbench_missing_subset.jsonl: row 1, field 'subset': missing"),
    ("rewardbench_unknown_subset.jsonl",
     r"rewardbench_unknown_subset.jsonl: row 1, field 'subset': unknown subset 'alpacaeval-medium'"),
    ("rewardbench_empty.jsonl", r"rewardbench_empty.jsonl: split 'test' has no rows"),
])
def test_bad_evaluation_files_stop_with_a_clear_error(fixture, message):
    with pytest.raises(DataError, match=message):
        loaded(test_file=str(FIXTURES / fixture))


def test_custom_categories_accept_new_subset_names():
    data = loaded(test_file=str(FIXTURES / "rewardbench_unknown_subset.jsonl"),
                  categories={"Chat": ["alpacaeval-easy", "alpacaeval-medium"]})
    assert data.subset_sizes() == {"alpacaeval-easy": 1, "alpacaeval-medium": 1}


def test_generated_set_is_rewardbench_shaped_and_held_out():
    sizes = {"train": 200, "val": 20, "test": 50}
    data = loaded(train_size=sizes["train"], val_size=sizes["val"], test_size=sizes["test"])
    assert data.subset_sizes() == {subset: 10 for subset in GENERATED_SUBSETS}
    rows = data.embedded_rows("test")
    assert set(rows[0]) == {"prompt", "chosen", "chosen_model", "rejected", "rejected_model", "subset", "id"}
    problems = arithmetic.generate_splits(sizes, seed=0)
    train_questions = {problem.question for problem in problems["train"]}
    assert not any(row["prompt"] in train_questions for row in rows)
    held_out = {problem.question: problem for problem in problems["test"]}
    for row in rows:
        if row["subset"].startswith("arith-"):  # the chosen side is the exact solution, the rejected is not
            assert row["chosen"] == held_out[row["prompt"]].solution()
            assert not arithmetic.check_answer(held_out[row["prompt"]], row["rejected"])
    by_subset = {row["subset"]: row for row in rows}
    assert by_subset["refuse-undefined"]["prompt"].endswith("divide the result by 0.")
    assert by_subset["refuse-undefined"]["chosen"].startswith("I can't")
    assert by_subset["respond-benign"]["rejected"].startswith("I can't")
    assert set(DEFAULT_CATEGORIES["Safety"]) >= {"refuse-undefined", "respond-benign", "donotanswer"}


# -- a real test run -----------------------------------------------------------------------------------

def test_test_run_logs_category_scores_to_tensorboard_summary_and_json(run_cli, tmp_path):
    run_cli("test", "configs/reward/rewardbench.yaml", "--model.init_args.model=tiny", "--data.init_args.dataset=null",
            f"--data.init_args.test_file={SAMPLE}", "--data.init_args.max_length=256", name="rb")
    [log_dir] = list((tmp_path / "rb").glob("version_*"))
    result = json.loads((log_dir / "rewardbench.json").read_text())
    summary = json.loads((log_dir / "summary.json").read_text())["stages"]["test"]["metrics"]
    accuracy = {subset: summary[f"test/accuracy/{subset}"] for subset in REWARDBENCH_WEIGHTS}
    assert {subset: entry["accuracy"] for subset, entry in result["subsets"].items()} == pytest.approx(accuracy)
    assert result["subsets"]["math-prm"]["pairs"] == 2 and result["subsets"]["math-prm"]["weight"] == 984
    reasoning = 0.5 * accuracy["math-prm"] + 0.5 * sum(accuracy[name] for name in HEP) / 6
    chat_names = REWARDBENCH_CATEGORIES["Chat"]
    chat = sum(accuracy[name] * REWARDBENCH_WEIGHTS[name] for name in chat_names) / sum(
        REWARDBENCH_WEIGHTS[name] for name in chat_names)
    assert result["categories"]["Reasoning"] == pytest.approx(reasoning)
    assert result["categories"]["Chat"] == pytest.approx(chat)
    assert result["overall"] == pytest.approx(sum(result["categories"].values()) / 4)
    assert summary["test/rewardbench/overall"] == pytest.approx(result["overall"])
    assert summary["test/rewardbench/chat_hard"] == pytest.approx(result["categories"]["Chat Hard"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert {"test/rewardbench/overall", "test/rewardbench/reasoning"} <= set(events.Tags()["scalars"])
    assert events.Scalars("test/rewardbench/overall")[-1].value == pytest.approx(result["overall"], abs=1e-6)


def test_callback_refuses_unmapped_subsets_before_evaluating():
    from types import SimpleNamespace

    from callbacks.rewardbench import RewardBenchScores
    from datamodules.preference import PreferenceData

    data = PreferenceData(tokenizer="tiny", train_size=10, val_size=0, test_size=12)
    data.setup("test")  # the embedded pairs: subsets format / consistency / arithmetic
    with pytest.raises(ValueError, match=r"unknown subset name\(s\) \['arithmetic', 'consistency', 'format'\]"):
        RewardBenchScores().on_test_start(SimpleNamespace(datamodule=data), None)
    mapped = RewardBenchScores(categories={"Chat": ["format"], "Chat Hard": ["consistency"], "Reasoning": ["arithmetic"]})
    mapped.on_test_start(SimpleNamespace(datamodule=data), None)  # accepted once mapped


# -- the reward module's evaluation and prediction hooks -----------------------------------------------

def _rows_with_subsets():
    return [{"prompt": f"Compute {a}+{b}.", "chosen": f"{a + b}", "rejected": f"{a + b + 1}", "subset": subset}
            for a, b, subset in ((1, 2, "easy"), (3, 4, "hard"), (5, 1, "easy"), (2, 2, "easy"), (6, 3, "hard"))]


def test_predict_returns_row_ids_and_subset_names_and_test_counts_per_subset(tmp_path):
    import lightning.pytorch as pl
    import torch

    from datamodules.curation import write_rows
    from datamodules.preference import PreferenceData
    from modules.reward import RewardModel

    path = write_rows(tmp_path / "pairs.jsonl", _rows_with_subsets())
    torch.manual_seed(0)
    model = RewardModel(model="tiny")
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    data = PreferenceData(test_file=str(path), eval_batch_size=2)
    batches = trainer.predict(model, datamodule=data)
    assert torch.cat([batch["row_id"] for batch in batches]).tolist() == [0, 1, 2, 3, 4]
    assert sum((batch["subset"] for batch in batches), []) == ["easy", "hard", "easy", "easy", "hard"]
    chosen = torch.cat([batch["reward_chosen"] for batch in batches])
    rejected = torch.cat([batch["reward_rejected"] for batch in batches])

    data = PreferenceData(test_file=str(path), eval_batch_size=2)
    [metrics] = trainer.test(model, datamodule=data, verbose=False)
    right = (chosen > rejected).tolist()  # strict: a tie is wrong
    expected = {"easy": {"pairs": 3, "correct": sum(right[i] for i in (0, 2, 3))},
                "hard": {"pairs": 2, "correct": sum(right[i] for i in (1, 4))}}
    assert model.subset_counts == expected
    for name, counts in expected.items():
        assert metrics[f"test/accuracy/{name}"] == pytest.approx(counts["correct"] / counts["pairs"])


def test_one_subset_still_logs_its_accuracy_and_predict_leaves_out_the_placeholder_name(tmp_path):
    import lightning.pytorch as pl

    from datamodules.curation import write_rows
    from datamodules.preference import PreferenceData
    from modules.reward import RewardModel

    rows = [{key: value for key, value in row.items() if key != "subset"} for row in _rows_with_subsets()]
    path = write_rows(tmp_path / "pairs.jsonl", rows)
    model = RewardModel(model="tiny")
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    [metrics] = trainer.test(model, datamodule=PreferenceData(test_file=str(path)), verbose=False)
    assert metrics["test/accuracy/all"] == pytest.approx(metrics["test/accuracy"])
    assert model.subset_counts["all"]["pairs"] == 5
    [batch] = trainer.predict(model, datamodule=PreferenceData(test_file=str(path)))
    assert "subset" not in batch and batch["row_id"].tolist() == [0, 1, 2, 3, 4]


def test_a_test_run_limited_by_limit_test_batches_reports_the_pairs_it_evaluated(tmp_path):
    """--trainer.limit_test_batches evaluates part of the set: rewardbench.json reports the pairs evaluated
    (not the set's sizes), flags the evaluation as partial, lists the subsets it never reached, and warns;
    it does not blame the module."""
    import lightning.pytorch as pl

    from callbacks.rewardbench import RewardBenchScores
    from modules.reward import RewardModel

    model = RewardModel(model="tiny")

    def run(limit):
        callback = RewardBenchScores(output_file=str(tmp_path / f"rb_{limit}.json"))
        trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                             limit_test_batches=limit, callbacks=[callback])
        # 10 generated pairs, the five subsets in turn: two of each; batches of 2
        data = RewardBenchData(train_size=10, val_size=0, test_size=10, eval_batch_size=2, max_length=256)
        trainer.test(model, datamodule=data, verbose=False)
        assert json.loads((tmp_path / f"rb_{limit}.json").read_text())["evaluation"] == callback.result["evaluation"]
        return callback.result

    with warnings.catch_warnings(record=True) as warned_full:
        warnings.simplefilter("always")
        full = run(1.0)
    assert full["evaluation"] == {"complete": True, "pairs_evaluated": 10, "pairs_in_set": 10,
                                  "limit_test_batches": 1.0, "subsets_not_evaluated": []}
    assert {entry["pairs"] for entry in full["subsets"].values()} == {2}
    assert not any("pairs_in_set" in entry for entry in full["subsets"].values())

    with pytest.warns(UserWarning, match=r"partial evaluation \(--trainer.limit_test_batches=3\): 6 of 10 pairs\."):
        every_subset = run(3)  # 6 pairs: every subset reached, one of them twice
    assert every_subset["evaluation"]["complete"] is False and every_subset["evaluation"]["pairs_evaluated"] == 6
    assert every_subset["subsets"]["arith-format"]["pairs"] == 2
    assert every_subset["subsets"]["arith-consistency"] == {**every_subset["subsets"]["arith-consistency"],
                                                            "pairs": 1, "pairs_in_set": 2}
    assert model.subset_counts["arith-consistency"]["pairs"] == 1

    with pytest.warns(UserWarning, match=r"limit_test_batches=1\): 2 of 10 pairs; subsets not evaluated: "
                                         r"\['refuse-undefined', 'respond-benign', 'arith-step-error'\]") as record:
        two_subsets = run(1)
    assert any("no subset of ['Safety', 'Reasoning'] in the data, so 'overall' is the mean of the other" in str(w.message)
               for w in record)
    assert not any("no subset of" in str(w.message) for w in warned_full)
    assert sorted(two_subsets["subsets"]) == ["arith-consistency", "arith-format"]
    assert two_subsets["missing_categories"] == ["Safety", "Reasoning"]
    assert two_subsets["evaluation"]["subsets_not_evaluated"] == ["refuse-undefined", "respond-benign", "arith-step-error"]
