"""``output_gradients``: every row of a Jacobian by batched backward passes, against one
backward pass per row (autograd's own, the exact oracle), on captured networks."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from networks import cnns, mlps

from certify.capture.export import capture
from certify.graph import gradients
from certify.graph.gradients import output_gradients


def _rows_one_by_one(outputs, inputs):
    rows = []
    for j in range(outputs.shape[1]):
        grads = torch.autograd.grad(outputs[:, j].sum(), inputs, retain_graph=True,
                                    allow_unused=True)
        rows.append([torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)])
    return [torch.stack([r[k] for r in rows], 1) for k in range(len(inputs))]


@given(st.one_of(mlps(), cnns()), st.integers(0, 2**16), st.integers(1, 3))
def test_batched_rows_equal_one_pass_per_row(model_and_shape, seed, rows):
    model, shape = model_and_shape
    x = torch.randn(3, *shape, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    net = capture(model, x)
    values = net.values(x)
    index = net.affine_indices[0]
    Z = values[index].detach().requires_grad_(True)
    unused = torch.zeros_like(x, requires_grad=True)  # the graph never reads it
    logits = net.run(index, Z, values)
    margins = logits[:, :1] - logits
    saved, gradients.ROWS = gradients.ROWS, rows  # several batched passes, the last partial
    try:
        ours = output_gradients(margins, [Z, unused], keep_graph=True)
    finally:
        gradients.ROWS = saved
    for got, want in zip(ours, _rows_one_by_one(margins, [Z, unused])):
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-300)


def test_the_oracle_has_teeth():
    """A row out of place is seen: the comparison is not vacuous."""
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out = torch.stack([x.sum(-1), (x**2).sum(-1)], 1)
    ours = output_gradients(out, [x], keep_graph=True)[0]
    want = _rows_one_by_one(out, [x])[0]
    assert torch.allclose(ours, want)
    assert not torch.allclose(ours.flip(1), want)
