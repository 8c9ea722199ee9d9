"""The modules of deployed transformers are captured as the operators there are, and the
graph computes what the module does (to 1e-10 in float64, on a batch other than the
export's):

* constants joined to computed tensors: a class token before the patch tokens
  (``cat([cls.expand(B, -1, -1), tokens], 1)``) and a positional embedding added, and
  ``cat``/``stack`` of constants and computed tensors along any axis but the batch
  (``ZeroPad``, ``Cat`` and ``ScaleShift`` nodes);
* ``nn.MultiheadAttention`` (batch first or not, with or without bias, separate key and
  value sizes, the weights unasked, asked and unused, or used, averaged over the heads or
  not) and ``nn.TransformerEncoderLayer`` (norm first or last, ReLU or GELU, batch first or
  not) in eval mode, with the masks they take;
* attention masks given as constants (boolean, additive with ``-inf`` or finite, causal,
  of shapes ``(T, S)``, ``(1, T, S)``, one per head, or repeated along the batch), in
  ``F.scaled_dot_product_attention`` and written by hand (``masked_fill``, ``where``, an
  added mask): the hidden weights are 0 exactly (a ``Softmax`` with ``keep``).

What cannot be read is refused by name: a mask that differs across the batch or hides a
whole row, ``-inf`` that reaches anything but a softmax, a moved batch axis fed to an
operator that needs it first. A small class-token ViT is certified layer by layer: attacks
inside the radius never change a class, the witness at the upper radius does, and
``certify check`` confirms its certificate.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from weight_attacks import assert_attacks_inside_fail, assert_witness_flips

from certify.capture import UnsupportedModelError, capture
from certify.certificate import certify_network
from certify.check import check
from certify.graph.operators import Cat, ScaleShift, Softmax, ZeroPad
from certify.radii import layer_radii, predictions

FEW = settings(max_examples=10, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (more only wait on each other); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def captured_exactly(model: nn.Module, shape, seed: int):
    """The graph of ``model`` (float64, eval), checked against it on a fresh batch of 5."""
    model = model.double().eval()
    x = torch.randn(5, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    network = capture(model, x[:2])
    with torch.no_grad():
        torch.testing.assert_close(network(x), model(x), rtol=1e-10, atol=1e-10)
    return network


def rows_kept(gen, shape, p: float) -> torch.Tensor:
    """A random boolean mask of ``shape`` keeping about ``p`` of each row (last axis), one
    entry at least."""
    keep = torch.rand(shape, generator=gen) < p
    one = torch.rand(shape, generator=gen)
    return keep | (one == one.amax(-1, keepdim=True))


# --------------------------------------------------------------- constants joined in


SPELLINGS = {"expand": lambda c, B: c.expand(B, *c.shape[1:]),
             "repeat": lambda c, B: c.repeat(B, 1, 1),
             "cat": lambda c, B: torch.cat([c] * B)}


class Joined(nn.Module):
    """Tokens ``(T, E)`` from a dense layer, a learned constant joined to them along ``axis``
    (before, between two copies, or after; repeated along the batch as ``spelling`` says),
    a positional embedding added, a dense head."""

    def __init__(self, T, E, axis, where, stack, spelling):
        super().__init__()
        self.T, self.E, self.axis, self.where, self.stack, self.spelling = \
            T, E, axis, where, stack, spelling
        self.embed = nn.Linear(3, T * E)
        shape = (T, E) if stack else ((1, E) if axis == 1 else (T, 2))
        self.const = nn.Parameter(torch.randn(1, *shape))
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        tokens = torch.tanh(self.embed(x)).reshape(len(x), self.T, self.E)
        const = SPELLINGS[self.spelling](self.const, len(x))
        parts = {"before": [const, tokens], "between": [tokens, const, tokens],
                 "after": [tokens, const]}[self.where]
        joined = torch.stack(parts, self.axis) if self.stack else torch.cat(parts, self.axis)
        shape = joined.shape[1:]
        position = torch.arange(math.prod(shape), dtype=x.dtype).reshape(shape)
        return self.head((joined + 0.1 * position).flatten(1))


@FEW
@given(st.integers(2, 4), st.integers(4, 8), st.sampled_from([1, 2, -1]),
       st.sampled_from(["before", "between", "after"]), st.booleans(),
       st.sampled_from(sorted(SPELLINGS)), st.integers(0, 2**16))
def test_constants_joined_to_computed_tensors_are_captured_exactly(T, E, axis, where, stack,
                                                                   spelling, seed):
    torch.manual_seed(seed)
    model = Joined(T, E, axis, where, stack, spelling)
    model(torch.randn(2, 3))  # materialise the lazy head
    network = captured_exactly(model, (3,), seed)
    kinds = [type(n.op) for n in network.nodes[1:]]
    assert ZeroPad in kinds and ScaleShift in kinds
    assert (Cat in kinds) == (where == "between")


# ------------------------------------------------------------- multi-head attention


def float_mask(keep: torch.Tensor) -> torch.Tensor:
    """An additive mask: ``-inf`` where ``keep`` is False, small offsets elsewhere."""
    return torch.where(keep, 0.1 * torch.randn(keep.shape, dtype=torch.float64), -math.inf)


class Attention(nn.Module):
    """``nn.MultiheadAttention`` over ``(T, E)`` tokens (transposed to ``(T, B, E)`` when not
    batch first), mean over tokens, a dense head; the weights, when asked for, through a
    head of their own when ``use_weights``."""

    def __init__(self, T, E, heads, batch_first, bias, kdim, need_weights, use_weights,
                 average, mask, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.batch_first, self.need_weights, self.use_weights, self.average = \
            batch_first, need_weights, use_weights, average
        self.mha = nn.MultiheadAttention(E, heads, bias=bias, batch_first=batch_first,
                                         kdim=kdim, vdim=kdim)
        self.keys = nn.Linear(E, kdim) if kdim else None
        self.head = nn.Linear(E, 3)
        self.weights_head = nn.LazyLinear(3) if use_weights else None
        self.is_causal, self.mask, self.padding = False, None, None
        keep = rows_kept(gen, (T, T), 0.6)
        self.hides = bool((~keep).any()) if mask in ("bool", "float") else mask == "causal"
        if mask == "bool":  # nn.MultiheadAttention: True hides
            self.mask = ~keep
        elif mask == "float":
            self.mask = float_mask(keep)
        elif mask == "causal":
            self.mask, self.is_causal = nn.Transformer.generate_square_subsequent_mask(
                T, dtype=torch.float64), True
        elif mask == "heads":  # (B * heads, T, S), the same for every input
            self.heads_mask = float_mask(rows_kept(gen, (1, heads, T, T), 0.6))
            self.hides = bool(torch.isinf(self.heads_mask).any())
        elif mask == "padding":  # (B, S), the same for every input
            self.padding = ~rows_kept(gen, (1, T), 0.6)
            self.hides = bool(self.padding.any())
        self.heads, self.kind = heads, mask

    def forward(self, x):
        B = len(x)
        tokens = x if self.batch_first else x.transpose(0, 1)
        keys = tokens if self.keys is None else self.keys(tokens)
        mask = self.mask
        if self.kind == "heads":
            mask = self.heads_mask.expand(B, -1, -1, -1).reshape(B * self.heads,
                                                                 *self.heads_mask.shape[2:])
        padding = None if self.padding is None else self.padding.expand(B, -1)
        y, w = self.mha(tokens, keys, keys, need_weights=self.need_weights, attn_mask=mask,
                        key_padding_mask=padding, is_causal=self.is_causal,
                        average_attn_weights=self.average)
        y = y if self.batch_first else y.transpose(0, 1)
        out = self.head(y.mean(1))
        return out + self.weights_head(w.flatten(1)) if self.use_weights else out


@settings(max_examples=16, deadline=None)
@given(st.integers(2, 4), st.sampled_from([(4, 1), (4, 2), (6, 2), (8, 2)]), st.booleans(),
       st.booleans(), st.sampled_from([None, None, 5]), st.sampled_from(["no", "unused", "used"]),
       st.booleans(), st.sampled_from(["none", "bool", "float", "causal", "heads", "padding"]),
       st.integers(0, 2**16))
def test_multihead_attention_is_captured_exactly(T, width, batch_first, bias, kdim, weights,
                                                 average, mask, seed):
    E, heads = width
    torch.manual_seed(seed)
    model = Attention(T, E, heads, batch_first, bias, kdim, weights != "no", weights == "used",
                      average, mask, seed).double()
    model(torch.randn(2, T, E, dtype=torch.float64))  # materialise the lazy head
    network = captured_exactly(model, (T, E), seed)
    names = set(network.layer_names)
    assert ("mha.in_proj_weight" in names) == (kdim is None)
    assert "mha.out_proj" in names
    (softmax,) = [n.op for n in network.nodes if isinstance(n.op, Softmax)]
    assert (softmax.keep is not None) == model.hides


class Encoder(nn.Module):
    """One ``nn.TransformerEncoderLayer`` on ``(T, E)`` tokens (or an ``nn.TransformerEncoder``
    of two), the first token's output through a dense head."""

    def __init__(self, T, E, norm_first, activation, batch_first, mask, stacked):
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(E, 2, 2 * E, dropout=0.1, activation=activation,
                                                batch_first=batch_first, norm_first=norm_first)
        if stacked:  # two layers, and a final layer norm
            self.layer = nn.TransformerEncoder(self.layer, 2, norm=nn.LayerNorm(E),
                                               enable_nested_tensor=False)
        self.head = nn.Linear(E, 3)
        self.mask, self.is_causal = None, mask == "causal"
        if mask == "causal":
            self.mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
        elif mask == "bool":
            self.mask = ~rows_kept(torch.Generator().manual_seed(T), (T, T), 0.5)

    def forward(self, x):
        tokens = x if self.batch_first else x.transpose(0, 1)
        if isinstance(self.layer, nn.TransformerEncoder):
            y = self.layer(tokens, mask=self.mask, is_causal=self.is_causal)
        else:
            y = self.layer(tokens, src_mask=self.mask, is_causal=self.is_causal)
        y = y if self.batch_first else y.transpose(0, 1)
        return self.head(y[:, 0])


