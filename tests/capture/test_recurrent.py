"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (and their cells) are captured unrolled over the
example's sequence length (``certify.capture.recurrent``): the graph computes what the
module does, for every kind, ``batch_first`` either way, stacked, bidirectional, with and
without biases, from a zero or a constant initial state, read out by the last output, the
mean over time or the final states; the certified layer of ``W_ih`` is the parameter itself
(perturbing it in the module moves the logits as perturbing the layer does), ``W_hh`` is a
certified layer only where one node uses it; a small GRU classifier certifies, attacks inside
0.999 x ``lower`` never change a class and ``certify check`` confirms its certificate; what
is not supported is refused by name."""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from weight_attacks import assert_attacks_inside_fail, assert_witness_flips

from certify.capture import UnsupportedModelError, capture
from certify.capture.build import Build
from certify.capture.recurrent import RULES
from certify.certificate import certify_network
from certify.check import check
from certify.graph.operators import Affine, FixedAffine
from certify.radii import layer_radii, predictions

KINDS = {"lstm": lambda **kw: nn.LSTM(**kw), "gru": lambda **kw: nn.GRU(**kw),
         "rnn_tanh": lambda **kw: nn.RNN(nonlinearity="tanh", **kw),
         "rnn_relu": lambda **kw: nn.RNN(nonlinearity="relu", **kw)}
READOUTS = ("last", "mean", "final", "final_stack", "final_squeeze")


class Recurrent(nn.Module):
    """A recurrent layer on (B, T, n) features and a dense head on one of its readouts."""

    def __init__(self, kind, n, hidden, layers, bidirectional, bias, batch_first, readout,
                 state):
        super().__init__()
        self.kind, self.readout, self.batch_first = kind, readout, batch_first
        self.rnn = KINDS[kind](input_size=n, hidden_size=hidden, num_layers=layers,
                               bias=bias, batch_first=batch_first,
                               bidirectional=bidirectional)
        D = 2 if bidirectional else 1
        width = {"final_stack": layers * D * hidden, "final_squeeze": hidden}.get(
            readout, D * hidden)
        self.head = nn.Linear(width, 3)
        self.state = None if state is None else nn.Parameter(state)  # (layers D, 1, hidden)

    def forward(self, x):
        B = len(x)
        states = None if self.state is None else self.state.expand(-1, B, -1).contiguous()
        if states is not None and self.kind == "lstm":
            states = (states, 0.5 * states)
        out, final = self.rnn(x if self.batch_first else x.transpose(0, 1), states)
        h = final[0] if self.kind == "lstm" else final
        time = 1 if self.batch_first else 0
        if self.readout == "last":
            z = out.select(time, -1)
        elif self.readout == "mean":
            z = out.mean(time)
        elif self.readout == "final":  # the last layer's state, both directions
            z = torch.cat(list(h[-2:]), dim=1) if self.rnn.bidirectional else h[-1]
        elif self.readout == "final_stack":
            z = h.permute(1, 0, 2).reshape(B, -1)
        else:  # one layer's forward state, squeezed (a (1, B, H) view when it is alone)
            z = h[:1].squeeze(0)
        return self.head(z)


@st.composite
def recurrent_models(draw):
    kind = draw(st.sampled_from(sorted(KINDS)))
    layers, bidirectional = draw(st.integers(1, 2)), draw(st.booleans())
    hidden, T, n = draw(st.integers(1, 3)), draw(st.integers(2, 5)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    state = torch.randn(layers * (2 if bidirectional else 1), 1, hidden) \
        if draw(st.booleans()) else None
    model = Recurrent(kind, n, hidden, layers, bidirectional, draw(st.booleans()),
                      draw(st.booleans()), draw(st.sampled_from(READOUTS)), state)
    return model.double().eval(), T, n


@settings(max_examples=max(10, settings().max_examples // 2), deadline=None)
@given(recurrent_models())
def test_recurrent_layers_are_captured_exactly(problem):
    model, T, n = problem
    x = torch.randn(5, T, n, dtype=torch.float64)
    network = capture(model, x[:2])
    torch.testing.assert_close(network(x), model(x), rtol=1e-12, atol=1e-12)
    rnn = model.rnn
    suffixes = [""] + ["_reverse"] * rnn.bidirectional
    weights_ih = {f"rnn.weight_ih_l{k}{s}" for k in range(rnn.num_layers) for s in suffixes}
    if model.readout == "final_squeeze":  # the first layer's forward state reads no other
        weights_ih = {"rnn.weight_ih_l0"}
    assert weights_ih <= set(network.layer_names)
    fixed = [node.name for node in network.nodes if isinstance(node.op, FixedAffine)]
    assert all(name.startswith("rnn.weight_hh_l") for name in fixed)
    # W_hh is used at T - 1 steps from a zero state (T from a constant one, or with a bias).
    if T >= 3 or rnn.bias or model.state is not None:
        assert not any("weight_hh" in name for name in network.layer_names)


class Cell(nn.Module):
    """A cell called at every step of a Python loop, from a zero state."""

    def __init__(self, kind, n, hidden, bias, T):
        super().__init__()
        self.kind, self.T = kind, T
        self.cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[kind](
            n, hidden, bias=bias)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x):
        state = None
        for t in range(self.T):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if self.kind == "lstm" else state)


@settings(max_examples=max(10, settings().max_examples // 4), deadline=None)
@given(st.sampled_from(["lstm", "gru", "rnn"]), st.integers(1, 3), st.booleans(),
       st.integers(1, 4), st.integers(0, 2**16))
def test_cells_in_a_loop_are_captured_exactly(kind, hidden, bias, T, seed):
    torch.manual_seed(seed)
    model = Cell(kind, 2, hidden, bias, T).double().eval()
    x = torch.randn(4, T, 2, dtype=torch.float64)
    network = capture(model, x[:2])
    torch.testing.assert_close(network(x), model(x), rtol=1e-12, atol=1e-12)
    # Called once, W_ih is a layer; called at every step of the loop, every use is fixed.
    assert ("cell.weight_ih" in network.layer_names) == (T == 1)


@settings(max_examples=max(5, settings().max_examples // 4), deadline=None)
@given(st.sampled_from(["lstm", "gru", "rnn_tanh"]), st.booleans(), st.integers(0, 2**16))
def test_the_certified_layers_are_the_parameters(kind, batch_first, seed):
    """Perturbing ``W_ih`` (every step: one layer over the sequence) in the module, and
    ``W_hh`` where its one use is a layer (two steps from a zero state, no bias), moves the
    logits exactly as perturbing the layer in the graph does."""
    torch.manual_seed(seed)
    model = Recurrent(kind, 2, 3, 1, False, False, batch_first, "last", None).double().eval()
    x = torch.randn(4, 2, 2, dtype=torch.float64)
    network = capture(model, x[:2])
    assert set(network.layer_names) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "head"}
    for name in ("weight_ih_l0", "weight_hh_l0"):
        index = network.affine_indices[network.layer_names.index(f"rnn.{name}")]
        layer = network.layer(index)
        D = torch.randn_like(layer.weight)
        with torch.no_grad():
            getattr(model.rnn, name).add_(D)
            expected = model(x)
            getattr(model.rnn, name).sub_(D)
        moved = network.replace(index, Affine(layer.weight + D, layer.bias))
        torch.testing.assert_close(moved(x), expected, rtol=1e-12, atol=1e-12)


def gru_classifier(seed: int):
    """A GRU over 3 steps of 3 features (a text-like classifier on embedded tokens), its
    last output into a 3-class head."""
    torch.manual_seed(seed)
    model = Recurrent("gru", 3, 4, 1, False, True, True, "last", None).double().eval()
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    network = capture(model, x)
    torch.testing.assert_close(network(x), model(x), rtol=1e-12, atol=1e-12)
    assert network.layer_names == ["rnn.weight_ih_l0", "head"]
    return network, x, predictions(network, x)[0]


@settings(max_examples=max(3, settings().max_examples // 13), deadline=None)
@given(st.sampled_from(["fro", "max"]), st.booleans(), st.integers(0, 2**31 - 1))
def test_attacks_inside_lower_never_change_the_class(norm, bias, seed):
    net, x, y = gru_classifier(seed)
    index = net.affine_indices[0]  # W_ih, through every step of the recurrence
    r = layer_radii(net, x, index, norm, bias)
    assert torch.all((0 <= r.lower) & (r.lower <= r.upper)) and (r.lower > 0).any()
    assert_attacks_inside_fail(net, x, y, index, r, norm, bias, from_witness=True)
    assert_witness_flips(net, x, y, index, r, bias)


@settings(max_examples=max(2, settings().max_examples // 20), deadline=None)
@given(st.booleans(), st.integers(0, 2**31 - 1))
def test_certify_check_confirms_the_certificate(bias, seed):
    net, x, _ = gru_classifier(seed)
    result = certify_network(net, x, model_sha256="0" * 64, bias=bias, progress=False)
    report = check(result.document, result.witnesses, net, x.numpy())
    assert report.ok, report


# Operations on time-major tensors (a GRU's output with batch_first=False, (T, B, 4), and
# its final states), each ending in (B, width) for the head.
TIME_MAJOR = {
    "cat_time": (lambda out, h: torch.cat([out[:1], out[-1:]], 0).sum(0), 4),
    "cat_features": (lambda out, h: torch.cat([out, out[:, :, :1]], 2)[-1], 5),
    "sum_features": (lambda out, h: out.sum(2, keepdim=True)[1], 1),
    "slice_features": (lambda out, h: out[:, :, 1:3].mean(0), 2),
    "select_feature": (lambda out, h: out[:, :, 0].transpose(0, 1), 3),
    "unbind": (lambda out, h: out.unbind(0)[-1] + h.view(-1, 4), 4),
    "every_other_step": (lambda out, h: out[::2].permute(1, 0, 2).flatten(1), 8),
    "state_as_matrix": (lambda out, h: h.reshape(out.shape[1], 2, 2).sum(2), 2),
    "whole_batch": (lambda out, h: torch.ops.aten.slice(out, 1)[-1], 4),
}


class TimeMajor(nn.Module):
    def __init__(self, use):
        super().__init__()
        self.use, self.rnn = use, nn.GRU(2, 4)
        self.head = nn.Linear(TIME_MAJOR[use][1], 3)

    def forward(self, x):
        out, h = self.rnn(x.transpose(0, 1))
        return self.head(TIME_MAJOR[self.use][0](out, h))


class Inputs(nn.Module):
    """(B, T, a, b) inputs made time-major with their last two axes swapped: one step read,
    and the whole permuted back."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        steps = x.permute(1, 0, 3, 2)
        return self.head(torch.cat([steps[-1].flatten(1),
                                    steps.permute(1, 0, 3, 2).flatten(1)], 1))


