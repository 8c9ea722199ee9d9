"""Attacks in weight space, the oracles of the soundness tests: a weight change ``D`` inside a
certified ball must never change a class, so these search for one that does.

* One layer (THEORY.md section 4): ``perturbed_classes`` (the classes with layer ``index``'s
  weight ``W + D``), ``pgd_attack`` (projected gradient descent on the smallest margin) and
  ``random_ball`` (random points of the Frobenius sphere, vertices of the max ball);
  ``assert_attacks_inside_fail`` runs them at 0.999 x a layer's ``lower`` and
  ``assert_witness_flips`` checks its witness (the soundness tests' two ends of a bracket).
* Every layer at once (section 5): ``perturbed_logits`` (the logits with every affine weight
  ``W_k + D_k``), ``attacks`` (random points, then joint projected gradient descent) and
  ``project`` (onto a ball).
* Every layer at once, each in its own set (section 10): ``joint_margins`` (the margins
  ``o_y - o_j`` with some layers' weights ``W_k + E_k``) and ``joint_attack`` (random corners
  of the boxes or points of the spheres, then projected gradient descent on the smallest
  margin over all the layers' changes jointly), with ``project_set`` (onto a box or a ball).
* ``layer_weight`` and ``layer_columns``: a layer's weight and input columns, with the bias as
  a last column (and a row of ones) when the bias moves too.
"""

from __future__ import annotations

import torch

from certify.graph.graph import Graph
from certify.graph.operators import Affine
from certify.radii.radius import predictions


def layer_weight(layer: Affine, bias: bool) -> torch.Tensor:
    """The weight matrix, with the bias as its last column when the bias moves too."""
    return torch.cat([layer.matrix, layer.bias[:, None]], dim=1) if bias else layer.matrix


def layer_columns(layer: Affine, h: torch.Tensor, bias: bool) -> torch.Tensor:
    """The layer input as columns ``(B, n, L)``, with a row of ones when the bias moves."""
    P = layer.patches(h)
    return torch.cat([P, torch.ones_like(P[:, :1])], dim=1) if bias else P


def _apply(layer: Affine, weight, P, bias: bool, out_shape) -> torch.Tensor:
    """The layer's output with a per-input weight ``(B, m, n)`` (the fixed bias added)."""
    Z = torch.matmul(weight, P)
    if not bias:
        Z = Z + layer.bias[:, None]
    return layer.uncolumns(Z, out_shape)


def perturbed_classes(net: Graph, x, index, D, bias) -> torch.Tensor:
    """Forward pass with layer ``index``'s weight replaced by ``W + D`` (per input)."""
    layer = net.layer(index)
    values = net.values(x)
    P = layer_columns(layer, values[net.input_of(index)], bias)
    Z = _apply(layer, layer_weight(layer, bias) + D, P, bias, values[index].shape[1:])
    return net.run(index, Z, values).argmax(-1)


def pgd_attack(net, x, index, radius, norm, bias, steps=40, start=None) -> torch.Tensor:
    """Projected gradient descent on the smallest margin over ``||D|| <= radius``, from
    ``start`` (default a tiny random change)."""
    layer = net.layer(index)
    W = layer_weight(layer, bias)
    y, _ = predictions(net, x)
    values = net.values(x)
    P = layer_columns(layer, values[net.input_of(index)], bias)
    out_shape = values[index].shape[1:]
    D = (torch.rand(len(x), *W.shape, dtype=W.dtype) - 0.5) * 1e-3 if start is None else start
    for _ in range(steps):
        D.requires_grad_(True)
        logits = net.run(index, _apply(layer, W + D, P, bias, out_shape), values)
        other = logits.scatter(-1, y[:, None], -torch.inf).amax(-1)
        margin = logits.gather(-1, y[:, None])[:, 0] - other
        (grad,) = torch.autograd.grad(margin.sum(), D)
        with torch.no_grad():
            if norm == "fro":
                step = grad / torch.linalg.matrix_norm(grad).clamp_min(1e-300)[:, None, None]
                D = D - 0.25 * radius[:, None, None] * step
                scale = (radius / torch.linalg.matrix_norm(D).clamp_min(1e-300)).clamp(max=1.0)
                D = D * scale[:, None, None]
            else:
                D = D - 0.25 * radius[:, None, None] * torch.sign(grad)
                D = torch.maximum(torch.minimum(D, radius[:, None, None]), -radius[:, None, None])
    return D.detach()


