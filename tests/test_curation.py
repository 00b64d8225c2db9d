"""Curation stages on small fixtures with known answers: what each keeps and removes, and why, per source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from datamodules.common import DataError, read_rows
from datamodules.curation import (
    ConsistencyFilter,
    CuratedPreferenceData,
    Decontaminate,
    Deduplicate,
    DropInvalid,
    NgramIndex,
    PairText,
    SelectByScore,
    apply_step,
    attach_scores,
    classify_prompt,
    pair_problem,
    pair_text,
    read_score_shards,
    run_pipeline,
    run_step,
    top_count,
    words,
    write_rows,
)

FIXTURES = ROOT / "tests" / "fixtures"
POOL = FIXTURES / "curation_pool.jsonl"
EVAL = FIXTURES / "curation_eval_prompts.jsonl"
INVALID_IDS = {"identical", "empty-rejected", "ends-with-user", "missing-chosen", "bad-role"}


def ids(rows):
    return [row["id"] for row in rows]


@pytest.fixture(scope="module")
def pool():
    return read_rows(str(POOL))


@pytest.fixture(scope="module")
def valid_pool(pool):
    return [row for row in pool if row["id"] not in INVALID_IDS]


# -- rows ----------------------------------------------------------------------------------------------

def test_pair_text_of_the_four_shapes(pool):
    by_id = {row["id"]: row for row in pool}
    assert pair_text(by_id["std-explicit"]) == PairText("Compute 2+3.", "2+3=5\nAnswer: 5", "2+3=6\nAnswer: 6")
    assert pair_text(by_id["conv-implicit"]) == PairText(
        "Write a python function that adds two numbers.", "def add(a, b):\n    return a + b",
        "def add(a, b):\n    return a - b")
    # two strings: the shared prefix, cut back to the last whitespace
    assert pair_text(by_id["std-implicit"]) == PairText("Q: What is the capital of France? A:", "Paris", "Lyon")
    assert pair_text(by_id["conv-explicit"]) == PairText("Be brief.\nName a primary colour.", "Red.",
                                                         "Green is a primary colour of paint.")


def test_invalid_pair_rules_name_the_rule(pool):
    reasons = {row["id"]: (pair_problem(row, index, "pool.jsonl") or None) for index, row in enumerate(pool)}
    assert {key for key, value in reasons.items() if value is not None} == INVALID_IDS
    assert reasons["identical"].reason == "rejected: identical to chosen"
    assert reasons["empty-rejected"].reason == "rejected: empty"
    assert reasons["ends-with-user"].reason == "rejected: the conversation must end with an assistant turn"
    assert reasons["missing-chosen"].reason == "chosen: missing"
    assert reasons["bad-role"].reason.startswith("chosen[0].role: unknown role 'robot'")
    assert "pool.jsonl: row 6, field 'rejected'" in str(reasons["identical"])


def test_invalid_pair_rules_agree_with_the_reward_datamodule(pool):
    from datamodules.preference import PreferenceData
    from modules.lm import load_tokenizer

    data = PreferenceData(tokenizer="tiny", max_length=512)
    data.tokenizer = load_tokenizer("tiny")
    for index, row in enumerate(pool):
        try:
            data.encode(row, "train", "pool.jsonl", index)
            accepted = True
        except DataError:
            accepted = False
        assert accepted == (pair_problem(row, index, "pool.jsonl") is None), row["id"]


def test_sides_identical_once_formatted_are_rejected_by_both_paths():
    """A plain-string side and a message side that render to the same text are the same response: the
    reward datamodule and DropInvalid both refuse the pair, with the same message."""
    from datamodules import preference
    from modules.lm import load_tokenizer

    row = {"prompt": "Compute 2+2.", "chosen": "4", "rejected": [{"role": "assistant", "content": "4"}]}
    data = preference.PreferenceData(tokenizer="tiny", max_length=512)
    data.tokenizer = load_tokenizer("tiny")
    with pytest.raises(DataError) as raised:
        data.encode(row, "train", "pool.jsonl", 0)
    assert "identical" in str(raised.value)
    assert str(raised.value) == str(pair_problem(row, 0, "pool.jsonl"))


def test_drop_invalid_reports_per_source_and_reason(pool):
    kept, report = apply_step(DropInvalid(), pool, origin="pool.jsonl")
    assert ids(kept) == [row["id"] for row in pool if row["id"] not in INVALID_IDS]
    assert report["input_rows"] == 16 and report["kept_rows"] == 11 and report["removed_rows"] == 5
    assert report["by_source"]["crowd"] == {
        "input": 8, "kept": 6, "removed": {"invalid: rejected: identical to chosen": 1, "invalid: rejected: empty": 1}}
    assert report["by_source"]["synthetic"]["kept"] == 0
    assert report["by_source"]["synthetic"]["removed"] == {
        "invalid: rejected: the conversation must end with an assistant turn": 1, "invalid: chosen: missing": 1,
        "invalid: chosen[0].role: unknown role 'robot'; use one of ('system', 'user', 'assistant')": 1}


def test_stages_that_need_valid_pairs_say_so(pool):
    with pytest.raises(DataError, match=r"row 6, field 'rejected': identical to chosen .*run DropInvalid first"):
        apply_step(Deduplicate(), pool, origin="pool.jsonl")


# -- deduplication -------------------------------------------------------------------------------------

def test_deduplicate_exact_and_whitespace(valid_pool):
    kept, report = apply_step(Deduplicate(normalize_whitespace=True), valid_pool)
    assert "exact-copy" not in ids(kept) and "spacing-copy" not in ids(kept)
    assert ids(kept)[0] == "std-explicit"  # the first of the copies stays
    assert report["removed_by_reason"] == {"exact duplicate": 1, "duplicate after whitespace normalisation": 1}
    assert report["by_source"]["crowd"]["removed"] == report["removed_by_reason"]
    assert report["details"]["examples"][0] == {"row": 4, "duplicate_of_row": 0, "reason": "exact duplicate"}

    kept, report = apply_step(Deduplicate(normalize_whitespace=False), valid_pool)
    assert "spacing-copy" in ids(kept) and "exact-copy" not in ids(kept)
    assert report["removed_by_reason"] == {"exact duplicate": 1}


# -- decontamination -----------------------------------------------------------------------------------

def test_words_split_on_whitespace_and_strip_edge_punctuation():
    assert words("WHAT, exactly, is 7+5-3? (Really.)") == ["what", "exactly", "is", "7+5-3", "really"]


def test_ngram_index_on_hand_made_overlaps():
    index = NgramIndex(["one two three four five six seven eight nine", "Compute 7+5-3."], n=8, min_short_prompt_words=2)
    assert index.match("zero one two three four five six seven eight") == tuple(
        "one two three four five six seven eight".split())
    assert index.match("one two three four five six seven") is None  # 7 shared words: not more than 7
    assert index.match("please Compute 7+5-3 now") == ("compute", "7+5-3")  # a whole short eval prompt
    assert index.match("Compute 7+5-3+2.") is None  # another formula is another word
    assert index.match("compute 5-3") is None
    seven = NgramIndex(["one two three four five six seven eight nine"], n=7)
    assert seven.match("one two three four five six seven") is not None
    assert NgramIndex(["Compute 7+5-3."], n=8, match_short_prompts=False).match("Compute 7+5-3.") is None


def test_decontaminate_against_an_eval_file(valid_pool):
    kept, report = apply_step(Decontaminate(eval_files=[str(EVAL)], ngram=8, min_short_prompt_words=2), valid_pool)
    removed = set(ids(valid_pool)) - set(ids(kept))
    assert removed == {"shares-10-words", "wraps-short-eval", "case-and-punctuation"}
    assert "shares-7-words" in ids(kept) and "similar-formula" in ids(kept)
    assert report["removed_by_reason"] == {"prompt shares a run of 8 words with an evaluation prompt": 2,
                                           "prompt contains a whole (short) evaluation prompt": 1}
    assert report["by_source"]["forum"]["removed"] == {"prompt shares a run of 8 words with an evaluation prompt": 1,
                                                       "prompt contains a whole (short) evaluation prompt": 1}
    assert report["by_source"]["crowd"]["removed"] == {"prompt shares a run of 8 words with an evaluation prompt": 1}
    # with 7-word runs the 7-word overlap goes too
    kept, _ = apply_step(Decontaminate(eval_files=[str(EVAL)], ngram=7), valid_pool)
    assert "shares-7-words" not in ids(kept)
    # by default a two-word evaluation prompt is matched only whole: the prompt that wraps it stays
    kept, report = apply_step(Decontaminate(eval_files=[str(EVAL)]), valid_pool)
    assert "wraps-short-eval" in ids(kept) and report["details"]["very_short_eval_prompts_matched_only_whole"] == 1


def test_decontaminate_bad_eval_sets(valid_pool, tmp_path):
    with pytest.raises(DataError, match="curation_eval_empty.jsonl: the evaluation set is empty"):
        apply_step(Decontaminate(eval_files=[str(FIXTURES / "curation_eval_empty.jsonl")]), valid_pool)
    with pytest.raises(DataError, match="needs an evaluation set"):
        apply_step(Decontaminate(), valid_pool)
    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps({"question": "no prompt here"}) + "\n")
    with pytest.raises(DataError, match="row 0, field 'prompt': missing"):
        apply_step(Decontaminate(eval_files=[str(bad)]), valid_pool)


# -- consistency filter --------------------------------------------------------------------------------

def scored(prompt, chosen, rejected, source, **extra):
    return {"prompt": prompt, "chosen": "good answer", "rejected": "bad answer", "source": source,
            "score_chosen": chosen, "score_rejected": rejected, **extra}


def test_consistency_filter_keeps_only_correctly_ranked_pairs_of_the_named_sources():
    rows = [scored("a", 2.0, 1.0, "crowd"), scored("b", 1.0, 1.0, "crowd"), scored("c", 0.0, 3.0, "crowd"),
            scored("d", 0.0, 3.0, "trusted"), scored("e", 0.5, 0.4, "synthetic")]
    kept, report = apply_step(ConsistencyFilter(sources=["crowd", "synthetic"]), rows)
    assert [row["prompt"] for row in kept] == ["a", "d", "e"]  # a tie is wrong; trusted is not checked
    assert report["by_source"]["crowd"]["removed"] == {
        "ranked wrong by the reward model 'score' (chosen <= rejected)": 2}
    assert report["details"]["model_accuracy_per_source"] == {"crowd": 1 / 3, "synthetic": 1.0}
    kept, _ = apply_step(ConsistencyFilter(sources=None), rows)
    assert [row["prompt"] for row in kept] == ["a", "e"]


def test_consistency_filter_needs_scores():
    rows = [{"prompt": "a", "chosen": "x", "rejected": "y", "source": "crowd", "judge_chosen": 2.0, "judge_rejected": 1.0},
            {"prompt": "b", "chosen": "x", "rejected": "y", "source": "crowd"}]
    with pytest.raises(DataError, match=r"row 1, field 'judge_chosen': expected a finite score, got None"):
        apply_step(ConsistencyFilter(sources=["crowd"], score_prefix="judge"), rows, origin="scored.jsonl")


# -- score-based selection -----------------------------------------------------------------------------

def test_top_count_and_categories():
    assert [top_count(10, 0.3), top_count(7, 0.3), top_count(11, 0.3), top_count(3, 0.1), top_count(5, 1.0)] == [3, 3, 4, 1, 5]
    assert classify_prompt("Compute 7+5-3.") == "math"
    assert classify_prompt("Solve x^2 = 4 for x.") == "math"
    assert classify_prompt("Write a Python function that sorts a list.") == "code"
    assert classify_prompt("Fix this: ```x = 1 + 2```") == "code"
    assert classify_prompt("Tell me a story about a dragon.") == "other"


def selection_pool():
    """10 math prompts with mean scores 1..10, 3 code prompts (means 1, 2, 3) and 10 other prompts (1..10);
    each pair is chosen = mean + 1, rejected = mean - 1."""
    rows = []
    for value in range(1, 11):
        rows.append(scored(f"Compute {value}+{value}.", value + 1.0, value - 1.0, "crowd"))
        rows.append(scored(f"Tell me story number {value}.", value + 1.0, value - 1.0, "crowd"))
    for value in range(1, 4):
        rows.append(scored(f"Write a python script number {value}.", value + 1.0, value - 1.0, "crowd"))
    return rows


def test_select_by_score_keeps_the_top_fraction_per_category():
    kept, report = apply_step(SelectByScore(), selection_pool())
    prompts = {row["prompt"] for row in kept}
    # math: ceil(0.3 x 10) = 3 -> means 10, 9, 8; other: ceil(0.1 x 10) = 1 -> 10; code: ceil(0.3 x 3) = 1 -> 3
    assert prompts == {"Compute 10+10.", "Compute 9+9.", "Compute 8+8.", "Tell me story number 10.",
                       "Write a python script number 3."}
    details = report["details"]["categories"]
    assert details["math"] == {"prompts": 10, "kept_prompts": 3, "fraction": 0.3, "lowest_kept_score": 8.0,
                               "highest_removed_score": 7.0}
    assert details["other"]["kept_prompts"] == 1 and details["code"]["kept_prompts"] == 1
    assert report["removed_by_reason"] == {"prompt below the top 10% of category 'other' by mean score": 9,
                                           "prompt below the top 30% of category 'math' by mean score": 7,
                                           "prompt below the top 30% of category 'code' by mean score": 2}


def test_select_by_score_source_offsets_break_ties_and_prompts_group_their_pairs():
    rows = [scored("Compute 9+9.", 10.0, 8.0, "crowd"), scored("Compute 1+8.", 9.5, 8.5, "trusted")]
    rows += [scored(f"Compute {value}+0.", 1.0, 0.0, "crowd") for value in range(8)]  # 10 math prompts in all
    keep_one = {"math": 0.1}
    kept, _ = apply_step(SelectByScore(fractions=keep_one), rows)
    assert [row["prompt"] for row in kept] == ["Compute 9+9."]  # equal means (9.0): the first seen wins
    kept, _ = apply_step(SelectByScore(fractions=keep_one, source_offsets={"crowd": -0.05}), rows)
    assert [row["prompt"] for row in kept] == ["Compute 1+8."]  # 9.0 beats 8.95
    # a prompt with two pairs is scored by the mean of its four responses: (4 + 0 + 10 + 2) / 4 = 4
    grouped = [scored("Compute 5+5.", 4.0, 0.0, "crowd"), scored("Compute 5+5.", 10.0, 2.0, "crowd"),
               scored("Compute 6+6.", 4.5, 3.0, "crowd")]
    kept, report = apply_step(SelectByScore(fractions={"math": 0.5}), grouped)
    assert [row["prompt"] for row in kept] == ["Compute 5+5.", "Compute 5+5."]
    assert report["details"]["categories"]["math"]["lowest_kept_score"] == 4.0
    assert report["details"]["categories"]["math"]["highest_removed_score"] == 3.75


def test_select_by_score_on_the_chosen_score_and_subsets_it_empties():
    # one pair per prompt: an easy pair (bad rejected), a hard pair (rejected almost right), a pair whose
    # "chosen" is itself poor (a flipped label), and a second easy pair
    rows = [scored("Compute 1+1.", 3.0, -3.0, "crowd", subset="easy"), scored("Compute 2+2.", 2.8, 2.6, "crowd", subset="hard"),
            scored("Compute 3+3.", 0.5, 2.9, "crowd", subset="hard"), scored("Compute 4+4.", 2.5, -2.0, "crowd", subset="easy")]
    half = {"math": 0.5}
    # means 0.0, 2.7, 1.7, 0.25: the two hard prompts survive and the easy subset is emptied, with a warning
    with pytest.warns(UserWarning, match=r"removed every pair of subset \['easy'\]"):
        kept, report = apply_step(SelectByScore(fractions=half), rows)
    assert [row["prompt"] for row in kept] == ["Compute 2+2.", "Compute 3+3."]
    assert report["details"]["per_subset"] == {"easy": {"input": 2, "kept": 0}, "hard": {"input": 2, "kept": 2}}
    assert report["details"]["subset_emptied"] == ["easy"]
    # chosen scores 3.0, 2.8, 0.5, 2.5: the flipped pair ranks last, both subsets keep pairs
    kept, report = apply_step(SelectByScore(fractions=half, prompt_score="chosen"), rows)
    assert [row["prompt"] for row in kept] == ["Compute 1+1.", "Compute 2+2."]
    assert report["details"]["subset_emptied"] == []
    kept, report = apply_step(SelectByScore(fractions={"math": 0.75}, prompt_score="chosen"), rows)
    assert [row["prompt"] for row in kept] == ["Compute 1+1.", "Compute 2+2.", "Compute 4+4."]
    assert report["removed_by_reason"] == {"prompt below the top 75% of category 'math' by chosen score": 1}
    with pytest.raises(ValueError, match="prompt_score must be one of"):
        SelectByScore(prompt_score="median")


def test_select_by_score_category_column_and_bad_categories():
    rows = [scored("p1", 1.0, 0.0, "crowd", category="chat"), scored("p2", 3.0, 0.0, "crowd", category="chat")]
    kept, _ = apply_step(SelectByScore(fractions={"chat": 0.5}, category_field="category"), rows)
    assert [row["prompt"] for row in kept] == ["p2"]
    with pytest.raises(DataError, match=r"row 0, field 'category': category 'chat' has no fraction"):
        apply_step(SelectByScore(category_field="category"), rows, origin="scored.jsonl")
    with pytest.raises(DataError, match=r"field 'category': expected a category name, got None"):
        apply_step(SelectByScore(fractions={"chat": 0.5}, category_field="category"),
                   [scored("p3", 1.0, 0.0, "crowd")])
    with pytest.raises(ValueError, match=r"fractions\['math'\] must be in \(0, 1\]"):
        SelectByScore(fractions={"math": 1.5})


# -- files, chaining, reports --------------------------------------------------------------------------

def test_pipeline_writes_every_stage_and_a_report(tmp_path):
    steps = [DropInvalid(), Deduplicate(), Decontaminate(eval_files=[str(EVAL)], min_short_prompt_words=2)]
    summary = run_pipeline(str(POOL), str(tmp_path / "out"), steps)
    out = tmp_path / "out"
    assert sorted(path.name for path in out.iterdir()) == [
        "01_drop_invalid.jsonl", "01_drop_invalid.report.json", "02_deduplicate.jsonl", "02_deduplicate.report.json",
        "03_decontaminate.jsonl", "03_decontaminate.report.json", "curated.jsonl", "report.json"]
    curated = read_rows(str(out / "curated.jsonl"))
    assert ids(curated) == ["std-explicit", "conv-implicit", "std-implicit", "conv-explicit", "shares-7-words",
                            "similar-formula"]
    assert curated[1]["chosen"] == read_rows(str(POOL))[1]["chosen"]  # rows are written back unchanged
    assert [step["removed_rows"] for step in summary["steps"]] == [5, 2, 3]
    assert summary["input_rows"] == 16 and summary["output_rows"] == 6
    assert summary["sources"] == {"crowd": {"input": 8, "output": 3}, "forum": {"input": 4, "output": 2},
                                  "synthetic": {"input": 3, "output": 0}, "trusted": {"input": 1, "output": 1}}
    assert json.loads((out / "report.json").read_text())["steps"][2]["step"] == "decontaminate"


def test_one_step_on_parquet(tmp_path, valid_pool):
    explicit = [row for row in valid_pool if isinstance(row.get("prompt"), str)]  # one shape per Parquet file
    source = write_rows(tmp_path / "pool.parquet", explicit)
    report = run_step(Deduplicate(), str(source), str(tmp_path / "dedup.parquet"))
    kept = read_rows(str(tmp_path / "dedup.parquet"))
    assert [row["id"] for row in kept] == [row["id"] for row in explicit if row["id"] not in ("exact-copy", "spacing-copy")]
    assert report["removed_rows"] == 2 and kept[0] == explicit[0]
    assert json.loads(Path(f"{tmp_path / 'dedup.parquet'}.report.json").read_text())["kept_rows"] == len(kept)
    with pytest.raises(DataError, match="Parquet needs one type per column"):
        write_rows(tmp_path / "mixed.parquet", valid_pool)


def test_curated_data_module_trains_on_the_curated_rows(tmp_path):
    data = CuratedPreferenceData(train_file=str(POOL), curation_dir=str(tmp_path / "cur"), tokenizer="tiny",
                                 curation_steps=[DropInvalid(), Deduplicate()])
    data.prepare_data()
    data.setup("fit")
    assert len(data.datasets["train"]) == 9  # 16 rows - 5 invalid - 2 duplicates
    report = data.data_report
    assert report["curation"]["output_rows"] == 9 and report["rows"]["train"] == 9
    assert [step["removed_rows"] for step in report["curation"]["steps"]] == [5, 2]


# -- scores --------------------------------------------------------------------------------------------

def test_score_shards_merge_and_report_unscored_rows(tmp_path, pool):
    first, second = tmp_path / "s.rank0.jsonl", tmp_path / "s.rank1.jsonl"
    first.write_text("[0, 1.5, 0.5]\n[2, 0.0, 1.0]\n")
    second.write_text("[1, 2.0, 1.0]\n[0, 1.5, 0.5]\n")  # row 0 again: the distributed sampler's padding
    scores = read_score_shards([first, second])
    assert scores == {0: (1.5, 0.5), 1: (2.0, 1.0), 2: (0.0, 1.0)}
    rows = pool[:3] + [pool[6]]  # three valid pairs and the identical one
    merged, report = attach_scores(rows, scores, "pool.jsonl", "judge")
    assert [row["judge_chosen"] for row in merged] == [1.5, 2.0, 0.0]
    assert report["unscored_by_reason"] == {"invalid: rejected: identical to chosen": 1}
    assert report["accuracy_on_labels"] == pytest.approx(2 / 3)
    second.write_text("[0, 1.505, 0.5]\n")  # a repeat in another batch shape, within bf16 noise: the first stands
    assert read_score_shards([first, second])[0] == (1.5, 0.5)
    second.write_text("[0, 9.0, 0.5]\n")
    with pytest.raises(DataError, match="row 0 was scored twice with different scores"):
        read_score_shards([first, second])


def test_scoring_predict_run_matches_direct_rewards(run_cli, tmp_path, pool):
    """The predict stage scores every valid pair with the checkpoint's weights, sorted by length and merged
    back by row id; invalid rows are reported, not scored."""
    from datamodules.preference import PreferenceData
    from modules.reward import RewardModel

    torch.manual_seed(0)
    model = RewardModel(model="tiny")
    model.configure_model()
    checkpoint = tmp_path / "rm.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {"model": "tiny"}}, checkpoint)
    output = tmp_path / "scored.jsonl"
    run_cli("predict", "configs/curation/score.yaml", f"--model.init_args.checkpoint={checkpoint}",
            f"--data.init_args.input_file={POOL}", f"--model.init_args.output_file={output}",
            "--model.init_args.score_prefix=rm", "--data.init_args.eval_batch_size=4", name="score")
    rows = read_rows(str(output))
    report = json.loads(Path(f"{output}.report.json").read_text())
    assert ids(rows) == [row["id"] for row in pool if row["id"] not in INVALID_IDS]
    assert report["scored_rows"] == 11 and report["unscored_rows"] == 5
    assert report["by_source"]["synthetic"]["unscored"]["invalid: chosen: missing"] == 1
    assert not list(tmp_path.glob("scored.jsonl.rank*"))  # shards merged and removed

    data = PreferenceData(tokenizer="tiny", max_length=512)
    data.tokenizer = model.tokenizer
    model.eval()
    items = [data.encode(row, "test", "pool", index) for index, row in enumerate(rows)]
    with torch.no_grad():
        chosen, rejected = model.pair_rewards(data.collate(items))
    torch.testing.assert_close(torch.tensor([row["rm_chosen"] for row in rows]), chosen, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor([row["rm_rejected"] for row in rows]), rejected, rtol=1e-4, atol=1e-4)


def test_curation_only_from_a_config_loads_no_model(tmp_path, monkeypatch):
    from datamodules import curation
    from modules import lm

    monkeypatch.setattr(lm, "load_tokenizer", lambda *a, **k: pytest.fail("curation-only must not load a model"))
    steps = ("[{class_path: datamodules.curation.DropInvalid}, {class_path: datamodules.curation.Deduplicate}, "
             "{class_path: datamodules.curation.Decontaminate, init_args: {eval_files: [" + str(EVAL) + "], "
             "min_short_prompt_words: 2}}]")
    # both override forms: --key=value and --key value (the form the configs' headers show)
    summary = curation.main(["--config", str(ROOT / "configs/curation/clean.yaml"), "--data.init_args.train_file", str(POOL),
                             f"--data.init_args.curation_dir={tmp_path / 'clean'}", f"--data.init_args.curation_steps={steps}"])
    assert summary["output_rows"] == 6 and [step["step"] for step in summary["steps"]] == [
        "drop_invalid", "deduplicate", "decontaminate"]
    assert (tmp_path / "clean" / "curated.jsonl").exists()


def test_the_curation_script_reports_a_missing_input_in_one_line(tmp_path, monkeypatch, capsys):
    import cli
    from datamodules import curation

    monkeypatch.chdir(tmp_path)  # no runs/curation/eval.jsonl here
    with pytest.raises(SystemExit) as exit_info:  # what `python datamodules/curation.py ...` runs
        cli.run_reporting_errors(lambda: curation.main(["--config", str(ROOT / "configs/curation/clean.yaml"),
                                                        "--data.init_args.train_file", str(POOL),
                                                        f"--data.init_args.curation_dir={tmp_path / 'out'}"]))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: data file not found: runs/curation/eval.jsonl\n") and "Traceback" not in err
    assert err.rstrip().endswith("(CLI_TRACEBACK=1 shows the traceback)")


# -- the recipe's data ---------------------------------------------------------------------------------

def original_pairs(pool, source, subset=None):
    """The pool's original pairs of a source: exact copies collapse; respaced and invalid copies are left out."""
    return list({json.dumps(row, sort_keys=True): row for row in pool
                 if row["source"] == source and subset in (None, row["subset"]) and row["rejected"][1]["content"].strip()
                 and row["chosen"] != row["rejected"]
                 and row["chosen"][1]["content"] == row["chosen"][1]["content"].strip()}.values())


