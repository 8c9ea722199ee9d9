"""Test your own model with certify: hypothesis strategies and pytest assertions.

Assertions (plain functions: they raise ``AssertionError`` with a short, precise message,
and return the proved ``Claim`` objects otherwise)::

    from certify.testing import assert_robust, assert_compression_safe

    assert_robust(model, x_calibration, rank=32, bits=8, prune=0.2, radius=1e-3)
    assert_compression_safe(model, x_calibration, "bits=8")

``assert_robust`` proves, layer by layer (each layer compressed or perturbed ALONE), that no
prediction on ``x`` can change under SVD truncation to any rank ``>= rank``, symmetric
quantisation (per tensor or per channel) to any ``>= bits`` bits, magnitude pruning of any
fraction ``<= prune``, or any weight change of norm ``< radius``. The proof is the
certificate: the sound per-input radii of ``certify.radius.layer_radii`` against the
section-6 error bounds of ``certify.compression`` (THEORY.md sections 4 to 6).
``assert_compression_safe`` proves one concrete compression (also of several layers at
once, through the section-5 multi-layer bound) and runs the compressed model as well.

Strategies (need ``hypothesis``: ``pip install certify[test]``): ``networks`` (small torch
models), ``inputs``, ``perturbations`` (weight changes inside or outside a certified
radius) and ``compressions`` (``certify.compressed.Compression`` objects).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from certify.compressed import Compression, compression_check, parse_compression, prune_count
from certify.compression import (EPS, _below, pruning_error, quantisation_error,
                                 truncation_error)
from certify.multilayer import multilayer_bound
from certify.capture import capture
from certify.graph import Graph
from certify.operators import Affine
from certify.perturbation import as_float64
from certify.radius import NORMS, layer_radii, predictions

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu")
LAYER_TYPES = ("linear", "conv")
POOLING = ("max", "avg")
CHUNK = 64  # inputs per layer_radii call (memory)


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


def _network(model, x) -> Graph:
    """``model`` as a graph: a ``Graph`` as it is, a module captured for inputs like ``x``
    and put on their device."""
    if isinstance(model, Graph):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a certify Graph, got "
                        f"{type(model).__name__}")
    return capture(model, x).to(x.device)


def _affine_index(network: Graph, layer) -> int:
    """The node index of an affine layer given by name (or by node index)."""
    for i in network.affine_indices:
        if layer == network.nodes[i].name or layer == i:
            return i
    raise ValueError(f"layer {layer!r} is not an affine layer of the model; the affine "
                     f"layers are: {', '.join(network.layer_names)}")


def _columns(layer: Affine, h: torch.Tensor, bias: bool) -> torch.Tensor:
    """The layer input as columns ``(B, n, L)``, with a row of ones when the bias moves."""
    P = layer.patches(h)
    return torch.cat([P, torch.ones_like(P[:, :1])], dim=1) if bias else P


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
        network = _network(model, self.x)
        index = _affine_index(network, self.layer)
        layer = network.layer(index)
        values = network.values(self.x)
        P = _columns(layer, values[network.input_of(index)], self.bias)
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
    network = _network(model, x)
    index = _affine_index(network, layer)
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
    """``certify.compressed.Compression`` objects: a kind from ``kinds`` at a level drawn
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


# ---------------------------------------------------------------- assertions


@dataclass(frozen=True)
class Claim:
    """One claim about one layer (or several at once) on every input.

    ``required[norm]``: the weight error (or perturbation norm) the inputs must tolerate in
    that norm; ``lower[norm]``: their certified radii (``(B,)``). Several layers at once
    (``certificate="multilayer"``): ``required[norm]`` is 1 and ``lower[norm]`` the smallest
    ``m_j / bound_j`` of the section-5 bound with the layers' errors as budgets.
    ``proved``: the claim is certified on that input; ``refuted``: a verified
    counterexample exists there (a witness of smaller norm, or the concrete compressed model
    changing the class).
    """

    layer: str
    statement: str
    required: dict[str, float]
    lower: dict[str, torch.Tensor]
    proved: torch.Tensor
    refuted: torch.Tensor
    certificate: str = "radius"


class _Certificate:
    """Radii per (layer, norm), computed once per assertion, in chunks of inputs."""

    def __init__(self, network: Graph, x: torch.Tensor, bias: bool):
        self.network, self.x, self.bias = network, x, bias
        self.classes, margins = predictions(network, x)
        self.margins = margins.amin(dim=-1)
        self._radii: dict = {}

    def radii(self, index: int, norm: str):
        if (index, norm) not in self._radii:
            parts = [layer_radii(self.network, self.x[i:i + CHUNK], index, norm, self.bias)
                     for i in range(0, len(self.x), CHUNK)]
            self._radii[index, norm] = (torch.cat([p.lower for p in parts]),
                                        torch.cat([p.upper for p in parts]))
        return self._radii[index, norm]


