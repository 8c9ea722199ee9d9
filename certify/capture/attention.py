"""``nn.MultiheadAttention`` exported through a batch-first forward (THEORY.md section 8).

torch's own forward runs on ``(T, B, E)`` and folds the batch into the heads (views
``(T, B * H, d)``, then ``(T * B, E)`` before the output projection), which no per-input
graph follows; in eval mode it may also call one fused kernel
(``torch._native_multi_head_attention``, and ``torch._transformer_encoder_layer_fwd`` for a
whole ``nn.TransformerEncoderLayer``). While ``rewritten(module)`` holds (the export), every
``nn.MultiheadAttention`` runs ``_forward`` instead, on the same parameters, and torch's
fast paths are off. ``_forward`` computes what torch's forward does, with the batch axis
first throughout:

* the packed input projection as one dense layer (``in_proj_weight``: the query, key and
  value of all heads), or three when ``kdim``/``vdim`` differ from ``embed_dim``
  (``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``); the heads split by reshapes;
* the masks merged as torch merges them: ``attn_mask`` ``(T, S)`` or ``(B * H, T, S)`` and
  ``key_padding_mask`` ``(B, S)``, boolean (True hides) or added, and ``is_causal`` (a hint
  that torch follows, instead of the mask, when no padding mask is given and no weights are
  asked for);
* ``F.scaled_dot_product_attention``, or, when the weights are asked for,
  ``softmax(q k^T / sqrt(d) + mask)`` and the weights times the values (the weights
  returned, averaged over the heads if ``average_attn_weights``);
* the output projection (``out_proj``).

The export reads those operators like any others; ``certify.capture.export.capture`` then
checks the graph against the module's own forward. Refused: ``add_bias_kv``,
``add_zero_attn``, a subclass with its own forward, and cross-attention with one packed
projection (its rows would be two layers of one weight).
"""

from __future__ import annotations

import contextlib
import math
import types

import torch
import torch.nn.functional as F
from torch import nn

from certify.capture.build import UnsupportedModelError


def refused(name: str, m: nn.MultiheadAttention) -> str | None:
    """Why ``m`` cannot be exported through ``_forward`` (``None``: it can)."""
    if type(m).forward is not nn.MultiheadAttention.forward:
        return (f"module {name!r} ({type(m).__name__}) overrides the forward of "
                "nn.MultiheadAttention; certify reads nn.MultiheadAttention itself, or "
                "attention written with nn.Linear projections and "
                "F.scaled_dot_product_attention")
    if m.bias_k is not None or m.add_zero_attn:
        return (f"module {name!r} (MultiheadAttention) has add_bias_kv or add_zero_attn; "
                "supported: without them")
    return None


def _float_mask(mask, dtype):
    """A mask as torch adds it to the scores: boolean True hides (``-inf``)."""
    if mask is None or mask.is_floating_point():
        return mask if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(mask.to(torch.bool), -math.inf)


def _forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
             average_attn_weights=True, is_causal=False):
    """``nn.MultiheadAttention.forward``, batch first throughout (module docstring)."""
    if query.dim() != 3:
        raise UnsupportedModelError("nn.MultiheadAttention on unbatched queries; certify reads "
                                    "(B, T, E) or, with batch_first=False, (T, B, E)")
    if self._qkv_same_embed_dim and not (query is key and key is value):
        raise UnsupportedModelError(
            "nn.MultiheadAttention with different query, key and value tensors and one packed "
            "in_proj_weight: its rows would be two layers of one weight; supported: "
            "self-attention (query is key is value), or kdim/vdim other than embed_dim "
            "(separate projection weights)")
    if is_causal and attn_mask is None:
        raise UnsupportedModelError("nn.MultiheadAttention with is_causal=True needs attn_mask "
                                    "as well (torch refuses it too)")

    def batch_first(t):
        return t if self.batch_first else t.transpose(0, 1)

    query, key, value = batch_first(query), batch_first(key), batch_first(value)
    B, T, E = query.shape
    S, H = key.shape[1], self.num_heads
    d = E // H
    if self._qkv_same_embed_dim:
        q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).unflatten(
            -1, (3, H, d)).unbind(2)
    else:
        bias = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        q, k, v = (F.linear(x, w, b_).unflatten(-1, (H, d)) for x, w, b_ in zip(
            (query, key, value), (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight),
            bias))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T or S, d)

    causal = is_causal and key_padding_mask is None and not need_weights
    mask = None
    if not causal:
        mask = _float_mask(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # (B * H, T, S), batch major
            mask = mask.view(B, H, T, S)
        padding = _float_mask(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.view(B, 1, 1, S)
            mask = padding if mask is None else mask + padding
    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1)
        weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        out = weights @ v
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal)
    out = F.linear(out.transpose(1, 2).reshape(B, T, E), self.out_proj.weight,
                   self.out_proj.bias)
    return batch_first(out), weights


@contextlib.contextmanager
def rewritten(module: nn.Module):
    """``module`` with every ``nn.MultiheadAttention`` running ``_forward`` and torch's
    attention fast paths off, until the block ends."""
    attentions = [m for m in module.modules() if isinstance(m, nn.MultiheadAttention)]
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    for m in attentions:
        m.forward = types.MethodType(_forward, m)
    try:
        yield module
    finally:
        for m in attentions:
            del m.forward
        torch.backends.mha.set_fastpath_enabled(fast)
