"""The arithmetic task, the SFT and preference data modules: shapes, masks, bad rows, truncation."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from datamodules import arithmetic
from datamodules.common import DataError
from datamodules.preference import PreferenceData
from datamodules.sft_data import SFTData
from modules.lm import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return str(path)


# -- arithmetic task -----------------------------------------------------------------------------------

def test_arithmetic_solution_format_and_checker():
    problem = arithmetic.Problem(question="Compute 7+5-3.", start=7, ops=(("+", 5), ("-", 3)))
    assert problem.solution() == "7+5=12\n12-3=9\nAnswer: 9"
    assert arithmetic.check_answer(problem, "7+5=12\n12-3=9\nAnswer: 9")
    assert arithmetic.check_answer(9, "whatever\nAnswer: 9\n")
    assert not arithmetic.check_answer(problem, "7+5=12\n12-3=9\nAnswer: 8")
    assert not arithmetic.check_answer(problem, "Answer: 9\n12-3=9")  # the answer must be the last line
    assert not arithmetic.check_answer(problem, "")
    assert arithmetic.extract_answer("1+2=3\nAnswer: 3") == 3


def test_arithmetic_splits_are_deterministic_and_disjoint():
    first = arithmetic.generate_splits({"train": 300, "test": 100}, seed=3)
    second = arithmetic.generate_splits({"train": 300, "test": 100}, seed=3)
    other = arithmetic.generate_splits({"train": 300, "test": 100}, seed=4)
    assert [p.question for p in first["train"]] == [p.question for p in second["train"]]
    assert [p.question for p in first["train"]] != [p.question for p in other["train"]]
    assert not {p.question for p in first["train"]} & {p.question for p in first["test"]}
    for problem in first["train"]:
        assert all(0 <= value <= 99 for value in problem.values)
        assert arithmetic.check_answer(problem, problem.solution())
    with pytest.raises(ValueError, match="too few exist"):
        arithmetic.generate_splits({"train": 10_000}, min_steps=1, max_steps=1, max_operand=3)


@pytest.mark.parametrize("subset", arithmetic.PAIR_SUBSETS)
def test_rejected_solutions_are_wrong_in_the_intended_way(subset):
    import random

    rng = random.Random(0)
    for problem in arithmetic.generate_splits({"x": 200}, seed=1)["x"]:
        rejected = arithmetic.rejected_solution(problem, subset, rng)
        assert not arithmetic.check_answer(problem, rejected)
        lines = rejected.splitlines()
        if subset == "format":
            assert arithmetic.extract_answer(rejected) is None
        elif subset == "consistency":
            assert lines[:-1] == problem.step_lines()  # every step right, only the answer line wrong
        else:
            left, result = lines[-2].split("=")  # later steps stay consistent with the error
            assert eval(left) == int(result) or len(lines) == len(problem.ops) + 1
            assert sum(a != b for a, b in zip(lines, problem.step_lines())) >= 1


# -- SFT data -------------------------------------------------------------------------------------------

def test_sft_labels_cover_the_response_only(tokenizer):
    data = SFTData(tokenizer="tiny", train_size=8, val_size=4, test_size=4)
    data.setup("fit")
    item = data.datasets["train"][0]
    response_ids = [t for t in item["labels"] if t != -100]
    text = tokenizer.decode(response_ids)
    assert text.endswith("<|end|>") and "Answer: " in text
    prompt = tokenizer.decode(item["input_ids"][: len(item["labels"]) - len(response_ids)])
    assert prompt.startswith("<|user|>Compute") and prompt.endswith("<|assistant|>")
    batch = data.collate(data.datasets["train"][:3])
    assert batch["input_ids"].shape == batch["labels"].shape
    assert (batch["prompt_input_ids"][:, -1] == tokenizer.convert_tokens_to_ids("<|assistant|>")).all()


def test_sft_plain_and_chat_files(tmp_path, tokenizer):
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "Say hi.", "response": "hi"}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"}]}])
    for path, prompt_start in ((plain, "<|user|>"), (chat, "<|system|>")):
        data = SFTData(tokenizer="tiny", train_file=path)
        data.setup("fit")
        item = data.datasets["train"][0]
        assert tokenizer.decode([t for t in item["labels"] if t != -100]) == "hi<|end|>"
        assert tokenizer.decode(item["input_ids"]).startswith(prompt_start)


def test_sft_bad_rows_name_file_row_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": 3}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 1, field 'response': expected a string, got int"):
        SFTData(tokenizer="tiny", train_file=path).setup("fit")
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                               {"role": "user", "content": "again"}]}])
    with pytest.raises(DataError, match=r"row 0, field 'messages\[1\].role': the last message"):
        SFTData(tokenizer="tiny", train_file=chat).setup("fit")
    alone = write_jsonl(tmp_path / "alone.jsonl", [{"prompt": "a", "response": "b"},
                                                   {"messages": [{"role": "assistant", "content": "a"}]}])
    with pytest.raises(DataError, match=r"alone.jsonl: row 1, field 'messages': only the assistant's response"):
        SFTData(tokenizer="tiny", train_file=alone).setup("fit")
    dropped = SFTData(tokenizer="tiny", train_file=alone, invalid_rows="drop")
    dropped.setup("fit")
    assert dropped.report.rows["train"] == 1 and sum(dropped.report.dropped["train"].values()) == 1


def test_sft_truncation_is_counted_and_empty_responses_dropped(tmp_path):
    rows = [{"prompt": "x" * 40, "response": "short"}, {"prompt": "q", "response": "y" * 40}]
    data = SFTData(tokenizer="tiny", train_file=write_jsonl(tmp_path / "long.jsonl", rows), max_length=20)
    data.setup("fit")
    assert data.report.truncated == {"train": 2}
    assert data.report.dropped == {"train": {"no response token left after truncation to max_length": 1}}
    assert data.report.rows == {"train": 1}


# -- preference data ------------------------------------------------------------------------------------

SHAPES = {
    "standard_implicit": {"chosen": "Q: 1+1? A: 2", "rejected": "Q: 1+1? A: 3"},
    "conversational_implicit": {
        "chosen": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
        "rejected": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "3"}]},
    "standard_explicit": {"prompt": "1+1?", "chosen": "2", "rejected": "3"},
    "conversational_explicit": {"prompt": [{"role": "user", "content": "1+1?"}],
                                "chosen": [{"role": "assistant", "content": "2"}],
                                "rejected": [{"role": "assistant", "content": "3"}]},
}


@pytest.mark.parametrize("shape", SHAPES)
def test_four_preference_shapes(shape, tmp_path, tokenizer):
    row = dict(SHAPES[shape], margin=0.5, subset="easy")
    data = PreferenceData(tokenizer="tiny", train_file=write_jsonl(tmp_path / "p.jsonl", [row, row]))
    data.setup("fit")
    batch = data.collate(data.datasets["train"])
    assert batch["input_ids"].shape[0] == 4  # chosen rows first, then rejected
    chosen, rejected = (tokenizer.decode(ids, skip_special_tokens=False).replace("<|pad|>", "")
                        for ids in (batch["input_ids"][0], batch["input_ids"][2]))
    if "conversational" in shape or "explicit" in shape:
        assert chosen == "<|user|>1+1?<|end|><|assistant|>2<|end|>"
        assert rejected == "<|user|>1+1?<|end|><|assistant|>3<|end|>"
    else:
        assert chosen == "Q: 1+1? A: 2<|end|>"
    assert batch["margin"].tolist() == [0.5, 0.5]
    assert data.subset_names == ["easy"]


@pytest.mark.parametrize("row, field, problem", [
    ({"chosen": "a"}, "rejected", "missing"),
    ({"chosen": "a", "rejected": 5}, "rejected", "expected a string, got int"),
    ({"chosen": " ", "rejected": "b"}, "chosen", "empty"),
    ({"chosen": "same", "rejected": "same"}, "rejected", "identical to chosen"),
    ({"chosen": [{"role": "robot", "content": "x"}], "rejected": "b"}, r"chosen\[0\].role", "unknown role"),
    ({"chosen": "a", "rejected": "b", "margin": "big"}, "margin", "expected a finite number"),
])
def test_invalid_pairs_error_or_drop(row, field, problem, tmp_path):
    good = {"chosen": "good", "rejected": "bad"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, row])
    with pytest.raises(DataError, match=rf"pairs.jsonl: row 1, field '{field}': {problem}"):
        PreferenceData(tokenizer="tiny", train_file=path).setup("fit")
    data = PreferenceData(tokenizer="tiny", train_file=path, invalid_rows="drop")
    data.setup("fit")
    assert data.report.rows["train"] == 1
    assert sum(data.report.dropped["train"].values()) == 1


def test_all_rows_dropped_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match="all 1 rows"):
        PreferenceData(tokenizer="tiny", train_file=path, invalid_rows="drop").setup("fit")


def test_preference_truncation_sides_are_counted(tmp_path, tokenizer):
    long_prompt = {"prompt": "p" * 30, "chosen": "good", "rejected": "bad!"}
    short = {"prompt": "q", "chosen": "good", "rejected": "bad!"}
    path = write_jsonl(tmp_path / "long.jsonl", [long_prompt, short])
    data = PreferenceData(tokenizer="tiny", train_file=path, val_file=path, max_length=16,
                          truncation_side="right", eval_truncation_side="left")
    data.setup("fit")
    assert data.report.truncated == {"train": 1, "val": 1}
    # right truncation keeps the prompt's start and cuts both responses away: counted, then dropped
    assert data.report.dropped == {"train": {"chosen and rejected identical after truncation to max_length": 1}}
    assert data.report.rows == {"train": 1, "val": 2}
    # left truncation (the evaluation default, as RewardBench) keeps the responses
    assert tokenizer.decode(data.datasets["val"][0]["chosen"]).endswith("good<|end|>")
    assert len(data.datasets["val"][0]["chosen"]) == 16


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"chosen": "a", "rejected": "b"}\n{"chosen": \n')
    with pytest.raises(DataError, match="broken.jsonl: line 2 is not valid JSON"):
        PreferenceData(tokenizer="tiny", train_file=str(path)).setup("fit")


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_an_empty_training_file_is_an_error_not_a_run_on_nothing(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty.jsonl: split 'train' has no rows"):
        PreferenceData(tokenizer="tiny", train_file=str(path)).setup("fit")


@pytest.mark.parametrize("name, content, message", [
    ("latin1.jsonl", b'{"chosen": "caf\xe9", "rejected": "b"}\n', r"latin1.jsonl: line 1, column 16: byte 0xe9 is not valid UTF-8"),
    ("repeated.jsonl", b'{"chosen": "a", "rejected": "b"}\n{"chosen": "a", "rejected": "b", "chosen": "c"}\n',
     r"repeated.jsonl: line 2 repeats the key\(s\) \['chosen'\]"),
    ("pairs.csv", b"chosen,rejected\na,b\n", r"pairs.csv: unsupported file type '.csv'; data files must end in"),
    ("wrapped.json", b'{\n "data": [{"chosen": "a", "rejected": "b"}]\n}\n',
     r"wrapped.json: the file is one JSON object; .* \['data'\]"),
    ("damaged.parquet", b"not parquet", r"damaged.parquet: cannot be read as Parquet"),
])
def test_unreadable_files_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        PreferenceData(tokenizer="tiny", train_file=str(path)).setup("fit")


def test_local_looking_paths_never_reach_the_hub(tmp_path, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("read_rows went to the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "folder.jsonl").mkdir()
    from datamodules.common import read_rows

    for missing in ["./pairs", "data/more/pairs", str(tmp_path / "a" / "b"), "missing.csv"]:
        with pytest.raises((FileNotFoundError, DataError), match=r"not found|unsupported"):
            read_rows(missing)
    from datamodules.common import looks_like_local_path

    assert not looks_like_local_path("data/pairs")  # owner/name: a hub name, although ./data exists here
    with pytest.raises(DataError, match="is a folder"):
        read_rows("folder.jsonl")
    (tmp_path / "UPPER.JSONL").write_text('{"chosen": "a", "rejected": "b"}\n')
    assert read_rows("UPPER.JSONL") == [{"chosen": "a", "rejected": "b"}]


def test_hub_failures_say_what_was_attempted(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/prefs' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    from datamodules.common import read_rows

    with pytest.raises(DataError, match=r"someone/prefs: not a local .* hub dataset .* split 'test'.* ConnectionError"):
        read_rows("someone/prefs", "test")


def test_embedded_preference_pairs_have_subsets():
    data = PreferenceData(tokenizer="tiny", train_size=60, val_size=30, test_size=30)
    data.setup("fit")
    assert set(data.subset_names) == set(arithmetic.PAIR_SUBSETS)
    assert data.report.rows == {"train": 60, "val": 30}


def test_training_subset_weights_apply_to_train_only():
    data = PreferenceData(tokenizer="tiny", train_size=600, val_size=300, test_size=30,
                          train_subset_weights={"consistency": 3, "arithmetic": 1})
    train_rows, val_rows = data.embedded_rows("train"), data.embedded_rows("val")
    train_counts = {s: sum(r["subset"] == s for r in train_rows) for s in arithmetic.PAIR_SUBSETS}
    assert train_counts["format"] == 0 and 2.2 < train_counts["consistency"] / train_counts["arithmetic"] < 4
    assert all(sum(r["subset"] == s for r in val_rows) > 70 for s in arithmetic.PAIR_SUBSETS)  # uniform
    with pytest.raises(ValueError, match="unknown subsets"):
        PreferenceData(tokenizer="tiny", train_subset_weights={"typos": 1}).embedded_rows("train")


# -- length-grouped batches ----------------------------------------------------------------------------


def test_length_grouped_order_with_one_window_is_the_sorted_groups():
    from datamodules.common import LengthGroupedSampler

    lengths = [5, 11, 0, 7, 3, 9, 1, 10, 6, 2, 8, 4]  # item i has a distinct length
    sampler = LengthGroupedSampler(lengths, group_size=3, seed=1, window_groups=10)
    order = list(sampler)
    groups = [sorted(lengths[i] for i in order[start:start + 3]) for start in range(0, 12, 3)]
    assert sorted(groups) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert groups[0] == [9, 10, 11]  # the longest item's group comes first
    assert sorted(order) == list(range(12))
    # also when the data end in a window smaller than a group (merged into the window before)
    for seed in range(20):
        assert 4 in list(LengthGroupedSampler(list(range(5)), group_size=2, seed=seed, window_groups=2))[:2]


def test_length_grouped_order_is_a_seeded_permutation_per_epoch_with_less_padding():
    import random

    import torch

    from datamodules.common import EpochSeededSampler, LengthGroupedSampler

    lengths = [random.Random(i).randint(4, 200) for i in range(1000)]
    first = LengthGroupedSampler(lengths, group_size=16, seed=0)
    again = LengthGroupedSampler(lengths, group_size=16, seed=0)
    epochs = []
    for epoch in range(2):
        first.set_epoch(epoch)
        again.set_epoch(epoch)
        epochs.append(list(first))
        assert epochs[-1] == list(again)
        assert sorted(epochs[-1]) == list(range(1000))  # every item once; the partial group last
    assert epochs[0] != epochs[1]

    def padded_width(order):
        return sum(16 * max(lengths[i] for i in order[start:start + 16]) for start in range(0, 1000, 16))

    uniform = list(EpochSeededSampler(1000, seed=0))
    assert padded_width(epochs[0]) < 0.7 * padded_width(uniform)
    # group order is shuffled, not descending within each window of 50 groups
    group_maxima = torch.tensor([max(lengths[i] for i in epochs[0][start:start + 16]) for start in range(16, 992, 16)])
    assert (group_maxima[1:] > group_maxima[:-1]).float().mean() > 0.3


def test_length_grouped_batches_stay_grouped_through_lightnings_ddp_preparation():
    """Lightning wraps a training sampler that is not a DistributedSampler in one that reshuffles it; the
    training loader must come through its preparation for 2 DDP processes unchanged and still grouped."""

    import lightning.pytorch as pl
    from lightning.pytorch.trainer.states import RunningStage

    from datamodules.common import ProcessShard, training_loader

    lengths = [(7 * i) % 61 for i in range(61)]  # 61 distinct lengths in a scrambled order
    batch_size, processes = 4, 2
    ddp = pl.Trainer(accelerator="cpu", devices=processes, strategy="ddp", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)
    seen = []
    for rank in range(processes):
        fake = SimpleNamespace(world_size=processes, global_rank=rank, current_epoch=0)
        loader = training_loader(list(range(61)), batch_size, list, seed=3, trainer=fake, lengths=lengths)
        prepared = ddp._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
        assert isinstance(prepared.sampler, ProcessShard) and prepared.sampler is loader.sampler
        indices = list(prepared.sampler)  # the loader batches them in this order, batch_size at a time
        batches = [[lengths[i] for i in indices[start:start + batch_size]] for start in range(0, len(indices), batch_size)]
        assert len(indices) == 31 and len(batches) == 8  # 61 items padded to 62, 31 per process
        for batch in batches[:-1]:
            assert max(batch) - min(batch) < 8, batch  # one group: 8 neighbouring lengths
        seen += indices
    assert sorted(set(seen)) == list(range(61)) and len(seen) == 62
    assert max(lengths[i] for i in seen[:4]) == 60  # the longest item's group first


def test_jsonl_rows_survive_unicode_line_separators(tmp_path):
    from datamodules.common import read_rows, write_rows

    # json.dumps(ensure_ascii=False) keeps these raw inside strings; str.splitlines() would break at them
    rows = [{"prompt": "a\u2028b", "chosen": "c\u2029d", "rejected": "e\x85f\x1cg"}, {"prompt": "h", "chosen": "i",
                                                                                       "rejected": "j"}]
    path = write_rows(tmp_path / "rows.jsonl", rows)
    assert len(path.read_text(encoding="utf-8").split("\n")) == 3  # two lines and the final newline
    assert read_rows(str(path)) == rows


def test_process_shards_cover_the_order_once_and_pad_with_its_last_items():
    from datamodules.common import EpochSeededSampler, ProcessShard

    order = list(EpochSeededSampler(10, seed=5))
    shards = [list(ProcessShard(EpochSeededSampler(10, seed=5), 4, rank)) for rank in range(4)]
    assert [len(shard) for shard in shards] == [3, 3, 3, 3]
    padded = order + [order[-1], order[-2]]
    assert shards == [padded[rank::4] for rank in range(4)]


@pytest.mark.parametrize("module", [PreferenceData, SFTData])
def test_group_by_length_pads_less_in_the_training_loader(module):
    def padding_share(group_by_length):
        data = module(tokenizer="tiny", train_size=640, val_size=16, test_size=16, batch_size=32,
                      group_by_length=group_by_length)
        data.setup("fit")
        batches = list(data.train_dataloader())
        assert sum(len(batch["input_ids"]) for batch in batches) == 640 * (2 if module is PreferenceData else 1)
        return sum((batch["attention_mask"] == 0).sum().item() for batch in batches) / \
            sum(batch["attention_mask"].numel() for batch in batches)

    uniform, grouped = padding_share(False), padding_share(True)
    assert grouped < 0.5 * uniform, (uniform, grouped)


def test_batch_coverage_counts_the_full_batches_holding_each_kind():
    from datamodules.common import batch_coverage

    kinds = ["a", "a", "b", "a", "c", "b", "a"]
    # batches [0, 1], [2, 3], [4, 5]; item 6 is a partial batch and does not count
    assert batch_coverage([0, 1, 2, 3, 4, 5, 6], kinds, 2) == {"a": 2 / 3, "b": 2 / 3, "c": 1 / 3}
    assert batch_coverage([6, 0, 2, 4, 1, 3], kinds, 3) == {"a": 1.0, "b": 0.5, "c": 0.5}


def test_grouping_separates_a_kind_whose_length_sets_it_apart_and_no_other():
    from datamodules.common import kinds_grouping_separates

    # 40 short pairs of kind "rare" among 600 long ones: uniform batches of 32 nearly all hold one, grouped
    # batches hold them together in two or three
    kinds = ["rare"] * 40 + ["common"] * 600
    lengths = [10 + i % 5 for i in range(40)] + [60 + i % 40 for i in range(600)]
    separated = kinds_grouping_separates(lengths, kinds, batch_size=32)
    assert list(separated) == ["rare"]
    grouped, uniform = separated["rare"]
    assert grouped <= 3 / 20 and uniform >= 0.8
    # the same lengths, with kinds drawn apart from them: grouping keeps them mixed
    draw = random.Random(0)
    assert kinds_grouping_separates(lengths, [("rare" if draw.random() < 1 / 16 else "common") for _ in lengths], 32) == {}


def test_group_by_length_warns_when_it_keeps_the_subsets_apart(tmp_path):
    short = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no", "subset": "short"} for i in range(40)]
    long_rows = [{"prompt": f"question number {i}", "chosen": "a long answer " * 8, "rejected": "a wrong answer " * 8,
                  "subset": "long"} for i in range(600)]
    path = write_jsonl(tmp_path / "pairs.jsonl", short + long_rows)

    def warnings_of(group_by_length, rows_file):
        import warnings

        data = PreferenceData(tokenizer="tiny", train_file=str(rows_file), batch_size=32, group_by_length=group_by_length)
        data.setup("fit")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data.train_dataloader()
        return [str(warning.message) for warning in caught if "group_by_length" in str(warning.message)]

    [message] = warnings_of(True, path)
    assert message.startswith("group_by_length: length follows the subset here, so grouped batches keep the subsets "
                              "apart: 'short' is in ")
    assert "set group_by_length=false" in message and "'long'" not in message
    assert warnings_of(False, path) == []
    draw = random.Random(0)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{**row, "subset": "a" if draw.random() < 1 / 16 else "b"}
                                                   for row in short + long_rows])
    assert warnings_of(True, mixed) == []


def test_training_loader_groups_one_batch_per_process():

    from datamodules.common import EpochSeededSampler, LengthGroupedSampler, ProcessShard, training_loader

    trainer = SimpleNamespace(world_size=4, global_rank=1, current_epoch=2)
    grouped = training_loader(list(range(40)), 5, list, seed=0, trainer=trainer, lengths=list(range(40)))
    assert isinstance(grouped.sampler, ProcessShard) and (grouped.sampler.num_replicas, grouped.sampler.rank) == (4, 1)
    assert isinstance(grouped.sampler.sampler, LengthGroupedSampler) and grouped.sampler.sampler.group_size == 20
    assert grouped.sampler.sampler.epoch_source() == 2  # the trainer's epoch, also after a resume
    plain = training_loader(list(range(40)), 5, list, seed=0, trainer=None)
    assert type(plain.sampler) is EpochSeededSampler


def test_eval_truncation_side_is_validated_like_truncation_side():
    with pytest.raises(ValueError, match="eval_truncation_side must be 'left' or 'right', got 'lfet'"):
        PreferenceData(tokenizer="tiny", eval_truncation_side="lfet")
    with pytest.raises(ValueError, match="truncation_side must be 'left' or 'right'"):
        PreferenceData(tokenizer="tiny", truncation_side="rigth")


def test_validate_without_validation_data_is_an_error_but_fit_without_it_works(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": "good", "rejected": "bad"}] * 2)
    data = PreferenceData(tokenizer="tiny", train_file=path)
    data.setup("fit")  # no val split: fit trains without validation
    assert "val" not in data.datasets and data.val_dataloader() == []
    with pytest.raises(DataError, match="no validation data for `validate`: set val_file"):
        PreferenceData(tokenizer="tiny", train_file=path).setup("validate")
    with pytest.raises(DataError, match="embedded data has no validation split"):
        SFTData(tokenizer="tiny", train_size=8, val_size=0, test_size=0).setup("validate")
    validated = PreferenceData(tokenizer="tiny", train_file=path, val_file=path)
    validated.setup("validate")
    assert validated.report.rows == {"val": 2}


def _tokenizer_with_bos(chat_template: str | None = None, adds_bos: bool = True, adds_eos: bool = False):
    """A word-level tokenizer that adds <s> in front of every text by default, as Llama's and Gemma's do
    (with ``adds_bos`` false, the same vocabulary without that; with ``adds_eos``, also </s> at the end, as
    an encoder such as RoBERTa does); built in memory, nothing downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "</s>", "<pad>", "<unk>", "q", "a", "good", "bad", "user", "assistant", ":"]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>" if adds_eos else "<s> $A", special_tokens=[("<s>", 0), ("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.mark.parametrize("row", [{"chosen": "q good", "rejected": "q bad"},
                                 {"prompt": "q", "chosen": " good", "rejected": " bad"},
                                 {"chosen": "<s> q good", "rejected": "<s> q bad"}],  # the text has it already
                         ids=["implicit", "explicit", "bos_in_text"])
