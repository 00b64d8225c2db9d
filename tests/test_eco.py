"""ECO: corruption functions on known tensors, the prefill-only hook, bit-identical unflagged prompts,
zeroth-order estimates on known functions, threshold calibration, settings round trip, and the two
LightningModules run briefly through cli.py."""

from __future__ import annotations

import json
import math
import types

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger

from modules import eco

# ----------------------------------------------------------------------------------------------------
# Corruption functions


def test_rand_noise_first_n_adds_seeded_noise_to_selected_first_dims_only():
    embeds = torch.arange(24, dtype=torch.float32).reshape(1, 3, 8) / 10
    select = torch.tensor([[False, True, True]])
    out = eco.rand_noise_first_n(embeds, select, 2.0, dims=3, generator=torch.Generator().manual_seed(7))
    noise = torch.randn((1, 3, 3), generator=torch.Generator().manual_seed(7)) * 2.0
    expected = embeds.clone()
    expected[0, 1:, :3] += noise[0, 1:]
    assert torch.equal(out, expected)
    assert torch.equal(out[0, 0], embeds[0, 0])  # unselected token: bit-identical
    assert torch.equal(out[0, :, 3:], embeds[0, :, 3:])  # dims beyond n untouched
    # vector strength: one standard deviation per dimension; a zero leaves that dimension alone
    out = eco.rand_noise_first_n(embeds, select, [1.0, 0.0, 3.0], dims=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[0, 1:, 1], embeds[0, 1:, 1]) and not torch.equal(out[0, 1:, 2], embeds[0, 1:, 2])
    with pytest.raises(ValueError, match="one per corrupted dimension"):
        eco.rand_noise_first_n(embeds, select, [1.0, 2.0], dims=3)


def test_rand_noise_first_n_has_the_requested_spread():
    embeds = torch.zeros(1, 20_000, 2)
    out = eco.rand_noise_first_n(embeds, torch.ones(1, 20_000, dtype=torch.bool), 0.5, dims=1,
                                 generator=torch.Generator().manual_seed(0))
    assert out[..., 0].std().item() == pytest.approx(0.5, rel=0.03)
    assert out[..., 1].abs().max().item() == 0.0


def test_rand_noise_rand_n_changes_exactly_n_dims_of_selected_tokens():
    embeds = torch.ones(2, 4, 16)
    select = torch.tensor([[True, False, True, False], [False, False, False, True]])
    out = eco.rand_noise_rand_n(embeds, select, 1.0, dims=3, generator=torch.Generator().manual_seed(3))
    changed = (out != embeds).sum(-1)
    assert changed.tolist() == [[3, 0, 3, 0], [0, 0, 0, 3]]


def test_per_row_generators_draw_each_rows_noise_for_its_selected_tokens_in_order():
    embeds = torch.arange(40, dtype=torch.float32).reshape(2, 5, 4) / 10
    select = torch.tensor([[False, True, True, False, False], [False, False, True, True, True]])
    out = eco.rand_noise_first_n(embeds, select, 3.0, dims=2,
                                 generator=[torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)])
    expected = embeds.clone()
    expected[0, 1:3, :2] += torch.randn((2, 2), generator=torch.Generator().manual_seed(11)) * 3.0
    expected[1, 2:5, :2] += torch.randn((3, 2), generator=torch.Generator().manual_seed(12)) * 3.0
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="3 per-row generators for a batch of 2 rows"):
        eco.rand_noise_first_n(embeds, select, 1.0, generator=[torch.Generator()] * 3)


@pytest.mark.parametrize("name", sorted(eco.CORRUPTIONS))
def test_with_per_row_generators_a_row_is_corrupted_the_same_alone_or_padded_in_a_batch(name):
    corrupt = eco.corruption_function(name)
    row = torch.randn(1, 4, 6, generator=torch.Generator().manual_seed(0))
    row_select = torch.tensor([[True, True, True, False]])
    alone = corrupt(row, row_select, 2.0, 2, [torch.Generator().manual_seed(5)])
    # the same row after two positions of left padding, next to another row
    other = torch.randn(1, 6, 6, generator=torch.Generator().manual_seed(1))
    batch = torch.cat([other, torch.cat([torch.zeros(1, 2, 6), row], dim=1)])
    select = torch.tensor([[True] * 5 + [False], [False, False, True, True, True, False]])
    together = corrupt(batch, select, 2.0, 2, [torch.Generator().manual_seed(9), torch.Generator().manual_seed(5)])
    assert torch.equal(together[1, 2:], alone[0])
    assert not torch.equal(alone[0, :3], row[0, :3])  # it did corrupt


def test_zero_out_and_flip_sign_top_k_by_magnitude():
    embeds = torch.tensor([[[1.0, -5.0, 3.0, 0.5], [1.0, -5.0, 3.0, 0.5]]])
    select = torch.tensor([[True, False]])
    zeroed = eco.zero_out_top_k(embeds, select, dims=2)
    assert zeroed[0, 0].tolist() == [1.0, 0.0, 0.0, 0.5]
    assert torch.equal(zeroed[0, 1], embeds[0, 1])
    flipped = eco.flip_sign_top_k(embeds, select, dims=2)
    assert flipped[0, 0].tolist() == [1.0, 5.0, -3.0, 0.5]
    assert torch.equal(flipped[0, 1], embeds[0, 1])


def test_reverse_order_and_shuffle_permute_selected_tokens_only():
    embeds = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1).repeat(1, 1, 2)
    select = torch.tensor([[False, True, True, True, False, True]])
    reversed_ = eco.reverse_order(embeds, select)
    assert reversed_[0, :, 0].tolist() == [0, 5, 3, 2, 4, 1]
    shuffled = eco.shuffle(embeds, select, generator=torch.Generator().manual_seed(0))
    values = shuffled[0, :, 0].tolist()
    assert values[0] == 0 and values[4] == 4
    assert sorted(values[i] for i in (1, 2, 3, 5)) == [1, 2, 3, 5]
    again = eco.shuffle(embeds, select, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shuffled, again)  # seeded


def test_all_but_last_on_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert eco.all_but_last(right).int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert eco.all_but_last(left).int().tolist() == [[0, 0, 1, 0], [0, 1, 1, 0]]
    assert eco.prompt_mask_right_padded(4, torch.tensor([2, 3])).int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]


