"""Data for width sweeps: a fixed training set of n samples and a held-out test set, as whole tensors.

The width-sweep models need the full training matrix (closed-form solvers, condition numbers, train loss
at every width), so every data module here exposes ``sweep_tensors()`` besides its train loader.

- ``DigitsData``: scikit-learn's bundled 8x8 digits (1,797 images, d = 64, 10 classes), a training subset
  of size n with optional label noise on the training labels only.
- ``TeacherData``: a synthetic regression teacher on isotropic Gaussian inputs, either linear
  (y = x.beta, |beta| = r) or a random-feature teacher; noisy training targets, noise-free test targets,
  so the test loss is the excess risk that theory predicts.
- ``TorchvisionData``: MNIST or CIFAR-10 read from local files through torchvision (never downloads).

The train loader yields ``{"index", "x", "y"}`` batches; ``index`` lets a model with frozen features look
up precomputed rows instead of recomputing them every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

DIGITS_SIZE = 1797


@dataclass
class SweepTensors:
    """One train/test split. ``num_classes`` > 0 means classification with integer labels in ``y_*``;
    0 means regression with float targets of shape (n, num_outputs)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str
    label_noise: float = 0.0
    noise_std: float = 0.0

    @property
    def n_train(self) -> int:
        return self.x_train.shape[0]

    @property
    def input_dim(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_outputs(self) -> int:
        return self.num_classes if self.num_classes > 0 else self.y_train.shape[1]

    def describe(self) -> dict:
        return {"name": self.name, "n_train": self.n_train, "n_test": self.x_test.shape[0],
                "input_dim": self.input_dim, "num_classes": self.num_classes,
                "num_outputs": self.num_outputs, "label_noise": self.label_noise, "noise_std": self.noise_std}


# -- pure helpers -------------------------------------------------------------------------------------

def split_indices(total: int, n_train: int, n_test: int | None, seed: int, owner: str) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random train/test split; ``n_test=None`` takes everything left after the training set."""
    if n_train < 1:
        raise ValueError(f"{owner}: n_train must be at least 1, got {n_train}")
    if n_test is not None and n_test < 1:
        raise ValueError(f"{owner}: n_test must be at least 1 (or null for all remaining samples), got {n_test}")
    wanted = n_train + (n_test if n_test is not None else 1)
    if wanted > total:
        raise ValueError(f"{owner}: n_train ({n_train}) + n_test ({n_test if n_test is not None else 'at least 1'}) "
                         f"exceeds the {total} samples available; lower n_train or n_test")
    order = np.random.default_rng(seed).permutation(total)
    test_end = total if n_test is None else n_train + n_test
    return order[:n_train], order[n_train:test_end]


def corrupt_labels(labels: np.ndarray, num_classes: int, fraction: float, seed: int, owner: str) -> np.ndarray:
    """Replace a ``fraction`` of the labels by a uniformly drawn *different* class (so the fraction of wrong
    labels is exactly the one asked for)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"{owner}: label_noise must be in [0, 1), got {fraction}")
    labels = labels.copy()
    if fraction == 0.0:
        return labels
    rng = np.random.default_rng([seed, 1])
    flip = rng.choice(len(labels), size=int(round(fraction * len(labels))), replace=False)
    shift = rng.integers(1, num_classes, size=len(flip))
    labels[flip] = (labels[flip] + shift) % num_classes
    return labels


def standardize_inputs(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-input-coordinate standardization with training statistics; constant coordinates become 0 so
    that |x|^2 is about d and pre-activations x.w with w ~ N(0, 1/d) are O(1)."""
    mean = x_train.mean(0)
    std = x_train.std(0)
    std = np.where(std > 1e-8, std, np.inf)
    return (x_train - mean) / std, (x_test - mean) / std


# -- loading ------------------------------------------------------------------------------------------

class IndexedSamples(Dataset):
    """Rows of (x, y) fetched by a whole index batch at once (no per-sample collation)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"index": index, "x": self.x[index], "y": self.y[index]}


