"""Width sweeps: the optimization view of model-wise double descent (Liu & Flanigan, arXiv 2312.03951).

The claim under test: the test-error peak at the interpolation threshold appears only when the optimizer
reaches a low enough training loss there, and initialization, normalization, batch size, learning rate
and the optimizer act through the condition number kappa of the training problem.

Two models, each training a whole grid of widths (and several seeds) in ONE Lightning run:

- ``RandomFeatureSweep``: frozen first layer W0 with N(0, 1/d) entries, features act(X W0) (tanh or ReLU),
  optional feature normalization, a trained readout. Width P uses the first P columns of one W0 per seed
  (nested prefixes). The readouts of all widths and seeds are one parameter, viewed as
  (seeds, widths, P_max, K), whose rows beyond each width are masked to zero. Threshold: P = n (each output
  is its own least-squares problem with P unknowns and n equations). Solvers: min-norm pseudo-inverse
  (float64, explicit rcond), ridge, or the configured optimizer for ``trainer.max_steps`` steps.
- ``TwoLayerSweep``: both layers trained, init scale configurable, same masking. Threshold: P(d + K) = nK
  trained parameters.

A training step is one batched matmul per group of widths within a factor 2 of each other (each group cut
at its own largest width), so masking costs at most 2x the compute of the unmasked widths.

Widths never interact: the training objective is the sum of the per-width, per-seed losses, so each
width's gradient is exactly the gradient of its own loss, and elementwise optimizers (SGD, Adam) update it
exactly as if it were trained alone. (Gradient clipping by global norm would couple them; leave
``trainer.gradient_clip_val`` unset.) Each (seed, width) slab of a parameter starts on a multiple of 256
elements, so blockwise 8-bit optimizers (bitsandbytes) never share a quantization block between two
widths either. The entries a width does not have (rows beyond it, block padding) get zero gradient, but
an 8-bit optimizer can still move them (its quantized zero state need not dequantize to exactly 0), so
under a bitsandbytes optimizer they are set back to zero after every training batch (elsewhere that would
cost 13% of a sweep's time for nothing).

At every width the run reports train loss, test loss, test error, kappa of the training feature matrix,
readout norm and trained-parameter count: medians over seeds, written to ``width_sweep.csv``,
``width_sweep.json`` and ``width_sweep.png`` in the logger's log dir and logged to TensorBoard (scalars
with the width as the step, and a figure with the threshold marked).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from modules.base import TrainableModule

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu}
QUANTIZATION_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer state block size
BATCHNORM_EPS = 1e-5
METRICS = ("train_loss", "test_loss", "test_error", "kappa", "readout_norm")


# ==================================================================================================
# Pure functions
# ==================================================================================================

def width_grid(threshold: float, num: int, min_ratio: float, max_ratio: float) -> list[int]:
    """About ``num`` log-spaced integer widths from ``min_ratio``x to ``max_ratio``x the threshold width,
    always including the threshold itself (rounded), since that is where the peak is expected."""
    if num < 1:
        raise ValueError(f"num_widths must be at least 1, got {num}")
    if not 0 < min_ratio <= max_ratio:
        raise ValueError(f"need 0 < width_min_ratio <= width_max_ratio, got {min_ratio} and {max_ratio}")
    grid = np.geomspace(min_ratio * threshold, max_ratio * threshold, num)
    widths = {max(1, int(round(w))) for w in grid}
    if min_ratio <= 1.0 <= max_ratio:
        widths.add(max(1, int(round(threshold))))
    return sorted(widths)


def slab_size(rows: int, cols: int, block: int = QUANTIZATION_BLOCK) -> int:
    """Elements of one (seed, width) slab holding a (rows, cols) matrix, rounded up to whole blocks."""
    return -(-rows * cols // block) * block


def slab_view(slabs: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """View (..., slab) storage as (..., rows, cols) matrices; the block padding at each slab's end is
    never read and gets zero gradient."""
    return slabs[..., :rows * cols].unflatten(-1, (rows, cols))


def slab_mask(row_mask: torch.Tensor, cols: int, slab: int) -> torch.Tensor:
    """1 on the entries each width has, 0 elsewhere: (widths, slab) slab storage of (widths, rows) row masks
    times ``cols`` columns; the block padding is 0."""
    mask = torch.zeros(row_mask.shape[0], slab)
    mask[:, :row_mask.shape[1] * cols] = row_mask.repeat_interleave(cols, dim=1)
    return mask


def width_groups(widths: list[int], max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Split sorted widths into consecutive index ranges whose largest width is at most ``max_ratio`` times
    the smallest. Each group is computed at its own largest width, so masking wastes at most a factor
    ``max_ratio`` of compute instead of P_max / P_min over the whole grid."""
    groups, start = [], 0
    for index in range(1, len(widths) + 1):
        if index == len(widths) or widths[index] > max_ratio * widths[start]:
            groups.append((start, index))
            start = index
    return groups


def nested_gaussian(seed: int, stream: int, rows: int, cols: int) -> torch.Tensor:
    """Standard normal (rows, cols) in float64 whose first k rows do not depend on ``rows``: numpy's
    Generator fills in C order one value after another, so a width-P model drawn alone gets exactly the
    first P rows of the widest model's draw (nested prefixes). ``stream`` separates W0, init, ..."""
    return torch.from_numpy(np.random.default_rng([seed, stream]).standard_normal((rows, cols)))


def random_features(x: torch.Tensor, w0: torch.Tensor, activation: str) -> torch.Tensor:
    """Z = act(X W0) for X (n, d) and W0 (d, P)."""
    return ACTIVATIONS[activation](x @ w0)


