"""Exact entrywise-max weight radius of one dense layer of a tiny ReLU MLP (residual
additions allowed), by MILP.

An independent test oracle for ``certify.radii.radius.layer_radii(..., norm="max")``.

Reduction (THEORY.md section 4). For one input with layer input ``h`` (``h~ = [h; 1]`` when
the bias is perturbed too) and pre-activation ``z = W h + b``,
``{D h~ : ||D||_max <= rho}`` is EXACTLY the box ``|z' - z|_inf <= rho ||h~||_1`` (row ``i``
of ``D = (dz_i / ||h~||_1) sign(h~)^T`` reaches any ``dz`` in it). So the minimal
``||D||_max`` that changes the class is ``s* / ||h~||_1`` with

    s* = min_{j != y} min { s : |z'_i - z_i| <= s,  o_y(z') - o_j(z') <= 0 },

``o`` the downstream sub-graph of the network's graph (``certify.graph.graph``): the nodes that
depend on the layer, walked in topological order; the values of nodes that do not (the skip
input of a residual addition) are constants of the program. For ReLU (and LeakyReLU, slope
``a`` in [0, 1)), dense layers, flatten and residual additions that is one mixed-integer
linear program per ``j``: ``v = max(u, a u)`` on ``l <= u <= r`` is encoded
exactly by ``v >= u``, ``v >= a u``, ``v <= u - (1 - a) l (1 - d)``, ``v <= a u + (1 - a) r d``,
``d`` binary (``d = 1`` forces ``v = u``, ``d = 0`` forces ``v = a u``); neurons whose bounds do
not straddle 0 are linear. The bounds come from interval propagation over the box
``s <= S`` (widened by ``1e-9`` relative, so rounding never cuts off a feasible point).

The cap ``S`` never biases the answer: every point with ``s <= S`` is feasible, so the capped
program is either infeasible (``s* > S``: ``S`` is multiplied by 4 and the program solved
again) or returns the global optimum. The first ``S`` is 1.01 times the box of a known
class-changing perturbation (by default certify's verified witness norm ``upper``); a wrong
``upper`` only costs retries, so the oracle does not rely on certify being right.

For the last layer there is no downstream network and the program is an LP whose value is
the closed form ``min_j m_j / 2`` (section 3); the tests check both.

Accuracy relied on. HiGHS runs with primal and integrality feasibility tolerances 1e-9,
relative MIP gap 1e-9 and absolute MIP gap 1e-12 (the default absolute gap, 1e-6, would
stop early on small radii). On these tiny networks (weights, activations and big-M bounds
of order 1 to 100) that makes ``s*`` accurate to about 1e-8 absolute in ``z``-space, far
below the 1e-6 relative tolerance of the tests for the radii that occur (``s*`` > 1e-3).
Two a-posteriori checks run in torch, independently of the MILP encoding: the logits at the
optimal ``z'`` tie (``o_y = o_j`` to 1e-7), and a second program with the margin forced to
``<= -tau`` (``tau = 1e-6 (1 + max |o|)``) yields ``z'`` whose forward pass really changes
the class (see ``ExactMaxRadius``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cvxpy as cp
import numpy as np
import torch
from torch import nn

from certify.capture.export import capture
from certify.graph.graph import Graph
from certify.graph.operators import Activation, Add, Affine, Reshape
from certify.radii.radius import layer_radii

HIGHS_OPTIONS = {
    "mip_rel_gap": 1e-9,
    "mip_abs_gap": 1e-12,
    "primal_feasibility_tolerance": 1e-9,
    "dual_feasibility_tolerance": 1e-9,
    "mip_feasibility_tolerance": 1e-9,
}
WIDEN = 1e-9  # relative widening of the interval bounds that set the big-M constants
TAU = 1e-6  # margin forced below -TAU (1 + max |o|) for the strictly class-changing point
GROWTH, RETRIES = 4.0, 8  # cap S grows 4x per infeasible solve, at most 8 times


@dataclass(frozen=True)
class ExactMaxRadius:
    """Per input (arrays of length B): the exact minimal ``||D||_max`` of one dense layer.

    ``rho = box / scale`` with ``box`` the minimal l_inf change of ``z`` and
    ``scale = ||h~||_1``; ``rho = inf`` where ``h~ = 0`` (no weight change moves ``z``) or no
    class change was found up to the largest cap (then ``exact`` is False: ``rho`` is only
    known to exceed ``box / scale`` there, with ``box`` that cap). ``target`` is the class
    ``j`` of the minimum. ``boundary`` is the optimal ``z'`` (logits of ``y`` and ``j`` tie);
    ``beyond`` is the optimum of the program with margin ``<= -tau``, and ``beyond_box`` its
    ``||z' - z||_inf``: ``D = ((z' - z) / ||h~||_1) sign(h~)^T`` is a class-changing weight
    perturbation of norm ``beyond_box / scale`` (NaN / inf where that program failed, which
    only a margin touching 0 without crossing it can cause).
    """

    rho: np.ndarray
    box: np.ndarray
    scale: np.ndarray
    exact: np.ndarray
    predicted: np.ndarray
    target: np.ndarray
    z: np.ndarray
    boundary: np.ndarray
    beyond: np.ndarray
    beyond_box: np.ndarray


def as_network(model_or_network, x: torch.Tensor) -> Graph:
    """A ``Graph`` as is; a ``torch.nn.Module`` captured for inputs like ``x``."""
    if isinstance(model_or_network, nn.Module):
        return capture(model_or_network, x)
    if not isinstance(model_or_network, Graph):
        raise TypeError(f"expected a torch.nn.Module or a certify Graph, got "
                        f"{type(model_or_network).__name__}")
    return model_or_network


def downstream_plan(network: Graph, index: int) -> list[tuple]:
    """The nodes that depend on affine layer ``index``, after it, in topological order, as
    ``(node, inputs, rule)`` with ``rule`` one of ``("affine", W, b)``, ``("act", slope)``,
    ``("same",)`` (a reshape that keeps the vector, as flatten of ``(B, n)``) and
    ``("add", alpha)`` (``a + alpha b``, a residual connection; an operand that does not
    depend on the layer is a constant of the program)."""
    if index not in network.affine_indices:
        raise ValueError(f"node {index} is not an affine layer; affine layers are at nodes "
                         f"{network.affine_indices}")
    if not network.is_dense(index):
        raise ValueError(f"node {index} ({network.nodes[index].name!r}) is a convolution or a "
                         "dense layer over a sequence; the MILP oracle handles dense layers on "
                         "vectors only")
    plan = []
    for i in network.downstream(index)[1:]:
        node = network.nodes[i]
        op, shapes = node.op, [network.nodes[j].shape for j in node.inputs]
        vectors = len(node.shape) == 1 and all(shape == node.shape for shape in shapes)
        if isinstance(op, Affine) and not op.is_conv and len(shapes[0]) == 1:
            rule = ("affine", op.weight.numpy(), op.bias.numpy())
        elif isinstance(op, Activation) and op.kind == "relu":
            rule = ("act", 0.0)
        elif isinstance(op, Activation) and op.kind == "leaky_relu" and 0 <= op.slope < 1:
            rule = ("act", op.slope)
        elif isinstance(op, Reshape) and vectors:
            rule = ("same",)
        elif isinstance(op, Add) and vectors:
            rule = ("add", float(op.alpha))
        else:
            raise ValueError(f"node {i} ({node.name!r}): the MILP oracle supports dense layers, "
                             "ReLU and LeakyReLU with slope in [0, 1), flatten and residual "
                             f"additions of vectors only, got {op}")
        plan.append((i, node.inputs, rule))
    return plan


def _interval(plan, index: int, constants: dict, lo: np.ndarray, hi: np.ndarray) -> dict:
    """Bounds of every node of ``plan`` over ``lo <= z' <= hi`` (widened by WIDEN); nodes
    outside it hold their ``constants``."""
    bounds = {index: (lo, hi)}

    def box(j):
        return bounds[j] if j in bounds else (constants[j], constants[j])

    for i, inputs, rule in plan:
        lo, hi = box(inputs[0])
        if rule[0] == "affine":
            _, W, b = rule
            c, r = (hi + lo) / 2, (hi - lo) / 2
            c, r = W @ c + b, np.abs(W) @ r
            slack = WIDEN * (np.abs(c) + r + 1)
            lo, hi = c - r - slack, c + r + slack
        elif rule[0] == "act":
            a = rule[1]
            lo, hi = np.maximum(lo, a * lo), np.maximum(hi, a * hi)
        elif rule[0] == "add":
            (b_lo, b_hi), alpha = box(inputs[1]), rule[1]
            c = (hi + lo) / 2 + alpha * (b_hi + b_lo) / 2
            r = (hi - lo) / 2 + abs(alpha) * (b_hi - b_lo) / 2
            slack = WIDEN * (np.abs(c) + r + 1)
            lo, hi = c - r - slack, c + r + slack
        bounds[i] = (lo, hi)
    return bounds


def _program(plan, index: int, output: int, constants: dict, z: np.ndarray, y: int, j: int,
             cap: float, tau: float):
    """``min s`` over ``|z' - z| <= s <= cap`` with margin ``o_y - o_j <= -tau``."""
    zp, s = cp.Variable(z.shape[0]), cp.Variable()
    cons = [zp - z <= s, z - zp <= s, s <= cap]
    bounds = _interval(plan, index, constants, z - cap, z + cap)
    values = {index: zp}

    def value(k):
        return values[k] if k in values else constants[k]

    for i, inputs, rule in plan:
        u = value(inputs[0])
        if rule[0] == "affine":
            values[i] = rule[1] @ u + rule[2]
            continue
        if rule[0] == "same":
            values[i] = u
            continue
        if rule[0] == "add":
            values[i] = u + rule[1] * value(inputs[1])
            continue
        slope, (lo, hi) = rule[1], bounds[inputs[0]]
        v = cp.Variable(lo.shape[0])
        on, off = np.flatnonzero(lo >= 0), np.flatnonzero(hi <= 0)
        mixed = np.flatnonzero((lo < 0) & (hi > 0))
        if on.size:
            cons.append(v[on] == u[on])
        if off.size:
            cons.append(v[off] == slope * u[off])
        if mixed.size:
            d = cp.Variable(mixed.size, boolean=True)
            um, vm = u[mixed], v[mixed]
            cons += [vm >= um, vm >= slope * um,
                     vm <= um - (1 - slope) * cp.multiply(lo[mixed], 1 - d),
                     vm <= slope * um + (1 - slope) * cp.multiply(hi[mixed], d)]
        values[i] = v
    u = value(output)
    cons.append(u[y] - u[j] <= -tau)
    problem = cp.Problem(cp.Minimize(s), cons)
    problem.solve(solver=cp.HIGHS, **HIGHS_OPTIONS)
    if problem.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        return None
    if problem.status != cp.OPTIMAL:
        raise RuntimeError(f"HiGHS returned {problem.status!r} for class {j} with cap {cap}")
    return float(s.value), np.asarray(zp.value, dtype=np.float64)


