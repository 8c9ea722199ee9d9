"""The rules of ``certify.capture.aten``'s ``BUILDERS`` for transformer blocks.

Layer norm over the last axis is one ``LayerNorm`` node; scaled dot-product attention
(``softmax(q k^T scale) v``, no mask) is decomposed into the nodes it is made of (a
``Permute`` of the keys, ``Product`` nodes, a ``ScaleShift`` and a ``Softmax``); and
``x / max(||x||, eps)`` (``F.normalize``) is read as a ``Norm`` value, the l2 norm over the
last axis, that ``clamp_min`` floors and ``expand`` passes through (``NORM_USERS``) until
``certify.capture.aten``'s division turns it into one ``Normalize`` node.
"""

from __future__ import annotations

import math

import torch

from certify.capture.build import Build, Norm, Ref, UnsupportedModelError
from certify.capture.operands import _const, _zeros
from certify.graph.operators import Expand, LayerNorm, Permute, Product, ScaleShift, Softmax

aten = torch.ops.aten


def _layer_norm(b: Build, fx, where, x, shape, weight=None, bias=None, eps=1e-5, cudnn=True):
    n = b.nodes[x.index].shape[-1]
    # Over (1, ..., 1, n): the mean and variance of each last-axis vector, as over (n,).
    if any(size != 1 for size in shape[:-1]):
        raise UnsupportedModelError(f"layer norm over the axes of sizes {tuple(shape)} "
                                    f"({where}); supported: over the last axis (any others "
                                    "normalised over of size 1)")
    g = torch.ones(n, dtype=torch.float64) if weight is None else \
        _const(weight, fx, "the weight").value.reshape(n)
    beta = _zeros(n) if bias is None else _const(bias, fx, "the bias").value.reshape(n)
    return b.node(LayerNorm(g, beta, float(eps)), [x], fx)


def _native_layer_norm(b: Build, fx, where, x, shape, weight, bias, eps):
    return (_layer_norm(b, fx, where, x, shape, weight, bias, eps), None, None)


def _attention(b: Build, fx, where, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
               scale=None, enable_gqa=False):
    """``softmax(q k^T scale) v`` as the nodes it is made of."""
    if attn_mask is not None or is_causal or dropout_p or enable_gqa:
        raise UnsupportedModelError(
            f"scaled_dot_product_attention with a mask, is_causal, dropout or grouped "
            f"queries ({where}); supported: plain attention softmax(q k^T scale) v")
    if not all(isinstance(t, Ref) for t in (q, k, v)):
        raise UnsupportedModelError(f"{fx.name}: attention with constant queries, keys or "
                                    f"values ({where})")
    *lead, T, E = b.nodes[q.index].shape
    S = b.nodes[k.index].shape[-2]
    n = len(lead) + 2
    keys = b.node(Permute(tuple(range(n - 2)) + (n - 1, n - 2)), [k], fx, f"{fx.name}/keys",
                  (*lead, E, S))
    scores = b.node(Product(matmul=True), [q, keys], fx, f"{fx.name}/scores", (*lead, T, S))
    factor = torch.tensor(1 / math.sqrt(E) if scale is None else float(scale),
                          dtype=torch.float64)
    scaled = b.node(ScaleShift(factor, torch.zeros((), dtype=torch.float64)), [scores], fx,
                    f"{fx.name}/scaled", (*lead, T, S))
    weights = b.node(Softmax(), [scaled], fx, f"{fx.name}/softmax", (*lead, T, S))
    return b.node(Product(matmul=True), [weights, v], fx)


def _vector_norm(b: Build, fx, where, x, ord=2, dim=None, keepdim=False, dtype=None):
    n = b.ndim(x)
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    if ord != 2 or len(dims) != 1 or dims[0] is None or b.dim(dims[0], n, fx) != n - 2 or \
            not keepdim:
        raise UnsupportedModelError(f"{fx.name}: a vector norm other than the l2 norm over the "
                                    f"last axis with keepdim=True ({where})")
    return Norm(x)


def _clamp_min(b: Build, fx, where, x, low):
    if isinstance(x, Norm) and x.eps == 0.0 and float(low) >= 0:
        return Norm(x.ref, float(low))
    raise UnsupportedModelError(f"{fx.name}: clamp_min({low}) of a computed tensor ({where}); "
                                "supported: the norm's floor in F.normalize")


def _expand(b: Build, fx, where, x, size, implicit=False):
    return b.node(Expand(b.shape(fx)), [x], fx)


def _expand_norm(b: Build, fx, where, x, *args, **kwargs):
    if isinstance(x, Norm):
        return x
    return _expand(b, fx, where, x, None)


# The operators a vector norm may feed on its way to F.normalize's division.
NORM_USERS = {aten.clamp_min, aten.expand, aten.expand_as, aten.div}
