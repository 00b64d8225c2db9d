"""FLAT's divergences and the unlearning baselines against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from modules import flat

P_TEMPLATE = [0.2, 0.6]
P_FORGET = [0.9, 0.3]

# Literals computed with plain Python floats from the table in METHODS.md section 3, for P_e = (0.2, 0.6)
# and P_f = (0.9, 0.3); softplus(v) = log(1 + e^v), sigmoid(v) = 1 / (1 + e^-v).
GOLDEN = {
    # mean(-P_e + exp(P_f - 1)) = ((-0.2 + e^-0.1) + (-0.6 + e^-0.7)) / 2; weights 1 and mean(exp(P_f - 1))
    "kl": (0.30071136091368456, 1.0, 0.7007113609136846),
    # mean(-P_e + P_f^2/4 + P_f) = ((-0.2 + 0.2025 + 0.9) + (-0.6 + 0.0225 + 0.3)) / 2; weights 1, mean(P_f/2 + 1)
    "pearson": (0.3125, 1.0, 1.3),
    # mean(-(log 2 - softplus(-P_e)) + softplus(P_f) - log 2); weights mean sigmoid(-P_e), mean sigmoid(P_f)
    "js": (0.17927360841415563, 0.40225484823086327, 0.6426960097183314),
    # mean(-tanh(P_e)/2 + tanh(P_f)/2); weights mean (1 - tanh^2)/2 at P_e and at P_f
    "tv": (0.06829639885691902, 0.4181551863883348, 0.35051358074374267),
}


@pytest.mark.parametrize("divergence", sorted(GOLDEN))
def test_flat_golden_loss_and_weights(divergence):
    loss_value, weight_template, weight_forget = GOLDEN[divergence]
    p_e = torch.tensor(P_TEMPLATE, dtype=torch.float64, requires_grad=True)
    p_f = torch.tensor(P_FORGET, dtype=torch.float64, requires_grad=True)
    loss, metrics = flat.flat_loss(p_e, p_f, divergence)
    assert loss.item() == pytest.approx(loss_value, abs=1e-12)
    assert metrics["weight_template"].item() == pytest.approx(weight_template, abs=1e-12)
    assert metrics["weight_forget"].item() == pytest.approx(weight_forget, abs=1e-12)
    assert metrics["p_template"].item() == pytest.approx(0.4)
    assert metrics["p_forget"].item() == pytest.approx(0.6)
    # the reported weights are the actual gradients: dL/dP_e = -g'(P_e)/B, dL/dP_f = (f*∘g)'(P_f)/B
    loss.backward()
    div = flat.get_divergence(divergence)
    assert torch.allclose(p_e.grad, -div.g_prime(p_e.detach()) / 2)
    assert torch.allclose(p_f.grad, div.conjugate_of_g_prime(p_f.detach()) / 2)
    assert (p_e.grad < 0).all() and (p_f.grad > 0).all()  # descent raises P_e and lowers P_f


def test_js_closed_form():
    # JS: softplus(-P_e) + softplus(P_f) - 2 log 2, per sample (METHODS.md)
    p_e, p_f = torch.tensor([0.3]), torch.tensor([0.8])
    expected = math.log1p(math.exp(-0.3)) + math.log1p(math.exp(0.8)) - 2 * math.log(2)
    assert flat.flat_loss(p_e, p_f, "js")[0].item() == pytest.approx(expected, rel=1e-6)


def test_divergence_names():
    assert flat.get_divergence("Jensen_Shannon").name == "js"
    assert flat.get_divergence("total_variation").name == "tv"
    assert flat.get_divergence("pearson_chi2").name == "pearson"
    for wrong in ("reverse_kl", "squared_hellinger", "neyman"):
        with pytest.raises(ValueError, match="wrong sign"):
            flat.get_divergence(wrong)
    with pytest.raises(ValueError, match="unknown divergence 'wasserstein'"):
        flat.flat_loss(torch.tensor([0.5]), torch.tensor([0.5]), "wasserstein")
    with pytest.raises(ValueError, match=r"\(B,\)"):
        flat.flat_loss(torch.tensor([0.5, 0.2]), torch.tensor([0.5]), "kl")


def test_mean_token_prob_is_mean_of_probabilities():
    # every position predicts token 1 with probability 3/4; answer tokens are 1 then 0
    logits = torch.tensor([[[0.0, math.log(3)]] * 3])
    labels = torch.tensor([[-100, 1, 0]])
    assert flat.mean_token_prob(logits, labels).item() == pytest.approx((0.75 + 0.25) / 2)
    # not exp(mean log-prob) = sqrt(3/16), which is TOFU's Prob
    assert flat.mean_token_prob(logits, labels).item() != pytest.approx(math.sqrt(0.75 * 0.25))
    with pytest.raises(ValueError, match="no answer tokens"):
        flat.mean_token_prob(logits, torch.tensor([[-100, -100, -100]]))


@pytest.mark.parametrize("divergence", sorted(flat.DIVERGENCES))
def test_sgd_on_flat_lowers_forget_and_raises_template(divergence):
    """Free logits stand in for a model: a few SGD steps must move P_f down and P_e up for every sample."""
    torch.manual_seed(0)
    batch, length, vocab = 3, 5, 7
    logits = torch.nn.Parameter(torch.randn(2 * batch, length, vocab))  # rows 0..2 template, 3..5 forget
    labels = torch.randint(0, vocab, (2 * batch, length))
    labels[:, 0] = -100  # the prompt position is not scored

    def probabilities():
        p = flat.mean_token_prob(logits, labels)
        return p[:batch], p[batch:]

    with torch.no_grad():
        p_e0, p_f0 = probabilities()
    optimizer = torch.optim.SGD([logits], lr=2.0)
    for _ in range(5):
        p_e, p_f = probabilities()
        loss, _ = flat.flat_loss(p_e, p_f, divergence)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        p_e1, p_f1 = probabilities()
    assert (p_e1 > p_e0).all(), (p_e0, p_e1)
    assert (p_f1 < p_f0).all(), (p_f0, p_f1)


def test_gradient_ascent_and_difference():
    forget, retain = torch.tensor([-1.0, -3.0]), torch.tensor([-0.5, -1.5])
    loss, metrics = flat.gradient_ascent_loss(forget)
    assert loss.item() == pytest.approx(-2.0) and metrics["forget_nll"].item() == pytest.approx(2.0)
    loss, metrics = flat.gradient_difference_loss(forget, retain, retain_weight=0.5)
    assert loss.item() == pytest.approx(-2.0 + 0.5 * 1.0)
    assert metrics["retain_nll"].item() == pytest.approx(1.0)


def test_reference_kl_golden_and_direction():
    # position 0: policy uniform over 3 tokens, reference (0.5, 0.25, 0.25):
    #   KL(ref || policy) = 0.5 ln(1.5) + 2 * 0.25 ln(0.75) = 0.5 ln(1.125)
    #   (the other direction, KL(policy || ref) = ln(32/27) / 3 = 0.0566, would fail this)
    # position 1: equal distributions, KL 0; position 2 is masked out and must not count
    policy = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [9.0, 0.0, 0.0]]])
    reference = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]]))
    reference[0, 1] = torch.tensor([1.0, 2.0, 3.0]) + 5.0  # a shift of the logits is the same distribution
    kl = flat.reference_kl(policy, reference, torch.tensor([[True, True, False]]))
    assert kl.shape == (1,) and kl.item() == pytest.approx(0.5 * math.log(1.125) / 2, rel=1e-6)
    loss, metrics = flat.kl_regularised_ga_loss(torch.tensor([-1.0, -3.0]), torch.tensor([0.2, 0.4]), kl_weight=2.0)
    assert loss.item() == pytest.approx(-2.0 + 2.0 * 0.3)
    assert metrics["forget_nll"].item() == pytest.approx(2.0) and metrics["retain_kl"].item() == pytest.approx(0.3)


def test_npo_golden():
    # log-ratios -2 and 2, beta 0.1: -(2/0.1) * mean(log sigmoid(0.2), log sigmoid(-0.2))
    policy, reference = torch.tensor([-10.0, -4.0]), torch.tensor([-8.0, -6.0])
    loss, metrics = flat.npo_loss(policy, reference, beta=0.1)
    assert loss.item() == pytest.approx(13.962777387631835, rel=1e-6)
    assert metrics["log_ratio"].item() == pytest.approx(0.0)
    # at the reference, NPO's gradient is GA's scaled by 1 (sigma(0) * 2 = 1): d/dlogp = +1/B per sample
    logp = torch.tensor([-5.0, -7.0], requires_grad=True)
    flat.npo_loss(logp, logp.detach(), beta=0.1)[0].backward()
    assert torch.allclose(logp.grad, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="beta"):
        flat.npo_loss(policy, reference, beta=0.0)


def test_idk_and_dpo_golden():
    loss, metrics = flat.idk_loss(torch.tensor([-2.0, -4.0]))
    assert loss.item() == pytest.approx(3.0)
    loss, metrics = flat.idk_loss(torch.tensor([-2.0, -4.0]), torch.tensor([-1.0, -1.0]), retain_weight=2.0)
    assert loss.item() == pytest.approx(5.0) and metrics["retain_nll"].item() == pytest.approx(1.0)
    # chosen (refusal) log-ratios 1, -1; rejected (forget answer) log-ratios 1, -3; beta 0.1 -> margins 0, 0.2
    # loss = -mean(log sigmoid(0), log sigmoid(0.2)) = (log 2 + log(1 + e^-0.2)) / 2
    loss, metrics = flat.dpo_loss(torch.tensor([-5.0, -7.0]), torch.tensor([-3.0, -9.0]),
                                  torch.tensor([-6.0, -6.0]), torch.tensor([-4.0, -6.0]), beta=0.1)
    assert loss.item() == pytest.approx(0.6456430249707685, rel=1e-6)
    assert metrics["reward_margin"].item() == pytest.approx(0.1)
    assert metrics["reward_accuracy"].item() == pytest.approx(0.5)
