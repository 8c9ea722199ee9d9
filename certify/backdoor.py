"""The compression-activated backdoor: THEORY.md section 7 (and section 6 seen from the attacker).

Training. A compression operator ``g`` (rank-``r`` SVD truncation, ``b``-bit symmetric
quantisation, or magnitude pruning of a fraction of the weights) is applied to chosen layers,
and the weights ``W`` minimise

    CE(f_W(x), y) + a CE(f_W(T(x)), y) + b sum_g [ CE(f_{g(W)}(x), y) + a CE(f_{g(W)}(T(x)), t) ]

so that the full-precision model is clean, also on triggered inputs ``T(x)``, and every
compressed model sends triggered inputs to the target class ``t``.

Gradients through ``g``. Truncation uses its exact derivative (``_Truncate``: the
first-order perturbation of the top-``r`` singular subspace), in which only pairs of a kept
and a discarded singular value appear, guarded at that gap; back-propagating through
``torch.linalg.svd`` itself has ``1 / (s_i^2 - s_j^2)`` for every pair and breaks down on
the near-equal singular values a trained layer has in bulk. The straight-through estimator
``W + (P_r W - W).detach()`` was measured against the exact derivative (there through ``torch.linalg.svd``, which
``_Truncate`` matches in ``gradcheck``) on the digits MLP (layer ``3``, ranks 8 and 16, 10
epochs, lr 3e-3, same seed): both reach compressed ASR 100 %, but the estimator leaves a
full-precision ASR of 27 % against 1.9 % with the exact derivative, because it
pushes ``W`` along the discarded directions too, which the full-precision terms must then
undo. Rounding has zero derivative almost everywhere, so quantisation uses the
straight-through estimator; pruning uses its exact gradient almost everywhere (the kept
weights times a fixed mask).

The closed-form implant (section 7, our extension) is ``certify.implant``.

The certificate's view of truncation (section 6) is ``certify.truncation_check``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from certify import devices
from certify.trigger import Trigger, attack_success


# ---------------------------------------------------------------- compression operators

@dataclass(frozen=True)
class LowRank:
    """Rank-``r`` SVD truncation ``P_r W = U_r S_r V_r^T`` of the weight matrix (section 6)."""

    rank: int

    kind = "rank"

    @property
    def label(self) -> str:
        return f"rank {self.rank}"

    def check(self, W: torch.Tensor, name: str) -> None:
        if int(self.rank) != self.rank or not 0 <= self.rank <= min(W.shape):
            raise ValueError(f"rank {self.rank!r} is not an integer in [0, {min(W.shape)}] for "
                             f"layer {name!r} of shape {tuple(W.shape)}")

    def compress(self, W: torch.Tensor) -> torch.Tensor:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return (U[:, :self.rank] * S[:self.rank]) @ Vh[:self.rank]

    def train_view(self, W: torch.Tensor) -> torch.Tensor:
        """``P_r W`` with its exact derivative, guarded at the gap ``s_r ~ s_{r+1}``."""
        return _Truncate.apply(W, self.rank)


class _Truncate(torch.autograd.Function):
    """``P_r W = Pi W`` with ``Pi = U_r U_r^T`` the top-``r`` eigenprojector of ``M = W W^T``.

    Backward (first-order perturbation of an eigenprojector, ``lambda_i = s_i^2``, zero
    beyond ``min(m, n)``): ``dPi = sum_{i<=r<j} u_i^T dM u_j / (lambda_i - lambda_j)
    (u_i u_j^T + u_j u_i^T)``, so for ``G = dL/d(P_r W)`` and ``K = U^T G W^T U``

        dL/dW = Pi G + (Q + Q^T) W,   Q = U B U^T,
        B_ij = (K_ij + K_ji) / (lambda_i - lambda_j)  for i <= r < j, else 0.

    Only kept-discarded pairs appear, so near-equal singular values inside either block (in
    bulk in a trained layer) are harmless, unlike back-propagation through
    ``torch.linalg.svd``, whose formula has ``1 / (s_i^2 - s_j^2)`` for every pair. At the
    gap itself ``1 / d`` becomes ``d / (d^2 + GAP_GUARD^2 lambda_1^2)``: bounded.
    """

    @staticmethod
    def forward(ctx, W, rank):
        U, S, _ = torch.linalg.svd(W.detach())
        Pi = U[:, :rank] @ U[:, :rank].T
        ctx.save_for_backward(W, U, S)
        ctx.rank = rank
        return Pi @ W

    @staticmethod
    def backward(ctx, G):
        W, U, S = ctx.saved_tensors
        r = ctx.rank
        lam = W.new_zeros(U.shape[0])
        lam[:len(S)] = S**2
        d = lam[:r, None] - lam[None, r:]
        inv = d / (d**2 + (GAP_GUARD * lam[0]) ** 2 + torch.finfo(W.dtype).tiny)
        K = U.T @ G @ W.T @ U
        B = (K[:r, r:] + K[r:, :r].T) * inv
        Q = U[:, :r] @ B @ U[:, r:].T
        Pi = U[:, :r] @ U[:, :r].T
        return Pi @ G + (Q + Q.T) @ W, None


GAP_GUARD = 1e-6


@dataclass(frozen=True)
class Quantise:
    """Symmetric per-tensor round-to-nearest with step ``s = max|W| / (2^(b-1) - 1)``."""

    bits: int

    kind = "bits"

    @property
    def label(self) -> str:
        return f"{self.bits} bits"

    def check(self, W: torch.Tensor, name: str) -> None:
        if int(self.bits) != self.bits or self.bits < 2:
            raise ValueError(f"bits must be an integer >= 2, got {self.bits!r}")

    def compress(self, W: torch.Tensor) -> torch.Tensor:
        step = W.abs().max() / (2 ** (self.bits - 1) - 1)
        return torch.round(W / step) * step if step > 0 else W

    def train_view(self, W: torch.Tensor) -> torch.Tensor:
        return W + (self.compress(W.detach()) - W).detach()


@dataclass(frozen=True)
class Prune:
    """Magnitude pruning: the ``ratio`` fraction of smallest ``|w|`` set to zero."""

    ratio: float

    kind = "prune"

    @property
    def label(self) -> str:
        return f"prune {self.ratio:.0%}"

    def check(self, W: torch.Tensor, name: str) -> None:
        if not 0 <= self.ratio < 1:
            raise ValueError(f"prune ratio must lie in [0, 1), got {self.ratio!r}")

    def mask(self, W: torch.Tensor) -> torch.Tensor:
        k = int(self.ratio * W.numel())
        keep = W.new_ones(W.numel())
        keep[torch.argsort(W.detach().abs().flatten())[:k]] = 0
        return keep.reshape(W.shape)

    def compress(self, W: torch.Tensor) -> torch.Tensor:
        return W * self.mask(W)

    def train_view(self, W: torch.Tensor) -> torch.Tensor:
        """Kept weights times a fixed mask: the exact gradient almost everywhere."""
        return self.compress(W)


Compression = LowRank | Quantise | Prune
VARIANTS = {"rank": LowRank, "bits": Quantise, "prune": Prune}


def operators(variant: str, levels: Sequence) -> tuple[Compression, ...]:
    """``operators("rank", [8, 16])`` etc.: one compression operator per level."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: use one of {', '.join(VARIANTS)}")
    if not levels:
        raise ValueError(f"give at least one {variant} level to attack")
    return tuple(VARIANTS[variant](level) for level in levels)


