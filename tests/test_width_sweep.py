"""Width sweeps: theory oracles, conditioning, vectorised == alone, configs end to end, input errors."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
from datamodules.width_data import DigitsData, TeacherData, TorchvisionData, corrupt_labels
from modules.width_sweep import (
    ACTIVATIONS,
    RandomFeatureSweep,
    TwoLayerSweep,
    closed_form_readout,
    condition_number,
    gram_condition_number,
    isotropic_min_norm_risk,
    nested_gaussian,
    random_features,
    slab_mask,
    slab_size,
    slab_view,
    sweep_loss,
    threshold_summary,
    two_layer_jacobian_gram,
    width_grid,
    width_groups,
)

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs" / "width_sweep").glob("*.yaml"))


# -- theory oracles --------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.25, 0.5, 2.0, 4.0])
def test_min_norm_risk_matches_isotropic_theory(gamma):
    """Min-norm least squares on x ~ N(0, I_p), |beta|^2 = r^2, noise sigma^2: the excess risk
    |beta_hat - beta|^2 averaged over 8 draws at n = 300 is within 8% of the asymptotic formula
    sigma^2 g/(1-g) (g < 1) or r^2 (1 - 1/g) + sigma^2/(g - 1) (g > 1). Finite-n corrections are below
    1% here (e.g. p/(n-p-1) vs g/(1-g)); seed-to-seed spread of the mean is about 2%."""
    n, signal2, noise2, draws = 300, 1.0, 0.5, 8
    p = int(gamma * n)
    risks = []
    for seed in range(draws):
        rng = np.random.default_rng([seed, 17])
        x = torch.from_numpy(rng.standard_normal((n, p)))
        beta = torch.from_numpy(rng.standard_normal(p))
        beta *= math.sqrt(signal2) / beta.norm()
        y = x @ beta + math.sqrt(noise2) * torch.from_numpy(rng.standard_normal(n))
        beta_hat, _ = closed_form_readout(x, y[:, None], "min_norm", rcond=1e-12)
        risks.append(float(((beta_hat[:, 0] - beta) ** 2).sum()))
    theory = isotropic_min_norm_risk(gamma, signal2, noise2)
    assert abs(np.mean(risks) - theory) < 0.08 * theory, (np.mean(risks), theory)


def test_theory_formula_values_and_divergence():
    assert isotropic_min_norm_risk(0.5, 1.0, 0.25) == pytest.approx(0.25)
    assert isotropic_min_norm_risk(2.0, 1.0, 0.25) == pytest.approx(0.5 + 0.25)
    assert isotropic_min_norm_risk(1.0, 1.0, 0.25) == math.inf
    assert isotropic_min_norm_risk(0.99, 1.0, 0.25) > 20 * isotropic_min_norm_risk(0.5, 1.0, 0.25)


def test_ridge_shrinks_the_peak_and_rcond_is_honoured():
    """At gamma = 1 the min-norm risk explodes; ridge (and truncating small singular values with rcond)
    keeps it bounded."""
    n, noise2 = 200, 0.5
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((n, n)))
    beta = torch.from_numpy(rng.standard_normal(n))
    beta /= beta.norm()
    y = (x @ beta + math.sqrt(noise2) * torch.from_numpy(rng.standard_normal(n)))[:, None]
    risk = {}
    for name, kwargs in {"min_norm": dict(solver="min_norm", rcond=1e-12),
                         "truncated": dict(solver="min_norm", rcond=0.05),
                         "ridge": dict(solver="ridge", ridge_alpha=0.1)}.items():
        beta_hat, singular = closed_form_readout(x, y, **kwargs)
        risk[name] = float(((beta_hat[:, 0] - beta) ** 2).sum())
    assert risk["min_norm"] > 10 * risk["ridge"]
    assert risk["min_norm"] > 10 * risk["truncated"]
    assert risk["ridge"] < 2.0


def test_closed_form_readout_matches_pinv_and_ridge_normal_equations():
    rng = np.random.default_rng(0)
    z, y = torch.from_numpy(rng.standard_normal((30, 50))), torch.from_numpy(rng.standard_normal((30, 3)))
    w, singular = closed_form_readout(z, y, "min_norm", rcond=1e-12)
    torch.testing.assert_close(w, torch.linalg.pinv(z) @ y)
    assert torch.all(singular[:-1] >= singular[1:])
    alpha = 0.3
    w_ridge, _ = closed_form_readout(z, y, "ridge", ridge_alpha=alpha)
    normal = torch.linalg.solve(z.T @ z / 30 + alpha * torch.eye(50, dtype=z.dtype), z.T @ y / 30)
    torch.testing.assert_close(w_ridge, normal)


# -- conditioning ----------------------------------------------------------------------------------------

def test_random_feature_kappa_is_largest_at_p_equals_n():
    data = DigitsData(n_train=120).sweep_tensors()
    x = data.x_train.double()
    n, d = x.shape
    widths = [15, 30, 60, 90, 110, 120, 130, 160, 240, 480]
    w0 = nested_gaussian(0, 0, max(widths), d).T / math.sqrt(d)
    for activation in ("tanh", "relu"):
        z = random_features(x, w0, activation)
        kappa = np.array([condition_number(z[:, :p]) for p in widths])
        assert widths[int(np.argmax(kappa))] == n, (activation, kappa)
        assert kappa[widths.index(n)] > 10 * max(kappa[widths.index(60)], kappa[widths.index(240)])


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_two_layer_jacobian_gram_matches_autograd(activation):
    torch.manual_seed(0)
    x, first, second = torch.randn(7, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64), \
        torch.randn(4, 3, dtype=torch.float64)

    def outputs(w1, w2):
        return (ACTIVATIONS[activation](x @ w1.T) @ w2).reshape(-1)  # rows ordered (sample, output)

    j1, j2 = torch.autograd.functional.jacobian(outputs, (first, second))
    jacobian = torch.cat([j1.reshape(21, -1), j2.reshape(21, -1)], dim=1)
    torch.testing.assert_close(two_layer_jacobian_gram(x, first, second, activation), jacobian @ jacobian.T)
    singular = torch.linalg.svdvals(jacobian)
    expected = float(singular[0] / singular[min(jacobian.shape) - 1])
    gram = two_layer_jacobian_gram(x, first, second, activation)
    assert gram_condition_number(gram, min(jacobian.shape)) == pytest.approx(expected, rel=1e-6)


def test_nested_gaussian_prefix_does_not_depend_on_the_widest_width():
    wide, narrow = nested_gaussian(5, 0, 300, 64), nested_gaussian(5, 0, 37, 64)
    assert torch.equal(wide[:37], narrow)
    assert not torch.equal(nested_gaussian(6, 0, 37, 64), narrow)


# -- small pure helpers ----------------------------------------------------------------------------------

def test_width_grid_groups_and_slabs():
    grid = width_grid(200, 40, 0.1, 4.0)
    assert 200 in grid and grid[0] == 20 and grid[-1] == 800 and grid == sorted(set(grid))
    groups = width_groups(grid)
    assert groups[0][0] == 0 and groups[-1][1] == len(grid)
    assert all(grid[end - 1] <= 2 * grid[start] for start, end in groups)
    assert slab_size(31, 10) == 512 and slab_size(4, 64) == 256
    storage = torch.arange(2 * 3 * 512.0).view(2, 3, 512)
    view = slab_view(storage, 31, 10)
    assert view.shape == (2, 3, 31, 10) and view.data_ptr() == storage.data_ptr()
    assert view[1, 2, 0, 0] == (1 * 3 + 2) * 512
    rows = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # widths 1 and 2 of 3 rows, 2 columns, slab 8
    assert slab_mask(rows, 2, 8).tolist() == [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]


def test_sweep_loss_golden_values():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # (1 width, 2 samples, K = 2)
    labels = torch.tensor([0, 1])
    assert sweep_loss(pred, labels, "mse", 2).item() == pytest.approx((0.0 + 1.0) / 2)
    expected_ce = (math.log(1 + math.exp(-1.0)) + math.log(2.0)) / 2
    assert sweep_loss(pred, labels, "cross_entropy", 2).item() == pytest.approx(expected_ce)
    regression = sweep_loss(torch.tensor([[[1.0], [3.0]]]), torch.tensor([[0.0], [1.0]]), "mse", 0)
    assert regression.item() == pytest.approx((1.0 + 4.0) / 2)


def test_threshold_summary_peak_to_valley():
    widths = np.array([10, 20, 40, 80, 100, 120, 200, 400])
    error = np.array([0.5, 0.3, 0.35, 0.6, 0.9, 0.7, 0.4, 0.3])
    kappa = np.array([2, 3, 5, 20, 1000, 30, 8, 4.0])
    summary = threshold_summary(widths, 100, error, error / 10, kappa, window=1.5)
    assert summary["peak_width"] == 100 and summary["valley_width"] == 20
    assert summary["peak_to_valley"] == pytest.approx(0.9 / 0.3)
    assert summary["kappa_argmax_width"] == 100 and summary["train_loss_at_threshold"] == pytest.approx(0.09)
    monotone = threshold_summary(widths, 100, np.linspace(0.9, 0.1, 8), error, kappa, window=1.5)
    assert monotone["peak_to_valley"] <= 1.0


# -- Lightning runs --------------------------------------------------------------------------------------

def _fit(tmp_path: Path, config: Path, name: str, *overrides: str):
    # the configs checkpoint into the repository's runs/: a test keeps its checkpoints in its own folder
    args = ["fit", "--config", str(config), "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.logger.init_args.name", name, "--checkpoint.dirpath", str(tmp_path / name / "checkpoints"),
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *overrides]
    return cli.main(args)


def _config(stem: str) -> Path:
    return next(c for c in CONFIGS if c.stem == stem)


TINY = ("--data.init_args.n_train", "60", "--data.init_args.n_test", "200", "--model.init_args.num_seeds", "2")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_fits_end_to_end(tmp_path, config):
    steps = "1" if "closed_form" in config.stem else "4"
    run = _fit(tmp_path, config, config.stem, *TINY, "--model.init_args.num_widths", "6",
               "--trainer.max_steps", steps, "--model.init_args.eval_every_n_steps", "2")
    log_dir = Path(run.trainer.log_dir)
    for name in ("width_sweep.csv", "width_sweep.json", "width_sweep.png", "summary.json", "config.yaml"):
        assert (log_dir / name).is_file(), name
    assert list(log_dir.glob("events.out.tfevents.*"))
    result = json.loads((log_dir / "width_sweep.json").read_text())
    widths = result["widths"]
    assert len(widths) >= 5 and len(result["median"]["test_error"]) == len(widths)
    upper = 1.0 if result["config"]["data"]["num_classes"] else math.inf  # error rate, or MSE for regression
    assert all(0.0 <= e <= upper for e in result["median"]["test_error"])
    summary = json.loads((log_dir / "summary.json").read_text())
    fit = summary["stages"]["fit"]
    assert fit["metrics"]["sweep/threshold"] == pytest.approx(result["threshold"])
    assert fit["metrics"]["sweep/peak_to_valley"] == pytest.approx(result["summary"]["peak_to_valley"])
    assert fit["data"]["n_train"] == 60
    assert not summary["warnings"]  # RunSummary saw the parameters change
    rows = (log_dir / "width_sweep.csv").read_text().strip().splitlines()
    assert len(rows) == len(widths) + 1


def test_closed_form_run_interpolates_above_threshold_and_kappa_peaks_there(tmp_path):
    run = _fit(tmp_path, _config("rf_closed_form"), "cf", *TINY, "--model.init_args.widths", "[10, 30, 59, 60, 61, 90, 240]")
    result = run.model.result
    train_loss = dict(zip(result["widths"], result["median"]["train_loss"]))
    assert train_loss[90] < 1e-12 and train_loss[240] < 1e-12 and train_loss[30] > 0.05
    assert result["summary"]["kappa_argmax_width"] == 60
    assert result["summary"]["peak_width"] == 60


@pytest.mark.parametrize("solver", ["min_norm", "ridge"])
def test_closed_form_batchnorm_is_evaluated_with_the_statistics_it_was_fitted_with(tmp_path, solver):
    """Closed-form batch norm is full-batch batch norm: the readout is fitted on features normalised with
    the training set's statistics, so it must be evaluated with them too, giving exactly the curves of
    ``standardize`` (not those of the untouched running statistics 0/1)."""
    common = (*TINY, "--model.init_args.widths", "[10, 30, 90]", "--model.init_args.solver", solver)
    runs = {norm: _fit(tmp_path, _config("rf_closed_form"), norm, *common, "--model.init_args.normalization", norm)
            for norm in ("standardize", "batchnorm")}
    for key in ("train_loss", "test_loss", "test_error", "readout_norm", "kappa"):
        np.testing.assert_allclose(runs["batchnorm"].model.result["median"][key],
                                   runs["standardize"].model.result["median"][key], rtol=1e-9, atol=1e-12,
                                   err_msg=key)
    if solver == "min_norm":
        assert runs["batchnorm"].model.result["median"]["train_loss"][-1] < 1e-12  # interpolates above n
    model = runs["batchnorm"].model  # the checkpointed running statistics are the ones used
    torch.testing.assert_close(model.running_mean.double(), model.feature_mean.flatten(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.sqrt(model.running_var.double() + 1e-5), model.feature_std.flatten(),
                               rtol=1e-6, atol=1e-6)


def _per_seed(run, width: int) -> dict[str, np.ndarray]:
    index = run.model.widths.index(width)
    return {k: np.asarray(v)[:, index] for k, v in run.model.result["per_seed"].items()}


@pytest.mark.parametrize("case", ["rf_sgd_minibatch_batchnorm", "rf_adamw8bit", "two_layer_adam"])
def test_vectorised_widths_equal_one_width_trained_alone(tmp_path, case):
    """Same seed, same batches: width 30 inside a grid of widths trains as width 30 alone, to float32
    round-off (the grid's matmuls sum in another order).

    With 8-bit optimizer state a round-off difference can move a value to the neighbouring quantization code,
    and over the steps such jumps grow to the size of the effect under test (2e-3 on one CPU, where widths
    sharing blocks give 5e-3). So there width 30 has a group of its own ([7, 30, 120]): its matmuls have the
    shapes they have alone, the same round-off, and any difference left is the blocks'."""
    rtol, widths = 1e-5, "[7, 30, 45, 120]"
    if case == "rf_sgd_minibatch_batchnorm":
        config, extra = _config("rf_sgd"), ("--data.init_args.batch_size", "16", "--model.init_args.normalization",
                                            "batchnorm")
    elif case == "rf_adamw8bit":
        pytest.importorskip("bitsandbytes")
        config = _config("rf_sgd")
        # min_8bit_size=1: the lone width's small tensor gets 8-bit state too, as inside the grid
        extra = ("--model.init_args.optimizer", json.dumps({
            "class_path": "bitsandbytes.optim.AdamW8bit",
            "init_args": {"lr": 0.01, "weight_decay": 0.0, "min_8bit_size": 1}}),)
        widths = "[7, 30, 120]"
    else:
        config, extra = _config("two_layer_adam"), ("--data.init_args.batch_size", "20")
    common = (*TINY, "--trainer.max_steps", "12", "--model.init_args.eval_every_n_steps", "0", *extra)
    grid = _fit(tmp_path, config, "grid", *common, "--model.init_args.widths", widths)
    alone = _fit(tmp_path, config, "alone", *common, "--model.init_args.widths", "[30]")
    in_grid, by_itself = _per_seed(grid, 30), _per_seed(alone, 30)
    for key in ("train_loss", "test_loss", "test_error", "readout_norm"):
        np.testing.assert_allclose(in_grid[key], by_itself[key], rtol=rtol, atol=1e-7, err_msg=key)
    if case == "rf_adamw8bit":
        for run in (grid, alone):  # the state really is 8-bit in both runs
            state = run.trainer.optimizers[0].state[run.model.readout_slabs]
            assert state["state1"].dtype == torch.uint8
        # rows of the grid's readout beyond width 30 share its live blocks, where the 8-bit state of a zero
        # gradient moves them: they are held at zero (the readout norm above counts every row)
        own_rows = 30 + grid.model.bias_rows
        assert not grid.model.readout[:, grid.model.widths.index(30), own_rows:].any()
    assert not np.allclose(_per_seed(grid, 120)["train_loss"], in_grid["train_loss"])  # widths do differ
    assert np.all(in_grid["train_loss"] < _per_seed(grid, 7)["train_loss"])  # and something was learned


# -- data ------------------------------------------------------------------------------------------------

def test_digits_split_and_label_noise():
    data = DigitsData(n_train=100, n_test=50, label_noise=0.3, seed=1).sweep_tensors()
    clean = DigitsData(n_train=100, n_test=50, label_noise=0.0, seed=1).sweep_tensors()
    assert data.x_train.shape == (100, 64) and data.x_test.shape == (50, 64)
    assert (data.y_train != clean.y_train).float().mean().item() == pytest.approx(0.3)
    assert torch.equal(data.y_test, clean.y_test)
    labels = corrupt_labels(np.arange(10).repeat(10), 10, 0.5, 0, "test")
    assert (labels != np.arange(10).repeat(10)).mean() == 0.5


def test_teacher_data_is_noise_free_on_test():
    data = TeacherData(teacher="linear", n_train=50, n_test=100, input_dim=8, noise_std=0.0, seed=2).sweep_tensors()
    beta_hat, _ = closed_form_readout(data.x_train.double(), data.y_train.double(), "min_norm")
    np.testing.assert_allclose((data.x_test.double() @ beta_hat).numpy(), data.y_test.double().numpy(), atol=1e-4)
    rf = TeacherData(teacher="random_features", n_train=50, n_test=400, signal=2.0).sweep_tensors()
    assert rf.y_test.std(unbiased=False).item() == pytest.approx(2.0, rel=1e-4) and rf.num_classes == 0


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="n_train"):
        DigitsData(n_train=1800)
    with pytest.raises(ValueError, match="label_noise"):
        DigitsData(label_noise=1.5)
    with pytest.raises(ValueError, match="widths is empty"):
        RandomFeatureSweep(widths=[])
    with pytest.raises(ValueError, match="widths must be positive"):
        TwoLayerSweep(widths=[0, 5])
    with pytest.raises(ValueError, match="loss: mse"):
        RandomFeatureSweep(solver="min_norm", loss="cross_entropy")
    with pytest.raises(ValueError, match="batch_size"):
        DigitsData(n_train=50, batch_size=64).sweep_tensors()


