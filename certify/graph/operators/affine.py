"""The certified layers: ``z = W h + b`` for every operator with a weight parameter.

Dense (``linear``, ``addmm``, ``mm``/``matmul`` by a weight) acts on the last axis, so a
Linear layer over a sequence ``(B, *positions, n)`` is the batch case of THEORY.md section 2
like a convolution: ``Z = W P + b`` with the layer input as columns ``P`` ``(B, n, L)``
(``L`` positions; one column for a plain dense input). Convolutions (``conv1d``, ``conv2d``;
any stride, padding, dilation; one group) have the im2col patches as ``P`` and the kernel
reshaped to ``c_out x (c_in k)`` as ``W`` (section 4). A batch norm right after the layer is
folded into it (``fold_batchnorm``), so the weight certified is the deployed, folded one.

Grouped convolutions (depthwise: one group per channel) certify the whole kernel, a
``c_out x (c_in / g) k`` matrix whose rows of group ``i`` act on that group's patches
``P_i`` only: ``Z_c = W_c P_{g(c)}``. Laying the groups' patches side by side,
``P~ = [P_1 ... P_g]`` ``(n / g, g L)``, makes this the shared-``D`` case again:
``dZ = D P~`` restricted to the blocks where a row meets its own group (``columns`` puts
zeros elsewhere, ``uncolumns`` keeps those blocks), so every region and witness of a
convolution holds unchanged and exactly, at ``g`` times the columns.

A transposed convolution is the convolution it equals: the input stuffed with
``stride - 1`` zeros between entries, padded by ``d (k - 1) - p`` (``output_padding`` more
at the end), and the kernel flipped with its channel axes swapped per group (``swap_kernel``).
``weight`` holds that kernel, a permutation of the module's entries, so every norm of a
change is the same as on the module's kernel.

``FixedAffine`` is the same dense map with a weight that is not certified: the recurrent
weight of an unrolled LSTM, GRU or RNN, which every time step uses (``certify.capture.recurrent``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from certify.closed_forms.thresholds import singular_values_upper
from certify.graph.operators.base import EPS, ROUND, Operator, adjoints, row_sum
from certify.graph.operators.enclosure import Enclosure


@dataclass(frozen=True, eq=False)
class Affine(Operator):
    """``W h + b``: a dense layer, or a convolution (grouped, depthwise or transposed) on its
    patches; the certified layers."""

    weight: torch.Tensor  # (m, n) dense; (c_out, c_in, k) or (c_out, c_in, k_h, k_w) conv
    bias: torch.Tensor  # (m,)
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    transposed: bool = False
    output_padding: tuple[int, ...] = ()

    @property
    def is_conv(self) -> bool:
        return self.weight.ndim > 2

    @property
    def matrix(self) -> torch.Tensor:
        """The weight as a matrix ``(m, n)``: a kernel is reshaped to ``c_out x (c_in k)``."""
        return self.weight.reshape(self.weight.shape[0], -1)

    def with_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Affine":
        return dataclasses.replace(self, weight=weight.reshape(self.weight.shape),
                                   bias=self.bias if bias is None else bias)

    def linear(self, x: torch.Tensor, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """``W x`` (+ ``bias``; ``weight`` replaces ``W``)."""
        W = self.weight if weight is None else weight.reshape(self.weight.shape)
        if not self.is_conv:
            return x @ W.T if bias is None else F.linear(x, W, bias)
        if self.transposed:
            conv = F.conv_transpose1d if W.ndim == 3 else F.conv_transpose2d
            return conv(x, swap_kernel(W, self.groups), bias, self.stride, self.padding,
                        self.output_padding, self.groups, self.dilation)
        conv = F.conv1d if W.ndim == 3 else F.conv2d
        return conv(x, W, bias, self.stride, self.padding, self.dilation, self.groups)

    def __call__(self, x):
        return self.linear(x, bias=self.bias)

    def _bias_rows(self, shape) -> torch.Tensor:
        """The bias broadcast to one output ``shape``."""
        b = self.bias if not self.is_conv else self.bias.reshape(-1, *[1] * (len(shape) - 1))
        return b.expand(shape)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The layer input as columns ``P~`` ``(B, n, L)``: dense inputs ``(B, *positions, n)``
        (``L = 1`` for ``(B, n)``), convolutions their im2col patches, for ``g`` groups
        ``[P_1 ... P_g]`` ``(B, n / g, g L)``."""
        if not self.is_conv:
            return x.reshape(len(x), -1, x.shape[-1]).transpose(1, 2)
        kernel, stride, padding = self.weight.shape[2:], self.stride, self.padding
        if self.transposed:
            x, stride, padding = self._stuffed(x), (1,) * len(kernel), (0,) * len(kernel)
        if self.weight.ndim == 3:  # conv1d as conv2d on a height-one map
            x, kernel, stride, padding = x[:, :, None], (1, *kernel), (1, *stride), (0, *padding)
        P = F.unfold(x, kernel, dilation=(1,) * (4 - self.weight.ndim) + self.dilation,
                     padding=padding, stride=stride)
        B, n, L = P.shape
        g = self.groups
        return P.reshape(B, g, n // g, L).transpose(1, 2).reshape(B, n // g, g * L)

    def _stuffed(self, x: torch.Tensor) -> torch.Tensor:
        """A transposed convolution's input as its convolution sees it: ``stride - 1`` zeros
        between entries, ``d (k - 1) - p`` zeros around (cropped where negative) and
        ``output_padding`` more at the end of each axis."""
        spatial = x.shape[2:]
        out = x.new_zeros(*x.shape[:2], *[(n - 1) * s + 1 for n, s in zip(spatial, self.stride)])
        out[(..., *[slice(None, None, s) for s in self.stride])] = x
        pads = []
        for k, d, p, extra in reversed(list(zip(self.weight.shape[2:], self.dilation,
                                                self.padding, self.output_padding))):
            pads += [d * (k - 1) - p, d * (k - 1) - p + extra]
        return F.pad(out, pads)

    def columns(self, Z: torch.Tensor) -> torch.Tensor:
        """The output ``(B, *out)`` as columns ``(B, m, L)``, matching ``patches``; for
        ``g`` groups ``(B, m, g L)``, zero outside the blocks of each row's own group."""
        if not self.is_conv:
            return Z.reshape(len(Z), -1, Z.shape[-1]).transpose(1, 2)
        B, m, g = len(Z), Z.shape[1], self.groups
        if g == 1:
            return Z.reshape(B, m, -1)
        eye = torch.eye(g, dtype=Z.dtype, device=Z.device)[:, None, :, None]
        return (Z.reshape(B, g, m // g, 1, -1) * eye).reshape(B, m, -1)

    def uncolumns(self, Z: torch.Tensor, shape) -> torch.Tensor:
        """Inverse of ``columns``: ``(B, m, L)`` back to ``(B, *shape)`` (the blocks of each
        row's own group for grouped convolutions)."""
        if not self.is_conv:
            return Z.transpose(1, 2).reshape(len(Z), *shape)
        B, m, g = len(Z), Z.shape[1], self.groups
        if g > 1:  # (B, g, m/g, g, L): the diagonal blocks
            Z = torch.diagonal(Z.reshape(B, g, m // g, g, -1), dim1=1, dim2=3)
            Z = Z.permute(0, 3, 1, 2)
        return Z.reshape(B, *shape)

    @property
    def overlap(self) -> int:
        """How many patches one input entry can lie in (1 for dense layers)."""
        if not self.is_conv:
            return 1
        count = 1
        stride = (1,) * len(self.stride) if self.transposed else self.stride
        for k, d, s in zip(self.weight.shape[2:], self.dilation, stride):
            # A dilated kernel touches k positions spread over (k - 1) d + 1; with stride s
            # an entry meets at most ceil(that / s) windows per axis, and never more than k.
            count *= min(k, math.ceil(((k - 1) * d + 1) / s))
        return count

    def interval(self, box):
        lo, hi = box
        center, radius = (hi + lo) / 2, (hi - lo) / 2
        c = self(center)
        r = self.linear(radius, self.weight.abs()) * (1 + 1e-12)
        return c - r, c + r

    def times_weight(self, A: torch.Tensor, weight: torch.Tensor, in_shape) -> torch.Tensor:
        """Rows ``A`` ``(B, R, *out)`` composed with the linear part, ``weight`` for ``W``."""
        if not self.is_conv:
            return A @ weight
        if self.transposed:
            (rows,) = adjoints(lambda x: self.linear(x, weight), A, [in_shape])
            return rows
        # The convolution's adjoint directly (autograd would run the convolution first).
        B, R = A.shape[:2]
        W = weight.reshape(self.weight.shape)
        transpose = torch.nn.grad.conv1d_input if W.ndim == 3 else torch.nn.grad.conv2d_input
        rows = transpose((B * R, *in_shape), W, A.reshape(B * R, *A.shape[2:]), self.stride,
                         self.padding, self.dilation, self.groups)
        return rows.reshape(B, R, *in_shape)

    def backward(self, A, boxes, lower):
        d = row_sum(A * self._bias_rows(A.shape[2:]))
        return (self.times_weight(A, self.weight, boxes[0][0].shape[1:]),), d, None

    def enclose(self, inputs, boxes):
        shift = self.bias.reshape(-1, *[1] * (self.weight.ndim - 2))
        return Enclosure.through(self.linear, lambda x: self.linear(x, self.weight.abs()),
                                 inputs, shift)

    def jacobian(self, rows, boxes):
        lo, hi = rows
        shape = boxes[0][0].shape[1:]
        center = self.times_weight((hi + lo) / 2, self.weight, shape)
        radius = self.times_weight((hi - lo) / 2, self.weight.abs(), shape)
        radius = radius * (1 + ROUND) + ROUND * center.abs()
        return ((center - radius, center + radius),)

    def operator_norm(self, norm: str) -> float:
        """Rigorous upper bound of the operator norm of ``h -> W h`` (section 5): l2
        ``sqrt(overlap) sigma_max(W)`` (every entry lies in at most ``overlap`` patches, so
        ``||P(x)||_F <= sqrt(overlap) ||x||_2``; for ``g`` groups the largest over the groups'
        blocks, the map being block diagonal); l_inf the largest row l1 norm, inflated by
        ``n eps`` for the summation (padding only removes terms). Computed once per weight
        (an SVD for l2): cached with the weight's version, which in-place changes bump."""
        key = (norm, self.weight._version)
        if key not in self._norms:
            W = self.matrix
            blocks = W.reshape(self.groups, -1, W.shape[1])  # the map is block diagonal
            self._norms[key] = (
                math.sqrt(self.overlap) * max(float(singular_values_upper(w)[0]) for w in blocks)
                if norm == "fro" else float(W.abs().sum(dim=1).max()) * (1 + W.shape[1] * EPS))
        return self._norms[key]

    @functools.cached_property
    def _norms(self) -> dict:
        return {}

    def lipschitz(self, norm, in_shapes):
        return (self.operator_norm(norm),)

    def reach_interval(self, box, nominal, reach):
        """``nominal_out +- ||W_i restricted to the inputs that vary||_2 reach``: the output
        box when ``||x - nominal||_2 <= reach`` (l2 geometry), per output entry."""
        varies = (box[1] > box[0]).to(self.weight.dtype)
        rows = torch.sqrt(self.linear(varies, self.weight**2)) * (1 + ROUND)
        center = self(nominal)
        spread = rows * reach.reshape(-1, *[1] * (center.ndim - 1)) * (1 + ROUND)
        return center - spread, center + spread


@dataclass(frozen=True, eq=False)
class FixedAffine(Operator):
    """``z = W h + b`` on the last axis with ``W`` and ``b`` constants of the network, not a
    certified layer (not in ``Graph.affine_indices``): a weight that several nodes use, the
    hidden-to-hidden weight of a recurrence at every time step. A certificate perturbs one
    node, and a change of the weight moves every use at once, so no use is certified on its
    own. Every rule is ``Affine``'s."""

    weight: torch.Tensor  # (m, n)
    bias: torch.Tensor  # (m,)

    @functools.cached_property
    def map(self) -> Affine:
        return Affine(self.weight, self.bias)

    def __call__(self, x):
        return self.map(x)

    def interval(self, box):
        return self.map.interval(box)

    def backward(self, A, boxes, lower):
        return self.map.backward(A, boxes, lower)

    def enclose(self, inputs, boxes):
        return self.map.enclose(inputs, boxes)

    def jacobian(self, rows, boxes):
        return self.map.jacobian(rows, boxes)

    def lipschitz(self, norm, in_shapes):
        return self.map.lipschitz(norm, in_shapes)


def fold_batchnorm(affine: Affine, weight, bias, mean, var, eps: float) -> Affine:
    """``gamma (W h + b - mu) / sqrt(var + eps) + beta`` as one affine layer."""
    scale = (weight if weight is not None else 1.0) / torch.sqrt(var + eps)
    shift = bias if bias is not None else 0.0
    shape = (-1,) + (1,) * (affine.weight.ndim - 1)
    return dataclasses.replace(affine, weight=affine.weight * scale.reshape(shape),
                               bias=(affine.bias - mean) * scale + shift)


def swap_kernel(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A kernel ``(a, b / groups, *k)`` as ``(b, a / groups, *k)`` flipped in space: a
    transposed convolution's kernel as the equivalent convolution's, and back (an involution)."""
    a, b, k = weight.shape[0], weight.shape[1] * groups, weight.shape[2:]
    W = weight.reshape(groups, a // groups, b // groups, *k).transpose(1, 2)
    return W.reshape(b, a // groups, *k).flip(list(range(2, weight.ndim)))
