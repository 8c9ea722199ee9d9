"""The deviation rules of THEORY.md section 9 for the numpy twins (``certify.check.deviations``).

At the clean inputs ``u`` of a node, with input deviations ``|delta_i| <= r_i`` entrywise:

* ``spread``: an entrywise bound of ``|J delta|`` for the clean Jacobian ``J`` (the one the
  twins' ``gradient`` applies, torch's choice at kinks): ``|f|(r)`` for a linear map (its
  forward enclosure of the boxes ``0 +- r``: the map with absolute coefficients);
  ``|phi'(u)| r`` for an activation or PReLU; ``r_x |y| + |x| r_y`` for a product;
  ``p r + p (p . r)`` for softmax (``J = diag(p) - p p^T``); for the sphere map
  ``y -> y / ||y||`` (``J = (I - yhat yhat^T) / ||y||``) ``(r + |yhat| (|yhat| . r)) / ||y||``,
  which LayerNorm applies to ``|C| r = (1 - 2/n) r + sum(r) / n`` (``C = I - 1 1^T / n``)
  and scales by ``sqrt(n) |g|``;
* ``remainder``: a bound of ``|f(u + delta) - f(u) - J delta|``, entrywise, or
  ``(scale, bound)`` for ``R = scale * r`` with ``||r||_2 <= bound`` per row of the last axis
  (``rows``: per input ``None`` or an l2 bound of each row of ``delta``, centred where
  ``row_norm`` says so):

  - ReLU, LeakyReLU (slope ``a``), PReLU: ``|1 - a| (d - |u|)_+``: nothing while the kink
    cannot be crossed; the clipped lines (slope ``a`` between the kinks ``k1 < k2``):
    ``|a| (d - min(|u - k1|, |u - k2|))_+``;
  - smooth activations: ``sup |phi''| d^2 / 2`` (Taylor), ``CURVATURE``;
  - product: ``dx dy`` exactly, ``|dx dy| <= r_x r_y`` (for ``@`` summed over the inner axis);
  - softmax: ``1/2 sup p osc^2``, ``osc = max_j eta_j - min_j eta_j`` over the kept entries
    (``p_i'' = p_i ((eta_i - eta_bar)^2 - Var_p eta)`` along the segment), with
    ``osc <= 2 max_kept d`` and ``osc <= sqrt(2) ||C eta||``, ``sup p`` the interval rule's
    on ``u +- d``;
  - the sphere map, for a change of l2 norm ``h < ||y||``: ``h^2 / (sqrt 3 (||y|| - h)^2)``
    (``||D^2 f[h, h]|| <= (2 / sqrt 3) ||h||^2 / ||y||^2`` on the segment, whose norms are
    at least ``||y|| - h``); LayerNorm ``= b + g sqrt(n) (y / ||y||)[:n]`` with
    ``y = [C x; sqrt(n eps)]``, ``h`` bounding ``||C delta||``; ``F.normalize`` where the
    segment avoids the ball ``||x|| <= eps`` (else ``inf``), ``h`` bounding ``||delta||``.

``None`` where an operator has no rule (max pooling; ELU, softplus and hard-swish, whose
curvature is unbounded or whose map jumps). Every rule is widened by ``ROUND`` as torch's.
"""

from __future__ import annotations

import math

import numpy as np

from certify.check.operators.activation import ActivationTwin
from certify.check.operators.affine import AffineTwin
from certify.check.operators.base import ROUND, Twin, spectral_upper
from certify.check.operators.enclosure import Enclosure
from certify.check.operators.linear_maps import AddTwin, ScaleShiftTwin
from certify.check.operators.pooling import MaxPoolTwin
from certify.check.operators.prelu import PReLUTwin
from certify.check.operators.transformer import (LayerNormTwin, NormalizeTwin, ProductTwin,
                                                 SoftmaxTwin)

# sup |phi''| over the real line, from the closed forms: GELU'' = phi(x) (2 - x^2) and the
# tanh form's second derivative both peak at 0 with 2 phi(0) = sqrt(2 / pi); tanh'' =
# -2 t (1 - t^2) peaks at t^2 = 1/3; sigmoid'' = s (1 - s) (1 - 2 s) at s = 1/2 -+ sqrt(3)/6;
# SiLU'' = s (1 - s) (2 + x (1 - 2 s)) at 0. Mish'' peaks near -0.0879 at 0.64420463722641,
# located numerically (raised by 1e-6 relative for it). All raised by 1e-9 for rounding.
CURVATURE = {kind: value * (1 + 1e-9) for kind, value in {
    "gelu": math.sqrt(2 / math.pi), "gelu_tanh": math.sqrt(2 / math.pi),
    "tanh": 4 / (3 * math.sqrt(3)), "sigmoid": 1 / (6 * math.sqrt(3)), "silu": 0.5,
    "mish": 0.64420463722641 * (1 + 1e-6)}.items()}


