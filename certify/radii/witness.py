"""Section 3 in weight space: the first-order estimate and verified witnesses (THEORY.md
sections 2 and 3) for one affine layer ``Z = W P~ (+ b)``, every input at once.

* ``first_order``: the back-propagated-margin estimate ``min_j m_j / ||g_j P~^T||_dual``,
  ``g_j = d m_j / d Z`` (an ESTIMATE: exact while no activation flips, never a bound).
* ``witness``: a weight change ``D`` that really changes the class, found by weight-space
  DeepFool (the minimal-norm step of section 3 that zeroes the linearised smallest margin,
  re-linearised until a forward pass flips the class) and shrunk by bisection; its norm is
  a verified UPPER bound of the minimal radius.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from certify.graph.gradients import output_gradients
from certify.graph.operators import Affine

WITNESS_GAP = 1e-12  # relative: how far another logit must pass the predicted one
WITNESS_CLASSES = 16  # classes a witness search steers toward (every class can flip it)


def augmented_weight(layer: Affine, bias: bool) -> torch.Tensor:
    """``W~``: the weight matrix, with the bias as a last column when it is perturbed."""
    W = layer.matrix
    return torch.cat([W, layer.bias[:, None]], dim=1) if bias else W


def _margin_gradients(network, index, Z, y, values, classes=None):
    """``g_j = d m_j / d Z`` for every class ``j`` (or the classes ``(B, K)``) as columns
    ``(B, C, m, L)``, and the logits (every node that does not depend on the layer held at its
    value in ``values``)."""
    Z = Z.detach().requires_grad_(True)
    logits = network.run(index, Z, values)
    m = logits.gather(-1, y[:, None]) - logits
    m = m if classes is None else m.gather(-1, classes)
    (g,) = output_gradients(m, [Z])
    return network.layer(index).columns(g.flatten(0, 1)).unflatten(0, g.shape[:2]), \
        logits.detach()


def _gradient(g: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``d m_j / d D = g_j P~^T`` for one class per input: ``(B, m, L) x (B, n, L)``."""
    return torch.matmul(g, P.transpose(1, 2))


def _dual_norms(g: torch.Tensor, P: torch.Tensor, norm: str) -> torch.Tensor:
    """``||g_j P~^T||_dual`` for every class, ``(B, C)``; rank one for dense layers."""
    if P.shape[-1] == 1:  # ||g h^T||_F = ||g||_2 ||h||_2, ||g h^T||_sum = ||g||_1 ||h||_1
        ord = 2 if norm == "fro" else 1
        return torch.linalg.vector_norm(g[..., 0], ord=ord, dim=-1) * \
            torch.linalg.vector_norm(P[:, None, :, 0], ord=ord, dim=-1)
    return _dual(torch.matmul(g, P.transpose(1, 2)[:, None]), norm)


def _dual(G: torch.Tensor, norm: str) -> torch.Tensor:
    """Dual norm of a gradient w.r.t. ``D`` (last two axes): Frobenius or entrywise sum."""
    return torch.linalg.matrix_norm(G) if norm == "fro" else G.abs().sum(dim=(-2, -1))


def first_order(network, index, P, Z, y, norm, values, classes=None):
    """Section 3 estimate ``min_j m_j / ||g_j P~^T||_dual``; also ``g``, the margins and ratios.
    ``classes`` ``(B, K)``: over these classes only (``g``, margins and ratios per column)."""
    g, logits = _margin_gradients(network, index, Z, y, values, classes)
    m = logits.gather(-1, y[:, None]) - logits
    if classes is None:
        classes = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    m = m.gather(-1, classes)
    ratio = torch.where(classes == y[:, None], math.inf, m / _dual_norms(g, P, norm))
    return ratio.amin(dim=-1), g, m, ratio


def candidates(ratio: torch.Tensor, count: int = WITNESS_CLASSES) -> torch.Tensor:
    """The ``count`` classes ``(B, count)`` of smallest first-order ratio (``first_order``'s):
    the ones a witness search steers toward."""
    return ratio.topk(min(count, ratio.shape[-1]), dim=-1, largest=False).indices


def _step(G: torch.Tensor, m: torch.Tensor, norm: str) -> torch.Tensor:
    """The minimal-norm ``D`` with ``<D, G> = -m`` (section 3, any ``G``)."""
    if norm == "fro":
        return -m[:, None, None] * G / torch.linalg.matrix_norm(G)[:, None, None] ** 2
    return -m[:, None, None] * torch.sign(G) / G.abs().sum(dim=(-2, -1))[:, None, None]


