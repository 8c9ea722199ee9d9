"""What every operator of a graph provides: THEORY.md section 8.

An operator is one node's operation on the values of earlier nodes (tensors with a leading
batch axis; constants of the model are folded into the operator when it is captured). Each
operator holds, in one place, every rule the bounds need:

* ``__call__``: the forward map;
* ``interval``: an output box containing ``f(x)`` for every ``x`` in the input boxes;
* ``backward``: the linear (CROWN-style) rule. Rows ``A`` on the output, ``(B, R, *out)``,
  become rows on every input plus constants: ``A . f(x) in sum_i A_i . x_i + d +- e`` for all
  ``x`` in the input boxes (``lower=True`` asks only for ``>= sum_i A_i . x_i + d``, so
  that ``e`` may be 0 and the lines adapt to the sign of ``A``);
* ``ball_offset``: with ``ball_aware``, a tighter offset for the linear rule's lower bound
  when the input also lies in an l2 ball (SDP-CROWN's, ``certify.bounds.linear.backward``);
* ``enclose``: the forward rule, affine functions of the layer's weight change bracketing
  the output from those bracketing the inputs (``certify.graph.operators.enclosure``);
* ``jacobian``: interval rows: every ``A J_i`` with ``A`` in the given interval rows and
  ``J_i`` a (generalised) Jacobian of ``f`` on the boxes; ``None`` where not implemented;
* ``spread`` and ``remainder``: the deviation rules of THEORY.md section 9, at the clean
  inputs ``u`` with deviations bounded entrywise by ``radii`` (``|delta_i| <= r_i``):
  ``spread`` bounds ``|J delta|`` entrywise for the clean Jacobian ``J`` (autograd's, the one
  the first-order forms of ``certify.bounds.deviations`` use), ``remainder`` bounds
  ``|f(u + delta) - f(u) - J delta|`` entrywise; a linear map's are its absolute map and 0
  (``certify.bounds.deviations`` reads them from ``enclose``), ``None`` where not implemented;
  an operator may add ``tangent``, its clean Jacobian on forms ``(B, p, *shape)`` in closed
  form (else forward-mode autograd computes it);
* ``lipschitz``: per input, an upper bound of ``||f||_Lip`` in the l2 (``"fro"``) or l_inf
  (``"max"``) geometry, and ``combine`` the constant of the node from its inputs'.

Floating point: rules widen their results by ``ROUND`` times the magnitudes that entered
them, far above float64 rounding (relative 1e-16 per operation).
"""

from __future__ import annotations

import math

import torch

ROUND = 1e-10
EPS = torch.finfo(torch.float64).eps


def row_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of rows ``(B, R, *shape)`` over ``shape``: ``(B, R)``."""
    return t.reshape(*t.shape[:2], -1).sum(-1)


def batch_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-input tensor ``(B,)`` shaped to broadcast against ``(B, *shape)``."""
    return t.reshape(-1, *[1] * (ndim - 1))


def adjoints(f, A: torch.Tensor, in_shapes) -> tuple[torch.Tensor, ...]:
    """``A J_i`` for a map ``f`` linear in its inputs (``A``: ``(B, R, *out)``), by autograd;
    differentiable in ``A`` where ``A`` requires a gradient (``certify.bounds.slopes``)."""
    B, R = A.shape[:2]
    with torch.enable_grad():
        xs = [A.new_zeros(B * R, *shape, requires_grad=True) for shape in in_shapes]
        out = f(*xs)
        grads = torch.autograd.grad(out, xs, grad_outputs=A.reshape(B * R, *out.shape[1:]),
                                    allow_unused=True, create_graph=A.requires_grad)
    return tuple(A.new_zeros(B, R, *shape) if g is None
                 else g.reshape(B, R, *shape) for g, shape in zip(grads, in_shapes))


def schur_norms(absolute, in_shapes, index: int, device) -> tuple[float, float]:
    """``(||M||_2, ||M||_inf)`` upper bounds of input ``index``'s part ``M`` of a linear map
    whose entrywise absolute value is the map ``absolute``: ``||M||_inf`` is the largest row
    sum of ``|M|`` and ``||M||_2 <= sqrt(||M||_1 ||M||_inf)`` (Schur's test), with the column
    sums from the adjoint of ``absolute``. Inflated by ``2 n eps`` for the summations.
    ``device``: where the map's coefficients are (the CPU for a map without any)."""
    ones = [torch.zeros(1, *shape, dtype=torch.float64, device=device) for shape in in_shapes]
    ones[index] = torch.ones_like(ones[index])
    with torch.no_grad():
        out = absolute(*ones)
    rows = float(out.max()) if out.numel() else 0.0
    cols = adjoints(absolute, out.new_ones(1, 1, *out.shape[1:]), in_shapes)
    columns = float(cols[index].max()) if cols[index].numel() else 0.0
    slack = 1 + 2 * (math.prod(in_shapes[index]) + out[0].numel()) * EPS
    return math.sqrt(rows * columns) * slack, rows * slack


