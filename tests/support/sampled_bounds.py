"""A captured graph's values when one node moves, for checking bounds against sampled and
attacked points (``bounds/``): ``upto`` (a node's value when node ``start`` takes ``z``),
``copies`` (every node's value for stacked copies of the batch), ``margins`` (``o_y - o_j``
when node ``start`` takes ``z``) and ``tolerance`` (the rounding allowed in the comparisons);
``regions`` (random section-4 regions of each layer of a model), ``samples`` (points of a
region), ``minimised`` (projected gradient descent over a region, the attack) and
``attacked_margins`` (that attack on the margins).
"""

from __future__ import annotations

import torch

from certify.bounds.regions import Region
from certify.capture.export import capture
from certify.graph.graph import Graph


def upto(net: Graph, start: int, z: torch.Tensor, values: list, last: int) -> torch.Tensor:
    """Node ``last``'s value when node ``start`` takes ``z`` (the others from ``values``):
    ``net.rerun`` stopped at ``last``."""
    values = list(values)
    values[start] = z
    for k in net.downstream(start)[1:]:
        if k > last:
            break
        node = net.nodes[k]
        values[k] = node.op(*(values[j] for j in node.inputs))
    return values[last]


def copies(values: list, n: int) -> list:
    """Every node's value for ``n`` stacked copies of the batch (``minimised``'s layout)."""
    return [v.repeat(n // len(v), *[1] * (v.ndim - 1)) for v in values]


def margins(net: Graph, start: int, z: torch.Tensor, y: torch.Tensor, values) -> torch.Tensor:
    """``o_y - o_j`` with node ``start`` at ``z`` and the others from ``values``."""
    o = net.run(start, z, copies(values, len(z)))
    return o.gather(-1, y[:, None]) - o


def tolerance(t: torch.Tensor) -> torch.Tensor:
    return 1e-9 * (1 + t.abs())


def regions(model_and_shape, norm: str, size: float, seed: int, count: int = 3):
    """For each affine layer but the last: the graph, the layer's node index, the region,
    the classes and every node's value."""
    model, shape = model_and_shape
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, *shape, dtype=torch.float64, generator=generator)
    net = capture(model, x)
    y = net(x).argmax(-1)
    values = net.values(x)
    for index in net.affine_indices[:-1]:
        z = values[index]
        if norm == "fro":
            unit = size * (0.5 + torch.rand(count, dtype=z.dtype, generator=generator))
        else:
            unit = size * torch.rand(z.shape, dtype=z.dtype, generator=generator)
        yield net, index, Region(z, norm, unit), y, values


def samples(region: Region, rho: torch.Tensor, generator, count: int = 16):
    """Points of ``z + rho U``: on the sphere (``fro``) or at box corners and inside (``max``)."""
    z = region.z
    for k in range(count):
        noise = torch.randn(z.shape, dtype=z.dtype, generator=generator)
        if region.norm == "fro":
            flat = noise.reshape(len(z), -1)
            radius = (rho * region.unit)[:, None] * (1 if k % 2 else torch.rand(
                len(z), 1, dtype=z.dtype, generator=generator))
            yield z + (flat / flat.norm(dim=-1, keepdim=True) * radius).reshape(z.shape)
        else:
            direction = torch.sign(noise) if k % 2 else 2 * torch.rand(
                z.shape, dtype=z.dtype, generator=generator) - 1
            yield z + direction * rho.reshape(-1, *[1] * (z.ndim - 1)) * region.unit


def _project(region: Region, rho: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """The nearest point of ``z + rho U`` (``point`` has a leading axis of copies)."""
    delta = point - region.z
    if region.norm == "fro":
        flat = delta.reshape(*delta.shape[:2], -1)
        radius = (rho * region.unit)[None, :]
        shrink = torch.clamp(radius / flat.norm(dim=-1).clamp(min=1e-300), max=1.0)
        flat = flat * shrink[..., None]
        return region.z + flat.reshape(delta.shape)
    bound = rho.reshape(-1, *[1] * (region.z.ndim - 1)) * region.unit
    return region.z + torch.maximum(torch.minimum(delta, bound), -bound)


def minimised(f, region: Region, rho: torch.Tensor, generator, steps: int = 40):
    """The smallest value of every output entry of ``f`` over ``z + rho U`` found by
    projected gradient descent, one descent per entry (an attack on the bounds)."""
    K = f(region.z).reshape(len(region.z), -1).shape[1]
    start = torch.randn((K, *region.z.shape), dtype=region.z.dtype, generator=generator)
    point = _project(region, rho, region.z + 1e-3 * start)
    entries = torch.arange(K)
    best = None
    size = (rho * (region.unit if region.norm == "fro" else region.unit.flatten(1).amax(-1)))
    for t in range(steps):
        point = point.detach().requires_grad_(True)
        values = f(point.reshape(-1, *region.z.shape[1:])).reshape(K, len(region.z), K)
        own = values[entries, :, entries]  # (K, B): entry k of copy k
        best = own.detach() if best is None else torch.minimum(best, own.detach())
        (grad,) = torch.autograd.grad(own.sum(), point)
        if region.norm == "fro":
            g = grad.reshape(K, len(region.z), -1)
            step = g / g.norm(dim=-1, keepdim=True).clamp(min=1e-300)
            step = step.reshape(grad.shape) * size.reshape(1, -1, *[1] * (grad.ndim - 2))
        else:
            step = torch.sign(grad) * rho.reshape(1, -1, *[1] * (grad.ndim - 2)) * region.unit
        point = _project(region, rho, point - step * 0.5 * 0.9**t)
    return best.T  # (B, K)


def attacked_margins(net: Graph, index: int, region: Region, rho: torch.Tensor, y, values,
                     generator) -> torch.Tensor:
    """The smallest margins ``(B, C)`` that ``minimised`` finds over ``z + rho U``."""
    return minimised(lambda p: margins(net, index, p, y.repeat(len(p) // len(y)), values),
                     region, rho, generator)