def test_unknown_corruption_and_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown corruption"):
        eco.EcoSettings(corruption="blur")
    with pytest.raises(ValueError, match="entity_names"):
        eco.EcoSettings(token_selection="entities")
    with pytest.raises(ValueError, match="unknown ECO settings"):
        eco.EcoSettings.from_dict({"strenght": 1.0})


# ----------------------------------------------------------------------------------------------------
# Classifier loss and thresholds


def test_class_weights_and_weighted_cross_entropy_golden():
    weights = eco.class_weights([30, 10])
    assert weights.tolist() == pytest.approx([40 / 30, 4.0])
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    logp = logits.numpy() - np.log(np.exp(logits.numpy()).sum(1, keepdims=True))
    w = np.array([40 / 30, 4.0])[labels.numpy()]
    expected = -(w * logp[np.arange(3), labels.numpy()]).sum() / w.sum()
    assert eco.weighted_cross_entropy(logits, labels, weights).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="at least one training example"):
        eco.class_weights([5, 0])


def test_threshold_calibration_on_a_synthetic_score_distribution():
    rng = np.random.default_rng(0)
    negatives = rng.beta(2, 8, size=2000)  # non-forget prompts: low p(forget)
    positives = rng.beta(8, 2, size=500)
    for target in (0.01, 0.05, 0.2):
        tau = eco.calibrate_threshold(negatives, target)
        fpr = (negatives > tau).mean()
        assert target - 1 / 2000 <= fpr <= target  # as many false positives as allowed, not more
    assert (negatives > eco.calibrate_threshold(negatives, 0.0)).sum() == 0
    scores = np.concatenate([negatives, positives])
    labels = np.concatenate([np.zeros(2000), np.ones(500)])
    tau = eco.best_threshold(scores, labels)
    rates = eco.error_rates(scores, labels, tau)
    # no other threshold has a lower FPR + FNR
    grid = np.linspace(0, 1, 2001)
    assert rates["fpr"] + rates["fnr"] <= min(sum(eco.error_rates(scores, labels, t)[k] for k in ("fpr", "fnr")) for t in grid) + 1e-12
    separable = eco.best_threshold([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert 0.2 < separable < 0.8
    with pytest.raises(ValueError, match="both classes"):
        eco.best_threshold([0.1, 0.2], [0, 0])


# ----------------------------------------------------------------------------------------------------
# The KS objective


def test_ks_statistic_by_hand_and_against_scipy():
    from scipy.stats import ks_2samp

    # ECDFs at 1, 2, 2.5, 3, 4: (1/3, 0), (2/3, 0), (2/3, 1/2), (1, 1/2), (1, 1) -> D = 2/3
    assert eco.ks_statistic([3.0, 1.0, 2.0], [4.0, 2.5]) == pytest.approx(2 / 3, abs=1e-15)
    assert eco.ks_statistic([1.0, 2.0], [1.0, 2.0]) == 0.0
    rng = np.random.default_rng(0)
    for n, m in ((32, 32), (32, 17), (5, 200)):
        a, b = rng.lognormal(0, 0.5, n), rng.lognormal(0.2, 0.4, m)
        a[:3] = np.round(a[:3], 1)  # ties within and across the samples
        b[:2] = a[:2]
        assert eco.ks_statistic(a, b) == pytest.approx(ks_2samp(a, b).statistic, abs=1e-12)
    with pytest.raises(ValueError, match="at least one value"):
        eco.ks_statistic([], [1.0])


def test_truth_ratio_ks_metric_on_known_log_probs():
    from scipy.stats import ks_2samp

    # three questions; per question: answer (role 0), paraphrase (1) and two perturbed answers (2), each a
    # two-token answer, so a sequence's mean NLL is the mean of its two token log-probs, negated
    rows = torch.tensor([q for q in range(3) for _ in range(4)])
    roles = torch.tensor([0, 1, 2, 2] * 3)
    labels = torch.full((12, 4), -100)
    labels[:, 2:] = 7
    logp = -torch.rand(12, 3, generator=torch.Generator().manual_seed(0)) * 3
    batch = {"qa": {"labels": labels, "roles": roles, "rows": rows}}
    nll = -logp[:, 1:].double().numpy().mean(1)  # label positions 2, 3 -> log-prob positions 1, 2
    ratios = np.array([np.exp(nll[4 * q + 1] - nll[4 * q + 2: 4 * q + 4].mean()) for q in range(3)])
    assert eco.forget_truth_ratios(batch, logp) == pytest.approx(ratios, rel=1e-6)  # NLLs are float32 sums
    assert eco.forget_metric("truth_ratio", batch, logp) == pytest.approx(np.minimum(ratios, 1 / ratios).mean())
    reference = np.array([0.2, 0.5, 0.9, 1.4])
    assert eco.forget_metric("truth_ratio_ks", batch, logp, reference) == pytest.approx(
        ks_2samp(ratios, reference).statistic, abs=1e-12)
    with pytest.raises(ValueError, match="retain model's forget truth ratios"):
        eco.forget_metric("truth_ratio_ks", batch, logp)


# ----------------------------------------------------------------------------------------------------
# Zeroth-order estimates


def test_central_difference_is_exact_on_a_quadratic():
    def f(s):
        return (s - 3.0) ** 2

    grad, upper, lower = eco.central_difference(f, 1.0, 0.5)
    assert grad == pytest.approx(-4.0) and upper == f(1.5) and lower == f(0.5)
    # at the boundary s - eps < s_min the lower probe is s_min and the divisor stays 2 eps (the paper's rule):
    # (J(0.7) - J(0)) / 1 = (2.3^2 - 3^2) / 1
    grad, _, lower = eco.central_difference(f, 0.2, 0.5, min_strength=0.0)
    assert lower == f(0.0) and grad == pytest.approx(5.29 - 9.0)
    s = 0.5  # plain descent on these estimates finds the minimum (the learner's own update: tested below)
    for _ in range(50):
        g, _, _ = eco.central_difference(f, s, 0.1)
        s = max(1e-4, s - 0.25 * g)
    assert s == pytest.approx(3.0, abs=1e-6)


def test_scalar_and_one_dimensional_vector_estimates_agree_at_the_boundary():
    def f(s):
        return float(((torch.as_tensor(s, dtype=torch.float64) - 3.0) ** 2).sum())

    scalar, _, _ = eco.central_difference(f, 0.2, 0.5, min_strength=0.0)
    vector, _ = eco.random_direction_gradient(f, torch.tensor([0.2], dtype=torch.float64), 0.5, directions=1,
                                              min_strength=0.0, generator=torch.Generator().manual_seed(0))
    assert vector.item() == pytest.approx(scalar)


def test_random_direction_gradient_on_a_quadratic():
    a, c = torch.tensor([1.0, 2.0, 0.5, 4.0], dtype=torch.float64), torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64)

    def f(v):
        return float((a * (v - c) ** 2).sum())

    s = torch.tensor([3.0, 3.0, 3.0, 3.0], dtype=torch.float64)
    grad, _ = eco.random_direction_gradient(f, s, 0.1, directions=4, min_strength=-100.0,
                                            generator=torch.Generator().manual_seed(0))
    assert torch.allclose(grad, 2 * a * (s - c), atol=1e-9)  # orthonormal basis: exact
    # fewer directions: unbiased on average over seeds
    estimates = torch.stack([eco.random_direction_gradient(f, s, 0.1, directions=1, min_strength=-100.0,
                                                           generator=torch.Generator().manual_seed(k))[0] for k in range(4000)])
    standard_error = estimates.std(0) / len(estimates) ** 0.5
    assert ((estimates.mean(0) - 2 * a * (s - c)).abs() < 4 * standard_error).all()
    units = eco.random_directions(4, 3, torch.Generator().manual_seed(1))
    assert torch.allclose(units @ units.T, torch.eye(3, dtype=torch.float64), atol=1e-12)


def basin_objective(s: float) -> float:
    """Flat (J = 0.5) except in a basin 300 < s < 3000, where J = 0.2 |log10(s / 700)|: the shape of the KS
    objective on TOFU (plateaus where central differences read 0), with its minimum inside the basin."""
    return 0.2 * abs(math.log10(s / 700.0)) if 300.0 < s < 3000.0 else 0.5


def test_coarse_search_picks_the_best_strength_and_keeps_the_first_of_ties():
    grid = [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0]
    best, values = eco.coarse_search(basin_objective, grid)
    assert best == 1000.0 and values == [basin_objective(s) for s in grid]
    assert eco.coarse_search(lambda s: 1.0, [5.0, 1.0, 7.0])[0] == 5.0  # all tied: the first listed
    with pytest.raises(ValueError, match="at least one strength"):
        eco.coarse_search(basin_objective, [])


class SyntheticObjectiveLearner(eco.EcoCorruptionLearner):
    """The learner's own loop (scan, central differences, SGD steps, logging) on ``basin_objective`` instead
    of a language model: metric = J(s) and target 0, so the objective |metric - target| is J itself."""

    def configure_model(self) -> None:
        self._lm = types.SimpleNamespace(model=torch.nn.Identity())

    def metric_value(self, batch, strength) -> float:
        return basin_objective(float(torch.as_tensor(strength).mean()))


class RecordingLogger(Logger):
    """Keeps every logged scalar as (name, step, value)."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[str, int, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.records += [(key, step, float(value)) for key, value in metrics.items()]

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def values(self, key: str) -> list[tuple[int, float]]:
        return [(step, value) for name, step, value in self.records if name == key]


class OneBatchData(pl.LightningDataModule):
    def train_dataloader(self):  # one placeholder batch per step: the synthetic objective reads nothing from it
        return torch.utils.data.DataLoader([torch.zeros(1)], batch_size=1)


def _learn_on_the_basin(init_scan, steps: int = 5):
    learner = SyntheticObjectiveLearner(model="tiny", metric="answer_prob", target=0.0, strength=1.0,
                                        epsilon=0.999, lr=1e5, init_scan=init_scan)
    logger = RecordingLogger()
    trainer = pl.Trainer(max_steps=steps, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", log_every_n_steps=1)
    trainer.fit(learner, datamodule=OneBatchData())
    return learner, logger


def test_initial_scan_then_descent_ends_in_the_basin_where_descent_alone_stalls(one_torch_thread):
    grid = [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0]
    alone, _ = _learn_on_the_basin(None)
    # from s0 = 1 both probes read J = 0.5: zero gradient, the strength never moves
    assert alone.global_step == 5 and float(alone.strength) == 1.0 and float(alone.best_objective) == 0.5

    learner, logger = _learn_on_the_basin(grid)
    scanned = [h for h in learner.history if h["scan"]]
    assert [h["strength"] for h in scanned] == grid
    steps = [h for h in learner.history if not h["scan"] and not h["probe"]]
    # trainer.max_steps counts refinement steps only: 5 steps from the scan's best, then the final strength
    assert learner.global_step == 5 and len(steps) == 6 and steps[0]["strength"] == 1000.0
    # the descent refines inside the basin: each step lowers J, towards the minimum at s = 700
    strengths = [h["strength"] for h in steps]
    assert all(300.0 < s < 1000.0 for s in strengths[1:]) and strengths == sorted(strengths, reverse=True)
    assert float(learner.best_objective) < basin_objective(1000.0) < 0.5
    assert 300.0 < float(learner.best_strength) < 1000.0
    # forward passes: 6 scanned, 3 per step (s, s + eps, s - eps), 1 for the final strength
    assert learner.scan_forward_passes == 6 and learner.forward_passes == 6 + 3 * 5 + 1
    assert logger.values("scan/strength") == list(enumerate(grid))
    assert logger.values("scan/objective") == [(i, basin_objective(s)) for i, s in enumerate(grid)]
    assert logger.values("scan/forward_passes") == [(0, 6.0)] and logger.values("scan/best_strength") == [(0, 1000.0)]
    assert [value for _, value in logger.values("train/forward_passes")] == [6.0 + 3 * k for k in range(1, 6)]


def test_initial_scan_refuses_strengths_below_the_minimum():
    with pytest.raises(ValueError, match="init_scan must be a non-empty list of finite strengths >= min_strength"):
        eco.EcoCorruptionLearner(model="tiny", metric="answer_prob", target=0.0, min_strength=1e-4, init_scan=[0.0, 1.0])
    with pytest.raises(ValueError, match="init_scan must be a non-empty list"):
        eco.EcoCorruptionLearner(model="tiny", metric="answer_prob", target=0.0, init_scan=[])


# ----------------------------------------------------------------------------------------------------
# The hook and the wrapper on the tiny preset (random weights)


@pytest.fixture(scope="module")
def tiny():
    from modules.lm import load_model, load_tokenizer

    tokenizer = load_tokenizer("tiny")
    torch.manual_seed(0)
    model = load_model("tiny", tokenizer=tokenizer).eval()
    return model, tokenizer


def _prompts(tokenizer, questions):
    from datamodules.common import pad_sequences
    from datamodules.tofu import render_prompt

    ids = [tokenizer(render_prompt(tokenizer, q), add_special_tokens=False)["input_ids"] for q in questions]
    return (pad_sequences(ids, tokenizer.pad_token_id, side="left"),
            pad_sequences([[1] * len(x) for x in ids], 0, side="left"))


def _score_batch(tokenizer, questions, answers):
    from callbacks.eco_eval import score_batch
    from datamodules.tofu import encode_qa

    return score_batch([encode_qa(tokenizer, q, a, 256) for q, a in zip(questions, answers)], questions,
                       tokenizer.pad_token_id)


QUESTIONS = ["Where was Amara Voss born?", "What genre does Bram Okafor write?", "What is the capital of Peru?"]


def test_hook_corrupts_selected_prefill_positions_of_flagged_rows_and_never_decode_steps(tiny):
    model, tokenizer = tiny
    wrapper = eco.EcoLM(model, tokenizer, eco.EcoSettings(strength=5.0, dims=8, gate="all"))
    seen = []
    recorder = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append((i[0].clone(), o.clone())))
    try:
        input_ids, attention_mask = _prompts(tokenizer, QUESTIONS)
        flags = torch.tensor([False, True, False])
        wrapper.generate(input_ids, attention_mask, QUESTIONS, flags=flags, do_sample=False, max_new_tokens=6,
                         min_new_tokens=6, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    finally:
        recorder.remove()
    assert wrapper.hook.corrupted_calls == 1
    assert len(seen) >= 6  # prefill + decode steps
    embedding = model.get_input_embeddings()
    prefill_ids, prefill_out = seen[0]
    clean = embedding.weight[prefill_ids]
    changed = (prefill_out != clean).any(-1)
    expected = eco.all_but_last(attention_mask) & flags.unsqueeze(1)
    assert torch.equal(changed, expected)  # exactly the selected positions of the flagged row
    assert (prefill_out[..., 8:] == clean[..., 8:]).all()  # only the first n dims
    for ids, out in seen[1:]:  # decode steps: one new token each, never corrupted
        assert ids.shape[1] == 1 and torch.equal(out, embedding.weight[ids])

    # teacher-forced scoring: one forward over prompt + answer; only the flagged row's prompt (all but its
    # last token) is corrupted, never an answer position
    seen.clear()
    recorder = embedding.register_forward_hook(lambda m, i, o: seen.append((i[0].clone(), o.clone())))
    try:
        batch = _score_batch(tokenizer, QUESTIONS, ["She was born in Lisbon.", "He writes poetry.", "Lima"])
        wrapper.score_tokens(batch, flags=flags)
    finally:
        recorder.remove()
    (ids, out), = seen
    changed = (out != embedding.weight[ids]).any(-1)
    prompt = eco.prompt_mask_right_padded(ids.shape[1], batch["prompt_lengths"])
    assert torch.equal(changed, eco.all_but_last(prompt) & flags.unsqueeze(1))
    assert wrapper.hook.corrupted_calls == 2
    wrapper.close()


def test_unflagged_prompts_are_bit_identical_in_generation_and_scoring(tiny):
    from callbacks.tofu_eval import HFEvalLM

    model, tokenizer = tiny
    wrapper = eco.EcoLM(model, tokenizer, eco.EcoSettings(strength=10.0, dims=64, gate="all"))
    bare = HFEvalLM(model, tokenizer)
    input_ids, attention_mask = _prompts(tokenizer, QUESTIONS)
    flags = torch.tensor([True, False, False])
    gen_kwargs = dict(do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    wrapped_out = wrapper.generate(input_ids, attention_mask, QUESTIONS, flags=flags, **gen_kwargs)
    with torch.no_grad():
        bare_out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
    assert torch.equal(wrapped_out[1:], bare_out[1:])

    batch = _score_batch(tokenizer, QUESTIONS, ["She was born in Lisbon.", "He writes poetry.", "Lima"])
    wrapped_logp = wrapper.score_tokens(batch, flags=flags)
    bare_logp = bare.score_tokens(batch)
    assert torch.equal(wrapped_logp[1:], bare_logp[1:])
    assert not torch.equal(wrapped_logp[0], bare_logp[0])  # the flagged prompt did change
    # answer tokens are never corrupted: the first answer position's input is the last prompt token, kept
    # by all_but_last, so only the context (through attention) differs
    none = eco.EcoLM(model, tokenizer, eco.EcoSettings(gate="none"))
    calls = none.hook.corrupted_calls
    assert torch.equal(none.score_tokens(batch), bare_logp) and none.hook.corrupted_calls == calls
    wrapper.close()
    none.close()


def _recorded_embeddings(model, call):
    """The input-embedding outputs (after the wrapper's hook) of every forward call ``call()`` makes."""
    seen = []
    recorder = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    try:
        result = call()
    finally:
        recorder.remove()
    return seen, result


def test_a_prompt_is_corrupted_the_same_alone_and_in_a_batch(tiny):
    model, tokenizer = tiny
    wrapper = eco.EcoLM(model, tokenizer, eco.EcoSettings(strength=5.0, dims=8, gate="all"))
    answers = ["She was born in Lisbon.", "He writes poetry.", "Lima"]
    alone = _score_batch(tokenizer, QUESTIONS[1:2], answers[1:2])
    together = _score_batch(tokenizer, QUESTIONS, answers)
    n = int(alone["prompt_lengths"][0])
    (embeds_alone,), logits_alone = _recorded_embeddings(model, lambda: wrapper.logits(
        alone["input_ids"], alone["attention_mask"], alone["prompt_lengths"], alone["questions"]))
    (embeds_together,), logits_together = _recorded_embeddings(model, lambda: wrapper.logits(
        together["input_ids"], together["attention_mask"], together["prompt_lengths"], together["questions"]))
    assert torch.equal(embeds_together[1, :n], embeds_alone[0, :n])
    # causal attention: the prompt positions' logits see only the (identically corrupted) prompt; batched
    # and single-row matrix products may round differently, hence a tolerance at float32 precision
    assert torch.allclose(logits_together[1, :n], logits_alone[0, :n], rtol=0, atol=1e-5)
    clean = model.get_input_embeddings().weight[together["input_ids"]]
    noise = embeds_together - clean
    assert not torch.equal(noise[0, :2, :8], noise[1, :2, :8])  # each prompt has its own noise

    # generation (left-padded prefill): the same prompt tokens get the same noise as in scoring
    gen_kwargs = dict(do_sample=False, max_new_tokens=2, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    input_ids, attention_mask = _prompts(tokenizer, QUESTIONS)
    seen, _ = _recorded_embeddings(model, lambda: wrapper.generate(input_ids, attention_mask, QUESTIONS, **gen_kwargs))
    assert torch.equal(seen[0][1][attention_mask[1].bool()], embeds_alone[0, :n])
    # another seed: other noise
    reseeded = eco.EcoLM(model, tokenizer, eco.EcoSettings(strength=5.0, dims=8, gate="all", seed=1))
    (embeds_reseeded,), _ = _recorded_embeddings(model, lambda: reseeded.logits(
        alone["input_ids"], alone["attention_mask"], alone["prompt_lengths"], alone["questions"]))
    assert not torch.equal(embeds_reseeded[0, :n], embeds_alone[0, :n])
    for w in (wrapper, reseeded):
        w.close()


def test_entity_selection_marks_the_name_tokens(tiny):
    model, tokenizer = tiny
    settings = eco.EcoSettings(token_selection="entities", entity_names=["Amara Voss"], gate="all", strength=1.0)
    wrapper = eco.EcoLM(model, tokenizer, settings)
    batch = _score_batch(tokenizer, QUESTIONS[:2], ["x", "y"])
    prompt_mask = eco.prompt_mask_right_padded(batch["input_ids"].shape[1], batch["prompt_lengths"])
    prompt_ids = [batch["input_ids"][b, :int(n)].tolist() for b, n in enumerate(batch["prompt_lengths"])]
    select = wrapper.selection(prompt_mask, prompt_ids, QUESTIONS[:2], torch.tensor([True, True]))
    assert tokenizer.decode(batch["input_ids"][0][select[0]]) == "Amara Voss"
    assert select[0].sum().item() == len("Amara Voss")  # byte-level tokenizer: one token per character
    assert not select[1].any()  # no entity in the second prompt
    wrapper.close()


def test_settings_and_classifier_round_trip(tiny, tmp_path):
    from modules.lm import load_model, load_tokenizer

    model, tokenizer = tiny
    classifier_tokenizer = load_tokenizer("tiny")
    torch.manual_seed(1)
    classifier = load_model("tiny", kind="sequence_classification", num_labels=2, tokenizer=classifier_tokenizer)
    gate = eco.PromptGate(classifier, classifier_tokenizer)
    settings = eco.EcoSettings(corruption="rand_noise_first_n", strength=[0.5, 2.0], dims=2, threshold=0.37, seed=3,
                               classifier_source="somewhere")
    wrapper = eco.EcoLM(model, tokenizer, settings, gate)
    folder = wrapper.save(tmp_path / "eco")
    assert json.loads((folder / "eco.json").read_text())["strength"] == [0.5, 2.0]
    loaded = eco.EcoLM.load(folder, model, tokenizer)
    assert loaded.settings == settings
    assert torch.equal(loaded.gate.probabilities(QUESTIONS), gate.probabilities(QUESTIONS))
    assert torch.equal(loaded.flags(QUESTIONS), gate.probabilities(QUESTIONS) > 0.37)
    batch = _score_batch(tokenizer, QUESTIONS, ["a", "b", "c"])
    flags = torch.tensor([True, True, False])
    assert torch.equal(loaded.score_tokens(batch, flags=flags), wrapper.score_tokens(batch, flags=flags))
    with pytest.raises(FileNotFoundError, match="eco.json"):
        eco.EcoLM.load(tmp_path, model, tokenizer)
    wrapper.close()
    loaded.close()


def test_gate_cache_is_bounded_and_keeps_the_gate_decisions(tiny, monkeypatch):
    from modules.lm import load_model, load_tokenizer

    model, tokenizer = tiny
    classifier_tokenizer = load_tokenizer("tiny")
    classifier = load_model("tiny", kind="sequence_classification", num_labels=2, tokenizer=classifier_tokenizer)
    gate = eco.PromptGate(classifier, classifier_tokenizer)
    wrapper = eco.EcoLM(model, tokenizer, eco.EcoSettings(threshold=0.5), gate)
    monkeypatch.setattr(eco.EcoLM, "GATE_CACHE_SIZE", 2)
    expected = gate.probabilities(QUESTIONS) > 0.5
    assert torch.equal(wrapper.flags(QUESTIONS), expected)
    assert list(wrapper._gate_cache) == QUESTIONS[1:]  # the least recently used prompt was evicted
    assert torch.equal(wrapper.flags(QUESTIONS[:1] * 2), expected[:1].repeat(2))  # classified again, same decision
    assert list(wrapper._gate_cache) == [QUESTIONS[2], QUESTIONS[0]]
    wrapper.close()


# ----------------------------------------------------------------------------------------------------
# Multiple choice


class _PrefersLetterB:
    """Scores 0 for the letter B as first answer token, -1 for every other token."""

    def __init__(self, tokenizer):
        self.b = tokenizer("B", add_special_tokens=False)["input_ids"][0]

    def score_tokens(self, batch):
        labels = batch["labels"][:, 1:]
        return torch.where(labels == self.b, 0.0, -1.0) * (labels != -100)

    def generate_answers(self, batch, max_new_tokens):
        return [""] * len(batch["prompt_input_ids"])


def test_multiple_choice_letter_scoring_picks_the_top_letter():
    from callbacks.eco_eval import MultipleChoiceEvaluator
    from datamodules.eco_data import mc_items
    from datamodules.tofu_data import generate_tofu
    from modules.lm import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    rows = generate_tofu(n_authors=4, qa_per_author=4).split("full")
    items = mc_items(rows)
    result = MultipleChoiceEvaluator(items, tokenizer, "letter").evaluate(_PrefersLetterB(tokenizer))
    assert result["choices"] == [1] * len(items)
    assert result["accuracy"] == pytest.approx(np.mean([item["answer_index"] == 1 for item in items]))
    assert result["chance"] == 0.25
    # cloze scoring writes each option into the answer sentence
    sentence = MultipleChoiceEvaluator(items[:1], tokenizer, "option").encoded["encoded"]
    decoded = [tokenizer.decode([t for t in s.labels if t != -100]) for s in sentence]
    assert sum(items[0]["answer"] in text for text in decoded) == 1
    assert all(option in text for option, text in zip(items[0]["options"], decoded))


def test_the_learner_scores_the_forget_set_in_micro_batches_with_the_one_batch_numbers(tiny):
    from datamodules.eco_data import EcoForgetData

    model, tokenizer = tiny
    data = EcoForgetData(n_authors=20, qa_per_author=2, eval_batch_size=7)
    data.tokenizer = tokenizer
    batch = data.forget_batch()
    wrapper = eco.EcoLM(model, tokenizer, eco.EcoSettings(dims=16, gate="all"))
    passes = []
    score = wrapper.score_tokens
    wrapper.score_tokens = lambda part, **kwargs: passes.append(part["input_ids"].shape) or score(part, **kwargs)
    rows = len(batch["qa"]["questions"])
    flags = torch.ones(rows, dtype=torch.bool)
    whole = score(batch["qa"], flags=flags, strength=3.0)
    micro = eco.score_in_batches(wrapper, batch["qa"], flags, 3.0, 7)
    assert [shape[0] for shape in passes] == [7] * (rows // 7) + [rows % 7] * bool(rows % 7)
    assert max(shape[1] for shape in passes) == batch["qa"]["input_ids"].shape[1] > min(shape[1] for shape in passes)
    torch.testing.assert_close(micro, whole, rtol=1e-5, atol=1e-5)

    reference = eco.forget_truth_ratios(batch, whole) * 1.3  # any retain ratios will do
    learner = eco.EcoCorruptionLearner(model="tiny", metric="answer_prob", target=0.0, dims=16)
    learner._lm, learner.reference_ratios = wrapper, reference
    assert learner.score_batch_size() == eco.DEFAULT_SCORE_BATCH  # no data module to ask
    learner._trainer = types.SimpleNamespace(datamodule=data)
    assert learner.score_batch_size() == 7  # the data module's eval_batch_size
    learner.hparams.batch_size = 5  # its own setting wins
    for metric in eco.METRICS:
        learner.metric = metric
        part = batch["mc" if metric == "mc_accuracy" else "qa"]
        all_rows = torch.ones(len(part["questions"]), dtype=torch.bool)
        one_batch = eco.forget_metric(metric, batch, score(part, flags=all_rows, strength=3.0), reference)
        passes.clear()
        assert learner.metric_value(batch, torch.tensor(3.0)) == pytest.approx(one_batch, rel=1e-6, abs=1e-9), metric
        assert len(passes) == -(-len(part["questions"]) // 5) and max(shape[0] for shape in passes) == 5
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        eco.EcoCorruptionLearner(model="tiny", metric="answer_prob", target=0.0, batch_size=0)
    wrapper.close()


def test_the_classifier_of_a_model_without_a_pad_token_gets_one_and_its_data_pads_with_it(tmp_path):
    from conftest import padless_model

    from datamodules.eco_data import EcoPromptData
    from modules.lm import load_model, load_tokenizer

    folder = padless_model(tmp_path / "llama_like")  # as Llama-2: no pad token, none in the vocabulary
    bare = load_tokenizer(str(folder))
    with pytest.raises(ValueError, match="needs one pad token"):  # pooling would read the wrong token
        eco.PromptGate(load_model(str(folder), kind="sequence_classification", num_labels=2, tokenizer=bare), bare)
    classifier = eco.PromptClassifier(model=str(folder))
    tokenizer = classifier.tokenizer
    assert tokenizer.pad_token_id == len(bare) and tokenizer.pad_token_id != tokenizer.eos_token_id
    data = EcoPromptData(n_authors=4, qa_per_author=2, decoy_authors=2, batch_size=16, eval_batch_size=1024,
                         tokenizer=str(folder))  # named: it gets the classifier's pad token
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=1, val_check_interval=2)
    trainer.fit(classifier, datamodule=data)
    assert data.tokenizer is not tokenizer and data.tokenizer.pad_token_id == tokenizer.pad_token_id
    assert classifier.model.config.pad_token_id == tokenizer.pad_token_id
    batch = next(iter(data.val_dataloader()))
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["input_ids"][padding] == tokenizer.pad_token_id).all()
    assert "val/fpr" in trainer.callback_metrics
    gate = eco.PromptGate(classifier.model, tokenizer)  # as an export would load it
    # pooling reads each prompt's own last token: padded beside longer prompts, as scored alone
    together = gate.probabilities(QUESTIONS)
    alone = torch.cat([gate.probabilities([question]) for question in QUESTIONS])
    assert together.shape == (3,) and torch.allclose(together, alone, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Data and the two LightningModules through cli.py (short)


def test_prompt_data_labels_and_splits():
    from datamodules.eco_data import EcoPromptData

    data = EcoPromptData(n_authors=8, qa_per_author=4, decoy_authors=5)
    rows = data.labelled_rows()
    generated = data.generated()
    forget_names = [generated.authors[i]["name"] for i in generated.forget_authors["forget10"]]
    for row in rows:
        about_forget = any(name in row["text"] for name in forget_names)
        assert row["label"] == int(about_forget), row
    assert {"forget", "retain", "general", "decoy", "forget_mc"} <= {row["kind"] for row in rows}
    splits = data.split_rows()
    assert not {r["text"] for r in splits["train"]} & {r["text"] for r in splits["val"]}
    assert {r["label"] for r in splits["val"]} == {0, 1}
    assert len(splits["val"]) == pytest.approx(0.2 * len(rows), abs=12)  # whole groups: about val_fraction


def test_prompt_split_keeps_every_form_of_a_question_on_one_side():
    """The validation prompts choose the classifier's threshold: a question whose plain, multiple-choice or
    reworded form is a training prompt would make them easier than new prompts."""
    from datamodules import tofu_data as td
    from datamodules.eco_data import EcoPromptData

    data = EcoPromptData(n_authors=8, qa_per_author=4, decoy_authors=5)
    generated = data.generated()
    # what each prompt asks, found from the generator's phrasings (not from the split's own group keys)
    asks = {q: (name, fact) for name in [a["name"] for a in generated.authors] + td.decoy_names(generated, 5)
            for fact, q, _ in td.question_variants(name)}

    def question(text: str):
        first_line = text.split("\n")[0]  # a multiple-choice prompt starts with its question
        return asks.get(first_line, first_line)

    splits = data.split_rows()
    train, val = ({question(r["text"]) for r in splits[side]} for side in ("train", "val"))
    assert len(val) > 20 and not train & val
    assert sum(r["kind"].endswith("_mc") for r in splits["val"]) > 0  # multiple-choice forms are split too
    # the old split by prompt text would have separated forms of one question
    rows = data.labelled_rows()
    assert len({question(r["text"]) for r in rows}) < len(rows)


def test_questions_without_enough_wrong_answers_for_multiple_choice_are_counted():
    from datamodules.eco_data import MC_OPTIONS, EcoForgetData, EcoPromptData

    assert EcoForgetData().n_options == MC_OPTIONS == EcoPromptData().n_options  # the evaluation's option count
    full = EcoPromptData(n_authors=6, qa_per_author=3, decoy_authors=2)
    full.labelled_rows()
    assert full.data_report["dropped"] == {}
    # two wrong answers per question: no question can make a four-option item
    data = EcoPromptData(n_authors=6, qa_per_author=3, decoy_authors=2, n_perturbed=2)
    rows = data.labelled_rows()
    assert not any(r["kind"].endswith("_mc") for r in rows)
    dropped = data.data_report["dropped"]["train+val"]
    assert dropped == {f"{kind}: no multiple-choice form (fewer than 3 distinct wrong answers)": n for kind, n in
                       (("forget", len(data.rows("forget10"))), ("retain", len(data.rows("retain90"))),
                        ("general", len(data.general_rows())))}
    data.labelled_rows()  # built again: counted once
    assert data.data_report["dropped"]["train+val"] == dropped
    data.evaluation_rows()
    assert data.data_report["dropped"]["test"][
        "forget: no multiple-choice form (fewer than 3 distinct wrong answers)"] == len(data.eval_sets()["forget"])
    # with three options two wrong answers are enough
    assert any(r["kind"] == "forget_mc" for r in EcoPromptData(n_authors=6, qa_per_author=3, decoy_authors=2,
                                                               n_perturbed=2, n_options=3).labelled_rows())


def test_prompt_file_with_a_bad_label_names_file_row_and_field(tmp_path):
    from datamodules.common import DataError
    from datamodules.eco_data import EcoPromptData
    from modules.lm import load_tokenizer

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"text": "hello", "label": 0}\n{"text": "Where was X born?", "label": "yes"}\n')
    data = EcoPromptData(train_file=str(path), val_file=str(path))
    data.tokenizer = load_tokenizer("tiny")
    with pytest.raises(DataError, match=r"prompts.jsonl: row 1, field 'label'"):
        data.setup("fit")


@pytest.mark.parametrize("content, message", [
    ('{"text": "hello", "label": 0}\n{"text": "Where was X born?", "label": 1}\n{"text": "hello", "label": 1}\n',
     r"prompts.jsonl: row 2, field 'label': 1, but row 0 has the same text labelled 0"),
    ('{"text": "hello", "label": 0, "kind": ["x"]}\n', r"prompts.jsonl: row 0, field 'kind': expected a string"),
    ("", r"prompts.jsonl: split 'train' has no prompts"),
])
def test_prompt_files_with_contradictions_or_nothing_in_them_are_refused(tmp_path, content, message):
    from datamodules.common import DataError
    from datamodules.eco_data import EcoPromptData
    from modules.lm import load_tokenizer

    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    data = EcoPromptData(train_file=str(path), val_file=str(path))
    data.tokenizer = load_tokenizer("tiny")
    with pytest.raises(DataError, match=message):
        data.setup("fit")


def test_classifier_fit_chooses_a_threshold_and_exports_it(run_cli, tmp_path):
    run_cli("fit", "configs/eco/classifier.yaml", "--data.init_args.n_authors=8", "--data.init_args.qa_per_author=4",
            "--data.init_args.decoy_authors=5", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
            "--model.init_args.target_fpr=0.1", name="cls")
    export = tmp_path / "cls" / "export"
    threshold = eco.classifier_threshold(export)
    summary = json.loads(next((tmp_path / "cls").glob("version_*/summary.json")).read_text())
    validation = summary["stages"]["fit"]["metrics"]
    # the exported threshold is the one calibrated on the validation prompts, and it meets the target FPR there
    assert threshold == pytest.approx(validation["val/threshold"])
    assert validation["val/fpr"] <= 0.1
    gate = eco.PromptGate.load(export)
    assert gate.probabilities(QUESTIONS).shape == (3,)


@pytest.mark.parametrize("vector", [False, True], ids=["scalar", "vector"])
def test_learner_moves_the_strength_and_writes_settings(run_cli, tmp_path, vector):
    settings_dir = tmp_path / "settings"
    run_cli("fit", "configs/eco/learn.yaml", "--model.init_args.model=tiny", "--model.init_args.retain_eval=null",
            f"--model.init_args.vector={vector}", "--model.init_args.directions=2",
            "--model.init_args.metric=answer_prob", "--model.init_args.target=0.0", "--model.init_args.dims=16",
            "--model.init_args.strength=0.1", "--model.init_args.lr=1.0", "--model.init_args.tolerance=0.0",
            f"--model.init_args.settings_dir={settings_dir}", "--data.init_args.n_authors=6",
            "--data.init_args.qa_per_author=3", "--trainer.max_steps=2", "--model.init_args.init_scan=null",
            name="learn")
    learning = json.loads((settings_dir / "learning.json").read_text())
    history = learning["history"]
    assert not any(h["scan"] for h in history) and learning["scan_forward_passes"] == 0
    steps = [h for h in history if not h["probe"]]
    # trainer.max_steps counts learner steps: two steps, then the final strength is scored
    assert learning["steps"] == 2 and [h["step"] for h in steps] == [0, 1, 2]
    assert len(history) - len(steps) == 2 * (4 if vector else 2)  # finite-difference probes: 2 per direction
    assert steps[1]["strength"] != steps[0]["strength"]
    assert learning["best_objective"] == pytest.approx(min(h["objective"] for h in history))
    settings, gate = eco.load_settings(settings_dir)
    assert gate is None and settings.gate == "all" and settings.dims == 16
    assert isinstance(settings.strength, list) == vector and (not vector or len(settings.strength) == 16)


def test_learner_scans_a_common_scale_for_a_vector_strength_then_steps_from_the_best(run_cli, tmp_path):
    settings_dir = tmp_path / "settings"
    run_cli("fit", "configs/eco/learn.yaml", "--model.init_args.model=tiny", "--model.init_args.retain_eval=null",
            "--model.init_args.vector=true", "--model.init_args.directions=2", "--model.init_args.dims=4",
            "--model.init_args.metric=answer_prob", "--model.init_args.target=0.0", "--model.init_args.strength=0.1",
            "--model.init_args.init_scan=[0.01, 1.0, 100.0]", f"--model.init_args.settings_dir={settings_dir}",
            "--data.init_args.n_authors=6", "--data.init_args.qa_per_author=3", "--trainer.max_steps=1", name="scan")
    learning = json.loads((settings_dir / "learning.json").read_text())
    scanned = [h for h in learning["history"] if h["scan"]]
    assert [h["strength"] for h in scanned] == [[0.01] * 4, [1.0] * 4, [100.0] * 4]
    best = min(scanned, key=lambda h: h["objective"])  # the random tiny model gives no ties
    first_step = next(h for h in learning["history"] if not h["scan"] and not h["probe"])
    assert first_step["strength"] == best["strength"] and first_step["objective"] == best["objective"]
    # one step: 3 scanned, the start, 2 probes per direction, then the final strength; max_steps = 1 step
    assert learning["steps"] == 1 and learning["scan_forward_passes"] == 3 and learning["forward_passes"] == 3 + 1 + 4 + 1


def _retain_eval(path, forget_split, ratios):
    path.write_text(json.dumps({"format": "tofu-eval/v1", "forget_split": forget_split, "report": {},
                                "splits": {"forget": {"truth_ratio": list(ratios)}}}))
    return path


def test_learner_with_the_ks_objective_reads_the_retain_models_ratios(run_cli, tmp_path):
    ratios = [0.3, 0.55, 0.8, 1.1, 1.6]
    args = ["--model.init_args.model=tiny", "--model.init_args.metric=truth_ratio_ks", "--model.init_args.dims=16",
            "--model.init_args.strength=0.5", "--data.init_args.n_authors=6", "--data.init_args.qa_per_author=3",
            "--trainer.max_steps=1", f"--model.init_args.settings_dir={tmp_path / 'settings'}"]
    other_split = _retain_eval(tmp_path / "retain05.json", "forget05", ratios)
    with pytest.raises(ValueError, match="evaluated on forget split 'forget05', the learner scores 'forget10'"):
        run_cli("fit", "configs/eco/learn.yaml", *args, f"--model.init_args.retain_eval={other_split}", name="ks05")
    retain = _retain_eval(tmp_path / "retain.json", "forget10", ratios)
    run_cli("fit", "configs/eco/learn.yaml", *args, f"--model.init_args.retain_eval={retain}", name="ks")
    learning = json.loads((tmp_path / "settings" / "learning.json").read_text())
    assert learning["metric"] == "truth_ratio_ks" and learning["target"] == 0.0
    n_forget = 3  # forget10 of 6 authors x 3 questions: one author
    for h in learning["history"]:  # a KS distance between 3 and 5 values is a multiple of 1/15
        assert h["objective"] == h["metric"] and 0 < h["metric"] <= 1
        assert h["metric"] * n_forget * len(ratios) == pytest.approx(round(h["metric"] * n_forget * len(ratios)))
    with pytest.raises(ValueError, match="target 0"):
        eco.EcoCorruptionLearner(model="tiny", metric="truth_ratio_ks", target=0.3, retain_eval=str(retain))
    assert eco.EcoCorruptionLearner(model="tiny", retain_eval=str(retain)).metric == "truth_ratio_ks"  # the default


def test_learner_refuses_several_processes_before_any_wrapping():
    learner = eco.EcoCorruptionLearner(model="tiny", metric="answer_prob", target=0.0)
    learner.trainer = types.SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match="EcoCorruptionLearner runs on one process .* got 2 processes"):
        learner.setup("fit")


@pytest.mark.parametrize("max_epochs", [-1, None, 1000])  # 1000: what fit makes of None without max_steps
def test_learner_refuses_to_run_without_a_step_limit(max_epochs):
    import lightning.pytorch as pl

    learner = eco.EcoCorruptionLearner(model="tiny", metric="answer_prob", target=0.0)
    learner.trainer = pl.Trainer(max_steps=-1, max_epochs=max_epochs, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="needs a step limit: set trainer.max_steps"):
        learner.on_fit_start()


@pytest.mark.parametrize(("metric", "objective", "tolerance", "stop_below", "stops"), [
    (0.30, 0.05, 0.0, None, False),   # two-sided only: J = 0.05 is not within a tolerance of 0
    (0.30, 0.05, 0.05, None, True),   # J within the tolerance
    (0.26, 0.01, 0.0, 0.27, True),    # accuracy below 0.27: the released WMDP rule stops
    (0.27, 0.02, 0.0, 0.27, False),   # strictly below
    (0.10, 0.15, 0.0, 0.27, True),    # far below chance stops too, though J grew
])
def test_the_learner_stops_within_tolerance_or_below_stop_below(metric, objective, tolerance, stop_below, stops):
    assert eco.reached_stop(metric, objective, tolerance, stop_below) is stops
