"""Hypothesis strategies for testing your own model with certify (need ``hypothesis``:
``pip install certify[test]``): ``networks`` (small torch models), ``inputs``,
``perturbations`` (weight changes inside or outside a certified radius) and
``compressions`` (``certify.closed_forms.compressions.Compression`` objects)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from certify.closed_forms.compressions import Compression
from certify.closed_forms.perturbation import as_float64
from certify.radii.radius import NORMS, layer_radii
from certify.testing.subjects import affine_index, layer_columns, network_of

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu")
LAYER_TYPES = ("linear", "conv")
POOLING = ("max", "avg")


def _strategies():
    """``hypothesis.strategies``, imported only when a strategy is built."""
    try:
        from hypothesis import strategies
    except ImportError:
        raise ImportError("certify.testing's strategies need hypothesis: "
                          "pip install certify[test]") from None
    return strategies


def _range(value, name: str, low: int) -> tuple[int, int]:
    """An int or an inclusive ``(lo, hi)`` range, both ``>= low``."""
    lo, hi = (value, value) if isinstance(value, int) else tuple(value)
    if not (isinstance(lo, int) and isinstance(hi, int) and low <= lo <= hi):
        raise ValueError(f"{name} must be an integer >= {low} or a range (lo, hi) with "
                         f"{low} <= lo <= hi, got {value!r}")
    return lo, hi


def _activation(kind: str) -> nn.Module:
    return {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
            "leaky_relu": lambda: nn.LeakyReLU(0.1)}[kind]()


def _randomise_batchnorm(bn: nn.Module) -> None:
    """Non-trivial statistics and affine parameters, as after training."""
    with torch.no_grad():
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.8, 1.2)
        bn.bias.uniform_(-0.1, 0.1)


def _fit(model: nn.Sequential, shape: tuple[int, ...], classes: int, steps: int = 30) -> None:
    """A few Adam steps towards a random linear teacher's labels on Gaussian inputs, so that
    the weights (and margins) look trained rather than initialised."""
    x = torch.randn(64, *shape, dtype=torch.float64)
    teacher = torch.randn(x[0].numel(), classes, dtype=torch.float64)
    y = (x.flatten(1) @ teacher).argmax(-1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    model.eval()


def _probe(layers: list[nn.Module], shape: tuple[int, ...]) -> torch.Size:
    """The output shape of ``layers`` on one input, in eval mode: a batch norm in train mode
    would fail on a single value per channel and overwrite its randomised statistics."""
    probe = nn.Sequential(*layers).eval()
    with torch.no_grad():
        return probe(torch.zeros(1, *shape)).shape


def networks(*, layer_types: Sequence[str] = LAYER_TYPES, input_shape=(1, 6, 6),
             widths=(2, 8), depth=(1, 2), classes=(2, 5),
             activations: Sequence[str] = ACTIVATIONS, batchnorm: bool = True,
             pooling: Sequence[str] = POOLING, trained: bool | None = None):
    """Small float64 ``nn.Sequential`` classifiers in eval mode, for inputs ``input_shape``.

    ``depth`` hidden affine layers (an int or a range) of ``widths`` units or channels:
    3 x 3 convolutions first (``"conv"`` in ``layer_types``; stride 1 or 2, optionally
    BatchNorm with random statistics and a pooling from ``pooling``), then dense layers
    (``"linear"``), each followed by an activation from ``activations``; then ``Flatten``
    and a ``Linear`` to ``classes`` outputs. ``trained``: fit a few steps to a random
    teacher (``None``: either). Convolutions need ``input_shape = (channels, h, w)``.
    """
    st = _strategies()
    types = tuple(layer_types)
    if not types or set(types) - set(LAYER_TYPES):
        raise ValueError(f"layer_types must be a non-empty subset of {LAYER_TYPES}, got "
                         f"{layer_types!r}")
    unknown = set(activations) - set(ACTIVATIONS)
    if not activations or unknown:
        raise ValueError(f"activations must be a non-empty subset of {ACTIVATIONS}, got "
                         f"{activations!r}")
    if set(pooling) - set(POOLING):
        raise ValueError(f"pooling must be a subset of {POOLING}, got {pooling!r}")
    shape = tuple(input_shape)
    if "conv" in types and len(shape) != 3:
        raise ValueError(f"convolutions need input_shape = (channels, height, width), got "
                         f"{input_shape!r}; pass layer_types=('linear',) for vector inputs")
    widths, depth = _range(widths, "widths", 1), _range(depth, "depth", 0)
    classes = _range(classes, "classes", 2)

    @st.composite
    def build(draw) -> nn.Sequential:
        torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
        hidden = draw(st.integers(*depth))
        convs = hidden if types == ("conv",) else (
            draw(st.integers(0, hidden)) if "conv" in types else 0)
        layers: list[nn.Module] = []
        for _ in range(convs):
            channels = _probe(layers, shape)[1]
            width = draw(st.integers(*widths))
            stride = draw(st.sampled_from([1, 2]))
            layers.append(nn.Conv2d(channels, width, 3, padding=1, stride=stride))
            if batchnorm and draw(st.booleans()):
                layers.append(nn.BatchNorm2d(width))
                _randomise_batchnorm(layers[-1])
            layers.append(_activation(draw(st.sampled_from(activations))))
            side = min(_probe(layers, shape)[2:])
            if side >= 2 and pooling and draw(st.booleans()):
                kind = draw(st.sampled_from(pooling))
                layers.append(nn.MaxPool2d(2) if kind == "max" else nn.AvgPool2d(2))
        layers.append(nn.Flatten())
        features = _probe(layers, shape)[1]
        for _ in range(hidden - convs):
            width = draw(st.integers(*widths))
            layers.append(nn.Linear(features, width))
            if batchnorm and draw(st.booleans()):
                layers.append(nn.BatchNorm1d(width))
                _randomise_batchnorm(layers[-1])
            layers.append(_activation(draw(st.sampled_from(activations))))
            features = width
        n_classes = draw(st.integers(*classes))
        model = nn.Sequential(*layers, nn.Linear(features, n_classes)).double().eval()
        if trained if trained is not None else draw(st.booleans()):
            _fit(model, shape, n_classes)
        return model

    return build()


def inputs(shape, *, batch=(1, 8), scale: float = 1.0):
    """Float64 tensors ``(B, *shape)`` with ``B`` in ``batch``: standard normal entries times
    ``scale``, from a drawn seed (fast to generate, and a failure reproduces exactly)."""
    st = _strategies()
    shape = tuple(shape)
    batch = _range(batch, "batch", 1)

    def make(args):
        size, seed = args
        generator = torch.Generator().manual_seed(seed)
        return scale * torch.randn(size, *shape, dtype=torch.float64, generator=generator)

    return st.tuples(st.integers(*batch), st.integers(0, 2**31 - 1)).map(make)


@dataclass(frozen=True)
class Perturbation:
    """Per-input changes ``delta[b]`` (``(B, m, n)``, ``n + 1`` columns with ``bias``: the
    bias is the last column) of one affine layer's weight matrix, with that layer's
    certified radius ``lower`` and verified witness norm ``upper`` on each input ``x[b]``.
    ``size``: ``||delta[b]||`` in ``norm``."""

    layer: str
    norm: str
    bias: bool
    x: torch.Tensor
    delta: torch.Tensor
    size: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor

    def classes(self, model) -> torch.Tensor:
        """Predicted classes with the layer's weight ``W + delta[b]`` on input ``x[b]``."""
        network = network_of(model, self.x)
        index = affine_index(network, self.layer)
        layer = network.layer(index)
        values = network.values(self.x)
        P = layer_columns(layer, values[network.input_of(index)], self.bias)
        Z = values[index]
        Z = layer.uncolumns(layer.columns(Z) + torch.matmul(self.delta, P), Z.shape[1:])
        return network.run(index, Z, values).argmax(-1)


