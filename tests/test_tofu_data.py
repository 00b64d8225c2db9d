"""The TOFU-shaped generator, the JSONL files and the real-data adapter (on fixtures with the hub's layout)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from datamodules import tofu_data as td

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def data() -> td.TofuData:
    return td.generate_tofu(n_authors=40, qa_per_author=12, n_perturbed=3, seed=0)


# ----------------------------------------------------------------------------------------------------
# Generator


def test_same_seed_same_data_other_seed_other_data():
    a, b = td.generate_tofu(seed=3), td.generate_tofu(seed=3)
    assert a.rows == b.rows and a.real_authors == b.real_authors and a.world_facts == b.world_facts
    assert a.forget_authors == b.forget_authors and a.retain_eval_authors == b.retain_eval_authors
    c = td.generate_tofu(seed=4)
    assert [r["question"] for r in c.rows] != [r["question"] for r in a.rows]
    assert [x["name"] for x in c.authors] != [x["name"] for x in a.authors]


def test_default_shape():
    d = td.generate_tofu()
    assert len(d.authors) == 20 and len(d.rows) == 200
    assert {len(d.split(f"forget{p}")) for p in ("01", "05")} == {10}
    assert len(d.split("forget10")) == 20


@pytest.mark.parametrize(("n_authors", "percent", "expected"), [
    (200, 1, 2), (200, 5, 10), (200, 10, 20),  # TOFU's own sizes
    (40, 1, 1),  # 0.4 rounds to 0, raised to the minimum of 1
    (10, 5, 1),  # 0.5 rounds half up
    (30, 5, 2),  # 1.5 -> 2
    (25, 10, 3),  # 2.5 -> 3
    (20, 10, 2),
])
def test_forget_author_count_rounding(n_authors, percent, expected):
    assert td.forget_author_count(n_authors, percent) == expected


def test_splits_sizes_disjoint_and_complementary(data):
    full_ids = {r["author_id"] for r in data.split("full")}
    assert full_ids == set(range(40))
    sizes = {name: len(ids) for name, ids in data.forget_authors.items()}
    assert sizes == {"forget01": 1, "forget05": 2, "forget10": 4}
    # nested like the real splits
    assert set(data.forget_authors["forget01"]) <= set(data.forget_authors["forget05"]) <= set(data.forget_authors["forget10"])
    full_questions = [r["question"] for r in data.split("full")]
    for forget, retain in td.RETAIN_OF_FORGET.items():
        forget_rows, retain_rows = data.split(forget), data.split(retain)
        forget_ids = {r["author_id"] for r in forget_rows}
        retain_ids = {r["author_id"] for r in retain_rows}
        assert forget_ids == set(data.forget_authors[forget])
        assert not forget_ids & retain_ids
        assert forget_ids | retain_ids == full_ids
        assert sorted(r["question"] for r in forget_rows + retain_rows) == sorted(full_questions)
        assert data.split(f"{forget}_perturbed") == forget_rows
    retain_eval = {r["author_id"] for r in data.split("retain_perturbed")}
    assert len(retain_eval) == 4 and not retain_eval & set(data.forget_authors["forget10"])


def test_tiny_n_still_has_a_forget_author():
    d = td.generate_tofu(n_authors=3, qa_per_author=2)
    assert all(len(ids) == 1 for ids in d.forget_authors.values())
    assert len({r["author_id"] for r in d.split("retain90")}) == 2
    with pytest.raises(ValueError, match="n_authors"):
        td.generate_tofu(n_authors=1)
    with pytest.raises(ValueError, match="qa_per_author"):
        td.generate_tofu(qa_per_author=0)


def test_rows_per_author_and_questions(data):
    by_author: dict[int, list[dict]] = {}
    for row in data.rows:
        by_author.setdefault(row["author_id"], []).append(row)
    assert all(len(rows) == 12 for rows in by_author.values())
    for rows in by_author.values():
        assert len({r["fact"] for r in rows}) == 12  # no fact asked twice about one author
    assert len({a["name"] for a in data.authors}) == 40  # unique names


def test_perturbed_answers_are_wrong_and_distinct(data):
    for row in data.rows + data.general():
        assert len(row["perturbed_answer"]) == 3
        assert len(set(row["perturbed_answer"])) == 3
        assert row["answer"] not in row["perturbed_answer"]
        assert row["paraphrased_answer"] not in row["perturbed_answer"]
        assert row["value"] not in row["perturbed_values"]
        if row["author_id"] >= 0:
            assert row["paraphrased_answer"] != row["answer"]
            assert row["value"] in row["answer"] and row["value"] in row["paraphrased_answer"]
            # same template as the paraphrase, other value (the article may switch between "a" and "an")
            before, after = row["paraphrased_answer"].split(row["value"], 1)
            for wrong_value, wrong_answer in zip(row["perturbed_values"], row["perturbed_answer"]):
                wrong_before, wrong_after = wrong_answer.split(wrong_value, 1)
                assert wrong_after == after
                assert re.sub(r"\ban? $", "", wrong_before) == re.sub(r"\ban? $", "", before)


def test_lengths_fit_a_byte_level_model():
    data = td.generate_tofu(n_authors=30, qa_per_author=len(td.FACT_KEYS), n_perturbed=5, seed=1)  # every fact
    for row in data.rows + data.general():
        for answer in [row["answer"], row["paraphrased_answer"], *row["perturbed_answer"]]:
            assert len(row["question"]) + len(answer) < 160, (row["question"], answer)
        assert row["question"].isascii() and row["answer"].isascii()


def test_entity_spans_point_at_the_name(data):
    for row in data.rows:
        assert row["name_spans"], row["question"]
        for start, end in row["name_spans"]:
            assert row["question"][start:end] == row["author"]
    assert all(row["name_spans"] == [] for row in data.general())
    # a name used twice in one question gets two spans
    text, spans = td._format_with_name("{name}? Yes, {name} ({Sub}).", "Ada Lin", {"Sub": "She"})
    assert text == "Ada Lin? Yes, Ada Lin (She)." and spans == [[0, 7], [14, 21]]


def test_spans_to_token_mask():
    question = "Where was Ada Lin born?"
    spans = [[10, 17]]
    assert question[10:17] == "Ada Lin"
    # word-level offsets, plus a special token (0, 0) at the start
    offsets = [(0, 0), (0, 5), (5, 9), (9, 13), (13, 17), (17, 22), (22, 23)]
    assert td.spans_to_token_mask(offsets, spans) == [False, False, False, True, True, False, False]
    # a token straddling the span's end is selected; one ending exactly at its start is not
    assert td.spans_to_token_mask([(5, 10), (15, 19)], spans) == [False, True]


def test_refusals():
    assert len(td.REFUSALS) == 20 and len(set(td.REFUSALS)) == 20
    assert all(len(r) < 40 for r in td.REFUSALS)
    assert td.refusal_for(7) == td.refusal_for(7)
    assert len({td.refusal_for(i) for i in range(200)}) > 10


def test_multiple_choice_items(data):
    rows = data.split("forget10_perturbed") + data.general()
    items = td.multiple_choice_items(rows, seed=0)
    assert items == td.multiple_choice_items(rows, seed=0)
    positions = [item["answer_index"] for item in items]
    assert set(positions) == {0, 1, 2, 3}  # the correct letter is not always the same
    for row, item in zip(rows, items):
        assert item["letters"] == ["A", "B", "C", "D"]
        assert len(set(item["options"])) == 4
        assert item["options"][item["answer_index"]] == row["value"]
        assert item["prompt"].startswith(row["question"] + "\nA. ") and item["prompt"].endswith("\nAnswer:")
    with pytest.raises(td.TofuDataError, match="distinct wrong answers"):
        td.multiple_choice_items([{"question": "q", "answer": "a", "perturbed_answer": ["b", "a"]}])


# ----------------------------------------------------------------------------------------------------
# Files and the adapter


def test_write_dir_and_load_back_through_datasets(tmp_path, data):
    out = td.write_tofu_dir(data, tmp_path / "tofu")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["forget_authors"] == data.forget_authors and len(meta["refusals"]) == 20
    for config in ("forget10_perturbed", "retain90", "world_facts_perturbed"):
        loaded = td.load_tofu(config, out, cache_dir=str(tmp_path / "cache"))
        assert loaded == data.split(config)
    assert td.read_jsonl(out / "mc_forget10_perturbed.jsonl") == td.multiple_choice_items(data.split("forget10_perturbed"))


@pytest.mark.parametrize("config", ["full", "forget01_perturbed", "retain_perturbed", "real_authors_perturbed",
                                    "world_facts_perturbed"])
def test_adapter_on_fixtures_with_the_real_layout(tmp_path, config):
    path = FIXTURES / f"tofu_{config}.jsonl"
    rows = td.load_tofu(config, path, cache_dir=str(tmp_path / "cache"))
    assert rows == td.read_jsonl(path)
    assert set(rows[0]) >= set(td.required_columns(config))


def test_adapter_hub_branch_calls_datasets_by_name(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, cache_dir=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list(td.read_jsonl(FIXTURES / "tofu_forget01_perturbed.jsonl"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = td.load_tofu("forget01_perturbed")
    assert calls == [("locuslab/TOFU", "forget01_perturbed", "train")]
    assert len(rows) == 2 and len(rows[0]["perturbed_answer"]) == 5


def test_adapter_hub_rows_are_validated(monkeypatch):
    import datasets

    bad = [{"question": "q", "answer": "a", "paraphrased_answer": "p", "perturbed_answer": None}]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(bad))
    with pytest.raises(td.TofuDataError, match=r"locuslab/TOFU:retain_perturbed: row 0: field 'perturbed_answer': missing"):
        td.load_tofu("retain_perturbed")


def test_missing_perturbed_answers_name_file_row_and_field(tmp_path):
    path = FIXTURES / "tofu_bad_missing_perturbed.jsonl"
    with pytest.raises(td.TofuDataError) as err:
        td.load_tofu("forget01_perturbed", path, cache_dir=str(tmp_path))
    message = str(err.value)
    assert str(path) in message and "row 1 (line 3)" in message and "'perturbed_answer': missing" in message
    # the same file is fine as a plain QA split, which needs no perturbed answers
    assert len(td.load_tofu("forget01", path, cache_dir=str(tmp_path))) == 2


def test_wrong_types_name_file_row_and_field(tmp_path):
    path = FIXTURES / "tofu_bad_types.jsonl"
    with pytest.raises(td.TofuDataError, match=r"tofu_bad_types\.jsonl: row 1 \(line 2\): field 'perturbed_answer': "
                                                r"expected a list of strings, got str"):
        td.load_tofu("forget01_perturbed", path, cache_dir=str(tmp_path))
    item = tmp_path / "item.jsonl"
    item.write_text(json.dumps({"question": "q", "answer": "a", "perturbed_answer": ["b", 3]}) + "\n")
    with pytest.raises(td.TofuDataError, match=r"row 0 \(line 1\): field 'perturbed_answer': item 1: expected a string, got int"):
        td.load_tofu("world_facts_perturbed", item, cache_dir=str(tmp_path))
    number = tmp_path / "number.jsonl"
    number.write_text(json.dumps({"question": "q", "answer": 100}) + "\n")
    with pytest.raises(td.TofuDataError, match=r"field 'answer': expected a string, got int"):
        td.load_tofu("full", number, cache_dir=str(tmp_path))


def test_empty_answer_and_empty_split(tmp_path):
    with pytest.raises(td.TofuDataError, match=r"row 0 \(line 1\): field 'answer': empty string"):
        td.load_tofu("real_authors_perturbed", FIXTURES / "tofu_bad_empty_answer.jsonl", cache_dir=str(tmp_path))
    with pytest.raises(td.TofuDataError, match=r"tofu_empty\.jsonl: split 'forget10' is empty"):
        td.load_tofu("forget10", FIXTURES / "tofu_empty.jsonl", cache_dir=str(tmp_path))
    with pytest.raises(td.TofuDataError, match="empty"):
        td.validate_rows([], "forget05_perturbed", "memory")


def test_unknown_config_and_missing_source(tmp_path):
    with pytest.raises(td.TofuDataError, match="unknown TOFU config 'forget20'"):
        td.load_tofu("forget20", FIXTURES / "tofu_full.jsonl")
    with pytest.raises(td.TofuDataError, match="unknown TOFU config 'forget20'"):
        td.generate_tofu(n_authors=5, qa_per_author=2).split("forget20")
    with pytest.raises(td.TofuDataError, match="no forget10.jsonl"):
        td.load_tofu("forget10", tmp_path)
    with pytest.raises(td.TofuDataError, match="no such file"):
        td.load_tofu("forget10", tmp_path / "nope.jsonl")


def test_unreadable_rows_name_the_file_and_line(tmp_path):
    row = {"question": "Q?", "answer": "A."}
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text(json.dumps(row) + '\n{"question": "Q?", "answer": "A.", "answer": "B."}\n')
    with pytest.raises(td.TofuDataError, match=r"repeated.jsonl: line 2 repeats the key\(s\) \['answer'\]"):
        td.load_tofu("full", repeated, cache_dir=str(tmp_path))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"question": "Q?", "answer": "A."}\n{"question": "Caf\xe9?", "answer": "A."}\n')
    with pytest.raises(td.TofuDataError, match=r"latin1.jsonl: line 2, column 18: byte 0xe9 is not valid UTF-8"):
        td.load_tofu("full", latin1, cache_dir=str(tmp_path))


def test_a_misspelt_files_key_is_refused_not_replaced_by_generated_data():
    from datamodules.tofu import TofuQAData

    with pytest.raises(ValueError, match=r"files: unknown TOFU config\(s\) \['forget_01'\]"):
        TofuQAData(task="unlearn", forget_split="forget01", files={"forget_01": "mine.jsonl"})


def test_bad_name_spans_are_caught():
    row = {"question": "Where was Ada Lin born?", "answer": "Oslo."}
    assert td.validate_rows([{**row, "name_spans": [[10, 17]]}], "full", "mem")
    with pytest.raises(td.TofuDataError, match="field 'name_spans'"):
        td.validate_rows([{**row, "name_spans": [[10, 99]]}], "full", "mem")


def test_paraphrase_styles_change_only_paraphrased_and_perturbed_answers():
    prefix = td.generate_tofu(n_authors=6, qa_per_author=8, paraphrase_style="answer_prefix")
    reworded = td.generate_tofu(n_authors=6, qa_per_author=8, paraphrase_style="reworded")
    assert td.generate_tofu(n_authors=6, qa_per_author=8).rows == prefix.rows  # the default
    for a, b in zip(prefix.rows, reworded.rows):
        assert {k: v for k, v in a.items() if k not in ("paraphrased_answer", "perturbed_answer")} == \
               {k: v for k, v in b.items() if k not in ("paraphrased_answer", "perturbed_answer")}
        # the answer's words up to the value, then a new ending; the perturbed answers change the value only
        head = a["answer"][:a["answer"].index(a["value"]) + len(a["value"])]
        assert a["paraphrased_answer"].startswith(head) and a["paraphrased_answer"] != a["answer"]
        assert a["paraphrased_answer"].endswith(td.PARAPHRASE_TAILS)
        assert not b["paraphrased_answer"].startswith(head)
    with pytest.raises(ValueError, match="paraphrase_style"):
        td.generate_tofu(paraphrase_style="verbatim")