def row_norm(twin: Twin) -> str | None:
    """``"centred"`` (LayerNorm, softmax) or ``"plain"`` (``F.normalize``): the l2 bounds of
    its input's rows the remainder reads; ``None`` for the others."""
    if isinstance(twin, (LayerNormTwin, SoftmaxTwin)):
        return "centred"
    return "plain" if isinstance(twin, NormalizeTwin) else None


def spread(twin: Twin, inputs, radii):
    """An entrywise bound of ``|J delta|`` for ``|delta_i| <= radii_i`` (module docstring),
    or ``None``."""
    if not twin.nonlinear:
        boxes = [Enclosure(np.zeros_like(r), r, None, None, r) for r in radii]
        out = twin.enclose(boxes, None)
        return None if out is None else out.r
    if isinstance(twin, (ActivationTwin, PReLUTwin)):
        (u,), (r,) = inputs, radii
        slope = twin.derivative(u) if isinstance(twin, ActivationTwin) else \
            np.where(u > 0, 1.0, twin.slopes)
        return np.abs(slope) * r
    if isinstance(twin, ProductTwin):
        (x, y), (r_x, r_y) = inputs, radii
        return twin(r_x, np.abs(y)) + twin(np.abs(x), r_y)
    if isinstance(twin, MaxPoolTwin):  # J picks each window's winner
        return twin(radii[0])
    if isinstance(twin, SoftmaxTwin):
        (u,), (r,) = inputs, radii
        p = twin(u)
        return p * r + p * (p * r).sum(-1, keepdims=True)
    if isinstance(twin, LayerNormTwin):
        (u,), (r,) = inputs, radii
        n = u.shape[-1]
        yhat, length = _layer_norm_sphere(twin, u)
        centred = r * (1 - 2 / n) + r.sum(-1, keepdims=True) / n
        return math.sqrt(n) * np.abs(twin.weight) * _sphere_spread(yhat, length, centred) * \
            (1 + ROUND)
    if isinstance(twin, NormalizeTwin):
        (u,), (r,) = inputs, radii
        length = np.linalg.norm(u, axis=-1, keepdims=True)
        floor = np.maximum(length, twin.eps)
        return np.where(length > twin.eps, _sphere_spread(u / floor, floor, r),
                        r / twin.eps) * (1 + ROUND)
    return None


def remainder(twin: Twin, inputs, radii, rows=None):
    """A bound of the remainder ``|f(u + delta) - f(u) - J delta|`` for ``|delta_i| <=
    radii_i``: entrywise, or ``(scale, bound)`` per row (module docstring); ``None`` where
    there is no rule."""
    if isinstance(twin, ActivationTwin):
        (u,), (d,) = inputs, radii
        if twin.piecewise_linear:
            a = twin.slope if twin.kind == "leaky_relu" else 0.0
            return abs(1 - a) * np.maximum(d - np.abs(u), 0.0)
        if twin.clip is not None:
            k1, k2, a = twin.clip
            near = np.minimum(np.abs(u - k1), np.abs(u - k2))
            return abs(a) * np.maximum(d - near, 0.0)
        return CURVATURE[twin.kind] * d * d / 2 if twin.kind in CURVATURE else None
    if isinstance(twin, PReLUTwin):
        (u,), (d,) = inputs, radii
        return np.abs(1 - twin.slopes) * np.maximum(d - np.abs(u), 0.0)
    if isinstance(twin, ProductTwin):
        return twin(*radii)
    if isinstance(twin, MaxPoolTwin):  # 0 <= R <= (2 max d - gap)_+, gap: winner's lead
        (u,), (d,) = inputs, radii
        windows = np.sort(twin._windows(u), axis=-1)
        first = windows[..., -1]
        second = windows[..., -2] if windows.shape[-1] > 1 else np.full_like(first, -np.inf)
        with np.errstate(invalid="ignore"):
            gap = first - second - ROUND * (np.abs(first) + np.where(np.isfinite(second),
                                                                     np.abs(second), 0.0))
        gap = gap.reshape(twin(u).shape)
        return np.maximum(2 * twin(d) * (1 + ROUND) - gap, 0.0)
    if isinstance(twin, SoftmaxTwin):
        (u,), (d,) = inputs, radii
        p_sup = twin.interval((u - d, u + d))[1]
        kept = d if twin.keep is None else np.where(twin.keep, d, 0.0)
        osc = 2 * kept.max(-1, keepdims=True)
        if rows is not None and rows[0] is not None:
            osc = np.minimum(osc, math.sqrt(2) * rows[0])
        with np.errstate(invalid="ignore"):  # a hidden entry (p_sup = 0) with osc = inf
            bound = p_sup * osc * osc / 2
        return np.where(p_sup > 0, bound, 0.0) * (1 + ROUND)
    if isinstance(twin, LayerNormTwin):
        (u,), (d,) = inputs, radii
        _, length = _layer_norm_sphere(twin, u)
        return math.sqrt(u.shape[-1]) * np.abs(twin.weight), \
            _sphere_remainder(_row_bound(d, rows), length)
    if isinstance(twin, NormalizeTwin):
        (u,), (d,) = inputs, radii
        length = np.linalg.norm(u, axis=-1, keepdims=True)
        h = _row_bound(d, rows)
        return np.ones_like(u), np.where(length - h > twin.eps, _sphere_remainder(h, length),
                                         math.inf)
    return None


