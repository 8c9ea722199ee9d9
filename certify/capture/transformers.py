"""The rules of ``certify.capture.aten``'s ``BUILDERS`` for attention.

Scaled dot-product attention (``softmax(q k^T scale + mask) v``) is decomposed into the
nodes it is made of (a ``Permute`` of the keys, ``Product`` nodes, a ``ScaleShift`` and a
``Softmax``). Attention masks are constants: a boolean mask (True keeps), ``is_causal`` (the
lower triangle), or one added to the scores, by ``scaled_dot_product_attention`` or by hand
(``scores + mask``, ``masked_fill``, ``torch.where``). Finite entries shift the scores (a
``ScaleShift``, exact); ``-inf`` entries hide theirs: the scores become a ``Masked`` value
that only a softmax reads, as a ``Softmax`` with ``keep`` whose hidden weights are 0 exactly
(THEORY.md section 8), so that no ``-inf`` enters any bound.

``x / max(||x||, eps)`` (``F.normalize``) is read as a ``Norm`` value, the l2 norm over the
last axis, that ``clamp_min`` floors and ``expand`` passes through (``NORM_USERS``) until
``certify.capture.aten``'s division turns it into one ``Normalize`` node.
"""

from __future__ import annotations

import math

import torch

from certify.capture.build import Build, Const, Masked, Norm, Ref, UnsupportedModelError
from certify.capture.operands import _per_input
from certify.graph.operators import Expand, Permute, Product, ScaleShift, Softmax

aten = torch.ops.aten


def _finite_part(t: torch.Tensor, fx, where):
    """An additive constant as its finite part (0 where it is ``-inf``) and where it is not
    ``-inf`` (``None``: nowhere)."""
    if bool((t == math.inf).any() or t.isnan().any()):
        raise UnsupportedModelError(f"{fx.name}: +inf or NaN in a constant added to a computed "
                                    f"tensor ({where}); supported: finite entries and -inf "
                                    "(an attention mask before a softmax)")
    keep = t != -math.inf
    if bool(keep.all()):
        return t, None
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype)), keep


def _masked(ref: Ref, keep) -> Ref | Masked:
    """``ref`` hidden where ``keep`` is False; itself when ``keep`` is ``None`` or all True."""
    return ref if keep is None or bool(keep.all()) else Masked(ref, keep)


def _add_constant(b: Build, fx, where, x, t: torch.Tensor):
    """``x + t`` for a constant ``t`` (per input): a ``ScaleShift`` of its finite part, and
    its ``-inf`` entries (an additive attention mask) as a ``Masked`` value for the softmax."""
    shift, keep = _finite_part(t, fx, where)
    ref = x.ref if isinstance(x, Masked) else x
    if bool(shift.any()):
        ref = b.node(ScaleShift(torch.ones((), dtype=torch.float64), shift), [ref], fx)
    if isinstance(x, Masked):  # -inf plus a finite constant stays hidden
        keep = x.keep if keep is None else keep & x.keep
    return _masked(ref, keep)


def _select_constant(b: Build, fx, where, x, kept: torch.Tensor, c: torch.Tensor):
    """``x`` where ``kept`` (a constant boolean mask), else the constant ``c``:
    ``x * kept + c * (1 - kept)``, exact for finite ``x``, with ``-inf`` entries of ``c``
    hiding theirs (``Masked``)."""
    hidden = ~kept & (c == -math.inf)
    if bool((~kept & ((c == math.inf) | c.isnan())).any()):
        raise UnsupportedModelError(f"{fx.name}: +inf or NaN put into a computed tensor "
                                    f"({where}); supported: finite values and -inf (a mask)")
    shift = torch.where(kept | hidden, torch.zeros((), dtype=torch.float64), c)
    ref = x.ref if isinstance(x, Masked) else x
    ref = b.node(ScaleShift(kept.to(torch.float64), shift), [ref], fx)
    keep = ~hidden
    if isinstance(x, Masked):  # the entries replaced by finite constants show again
        keep = keep & (x.keep | ~kept)
    return _masked(ref, keep)


def _mask_operand(b: Build, fx, where, mask, x, what: str) -> torch.Tensor:
    if not isinstance(mask, Const):
        raise UnsupportedModelError(f"{fx.name}: {what} computed from the input ({where}); "
                                    "supported: constant masks")
    ref = x.ref if isinstance(x, Masked) else x
    return _per_input(mask, fx, what, b.ndim(ref), b.at)