def _norm(D: torch.Tensor, norm: str) -> torch.Tensor:
    return torch.linalg.matrix_norm(D) if norm == "fro" else D.abs().amax(dim=(-2, -1))


def perturbations(model, x, layer, norm: str = "fro", *, inside: float | None = None,
                  outside: float | None = None, bias: bool = False):
    """Weight perturbations of one layer on inputs ``x``, inside or outside the certificate.

    ``inside=f`` (``0 <= f < 1``): per input, a random, sign-pattern or witness direction
    scaled to norm ``u f lower`` with ``u`` drawn from ``[0, 1]``: the certificate says no
    such change alters a prediction. ``outside=s`` (``s >= 1``): the verified witness of
    ``layer_radii`` (norm ``upper``) scaled by a factor drawn from ``[1, s]``, only on the
    inputs that have one; factor 1 changes the class (verified by a forward pass), larger
    factors usually do. The radii are computed once, at the first draw.
    """
    st = _strategies()
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if (inside is None) == (outside is None):
        raise ValueError("give exactly one of inside=FRACTION (in [0, 1)) or "
                         "outside=FACTOR (>= 1)")
    if inside is not None and not 0 <= inside < 1:
        raise ValueError(f"inside is a fraction of the certified radius in [0, 1), got "
                         f"{inside!r}")
    if outside is not None and not outside >= 1:
        raise ValueError(f"outside is a factor >= 1 applied to the witness, got {outside!r}")
    x = as_float64(x, "x")
    network = network_of(model, x)
    index = affine_index(network, layer)
    cache: list = []

    def radii():
        if not cache:
            cache.append(layer_radii(network, x, index, norm, bias))
        return cache[0]

    @st.composite
    def draw_perturbation(draw) -> Perturbation:
        r = radii()
        D = r.witness.matrix()
        if outside is not None:
            found = torch.isfinite(r.upper)
            if not found.any():
                from hypothesis import reject

                reject()  # no input of x has a witness in this layer
            t = torch.tensor(draw(st.lists(st.floats(1.0, outside), min_size=int(found.sum()),
                                           max_size=int(found.sum()))), dtype=torch.float64,
                             device=D.device)
            delta = D[found] * t[:, None, None]
            return Perturbation(r.layer, norm, bias, x[found], delta, _norm(delta, norm),
                                r.lower[found], r.upper[found])
        # Drawn on the CPU and moved: the same directions on every device.
        generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        direction = torch.randn(D.shape, dtype=torch.float64, generator=generator,
                                device="cpu").to(D.device)
        kind = draw(st.sampled_from(["random", "sign", "witness"]))
        if kind == "sign":
            direction = torch.sign(direction)
        elif kind == "witness":
            direction = torch.where(torch.isfinite(r.upper)[:, None, None], D, direction)
        length = _norm(direction, norm)
        direction = direction / torch.where(length > 0, length, 1.0)[:, None, None]
        u = torch.tensor(draw(st.lists(st.floats(0.0, 1.0), min_size=len(x),
                                       max_size=len(x))), dtype=torch.float64, device=D.device)
        # lower = inf: the layer's input is zero and no change of W moves anything.
        target = torch.where(torch.isfinite(r.lower), r.lower, torch.ones_like(r.lower))
        # The rescaling rounds: keep the norm strictly below the fraction of the radius.
        delta = direction * (u * inside * target * (1 - 1e-12))[:, None, None]
        return Perturbation(r.layer, norm, bias, x, delta, _norm(delta, norm), r.lower, r.upper)

    return draw_perturbation()