def test_recipe_pool_is_disjoint_from_the_embedded_defaults_and_the_evaluation_sets():
    """No backbone (tiny-sft's SFT problems) or existing judge (bt.yaml's pairs) saw the recipe's problems,
    and the pool never shares a problem with the validation or evaluation set except the planted leaks."""
    import yaml

    from datamodules import arithmetic
    from modules.sft import PRESET_SFT_PROBLEMS
    from recipes import reward_curation

    bt = yaml.safe_load((Path(__file__).parents[1] / "configs/reward/bt.yaml").read_text())["data"]["init_args"]
    bt_sizes = {split: bt[f"{split}_size"] for split in ("train", "val", "test")}
    # the recipe skips the problems the defaults draw first: bt.yaml's pairs (which include tiny-sft's SFT problems)
    assert reward_curation.EMBEDDED_DRAWS == sum(bt_sizes.values()) >= PRESET_SFT_PROBLEMS
    data = reward_curation.build_data(scale=0.1, flip_fraction=0.3, seed=0)
    embedded = {problem.question for split in arithmetic.generate_splits(bt_sizes, seed=0).values() for problem in split}

    def base_question(prompt):  # "Compute 3+4, then divide the result by 0." -> "Compute 3+4."
        return prompt.split(",")[0].removesuffix(".") + "."

    pool_questions = {base_question(row["chosen"][0]["content"]) for row in data["pool"] if row["source"] != "forum"}
    eval_questions = {base_question(row["prompt"]) for row in data["eval"]}
    val_questions = {base_question(row["prompt"]) for row in data["val"]}
    assert not (pool_questions | eval_questions | val_questions) & embedded
    assert not pool_questions & eval_questions and not pool_questions & val_questions and not eval_questions & val_questions
    tasks = {reward_curation.task_of(row["chosen"][0]["content"]): row["task"] for row in data["pool"]}
    assert set(tasks) == {"arithmetic", "divide-by-zero", "divide-by-one"} and all(k == v for k, v in tasks.items())
    assert data["composition"]["pool total"] == len(data["pool"])
    # the label check knows every planted flip: none among the trusted pairs, each flipped crowd pair found
    assert not any(reward_curation.wrong_label(row) for row in data["trusted"])
    flagged = sum(map(reward_curation.wrong_label, original_pairs(data["pool"], "crowd")))
    assert flagged == data["composition"]["crowd labels flipped"] > 0
    assert {reward_curation.wrong_label(row) for row in data["pool"] if row["source"] == "synthetic"} == {None}