def _setup(model, x, layers, bias: bool):
    x = as_float64(x, "x")
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"x must be a non-empty batch (B, ...) of inputs, got shape "
                         f"{tuple(x.shape)}; add a batch axis with x[None]")
    network = _network(model, x)
    if isinstance(layers, str):
        layers = [layers]
    indices = network.affine_indices if layers is None else \
        [_affine_index(network, name) for name in layers]
    return network, x, indices, _Certificate(network, x, bias)


def _compression_errors(W: torch.Tensor, kind: str, level, dense: bool) -> dict[str, float]:
    """Upper bounds of ``||W - g(W)||`` over every level at least as gentle as ``level``,
    in the geometry of each radius (section 6; ``compression.thresholds``' comparisons).

    ``fro`` radius: the spectral norm of a dense layer on a vector (section 4), the Frobenius
    norm of a convolution or a dense layer over a sequence; ``max`` radius: the entrywise max. Rank ``>= r``: ``sigma_{r+1}`` (and the
    Frobenius tail), ``||E||_max <= ||E||_2``. Bits ``>= b``: ``s/2`` entrywise with the
    per-tensor step, which bounds the per-channel steps too, ``sqrt(m n) s/2`` in Frobenius.
    Pruning ``<= p``: the largest pruned magnitude and the norm of the pruned weights.
    """
    if kind == "rank":
        errors = truncation_error(W)
        r = min(level, min(W.shape))
        spectral = float(errors.spectral[r])
        return {"fro": spectral if dense else float(errors.frobenius[r]), "max": spectral}
    if kind == "bits":
        entry = float(quantisation_error(W, level))
        return {"fro": math.sqrt(W.numel()) * entry * (1 + 4 * EPS), "max": entry}
    errors = pruning_error(W)
    k = prune_count(level, W.numel())
    return {"fro": float(errors.frobenius[k]), "max": float(errors.max[k])}