def column_stats(z: torch.Tensor, eps: float = BATCHNORM_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and std (biased, as batch norm uses in training) over the rows (dim -2)."""
    mean = z.mean(-2)
    return mean, torch.sqrt(z.var(-2, unbiased=False) + eps)


def condition_number(z: torch.Tensor) -> float:
    """kappa = sigma_max / sigma_min over the min(n, P) singular values of Z, in float64. It is infinite
    when Z is rank deficient; near P = n the smallest singular value collapses and kappa peaks."""
    s = torch.linalg.svdvals(z.double())
    return float(s[0] / s[-1]) if s[-1] > 0 else math.inf


def two_layer_jacobian_gram(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                            activation: str) -> torch.Tensor:
    """Gram matrix J J^T (nK x nK, rows ordered (sample, output)) of the Jacobian of f(x) = act(x W1^T) W2
    with respect to all trained parameters (W1: P x d, W2: P x K), in closed form:
    G[(i,k),(j,l)] = [k = l] h_i.h_j + (x_i.x_j) sum_p W2[p,k] W2[p,l] act'(a_ip) act'(a_jp).
    Its condition number is that of the linearised least-squares problem, which is square at P (d + K) = nK."""
    x, first, second = x.double(), first.double(), second.double()
    pre = x @ first.T
    hidden = ACTIVATIONS[activation](pre)
    slope = 1.0 - hidden ** 2 if activation == "tanh" else (pre > 0).to(pre.dtype)
    n, k = x.shape[0], second.shape[1]
    eye, ones = torch.eye(k, dtype=x.dtype, device=x.device), torch.ones(k, k, dtype=x.dtype, device=x.device)
    readout_part = torch.kron(hidden @ hidden.T, eye)
    mixed = (slope[:, None, :] * second.T[None, :, :]).reshape(n * k, -1)  # [(i,k), p] = act'(a_ip) W2[p,k]
    return readout_part + (mixed @ mixed.T) * torch.kron(x @ x.T, ones)


def gram_condition_number(gram: torch.Tensor, rank: int) -> float:
    """kappa of J from the Gram J J^T: sqrt of the ratio of its largest to its ``rank``-th largest
    eigenvalue (rank = min(rows, columns) of J). Float64 eigenvalues resolve kappa up to about 1e7."""
    eigenvalues = torch.linalg.eigvalsh(gram.double()).flip(0)[:rank]
    return float(torch.sqrt(eigenvalues[0] / eigenvalues[-1])) if eigenvalues[-1] > 0 else math.inf


def closed_form_readout(z: torch.Tensor, y: torch.Tensor, solver: str, rcond: float = 1e-12,
                        ridge_alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares readout W (P, K) for features Z (n, P) and targets Y (n, K), in float64, from one SVD.

    ``min_norm``: W = pinv(Z) Y, dropping singular values below ``rcond`` * sigma_max (explicit, because
    the peak height at P = n depends on it). ``ridge``: minimiser of mean_i |z_i W - y_i|^2 + alpha |W|^2,
    i.e. W = V diag(s / (s^2 + n alpha)) U^T Y. Returns W and the singular values of Z (descending).
    """
    z, y = z.double(), y.double()
    u, s, vh = torch.linalg.svd(z, full_matrices=False)
    if solver == "min_norm":
        keep = s > rcond * s[0]
        inverse = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
    elif solver == "ridge":
        inverse = s / (s * s + z.shape[0] * ridge_alpha)
    else:
        raise ValueError(f"closed-form solver must be 'min_norm' or 'ridge', got {solver!r}")
    return vh.T @ (inverse[:, None] * (u.T @ y)), s


def sweep_loss(pred: torch.Tensor, target: torch.Tensor, loss: str, num_classes: int) -> torch.Tensor:
    """Mean per-sample loss over the sample dim (-2) of ``pred`` (..., B, K), one value per leading index.

    ``mse``: squared error summed over the K outputs (one-hot targets for classification), averaged over
    samples. ``cross_entropy``: softmax cross-entropy on integer labels (classification only).
    """
    if loss == "mse":
        if num_classes > 0:
            target = F.one_hot(target, num_classes).to(pred.dtype)
        return ((pred - target.to(pred.dtype)) ** 2).sum(-1).mean(-1)
    if loss == "cross_entropy":
        if num_classes == 0:
            raise ValueError("loss 'cross_entropy' needs class labels; this data is regression, use loss: mse")
        labels = target.expand(pred.shape[:-1]).reshape(-1)
        per_sample = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), labels, reduction="none")
        return per_sample.reshape(pred.shape[:-1]).mean(-1)
    raise ValueError(f"loss must be 'mse' or 'cross_entropy', got {loss!r}")