@dataclass(frozen=True)
class Witness:
    """Per-input weight perturbations that change the class.

    Dense layers: every DeepFool step is rank one with the same right factor
    (``h~`` for Frobenius, ``sign(h~)`` for entrywise max), so ``D = left right^T`` is stored
    as its two factors (``(B, m)`` and ``(B, n)``). Convolutions: ``full`` is ``(B, m, n)``.
    """

    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    full: torch.Tensor | None = None

    def matrix(self) -> torch.Tensor:
        return self.full if self.full is not None else self.left[:, :, None] * self.right[:, None, :]

    def norm(self, norm: str) -> torch.Tensor:
        if self.full is not None:
            return weight_norm(self.full, norm)
        ord = 2 if norm == "fro" else math.inf
        return torch.linalg.vector_norm(self.left, ord=ord, dim=-1) * \
            torch.linalg.vector_norm(self.right, ord=ord, dim=-1)

    @property
    def free(self) -> torch.Tensor:
        """The factor a search moves: ``full``, or ``left`` (the right factor stays)."""
        return self.full if self.full is not None else self.left

    def with_free(self, X: torch.Tensor) -> "Witness":
        """This witness with the free factor ``X``."""
        return Witness(full=X) if self.full is not None else Witness(left=X, right=self.right)

    def rows(self, index: torch.Tensor) -> "Witness":
        """The witnesses of the inputs ``index``."""
        if self.full is not None:
            return Witness(full=self.full[index])
        return Witness(left=self.left[index], right=self.right[index])

    def scaled(self, t: torch.Tensor) -> "Witness":
        if self.full is not None:
            return Witness(full=t[:, None, None] * self.full)
        return Witness(left=t[:, None] * self.left, right=self.right)

    def change(self, P: torch.Tensor) -> torch.Tensor:
        """``D P~`` as ``(B, m, L)``."""
        if self.full is not None:
            return torch.matmul(self.full, P)
        return self.left[:, :, None] * (self.right[:, :, None] * P).sum(dim=1, keepdim=True)


def weight_norm(D: torch.Tensor, norm: str) -> torch.Tensor:
    """``||D||_F`` or ``||D||_max`` of a batch of matrices ``(B, m, n)``."""
    return torch.linalg.matrix_norm(D) if norm == "fro" else D.abs().amax(dim=(-2, -1))


def _unperturbed(layer, W, P, bias) -> torch.Tensor:
    """``W P~`` (+ the fixed bias) as ``(B, m, L)``: one matrix product for dense layers."""
    if P.shape[-1] == 1:
        Z = (P[..., 0] @ W.T)[..., None]
    else:
        Z = torch.matmul(W, P)
    return Z if bias else Z + layer.bias[:, None]


def _perturbed(layer: Affine, Z0: torch.Tensor, D: Witness, P, out_shape) -> torch.Tensor:
    """``Z = (W + D) P~ (+ b) = Z0 + D P~``, shaped like the layer's output."""
    return layer.uncolumns(Z0 + D.change(P), out_shape)


def _flips(network, index, Z0, D: Witness, P, y, out_shape, values) -> torch.Tensor:
    """Forward pass with the perturbed weights ``W + D``: did the class change?"""
    return _margin_and_flip(network, index, Z0, D, P, y, out_shape, values)[1]


def _margin_and_flip(network, index, Z0, D: Witness, P, y, out_shape, values):
    """``o_y - max_{j != y} o_j`` with ``W + D`` (differentiable in ``D``), and whether the
    class changed: another class must win by more than rounding, as a tie decided by the
    last bit is no witness (certify check accepts it only beyond the same relative gap)."""
    logits = network.run(index, _perturbed(network.layer(index), Z0, D, P, out_shape), values)
    other = logits.scatter(-1, y[:, None], -math.inf).amax(-1)
    margin = logits.gather(-1, y[:, None])[:, 0] - other
    return margin, -margin.detach() > WITNESS_GAP * logits.detach().abs().amax(-1)


def _start(W, P, norm, start) -> Witness:
    if start is not None:
        return start
    if P.shape[-1] > 1:
        return Witness(full=W.new_zeros(P.shape[0], *W.shape))
    h = P[..., 0]
    right = h if norm == "fro" else torch.sign(h)
    return Witness(left=W.new_zeros(P.shape[0], W.shape[0]), right=right)


def _dense_step(g: torch.Tensor, m: torch.Tensor, h: torch.Tensor, norm: str) -> torch.Tensor:
    """Left factor of the section-3 step for ``G = g h^T`` (the right factor is fixed)."""
    if norm == "fro":
        scale = (g**2).sum(-1) * (h**2).sum(-1)
        return -m[:, None] * g / scale[:, None]
    scale = g.abs().sum(-1) * h.abs().sum(-1)
    return -m[:, None] * torch.sign(g) / scale[:, None]