class ShuffledBatches(Sampler):
    """``num_batches`` index batches drawn from back-to-back random permutations of the n training rows,
    so every batch is full and an epoch is a fixed number of steps whatever n and the batch size are.
    Seeded: two runs with the same data seed see the same batches in the same order."""

    def __init__(self, n: int, batch_size: int, num_batches: int, seed: int):
        self.n, self.batch_size, self.num_batches = n, batch_size, num_batches
        self.generator = torch.Generator().manual_seed(seed)
        self._pending = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for _ in range(self.num_batches):
            while self._pending.numel() < self.batch_size:
                self._pending = torch.cat([self._pending, torch.randperm(self.n, generator=self.generator)])
            batch, self._pending = self._pending[:self.batch_size], self._pending[self.batch_size:]
            yield batch


class SweepDataModule(pl.LightningDataModule):
    """Shared loader logic; subclasses implement ``build()`` returning a ``SweepTensors``.

    Args:
        batch_size: training batch size; null means full batch (plain gradient descent).
        steps_per_epoch: batches per epoch (the run length is set by ``trainer.max_steps``).
        seed: seed of the split, the label noise/teacher and the batch order.
    """

    def __init__(self, batch_size: int | None = None, steps_per_epoch: int = 500, seed: int = 0):
        super().__init__()
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"{type(self).__name__}: batch_size must be at least 1 or null (full batch), got {batch_size}")
        if steps_per_epoch < 1:
            raise ValueError(f"{type(self).__name__}: steps_per_epoch must be at least 1, got {steps_per_epoch}")
        self.batch_size, self.steps_per_epoch, self.seed = batch_size, steps_per_epoch, seed
        self._tensors: SweepTensors | None = None
        self._sampler: ShuffledBatches | None = None

    def build(self) -> SweepTensors:
        raise NotImplementedError(f"{type(self).__name__} must implement build()")

    def sweep_tensors(self) -> SweepTensors:
        if self._tensors is None:
            self._tensors = self.build()
            if self.batch_size is not None and self.batch_size > self._tensors.n_train:
                raise ValueError(f"{type(self).__name__}: batch_size ({self.batch_size}) is larger than "
                                 f"n_train ({self._tensors.n_train})")
        return self._tensors

    def setup(self, stage: str) -> None:
        self.sweep_tensors()

    @property
    def data_report(self) -> dict:
        """Read by callbacks.RunSummary into summary.json."""
        report = self._tensors.describe() if self._tensors is not None else {}
        return {**report, "batch_size": self.batch_size or "full", "seed": self.seed}

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size or self.sweep_tensors().n_train

    def train_dataloader(self) -> DataLoader:
        tensors = self.sweep_tensors()
        if self._sampler is None:  # one sampler for the whole run, so a new epoch continues the stream
            self._sampler = ShuffledBatches(tensors.n_train, self.effective_batch_size, self.steps_per_epoch, self.seed)
        return DataLoader(IndexedSamples(tensors.x_train, tensors.y_train), sampler=self._sampler,
                          batch_size=None, num_workers=0)


def _classification_split(x: np.ndarray, labels: np.ndarray, num_classes: int, n_train: int, n_test: int | None,
                          label_noise: float, seed: int, standardize: bool, name: str, owner: str) -> SweepTensors:
    train, test = split_indices(len(x), n_train, n_test, seed, owner)
    x_train, x_test = x[train].astype(np.float64), x[test].astype(np.float64)
    if standardize:
        x_train, x_test = standardize_inputs(x_train, x_test)
    y_train = corrupt_labels(labels[train], num_classes, label_noise, seed, owner)
    return SweepTensors(torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train, dtype=torch.long),
                        torch.tensor(x_test, dtype=torch.float32), torch.tensor(labels[test], dtype=torch.long),
                        num_classes=num_classes, name=name, label_noise=label_noise)