def compressions(*, kinds: Sequence[str] = ("rank", "bits", "bits_per_channel", "prune"),
                 layers: Sequence[str] | None = None, ranks=(0, 16), bits=(2, 12),
                 prune=(0.0, 1.0)):
    """``certify.closed_forms.compressions.Compression`` objects: a kind from ``kinds`` at a level drawn
    from ``ranks``, ``bits`` or ``prune`` (a fraction range). ``layers``: layer names, one
    of which is drawn (a single-layer compression, the case a certificate covers);
    ``None`` compresses every affine layer."""
    st = _strategies()
    if not kinds or set(kinds) - {"rank", "bits", "bits_per_channel", "prune"}:
        raise ValueError(f"kinds must be a non-empty subset of rank, bits, bits_per_channel, "
                         f"prune, got {kinds!r}")
    ranks, bits = _range(ranks, "ranks", 0), _range(bits, "bits", 2)
    lo, hi = prune
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"prune must be a range (lo, hi) with 0 <= lo <= hi <= 1, got {prune!r}")
    levels = {"rank": st.integers(*ranks), "bits": st.integers(*bits),
              "bits_per_channel": st.integers(*bits), "prune": st.floats(lo, hi)}
    chosen = st.none() if layers is None else st.sampled_from(list(layers)).map(lambda n: (n,))
    return st.sampled_from(list(kinds)).flatmap(
        lambda kind: st.builds(Compression, st.just(kind), levels[kind], chosen))
