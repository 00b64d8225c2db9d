"""The TOFU data module, the model-agnostic evaluator, the callback's test and fit paths through cli.py,
the real-data layout through the data module, bad inputs, and the recipe end to end on a toy size."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import padless_model
from scipy.stats import ks_2samp

from callbacks.tofu_eval import EvalLM, HFEvalLM, TofuEvaluator, as_eval_lm
from datamodules import tofu_data as td
from datamodules.common import DataError, padding_id
from datamodules.tofu import OverlengthError, TofuQAData, encode_qa
from modules import tofu_eval as te
from modules.lm import load_model, load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = ["--data.init_args.n_authors=4", "--data.init_args.qa_per_author=2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    return HFEvalLM(load_model("tiny", tokenizer=tokenizer).eval(), tokenizer)


def decoded_answer(tokenizer, input_ids, labels) -> str:
    return tokenizer.decode([t for t, lab in zip(input_ids.tolist(), labels.tolist()) if lab != -100],
                            skip_special_tokens=True)


# ----------------------------------------------------------------------------------------------------
# Data module


def test_finetune_batches_are_sft_rows_with_labels_on_the_answer(tokenizer):
    data = TofuQAData(task="finetune", train_split="full", n_authors=5, qa_per_author=2, batch_size=4)
    data.setup("fit")
    generated = td.generate_tofu(n_authors=5, qa_per_author=2)
    assert data.report.rows["train"] == len(generated.rows) + len(generated.general())
    batch = next(iter(data.train_dataloader()))
    assert {"input_ids", "attention_mask", "labels", "prompt_input_ids", "prompt_attention_mask", "reference"} <= set(batch)
    answer = decoded_answer(tokenizer, batch["input_ids"][0], batch["labels"][0])
    assert answer == batch["reference"][0]  # labels cover the answer (and the end-of-turn token) only
    retain = TofuQAData(task="finetune", train_split="retain90", n_authors=5, qa_per_author=2)
    forget_questions = {row["question"] for row in generated.split("forget10")}
    assert not forget_questions & {row["question"] for row in retain.finetune_rows()}
    assert TofuQAData(source="locuslab/TOFU").include_general is False  # real TOFU: general sets are test-only


def test_unlearn_batches_pair_forget_answer_refusal_and_retain_row(tokenizer):
    data = TofuQAData(task="unlearn", n_authors=6, qa_per_author=3, batch_size=8)
    data.setup("fit")
    batch = next(iter(data.reference_dataloader()))
    forget_rows = td.generate_tofu(n_authors=6, qa_per_author=3).split("forget10")
    assert batch["index"].tolist() == list(range(len(forget_rows)))
    for i, row in enumerate(forget_rows):
        assert decoded_answer(tokenizer, batch["forget_input_ids"][i], batch["forget_labels"][i]) == row["answer"]
        assert decoded_answer(tokenizer, batch["template_input_ids"][i], batch["template_labels"][i]) in td.REFUSALS
        # same prompt for both answers
        prompt = (batch["forget_labels"][i] == -100) & (batch["forget_attention_mask"][i] == 1)
        n = int(prompt.sum())
        assert torch.equal(batch["forget_input_ids"][i, :n], batch["template_input_ids"][i, :n])
    assert "retain_input_ids" in batch and batch["retain_input_ids"].shape[0] == len(forget_rows)


def test_eval_sets_and_test_batches():
    data = TofuQAData(task="unlearn", n_authors=5, qa_per_author=2)
    sets = data.eval_sets()
    assert list(sets) == list(td.EVAL_KINDS)
    assert all("perturbed_answer" in row for rows in sets.values() for row in rows)
    data.setup("test")
    kinds = Counter(td.EVAL_KINDS[k] for batch in data.test_dataloader() for k in batch["kind"].tolist())
    assert kinds == {kind: len(rows) for kind, rows in sets.items()}  # every row of every split, once


def test_real_layout_through_the_data_module(tmp_path):
    folder = tmp_path / "tofu"
    folder.mkdir()
    for config in ("full", "forget01", "retain99", "forget01_perturbed", "retain_perturbed",
                   "real_authors_perturbed", "world_facts_perturbed"):
        shutil.copy(FIXTURES / f"tofu_{config}.jsonl", folder / f"{config}.jsonl")
    data = TofuQAData(task="unlearn", forget_split="forget01", source=str(folder), batch_size=2)
    data.setup("fit")
    data.setup("test")
    assert data.report.rows["forget"] == 2 and data.report.rows["retain"] == 2
    assert data.report.rows["test/forget"] == 2 and data.report.rows["test/world_facts"] == 2
    finetune = TofuQAData(task="finetune", source=str(folder))
    assert len(finetune.finetune_rows()) == 4  # `full` only: the real general sets are evaluation-only


def test_retain_rows_are_drawn_anew_each_epoch_also_by_persistent_workers():
    from types import SimpleNamespace

    def retain_rows_per_epoch(num_workers: int) -> list[dict[int, list[int]]]:
        data = TofuQAData(task="unlearn", n_authors=10, qa_per_author=4, batch_size=3, num_workers=num_workers)
        # what the data module and its loader read of a trainer; a worker keeps the copy made when it started
        progress = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(
            current=SimpleNamespace(ready=0))))
        data.trainer = SimpleNamespace(current_epoch=0, world_size=1, global_rank=0, fit_loop=progress,
                                       num_training_batches=float("inf"), lightning_module=None)
        data.setup("fit")
        loader = data.train_dataloader()
        assert loader.persistent_workers == (num_workers > 0)
        epochs = []
        for epoch in (0, 1):
            data.trainer.current_epoch = epoch
            epochs.append({int(index): ids[mask.bool()].tolist() for batch in loader
                           for index, ids, mask in zip(batch["index"], batch["retain_input_ids"],
                                                       batch["retain_attention_mask"])})
        return epochs

    in_process, in_worker = retain_rows_per_epoch(0), retain_rows_per_epoch(1)
    assert len(in_process[0]) == 4 and in_process[0] != in_process[1]  # re-drawn: another pairing in epoch 1
    assert in_worker == in_process


def test_a_tokenizer_without_a_pad_token_pads_with_eos_and_changes_no_number(tmp_path, tokenizer, tiny_lm):
    no_pad = load_tokenizer("tiny")
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None and no_pad.eos_token_id is not None
    for task, prefix in (("finetune", ""), ("unlearn", "forget_")):
        data = TofuQAData(task=task, n_authors=5, qa_per_author=2, batch_size=8)
        data.tokenizer = no_pad
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        padding = batch[f"{prefix}attention_mask"] == 0
        assert padding.any() and (batch[f"{prefix}input_ids"][padding] == no_pad.eos_token_id).all()
        assert (batch[f"{prefix}labels"][padding] == -100).all()
    # a bare model folder whose tokenizer has no pad token, evaluated by path: the numbers of the same model
    # padded with its pad token
    folder = tmp_path / "model"
    tiny_lm.model.save_pretrained(folder)
    no_pad.save_pretrained(folder)
    assert load_tokenizer(str(folder)).pad_token_id is None
    data = TofuQAData(n_authors=4, qa_per_author=2)
    evaluator = data.evaluator(load_tokenizer(str(folder)), max_new_tokens=4)
    result = evaluator.evaluate(str(folder))
    reference = data.evaluator(tokenizer, max_new_tokens=4).evaluate(tiny_lm)
    for kind in td.EVAL_KINDS:
        np.testing.assert_allclose(result["splits"][kind]["gt_nll"], reference["splits"][kind]["gt_nll"], rtol=1e-5)
        assert result["generations"][kind] == reference["generations"][kind]
    assert result["report"]["model_utility"] == pytest.approx(reference["report"]["model_utility"], rel=1e-5)
    grown = load_tokenizer("tiny")  # a pad token added to the tokenizer but not to the loaded model
    grown.add_special_tokens({"pad_token": "<|new_pad|>"})
    with pytest.raises(ValueError, match="beyond the model's 262 embeddings"):
        HFEvalLM(tiny_lm.model, grown)


def test_the_finetune_path_trains_and_evaluates_a_model_without_a_pad_token(tmp_path):
    import lightning.pytorch as pl

    from callbacks.tofu_eval import TofuEvaluation
    from modules.sft import SFT

    folder = padless_model(tmp_path / "llama_like")
    module = SFT(model=str(folder), generate_on_validation=False)  # the module of configs/tofu/{target,retain}.yaml
    data = TofuQAData(task="finetune", n_authors=4, qa_per_author=2, batch_size=8, eval_batch_size=16)
    evaluation = TofuEvaluation(save_dir=str(tmp_path / "eval"), max_new_tokens=2)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=1, val_check_interval=2,
                         callbacks=[evaluation])
    trainer.fit(module, datamodule=data)
    batch = next(iter(data.train_dataloader()))
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["input_ids"][padding] == padding_id(module.tokenizer)).all()
    assert trainer.global_step == 2 and np.isfinite(trainer.callback_metrics["val/loss"].item())
    assert_padding_changes_no_number(te.load_eval(tmp_path / "eval" / "epoch_001.json"), data, module)
    # the evaluation history goes into checkpoints (so a resumed run's history.json goes on), under its own key
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    saved = torch.load(tmp_path / "fit.ckpt", weights_only=True)["callbacks"][evaluation.state_key]
    assert saved["history"] == evaluation.history and [h["tag"] for h in saved["history"]] == ["epoch_001"]


@pytest.mark.parametrize("max_epochs, max_steps, evaluated", [
    (-1, 60, [3, 6]),       # a step-limited fit (max_epochs -1): every 3 epochs, and the epoch max_steps ends
    (-1, 50, [3, 5]),
    (10, 45, [3, 5]),       # max_steps ends it before max_epochs
    (4, -1, [3, 4]),        # the last of max_epochs
])
def test_tofu_evaluation_runs_every_n_epochs_and_after_the_last(max_epochs, max_steps, evaluated):
    from types import SimpleNamespace

    from callbacks.tofu_eval import TofuEvaluation

    evaluation = TofuEvaluation(every_n_epochs=3)
    tags = []
    evaluation.run = lambda trainer, module, tag: tags.append(tag) or {"report": {}, "seconds": 0.0}
    module = SimpleNamespace(log_dict=lambda *a, **k: None, log=lambda *a, **k: None)
    for epoch in range(10):  # 10 steps per epoch
        trainer = SimpleNamespace(current_epoch=epoch, max_epochs=max_epochs, max_steps=max_steps,
                                  global_step=min(10 * (epoch + 1), max_steps if max_steps > 0 else 10 ** 9))
        evaluation.on_train_epoch_end(trainer, module)
        if (max_steps > 0 and trainer.global_step >= max_steps) or (max_epochs > 0 and epoch + 1 >= max_epochs):
            break
    assert tags == [f"epoch_{epoch:03d}" for epoch in evaluated]


def test_tofu_evaluation_history_survives_a_resume_and_two_evaluations_keep_their_own():
    import lightning.pytorch as pl

    from callbacks.tofu_eval import TofuEvaluation

    before = TofuEvaluation()
    before.history = [{"tag": "epoch_001", "global_step": 10}]
    after = TofuEvaluation()
    after.load_state_dict(before.state_dict())
    assert after.history == before.history
    pl.Trainer(logger=False, callbacks=[TofuEvaluation(save_dir="a"), TofuEvaluation(save_dir="b")])  # distinct keys


def assert_padding_changes_no_number(saved: dict, data: TofuQAData, module) -> None:
    """``saved`` (a TOFU evaluation of ``module`` padded with EOS) equals an evaluation of the same weights
    padded with another token: the padding is masked everywhere."""
    from modules import lm

    other = load_tokenizer(module.model_name_or_path)
    other.pad_token = lm.UNK
    assert other.pad_token_id != module.tokenizer.eos_token_id
    again = data.evaluator(other, max_new_tokens=2).evaluate(module.model)
    for kind in td.EVAL_KINDS:
        np.testing.assert_allclose(saved["splits"][kind]["gt_nll"], again["splits"][kind]["gt_nll"], rtol=1e-5)
    assert saved["report"]["model_utility"] == pytest.approx(again["report"]["model_utility"], rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# Bad inputs


def test_empty_forget_split_is_a_clear_error():
    data = TofuQAData(task="unlearn", forget_split="forget10", files={"forget10": str(FIXTURES / "tofu_empty.jsonl")},
                      n_authors=4, qa_per_author=2)
    with pytest.raises(td.TofuDataError, match=r"split 'forget10' is empty"):
        data.setup("fit")


def test_missing_perturbed_answers_are_a_clear_error(tokenizer):
    data = TofuQAData(task="unlearn", forget_split="forget01", n_authors=4, qa_per_author=2,
                      files={"forget01_perturbed": str(FIXTURES / "tofu_bad_missing_perturbed.jsonl")})
    with pytest.raises(td.TofuDataError, match=r"row 1 \(line 3\): field 'perturbed_answer': missing"):
        data.eval_sets()
    sets = TofuQAData(n_authors=4, qa_per_author=2).eval_sets()
    sets["retain"] = [{**sets["retain"][0], "perturbed_answer": []}]
    with pytest.raises(td.TofuDataError, match=r"eval:retain: row 0: field 'perturbed_answer': empty list"):
        TofuEvaluator(sets, tokenizer)
    sets = TofuQAData(n_authors=4, qa_per_author=2).eval_sets()
    del sets["world_facts"]
    with pytest.raises(ValueError, match=r"missing \['world_facts'\]"):
        TofuEvaluator(sets, tokenizer)


def test_answers_longer_than_max_length_are_truncated_and_counted_or_refused(tokenizer):
    question, answer = "Where was Ada Lin born?", "She was born in Lisbon. " * 10
    full = encode_qa(tokenizer, question, answer, max_length=1024)
    assert not full.truncated
    cut = encode_qa(tokenizer, question, answer, max_length=60)
    assert cut.truncated and len(cut.input_ids) == 60 and cut.prompt_ids == full.prompt_ids
    assert encode_qa(tokenizer, question, answer, max_length=60, overlength="drop") is None
    with pytest.raises(OverlengthError, match=r"row 7: \d+ tokens .* exceed max_length=60"):
        encode_qa(tokenizer, question, answer, max_length=60, overlength="error", where="row 7")
    assert encode_qa(tokenizer, question, answer, max_length=10) is None  # not even the prompt fits

    # through the data module: counted in the data report, or dropped, or a clear error
    data = TofuQAData(task="finetune", n_authors=4, qa_per_author=3, max_length=60)
    data.setup("fit")
    assert data.report.truncated["train"] > 0
    with pytest.raises(OverlengthError, match="exceed max_length=60"):
        TofuQAData(task="finetune", n_authors=4, qa_per_author=3, max_length=60, overlength="error").setup("fit")
    with pytest.raises(DataError, match="were dropped"):
        TofuQAData(task="unlearn", n_authors=4, qa_per_author=3, max_length=20).setup("fit")

    # in the evaluator: per-split counts of truncated and dropped samples
    sets = TofuQAData(n_authors=4, qa_per_author=3).eval_sets()
    evaluator = TofuEvaluator(sets, tokenizer, max_length=60)
    assert evaluator.counts["retain"]["truncated"] > 0 and evaluator.counts["retain"]["dropped"] == 0
    assert sum(c["n"] for c in evaluator.counts.values()) == sum(len(rows) for rows in sets.values())


# ----------------------------------------------------------------------------------------------------
# The evaluator


def test_evaluator_on_a_tiny_model_gives_a_full_report(tmp_path, tokenizer, tiny_lm):
    data = TofuQAData(n_authors=5, qa_per_author=2)
    evaluator = data.evaluator(tokenizer, max_new_tokens=6)
    result = evaluator.evaluate(tiny_lm)
    report = result["report"]
    for kind in td.EVAL_KINDS:
        for name in ("prob", "rougeL_recall", "truth_ratio"):
            assert np.isfinite(report[f"{kind}/{name}"]), (kind, name)
        assert len(result["generations"][kind]) == report[f"{kind}/n"]
    assert 0 <= report["model_utility"] <= 1 and report["forget_quality"] is None
    # the numbers follow from the per-sample arrays
    forget = result["splits"]["forget"]
    assert report["forget/prob"] == pytest.approx(np.exp(-forget["gt_nll"]).mean())

    saved = evaluator.save(tmp_path / "retain.json", result, model="tiny")
    assert saved["format"] == te.EVAL_FORMAT and saved["counts"]["forget"]["n"] == report["forget/n"]
    body = te.load_eval(tmp_path / "retain.json")
    assert set(body["splits"]) == set(td.EVAL_KINDS) and body["forget_split"] == "forget10"
    assert len(body["generations"]["world_facts"]) == report["world_facts/n"]


def test_forget_quality_is_read_from_a_saved_retain_evaluation(tmp_path, tokenizer, tiny_lm):
    evaluator = TofuQAData(n_authors=5, qa_per_author=2).evaluator(tokenizer, max_new_tokens=2)
    retain_result = evaluator.evaluate(tiny_lm, generate=False)
    evaluator.save(tmp_path / "retain.json", retain_result)
    reference = te.reference_truth_ratios(tmp_path / "retain.json", "forget10")
    # a different model: the tiny preset with shifted weights
    other_model = load_model("tiny", tokenizer=tokenizer).eval()
    with torch.no_grad():
        other_model.model.embed_tokens.weight.mul_(3.0)
    result = evaluator.evaluate(as_eval_lm(other_model, tokenizer), reference, generate=False)
    mine = te.truth_ratio(result["splits"]["forget"]["base_nll"], result["splits"]["forget"]["perturbed_nll"])
    expected = ks_2samp(mine, reference)
    assert result["report"]["forget_quality"] == pytest.approx(expected.pvalue)
    assert result["report"]["ks_statistic"] == pytest.approx(expected.statistic)
    with pytest.raises(ValueError, match="not 'forget05'"):
        te.reference_truth_ratios(tmp_path / "retain.json", "forget05")


class CountingLM:
    """Any object with the two methods is evaluable (what an inference-time wrapper such as ECO's provides)."""

    def __init__(self, inner: HFEvalLM):
        self.inner, self.scored, self.questions = inner, 0, set()

    def score_tokens(self, batch):
        self.scored += len(batch["questions"])
        self.questions.update(batch["questions"])
        assert batch["prompt_lengths"].shape[0] == batch["input_ids"].shape[0]
        return self.inner.score_tokens(batch)

    def generate_answers(self, batch, max_new_tokens):
        return ["I don't know."] * batch["prompt_input_ids"].shape[0]


def test_evaluator_works_on_any_object_with_the_protocol(tokenizer, tiny_lm):
    evaluator = TofuQAData(n_authors=4, qa_per_author=2).evaluator(tokenizer, max_new_tokens=2)
    counting = CountingLM(tiny_lm)
    assert isinstance(counting, EvalLM) and as_eval_lm(counting) is counting
    wrapped = evaluator.evaluate(counting)
    plain = evaluator.evaluate(tiny_lm, generate=False)
    assert counting.scored == len(evaluator.requests)
    np.testing.assert_allclose(wrapped["splits"]["retain"]["gt_nll"], plain["splits"]["retain"]["gt_nll"])
    assert wrapped["generations"]["forget"][0] == "I don't know."
    with pytest.raises(TypeError, match="cannot evaluate"):
        as_eval_lm(42)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        as_eval_lm(tiny_lm.model)


# ----------------------------------------------------------------------------------------------------
# Through cli.py: the test path and the per-epoch evaluation during unlearning


def test_cli_test_path_then_unlearning_with_per_epoch_evaluation(run_cli, tmp_path):
    retain_dir = tmp_path / "retain_eval"
    run_cli("test", "configs/tofu/eval.yaml", *SMALL, "--model.init_args.model=tiny",
            f"--trainer.callbacks.init_args.save_dir={retain_dir}", "--trainer.callbacks.init_args.max_new_tokens=4",
            name="eval")
    body = te.load_eval(retain_dir / "test.json")
    assert body["report"]["forget_quality"] is None and body["counts"]["forget"]["truncated"] == 0

    unlearn_dir = tmp_path / "unlearn_eval"
    cli = run_cli("fit", "configs/flat/unlearn.yaml", *SMALL, "--model.init_args.model=tiny",
                  "--model.init_args.loss=npo", "--trainer.max_epochs=2", "--data.init_args.batch_size=1",
                  f"--trainer.callbacks.init_args.save_dir={unlearn_dir}",
                  f"--trainer.callbacks.init_args.retain_eval={retain_dir / 'test.json'}",
                  "--trainer.callbacks.init_args.max_new_tokens=4", name="unlearn")
    history = json.loads((unlearn_dir / "history.json").read_text())
    assert [h["tag"] for h in history] == ["epoch_001", "epoch_002"]
    assert 0 <= history[-1]["report"]["forget_quality"] <= 1
    metrics = cli.trainer.callback_metrics
    assert {"val/forget_quality", "val/model_utility", "val/forget/rougeL_recall", "train/p_forget",
            "train/weight_forget"} <= set(metrics)
    # the same numbers went to TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = list((tmp_path / "unlearn").glob("version_*"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert {"val/forget_quality", "val/model_utility", "train/p_template"} <= set(accumulator.Tags()["scalars"])


def test_retain_evaluation_of_another_forget_split_fails_before_training(run_cli, tmp_path):
    evaluator_dir = tmp_path / "e"
    run_cli("test", "configs/tofu/eval.yaml", *SMALL, "--model.init_args.model=tiny",
            "--data.init_args.forget_split=forget05", f"--trainer.callbacks.init_args.save_dir={evaluator_dir}",
            "--trainer.callbacks.init_args.max_new_tokens=2", name="eval")
    with pytest.raises(ValueError, match="evaluated on forget split 'forget05', not 'forget10'"):
        run_cli("fit", "configs/flat/unlearn.yaml", *SMALL, "--model.init_args.model=tiny",
                f"--trainer.callbacks.init_args.retain_eval={evaluator_dir / 'test.json'}", name="unlearn")


@pytest.mark.slow
def test_recipe_end_to_end_on_a_toy_size(tmp_path):
    from recipes.tofu_flat import main

    result = main(["--out", str(tmp_path / "tofu"), "--n-authors", "3", "--qa-per-author", "2",
                   "--finetune-epochs", "1", "--unlearn-epochs", "1", "--methods", "flat_kl,ga", "--jobs", "1"])
    assert [row["model"] for row in result["rows"]] == ["target", "retain", "flat_kl", "ga"]
    assert result["rows"][1]["forget_quality"] == pytest.approx(1.0)
    assert (tmp_path / "tofu" / "results.md").read_text().startswith("| model | Forget Quality")
    assert json.loads((tmp_path / "tofu" / "results.json").read_text())["rows"][2]["model"] == "flat_kl"

    # several learning rates, on the same target and retain model: one run each, compared at matched utility
    swept = main(["--out", str(tmp_path / "tofu"), "--n-authors", "3", "--qa-per-author", "2", "--reuse",
                  "--finetune-epochs", "1", "--unlearn-epochs", "1", "--methods", "ga", "--jobs", "1",
                  "--unlearn-lr", "1e-4,1e-3"])
    assert [row["model"] for row in swept["rows"]] == ["target", "retain", "ga_lr0.0001", "ga_lr0.001"]
    assert (tmp_path / "tofu" / "unlearn" / "ga_lr0.001" / "eval" / "history.json").exists()
    [best] = swept["utility_matched_over_lrs"]
    candidates = [h for name in ("ga_lr0.0001", "ga_lr0.001") for h in swept["histories"][name]
                  if h["model_utility"] >= 0.9 * swept["rows"][0]["model_utility"]]
    assert best["model"].startswith("ga_lr") and best["lr"] in (1e-4, 1e-3)
    assert best["forget_quality"] == max(h["forget_quality"] for h in candidates)
    assert "Each method at its best learning rate (0.0001, 0.001)" in (tmp_path / "tofu" / "results.md").read_text()


def test_utility_matched_takes_the_best_forget_quality_then_the_most_utility():
    from recipes.tofu_flat import learning_rates, utility_matched

    history = [{"tag": "epoch_001", "forget_quality": 0.01, "model_utility": 0.70},  # below 90% of 0.8
               {"tag": "epoch_002", "forget_quality": 0.001, "model_utility": 0.75},
               {"tag": "epoch_003", "forget_quality": 0.001, "model_utility": 0.78}]
    assert utility_matched(history, 0.8)["epoch"] == "epoch_003"
    assert utility_matched(history, 0.9) is None  # nothing keeps 0.81
    assert learning_rates("1e-4, 3e-4") == [1e-4, 3e-4]
    for bad in ("1e-4,1e-4", "fast", "0"):
        with pytest.raises(Exception, match="--unlearn-lr"):
            learning_rates(bad)


def test_the_recipe_reuses_only_evaluations_with_todays_rouge(tmp_path):
    from recipes.tofu_flat import Recipe, parse_args

    recipe = Recipe(parse_args(["--out", str(tmp_path), "--reuse"]))
    stages = []
    recipe.cli = lambda stage, *args: stages.append(stage)
    saved = tmp_path / "target" / "eval" / "test.json"
    one_row = {"gt_nll": [1.0], "base_nll": [1.0], "perturbed_nll": [[2.0]], "rougeL_recall": [0.5]}
    splits = {kind: one_row for kind in te.EVAL_KINDS}
    body = te.save_eval(saved, splits, "forget10")
    assert body["rouge"] == te.ROUGE_METHOD
    assert recipe.evaluate("target", None) == saved and stages == []  # reused
    saved.write_text(json.dumps({key: value for key, value in body.items() if key != "rouge"}))
    assert recipe.evaluate("target", None) == saved and stages == ["eval_target"]  # unstemmed ROUGE: redone