def _masked_fill(b: Build, fx, where, x, mask, value):
    """``x.masked_fill(mask, value)`` with a constant mask: ``-inf`` hides the entries from
    the softmax after it; a finite value replaces them."""
    hide = _mask_operand(b, fx, where, mask, x, "the mask of masked_fill").to(torch.bool)
    value = torch.tensor(float(value.value if isinstance(value, Const) else value),
                         dtype=torch.float64)
    return _select_constant(b, fx, where, x, ~hide, value)


def _where(b: Build, fx, where, condition, a, c):
    """``torch.where(condition, a, c)`` with a constant condition, one of ``a`` and ``c``
    computed and the other a constant."""
    x, other, kept = (a, c, True) if isinstance(a, (Ref, Masked)) else (c, a, False)
    if isinstance(other, (Ref, Masked)):
        raise UnsupportedModelError(f"{fx.name}: torch.where between two computed tensors "
                                    f"({where}); supported: a computed tensor and a constant")
    cond = _mask_operand(b, fx, where, condition, x, "the condition of torch.where")
    constant = other.value if isinstance(other, Const) else \
        torch.tensor(float(other), dtype=torch.float64)
    ref = x.ref if isinstance(x, Masked) else x
    constant = _per_input(Const(constant), fx, "torch.where", b.ndim(ref), b.at)
    return _select_constant(b, fx, where, x, cond if kept else ~cond, constant)


def _attention(b: Build, fx, where, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
               scale=None, enable_gqa=False):
    """``softmax(q k^T scale + mask) v`` as the nodes it is made of: the mask a constant
    (boolean: True keeps; float: added, ``-inf`` hides) and ``is_causal`` the lower
    triangle; hidden scores get weight 0 exactly (``Softmax`` with ``keep``)."""
    if dropout_p or enable_gqa:
        raise UnsupportedModelError(
            f"scaled_dot_product_attention with dropout or grouped queries ({where}); "
            "supported: softmax(q k^T scale + mask) v")
    if not all(isinstance(t, Ref) for t in (q, k, v)):
        raise UnsupportedModelError(f"{fx.name}: attention with constant queries, keys or "
                                    f"values ({where})")
    for d in (-2, -1):  # the batch axis must be among the leading ones
        b.dim(d, b.ndim(q), fx, "attention")
    *lead, T, E = b.nodes[q.index].shape
    S = b.nodes[k.index].shape[-2]
    shift, keep = torch.zeros((), dtype=torch.float64), None
    if attn_mask is not None:
        mask = _mask_operand(b, fx, where, attn_mask, q, "the attention mask")
        if mask.dtype == torch.bool:
            keep = mask
        else:
            shift, keep = _finite_part(mask.to(torch.float64), fx, where)
    if is_causal:
        causal = torch.ones(T, S, dtype=torch.bool).tril()
        keep = causal if keep is None else keep & causal
    if keep is not None and bool(keep.all()):
        keep = None
    if keep is not None and not bool(keep.any(-1).all()):
        raise UnsupportedModelError(f"{fx.name}: the attention mask hides every key from "
                                    f"some query ({where}); every row must keep one key")
    n = len(lead) + 2
    keys = b.node(Permute(tuple(range(n - 2)) + (n - 1, n - 2)), [k], fx, f"{fx.name}/keys",
                  (*lead, E, S))
    scores = b.node(Product(matmul=True), [q, keys], fx, f"{fx.name}/scores", (*lead, T, S))
    factor = torch.tensor(1 / math.sqrt(E) if scale is None else float(scale),
                          dtype=torch.float64)
    scaled = b.node(ScaleShift(factor, shift), [scores], fx, f"{fx.name}/scaled",
                    (*lead, T, S))
    weights = b.node(Softmax(keep), [scaled], fx, f"{fx.name}/softmax", (*lead, T, S))
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
    if len(fx.meta["val"].shape) != b.ndim(x):
        raise UnsupportedModelError(f"{fx.name}: expand adds axes in front of the batch axis "
                                    f"({where}); supported: expanding axes of size one")
    return b.node(Expand(b.shape(fx)), [x], fx)


def _expand_norm(b: Build, fx, where, x, *args, **kwargs):
    if isinstance(x, Norm):
        return x
    return _expand(b, fx, where, x, None)


# The operators a vector norm may feed on its way to F.normalize's division.
NORM_USERS = {aten.clamp_min, aten.expand, aten.expand_as, aten.div}