def _solve(problem, z, y, j, cap, tau):
    """The capped program, growing the cap while it is infeasible: ``(s, z', exact)``;
    ``problem``: ``(plan, index, output, constants)``."""
    for _ in range(RETRIES + 1):
        found = _program(*problem, z, y, j, cap, tau)
        if found is not None:
            return found[0], found[1], True
        cap *= GROWTH
    return cap, None, False


def exact_max_radius(model_or_network, x: torch.Tensor, index: int, bias: bool = False,
                     cap: torch.Tensor | None = None) -> ExactMaxRadius:
    """Exact minimal ``||D||_max`` changing the class, per input of ``x`` (see the module).

    ``cap``: per input, a radius ``rho`` known (or believed) to change the class; default
    certify's ``layer_radii(..., "max", bias).upper``. Only the first big-M box depends on it.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise ValueError(f"x must be a (B, d) tensor of inputs, got {type(x).__name__} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    x = x.double()
    network = as_network(model_or_network, x)
    plan = downstream_plan(network, index)
    with torch.no_grad():
        values = [v.numpy() for v in network.values(x)]
    h, Z, logits = values[network.input_of(index)], values[index], values[-1]
    # Values the downstream nodes read from outside the plan (the skip input of a residual
    # addition): constants of the program, per input.
    inside = set(network.downstream(index))
    outside = {k for _, inputs, _ in plan for k in inputs if k not in inside}
    scale = np.abs(h).sum(axis=1) + (1.0 if bias else 0.0)
    if cap is None:
        cap = layer_radii(network, x, index, "max", bias).upper
    cap = np.asarray(cap, dtype=np.float64)
    B, m = Z.shape
    if cap.shape != (B,):
        raise ValueError(f"cap must hold one radius per input, shape ({B},), got {cap.shape}")
    out = {k: np.full(B, np.inf) for k in ("rho", "box", "beyond_box")}
    out["exact"] = np.ones(B, dtype=bool)
    out["target"] = np.full(B, -1)
    out["boundary"], out["beyond"] = np.full((B, m), np.nan), np.full((B, m), np.nan)
    predicted = logits.argmax(axis=1)
    for b in range(B):
        if scale[b] == 0:  # h~ = 0: D h~ = 0 for every D
            continue
        z, y = Z[b], int(predicted[b])
        problem = (plan, index, network.output, {k: values[k][b] for k in outside})
        first = 1.01 * cap[b] * scale[b] if math.isfinite(cap[b]) else 1.0 + np.abs(z).max()
        solved = [(*_solve(problem, z, y, j, first, 0.0), j)
                  for j in range(logits.shape[1]) if j != y]
        found = [t for t in solved if t[2]]
        if not found:  # no class change up to the largest cap: only a lower bound on s*
            out["box"][b], out["exact"][b] = max(t[0] for t in solved), False
            continue
        s, zp, _, j = min(found, key=lambda t: t[0])
        out["box"][b], out["rho"][b], out["target"][b], out["boundary"][b] = \
            s, s / scale[b], j, zp
        tau = TAU * (1 + np.abs(logits[b]).max())
        s_tau, z_tau, beyond = _solve(problem, z, y, j, 1.01 * s + tau, tau)
        if beyond:  # fails only if the margin touches 0 without crossing it (degenerate)
            out["beyond_box"][b], out["beyond"][b] = s_tau, z_tau
    return ExactMaxRadius(scale=scale, predicted=predicted, z=Z, **out)


def perturbation(h: torch.Tensor, dz: torch.Tensor, bias: bool) -> torch.Tensor:
    """``D = (dz / ||h~||_1) sign(h~)^T`` per input ``(B, m, n~)``: ``D h~ = dz`` and
    ``||D||_max = ||dz||_inf / ||h~||_1`` (section 4; the box is reached exactly)."""
    if bias:
        h = torch.cat([h, torch.ones_like(h[:, :1])], dim=1)
    return (dz / h.abs().sum(dim=1, keepdim=True))[:, :, None] * torch.sign(h)[:, None, :]


def tiny_mlp(inputs: int, widths: list[int], classes: int, seed: int, slope: float = 0.0,
             trained: bool = False) -> nn.Sequential:
    """A float64 MLP of the size the oracle is for: ReLU (``slope = 0``) or LeakyReLU.

    ``trained``: 60 full-batch Adam steps on 64 Gaussian points labelled by a random linear
    teacher, so that margins and activation patterns look like those of a fitted model.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Linear's initialisation
    layers, n = [], inputs
    for w in widths:
        layers += [nn.Linear(n, w), nn.LeakyReLU(slope) if slope else nn.ReLU()]
        n = w
    model = nn.Sequential(*layers, nn.Linear(n, classes)).double()
    if trained:
        x = torch.randn(64, inputs, generator=generator, dtype=torch.float64)
        teacher = torch.randn(inputs, classes, generator=generator, dtype=torch.float64)
        labels = (x @ teacher).argmax(1)
        optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(60):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x), labels).backward()
            optimiser.step()
    return model.eval()