def test_plain_preference_text_gets_the_tokenizers_bos_once(row, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [row])
    data = PreferenceData(train_file=path, val_file=path, max_length=3)
    data.tokenizer = _tokenizer_with_bos()
    assert data.tokenizer("q", add_special_tokens=True)["input_ids"] == [0, 4]
    data.setup("fit")
    bos, eos = data.tokenizer.bos_token_id, data.tokenizer.eos_token_id
    item = data.datasets["train"][0]
    assert item["chosen"] == [bos, 4, 6] and item["rejected"] == [bos, 4, 7]  # right truncation of [bos, q, good, eos]
    # left truncation (evaluation) keeps the BOS at the start and the end of the response
    val = data.datasets["val"][0]
    assert val["chosen"] == [bos, 6, eos] and val["rejected"] == [bos, 7, eos]


def test_plain_sft_prompts_and_dapo_states_get_the_tokenizers_bos_once(tmp_path):
    from datamodules.dapo_data import DAPOProblems, encode_state, state_action_tokens

    tokenizer = _tokenizer_with_bos()
    bos = tokenizer.bos_token_id
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q", "response": " good"}])
    sft = SFTData(train_file=path, use_chat_template=False)
    sft.tokenizer = tokenizer
    sft.setup("fit")
    item = sft.datasets["train"][0]
    assert item["input_ids"] == [bos, 4, 6, 1] and item["labels"] == [-100, -100, 6, 1]  # <s> q | good </s>
    # DAPO: the problem's prompt ids (what the rollout engine conditions on) and every later stage's states agree
    problems = write_jsonl(tmp_path / "problems.jsonl", [{"id": "p0", "prompt": "q", "answer": 1}])
    dapo = DAPOProblems(train_file=problems, use_chat_template=False)
    dapo.tokenizer = tokenizer
    dapo.setup("predict")
    [problem] = dapo.datasets["predict"]
    assert problem["prompt_ids"] == [bos, 4] == encode_state(tokenizer, problem["prompt_text"], "")
    assert encode_state(tokenizer, "<s> q", "a") == [bos, 4, 5]  # a BOS already in the text is not doubled
    ids, labels = state_action_tokens(tokenizer, "q", "a", "good", False, 16)
    assert ids == [bos, 4, 5, 6] and labels == [-100, -100, -100, 6]


