"""The FLAT unlearner LightningModule on the tiny preset: unlearning moves P_f down and P_e up, every loss
trains, the frozen reference of NPO/DPO, logging, and clear errors for bad settings."""

from __future__ import annotations

import types

import pytest
import torch

from datamodules.tofu import TofuQAData
from modules import flat
from modules.flat import LOSSES, FlatUnlearner

SMALL = dict(n_authors=4, qa_per_author=3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def unlearn_data():
    data = TofuQAData(task="unlearn", batch_size=3, eval_batch_size=8, **SMALL)
    data.setup("fit")
    return data


def make_module(state=None, **kwargs) -> FlatUnlearner:
    torch.manual_seed(0)
    module = FlatUnlearner(model="tiny", **kwargs)
    module.configure_model()
    if state is not None:
        module.model.load_state_dict(state)
    return module


@pytest.fixture(scope="module")
def memorised(unlearn_data):
    """Weights of the tiny preset after it has learned the forget answers (P_f well above chance)."""
    module = make_module(loss="idk")
    batch = next(iter(unlearn_data.reference_dataloader()))
    optimizer = torch.optim.Adam(module.model.parameters(), lr=1e-2)
    module.model.train()
    for _ in range(60):
        stats = module.score_parts(module.model, batch, ("forget",))
        loss = -stats["forget"]["mean_logp"].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def probabilities(module: FlatUnlearner, batch) -> tuple[float, float]:
    with torch.no_grad():
        stats = module.score_parts(module.model, batch, ("forget", "template"))
    return stats["template"]["p"].mean().item(), stats["forget"]["p"].mean().item()


def take_adam_steps(module: FlatUnlearner, batch, steps: int = 3, lr: float = 1e-3) -> None:
    optimizer = torch.optim.Adam(module.model.parameters(), lr=lr)
    for _ in range(steps):
        loss, _ = module.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("divergence", ["kl", "js", "pearson", "tv"])
def test_a_few_flat_steps_lower_p_forget_and_raise_p_template(unlearn_data, memorised, divergence):
    """Small steps (lr 3e-4): with lr 1e-3 the template's probability fell on some round-off-level perturbations
    of the start weights (-4% in 2 of 48 cases), which a CPU with other float kernels gives; at 3e-4 P_e rose by
    at least 9% and P_f fell by at least 3% in all 48 (12 perturbations x 4 divergences)."""
    batch = next(iter(unlearn_data.reference_dataloader()))  # every forget sample, fixed order
    _, p_f_untrained = probabilities(make_module(loss="flat", divergence=divergence), batch)
    module = make_module(memorised, loss="flat", divergence=divergence)
    p_e0, p_f0 = probabilities(module, batch)
    # the forget answers were learned (32x or more in those 12 perturbations), above the refusals (1.8x or more)
    assert p_f0 > 10 * p_f_untrained and p_f0 > p_e0
    optimizer = torch.optim.Adam(module.model.parameters(), lr=3e-4)
    module.model.train()
    for _ in range(4):
        loss, metrics = module.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.model.eval()
    p_e, p_f = probabilities(module, batch)
    assert p_f < p_f0 and p_e > p_e0, (divergence, p_e0, p_e, p_f0, p_f)
    assert {"p_template", "p_forget", "weight_template", "weight_forget"} <= set(metrics)


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_every_parameter(unlearn_data, loss):
    module = make_module(loss=loss, reference_mode="frozen")
    batch = next(iter(unlearn_data.train_dataloader()))
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    value, metrics = module.compute_loss(batch)
    assert torch.isfinite(value)
    value.backward()
    torch.optim.SGD(module.model.parameters(), lr=1.0).step()
    unchanged = [n for n, p in module.model.named_parameters() if torch.equal(before[n], p.detach())]
    assert unchanged == []
    assert {"p_template", "p_forget"} <= set(metrics)
    if loss == "gd":
        assert "retain_nll" in metrics
    if loss == "ga_kl":
        assert "retain_kl" in metrics and "retain_nll" not in metrics


def test_kl_regularised_ga_starts_at_gradient_ascent_and_holds_retain_predictions(unlearn_data, memorised):
    """At the reference the KL term is 0 (the loss is GA's); after ascent steps it is positive and has a
    gradient, which is what holds the retain predictions near the reference's."""
    module = make_module(memorised, loss="ga_kl")
    batch = next(iter(unlearn_data.train_dataloader()))
    loss, metrics = module.compute_loss(batch)
    ga = make_module(memorised, loss="ga").compute_loss(batch)[0]
    assert metrics["retain_kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(ga.item(), abs=1e-5)
    take_adam_steps(module, batch)
    stats = module.score_parts(module.model, batch, module._parts(), logits_of="retain")
    retain = stats["retain"]
    kl = flat.reference_kl(retain["shifted_logits"], module.reference_retain_logits(batch), retain["shifted_mask"])
    assert kl.mean().item() > 1e-4
    kl.mean().backward()
    step = [p.grad for p in module.model.parameters() if p.grad is not None]
    assert step and any(g.abs().sum() > 0 for g in step)


def test_kl_regularised_ga_needs_a_frozen_reference_and_retain_rows():
    with pytest.raises(ValueError, match="reference_mode: frozen"):
        FlatUnlearner(model="tiny", loss="ga_kl", reference_mode="precompute")
    with pytest.raises(ValueError, match="use_retain must be true"):
        FlatUnlearner(model="tiny", loss="ga_kl", use_retain=False)
    assert FlatUnlearner(model="tiny", loss="ga_kl").reference_mode == "frozen"
    assert FlatUnlearner(model="tiny", loss="npo").reference_mode == "precompute"


def test_gradient_ascent_lowers_p_forget(unlearn_data, memorised):
    module = make_module(memorised, loss="ga")
    batch = next(iter(unlearn_data.reference_dataloader()))
    _, p_f0 = probabilities(module, batch)
    take_adam_steps(module, batch)
    assert probabilities(module, batch)[1] < p_f0


class _Trainer:
    def __init__(self, datamodule, precision_plugin=None):
        from lightning.pytorch.plugins.precision import Precision

        self.datamodule, self.precision_plugin = datamodule, precision_plugin or Precision()
        self.strategy = types.SimpleNamespace(model=None)  # one process: no root forward to run inside


def test_precomputed_reference_equals_frozen_copy(unlearn_data, monkeypatch):
    pre = make_module(loss="npo")
    monkeypatch.setattr(FlatUnlearner, "trainer", property(lambda self: _Trainer(unlearn_data)))
    pre.precompute_reference()
    n = len(unlearn_data.datasets["train"])
    assert pre.reference_logps["forget"].shape == (n,) and torch.isfinite(pre.reference_logps["forget"]).all()
    frozen = make_module(loss="npo", reference_mode="frozen")
    batch = next(iter(unlearn_data.train_dataloader()))
    torch.testing.assert_close(pre.reference_for(batch)["forget"], frozen.reference_for(batch)["forget"],
                               rtol=1e-5, atol=1e-4)
    # at the start the model is its own reference: log-ratio 0, NPO loss = (2/beta) log 2
    loss, metrics = pre.compute_loss(batch)
    assert metrics["log_ratio"].abs().item() < 1e-3
    assert loss.item() == pytest.approx(2 / 0.1 * 0.6931471805599453, rel=1e-3)
    # the numbers travel with checkpoints, since a resumed model is no longer the reference
    checkpoint: dict = {}
    pre.on_save_checkpoint(checkpoint)
    resumed = make_module(loss="npo")
    resumed.on_load_checkpoint(checkpoint)
    torch.testing.assert_close(resumed.reference_logps["forget"], pre.reference_logps["forget"])


def test_reference_is_precomputed_under_the_training_precision(unlearn_data, monkeypatch):
    """Under bf16 autocast the reference is scored in bf16 too, so the first step's log-ratio is not a
    float32-vs-bf16 difference (8.8e-4 here when the reference is scored in float32). The log-ratio itself is
    exactly 0 on a CPU without bf16 instructions, but one with them may round the differently padded training
    batch otherwise: what is asserted is the precision every reference forward ran under."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = make_module(loss="npo")
    monkeypatch.setattr(FlatUnlearner, "trainer", property(
        lambda self: _Trainer(unlearn_data, MixedPrecision("bf16-mixed", "cpu"))))
    autocast_dtypes = []
    score = module._reference_scores

    def recording_scores(model, batch):
        autocast_dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return score(model, batch)

    monkeypatch.setattr(module, "_reference_scores", recording_scores)
    module.precompute_reference()
    assert autocast_dtypes and set(autocast_dtypes) == {torch.bfloat16}


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match="loss must be one of"):
        FlatUnlearner(model="tiny", loss="graddiff")
    with pytest.raises(ValueError, match="wrong sign"):
        FlatUnlearner(model="tiny", divergence="reverse_kl")
    with pytest.raises(ValueError, match="use_retain must be true"):
        FlatUnlearner(model="tiny", loss="gd", use_retain=False)
    with pytest.raises(ValueError, match="reference_mode"):
        FlatUnlearner(model="tiny", loss="npo", reference_mode="lazy")


def test_a_batch_without_retain_rows_is_a_clear_error(unlearn_data):
    module = make_module(loss="gd")
    batch = {k: v for k, v in next(iter(unlearn_data.train_dataloader())).items() if not k.startswith("retain_")}
    with pytest.raises(ValueError, match=r"needs \['retain'\] rows"):
        module.compute_loss(batch)


def test_fit_logs_probabilities_and_weights(tmp_path):
    import lightning.pytorch as pl

    data = TofuQAData(task="unlearn", batch_size=2, **SMALL)
    module = FlatUnlearner(model="tiny", loss="flat", divergence="js")
    trainer = pl.Trainer(max_steps=2, logger=pl.loggers.CSVLogger(tmp_path), log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    logged = set(trainer.callback_metrics)
    assert {"train/p_template", "train/p_forget", "train/weight_template", "train/weight_forget",
            "train/template_term", "train/forget_term", "train/loss"} <= logged
    assert 0 < trainer.callback_metrics["train/p_forget"].item() < 1


def test_throughput_counts_the_one_concatenated_forward_of_the_loss_parts(unlearn_data):
    batch = next(iter(unlearn_data.train_dataloader()))
    for use_retain, parts in ((True, ("forget", "template", "retain")), (False, ("forget", "template"))):
        module = FlatUnlearner(model="tiny", loss="flat", use_retain=use_retain)
        [(rows, width, tokens)] = module.training_forward_shapes(batch)
        # score_parts pads every part to the widest and runs them as one batch
        assert rows == sum(batch[f"{part}_input_ids"].shape[0] for part in parts)
        assert width == max(batch[f"{part}_input_ids"].shape[1] for part in parts)
        assert int(tokens) == sum(int(batch[f"{part}_attention_mask"].sum()) for part in parts)


def test_a_model_whose_tokenizer_has_no_pad_token_unlearns_and_is_evaluated(tmp_path):
    """Llama-2/3 tokenizers have no pad token. FLAT's padding is masked, so it pads with EOS and adds no token:
    the unlearned model keeps the target's vocabulary."""
    import lightning.pytorch as pl
    from conftest import padless_model
    from test_tofu_pipeline import assert_padding_changes_no_number

    from callbacks.tofu_eval import TofuEvaluation
    from modules import lm
    from modules import tofu_eval as te
    from modules.lm import load_tokenizer

    folder = padless_model(tmp_path / "llama_like")  # no pad token, no pad-like token in the vocabulary
    size = len(load_tokenizer(str(folder)))
    module = FlatUnlearner(model=str(folder), loss="flat")
    tokenizer = module.tokenizer
    assert tokenizer.pad_token_id is None
    named = TofuQAData(task="unlearn", tokenizer=str(folder), **SMALL)  # a data module naming the tokenizer
    named.trainer = types.SimpleNamespace(lightning_module=module)
    assert named.resolve_tokenizer().pad_token_id is None

    data = TofuQAData(task="unlearn", batch_size=2, eval_batch_size=16, **SMALL)
    evaluation = TofuEvaluation(save_dir=str(tmp_path / "eval"), max_new_tokens=2)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[evaluation])
    trainer.fit(module, datamodule=data)
    assert module.model.get_input_embeddings().weight.shape[0] == size  # the target's vocabulary
    batch = next(iter(data.train_dataloader()))
    padding = batch["forget_attention_mask"] == 0
    assert padding.any() and (batch["forget_input_ids"][padding] == tokenizer.eos_token_id).all()
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert_padding_changes_no_number(te.load_eval(tmp_path / "eval" / "epoch_001.json"), data, module)
    metrics = trainer.test(module, datamodule=data, verbose=False)[0]
    tokenizer.pad_token = lm.UNK  # the data module pads with the module's tokenizer: now with another id
    assert trainer.test(module, datamodule=data, verbose=False)[0] == pytest.approx(metrics, rel=1e-5)


def test_test_metrics_count_each_row_once_when_the_sampler_repeats_rows(unlearn_data):
    """Under DDP the distributed sampler repeats rows to even out the processes; they carry the same row id."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    unlearn_data.setup("test")
    items = unlearn_data.datasets["test"]
    forget = [item for item in items if item["kind"] == "forget"]
    module = make_module(loss="flat")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)

    def test(rows):
        loader = DataLoader(rows, batch_size=8, collate_fn=unlearn_data.collate_sft)
        return trainer.test(module, dataloaders=loader, verbose=False)[0]

    once = test(items)
    repeated = test(items + forget[:1] * 3)  # one forget row three more times, as a sampler pads
    assert repeated.keys() == once.keys() >= {f"test/{kind}/p_answer" for kind in ("forget", "retain")}
    for key, value in once.items():
        assert repeated[key] == pytest.approx(value, rel=1e-5), key
    # counted four times, that row would move the forget mean by (p0 - mean(p1, p2)) / 3: far more than the
    # tolerance above
    batch = unlearn_data.collate_sft(forget)
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    p = flat.mean_token_prob(logits, batch["labels"]).double()
    assert len(forget) == 3 and abs(float(p[0] - p[1:].mean())) / 3 > 100 * 1e-5 * float(p.mean())
    assert once["test/forget/p_answer"] == pytest.approx(float(p.mean()), rel=1e-5)