def test_recipe_refusal_bias_only_relabels_crowd_benign_pairs_and_the_corrected_pool_has_right_labels():
    from recipes import reward_curation

    def prefers_refusal(row):
        return reward_curation.wrong_label(row) if row["subset"] == "respond-benign" else None

    plain = reward_curation.build_data(scale=0.2, flip_fraction=0.3, seed=1)
    biased = reward_curation.build_data(scale=0.2, flip_fraction=0.3, seed=1, benign_refusal_share=0.8)
    assert len(plain["pool"]) == len(biased["pool"]) and plain["eval"] == biased["eval"] and plain["val"] == biased["val"]
    relabelled = []
    for before, after in zip(plain["pool"], biased["pool"], strict=True):
        assert after["chosen"][0] == before["chosen"][0] and after["source"] == before["source"]  # same prompt, same order
        if after != before:  # only a swap of the two responses of a crowd respond-benign pair (or a copy of one)
            assert after["chosen"] == before["rejected"] and after["rejected"] == before["chosen"]
            assert after["subset"] == "respond-benign" and after["source"] == "crowd"
            assert (prefers_refusal(before), prefers_refusal(after)) == (False, True)
            relabelled.append(after)
    benign = original_pairs(plain["pool"], "crowd", "respond-benign")
    assert relabelled and sum(map(prefers_refusal, benign)) < 0.5 * len(benign)  # random flips alone: a minority
    originals = original_pairs(biased["pool"], "crowd", "respond-benign")
    assert len(originals) == len(benign) > 20
    assert sum(map(prefers_refusal, originals)) == round(0.8 * len(originals))  # exactly the requested share
    assert biased["composition"]["crowd labels flipped"] == (plain["composition"]["crowd labels flipped"]
                                                             + biased["composition"]["of which: respond-benign flipped to prefer the refusal (bias)"])
    corrected = reward_curation.corrected_labels(biased["pool"])
    assert [row["chosen"][0] for row in corrected] == [row["chosen"][0] for row in biased["pool"]]
    still_wrong = [row for row in corrected if reward_curation.wrong_label(row)]
    # only invalid rows (both sides equal, or an empty side) can keep a wrong label; the datamodule drops those
    assert all(row["chosen"] == row["rejected"] or not row["rejected"][1]["content"].strip() for row in still_wrong)