def sweep_test_error(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Misclassification rate for classification; mean squared error for regression (then the test error
    and the MSE test loss coincide)."""
    if num_classes > 0:
        return (pred.argmax(-1) != target).to(pred.dtype).mean(-1)
    return sweep_loss(pred, target, "mse", 0)


def isotropic_min_norm_risk(gamma: float, signal2: float, noise2: float) -> float:
    """Asymptotic excess risk E|beta_hat - beta|^2 of min-norm least squares on isotropic data with
    gamma = p / n, |beta|^2 = r^2 and noise variance sigma^2 (Hastie, Montanari, Rosset, Tibshirani 2019):
    sigma^2 gamma / (1 - gamma) below the threshold, r^2 (1 - 1/gamma) + sigma^2 / (gamma - 1) above."""
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    if gamma == 1.0:
        return math.inf if noise2 > 0 else 0.0
    if gamma < 1.0:
        return noise2 * gamma / (1.0 - gamma)
    return signal2 * (1.0 - 1.0 / gamma) + noise2 / (gamma - 1.0)


def threshold_summary(widths: np.ndarray, threshold: float, test_error: np.ndarray, train_loss: np.ndarray,
                      kappa: np.ndarray, window: float, test_loss: np.ndarray | None = None) -> dict[str, float]:
    """Headline numbers of one sweep (median curves in, scalars out).

    Near the threshold means widths in [threshold / window, threshold * window]. The peak is the largest
    test error there; the valley is the smallest test error at widths below that window (the classical
    under-parameterised optimum). ``peak_to_valley`` > 1 means the curve rises into the threshold; a
    monotone curve gives <= 1. "At threshold" values use the grid width closest to the threshold (in log).
    With ``test_loss``, ``loss_peak_to_valley`` is the same ratio for the test loss.
    """
    widths = np.asarray(widths, dtype=float)
    at = int(np.argmin(np.abs(np.log(widths / threshold))))
    near = (widths >= threshold / window) & (widths <= threshold * window)
    left = widths < threshold / window
    out: dict[str, float] = {"threshold": float(threshold), "width_at_threshold": float(widths[at]),
                             "train_loss_at_threshold": float(train_loss[at]),
                             "test_error_at_threshold": float(test_error[at]),
                             "kappa_at_threshold": float(kappa[at]),
                             "kappa_argmax_width": (float(widths[int(np.nanargmax(kappa))])
                                                    if (~np.isnan(kappa)).any() else math.nan),
                             "min_test_error": float(np.min(test_error)),
                             "min_test_error_width": float(widths[int(np.argmin(test_error))])}
    peak = int(np.flatnonzero(near)[np.argmax(test_error[near])]) if near.any() else at
    out.update(peak_width=float(widths[peak]), peak_test_error=float(test_error[peak]))
    if left.any():
        valley = int(np.flatnonzero(left)[np.argmin(test_error[left])])
        out.update(valley_width=float(widths[valley]), valley_test_error=float(test_error[valley]),
                   peak_to_valley=float(test_error[peak] / test_error[valley]) if test_error[valley] > 0 else math.inf)
    else:
        out.update(valley_width=math.nan, valley_test_error=math.nan, peak_to_valley=math.nan)
    if test_loss is not None:
        test_loss = np.asarray(test_loss, dtype=float)
        peak_loss = test_loss[near].max() if near.any() else test_loss[at]
        out["loss_peak_to_valley"] = float(peak_loss / test_loss[left].min()) if left.any() else math.nan
    return out


def plot_width_sweep(result: dict[str, Any], title: str = ""):
    """Median curves (with the test error's interquartile band) against width, threshold marked.
    Uses matplotlib's object API (no pyplot state), so it is safe in any process."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    widths = np.asarray(result["widths"], dtype=float)
    median, seeds = result["median"], result["per_seed"]
    error = np.asarray(median["test_error"], dtype=float)
    spread = np.nanmax(error) / max(np.nanmin(error), 1e-300)  # regression peaks can be 100x: use a log axis
    fig = Figure(figsize=(13, 3.4), layout="constrained")
    axes = fig.subplots(1, 4)
    panels = (("test_error", "test error", bool(spread > 20)), ("train_loss", "train loss", True),
              ("kappa", "kappa(train features)", True), ("readout_norm", "readout norm", True))
    for ax, (key, label, log_y) in zip(axes, panels):
        ax.plot(widths, median[key], marker="o", ms=2.5, lw=1.2, label="median")
        if key == "test_error":
            per_seed = np.asarray(seeds[key], dtype=float)
            ax.fill_between(widths, np.quantile(per_seed, 0.25, axis=0), np.quantile(per_seed, 0.75, axis=0),
                            alpha=0.25, label="IQR over seeds")
            ax.plot(widths, median["test_loss"], lw=0.8, ls=":", label="test loss")
        ax.axvline(result["threshold"], color="k", ls="--", lw=0.8, label="interpolation threshold")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("width P")
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def render_figure(fig, dpi: int = 100) -> np.ndarray:
    """Draw a matplotlib figure once into an RGB array (H, W, 3) of uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(image: np.ndarray, path: Path) -> None:
    from matplotlib.image import imsave

    imsave(path, image)


# ==================================================================================================
# Lightning modules
# ==================================================================================================

class WidthSweepModule(TrainableModule):
    """What both sweep models share: the width grid, seeds, evaluation at every width, and the outputs.

    Args:
        widths: explicit width grid; null builds a log-spaced grid around the threshold from
            ``num_widths``, ``width_min_ratio`` and ``width_max_ratio`` (ratios to the threshold width).
        num_seeds: independent initialisations (W0, init), trained side by side; medians are reported.
        seed: first model seed (seeds are ``seed .. seed + num_seeds - 1``). The data seed is the data module's.
        loss: ``mse`` (one-hot targets for classification) or ``cross_entropy``.
        eval_every_n_steps: also evaluate all widths every this many steps (0: only at the end); the
            curves at each evaluation are kept in the JSON as ``history``.
        threshold_window: widths within this factor of the threshold count as "near" it (peak search).
    """

    closed_form_solvers: tuple[str, ...] = ()

    def __init__(self, widths: list[int] | None = None, num_widths: int = 40, width_min_ratio: float = 0.1,
                 width_max_ratio: float = 4.0, num_seeds: int = 5, seed: int = 0,
                 activation: Literal["tanh", "relu"] = "tanh", loss: Literal["mse", "cross_entropy"] = "mse",
                 eval_every_n_steps: int = 0, threshold_window: float = 1.5,
                 optimizer: OptimizerCallable = torch.optim.SGD, lr_scheduler: LRSchedulerCallable | None = None):
        super().__init__(optimizer, lr_scheduler)
        owner = type(self).__name__
        if widths is not None:
            if len(widths) == 0:
                raise ValueError(f"{owner}: widths is empty; list at least one width or leave it null for the automatic grid")
            if any(int(w) != w or w < 1 for w in widths):
                raise ValueError(f"{owner}: widths must be positive integers, got {widths}")
        else:
            width_grid(1.0, num_widths, width_min_ratio, width_max_ratio)  # validates the grid fields now
        if num_seeds < 1:
            raise ValueError(f"{owner}: num_seeds must be at least 1, got {num_seeds}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{owner}: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if loss not in ("mse", "cross_entropy"):
            raise ValueError(f"{owner}: loss must be 'mse' or 'cross_entropy', got {loss!r}")
        if eval_every_n_steps < 0:
            raise ValueError(f"{owner}: eval_every_n_steps must be >= 0, got {eval_every_n_steps}")
        if threshold_window < 1:
            raise ValueError(f"{owner}: threshold_window must be >= 1, got {threshold_window}")
        self.requested_widths = sorted({int(w) for w in widths}) if widths is not None else None
        self.num_widths, self.width_min_ratio, self.width_max_ratio = num_widths, width_min_ratio, width_max_ratio
        self.num_seeds, self.seed, self.activation, self.loss_name = num_seeds, seed, activation, loss
        self.eval_every_n_steps, self.threshold_window = eval_every_n_steps, threshold_window
        self.widths: list[int] = []
        self.threshold = math.nan
        self.data_info: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.result: dict[str, Any] | None = None
        self.absent_entries_can_move = False  # set when training starts, from the optimizer

    # -- what each model defines ---------------------------------------------------------------------
    def interpolation_threshold(self, data) -> float:
        """Width at which the number of trained parameters per output equals the equations."""
        raise NotImplementedError

    def build(self, data) -> None:
        """Create parameters and buffers for ``self.widths`` (called once, with the data)."""
        raise NotImplementedError

    def predict_seed(self, split: str, seed_index: int) -> torch.Tensor:
        """Float64 predictions (widths, samples, K) of every width of one seed on ``split``."""
        raise NotImplementedError

    def train_feature_matrix(self, seed_index: int, width_index: int) -> torch.Tensor:
        """The (n, P) training feature matrix whose condition number is reported."""
        raise NotImplementedError

    def trained_parameter_count(self, width: int) -> int:
        """Trained parameters of one model of this width."""
        raise NotImplementedError

    def readout_norms(self) -> torch.Tensor:
        """|readout| per (seed, width)."""
        raise NotImplementedError

    def slab_masks(self) -> dict[str, torch.Tensor]:
        """Each trained slab parameter's name and its ``slab_mask`` (widths, slab), in the parameter's dtype."""
        raise NotImplementedError

    # -- set-up ------------------------------------------------------------------------------------------
    @property
    def solver_is_closed_form(self) -> bool:
        return getattr(self, "solver", "gradient") in self.closed_form_solvers

    def _sweep_data(self):
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "sweep_tensors"):
            raise TypeError(f"{type(self).__name__} needs a width-sweep data module (DigitsData, TeacherData, "
                            f"TorchvisionData from datamodules/width_data.py), got {type(datamodule).__name__}")
        return datamodule.sweep_tensors()

    def configure_model(self) -> None:
        if self.widths:
            return
        data = self._sweep_data()
        if self.loss_name == "cross_entropy" and data.num_classes == 0:
            raise ValueError(f"{type(self).__name__}: loss 'cross_entropy' needs class labels but {data.name} is "
                             "regression; use loss: mse")
        self.data_info = data.describe()
        self.threshold = float(self.interpolation_threshold(data))
        self.widths = self.requested_widths or width_grid(self.threshold, self.num_widths, self.width_min_ratio,
                                                          self.width_max_ratio)
        self.num_classes, self.num_outputs = data.num_classes, data.num_outputs
        self.groups = width_groups(self.widths)
        self.register_buffer("x_train", data.x_train.double(), persistent=False)
        self.register_buffer("y_train", data.y_train, persistent=False)
        self.register_buffer("x_test", data.x_test.double(), persistent=False)
        self.register_buffer("y_test", data.y_test, persistent=False)
        self.build(data)

    def split_tensors(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)

    def configure_optimizers(self):
        if self.solver_is_closed_form:
            return None  # the closed form is solved in the first training step; nothing to optimise
        return super().configure_optimizers()

    # -- evaluation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, with_kappa: bool) -> dict[str, np.ndarray]:
        """Per-seed, per-width metrics, each an array (seeds, widths), computed in float64."""
        shape = (self.num_seeds, len(self.widths))
        out = {name: np.full(shape, math.nan) for name in METRICS}
        for s in range(self.num_seeds):
            for split in ("train", "test"):
                pred = self.predict_seed(split, s)
                _, target = self.split_tensors(split)
                loss = sweep_loss(pred, target, self.loss_name, self.num_classes)
                out[f"{split}_loss"][s] = loss.cpu().numpy()
                if split == "test":
                    out["test_error"][s] = sweep_test_error(pred, target, self.num_classes).cpu().numpy()
            if with_kappa:
                out["kappa"][s] = self.condition_numbers(s)
        out["readout_norm"] = self.readout_norms().double().cpu().numpy()
        return out

    def condition_numbers(self, seed_index: int) -> np.ndarray:
        return np.array([condition_number(self.train_feature_matrix(seed_index, w)) for w in range(len(self.widths))])

    def summarize(self, per_seed: dict[str, np.ndarray]) -> dict[str, Any]:
        median = {name: np.median(values, axis=0) for name, values in per_seed.items()}
        headline = threshold_summary(np.array(self.widths), self.threshold, median["test_error"],
                                     median["train_loss"], median["kappa"], self.threshold_window,
                                     test_loss=median["test_loss"])
        return {"widths": list(self.widths), "threshold": self.threshold,
                "params": [self.trained_parameter_count(w) for w in self.widths],
                "median": {k: v.tolist() for k, v in median.items()},
                "per_seed": {k: v.tolist() for k, v in per_seed.items()}, "summary": headline}

    @torch.no_grad()
    def zero_absent_entries(self) -> None:
        """Set every entry a width does not have back to zero (see the module docstring: 8-bit state)."""
        for name, mask in self.slab_masks().items():
            getattr(self, name).mul_(mask)

    def on_train_start(self) -> None:
        self.absent_entries_can_move = any(type(optimizer).__module__.split(".")[0] == "bitsandbytes"
                                           for optimizer in self.trainer.optimizers)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.absent_entries_can_move:
            self.zero_absent_entries()
        every = self.eval_every_n_steps
        if not every or self.global_step % every or self.solver_is_closed_form:
            return
        result = self.summarize(self.evaluate(with_kappa=False))
        self.history.append({"step": int(self.global_step),
                             **{k: result["median"][k] for k in ("train_loss", "test_loss", "test_error")}})
        headline = result["summary"]
        for key in ("test_error_at_threshold", "train_loss_at_threshold", "peak_to_valley", "min_test_error"):
            if math.isfinite(headline[key]):
                self.log(f"progress/{key}", headline[key])

    def on_train_end(self) -> None:
        self.result = self.summarize(self.evaluate(with_kappa=True))
        self.result["history"] = self.history
        self.result["steps"] = int(self.global_step)
        # self.log is not allowed in on_train_end; callbacks (RunSummary -> summary.json) read this dict.
        metrics = self.trainer.callback_metrics
        for key, value in self.result["summary"].items():
            if math.isfinite(value):
                metrics[f"sweep/{key}"] = torch.tensor(value, dtype=torch.float64)
        self.write_outputs(self.output_dir())  # asked on every process: trainer.log_dir is collective under DDP

    # -- outputs ---------------------------------------------------------------------------------------------
    def output_dir(self) -> Path | None:
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        return Path(log_dir) if log_dir else None

    def describe(self) -> dict[str, Any]:
        return {"model": type(self).__name__, "activation": self.activation, "loss": self.loss_name,
                "num_seeds": self.num_seeds, "seed": self.seed, "data": self.data_info}

    @rank_zero_only
    def write_outputs(self, out_dir: Path | None) -> None:
        result = self.result
        if out_dir is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        median, per_seed = result["median"], result["per_seed"]
        with open(out_dir / "width_sweep.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["width", "width_over_threshold", "params", *METRICS, "test_error_q25", "test_error_q75"])
            q25 = np.quantile(np.asarray(per_seed["test_error"]), 0.25, axis=0)
            q75 = np.quantile(np.asarray(per_seed["test_error"]), 0.75, axis=0)
            for i, width in enumerate(self.widths):
                writer.writerow([width, width / self.threshold, result["params"][i],
                                 *(median[name][i] for name in METRICS), q25[i], q75[i]])
        payload = _finite_or_null({"config": self.describe(), **result})
        (out_dir / "width_sweep.json").write_text(json.dumps(payload, indent=1))
        image = render_figure(plot_width_sweep(result, title=self.plot_title()))  # drawn once, used twice
        save_png(image, out_dir / "width_sweep.png")
        for logger in self.loggers:
            for i, width in enumerate(self.widths):
                logger.log_metrics({f"width/{name}": float(median[name][i]) for name in METRICS
                                    if math.isfinite(median[name][i])}, step=width)
            headline = {f"sweep/{k}": v for k, v in result["summary"].items() if isinstance(v, float) and math.isfinite(v)}
            logger.log_metrics(headline, step=int(self.global_step))
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # what add_figure does, without drawing the figure again
                experiment.add_image("width_sweep/curves", image, global_step=int(self.global_step), dataformats="HWC")
            logger.save()
        headline = result["summary"]
        rank_zero_info(f"[{type(self).__name__}] {len(self.widths)} widths x {self.num_seeds} seeds, threshold "
                       f"{self.threshold:g}: peak test error {headline['peak_test_error']:.4g} at P={headline['peak_width']:g} "
                       f"(peak-to-valley {headline['peak_to_valley']:.3g}), train loss at threshold "
                       f"{headline['train_loss_at_threshold']:.3g}, kappa at threshold {headline['kappa_at_threshold']:.3g}; "
                       f"curves in {out_dir / 'width_sweep.csv'}")

    def plot_title(self) -> str:
        return (f"{type(self).__name__} on {self.data_info.get('name')} (n={self.data_info.get('n_train')}), "
                f"{self.describe().get('solver', 'gradient')}, median of {self.num_seeds} seeds")


def _finite_or_null(value: Any) -> Any:
    """Strict JSON: infinite kappa (rank-deficient features) and NaN become null."""
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RandomFeatureSweep(WidthSweepModule):
    """Random-feature regression/classification over a grid of widths, all in one run.

    Args:
        solver: ``min_norm`` (pseudo-inverse, float64, explicit ``rcond``), ``ridge`` (``ridge_alpha``), or
            ``gradient`` (the configured optimizer for ``trainer.max_steps`` steps; a closed-form config
            needs ``trainer.max_steps: 1``, the single step that solves).
        normalization: of the frozen features: ``none``; ``standardize`` (each feature centred and scaled
            with full training-set statistics); ``batchnorm`` (torch batch norm without affine parameters:
            batch statistics while training, running statistics at evaluation; the closed-form solvers fit
            and evaluate with the full-training-set statistics, i.e. full-batch batch norm, so they agree
            with ``standardize``, and kappa uses them too). Centred features
            cannot represent a constant, so with either normalization the readout gets a bias, as a
            linear layer after batch norm has: the design matrix is [1, Z] and the threshold is P + 1 = n.
        feature_scale: ``inv_sqrt_width`` divides width P's features by sqrt(P) (the mean-field/NTK
            convention, so outputs stay O(1) at every width); ``none`` keeps act(X W0) as it is, so the
            widest model has the largest curvature and sets the stable learning rate.
        readout_init_scale: readout init N(0, scale^2) (0: zeros, from which gradient descent on the MSE
            stays in the row space of the features and converges to the min-norm solution).
    """

    closed_form_solvers = ("min_norm", "ridge")

    def __init__(self, solver: Literal["min_norm", "ridge", "gradient"] = "gradient",
                 normalization: Literal["none", "standardize", "batchnorm"] = "none",
                 feature_scale: Literal["inv_sqrt_width", "none"] = "none",
                 rcond: float = 1e-12, ridge_alpha: float = 1e-3, readout_init_scale: float = 0.0,
                 widths: list[int] | None = None, num_widths: int = 40, width_min_ratio: float = 0.1,
                 width_max_ratio: float = 4.0, num_seeds: int = 5, seed: int = 0,
                 activation: Literal["tanh", "relu"] = "tanh", loss: Literal["mse", "cross_entropy"] = "mse",
                 eval_every_n_steps: int = 0, threshold_window: float = 1.5,
                 optimizer: OptimizerCallable = torch.optim.SGD, lr_scheduler: LRSchedulerCallable | None = None):
        super().__init__(widths, num_widths, width_min_ratio, width_max_ratio, num_seeds, seed, activation, loss,
                         eval_every_n_steps, threshold_window, optimizer, lr_scheduler)
        if solver not in ("min_norm", "ridge", "gradient"):
            raise ValueError(f"RandomFeatureSweep: solver must be 'min_norm', 'ridge' or 'gradient', got {solver!r}")
        if normalization not in ("none", "standardize", "batchnorm"):
            raise ValueError("RandomFeatureSweep: normalization must be 'none', 'standardize' or 'batchnorm', "
                             f"got {normalization!r}")
        if feature_scale not in ("inv_sqrt_width", "none"):
            raise ValueError(f"RandomFeatureSweep: feature_scale must be 'inv_sqrt_width' or 'none', got {feature_scale!r}")
        if solver in self.closed_form_solvers and loss != "mse":
            raise ValueError(f"RandomFeatureSweep: solver {solver!r} minimises squared error; set loss: mse "
                             "(cross_entropy needs solver: gradient)")
        if not rcond > 0:
            raise ValueError(f"RandomFeatureSweep: rcond must be positive, got {rcond}")
        if ridge_alpha < 0 or readout_init_scale < 0:
            raise ValueError("RandomFeatureSweep: ridge_alpha and readout_init_scale must be non-negative")
        self.solver, self.normalization, self.feature_scale = solver, normalization, feature_scale
        self.rcond, self.ridge_alpha, self.readout_init_scale = rcond, ridge_alpha, readout_init_scale
        self.bias_rows = 0 if normalization == "none" else 1  # row 0 of the readout is the bias when present
        self.automatic_optimization = solver == "gradient"
        self._closed_form_kappa: np.ndarray | None = None

    def interpolation_threshold(self, data) -> float:
        return data.n_train - self.bias_rows

    def build(self, data) -> None:
        seeds, d, k = range(self.seed, self.seed + self.num_seeds), data.input_dim, data.num_outputs
        num_random = max(self.widths)
        readout_rows = num_random + self.bias_rows  # rows of the widest readout
        # W0 (seeds, d, P_max): width P uses the first P columns of each seed's draw.
        w0 = torch.stack([nested_gaussian(s, 0, num_random, d).T for s in seeds]) / math.sqrt(d)
        self.register_buffer("w0", w0, persistent=False)  # recomputed from the seeds, never trained
        raw = torch.stack([random_features(self.x_train, w0[s], self.activation) for s in range(self.num_seeds)])
        mean, std = column_stats(raw)
        self.register_buffer("feature_mean", mean, persistent=False)
        self.register_buffer("feature_std", std, persistent=False)
        if self.normalization == "batchnorm":
            self.register_buffer("running_mean", torch.zeros(self.num_seeds * num_random))
            self.register_buffer("running_var", torch.ones(self.num_seeds * num_random))
            train = raw  # normalised per batch in training_step
        else:
            train = self.design(self.normalize(raw, training_stats=True))
        self.register_buffer("train_features", train.float(), persistent=False)
        # Per (width, row) multiplier of the readout: 0 beyond the width, 1/sqrt(P) or 1 on its features,
        # 1 on the bias row.
        scale = torch.zeros(len(self.widths), readout_rows)
        for index, width in enumerate(self.widths):
            scale[index, :self.bias_rows] = 1.0
            scale[index, self.bias_rows:self.bias_rows + width] = (
                1.0 / math.sqrt(width) if self.feature_scale == "inv_sqrt_width" else 1.0)
        self.register_buffer("readout_scale", scale, persistent=False)
        dtype = torch.float64 if self.solver_is_closed_form else torch.float32
        slabs = torch.zeros(self.num_seeds, len(self.widths), slab_size(readout_rows, k), dtype=dtype)
        if self.readout_init_scale > 0:
            for i, s in enumerate(seeds):
                draw = nested_gaussian(s, 1, readout_rows, k) * self.readout_init_scale
                slab_view(slabs, readout_rows, k)[i] = draw.to(dtype) * (scale[:, :, None] > 0)
        self.readout_slabs = torch.nn.Parameter(slabs)
        self.register_buffer("readout_slab_mask", slab_mask((scale > 0).float(), k, slabs.shape[-1]).to(dtype),
                             persistent=False)

    def slab_masks(self) -> dict[str, torch.Tensor]:
        return {"readout_slabs": self.readout_slab_mask}

    @property
    def readout(self) -> torch.Tensor:
        """The readouts (seeds, widths, rows, K); rows beyond a width (and its bias) are zero."""
        return slab_view(self.readout_slabs, self.readout_scale.shape[1], self.num_outputs)

    def design(self, z: torch.Tensor) -> torch.Tensor:
        """Prepend the constant column of the bias (if any) to features (..., N, P)."""
        if not self.bias_rows:
            return z
        return torch.cat([torch.ones_like(z[..., :1]), z], dim=-1)

    def normalize(self, raw: torch.Tensor, training_stats: bool, seed_index: int | None = None) -> torch.Tensor:
        """Apply the feature normalization to raw features (seeds, N, P) or, with ``seed_index``, (N, P).
        ``training_stats`` uses the full training-set statistics also for batch norm (closed form, kappa)."""
        if self.normalization == "none":
            return raw
        # A closed-form readout was fitted on features normalised with the full training set's statistics
        # (full-batch batch norm); its running statistics are never updated by gradient steps, so it is
        # evaluated with the statistics it was fitted with.
        if self.normalization == "batchnorm" and not training_stats and not self.solver_is_closed_form:
            mean = self.running_mean.view(self.num_seeds, -1)
            std = torch.sqrt(self.running_var.view(self.num_seeds, -1) + BATCHNORM_EPS)
        else:
            mean, std = self.feature_mean, self.feature_std
        if seed_index is not None:
            mean, std = mean[seed_index], std[seed_index]
            return (raw - mean.to(raw.dtype)) / std.to(raw.dtype)
        return (raw - mean[:, None].to(raw.dtype)) / std[:, None].to(raw.dtype)

    def design_matrix(self, x: torch.Tensor, seed_index: int, training_stats: bool = False) -> torch.Tensor:
        """Float64 [1, normalized act(x W0)] of one seed at the widest width (N, rows), before width scaling."""
        raw = random_features(x.double(), self.w0[seed_index].double(), self.activation)
        return self.design(self.normalize(raw, training_stats, seed_index))

    def width_design(self, z: torch.Tensor, width_index: int) -> torch.Tensor:
        """The design matrix of one width: its first P (+ bias) columns, times the width's feature scale."""
        rows = self.widths[width_index] + self.bias_rows
        return z[:, :rows] * self.readout_scale[width_index, :rows].to(z.dtype)

    def effective_readout(self) -> torch.Tensor:
        return self.readout * self.readout_scale[None, :, :, None].to(self.readout.dtype)

    def grouped_predictions(self, z: torch.Tensor, readout: torch.Tensor) -> torch.Tensor:
        """z (..., B, rows) times every width's readout (..., widths, rows, K) -> (..., widths, B, K),
        one batched matmul per width group, each truncated to the group's largest width."""
        if z.dim() == 2:  # one seed
            return self.grouped_predictions(z[None], readout[None])[0]
        seeds, batch, k = z.shape[0], z.shape[1], readout.shape[-1]
        preds = []
        for start, end in self.groups:
            rows = self.widths[end - 1] + self.bias_rows
            # (seeds, rows, widths*K): all widths of the group in one matmul
            stacked = readout[:, start:end, :rows].permute(0, 2, 1, 3).reshape(seeds, rows, (end - start) * k)
            preds.append(torch.bmm(z[..., :rows], stacked).view(seeds, batch, end - start, k))
        return torch.cat(preds, dim=2).transpose(1, 2)

    # -- training -------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        if self.solver_is_closed_form:
            self.solve_closed_form()
            return None
        z = self.train_features[:, batch["index"]]  # (seeds, B, rows), precomputed frozen features
        if self.normalization == "batchnorm":
            seeds, rows, num_random = z.shape
            flat = z.transpose(0, 1).reshape(rows, seeds * num_random)
            flat = F.batch_norm(flat, self.running_mean, self.running_var, training=True, momentum=0.1,
                                eps=BATCHNORM_EPS)
            z = self.design(flat.reshape(rows, seeds, num_random).transpose(0, 1))
        pred = self.grouped_predictions(z, self.effective_readout())
        losses = sweep_loss(pred, batch["y"], self.loss_name, self.num_classes)  # (seeds, widths)
        self.log("train/loss", losses.mean(), prog_bar=True)
        return losses.sum()  # a sum keeps every width's gradient equal to its own loss's gradient

    @torch.no_grad()
    def solve_closed_form(self) -> None:
        targets = F.one_hot(self.y_train, self.num_classes).double() if self.num_classes > 0 else self.y_train.double()
        kappa = np.zeros((self.num_seeds, len(self.widths)))
        for s in range(self.num_seeds):
            z = self.design_matrix(self.x_train, s, training_stats=True)
            for w, width in enumerate(self.widths):
                weights, singular = closed_form_readout(self.width_design(z, w), targets, self.solver, self.rcond,
                                                        self.ridge_alpha)
                self.readout[s, w, :width + self.bias_rows] = weights.to(self.readout.dtype)
                kappa[s, w] = float(singular[0] / singular[-1]) if singular[-1] > 0 else math.inf
        self._closed_form_kappa = kappa
        if self.normalization == "batchnorm":
            # The saved running statistics describe the fitted model: full-batch batch norm on the training set.
            self.running_mean.copy_(self.feature_mean.flatten())
            self.running_var.copy_((self.feature_std ** 2 - BATCHNORM_EPS).flatten())
        self.trainer.should_stop = True

    # -- evaluation hooks -----------------------------------------------------------------------------------
    def predict_seed(self, split: str, seed_index: int) -> torch.Tensor:
        x, _ = self.split_tensors(split)
        z = self.design_matrix(x, seed_index)
        return self.grouped_predictions(z, self.effective_readout()[seed_index].double())

    def train_feature_matrix(self, seed_index: int, width_index: int) -> torch.Tensor:
        return self.width_design(self.design_matrix(self.x_train, seed_index, training_stats=True), width_index)

    def condition_numbers(self, seed_index: int) -> np.ndarray:
        if self._closed_form_kappa is not None:
            return self._closed_form_kappa[seed_index]
        z = self.design_matrix(self.x_train, seed_index, training_stats=True)
        return np.array([condition_number(self.width_design(z, w)) for w in range(len(self.widths))])

    def trained_parameter_count(self, width: int) -> int:
        return (width + self.bias_rows) * self.num_outputs

    def readout_norms(self) -> torch.Tensor:
        """|W1| of each (seed, width), without the bias row."""
        return self.readout.detach()[:, :, self.bias_rows:].double().flatten(2).norm(dim=-1)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "solver": self.solver, "normalization": self.normalization,
                "feature_scale": self.feature_scale, "bias": bool(self.bias_rows), "rcond": self.rcond,
                "ridge_alpha": self.ridge_alpha, "readout_init_scale": self.readout_init_scale}