def test_torchvision_data_without_torchvision_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails, as when it is not installed
    with pytest.raises(ImportError, match="torchvision"):
        TorchvisionData(dataset="mnist", root="/nonexistent").sweep_tensors()


def test_torchvision_data_reads_local_dataset_objects(monkeypatch):
    """The adapter reads ``.data``/``.targets`` as torchvision's MNIST (tensors) and CIFAR10 (arrays) hold them."""
    class FakeMNIST:
        def __init__(self, root, train, download):
            assert download is False
            count = 300 if train else 100
            self.data = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8)
            self.targets = torch.arange(count) % 10

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            raise RuntimeError("Dataset not found or corrupted.")

    datasets = types.SimpleNamespace(MNIST=FakeMNIST, CIFAR10=FakeCIFAR10)
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(datasets=datasets))
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    data = TorchvisionData(dataset="mnist", n_train=120, n_test=40, label_noise=0.1).sweep_tensors()
    assert data.x_train.shape == (120, 784) and data.x_test.shape == (40, 784) and data.num_classes == 10
    with pytest.raises(FileNotFoundError, match="cifar10"):
        TorchvisionData(dataset="cifar10", root="/nonexistent").sweep_tensors()
    with pytest.raises(ValueError, match="n_train"):
        TorchvisionData(dataset="mnist", n_train=301).sweep_tensors()