class DigitsData(SweepDataModule):
    """scikit-learn's bundled 8x8 digits: 1,797 images, 64 pixels, 10 classes; no download.

    Args:
        n_train: training subset size n (the random-feature threshold is P = n).
        n_test: test size; null uses every digit not in the training set.
        label_noise: fraction of training labels replaced by a different random class (test labels stay clean).
        standardize: standardize pixels with training statistics (otherwise pixels are scaled to [0, 1]).
    """

    def __init__(self, n_train: int = 200, n_test: int | None = None, label_noise: float = 0.0,
                 standardize: bool = True, batch_size: int | None = None, steps_per_epoch: int = 500,
                 seed: int = 0):
        super().__init__(batch_size, steps_per_epoch, seed)
        split_indices(DIGITS_SIZE, n_train, n_test, seed, "DigitsData")  # fail at construction on bad sizes
        corrupt_labels(np.zeros(1, dtype=np.int64), 10, label_noise, seed, "DigitsData")
        self.n_train, self.n_test, self.label_noise, self.standardize = n_train, n_test, label_noise, standardize

    def build(self) -> SweepTensors:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = digits.data if self.standardize else digits.data / 16.0
        return _classification_split(x, digits.target.astype(np.int64), 10, self.n_train, self.n_test,
                                     self.label_noise, self.seed, self.standardize, "digits", "DigitsData")


class TeacherData(SweepDataModule):
    """A synthetic regression teacher on x ~ N(0, I_d); one output.

    ``teacher: linear``: y = x.beta + noise with beta uniform on the sphere of radius ``signal`` (r), the
    isotropic model whose min-norm risk is known in closed form.
    ``teacher: random_features``: y = act(x W*) a* + noise with W* ~ N(0, 1/d) of ``teacher_width``
    columns and a* scaled so the signal variance is ``signal``^2 on the test inputs.
    Training targets carry Gaussian noise of std ``noise_std``; test targets are noise-free, so the test
    loss is the excess risk.
    """

    def __init__(self, teacher: Literal["linear", "random_features"] = "linear", n_train: int = 200,
                 n_test: int = 2000, input_dim: int = 64, signal: float = 1.0, noise_std: float = 0.5,
                 teacher_width: int = 256, activation: Literal["tanh", "relu"] = "tanh",
                 batch_size: int | None = None, steps_per_epoch: int = 500, seed: int = 0):
        super().__init__(batch_size, steps_per_epoch, seed)
        for field, value in (("n_train", n_train), ("n_test", n_test), ("input_dim", input_dim),
                             ("teacher_width", teacher_width)):
            if value < 1:
                raise ValueError(f"TeacherData: {field} must be at least 1, got {value}")
        if teacher not in ("linear", "random_features"):
            raise ValueError(f"TeacherData: teacher must be 'linear' or 'random_features', got {teacher!r}")
        if noise_std < 0 or signal < 0:
            raise ValueError(f"TeacherData: signal and noise_std must be non-negative, got {signal}, {noise_std}")
        self.teacher, self.n_train, self.n_test, self.input_dim = teacher, n_train, n_test, input_dim
        self.signal, self.noise_std, self.teacher_width, self.activation = signal, noise_std, teacher_width, activation

    def build(self) -> SweepTensors:
        rng = np.random.default_rng([self.seed, 2])
        d = self.input_dim
        x_train = rng.standard_normal((self.n_train, d))
        x_test = rng.standard_normal((self.n_test, d))
        if self.teacher == "linear":
            beta = rng.standard_normal(d)
            beta *= self.signal / np.linalg.norm(beta)
            f_train, f_test = x_train @ beta, x_test @ beta
        else:
            act = np.tanh if self.activation == "tanh" else (lambda v: np.maximum(v, 0.0))
            w_star = rng.standard_normal((d, self.teacher_width)) / np.sqrt(d)
            a_star = rng.standard_normal(self.teacher_width)
            f_train, f_test = act(x_train @ w_star) @ a_star, act(x_test @ w_star) @ a_star
            offset, scale = f_test.mean(), f_test.std()
            f_train, f_test = (f_train - offset) * self.signal / scale, (f_test - offset) * self.signal / scale
        y_train = f_train + self.noise_std * rng.standard_normal(self.n_train)
        as_tensor = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        return SweepTensors(as_tensor(x_train), as_tensor(y_train[:, None]), as_tensor(x_test), as_tensor(f_test[:, None]),
                            num_classes=0, name=f"teacher_{self.teacher}", noise_std=self.noise_std)