class TwoLayerSweep(WidthSweepModule):
    """A two-layer network act(x W1) W2 with both layers trained, over a grid of hidden widths in one run.

    Init: W1 ~ N(0, init_scale^2 / d), W2 ~ N(0, init_scale^2 / P); nested prefixes of one draw per seed.
    No biases, so width P has P (d + K) trained parameters. Input directions absent from the training
    data (e.g. pixels that are 0 in every training digit) cannot move any output, so the threshold counts
    the parameters that can: P* = n K / (r + K) with r = rank(X_train) <= d. The readout norm is |W2|.

    Args:
        kappa: ``hidden_features``: kappa of the trained hidden-feature matrix act(X W1) (n x P), square at
            P = n rather than at P*; ``jacobian``: kappa of the Jacobian of all nK outputs with respect to all
            P (d + K) parameters at the trained weights, square at P*, from an nK x nK Gram matrix per width
            and seed (an eigendecomposition each: seconds per width for nK ~ 1000). Its rank is at most
            min(nK, P (r + K)); kappa is taken over that many singular values.
    """

    def __init__(self, init_scale: float = 1.0, kappa: Literal["hidden_features", "jacobian"] = "hidden_features",
                 widths: list[int] | None = None, num_widths: int = 40,
                 width_min_ratio: float = 0.1, width_max_ratio: float = 4.0, num_seeds: int = 5, seed: int = 0,
                 activation: Literal["tanh", "relu"] = "tanh", loss: Literal["mse", "cross_entropy"] = "mse",
                 eval_every_n_steps: int = 0, threshold_window: float = 1.5,
                 optimizer: OptimizerCallable = torch.optim.Adam, lr_scheduler: LRSchedulerCallable | None = None):
        super().__init__(widths, num_widths, width_min_ratio, width_max_ratio, num_seeds, seed, activation, loss,
                         eval_every_n_steps, threshold_window, optimizer, lr_scheduler)
        if not init_scale > 0:
            raise ValueError(f"TwoLayerSweep: init_scale must be positive, got {init_scale}")
        if kappa not in ("hidden_features", "jacobian"):
            raise ValueError(f"TwoLayerSweep: kappa must be 'hidden_features' or 'jacobian', got {kappa!r}")
        self.init_scale, self.kappa = init_scale, kappa

    def interpolation_threshold(self, data) -> float:
        self.input_rank = int(torch.linalg.matrix_rank(data.x_train.double()))
        return data.n_train * data.num_outputs / (self.input_rank + data.num_outputs)

    def build(self, data) -> None:
        d, k = data.input_dim, data.num_outputs
        self.input_dim, rows = d, max(self.widths)
        mask = torch.zeros(len(self.widths), rows)
        for index, width in enumerate(self.widths):
            mask[index, :width] = 1.0
        self.register_buffer("hidden_mask", mask, persistent=False)
        first = torch.zeros(self.num_seeds, len(self.widths), slab_size(rows, d))
        second = torch.zeros(self.num_seeds, len(self.widths), slab_size(rows, k))
        widths = torch.tensor(self.widths, dtype=torch.float64)
        for i, s in enumerate(range(self.seed, self.seed + self.num_seeds)):
            w1 = nested_gaussian(s, 2, rows, d) * self.init_scale / math.sqrt(d)
            w2 = nested_gaussian(s, 3, rows, k) * self.init_scale
            slab_view(first, rows, d)[i] = (w1[None] * mask[:, :, None]).float()
            slab_view(second, rows, k)[i] = (w2[None] / widths.sqrt()[:, None, None] * mask[:, :, None]).float()
        self.first_slabs = torch.nn.Parameter(first)    # viewed as (seeds, widths, P_max, d): rows are hidden units
        self.second_slabs = torch.nn.Parameter(second)  # viewed as (seeds, widths, P_max, K)
        self.register_buffer("first_slab_mask", slab_mask(mask, d, first.shape[-1]), persistent=False)
        self.register_buffer("second_slab_mask", slab_mask(mask, k, second.shape[-1]), persistent=False)

    def slab_masks(self) -> dict[str, torch.Tensor]:
        return {"first_slabs": self.first_slab_mask, "second_slabs": self.second_slab_mask}

    @property
    def first(self) -> torch.Tensor:
        return slab_view(self.first_slabs, self.hidden_mask.shape[1], self.input_dim)

    @property
    def second(self) -> torch.Tensor:
        return slab_view(self.second_slabs, self.hidden_mask.shape[1], self.num_outputs)

    def hidden(self, x: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """act(x W1) for every width: x (B, d), first (..., widths, P, d) -> (..., widths, B, P)."""
        return ACTIVATIONS[self.activation](torch.einsum("bd,...wpd->...wbp", x, first))

    def network(self, x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Outputs (..., widths, B, K) of every width, one batched pass per width group, each truncated
        to the group's largest width; ``second`` must already be masked."""
        preds = []
        for start, end in self.groups:
            rows = self.widths[end - 1]
            h = self.hidden(x, first[..., start:end, :rows, :])
            preds.append(torch.einsum("...wbp,...wpk->...wbk", h, second[..., start:end, :rows, :]))
        return torch.cat(preds, dim=-3)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        pred = self.network(batch["x"], self.first, self.second * self.hidden_mask[None, :, :, None])
        losses = sweep_loss(pred, batch["y"], self.loss_name, self.num_classes)
        self.log("train/loss", losses.mean(), prog_bar=True)
        return losses.sum()  # independent widths: each gets exactly its own loss's gradient

    def predict_seed(self, split: str, seed_index: int) -> torch.Tensor:
        x, _ = self.split_tensors(split)
        second = (self.second[seed_index] * self.hidden_mask[:, :, None]).double()
        return self.network(x, self.first[seed_index].double(), second)

    def train_feature_matrix(self, seed_index: int, width_index: int) -> torch.Tensor:
        first = self.first[seed_index, width_index, :self.widths[width_index]].double()
        return ACTIVATIONS[self.activation](self.x_train @ first.T)

    def condition_numbers(self, seed_index: int) -> np.ndarray:
        if self.kappa == "hidden_features":
            return super().condition_numbers(seed_index)
        rows = self.x_train.shape[0] * self.num_outputs
        kappas = []
        for w, width in enumerate(self.widths):
            gram = two_layer_jacobian_gram(self.x_train, self.first[seed_index, w, :width].detach(),
                                           self.second[seed_index, w, :width].detach(), self.activation)
            kappas.append(gram_condition_number(gram, min(rows, width * (self.input_rank + self.num_outputs))))
        return np.array(kappas)

    def trained_parameter_count(self, width: int) -> int:
        return width * (self.input_dim + self.num_outputs)

    def readout_norms(self) -> torch.Tensor:
        return (self.second.detach() * self.hidden_mask[None, :, :, None]).double().flatten(2).norm(dim=-1)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "solver": "gradient", "init_scale": self.init_scale, "kappa": self.kappa}