def test_consistency_filter_checks_only_the_listed_categories():
    rows = [scored("a", 0.0, 3.0, "crowd", task="arithmetic"), scored("b", 0.0, 3.0, "crowd", task="divide-by-one"),
            scored("c", 2.0, 1.0, "crowd", task="arithmetic"), scored("d", 0.0, 3.0, "crowd")]
    kept, report = apply_step(ConsistencyFilter(sources=["crowd"], category_field="task", categories=["arithmetic"]), rows)
    assert [row["prompt"] for row in kept] == ["b", "c", "d"]  # b: an unchecked task; d: no task at all
    assert report["details"]["checked_per_source"] == {"crowd": 2}
    with pytest.raises(ValueError, match="together"):
        ConsistencyFilter(category_field="task")
    assert report["details"]["rows_without_category_column"] == 1
    with pytest.raises(DataError, match="no row of the checked sources has the category column 'tasks'"):
        apply_step(ConsistencyFilter(sources=["crowd"], category_field="tasks", categories=["arithmetic"]), rows)


# -- bad input: errors name the file, row and field; no run leaves a folder that mixes two runs ----------

def test_a_rerun_on_an_earlier_runs_output_in_the_same_folder_keeps_its_input_and_the_users_files(tmp_path):
    out = tmp_path / "cur"
    run_pipeline(str(POOL), str(out), [DropInvalid(), Deduplicate()])
    (out / "2024_pairs.jsonl").write_text(POOL.read_text())  # a user's file shaped like NN_<word>: not ours
    summary = run_pipeline(str(out / "curated.jsonl"), str(out),
                           [Decontaminate(eval_files=[str(EVAL)], min_short_prompt_words=2)])
    assert summary["output_rows"] == 6 and (out / "2024_pairs.jsonl").read_text() == POOL.read_text()
    assert not (out / "02_deduplicate.jsonl").exists()  # the earlier run's stage files went