def test_a_chat_template_without_bos_gets_the_tokenizers_bos_everywhere(tmp_path):
    from datamodules.dapo_data import encode_state, prompt_text_for

    template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"  # renders no BOS
    tokenizer = _tokenizer_with_bos(template)
    bos = tokenizer.bos_token_id
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    pairs = PreferenceData(train_file=path)
    pairs.tokenizer = tokenizer
    pairs.setup("fit")
    assert pairs.datasets["train"][0]["chosen"] == [bos, 8, 10, 4, 9, 10, 6]  # <s> user : q assistant : good
    sft = SFTData(train_file=write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q", "response": "good"}]))
    sft.tokenizer = tokenizer
    sft.setup("fit")
    assert sft.datasets["train"][0]["input_ids"][:4] == [bos, 8, 10, 4]
    assert encode_state(tokenizer, prompt_text_for(tokenizer, "q", True), "")[:4] == [bos, 8, 10, 4]


@pytest.mark.parametrize("bos_in_template", [False, True])
def test_tofu_questions_get_the_tokenizers_bos_once(bos_in_template):
    from datamodules.tofu import encode_qa

    template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    tokenizer = _tokenizer_with_bos(("{{ bos_token }}" if bos_in_template else "") + template)
    bos = tokenizer.bos_token_id
    item = encode_qa(tokenizer, "q", "good", max_length=32)
    assert item.prompt_ids == [bos, 8, 10, 4]  # <s> user : q
    assert item.input_ids == [bos, 8, 10, 4, 9, 10, 6] and item.labels == [-100] * 4 + [9, 10, 6]


def test_eco_entity_tokens_are_found_behind_the_bos():
    from modules.eco import EcoLM

    tokenizer = _tokenizer_with_bos("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}")
    owner = SimpleNamespace(tokenizer=tokenizer, settings=SimpleNamespace(entity_names=["q"]))
    mask = EcoLM._entity_mask(owner, [tokenizer.bos_token_id, 8, 10, 4], "q")  # <s> user : q
    assert mask.tolist() == [False, False, False, True]


def test_eco_classifier_prompts_keep_an_encoders_special_tokens_when_cut():
    from datamodules.common import DataReport
    from datamodules.eco_data import EcoPromptData

    tokenizer = _tokenizer_with_bos(adds_eos=True)  # <s> text </s>, as RoBERTa, the paper's classifier
    owner = SimpleNamespace(tokenizer=tokenizer, max_length=4, report=DataReport())
    rows = [{"text": "q a good bad", "label": 1, "kind": "forget"}, {"text": "q", "label": 0, "kind": "retain"}]
    items = EcoPromptData._encode_prompts(owner, "train", rows)
    assert [item["input_ids"] for item in items] == [[0, 4, 5, 1], [0, 4, 1]]  # the cut keeps </s>
    assert owner.report.truncated == {"train": 1} and owner.report.rows == {"train": 2}


def test_chat_template_preference_text_gets_no_second_bos(tmp_path):
    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    data = PreferenceData(train_file=path)
    data.tokenizer = _tokenizer_with_bos(template)
    data.setup("fit")
    chosen = data.datasets["train"][0]["chosen"]
    assert chosen == [0, 8, 10, 4, 9, 10, 6]  # <s> user : q assistant : good
    assert chosen.count(data.tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("ids,max_length,side,keep_first,expected", [
    ([0, 1, 2, 3, 4], 3, "left", 1, ([0, 3, 4], True)),    # the first id stays in front
    ([0, 1, 2, 3, 4], 3, "left", 0, ([2, 3, 4], True)),
    ([0, 1, 2, 3, 4], 3, "right", 1, ([0, 1, 2], True)),   # a right cut keeps the start anyway
    ([0, 1, 2, 3, 4], 1, "left", 1, ([4], True)),          # no room besides the kept id: a plain cut
    ([0, 1, 2], 3, "left", 1, ([0, 1, 2], False)),
])
def test_truncate_keeps_the_first_ids_on_a_left_cut(ids, max_length, side, keep_first, expected):
    from datamodules.common import truncate

    assert truncate(ids, max_length, side, keep_first) == expected


def test_left_truncated_sft_rows_keep_their_bos(tmp_path):
    tokenizer = _tokenizer_with_bos()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "q a a a", "response": " good"}])
    sft = SFTData(train_file=path, use_chat_template=False, max_length=4, truncation_side="left")
    sft.tokenizer = tokenizer
    sft.setup("fit")
    item = sft.datasets["train"][0]
    assert item["input_ids"] == [bos, 5, 6, eos] and item["labels"] == [-100, -100, 6, eos]  # <s> … a | good </s>
    assert item["prompt_ids"] == [bos, 5, 5, 5]  # <s> q a a a, cut to 4 on the left for generation
    assert sft.report.truncated == {"train": 1}


