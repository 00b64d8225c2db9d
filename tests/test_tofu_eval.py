"""TOFU evaluation math against hand-computed values and scipy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from modules import tofu_eval as te

LN2, LN4, LN8 = math.log(2), math.log(4), math.log(8)


def test_prob_is_exp_of_mean_token_nll():
    # token log-probs log(1/2) and log(1/8) on the answer, a prompt token masked out
    logp = torch.tensor([[-5.0, -LN2, -LN8]])
    mask = torch.tensor([[0, 1, 1]])
    assert te.mean_answer_nll(logp, mask).item() == pytest.approx(2 * LN2)  # (ln2 + 3 ln2) / 2
    assert te.answer_prob(logp, mask).item() == pytest.approx(0.25)  # geometric mean of 1/2 and 1/8
    with pytest.raises(ValueError, match=r"rows \[1\] have no answer tokens"):
        te.mean_answer_nll(torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]))


def test_answer_nll_from_logits_shifts_labels():
    # two-token vocabulary, every position predicts token 1 with probability 3/4
    logits = torch.tensor([[[0.0, math.log(3)]] * 3])
    labels = torch.tensor([[-100, 1, 0]])  # answer tokens: 1 (p=3/4) then 0 (p=1/4)
    expected = -(math.log(0.75) + math.log(0.25)) / 2
    assert te.answer_nll_from_logits(logits, labels).item() == pytest.approx(expected)


def test_truth_ratio_hand_examples():
    # base NLL 0.5, perturbed NLLs 1 and 2: R = exp(0.5 - 1.5) = e^-1
    assert te.truth_ratio([0.5], [[1.0, 2.0]])[0] == pytest.approx(0.36787944117144233)
    # ragged lists: second sample has one perturbed answer with the base's NLL -> R = 1
    ratios = te.truth_ratio([0.5, LN2], [[1.0, 2.0], [LN2]])
    assert ratios == pytest.approx([0.36787944117144233, 1.0])
    # geometric mean over perturbed answers of length-normalised probabilities, divided by the base's
    p_base, p_wrong = 0.5, [0.25, 0.04]
    r = te.truth_ratio([-math.log(p_base)], [[-math.log(p) for p in p_wrong]])[0]
    assert r == pytest.approx(math.sqrt(0.25 * 0.04) / 0.5)  # 0.1 / 0.5 = 0.2
    assert te.truth_ratio_score([0.2, 1.5]) == pytest.approx([0.8, 0.0])
    assert te.forget_truth_ratio_score([0.2, 4.0]) == pytest.approx([0.2, 0.25])
    with pytest.raises(ValueError, match="non-empty"):
        te.truth_ratio([0.1], [[]])
    with pytest.raises(ValueError, match="samples"):
        te.truth_ratio([0.1, 0.2], [[0.3]])


def test_normalized_prob_hand_example():
    # P(a) = e^-0.5, P(wrong) = e^-1, e^-2: e^-0.5 / (e^-0.5 + e^-1 + e^-2)
    assert te.normalized_prob([0.5], [[1.0, 2.0]])[0] == pytest.approx(0.5465493872661796)
    # all probabilities underflow in float64, the ratio does not
    assert te.normalized_prob([2000.0], np.array([[2000.0, 2000.0]]))[0] == pytest.approx(1 / 3)


@pytest.mark.parametrize(("prediction", "reference", "expected"), [
    ("the cat on a mat", "The cat sat on the mat", 4 / 6),  # LCS: the cat on mat
    ("she was born in lisbon", "She was born in Lisbon.", 1.0),  # case and punctuation ignored
    ("d c b a", "a b c d", 1 / 4),  # order matters
    ("the", "the the", 1 / 2),
    ("", "She was born in Lisbon.", 0.0),
    ("I don't know.", "She debuted with 'The Glass Orchard'.", 0.0),
    ("Her father was a well-known baker in Oslo", "Her father was a baker.", 1.0),  # recall ignores extras
    ("anything", "...", 0.0),  # a reference without tokens
    # Porter stemming, as TOFU's rouge_score(use_stemmer=True): writes -> write, novels -> novel
    ("she write a novel", "She writes novels.", 1.0),
    ("wa", "was", 0.0),  # tokens of 3 characters or fewer are not stemmed ("was" would become "wa")
])
def test_rouge_l_recall(prediction, reference, expected):
    assert te.rouge_l_recall(prediction, reference) == pytest.approx(expected)


def test_rouge_l_recall_without_stemming_compares_the_words_as_written():
    assert te.rouge_l_recall("she write a novel", "She writes novels.", stem=False) == pytest.approx(1 / 3)


def test_rouge_tokens():
    assert te.rouge_tokens("It's 'The Glass Orchard', 1984!", stem=False) == [
        "it", "s", "the", "glass", "orchard", "1984"]
    # stemmed by Porter's rules: -ies -> -i; -ed and -ing are dropped where the rest holds a vowel
    assert te.rouge_tokens("Ponies praised the singing authors") == ["poni", "prais", "the", "sing", "author"]


def test_forget_quality_hand_and_scipy():
    # fully separated samples of 3: D = 1, exact p = 2 / C(6, 3) = 0.1
    result = te.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert result["ks_statistic"] == pytest.approx(1.0)
    assert result["forget_quality"] == pytest.approx(0.1)
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 1, 40), rng.uniform(0.2, 1.2, 30)
    expected = ks_2samp(a, b)
    result = te.forget_quality(a, b)
    assert result["forget_quality"] == pytest.approx(expected.pvalue)
    assert result["ks_statistic"] == pytest.approx(expected.statistic)
    assert te.forget_quality(a, a)["forget_quality"] == pytest.approx(1.0)
    # TOFU's code feeds KS with 1/R; the test only sees ranks, so the direction of the ratio does not matter
    assert te.forget_quality(1 / a, 1 / b)["forget_quality"] == pytest.approx(expected.pvalue)
    with pytest.raises(ValueError, match="at least one"):
        te.forget_quality([], [1.0])


def test_harmonic_mean():
    assert te.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert te.harmonic_mean([0.3, 0.0]) == 0.0
    with pytest.raises(ValueError):
        te.harmonic_mean([0.5, -0.1])


def _hand_splits():
    """Per-sample arrays whose nine utility numbers are easy to derive by hand (see test_model_utility)."""
    return {
        "retain": {"gt_nll": [LN2, LN4], "base_nll": [0.0, 0.0], "perturbed_nll": [[LN2], [LN4]],
                   "rougeL_recall": [1.0, 0.5]},
        "real_authors": {"gt_nll": [0.0, 0.0], "base_nll": [0.0, 0.0], "perturbed_nll": [[LN4], [LN4, LN4]],
                         "rougeL_recall": [0.5, 0.5]},
        "world_facts": {"gt_nll": [LN2, LN2], "base_nll": [LN2, LN2], "perturbed_nll": [[LN2], [LN8]],
                        "rougeL_recall": [1.0, 0.0]},
        # truth ratios exp(0 + ln k) = 1, 2, 3
        "forget": {"gt_nll": [0.0, LN2, LN4], "base_nll": [0.0, 0.0, 0.0],
                   "perturbed_nll": [[0.0], [-LN2], [-math.log(3)]], "rougeL_recall": [1.0, 0.0, 0.5]},
    }


def test_model_utility_and_report_by_hand():
    report = te.tofu_report(_hand_splits(), retain_forget_truth_ratios=[4.0, 5.0, 6.0])
    # retain: Prob mean(1/2, 1/4) = 0.375; ROUGE 0.75; R = 1/2, 1/4 -> mean(1 - R) = 0.625
    # real_authors: normalised 1/(1 + 1/4) = 0.8 and 1/(1 + 1/2) = 2/3 -> 11/15; ROUGE 0.5; R = 1/4 -> 0.75
    # world_facts: normalised 1/(1+1) = 0.5 and 1/(1 + 1/4) = 0.8 -> 0.65; ROUGE 0.5; R = 1, 1/4 -> 0.375
    expected = {"retain/prob": 0.375, "retain/rougeL_recall": 0.75, "retain/truth_ratio": 0.625,
                "real_authors/prob": 11 / 15, "real_authors/rougeL_recall": 0.5, "real_authors/truth_ratio": 0.75,
                "world_facts/prob": 0.65, "world_facts/rougeL_recall": 0.5, "world_facts/truth_ratio": 0.375}
    for key, value in expected.items():
        assert report[key] == pytest.approx(value), key
    nine = [0.375, 0.75, 0.625, 11 / 15, 0.5, 0.75, 0.65, 0.5, 0.375]
    assert report["model_utility"] == pytest.approx(9 / sum(1 / x for x in nine))
    # forget: Prob mean(1, 1/2, 1/4); ROUGE 0.5; min(R, 1/R) = 1, 1/2, 1/3
    assert report["forget/prob"] == pytest.approx(1.75 / 3)
    assert report["forget/rougeL_recall"] == pytest.approx(0.5)
    assert report["forget/truth_ratio"] == pytest.approx((1 + 0.5 + 1 / 3) / 3)
    assert report["forget/n"] == 3
    # forget quality: truth ratios 1, 2, 3 against 4, 5, 6
    assert report["forget_quality"] == pytest.approx(0.1) and report["ks_statistic"] == pytest.approx(1.0)


def test_report_without_reference_or_forget():
    splits = _hand_splits()
    report = te.tofu_report(splits)
    assert report["forget_quality"] is None and "forget/prob" in report
    del splits["forget"]
    assert "forget/prob" not in te.tofu_report(splits)
    with pytest.raises(ValueError, match="needs this model's 'forget' split"):
        te.tofu_report(splits, retain_forget_truth_ratios=[1.0])
    del splits["world_facts"]
    with pytest.raises(ValueError, match="missing \\['world_facts'\\]"):
        te.tofu_report(splits)


def test_split_metrics_checks_lengths():
    bad = dict(_hand_splits()["retain"], rougeL_recall=[1.0])
    with pytest.raises(ValueError, match="differ in length"):
        te.split_metrics("retain", bad)
    with pytest.raises(ValueError, match="missing per-sample fields"):
        te.split_metrics("retain", {"gt_nll": [1.0]})


def test_saved_eval_round_trip_feeds_forget_quality(tmp_path):
    splits = _hand_splits()
    # the "retain model": truth ratios 4, 5, 6 on the same forget split
    retain_splits = dict(splits, forget={"gt_nll": [1.0, 1.0, 1.0], "base_nll": [0.0, 0.0, 0.0],
                                         "perturbed_nll": [[-LN4], [-math.log(5)], [-math.log(6)]],
                                         "rougeL_recall": [0.0, 0.0, 0.0]})
    path = tmp_path / "retain" / "eval.json"
    te.save_eval(path, retain_splits, forget_split="forget10", model="retain90")
    body = json.loads(path.read_text())
    assert body["format"] == "tofu-eval/v1" and body["forget_split"] == "forget10"
    assert set(body["splits"]) == set(te.EVAL_KINDS)
    assert set(body["splits"]["forget"]) == {*te.SAMPLE_FIELDS, "truth_ratio"}
    assert body["report"]["model_utility"] == pytest.approx(te.tofu_report(retain_splits)["model_utility"])

    reference = te.reference_truth_ratios(path, forget_split="forget10")
    assert reference == pytest.approx([4.0, 5.0, 6.0])
    report = te.tofu_report(splits, retain_forget_truth_ratios=reference)
    assert report["forget_quality"] == pytest.approx(0.1)
    # without the stored truth ratios they are recomputed from the NLLs
    del body["splits"]["forget"]["truth_ratio"]
    path.write_text(json.dumps(body))
    assert te.reference_truth_ratios(path) == pytest.approx([4.0, 5.0, 6.0])
    with pytest.raises(ValueError, match="not 'forget05'"):
        te.reference_truth_ratios(path, forget_split="forget05")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tofu-eval/v1"):
        te.reference_truth_ratios(tmp_path / "other.json")


def test_report_scalars_drop_none():
    scalars = te.report_scalars(te.tofu_report(_hand_splits()))
    assert "forget_quality" not in scalars and "model_utility" in scalars
    assert all(isinstance(v, float) for v in scalars.values())


def test_saved_eval_extra_entries(tmp_path):
    body = te.save_eval(tmp_path / "e.json", _hand_splits(), forget_split="forget10",
                        extra={"generations": {"forget": np.array(["a"])}, "counts": {"forget": {"n": np.int64(3)}}})
    assert json.loads((tmp_path / "e.json").read_text())["counts"] == {"forget": {"n": 3}}
    assert body["generations"] == {"forget": ["a"]}
    with pytest.raises(ValueError, match="overwrite"):
        te.save_eval(tmp_path / "f.json", _hand_splits(), forget_split="forget10", extra={"report": {}})


def test_an_extreme_truth_ratio_is_clipped_so_the_evaluation_saves_and_forget_quality_is_computed(tmp_path):
    import warnings

    splits = _hand_splits()
    # log gaps of +800 and -800 nats: exp() of either overflows float64 (max about e^709.8), or its inverse does
    splits["forget"] = dict(splits["forget"], base_nll=[800.0, 0.0, 0.0], perturbed_nll=[[0.0], [800.0], [-LN2]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or divide-by-zero warning on the way
        ratios = te.truth_ratio(splits["forget"]["base_nll"], splits["forget"]["perturbed_nll"])
        assert ratios.tolist() == pytest.approx([math.exp(te.LOG_RATIO_LIMIT), math.exp(-te.LOG_RATIO_LIMIT), 2.0])
        assert np.isfinite(1 / ratios).all() and (ratios > 0).all()
        body = te.save_eval(tmp_path / "e.json", splits, forget_split="forget10", retain_forget_truth_ratios=[0.5, 1.0])
        assert te.forget_truth_ratio_score([0.0, 2.0]).tolist() == [0.0, 0.5]  # a zero ratio: the limit, quietly
    saved = json.loads((tmp_path / "e.json").read_text())  # valid JSON: no Infinity or NaN in it
    assert saved["splits"]["forget"]["truth_ratio"] == pytest.approx(ratios.tolist())
    fq = saved["report"]["forget_quality"]
    assert fq == pytest.approx(ks_2samp(ratios, [0.5, 1.0]).pvalue) and 0 < fq <= 1 and fq == body["report"]["forget_quality"]
    # the clipped ratios are a valid retain reference too
    assert te.reference_truth_ratios(tmp_path / "e.json", "forget10") == pytest.approx(ratios.tolist())
    # the forget split's reported number: min(R, 1/R) is e^-700, e^-700 and 1/2, not inf or nan
    assert saved["report"]["forget/truth_ratio"] == pytest.approx((2 * math.exp(-te.LOG_RATIO_LIMIT) + 0.5) / 3)