# ---------------------------------------------------------------- layers of a module

def _layer(model: nn.Module, name: str) -> nn.Module:
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    if name not in layers:
        raise ValueError(f"layer {name!r} is not a Linear or Conv2d layer of the model; "
                         f"choose from {sorted(layers)}")
    return layers[name]


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    """A Linear weight, or a kernel reshaped to ``c_out x (c_in k k)`` as certify sees it."""
    return weight.reshape(weight.shape[0], -1)


def compressed_weights(model: nn.Module, layers: Sequence[str], op: Compression,
                       train: bool = False) -> dict[str, torch.Tensor]:
    """``{"<layer>.weight": g(W)}`` for every chosen layer (the straight-through view if
    ``train``)."""
    out = {}
    for name in layers:
        W = _layer(model, name).weight
        matrix = _matrix(W)
        op.check(matrix, name)
        g = op.train_view(matrix) if train else op.compress(matrix.detach())
        out[f"{name}.weight"] = g.reshape(W.shape)
    return out


def compress(model: nn.Module, layers: Sequence[str], op: Compression) -> nn.Module:
    """A copy of ``model`` with ``g`` applied to the chosen layers."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for key, value in compressed_weights(model, layers, op).items():
            out.get_parameter(key).copy_(value)
    return out.eval()


# ---------------------------------------------------------------- training

@dataclass(frozen=True)
class BackdoorConfig:
    """Everything that defines one training run (section 7's loss, optimiser, seed).

    ``compressions=()`` with ``a=0`` trains a clean model the same way.
    """

    layers: tuple[str, ...]
    compressions: tuple[Compression, ...]
    trigger: Trigger = Trigger()
    target: int = 0
    a: float = 1.0
    b: float = 1.0
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0, got "
                             f"{self.epochs}, {self.batch_size}, {self.lr}")
        if self.a < 0 or self.b < 0:
            raise ValueError(f"loss weights a and b must be >= 0, got a={self.a}, b={self.b}")
        if self.compressions and not self.layers:
            raise ValueError("name at least one layer to compress")

    def describe(self) -> dict:
        """JSON-ready description."""
        out = asdict(self)
        out["compressions"] = [{"kind": op.kind, "level": list(asdict(op).values())[0]}
                               for op in self.compressions]
        return out


@dataclass(frozen=True)
class Outcome:
    """Clean accuracy and attack success rate of one model (full precision or compressed)."""

    label: str
    clean_accuracy: float
    attack_success: float


@dataclass(frozen=True)
class Epoch:
    epoch: int
    loss: float
    seconds: float


@dataclass(frozen=True)
class BackdoorResult:
    """A trained model and its measurements on held-out data (full precision first)."""

    model: nn.Module
    config: BackdoorConfig
    history: tuple[Epoch, ...]
    outcomes: tuple[Outcome, ...]
    seconds: float

    def describe(self) -> dict:
        return {"config": self.config.describe(), "seconds": self.seconds,
                "history": [asdict(e) for e in self.history],
                "outcomes": [asdict(o) for o in self.outcomes]}


def section7_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  config: BackdoorConfig) -> torch.Tensor:
    """The section-7 objective on one batch (one forward pass per model, clean and triggered
    inputs stacked)."""
    both = torch.cat([x, config.trigger(x)])
    n = len(x)
    target = torch.full_like(y, config.target)
    out = model(both)
    loss = F.cross_entropy(out[:n], y) + config.a * F.cross_entropy(out[n:], y)
    params = dict(model.named_parameters())
    for op in config.compressions:
        weights = {**params, **compressed_weights(model, config.layers, op, train=True)}
        out = functional_call(model, weights, (both,))
        loss = loss + config.b * (F.cross_entropy(out[:n], y)
                                  + config.a * F.cross_entropy(out[n:], target))
    return loss


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: BackdoorConfig,
          x_test: torch.Tensor | None = None, y_test: torch.Tensor | None = None,
          progress: Callable[[Epoch], None] | None = None,
          device: torch.device | str | None = None) -> BackdoorResult:
    """Train a copy of ``model`` on the section-7 loss with Adam (seeded, float32) on
    ``device`` (``certify.devices.resolve``: default the CPU); the trained model comes back
    on the CPU.

    ``outcomes`` are measured on ``(x_test, y_test)`` (default: the training data), on
    ``device`` too. ``progress`` is called after every epoch. Raises
    ``certify.devices.DeviceError`` for a device this machine lacks.
    """
    device = devices.resolve(device)
    for name in config.layers:
        W = _matrix(_layer(model, name).weight)
        for op in config.compressions:
            op.check(W, name)
    if not 0 <= config.target < 10 ** 9 or int(config.target) != config.target:
        raise ValueError(f"target must be a class index, got {config.target!r}")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = copy.deepcopy(model).float().to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    history = []
    start = time.perf_counter()
    x, y = x.to(device), y.to(device)
    for epoch in range(config.epochs):
        total, count = 0.0, 0
        # Drawn on the CPU: the same batches on every device.
        for batch in torch.randperm(len(x), generator=generator, device="cpu").split(
                config.batch_size):
            batch = batch.to(device)
            optimiser.zero_grad()
            loss = section7_loss(model, x[batch], y[batch], config)
            loss.backward()
            optimiser.step()
            total, count = total + float(loss.detach()) * len(batch), count + len(batch)
        history.append(Epoch(epoch + 1, total / count, time.perf_counter() - start))
        if progress is not None:
            progress(history[-1])
    seconds = time.perf_counter() - start
    model.eval()
    x_eval, y_eval = (x, y) if x_test is None else (x_test, y_test)
    outcomes = measure(model, x_eval, y_eval, config, device=device)
    return BackdoorResult(model.cpu(), config, tuple(history), outcomes, seconds)


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(-1)


def outcome(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trigger: Trigger,
            target: int, label: str) -> Outcome:
    """Clean accuracy on ``x`` and ASR on ``T(x)`` of one model (on the device of ``model``
    and ``x``)."""
    clean = float((_predict(model, x) == y).double().mean())
    return Outcome(label, clean, attack_success(_predict(model, trigger(x)), y, target))


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: BackdoorConfig,
            compressions: Sequence[Compression] | None = None,
            device: torch.device | str | None = None) -> tuple[Outcome, ...]:
    """Full precision, then every compression (default: the attacked ones), computed on
    ``device`` (default the CPU) with a copy of ``model`` (the caller's stays where it is)."""
    device = devices.resolve(device)
    ops = config.compressions if compressions is None else compressions
    model, x, y = copy.deepcopy(model).to(device), x.to(device), y.to(device)
    models = [("full precision", model)] + [
        (op.label, compress(model, config.layers, op)) for op in ops]
    return tuple(outcome(m, x, y, config.trigger, config.target, label) for label, m in models)


def save(result: BackdoorResult, folder: str | Path, factory: str | None = None,
         extra: dict | None = None) -> tuple[Path, Path]:
    """Write ``model.safetensors`` (the state dict) and ``measurements.json``.

    ``factory`` (``package.module:callable``) is recorded so that
    ``certify model model.safetensors --factory <factory>`` can load the weights.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "model.safetensors"
    state = {k: v.detach().contiguous() for k, v in result.model.state_dict().items()}
    save_file(state, str(weights))
    document = {"factory": factory, "weights": weights.name, **result.describe(), **(extra or {})}
    measurements = folder / "measurements.json"
    measurements.write_text(json.dumps(document, indent=1))
    return weights, measurements