def witness(network, index, P, y, norm, bias, out_shape, start: Witness | None = None,
            iterations: int = 50, overshoot: float = 1.02,
            values=(), minimum_norm_steps: int = 30,
            classes: torch.Tensor | None = None) -> tuple[torch.Tensor, Witness]:
    """A verified ``D`` that changes the class, per input; ``(upper, D)``.

    Weight-space DeepFool from ``start`` (zero by default): step to the minimal-norm ``D``
    that zeroes the linearised smallest margin (section 3), overshot by ``overshoot`` and
    by ``2 WITNESS_GAP max|o|`` (so that a step from a near-tie still passes it), re-linearise,
    repeat until a forward pass with ``W + D`` changes the class by more than rounding
    (``_flips``); shrink ``t D`` by bisection while it still does; then
    ``minimum_norm_steps`` of a fast-minimum-norm attack from there (``_minimum_norm``), which
    finds a smaller witness where DeepFool's is not locally minimal, or one where DeepFool
    found none, shrunk again. ``upper`` is ``inf`` where no witness was found. ``values``:
    every node's unperturbed value (``network.values(x)``). ``classes`` ``(B, K)``: the
    DeepFool steps steer toward these classes only (``candidates``: one backward row per
    class and step); whether a step flips is decided by a forward pass over every class.
    """
    layer = network.layer(index)
    W = augmented_weight(layer, bias)
    B = P.shape[0]
    D = _start(W, P, norm, start)
    Z0 = _unperturbed(layer, W, P, bias)  # computed once: every step only adds D P~
    rows = torch.arange(B, device=P.device)
    push = 2 * WITNESS_GAP * values[-1].abs().amax(-1)
    for _ in range(iterations):
        done = _flips(network, index, Z0, D, P, y, out_shape, values)
        if done.all():
            break
        Z = _perturbed(layer, Z0, D, P, out_shape)
        _, g, m, ratio = first_order(network, index, P, Z, y, norm, values, classes)
        j = ratio.argmin(dim=-1)
        # No first-order direction (every margin gradient is zero, e.g. dead ReLUs): stuck.
        stuck = ~torch.isfinite(ratio[rows, j])
        keep = (done | stuck)
        if D.full is not None:
            step = _step(_gradient(g[rows, j], P), m[rows, j] * overshoot + push, norm)
            D = Witness(full=torch.where(keep[:, None, None], D.full, D.full + step))
        else:
            step = _dense_step(g[rows, j][..., 0], m[rows, j] * overshoot + push, P[..., 0],
                               norm)
            D = Witness(left=torch.where(keep[:, None], D.left, D.left + step), right=D.right)
        if keep.all():
            break
    found = _flips(network, index, Z0, D, P, y, out_shape, values)
    if minimum_norm_steps and not found.all():
        D, found = _restarted(network, index, Z0, D, P, y, norm, out_shape, values, found, W)
    D = _shrunk(network, index, Z0, D, P, y, out_shape, values, found)
    if minimum_norm_steps:
        D, found = _minimum_norm(network, index, Z0, D, P, y, norm, out_shape, values, found,
                                 minimum_norm_steps)
        found = found & _flips(network, index, Z0, D, P, y, out_shape, values)
        D = _shrunk(network, index, Z0, D, P, y, out_shape, values, found, steps=20)
    upper = torch.where(found, D.norm(norm), torch.full_like(push, math.inf))
    return upper, D


RESTART_DIRECTIONS = 16
RESTART_SCALES = tuple(2.0**k for k in range(-12, 9))  # times ||W||


def _restarted(network, index, Z0, D: Witness, P, y, norm, out_shape, values, found,
               W) -> tuple[Witness, torch.Tensor]:
    """Witnesses by random search where DeepFool found none (its steps vanish where the
    downstream ReLUs are dead): ``RESTART_DIRECTIONS`` random directions of the free factor
    (Gaussian for Frobenius, random signs, vertices of the ball, for max) at the scales
    ``RESTART_SCALES`` times ``||W||``, smallest first; the first that flips is kept. Only
    the inputs without a witness are run."""
    generator = torch.Generator(device=P.device).manual_seed(0)  # the same witness every run
    X = D.free
    directions = torch.randn((RESTART_DIRECTIONS, *X.shape), dtype=X.dtype, device=X.device,
                             generator=generator)
    if norm == "max":
        directions = torch.sign(directions)
    else:
        directions = directions / torch.linalg.vector_norm(directions.flatten(2), dim=-1)[
            ..., *[None] * (X.ndim - 1)]
    todo = torch.nonzero(~found)[:, 0]
    part = D.rows(todo)
    Z0, P, y, values = Z0[todo], P[todo], y[todo], [v[todo] for v in values]
    chosen, hit = part.free.clone(), torch.zeros_like(todo, dtype=torch.bool)
    scale = float(weight_norm(W[None], norm)[0])
    for t in RESTART_SCALES:
        for d in directions[:, todo]:
            E = part.with_free(t * scale * d)
            flip = _flips(network, index, Z0, E, P, y, out_shape, values) & ~hit
            chosen = torch.where(flip.reshape(-1, *[1] * (X.ndim - 1)), E.free, chosen)
            hit = hit | flip
            if hit.all():
                break
        if hit.all():
            break
    X = X.clone()
    X[todo] = chosen
    found = found.clone()
    found[todo] = hit
    return D.with_free(X), found