def test_left_truncated_dapo_states_keep_their_bos():
    from datamodules.dapo_data import state_action_tokens, state_tokens

    tokenizer = _tokenizer_with_bos()
    bos = tokenizer.bos_token_id
    assert state_tokens(tokenizer, "q a a", "a", 3) == ([bos, 5, 5], True)  # the critic's view of <s> q a a a
    assert state_tokens(tokenizer, "q", "a", 3) == ([bos, 4, 5], False)
    ids, labels = state_action_tokens(tokenizer, "q a a a", "a", "good", False, 4)
    assert ids == [bos, 5, 5, 6] and labels == [-100, -100, -100, 6]


def _bos_advantage_row(**fields) -> dict:
    candidates = [{"action": action, "terminal": False, "advantage": advantage, "ref_logprob": -1.0}
                  for action, advantage in (("good", 0.5), ("bad", -0.5))]
    return {"state_id": "p0/0", "problem_id": "p0", "prompt_text": "q", "prefix": "a", "gap": 1.0, "kept": True,
            "candidates": candidates, **fields}


@pytest.mark.parametrize("bos_ids,tokenizer_has_bos,error", [
    ([0], True, None),
    ([], False, None),
    (None, False, None),  # a file from before bos_ids, read with a tokenizer that adds none: encoded alike
    (None, True, r"this file predates bos_ids, so it does not say whether its ref_logprob were computed on states "
                 r"beginning with the BOS \[0\]"),
    (7, True, r"expected a list of token ids, got 7"),
    ([0], False, r"ref_logprob were computed on states beginning with \[0\] and this tokenizer begins them with \[\]"),
], ids=["same_bos", "no_bos", "old_file_no_bos", "old_file_with_bos", "not_a_list", "other_tokenizer"])
def test_actor_data_refuses_reference_logprobs_of_another_bos(bos_ids, tokenizer_has_bos, error, tmp_path):
    from datamodules.dapo_data import ActorData

    row = _bos_advantage_row(**({} if bos_ids is None else {"bos_ids": bos_ids}))
    data = ActorData(str(write_jsonl(tmp_path / "advantages.jsonl", [row])), val_fraction=0.0)
    data.tokenizer = _tokenizer_with_bos(adds_bos=tokenizer_has_bos)
    if error is None:
        data.setup("fit")
        assert data.datasets["train"][0]["candidates"][0]["input_ids"][-2:] == [5, 6]  # … a good
    else:
        with pytest.raises(DataError, match=r"advantages.jsonl: row 0, field 'bos_ids': " + error):
            data.setup("fit")
