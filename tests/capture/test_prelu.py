"""``nn.PReLU`` is captured as one ``PReLU`` node whose slopes run along the channel axis
(the first after the batch), one shared or one per channel, after dense layers and 1-d and
2-d convolutions: the graph computes what the module does, bit for bit."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from certify.capture import capture
from certify.graph.operators import PReLU

BODIES = {  # a layer with 4 output channels, the input shape it takes, and a flatten
    "dense": (lambda: nn.Linear(6, 4), (6,)),
    "conv1d": (lambda: nn.Conv1d(2, 4, 3), (2, 7)),
    "conv2d": (lambda: nn.Conv2d(2, 4, 3), (2, 5, 5)),
}


@given(st.sampled_from(sorted(BODIES)), st.booleans(), st.integers(0, 2**16))
def test_prelu_is_captured_exactly(body, shared, seed):
    torch.manual_seed(seed)
    make, shape = BODIES[body]
    act = nn.PReLU(1 if shared else 4)
    with torch.no_grad():
        act.weight.uniform_(-1.3, 1.3)
    model = nn.Sequential(make(), act, nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(5, *shape)
    model(x)
    model, x = model.double().eval(), x.double()
    network = capture(model, x)
    (node,) = [n for n in network.nodes if isinstance(n.op, PReLU)]
    assert torch.equal(node.op.slopes.flatten(), act.weight.detach().double())
    assert torch.equal(network(x), model(x))
