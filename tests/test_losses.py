"""Golden values for the losses and schedules of the foundation, computed by hand with scalar math."""

from __future__ import annotations

import math

import pytest
import torch

from modules.base import WarmupSchedule
from modules.lm import sequence_logprob, token_logprobs
from modules.reward import preference_loss
from modules.sft import sft_loss

CHOSEN = torch.tensor([1.0, 0.0, 2.0])
REJECTED = torch.tensor([0.0, 0.5, 2.0])  # deltas 1, -0.5, 0 (a tie)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(kind="bt"), 0.6601619507527583),                      # mean log(1 + e^-Δ)
    (dict(kind="bt_temperature", temperature=2.0), 0.6643878615396318),
    (dict(kind="focal"), 0.1911188178359545),                   # γ = 2: mean (1-σ(Δ))² log(1 + e^-Δ)
    (dict(kind="focal", gamma=1.0), 0.34571531396458516),       # mean (1-σ(Δ)) log(1 + e^-Δ)
    (dict(kind="hinge"), 0.8333333333333334),                   # margin 1: mean max(0, 1-Δ)
    (dict(kind="hinge", hinge_margin=0.5), 0.5),                # mean max(0, 0.5-Δ) = (0 + 1 + 0.5) / 3
    (dict(kind="bt", center_coef=0.01), 0.7176619507527583),    # + 0.01 mean (r_c + r_r)²
])
def test_preference_loss_golden(kwargs, expected):
    loss, _ = preference_loss(CHOSEN, REJECTED, **kwargs)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_reward_model_passes_its_loss_settings_to_the_loss():
    from modules.reward import RewardModel

    model = RewardModel(model="tiny", loss="focal", temperature=2.0, focal_gamma=3.0, hinge_margin=0.25,
                        center_coef=0.1)
    assert model.loss_kwargs == dict(kind="focal", temperature=2.0, gamma=3.0, hinge_margin=0.25, center_coef=0.1)


def test_preference_loss_margin_inside_sigmoid():
    loss, _ = preference_loss(CHOSEN, REJECTED, margin=torch.tensor([0.5, 0.0, -1.0]))
    assert loss.item() == pytest.approx(0.5871385519594787, rel=1e-6)


def test_preference_metrics_are_strict_on_ties():
    _, metrics = preference_loss(CHOSEN, REJECTED)
    assert metrics["accuracy"].item() == pytest.approx(1 / 3)  # the tie counts as wrong
    assert metrics["margin"].item() == pytest.approx(0.5 / 3)
    assert metrics["reward_min"].item() == 0.0 and metrics["reward_max"].item() == 2.0
    assert metrics["reward_mean"].item() == pytest.approx(5.5 / 6)


def test_preference_loss_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown reward loss"):
        preference_loss(CHOSEN, REJECTED, kind="dpo")


def test_bt_gradient_pushes_rewards_apart():
    chosen = CHOSEN.clone().requires_grad_(True)
    rejected = REJECTED.clone().requires_grad_(True)
    preference_loss(chosen, rejected)[0].backward()
    # d/dr_c of mean log(1+e^-Δ) = -σ(-Δ)/3
    expected = [-1 / (1 + math.exp(d)) / 3 for d in (1.0, -0.5, 0.0)]
    assert chosen.grad.tolist() == pytest.approx(expected, rel=1e-6)
    assert rejected.grad.tolist() == pytest.approx([-g for g in expected], rel=1e-6)


# logits (1, 3, 2): position 0 is uniform and predicts label 0; position 1 favours class 0 by 1 logit
# but the label is 1. The first label is the prompt (-100).
LOGITS = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [5.0, -5.0]]])
LABELS = torch.tensor([[-100, 0, 1]])
LOG2, HARD = math.log(2), math.log(1 + math.e)  # CE of the two labelled positions


def test_sft_loss_averages_response_tokens_only():
    loss, metrics = sft_loss(LOGITS, LABELS)
    assert loss.item() == pytest.approx((LOG2 + HARD) / 2, rel=1e-6)
    assert metrics["response_tokens"].item() == 2


def test_token_and_sequence_logprobs():
    assert token_logprobs(LOGITS, LABELS)[0].tolist() == pytest.approx([-LOG2, -HARD], rel=1e-6)
    labels = torch.tensor([[-100, -100, 1]])  # only the last position counts
    assert token_logprobs(LOGITS, labels)[0].tolist() == pytest.approx([0.0, -HARD], rel=1e-6)
    assert sequence_logprob(LOGITS, LABELS, "sum").item() == pytest.approx(-(LOG2 + HARD), rel=1e-6)
    assert sequence_logprob(LOGITS, LABELS, "mean").item() == pytest.approx(-(LOG2 + HARD) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean'"):
        sequence_logprob(LOGITS, LABELS, "max")


def test_warmup_cosine_schedule():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupSchedule(optimizer, warmup_steps=4, decay="cosine", total_steps=14, min_lr_ratio=0.1)
    factors = [schedule.factor(step) for step in range(15)]
    assert factors[0] == pytest.approx(0.2) and factors[3] == pytest.approx(0.8)
    assert factors[4] == pytest.approx(1.0)
    assert factors[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(0.2 * math.pi)))  # 0.914: not linear's 0.82
    assert factors[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert factors[14] == pytest.approx(0.1)
    linear = WarmupSchedule(optimizer, warmup_steps=4, decay="linear", total_steps=14, min_lr_ratio=0.1)
    assert [linear.factor(s) for s in (4, 6, 9, 14, 20)] == pytest.approx([1.0, 0.82, 0.55, 0.1, 0.1])
    constant = WarmupSchedule(optimizer, warmup_steps=2, decay="constant")
    assert [constant.factor(s) for s in (0, 1, 2, 100)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    with pytest.raises(ValueError, match="decay must be 'cosine', 'linear' or 'constant'"):
        WarmupSchedule(optimizer, decay="exponential")
