"""The models of the format matrix (issue 10), for 8 x 8 scikit-learn digits ``(1, 8, 8)``.

Each is written the way people write models, not the way certify once needed them: an MLP
that reshapes with ``view``, a CNN with max pooling, a CNN with batch norm and a residual
block whose shortcut is a strided 1x1 convolution, a model that normalises its input with
constant tensors, one that concatenates two branches, a vision transformer (issue 11:
``certify.models.small.ViT`` with 4 patches of width 8, 2 heads, 1 block), and (issue 28) a
class-token ViT and a GRU classifier that reads the image row by row, both trained briefly on
the digits (``_trained``). ``--factory
matrix_models:<name>`` builds them (pytest puts ``tests/support/`` on ``sys.path``); weights are
seeded, batch-norm statistics and layer-norm affine parameters set to non-trivial values.
"""

from __future__ import annotations

import torch
from torch import nn

from certify.models.small import ViT


class ViewMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 24), nn.Linear(24, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.view(-1, 64))))


class PoolCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


class ResidualBN(nn.Module):
    """``relu(bn(conv))``, then ``relu(bn(conv(relu(bn(conv(h)))))) + bn(proj(h))``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.proj, self.bn3 = nn.Conv2d(4, 6, 1, stride=2), nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        h = self.stem(x)
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h))))) + self.bn3(self.proj(h))
        return self.head(torch.relu(out).reshape(len(x), -1))


class Normalised(nn.Module):
    """``(x - mean) / std`` with constant buffers, then an MLP with a tanh."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.full((1, 1, 1), 0.3))
        self.register_buffer("std", torch.full((1, 1, 1), 0.4))
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


class Concat(nn.Module):
    """A convolution branch and an average-pooling branch, concatenated along channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        h = torch.cat([torch.relu(self.conv(x)), self.pool(x)], dim=1)
        return self.head(h.flatten(1))


class TinyViT(ViT):
    """Patches 4 x 4 (4 tokens of width 8), 1 pre-LN block of 2 heads, MLP 8-16-8."""

    def __init__(self):
        super().__init__(side=8, patch=4, dim=8, depth=1, heads=2, hidden=16)


class ClassTokenViT(TinyViT):
    """A learned class token before the 4 patch tokens, its own position embedding, and the
    head on the class token's output."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, 8))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 5, 8))

    def forward(self, x):
        patches = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), patches], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


class RowGRU(nn.Module):
    """A digit as a sequence of 4 steps of two rows each (16 features), a GRU of width 8
    (batch first), its last output through a linear head."""

    def __init__(self):
        super().__init__()
        self.gru, self.head = nn.GRU(16, 8, batch_first=True), nn.Linear(8, 10)

    def forward(self, x):
        out, _ = self.gru(x.reshape(len(x), 4, 16))
        return self.head(out[:, -1])


def _trained(model: nn.Module, steps: int = 60) -> nn.Module:
    """``steps`` full-batch Adam steps on all 1,797 scikit-learn digits (seeded: the same
    weights every time), so that the margins are those of a model that classifies."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(digits.target)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model.eval()


def _seeded(cls, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = cls()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def view_mlp() -> nn.Module:
    return _seeded(ViewMLP, 0)


def pool_cnn() -> nn.Module:
    return _seeded(PoolCNN, 1)


def residual_bn() -> nn.Module:
    return _seeded(ResidualBN, 2)


def normalised() -> nn.Module:
    return _seeded(Normalised, 3)


def concat() -> nn.Module:
    return _seeded(Concat, 4)


def vit() -> nn.Module:
    return _seeded(TinyViT, 5)


def class_token_vit() -> nn.Module:
    return _trained(_seeded(ClassTokenViT, 6).train())


def row_gru() -> nn.Module:
    return _trained(_seeded(RowGRU, 7).train())


MODELS = ("view_mlp", "pool_cnn", "residual_bn", "normalised", "concat", "vit",
          "class_token_vit", "row_gru")