def _shrunk(network, index, Z0, D: Witness, P, y, out_shape, values, found,
            steps: int = 30) -> Witness:
    """``t D`` with the smallest ``t`` in ``(0, 1]`` that still flips (bisection), where
    ``found``; ``D`` itself elsewhere."""
    lo, hi = P.new_zeros(len(P)), P.new_ones(len(P))
    for _ in range(steps):
        mid = (lo + hi) / 2
        flip = _flips(network, index, Z0, D.scaled(mid), P, y, out_shape, values) & found
        hi, lo = torch.where(flip, mid, hi), torch.where(flip, lo, mid)
    return D.scaled(hi)


def _fitted(X: torch.Tensor, radius: torch.Tensor, norm: str) -> torch.Tensor:
    """``X`` projected onto ``{||X|| <= radius}`` (l2 of the flattened entries, or max)."""
    r = radius.reshape(-1, *[1] * (X.ndim - 1))
    if norm == "fro":
        size = torch.linalg.vector_norm(X.flatten(1), dim=-1).reshape(r.shape)
        return X * torch.clamp(r / size.clamp(min=1e-300), max=1.0)
    return torch.maximum(torch.minimum(X, r), -r)


def _minimum_norm(network, index, Z0, D: Witness, P, y, norm, out_shape, values, found,
                  steps: int) -> tuple[Witness, torch.Tensor]:
    """A smaller witness by a fast-minimum-norm attack (Pintor et al., 2021) in weight space.

    The free factor ``X`` of ``D`` (``full``; for a dense layer ``left``, whose norm is
    ``||D||`` up to the fixed right factor's) descends the margin ``o_y - max_j o_j`` by
    normalised steps (``g / ||g||_2`` for Frobenius, ``sign(g)`` for max) of ``alpha eps``
    inside the ball ``||X|| <= eps``; ``eps`` shrinks by ``1 - gamma`` below the best witness
    while ``X`` flips the class and grows by ``1 + gamma`` while it does not (``alpha``,
    ``gamma`` annealed). It starts at ``D``, so where DeepFool found no witness it may still
    find one. Returns the smallest ``X`` that flipped (``D`` where none did) and ``found``.
    """
    X0, wrap = D.free, D.with_free
    size = (lambda X: torch.linalg.vector_norm(X.flatten(1), dim=-1)) if norm == "fro" else \
        (lambda X: X.flatten(1).abs().amax(-1))
    best, best_size = X0.clone(), torch.where(found, size(X0), math.inf)
    eps = size(X0).clamp(min=1e-300)
    X = X0.clone()
    for k in range(steps):
        anneal = 0.5 * (1 + math.cos(math.pi * k / steps))
        alpha, gamma = 0.02 + 0.28 * anneal, 0.01 + 0.04 * anneal
        X = X.detach().requires_grad_(True)
        margin, flip = _margin_and_flip(network, index, Z0, wrap(X), P, y, out_shape, values)
        (g,) = torch.autograd.grad(margin.sum(), X)
        with torch.no_grad():
            smaller = flip & (size(X) < best_size)
            best = torch.where(smaller.reshape(-1, *[1] * (X.ndim - 1)), X, best)
            best_size = torch.where(smaller, size(X), best_size)
            found = found | flip
            eps = torch.where(flip, torch.minimum(eps, best_size) * (1 - gamma), eps * (1 + gamma))
            if norm == "fro":
                step = g / torch.linalg.vector_norm(g.flatten(1), dim=-1).clamp(
                    min=1e-300).reshape(-1, *[1] * (g.ndim - 1))
            else:
                step = torch.sign(g)
            X = _fitted(X - alpha * eps.reshape(-1, *[1] * (X.ndim - 1)) * step, eps, norm)
    return wrap(best.detach()), found