class Operator:
    """Base of every operator; ``arity`` inputs, defaults for rules an operator lacks."""

    arity = 1
    nonlinear = False  # its linear rule needs input boxes: refinement may tighten them
    ball_aware = False  # ball_offset can tighten its linear rule's offset on an l2 ball

    def __call__(self, *xs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def interval(self, *boxes):
        raise NotImplementedError

    def backward(self, A: torch.Tensor, boxes, lower: bool):
        """Default linear rule: the output box enters as a constant (no rows go on)."""
        low, high = self.interval(*boxes)
        center, radius = (high + low) / 2, (high - low) / 2
        return (None,) * self.arity, row_sum(A * center[:, None]), \
            row_sum(A.abs() * radius[:, None])

    def jacobian(self, rows, boxes):
        return None

    def enclose(self, inputs, boxes):
        """The forward rule: the output's ``Enclosure`` (``certify.graph.operators.enclosure``) from
        the inputs' and the input boxes; ``None``: the output box is all there is."""
        return None

    def spread(self, inputs, radii):
        """An entrywise bound of ``|J delta|`` for ``|delta_i| <= radii_i`` (module
        docstring); ``None``: not implemented (nonlinear operators only)."""
        return None

    row_norm = None  # "plain" or "centred": remainder reads l2 bounds of the input's rows

    def remainder(self, inputs, radii, rows=None):
        """A bound of ``|f(u + delta) - f(u) - J delta|`` for ``|delta_i| <= radii_i`` at the
        clean inputs ``u = inputs`` (THEORY.md section 9): entrywise, or ``(scale, bound)``
        for ``R = scale * r`` with ``||r||_2 <= bound`` per row of the last axis (an l2
        group per row, ``bound`` shaped ``(B, ..., 1)``). ``rows``: per input, ``None`` or an
        upper bound of the l2 norm of each row of ``delta`` (centred over the row when
        ``row_norm`` is ``"centred"``), ``(B, ..., 1)``. ``None``: not implemented
        (nonlinear operators only)."""
        return None

    def ball_offset(self, A, G, box, center, radius):
        """A lower bound of ``A . f(x) - G . x`` over the input box intersected with the l2
        ball ``||x - center|| <= radius`` (``(B, R)``), for ``G`` the rows the linear rule gave
        the input; ``None``: the rule's own offset is all there is."""
        return None

    def unstable(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Entries of the input box whose tighter bounds would tighten the linear rule."""
        return torch.ones_like(lo, dtype=torch.bool)

    def lipschitz(self, norm: str, in_shapes) -> tuple[float, ...]:
        raise NotImplementedError

    def local_reach(self, boxes, reaches, nominals):
        """An l2 bound of ``||f(x) - f(nominal)||`` per input ``(B,)`` for ``x`` in the boxes
        with ``||x_i - nominal_i|| <= reaches[i]`` (``None``: a constant input), from the
        boxes themselves; ``None`` where the global constants (``combine``) are all there is."""
        return None

    def combine(self, norm: str, own, moving) -> float:
        """Constant of the output from ``own`` (``lipschitz``) and the inputs' constants
        ``moving`` (``None``: a constant input): ``sum_i own_i L_i`` (triangle inequality)."""
        return sum(times(c, L) for c, L in zip(own, moving) if L is not None)

    def describe(self) -> str:
        return type(self).__name__


def times(c: float, L):
    """``c L`` for a constant ``c`` and a bound ``L`` (a float or per-input tensor), with
    ``inf * 0 = 0``: an input that cannot move moves nothing, whatever the constant."""
    if c != math.inf:
        return c * L
    if isinstance(L, torch.Tensor):
        return torch.where(L > 0, math.inf, 0.0).to(L.dtype)
    return math.inf if L > 0 else 0.0


def interval_product(a, b):
    """``[a] [b]`` for broadcastable intervals ``(lo, hi)``, in centre-radius form
    ``a_c b_c +- (|a_c| b_r + a_r |b_c| + a_r b_r)`` (exact when either is a point), widened
    for rounding."""
    ac, ar = (a[1] + a[0]) / 2, (a[1] - a[0]) / 2
    bc, br = (b[1] + b[0]) / 2, (b[1] - b[0]) / 2
    center = ac * bc
    radius = ac.abs() * br + ar * (bc.abs() + br)
    radius = radius * (1 + ROUND) + ROUND * center.abs()
    return center - radius, center + radius


def interval_sum(a, b):
    """``[a_lo + b_lo, a_hi + b_hi]``, widened for the rounding of the two sums."""
    (a_lo, a_hi), (b_lo, b_hi) = a, b
    return (a_lo + b_lo - ROUND * (a_lo.abs() + b_lo.abs()),
            a_hi + b_hi + ROUND * (a_hi.abs() + b_hi.abs()))


def mean_value_rule(op: Operator, A: torch.Tensor, boxes):
    """A linear rule from the interval Jacobian (``op.jacobian``) by the mean value theorem.

    With ``c_i`` the centres and ``r_i`` the radii of the input boxes,
    ``A f(x) = A f(c) + sum_i (A J_i(xi)) (x_i - c_i)`` for some ``xi`` on the segment, and
    every ``A J_i(xi)`` lies in the interval rows ``[L_i, U_i]``; so with ``M = (L + U)/2``,
    ``S = (U - L)/2``: ``A f(x) in sum_i M_i x_i + (A f(c) - sum_i M_i c_i) +- sum_i S_i r_i``.
    Sound for any differentiable ``f`` whose ``jacobian`` is sound; exact when ``f`` is linear.
    """
    centers = [(lo + hi) / 2 for lo, hi in boxes]
    radii = [(hi - lo) / 2 for lo, hi in boxes]
    out = op(*centers)
    d = row_sum(A * out[:, None])
    size = row_sum(A.abs() * out.abs()[:, None])
    e = torch.zeros_like(d)
    rows = []
    for (L, U), c, r in zip(op.jacobian((A, A), boxes), centers, radii):
        M, S = (U + L) / 2, (U - L) / 2
        d = d - row_sum(M * c[:, None])
        size = size + row_sum(M.abs() * c.abs()[:, None])
        e = e + row_sum(S * r[:, None])
        rows.append(M)
    return tuple(rows), d, e + ROUND * (size + e)