@pytest.mark.parametrize("use", sorted(TIME_MAJOR))
def test_operations_on_time_major_tensors_are_captured_exactly(use):
    torch.manual_seed(0)
    model = TimeMajor(use).double().eval()
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    network = capture(model, x[:2])
    torch.testing.assert_close(network(x), model(x), rtol=1e-12, atol=1e-12)


class EncoderDecoder(nn.Module):
    """A decoder started from the encoder's final states (hidden and, for the LSTM, cell)."""

    def __init__(self, kind):
        super().__init__()
        self.encoder = getattr(nn, kind)(2, 3, num_layers=2, batch_first=True)
        self.decoder = getattr(nn, kind)(2, 3, num_layers=2, batch_first=True)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        _, states = self.encoder(x)
        return self.head(self.decoder(x, states)[0][:, -1])


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_an_encoders_final_states_start_a_decoder(kind):
    torch.manual_seed(0)
    model = EncoderDecoder(kind).double().eval()
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    network = capture(model, x[:2])
    torch.testing.assert_close(network(x), model(x), rtol=1e-12, atol=1e-12)


def test_a_time_major_input_with_other_axes_permuted_is_captured_exactly():
    model = Inputs().double().eval()
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64)
    network = capture(model, x[:2])
    torch.testing.assert_close(network(x), model(x), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------- refused


class Projected(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.LSTM(2, 3, proj_size=2, batch_first=True), nn.Linear(2, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class Misread(nn.Module):
    """A recurrent layer that reads the batch as time: batch-first inputs given to a
    time-major layer, or time-major ones to a batch-first layer."""

    def __init__(self, batch_first):
        super().__init__()
        self.rnn, self.head = nn.GRU(2, 3, batch_first=batch_first), nn.Linear(3, 3)

    def forward(self, x):
        out = self.rnn(x.transpose(0, 1) if self.rnn.batch_first else x)[0]
        return self.head(out.sum((0, 1)))


class Readout(nn.Module):
    """A GRU and a head on ``read(x, out, h)``: what it does with its input and outputs."""

    def __init__(self, read, batch_first=False, width=3):
        super().__init__()
        self.read = read
        self.rnn, self.head = nn.GRU(2, 3, batch_first=batch_first), nn.Linear(width, 3)

    def forward(self, x):
        out, h = self.rnn(x if self.rnn.batch_first else x.transpose(0, 1))
        return self.head(self.read(x, out, h))


class StateFromInput(nn.Module):
    """A two-layer GRU's initial state computed per input as (B, layers, H), not transposed."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(2, 3, num_layers=2, batch_first=True), nn.Linear(3, 3)
        self.start = nn.Linear(2, 6)

    def forward(self, x):
        states = self.start(x[:, 0]).reshape(len(x), 2, 3)
        return self.head(self.rnn(x, states)[0][:, -1])


class StatePerInput(nn.Module):
    """A constant initial state for a batch of exactly two, different for each (a sequence
    layer's, or a cell's)."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell
        self.rnn = nn.GRUCell(2, 3) if cell else nn.GRU(2, 3, batch_first=True)
        self.head = nn.Linear(3, 3)
        self.h0 = nn.Parameter(torch.randn(2, 3) if cell else torch.randn(1, 2, 3))

    def forward(self, x):
        if self.cell:
            return self.head(self.rnn(x[:, 0], self.h0))
        return self.head(self.rnn(x, self.h0)[0][:, -1])


class ConstantInputCell(nn.Module):
    """A decoder cell fed a constant start vector."""

    def __init__(self):
        super().__init__()
        self.start, self.cell, self.head = nn.Linear(2, 3), nn.GRUCell(2, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.cell(torch.zeros(len(x), 2, dtype=x.dtype),
                                   self.start(x[:, 0])))


class Tied(nn.Module):
    """A Linear layer's weight used again as a cell's input weight."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(2, 3), nn.Linear(3, 3)
        self.w_hh = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        return self.head(torch.rnn_tanh_cell(x[:, 1], self.fc(x[:, 0]), self.fc.weight,
                                             self.w_hh))


@pytest.mark.parametrize("model,message", [
    (Projected(), "proj_size"),
    (Misread(batch_first=False), "batch_first=False reads axis 1 as the batch, but the batch "
                                 "is axis 0"),
    (Misread(batch_first=True), "batch_first=True reads axis 0 as the batch, but the batch is "
                                "axis 1"),
    (Readout(lambda x, out, h: out[:, -1]), r"select along the batch axis"),
    (Readout(lambda x, out, h: out[:, :1].sum(0)[0]), r"a slice of the batch axis"),
    (Readout(lambda x, out, h: out.transpose(0, 2)[0, 0], width=4), r"transpose\(0, 2\)"),
    (Readout(lambda x, out, h: out.permute(0, 2, 1).sum((0, 1)), width=2),
     r"permute\(\[0, 2, 1\]\)"),
    (Readout(lambda x, out, h: out.reshape(-1, 3)[0]), r"a reshape to \(8, 3\)"),
    (Readout(lambda x, out, h: out.unbind(1)[0].sum(0)), r"unbind\(dim=1\)"),
    (Readout(lambda x, out, h: torch.cat([out, out.transpose(0, 1)[:, :2]], 0)[-1]),
     "cat with batch-first tensors"),
    (Readout(lambda x, out, h: out.mean(0, keepdim=True)[0]), r"mean\(dim=.*keepdim=True\)"),
    (Readout(lambda x, out, h: out.sum(1)[-1]), r"sum\(dim=.*1.*keepdim=False\)"),
    (Readout(lambda x, out, h: torch.relu(h)[-1]), "relu.* first axis is not the batch"),
    (StateFromInput(), "the batch as its first axis"),
    (StatePerInput(cell=False), "differs between the inputs of the batch"),
    (StatePerInput(cell=True), "neither a batch-first tensor"),
    (ConstantInputCell(), "a recurrent cell on a constant input"),
    (Tied(), "'fc.weight' is used by a layer and by a recurrence"),
])
def test_unsupported_recurrent_models_are_refused_by_name(model, message):
    with pytest.raises(UnsupportedModelError, match=message):
        capture(model.double(), torch.randn(2, 4, 2, dtype=torch.float64))


def test_packed_sequences_and_training_mode_are_refused_by_name():
    """torch.export cannot capture ``pack_padded_sequence`` (its batch sizes are data) and
    capture exports in eval mode; the packed overload of the operators, and their
    training flag, are refused by name all the same."""
    rule = RULES[torch.ops.aten.gru]
    packed = types.SimpleNamespace(name="gru", target=torch.ops.aten.gru.data)
    with pytest.raises(UnsupportedModelError, match="packed sequence"):
        rule(Build(batch=2), packed, "here", *[None] * 9)
    padded = types.SimpleNamespace(name="gru", target=torch.ops.aten.gru.input)
    with pytest.raises(UnsupportedModelError, match=r"training mode \(dropout=0.5"):
        rule(Build(batch=2), padded, "here", None, None, [], True, 1, 0.5, True, False, True)