@settings(max_examples=8, deadline=None)
@given(st.integers(2, 4), st.sampled_from([4, 6, 8]), st.booleans(),
       st.sampled_from(["relu", "gelu"]), st.booleans(),
       st.sampled_from(["none", "causal", "bool"]), st.booleans(), st.integers(0, 2**16))
def test_transformer_encoder_layer_is_captured_exactly(T, E, norm_first, activation,
                                                       batch_first, mask, stacked, seed):
    torch.manual_seed(seed)
    model = Encoder(T, E, norm_first, activation, batch_first, mask, stacked)
    network = captured_exactly(model, (T, E), seed)
    blocks = ["layer.layers.0.", "layer.layers.1."] if stacked else ["layer."]
    assert network.layer_names == [f"{block}{name}" for block in blocks for name in (
        "self_attn.in_proj_weight", "self_attn.out_proj", "linear1", "linear2")] + ["head"]


# ------------------------------------------------------------------ attention masks


MASK_SHAPES = {"(T, S)": lambda H, T: (T, T), "(1, T, S)": lambda H, T: (1, T, T),
               "(H, T, S)": lambda H, T: (H, T, T), "(B, 1, T, S)": lambda H, T: (1, 1, T, T)}


class Masked(nn.Module):
    """Two-head attention of ``(T, E)`` tokens with a constant mask of the drawn ``form``:
    ``F.scaled_dot_product_attention`` (boolean, additive, causal) or the scores masked by
    hand (``masked_fill``, ``where``, an added mask)."""

    def __init__(self, T, E, form, shape, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.form, self.shape = form, shape
        self.proj, self.head = nn.Linear(E, E), nn.Linear(E, 3)
        self.keep = rows_kept(gen, MASK_SHAPES[shape](2, T), 0.5)
        self.bias = float_mask(self.keep)
        if form == "finite":  # an additive bias, nothing hidden
            self.bias = torch.randn(self.keep.shape, dtype=torch.float64, generator=gen)

    def batched(self, mask, B):
        return mask.expand(B, *mask.shape[1:]) if self.shape == "(B, 1, T, S)" else mask

    def forward(self, x):
        B, T, E = x.shape
        q = self.proj(x).reshape(B, T, 2, E // 2).transpose(1, 2)
        keep, bias = self.batched(self.keep, B), self.batched(self.bias, B)
        if self.form in ("bool", "float", "finite", "causal"):
            y = F.scaled_dot_product_attention(
                q, q, q, attn_mask=None if self.form == "causal" else
                keep if self.form == "bool" else bias, is_causal=self.form == "causal")
        else:
            scores = q @ q.transpose(-2, -1) / math.sqrt(E // 2)
            scores = {"masked_fill": lambda: scores.masked_fill(~keep, -math.inf),
                      "masked_fill_finite": lambda: scores.masked_fill(~keep, -1e4),
                      "where": lambda: torch.where(keep, scores, -math.inf),
                      "added": lambda: scores + bias}[self.form]()
            y = scores.softmax(-1) @ q
        return self.head(y.transpose(1, 2).reshape(B, T, E).mean(1))


@settings(max_examples=16, deadline=None)
@given(st.integers(2, 4), st.sampled_from(["bool", "float", "finite", "causal", "masked_fill",
                                           "masked_fill_finite", "where", "added"]),
       st.sampled_from(sorted(MASK_SHAPES)), st.integers(0, 2**16))
def test_attention_masks_are_captured_exactly(T, form, shape, seed):
    torch.manual_seed(seed)
    model = Masked(T, 4, form, shape, seed)
    network = captured_exactly(model, (T, 4), seed)
    (softmax,) = [n.op for n in network.nodes if isinstance(n.op, Softmax)]
    keep = {"finite": None, "masked_fill_finite": None,
            "causal": torch.ones(T, T, dtype=torch.bool).tril()}.get(form, model.keep)
    if keep is None or keep.all():
        assert softmax.keep is None
    else:  # the hidden entries, and only they, weigh 0 (per input: two heads)
        assert torch.equal(softmax.keep.expand(2, T, T), keep.reshape(-1, T, T).expand(2, T, T))


# ----------------------------------------------------------------------- refusals


class Lambda(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f, self.proj, self.head = f, nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.f(self.proj(x)))


def _scores(h):
    return h @ h.transpose(-2, -1)


@pytest.mark.parametrize("f,match", [
    (lambda h: F.scaled_dot_product_attention(
        h, h, h, attn_mask=torch.arange(len(h))[:, None, None] <= torch.arange(3)).mean(1),
     r"attention mask\) uses a constant that varies along the batch axis"),
    (lambda h: F.scaled_dot_product_attention(
        h, h, h, attn_mask=torch.tensor([True, True, False]).expand(3, 3).mT).mean(1),
     "hides every key from some query"),
    (lambda h: (_scores(h).masked_fill(torch.tensor([True, False, True])[:, None], -math.inf)
                .softmax(-1) @ h).mean(1), "hides every key from some query"),
    (lambda h: _scores(h).masked_fill(torch.eye(3, dtype=torch.bool), -math.inf)[:, 0, :2]
     .repeat(1, 2), r"an attention mask\) is used .*only right before a softmax"),
    (lambda h: (_scores(h) + torch.tensor(math.inf)).softmax(-1)[:, 0, :2].repeat(1, 2),
     r"\+inf or NaN"),
    (lambda h: F.max_pool1d(h.transpose(0, 1), 1).transpose(0, 1).mean(1),
     r"batch axis a transpose moved to position 1"),
    (lambda h: (h[:, :2] + h[:, :2].transpose(0, 1)).mean(1),
     r"batch axis at different positions \[0, 1\]"),
])
def test_what_cannot_be_read_is_refused_by_name(f, match):
    with pytest.raises(UnsupportedModelError, match=match):
        capture(Lambda(f).double(), (3, 4))


def test_cross_attention_with_one_packed_projection_is_refused():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha, self.proj, self.head = nn.MultiheadAttention(4, 2, batch_first=True), \
                nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.mha(x, self.proj(x), self.proj(x))[0].mean(1))

    with pytest.raises(UnsupportedModelError, match="rows would be two layers of one weight"):
        capture(Cross().double(), (3, 4))


# --------------------------------------------------------- a class-token ViT, certified


class ClassTokenViT(nn.Module):
    """2 x 2 patches of a 1 x 4 x 4 image embedded by a convolution, a learned class token
    before them and a positional embedding, one pre-norm encoder layer, the class token's
    output through a dense head."""

    def __init__(self, E=4):
        super().__init__()
        self.patch = nn.Conv2d(1, E, 2, 2)
        self.cls = nn.Parameter(torch.randn(1, 1, E))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 5, E))
        self.encoder = nn.TransformerEncoderLayer(E, 2, 2 * E, dropout=0.0, batch_first=True,
                                                  norm_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        return self.head(self.encoder(tokens)[:, 0])


@settings(max_examples=6, deadline=None)
@given(st.sampled_from(["fro", "max"]), st.booleans(), st.integers(0, 2**31 - 1))
def test_class_token_vit_radii_hold_against_attacks(norm, bias, seed):
    """One layer per example (each in turn): PGD and random points at 0.999 ``lower`` never
    change a class; the witness at ``upper`` does."""
    torch.manual_seed(seed)
    network = captured_exactly(ClassTokenViT(), (1, 4, 4), seed)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    y = predictions(network, x)[0]
    index = network.affine_indices[seed % len(network.affine_indices)]
    r = layer_radii(network, x, index, norm, bias, refine=False)
    assert torch.all((0 <= r.lower) & (r.lower <= r.upper))
    assert_attacks_inside_fail(network, x, y, index, r, norm, bias)
    assert_witness_flips(network, x, y, index, r, bias)


@pytest.mark.parametrize("model", ["vit", "masked"])
def test_certify_check_confirms_the_certificates(model):
    """The class-token ViT, and attention with a mask written by hand (``masked_fill`` with
    ``-inf``: the checker's twin of the masked softmax)."""
    torch.manual_seed(0)
    module, shape = (ClassTokenViT(), (1, 4, 4)) if model == "vit" else \
        (Masked(3, 4, "masked_fill", "(T, S)", 1), (3, 4))
    network = captured_exactly(module, shape, 0)
    assert model == "vit" or any(getattr(n.op, "keep", None) is not None for n in network.nodes)
    x = torch.randn(2, *shape, dtype=torch.float64)
    result = certify_network(network, x, model_sha256="0" * 64, progress=False, refine=False)
    assert check(result.document, result.witnesses, network, x.numpy()).ok