def random_ball(shape, radius, norm) -> torch.Tensor:
    D = torch.randn(*shape, dtype=torch.float64)
    if norm == "fro":
        return D * (radius / torch.linalg.matrix_norm(D))[:, None, None]
    return torch.sign(D) * radius[:, None, None]  # a vertex of the max-norm ball


def perturbed_logits(net: Graph, x, Ds: list[torch.Tensor], bias: bool) -> torch.Tensor:
    """Forward pass with every affine weight ``W~_k + D_k`` (``D_k`` is ``(B, m, n)``)."""
    D = dict(zip(net.affine_indices, Ds))
    values = [x]
    for i, node in enumerate(net.nodes[1:], start=1):
        inputs = [values[j] for j in node.inputs]
        if i in D:
            layer = node.op
            Z = torch.matmul(layer_weight(layer, bias) + D[i],
                             layer_columns(layer, inputs[0], bias))
            if not bias:
                Z = Z + layer.bias[:, None]
            values.append(layer.uncolumns(Z, node.shape))
        else:
            values.append(node.op(*inputs))
    return values[-1]


def project(D: torch.Tensor, radius: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "fro":
        shrink = (radius / torch.linalg.matrix_norm(D).clamp_min(1e-300)).clamp(max=1.0)
        return D * shrink[:, None, None]
    return torch.maximum(torch.minimum(D, radius[:, None, None]), -radius[:, None, None])


def attacks(net, x, y, radii: list[torch.Tensor], norm: str, bias: bool, steps: int = 30):
    """Random perturbations on the sphere (vertices of the box) of every layer's ball, then
    projected gradient descent on the smallest margin over all layers jointly."""
    shapes = [layer_weight(net.layer(i), bias).shape for i in net.affine_indices]
    Ds = []
    for shape, r in zip(shapes, radii):
        D = torch.randn(len(x), *shape, dtype=torch.float64)
        Ds.append(D * (r / torch.linalg.matrix_norm(D))[:, None, None] if norm == "fro"
                  else torch.sign(D) * r[:, None, None])
    yield Ds
    for _ in range(steps):
        Ds = [D.detach().requires_grad_(True) for D in Ds]
        logits = perturbed_logits(net, x, Ds, bias)
        other = logits.scatter(-1, y[:, None], -torch.inf).amax(-1)
        margin = logits.gather(-1, y[:, None])[:, 0] - other
        grads = torch.autograd.grad(margin.sum(), Ds)
        with torch.no_grad():
            moved = []
            for D, g, r in zip(Ds, grads, radii):
                if norm == "fro":
                    step = g / torch.linalg.matrix_norm(g).clamp_min(1e-300)[:, None, None]
                else:
                    step = torch.sign(g)
                moved.append(project(D - 0.25 * r[:, None, None] * step, r, norm))
            Ds = moved
    yield Ds


def assert_attacks_inside_fail(net: Graph, x, y, index, r, norm: str, bias: bool,
                               from_witness: bool = False, classes=perturbed_classes) -> None:
    """The soundness check of one layer's radii ``r`` (``layer_radii``): projected gradient
    descent and a random point of the ball (a vertex for the max norm) at ``0.999 x lower``
    never change a class (``1e6`` where ``lower`` is infinite: the layer's input is 0 and no
    change moves anything); ``from_witness``: also descent from the witness scaled into the
    ball, where a start at 0 may see no gradient (saturated activations). ``classes``: the
    forward pass with ``W + D``."""
    inside = torch.where(torch.isfinite(r.lower), 0.999 * r.lower,
                         torch.full_like(r.lower, 1e6))
    W = layer_weight(net.layer(index), bias)
    changes = [pgd_attack(net, x, index, inside, norm, bias)]
    if from_witness:
        toward = r.witness.matrix() * torch.where(
            torch.isfinite(r.upper), inside / r.upper, torch.zeros_like(inside))[:, None, None]
        changes.append(pgd_attack(net, x, index, inside, norm, bias, start=toward))
    changes.append(random_ball((len(x), *W.shape), inside, norm))
    for D in changes:
        assert torch.equal(classes(net, x, index, D, bias), y), (
            f"layer {r.layer}, {norm}: an attack inside 0.999 lower changed a class")


def assert_witness_flips(net: Graph, x, y, index, r, bias: bool,
                         classes=perturbed_classes) -> None:
    """Teeth of the soundness check: the witness at ``upper`` changes the class it was found
    for, wherever one was found."""
    found = torch.isfinite(r.upper)
    assert torch.all(classes(net, x, index, r.witness.matrix(), bias)[found] != y[found])


def joint_margins(net: Graph, x, y, changes: dict) -> torch.Tensor:
    """Margins ``o_y - o_j`` ``(B, C)`` with the weight matrix of every layer ``k`` of
    ``changes`` replaced by ``W_k + E_k`` (``E_k`` ``(B, m, n)``, or ``(m, n)`` for every
    input; biases kept)."""
    Ds = [changes.get(i, torch.zeros_like(net.layer(i).matrix)[None].expand(len(x), -1, -1))
          for i in net.affine_indices]
    logits = perturbed_logits(net, x, Ds, False)
    return logits.gather(-1, y[:, None]) - logits


def _batched(kind: str, radius, shape) -> torch.Tensor:
    """A box radius as ``(B, m, n)``, a ball radius as ``(B, 1, 1)``."""
    radius = torch.as_tensor(radius, dtype=torch.float64)
    return radius.expand(shape).clone() if kind == "box" else \
        radius.reshape(-1, 1, 1).expand(shape[0], 1, 1).clone()


def project_set(E: torch.Tensor, kind: str, r: torch.Tensor) -> torch.Tensor:
    """The nearest point of the box ``|E| <= r`` (clamp) or the ball ``||E||_F <= r``
    (rescale)."""
    if kind == "box":
        return torch.maximum(torch.minimum(E, r), -r)
    shrink = (r / torch.linalg.matrix_norm(E).clamp_min(1e-300)[:, None, None]).clamp(max=1.0)
    return E * shrink


def joint_attack(net: Graph, x, y, sets: dict, steps: int = 30, corners: int = 3,
                 seed: int = 0) -> torch.Tensor:
    """The smallest margins ``(B, C)`` (elementwise over every change tried) when every layer
    ``k`` of ``sets`` changes its weight matrix by ``E_k`` within its set at once (``sets``:
    index -> ``("box", A)``, ``|E_ij| <= A_ij`` with ``A`` broadcastable to ``(B, m, n)``, or
    ``("ball", e)``, ``||E||_F <= e`` with ``e`` a number or ``(B,)``): ``corners`` random
    corners of the boxes (random points of the spheres), then projected gradient descent on
    the smallest margin over all the changes jointly, from 0 and from a corner, ``steps``
    each (signed steps in a box, normalised gradients in a ball, shrinking from a half of the
    set). A nonpositive entry at a class other than ``y`` is a changed class."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {k: (len(x), *net.layer(k).matrix.shape) for k in sets}
    radii = {k: _batched(kind, r, shapes[k]) for k, (kind, r) in sets.items()}

    def corner():
        out = {}
        for k, (kind, _) in sets.items():
            if kind == "box":
                signs = torch.randint(0, 2, shapes[k], generator=generator) * 2.0 - 1.0
                out[k] = signs.to(torch.float64) * radii[k]
            else:
                E = torch.randn(shapes[k], generator=generator, dtype=torch.float64)
                out[k] = E * radii[k] / torch.linalg.matrix_norm(E)[:, None, None]
        return out

    lowest = joint_margins(net, x, y, {})
    starts = [corner() for _ in range(corners)]
    for E in starts:
        lowest = torch.minimum(lowest, joint_margins(net, x, y, E))
    tiny = {k: 1e-6 * E for k, E in corner().items()}
    for E in (tiny, starts[0] if starts else corner()):
        for step in range(steps):
            E = {k: e.detach().requires_grad_(True) for k, e in E.items()}
            margins = joint_margins(net, x, y, E)
            lowest = torch.minimum(lowest, margins.detach())
            smallest = margins.scatter(-1, y[:, None], torch.inf).amin(-1)
            grads = torch.autograd.grad(smallest.sum(), list(E.values()))
            rate = 0.5 * (1 - step / steps) + 0.02
            with torch.no_grad():
                moved = {}
                for (k, e), g in zip(E.items(), grads):
                    kind, r = sets[k][0], radii[k]
                    if kind == "box":
                        direction = torch.sign(g)
                    else:
                        direction = g / torch.linalg.matrix_norm(g).clamp_min(1e-300)[:, None, None]
                    moved[k] = project_set(e - rate * r * direction, kind, r)
                E = moved
        lowest = torch.minimum(lowest, joint_margins(net, x, y, E).detach())
    return lowest
