"""Tiny random transformers for the soundness tests: ``Block`` (pre- or post-LN, softmax
attention by explicit matmuls or ``F.scaled_dot_product_attention``, a GELU MLP), ``Vit``
(patches by a strided convolution, position embedding, blocks, final LayerNorm, mean pooling
or the first token) and ``Text`` (a BERT-like encoder on embedded tokens with l2-normalised
sentence embeddings), and the hypothesis strategy ``transformers`` of ``(model,
input_shape)`` pairs (float64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn


class Block(nn.Module):
    """One transformer block: pre- or post-LN, softmax attention with separate projections
    (explicit matmuls or ``F.scaled_dot_product_attention``), a GELU MLP."""

    def __init__(self, width: int, heads: int, pre: bool, fused: bool, act: str):
        super().__init__()
        self.heads, self.pre, self.fused, self.act = heads, pre, fused, act
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def attention(self, x):
        B, T, D = x.shape
        q, k, v = (f(x).view(B, T, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.fused:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            a = scores.softmax(-1) @ v
        return self.out(a.transpose(1, 2).reshape(B, T, D))

    def mlp(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.act))

    def forward(self, x):
        if self.pre:
            x = x + self.attention(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attention(x))
        return self.ln2(x + self.mlp(x))


class Vit(nn.Module):
    """Patches of a ``(1, 4, 4)`` image by a strided convolution, a position embedding, one
    or two blocks, a final LayerNorm, mean pooling or the first token, a head."""

    def __init__(self, width, heads, depth, pre, fused, act, pool, classes):
        super().__init__()
        self.pool = pool
        self.patch = nn.Conv2d(1, width, 2, stride=2)
        self.pos = nn.Parameter(torch.randn(1, 4, width) * 0.1)
        self.blocks = nn.Sequential(*(Block(width, heads, pre, fused, act) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        t = self.norm(self.blocks(t))
        return self.head(t.mean(1) if self.pool == "mean" else t[:, 0])


class Text(nn.Module):
    """A BERT-like encoder on embedded tokens ``(T, width)``: LayerNorm, blocks, mean
    pooling, l2 normalisation (sentence embeddings), a head."""

    def __init__(self, width, heads, depth, pre, fused, act, classes):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.blocks = nn.Sequential(*(Block(width, heads, pre, fused, act) for _ in range(depth)))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(F.normalize(self.blocks(self.ln(x)).mean(1), dim=-1))


@st.composite
def transformers(draw):
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    heads = draw(st.sampled_from([1, 2]))
    width = heads * draw(st.sampled_from([2, 4])) if heads == 2 else 4
    args = (width, heads, draw(st.integers(1, 2)), draw(st.booleans()), draw(st.booleans()),
            draw(st.sampled_from(["none", "tanh"])))
    classes = draw(st.integers(2, 3))
    if draw(st.booleans()):
        return Vit(*args, draw(st.sampled_from(["mean", "first"])), classes).double(), (1, 4, 4)
    tokens = draw(st.integers(2, 3))
    return Text(*args, classes).double(), (tokens, width)
