"""Tensors cut into pieces (``split``, ``split_with_sizes``, ``chunk``, ``tensor_split``,
``unbind``) and layer norms over ``(1, ..., 1, n)`` are captured: the graph computes what
the module does, every piece a ``Slice`` of its own, and ``certify check`` confirms the
certificate of such a model. A layer norm over two axes that both have several entries is
refused by name (``tests/radii/test_radius_soundness.py``)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from certify.capture import capture
from certify.certificate import certify_network
from certify.check import check

CUTS = {
    "split": lambda x, k: torch.split(x, k, dim=1),
    "split_with_sizes": lambda x, k: torch.split(x, [k, x.shape[1] - k], dim=1),
    "chunk": lambda x, k: torch.chunk(x, k, dim=1),
    "tensor_split": lambda x, k: torch.tensor_split(x, k, dim=1),
    "tensor_split_at": lambda x, k: torch.tensor_split(x, [k, -1], dim=-2),
    "unbind": lambda x, k: torch.unbind(x, dim=1),
}


class Pieces(nn.Module):
    """Seven features as a (7, 2) sequence, cut along the sequence, each piece through its
    own scale, summed back over the sequence: every piece reaches the logits."""

    def __init__(self, cut, k):
        super().__init__()
        self.cut, self.k = cut, k
        self.embed = nn.Linear(3, 14)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x)).reshape(len(x), 7, 2)
        pieces = CUTS[self.cut](h, self.k)
        total = sum((i + 1) * (p.sum(1) if p.ndim == 3 else p) for i, p in enumerate(pieces))
        return self.head(total)


@given(st.sampled_from(sorted(CUTS)), st.integers(1, 6), st.integers(0, 2**16))
def test_pieces_are_captured_exactly(cut, k, seed):
    torch.manual_seed(seed)
    model = Pieces(cut, k).double().eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    network = capture(model, x)
    torch.testing.assert_close(network(x), model(x), rtol=1e-12, atol=1e-12)


class Normalised(nn.Module):
    """A layer norm over (1, 4), learned weight and bias, between two dense layers."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 4)
        self.norm = nn.LayerNorm((1, 4))
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(self.norm(self.inner(x)[:, None, :])[:, 0])


@settings(max_examples=5, deadline=None)
@given(st.sampled_from(["pieces", "norm"]), st.integers(0, 2**16))
def test_certify_check_confirms_their_certificates(model, seed):
    torch.manual_seed(seed)
    module = (Pieces("chunk", 3) if model == "pieces" else Normalised()).double().eval()
    x = torch.randn(5, 3 if model == "pieces" else 5, dtype=torch.float64)
    network = capture(module, x)
    torch.testing.assert_close(network(x), module(x), rtol=1e-12, atol=1e-12)
    result = certify_network(network, x, model_sha256="0" * 64, progress=False)
    assert check(result.document, result.witnesses, network, x.numpy()).ok