def test_a_failed_run_leaves_no_curated_file_or_report_and_readers_say_so(tmp_path):
    """A re-run first deletes the previous run's files and writes report.json last: a run that fails
    leaves no curated.*/report.json beside its partial stage files, and every rank's setup refuses it."""
    out = tmp_path / "cur"
    good_steps = [DropInvalid(), Deduplicate(), Decontaminate(eval_files=[str(EVAL)], min_short_prompt_words=2)]
    run_pipeline(str(POOL), str(out), good_steps)
    (out / "notes.txt").write_text("mine")  # not a pipeline file: stays

    class Broken(Deduplicate):
        name = "broken"

        def apply(self, rows, fields, origin):
            raise DataError(f"{origin}: the stage broke")

    with pytest.raises(DataError, match="the stage broke"):
        run_pipeline(str(POOL), str(out), [DropInvalid(), Broken()])
    assert sorted(path.name for path in out.iterdir()) == ["01_drop_invalid.jsonl", "01_drop_invalid.report.json",
                                                           "notes.txt"]
    # a rank that did not curate (curation_summary None) reads the folder: it must see the run did not finish
    rank1 = CuratedPreferenceData(train_file=str(POOL), curation_dir=str(out), tokenizer="tiny", curation_steps=good_steps)
    with pytest.raises(DataError, match=r"cur/report.json is missing: no curation run into .* has finished"):
        rank1.setup("fit")

    run_pipeline(str(POOL), str(out), good_steps)
    rank1.setup("fit")
    assert rank1.data_report["curation"]["output_rows"] == 6 == len(rank1.datasets["train"])
    other_input = tmp_path / "other.jsonl"
    other_input.write_text(POOL.read_text())
    with pytest.raises(DataError, match=r"report.json reports a curation of .*curation_pool.jsonl, not of .*other.jsonl"):
        CuratedPreferenceData(train_file=str(other_input), curation_dir=str(out), tokenizer="tiny",
                              curation_steps=good_steps).setup("fit")