def _proved(required: dict[str, float], lower: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([_below(torch.tensor(required[n], dtype=torch.float64,
                                            device=lower[n].device), lower[n])
                        for n in required]).any(dim=0)


def _describe(claim: Claim, certificate: _Certificate, note) -> str:
    """One line: the claim, its worst input (a refuted one first), that input's radius
    against the requirement; ``note(input)`` adds the counterexample, if any."""
    failed = ~claim.proved
    total = len(failed)
    ratio = torch.stack([claim.lower[n] / claim.required[n] if claim.required[n] > 0
                         else torch.full_like(claim.lower[n], math.inf)
                         for n in claim.required]).amax(dim=0)
    pool = claim.refuted if claim.refuted.any() else failed
    worst = int(torch.nonzero(pool)[ratio[pool].argmin(), 0])
    norm = max(claim.required, key=lambda n: float(claim.lower[n][worst] / claim.required[n])
               if claim.required[n] > 0 else math.inf)
    verdict = "REFUTED" if claim.refuted[worst] else "not proved"
    value = float(claim.lower[norm][worst])
    evidence = (f"certified radius {value:.3g} ({norm}) < required {claim.required[norm]:.3g}"
                if claim.certificate == "radius" else
                f"section-5 bound: margin / margin change {value:.3g} ({norm}) <= 1")
    layer = f"layer{'s' if ',' in claim.layer else ''} '{claim.layer}'"
    return (f"{layer}, {claim.statement}: {verdict} on input {worst} "
            f"(class {int(certificate.classes[worst])}, margin "
            f"{float(certificate.margins[worst]):.3g}): {evidence}{note(worst)}; "
            f"{int(failed.sum())} of {total} inputs not certified")


def _fail(claims: list[tuple[Claim, object]], certificate: _Certificate) -> None:
    bad = [(c, note) for c, note in claims if not c.proved.all()]
    if bad:
        lines = [_describe(c, certificate, note) for c, note in bad]
        raise AssertionError(f"certify: {len(bad)} claim(s) fail on {len(certificate.x)} "
                             "inputs\n  " + "\n  ".join(lines))


def assert_robust(model, x, *, rank: int | None = None, bits: int | None = None,
                  prune: float | None = None, radius: float | None = None, layers=None,
                  norm: str = "fro", bias: bool = False) -> tuple[Claim, ...]:
    """Prove that no prediction of ``model`` on ``x`` changes when ONE chosen layer (each of
    ``layers``, default every affine layer, in turn) is truncated to any rank ``>= rank``,
    quantised to any ``>= bits`` bits, magnitude-pruned by any fraction ``<= prune``, or
    changed by any ``D`` with ``||D|| < radius`` in ``norm`` (``"fro"`` or ``"max"``;
    ``bias``: the bias is perturbed too, radius claims only).

    Certified when the section-6 error bound (``_compression_errors``) is below the input's
    certified radius in ``fro`` or ``max`` (sections 4 to 6), or ``radius <= lower``.
    Otherwise raises ``AssertionError`` naming, per failing claim, the layer, the worst
    input, its class and logit margin, its certified radius against the required one, and
    ``REFUTED`` when a verified witness of norm ``< radius`` changes that input's class.
    Returns the proved claims.
    """
    claims_asked = {"rank": rank, "bits": bits, "prune": prune, "radius": radius}
    if all(v is None for v in claims_asked.values()):
        raise ValueError("nothing to prove: give at least one of rank=, bits=, prune=, "
                         "radius=")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    for kind in ("rank", "bits", "prune"):  # validated as certify.compressed does
        if claims_asked[kind] is not None:
            Compression(kind, claims_asked[kind])
    if radius is not None and not (isinstance(radius, (int, float)) and radius >= 0):
        raise ValueError(f"radius must be a number >= 0, got {radius!r}")
    network, x, indices, certificate = _setup(model, x, layers, bias)
    claims = []
    for index in indices:
        layer, name = network.layer(index), network.nodes[index].name
        for kind, statement in (("rank", f"rank >= {rank}"), ("bits", f"bits >= {bits}"),
                                ("prune", f"prune <= {prune}")):
            if claims_asked[kind] is None:
                continue
            required = _compression_errors(layer.matrix, kind, claims_asked[kind],
                                           dense=network.is_dense(index))
            lower = {n: certificate.radii(index, n)[0] for n in NORMS}
            claims.append((Claim(name, statement, required, lower,
                                 _proved(required, lower),
                                 torch.zeros(len(x), dtype=bool, device=x.device)),
                           lambda i: " (weight error bound)"))
        if radius is not None:
            lower, upper = certificate.radii(index, norm)
            sign = "||D||_F" if norm == "fro" else "||D||_max"
            claims.append((Claim(name, f"{sign} < {radius:g}", {norm: float(radius)},
                                 {norm: lower}, radius <= lower, upper < radius),
                           lambda i, upper=upper: f"; a witness of norm {float(upper[i]):.3g} "
                           "changes its class" if upper[i] < radius else ""))
    _fail(claims, certificate)
    return tuple(c for c, _ in claims)


def assert_compression_safe(model, x, compression: str | Compression | None = None, *,
                            rank: int | None = None, bits: int | None = None,
                            bits_per_channel: int | None = None, prune: float | None = None,
                            layers=None) -> tuple[Claim, ...]:
    """Prove that one concrete compression changes no prediction on ``x``, and run it.

    ``compression``: ``"bits=4@fc1"`` or a ``Compression``; or keywords ``rank=``, ``bits=``,
    ``bits_per_channel=``, ``prune=`` (each applied to ``layers``, default all affine
    layers). One compressed layer: its exact weight error below the certified radius
    (``certify.compressed.compression_check``). Several: the section-5 multi-layer bound
    with budgets the layers' exact errors, in ``fro`` or ``max``. The compressed model is
    also run: a changed prediction is reported as ``REFUTED``; an unchanged one without a
    proof still fails (a test passing is not a proof).
    """
    network, x, _, certificate = _setup(model, x, None, False)
    if isinstance(layers, str):
        layers = [layers]
    asked = [Compression(kind, level, None if layers is None else tuple(layers))
             for kind, level in (("rank", rank), ("bits", bits),
                                 ("bits_per_channel", bits_per_channel), ("prune", prune))
             if level is not None]
    if compression is not None:
        asked.insert(0, compression if isinstance(compression, Compression)
                     else parse_compression(compression))
    if not asked:
        raise ValueError("nothing to check: give a compression such as 'bits=8' or one of "
                         "rank=, bits=, bits_per_channel=, prune=")
    claims = []
    for c in asked:
        chosen = list(c.layers) if c.layers is not None else network.layer_names
        indices = [_affine_index(network, name) for name in chosen]
        lower = {network.nodes[i].name: {n: certificate.radii(i, n)[0] for n in NORMS}
                 for i in indices}
        result = compression_check(network, x, c, lower, CHUNK)
        errors = {layer.name: {"fro": layer.error_fro, "max": layer.error_max}
                  for layer in result.layers}
        if len(result.layers) == 1:
            layer = result.layers[0]
            dense = network.is_dense(indices[0])
            required = {"fro": layer.error_spectral if dense else layer.error_fro,
                        "max": layer.error_max}
            claim = Claim(layer.name, str(c), required, lower[layer.name], result.harmless,
                          result.changed)
        else:  # several layers at once: the section-5 bound, as result.harmless
            ratios, proved = {}, torch.zeros(len(x), dtype=torch.bool, device=x.device)
            for n in NORMS:
                budgets = [errors.get(network.nodes[i].name, {n: 0.0})[n]
                           for i in network.affine_indices]
                bound = multilayer_bound(network, x, budgets, n)
                ratios[n] = (bound.margins / bound.bound).amin(dim=-1)
                proved |= bound.certified
            claim = Claim(",".join(chosen), str(c), {n: 1.0 for n in NORMS}, ratios, proved,
                          result.changed, "multilayer")
        def note(i, result=result):
            if not result.changed[i]:
                return ""
            return f"; the compressed model predicts {int(result.compressed_predictions[i])}"

        claims.append((dataclasses.replace(claim, proved=claim.proved & ~result.changed), note))
    _fail(claims, certificate)
    return tuple(c for c, _ in claims)