def row_stretch(twin: Twin, inputs, lines):
    """An l2 bound of each row (last axis) of ``J e`` from l2 bounds ``lines`` of the
    inputs' rows of ``e`` ``(B, ..., 1)``, for the twins that keep rows: a dense layer
    (``||W||_2``, ``spectral_upper``), a constant scale (``max |scale|``), a sum of tensors
    of one shape, an activation or PReLU (the row's largest ``|phi'(u)|``), LayerNorm
    (``||J_row||_2 <= sqrt(n) max |g| / ||y||``: ``I - yhat yhat^T`` and ``C`` are
    contractions); ``None`` for the others."""
    if isinstance(twin, AffineTwin) and not twin.is_conv:
        return spectral_upper(twin.weight) * lines[0]
    if isinstance(twin, ScaleShiftTwin):
        return float(np.abs(twin.scale).max()) * lines[0]
    if isinstance(twin, AddTwin) and inputs[0].shape == inputs[1].shape:
        return lines[0] + abs(twin.alpha) * lines[1]
    if isinstance(twin, (ActivationTwin, PReLUTwin)):
        slope = spread(twin, inputs, [np.ones_like(inputs[0])])
        return slope.max(-1, keepdims=True) * lines[0]
    if isinstance(twin, LayerNormTwin):
        _, length = _layer_norm_sphere(twin, inputs[0])
        n = inputs[0].shape[-1]
        return math.sqrt(n) * float(np.abs(twin.weight).max()) / length * lines[0]
    return None


def _layer_norm_sphere(twin: LayerNormTwin, u):
    """The first ``n`` entries of ``yhat = y / ||y||`` and ``||y||`` for ``y = [C u;
    sqrt(n eps)]`` (``LN(u) = b + g sqrt(n) yhat[:n]``)."""
    c = u - u.mean(-1, keepdims=True)
    length = np.sqrt((c * c).sum(-1, keepdims=True) + u.shape[-1] * twin.eps)
    return c / length, length


def _sphere_spread(yhat, length, r):
    """``|(I - yhat yhat^T) / ||y|| | r <= (r + |yhat| (|yhat| . r)) / ||y||``."""
    return (r + np.abs(yhat) * (np.abs(yhat) * r).sum(-1, keepdims=True)) / length


def _sphere_remainder(h, length):
    """``h^2 / (sqrt 3 (||y|| - h)^2)`` where ``h < ||y||``, else ``inf``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.maximum(length - h, 0.0)
        bound = h * h / (math.sqrt(3) * gap * gap) * (1 + ROUND)
    return np.where(h < length, bound, math.inf)


def _row_bound(d, rows):
    """An l2 bound of each row of ``delta`` in the box ``|delta| <= d``: ``||d_row||_2``, or
    the given row bound where smaller."""
    h = np.linalg.norm(d, axis=-1, keepdims=True) * (1 + ROUND)
    return h if rows is None or rows[0] is None else np.minimum(h, rows[0])
