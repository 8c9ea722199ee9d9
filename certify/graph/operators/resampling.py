"""Resampling of the last axes: padding that repeats the input's own entries (``Pad``:
reflect, replicate, circular; one to three axes) and interpolation (``Interpolate``:
nearest, nearest-exact, linear and bilinear, one or two axes; ``nn.Upsample``,
``F.interpolate``).

Both are separable linear maps of a computed tensor whose coefficients are nonnegative: per
axis, output entry ``o`` reads one input entry (a gather) or two, ``(1 - lambda_o) x_i +
lambda_o x_{i+1}`` with ``lambda_o`` in ``[0, 1]``. So they are ``LinearMap``s (THEORY.md
section 8): ``interval`` is the map of the box's ends (monotone, also in floating point),
``backward`` and ``jacobian`` the adjoint by autograd, and ``lipschitz`` Schur's test on the
coefficients in float64 (``base.schur_norms``): ``||M||_inf`` is the largest row sum (1:
the weights of an entry sum to one) and ``||M||_2 <= sqrt(||M||_1 ||M||_inf)``, exact for a
gather (``M^T M`` is diagonal, the number of times each input entry is read).

The forward maps are torch's own (``F.pad``, ``aten.upsample_linear1d`` and
``upsample_bilinear2d``, the entries its nearest kernels pick), on the input viewed as
``(N, C, *spatial)`` whatever axes come before the resampled ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from certify.graph.operators.linear_maps import LinearMap

aten = torch.ops.aten

PAD_MODES = ("reflect", "replicate", "circular")


def _resampled(x: torch.Tensor, k: int, kernel) -> torch.Tensor:
    """``kernel`` on the last ``k`` axes of ``x``, viewed as ``(N, C, *spatial)``."""
    front = x.shape[:x.ndim - k]
    if x.ndim == k + 1:
        flat = x.unsqueeze(1)
    else:
        flat = x.reshape(-1, *x.shape[x.ndim - k - 1:])
    out = kernel(flat)
    return out.reshape(*front, *out.shape[2:])


@dataclass(frozen=True)
class Pad(LinearMap):
    """``F.pad(x, pad, mode)`` with ``mode`` reflect, replicate or circular over the last
    ``len(pad) / 2`` axes (``pad`` in torch's order: last axis first, ``(before, after)``).

    Along an axis of ``n`` entries padded by ``(a, b)``, output entry ``o`` (``0 <= o <
    n + a + b``) reads input entry ``j = o - a`` folded back into ``[0, n)``: reflect
    ``n - 1 - |n - 1 - |j||`` (``a, b < n``), replicate ``clamp(j, 0, n - 1)``, circular
    ``j mod n`` (``0 <= a, b <= n``). Negative amounts crop (reflect, replicate)."""

    pad: tuple[int, ...]
    mode: str

    def __call__(self, x):
        return _resampled(x, len(self.pad) // 2, lambda t: F.pad(t, self.pad, mode=self.mode))


# torch's kernels by (mode, number of axes): (input, size, align_corners, scales) -> output.
KERNELS = {
    ("nearest", 1): lambda x, size, align, scales: aten.upsample_nearest1d(x, size, *scales),
    ("nearest", 2): lambda x, size, align, scales: aten.upsample_nearest2d(x, size, *scales),
    ("nearest-exact", 1):
        lambda x, size, align, scales: aten._upsample_nearest_exact1d(x, size, *scales),
    ("nearest-exact", 2):
        lambda x, size, align, scales: aten._upsample_nearest_exact2d(x, size, *scales),
    ("linear", 1):
        lambda x, size, align, scales: aten.upsample_linear1d(x, size, align, *scales),
    ("bilinear", 2):
        lambda x, size, align, scales: aten.upsample_bilinear2d(x, size, align, *scales),
}


@functools.lru_cache(maxsize=256)
def _sources(mode: str, axes: int, axis: int, n: int, m: int, scale) -> torch.Tensor:
    """The input entry (of ``n``) that each of ``m`` outputs along ``axis`` (of ``axes``)
    reads in nearest ``mode``: torch's CPU kernel on the float64 entries ``0, ..., n - 1``
    (the other axis kept at one entry)."""
    shape, size, scales = [1] * axes, [1] * axes, [None] * axes
    shape[axis], size[axis], scales[axis] = n, m, scale
    entries = torch.arange(n, dtype=torch.float64, device="cpu").reshape(1, 1, *shape)
    return KERNELS[mode, axes](entries, size, False, scales).flatten().long()


@dataclass(frozen=True)
class Interpolate(LinearMap):
    """``F.interpolate`` / ``nn.Upsample`` of the last ``len(size)`` axes to ``size``, as
    torch computes it in float64 on the CPU. ``mode``: ``"nearest"``, ``"nearest-exact"``
    (one or two axes), ``"linear"`` (one), ``"bilinear"`` (two); ``scales``: torch's scale
    factor per axis (``None``: none given).

    Along an axis of ``n`` entries resampled to ``m``, with ``s = 1 / scale`` (``n / m``
    without one), output entry ``o`` reads: nearest the entry ``min(floor(o s), n - 1)``,
    nearest-exact ``min(floor((o + 1/2) s), n - 1)`` (torch rounds the position to float32
    before the floor, and on two axes ``s`` too, where nearest copies when ``m = n`` and
    reads ``floor(o / 2)`` when ``m = 2 n``); (bi)linear the entries ``i = min(floor(r), n
    - 1)`` and ``i + 1`` (``i`` at the last entry) with weights ``1 - lambda``, ``lambda =
    clamp(r - i, 0, 1)``, at ``r = o (n - 1) / (m - 1)`` with ``align_corners`` (0 for ``m
    = 1``), ``r = max(s (o + 1/2) - 1/2, 0)`` without (a copy when ``m = n``).

    The nearest modes gather the entries that torch's CPU kernel picks (``_sources``), so
    that the graph reads the same entries on every device; (bi)linear modes run torch's
    kernel."""

    size: tuple[int, ...]
    mode: str = "nearest"
    align_corners: bool = False
    scales: tuple[float | None, ...] = ()

    def __call__(self, x):
        k = len(self.size)
        scales = self.scales or (None,) * k
        if "linear" in self.mode:
            kernel = KERNELS[self.mode, k]
            return _resampled(x, k, lambda t: kernel(t, list(self.size), self.align_corners,
                                                     scales))
        for axis, (m, scale) in enumerate(zip(self.size, scales)):
            dim = x.ndim - k + axis
            x = x.index_select(dim, _sources(self.mode, k, axis, x.shape[dim], m, scale)
                               .to(x.device))
        return x