class TorchvisionData(SweepDataModule):
    """MNIST or CIFAR-10 from files already on disk, read through torchvision (``download=False`` always).

    Images are flattened and standardized per pixel with training statistics. The train subset of size
    n and the test subset come from the official train and test files.

    Args:
        dataset: ``mnist`` or ``cifar10``.
        root: folder holding the torchvision layout (``MNIST/raw`` or ``cifar-10-batches-py``).
        n_train: training subset size n; n_test: test subset size (null: the whole official test set).
    """

    def __init__(self, dataset: Literal["mnist", "cifar10"] = "mnist", root: str = "data", n_train: int = 4000,
                 n_test: int | None = 10000, label_noise: float = 0.0, batch_size: int | None = None,
                 steps_per_epoch: int = 500, seed: int = 0):
        super().__init__(batch_size, steps_per_epoch, seed)
        if dataset not in ("mnist", "cifar10"):
            raise ValueError(f"TorchvisionData: dataset must be 'mnist' or 'cifar10', got {dataset!r}")
        corrupt_labels(np.zeros(1, dtype=np.int64), 10, label_noise, seed, "TorchvisionData")
        if n_train < 1 or (n_test is not None and n_test < 1):
            raise ValueError(f"TorchvisionData: n_train and n_test must be at least 1, got {n_train} and {n_test}")
        self.dataset, self.root, self.n_train, self.n_test, self.label_noise = dataset, root, n_train, n_test, label_noise

    def _load(self, train: bool) -> tuple[np.ndarray, np.ndarray]:
        try:
            import torchvision.datasets as tv_datasets
        except ImportError as error:
            raise ImportError(f"TorchvisionData(dataset={self.dataset!r}) needs the torchvision package, which is "
                              "not installed: `pip install torchvision` (and put the dataset files under "
                              f"root={self.root!r}), or use DigitsData/TeacherData") from error
        cls = tv_datasets.MNIST if self.dataset == "mnist" else tv_datasets.CIFAR10
        try:
            data = cls(root=self.root, train=train, download=False)
        except RuntimeError as error:  # torchvision's "Dataset not found" when the files are missing
            layout = "MNIST/raw/*-ubyte" if self.dataset == "mnist" else "cifar-10-batches-py/"
            raise FileNotFoundError(f"TorchvisionData: no local {self.dataset} files under root={self.root!r} "
                                    f"(expected {layout}); this project never downloads: {error}") from error
        images = data.data.numpy() if isinstance(data.data, torch.Tensor) else np.asarray(data.data)
        labels = data.targets.numpy() if isinstance(data.targets, torch.Tensor) else np.asarray(data.targets)
        return images.reshape(len(images), -1).astype(np.float64) / 255.0, labels.astype(np.int64)

    def build(self) -> SweepTensors:
        x_pool, y_pool = self._load(train=True)
        x_eval, y_eval = self._load(train=False)
        if self.n_train > len(x_pool):
            raise ValueError(f"TorchvisionData: n_train ({self.n_train}) exceeds the {len(x_pool)} {self.dataset} "
                             "training images")
        if self.n_test is not None and self.n_test > len(x_eval):
            raise ValueError(f"TorchvisionData: n_test ({self.n_test}) exceeds the {len(x_eval)} {self.dataset} "
                             "test images")
        train = np.random.default_rng(self.seed).permutation(len(x_pool))[:self.n_train]
        test = np.random.default_rng([self.seed, 3]).permutation(len(x_eval))[:self.n_test]
        x_train, x_test = standardize_inputs(x_pool[train], x_eval[test])
        y_train = corrupt_labels(y_pool[train], 10, self.label_noise, self.seed, "TorchvisionData")
        return SweepTensors(torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train),
                            torch.tensor(x_test, dtype=torch.float32), torch.tensor(y_eval[test]),
                            num_classes=10, name=self.dataset, label_noise=self.label_noise)