def test_a_curation_that_fails_on_process_0_stops_every_process_in_setup(tmp_path):
    from types import SimpleNamespace

    steps = [DropInvalid(), Decontaminate(eval_files=[str(tmp_path / "missing.jsonl")])]

    def data_on(rank: int, message_from_zero: str | None) -> CuratedPreferenceData:
        data = CuratedPreferenceData(train_file=str(POOL), curation_dir=str(tmp_path / "cur"), tokenizer="tiny",
                                     curation_steps=steps)
        strategy = SimpleNamespace(broadcast=lambda value, src=0: value if rank == 0 else message_from_zero)
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank, strategy=strategy)
        return data

    zero = data_on(0, None)
    zero.prepare_data()  # only process 0 curates; its failure waits for setup, where every process meets
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        zero.setup("fit")
    with pytest.raises(DataError, match="curation failed on process 0: FileNotFoundError: .*missing.jsonl"):
        data_on(1, "FileNotFoundError: data file not found: missing.jsonl").setup("fit")


def test_pipeline_output_path_is_checked_before_any_work(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("")
    with pytest.raises(ValueError, match=r"taken/curated.jsonl: .*taken is a file, not a folder"):
        run_pipeline(str(POOL), str(a_file), [DropInvalid()])
    with pytest.raises(ValueError, match=r"write .jsonl, .json or .parquet, not '.csv'"):
        run_pipeline(str(POOL), str(tmp_path / "out"), [DropInvalid()], output_suffix=".csv")
    assert not (tmp_path / "out").exists()


def test_decontaminate_with_a_named_prompt_column_no_eval_row_has(valid_pool, tmp_path):
    """A named eval_prompt_field is used alone: a misspelt one is an error naming the file and the column,
    never a silent fall-back to the shared text of the chosen/rejected responses."""
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"question": "Compute 2+3.", "chosen": "It is 5", "rejected": "It is 6"}) + "\n")
    with pytest.raises(DataError, match=r"eval.jsonl: no row has the column 'questoin' that eval_prompt_field names "
                                        r"\(columns: \['chosen', 'question', 'rejected'\]\)"):
        apply_step(Decontaminate(eval_files=[str(eval_file)], eval_prompt_field="questoin", ngram=2), valid_pool)
    kept, report = apply_step(Decontaminate(eval_files=[str(eval_file)], eval_prompt_field="question", ngram=2), valid_pool)
    assert "std-explicit" not in ids(kept)  # its prompt is "Compute 2+3."
    # unset, the field is 'prompt' with the implicit prompt as fall-back: here "It is", which matches nothing
    kept, _ = apply_step(Decontaminate(eval_files=[str(eval_file)], ngram=2), valid_pool)
    assert "std-explicit" in ids(kept)
    eval_file.write_text(json.dumps({"question": "Compute 2+3."}) + "\n" + json.dumps({"chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"eval.jsonl: row 1, field 'question': missing \(eval_prompt_field names it\)"):
        apply_step(Decontaminate(eval_files=[str(eval_file)], eval_prompt_field="question"), valid_pool)


def test_sources_no_row_has_are_an_error_listing_the_sources_present(tmp_path):
    rows = [scored("a", 2.0, 1.0, "crowd"), scored("b", 0.0, 1.0, "trusted")]
    with pytest.raises(DataError, match=r"scored.jsonl: ConsistencyFilter sources \['crwod'\]: no row has these in its "
                                        r"'source' column \(sources present: \['crowd', 'trusted'\]\)"):
        apply_step(ConsistencyFilter(sources=["crowd", "crwod"]), rows, origin="scored.jsonl")
    with pytest.raises(DataError, match=r"SelectByScore source_offsets \['synthtic'\]: no row has these .*"
                                        r"\(sources present: \['crowd', 'trusted'\]\)"):
        apply_step(SelectByScore(source_offsets={"crowd": -0.1, "synthtic": -0.1}), rows, origin="scored.jsonl")
    # in a pipeline the check runs on the input before any stage: nothing is written
    pool_file = write_rows(tmp_path / "scored.jsonl", rows)
    with pytest.raises(DataError, match=r"ConsistencyFilter sources \['crwod'\]"):
        run_pipeline(str(pool_file), str(tmp_path / "out"), [DropInvalid(), ConsistencyFilter(sources=["crwod"])])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    # a source an earlier stage removed entirely is no error there: the report lists it
    rows.append({**rows[1], "source": "synthetic", "rejected": rows[1]["chosen"]})  # invalid: dropped at stage 1
    pool_file = write_rows(tmp_path / "scored.jsonl", rows)
    summary = run_pipeline(str(pool_file), str(tmp_path / "out"), [DropInvalid(), ConsistencyFilter(sources=["synthetic"])])
    assert summary["steps"][1]["details"]["listed_sources_without_rows"] == ["synthetic"]


def test_a_pair_mixing_a_message_list_and_a_string_needs_a_prompt_in_both_validators():
    from datamodules.preference import PreferenceData
    from modules.lm import load_tokenizer

    row = {"chosen": [{"role": "user", "content": "Compute 2+2."}, {"role": "assistant", "content": "4"}],
           "rejected": "Compute 2+2. 5"}
    problem = pair_problem(row, 3, "pool.jsonl")
    assert str(problem).startswith("pool.jsonl: row 3, field 'prompt': missing: 'chosen' is a message list and "
                                   "'rejected' a string")
    data = PreferenceData(tokenizer="tiny", max_length=512)
    data.tokenizer = load_tokenizer("tiny")
    with pytest.raises(DataError) as raised:
        data.encode(row, "train", "pool.jsonl", 3)
    assert str(raised.value) == str(problem)
    kept, report = apply_step(DropInvalid(), [row], origin="pool.jsonl")
    assert kept == [] and report["removed_rows"] == 1
    assert pair_problem({**row, "prompt": "Compute 2+2."}, 3, "pool.jsonl") is None  # with a prompt it is fine
    with pytest.raises(DataError, match=r"eval.jsonl: row 7, field 'prompt': missing: the row mixes a message list"):
        pair_text(row, origin="eval.jsonl", index=7)


def test_scoring_output_path_is_checked_before_scoring(tmp_path):
    """setup (before the weights load and any pair is scored) refuses an output path that cannot be written."""
    from modules.reward_scoring import RewardScorer

    def setup_scorer(output_file, **kwargs):
        RewardScorer(output_file=str(output_file), model="tiny", **kwargs).setup("predict")

    a_file = tmp_path / "good.jsonl"
    a_file.write_text("")
    with pytest.raises(ValueError, match=r"output_file .*good.jsonl/scored.jsonl: .*good.jsonl is a file, not a folder"):
        setup_scorer(a_file / "scored.jsonl")
    with pytest.raises(ValueError, match=r"output_file .*sub/a/b.jsonl: .*good.jsonl is a file, so the folder"):
        setup_scorer(a_file / "sub" / "a" / "b.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"output_file .*dir.jsonl is a folder"):
        setup_scorer(tmp_path / "dir.jsonl")
    with pytest.raises(ValueError, match=r"output_file .*scored.csv: write .jsonl, .json or .parquet"):
        setup_scorer(tmp_path / "scored.csv")
    with pytest.raises(ValueError, match=r"report_file .*dir.jsonl is a folder"):
        setup_scorer(tmp_path / "new" / "scored.jsonl", report_file=str(tmp_path / "dir.jsonl"))
    setup_scorer(tmp_path / "new" / "deeper" / "scored.jsonl")  # folders still to be made are fine
    assert not (tmp_path / "new").exists()  # and the check creates nothing


def test_a_later_stage_error_names_the_input_row_and_blames_the_scores_only_when_missing(tmp_path):
    rows = [scored("a", 2.0, 1.0, "crowd"), {**scored("b", 1.0, 0.0, "crowd"), "rejected": "good answer"},
            scored("c", 2.0, 1.0, "crowd"), scored("d", float("nan"), 1.0, "crowd")]
    pool_file = write_rows(tmp_path / "pool.jsonl", rows)
    out = tmp_path / "out"
    with pytest.raises(DataError) as raised:
        run_pipeline(str(pool_file), str(out), [DropInvalid(), ConsistencyFilter()])
    message = str(raised.value)
    assert message.startswith(f"{pool_file}: row 3 (row 2 of {out / '01_drop_invalid.jsonl'}, the output of stage 1 "
                              f"'drop_invalid'), field 'score_chosen': expected a finite score, got nan")
    assert "scoring stage" not in message  # the column is there: the NaN is in the data
    with pytest.raises(DataError, match=r"pool.jsonl: row 0 .*field 'judge_chosen': expected a finite score, got None "
                                        r"\(the row has no such column: run the scoring stage first"):
        run_pipeline(str(pool_file), str(out), [DropInvalid(), ConsistencyFilter(score_prefix="judge")])


def test_recipe_seeds_summary_reads_finished_seeds_and_compares_raw_with_the_chosen_curated_run(tmp_path):
    import statistics

    from recipes import reward_curation

    settings = vars(reward_curation.parse_args(["--out", str(tmp_path)]))  # the defaults, as a run records them

    def results(raw, curated, chosen="task_chosen"):
        run = {"train_pairs": 100, "overall": 0.0}
        return {"chosen_selection": chosen, "settings": settings,
                "runs": {"raw": {**run, "accuracy": raw, "overall": raw - 0.05},
                         f"curated_{chosen}": {**run, "accuracy": curated, "overall": curated - 0.04, "train_pairs": 25},
                         "curated_none": {**run, "accuracy": 0.0}, "raw_labels_corrected": {**run, "accuracy": raw + 0.1}},
                "label_quality": {"raw pool": {"wrong_label_share": 0.25}, "after the filters": {"wrong_label_share": 0.2},
                                  f"selection {chosen}": {"wrong_label_share": 0.1}}}

    for seed, (raw, curated) in {0: (0.79, 0.81), 1: (0.83, 0.81), 2: (0.80, 0.83)}.items():
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "results.json").write_text(json.dumps(results(raw, curated)))
    summary = reward_curation.main(["--out", str(tmp_path), "--seeds", "0,1,2"])  # reads, trains nothing
    assert [row["difference"] for row in summary["seeds"]] == pytest.approx([0.02, -0.02, 0.03])
    assert summary["difference"]["mean"] == pytest.approx(0.01)
    assert summary["difference"]["sd"] == pytest.approx(statistics.stdev([0.02, -0.02, 0.03]))
    assert summary["overall_difference"]["mean"] == pytest.approx(0.01 + 0.01)  # curated overall -0.04, raw -0.05
    assert (summary["curated_ahead"], summary["curated_behind"]) == (2, 1)
    assert summary["seeds"][0]["curated_wrong_labels"] == 0.1 and summary["seeds"][0]["curated_pairs"] == 25
    assert summary["corrected_accuracy"]["mean"] == pytest.approx((0.79 + 0.83 + 0.80) / 3 + 0.1)
    assert "| 1 | task_chosen | 0.830 | 0.810 | -0.020 |" in (tmp_path / "seeds.md").read_text()
    assert "| 0.930 |" in (tmp_path / "seeds.md").read_text()  # seed 1's raw pool with its labels corrected
    with pytest.raises(SystemExit):
        reward_curation.main(["--out", str(tmp_path), "--seeds", "0,0"])
    # a finished seed of other settings is neither overwritten nor summarised with this command's seeds
    with pytest.raises(SystemExit, match=r"seed1/results.json was made with other settings: flip_fraction 0.3 \(now "
                                         r"0.2\)\. Use another --out"):
        reward_curation.main(["--out", str(tmp_path), "--seeds", "1,0", "--flip-fraction", "0.2"])
    stored = json.loads((tmp_path / "seed1" / "results.json").read_text())
    del stored["settings"]["group_by_length"]  # made before the setting existed
    (tmp_path / "seed1" / "results.json").write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match=r"group_by_length not recorded \(now False\)"):
        reward_curation.main(["--out", str(tmp_path), "--seeds", "1", "--workers", "1"])
    assert json.loads((tmp_path / "seed1" / "results.json").read_text()) == stored  # untouched


def test_very_short_evaluation_prompts_only_match_whole_prompts(tmp_path):
    """"Hello!" or "How are you?" as evaluation prompts must not mark every training prompt using those
    words: below min_short_prompt_words (default 4) only an equal prompt (case and punctuation aside) matches;
    from it on, a prompt that contains the evaluation prompt matches."""
    index = NgramIndex(["Hello!", "How are you?", "Name three primary colours.", "one two three four five six seven eight"])
    assert index.match("hello") == ("hello",) and index.match("How are you") == ("how", "are", "you")
    assert index.match("Hello! Can you explain how a transistor works?") is None
    assert index.match("Tell me how are you supposed to fold a shirt") is None
    assert index.match("Please name three primary colours and mix two") == ("name", "three", "primary", "colours")
    assert index.match("zero one two three four five six seven eight") is not None
    assert NgramIndex(["Hello!"], min_short_prompt_words=1).match("Hello! Explain transistors.") == ("hello",)
    with pytest.raises(ValueError, match="min_short_prompt_words must be at least 1"):
        Decontaminate(eval_files=["x.jsonl"], min_short_prompt_words=0)

    eval_file = write_rows(tmp_path / "eval.jsonl", [{"prompt": "Hello!"}, {"prompt": "How are you?"},
                                                     {"prompt": "Name three primary colours."}])
    rows = [{"prompt": prompt, "chosen": "yes", "rejected": "no", "source": "crowd"} for prompt in (
        "Hello! Can you explain how a transistor works?", "HELLO", "How are you?", "how are you doing today",
        "Quick one: name three primary colours.")]
    kept, report = apply_step(Decontaminate(eval_files=[str(eval_file)]), rows)
    assert [row["prompt"] for row in kept] == ["Hello! Can you explain how a transistor works?", "how are you doing today"]
    assert report["removed_by_reason"] == {
        "prompt equals a very short evaluation prompt (fewer than 4 words)": 2,
        "prompt contains a whole (short) evaluation prompt": 1}
    assert report["params"]["min_short_prompt_words"] == 4
    assert report["details"]["very_short_eval_prompts_matched_only_whole"] == 2
    assert report["details"]["short_eval_prompts"] == 1


def test_consistency_filter_categories_no_checked_row_has_are_an_error_listing_those_present(tmp_path):
    rows = [scored("a", 0.0, 3.0, "crowd", task="arithmetic"), scored("b", 0.0, 3.0, "crowd", task="divide-by-one"),
            scored("c", 0.0, 3.0, "trusted", task="divide-by-zero")]
    with pytest.raises(DataError, match=r"scored.jsonl: ConsistencyFilter categories \['arithmatic'\]: no row of the "
                                        r"checked sources has these in its 'task' column \(categories present: "
                                        r"\['arithmetic', 'divide-by-one'\]\)"):
        apply_step(ConsistencyFilter(sources=["crowd"], category_field="task", categories=["arithmatic"]), rows,
                   origin="scored.jsonl")
    # a category only unchecked sources have would check nothing either
    with pytest.raises(DataError, match=r"categories \['divide-by-zero'\]"):
        apply_step(ConsistencyFilter(sources=["crowd"], category_field="task", categories=["divide-by-zero"]), rows)
    # in a pipeline the check runs before the first stage: nothing is written
    pool_file = write_rows(tmp_path / "scored.jsonl", rows)
    with pytest.raises(DataError, match=r"categories \['arithmatic'\]"):
        run_pipeline(str(pool_file), str(tmp_path / "out"),
                     [DropInvalid(), ConsistencyFilter(category_field="task", categories=["arithmatic"])])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    kept, report = apply_step(ConsistencyFilter(category_field="task", categories=["arithmetic", "divide-by-zero"]), rows)
    assert [row["prompt"] for row in kept] == ["b"] and report["details"]["listed_categories_without_rows"] == []


HUB_NAME = "Skywork/Skywork-Reward-Preference-80K-v0.2"  # a hub dataset whose name has a dot


def test_curating_a_hub_dataset_with_a_dotted_name_writes_jsonl(tmp_path, monkeypatch):
    from datamodules import curation

    pool_rows = read_rows(str(POOL))
    monkeypatch.setattr(curation, "read_rows",
                        lambda source, *a, **k: pool_rows if source == HUB_NAME else read_rows(source, *a, **k))
    summary = run_pipeline(HUB_NAME, str(tmp_path / "out"), [DropInvalid()])
    assert summary["output_file"] == str(tmp_path / "out" / "curated.jsonl") and summary["output_rows"] == 11
    assert (tmp_path / "out" / "01_drop_invalid.jsonl").is_file()
    data = CuratedPreferenceData(train_file=HUB_NAME, curation_dir=str(tmp_path / "cur"), tokenizer="tiny",
                                 curation_steps=[DropInvalid()])
    assert data.curated_file() == tmp_path / "cur" / "curated.jsonl"
    data.prepare_data()
    data.setup("fit")
    assert data.files["train"] == str(tmp_path / "cur" / "curated.jsonl") and len(data.datasets["train"]) == 11
    # a local file keeps its own type, whatever the case of its suffix
    upper = tmp_path / "POOL.JSONL"
    upper.write_text(POOL.read_text())
    assert run_pipeline(str(upper), str(tmp_path / "up"), [DropInvalid()])["output_file"].endswith("curated.jsonl")
    assert curation.curated_suffix("pairs.parquet") == ".parquet"


def test_curation_only_merges_several_configs_as_cli_does(tmp_path):
    """``--config A --config B`` merges B into A key by key (cli.py's rule), so a fragment that changes one
    setting keeps A's curation steps and files."""
    from datamodules import curation

    base = tmp_path / "base.yaml"
    base.write_text(json.dumps({"model": {"class_path": "RewardModel"}, "data": {
        "class_path": "datamodules.curation.CuratedPreferenceData",
        "init_args": {"train_file": str(POOL), "curation_dir": str(tmp_path / "first"), "tokenizer": "tiny",
                      "curation_steps": [{"class_path": "datamodules.curation.DropInvalid"},
                                         {"class_path": "datamodules.curation.Deduplicate"}]}}}))
    fragment = tmp_path / "fragment.yaml"
    fragment.write_text(json.dumps({"trainer": {"max_steps": 5},
                                    "data": {"init_args": {"curation_dir": str(tmp_path / "second")}}}))
    data = curation.curation_data_from_config(["--config", str(base), "--config", str(fragment)])
    assert data.curation_dir == str(tmp_path / "second") and data.raw_train_file == str(POOL)
    assert [step.name for step in data.curation_steps] == ["drop_invalid", "deduplicate"]
    assert curation.merge_config({"a": {"b": 1, "c": [1, 2]}, "d": 1}, {"a": {"c": [3]}, "e": 2}) == {
        "a": {"b": 1, "c": [3]}, "d": 1, "e": 2}
