"""The network-level public API validates what it is given and leaves the caller's objects alone.

Every entry point that takes a network and a batch of inputs (``layer_radii``,
``certify_network``, ``multilayer_bound``, ``uniform_budget``, ``compression_check``) refuses
NaN/Inf inputs, non-float dtypes, shapes the network cannot take, empty batches and
non-finite weights with ``certify.graph.inputs.InputError`` (a ``ValueError``) or
``InputTypeError`` (a ``TypeError``) whose message names the problem; lower-precision
floats are accepted and give exactly the float64 result. ``certify.capture.export.capture`` and
``load_model(module)`` change neither the dtype, the training flags nor the parameters of
the module they are given.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from certify.certificate.document import certify_network
from certify.closed_forms.compressions import parse_compression
from certify.radii.compressed import compression_check
from certify.graph.inputs import InputError, InputTypeError
from certify.formats.loading import ModelLoadError, load_model
from certify.radii.multilayer import multilayer_bound, uniform_budget
from certify.capture.export import UnsupportedModelError, capture
from certify.graph.graph import Graph
from certify.graph.operators import Affine
from certify.radii.radius import layer_radii


def _dense() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _conv() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3))


SHAPES = {"dense": (4,), "conv": (2, 6, 6)}
NETWORKS = {"dense": capture(_dense(), SHAPES["dense"]),
            "conv": capture(_conv().eval(), SHAPES["conv"])}


def _first(net):
    return net.affine_indices[0] if isinstance(net, Graph) else 1


ENTRY_POINTS = {
    "layer_radii": lambda net, x: layer_radii(net, x, _first(net), "fro"),
    "certify_network": lambda net, x: certify_network(net, x, model_sha256="0", progress=False),
    "multilayer_bound": lambda net, x: multilayer_bound(net, x, [0.01, 0.01], "max"),
    "uniform_budget": lambda net, x: uniform_budget(net, x, "fro"),
    "compression_check": lambda net, x: compression_check(net, x, parse_compression("rank=1")),
}

entry_points = pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
kinds = pytest.mark.parametrize("kind", sorted(NETWORKS))


def _inputs(kind: str, batch: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *SHAPES[kind], dtype=torch.float64, generator=generator)


def _raises(entry: str, net, x, error: type, *messages: str) -> None:
    with pytest.raises(error) as info:
        ENTRY_POINTS[entry](net, x)
    for message in messages:
        assert message in str(info.value), f"{str(info.value)!r} lacks {message!r}"


def _equal(a, b) -> bool:
    """Bit-for-bit equality of results: tensors, dataclasses, containers and numbers."""
    if isinstance(a, torch.Tensor):  # NaN equals NaN here
        return a.dtype == b.dtype and a.shape == b.shape and \
            bool(((a == b) | (a.isnan() & b.isnan())).all())
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(_equal(getattr(a, f.name), getattr(b, f.name))
                                          for f in dataclasses.fields(a))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b))
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------


@entry_points
@given(data=st.data())
def test_nan_or_inf_input_names_the_input(entry, data):
    kind = data.draw(st.sampled_from(sorted(NETWORKS)))
    x = _inputs(kind, data.draw(st.integers(1, 4)), data.draw(st.integers(0, 2**16)))
    b = data.draw(st.integers(0, len(x) - 1))
    position = tuple(data.draw(st.integers(0, n - 1)) for n in x.shape[1:])
    x[(b, *position)] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    _raises(entry, NETWORKS[kind], x, InputError, "NaN or Inf", f"1 of {len(x)} inputs",
            f"at indices {b};")


@entry_points
@kinds
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, "numpy32"])
def test_low_precision_floats_give_the_float64_result(entry, kind, dtype):
    x = _inputs(kind)
    low = x.numpy().astype(np.float32) if dtype == "numpy32" else x.to(dtype)
    exact = torch.as_tensor(low).double() if dtype == "numpy32" else low.double()
    net, run = NETWORKS[kind], ENTRY_POINTS[entry]
    assert _equal(run(net, low), run(net, exact))


@entry_points
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex128])
def test_non_float_dtype_is_a_type_error(entry, dtype):
    x = _inputs("dense").to(dtype)
    _raises(entry, NETWORKS["dense"], x, InputTypeError, str(dtype), "pass float16, float32")
    assert issubclass(InputTypeError, TypeError)


@entry_points
@pytest.mark.parametrize("x", [[[0.0] * 4], 1.0, np.zeros((2, 4), dtype=np.int64), None],
                         ids=["list", "float", "numpy int", "None"])
def test_non_array_is_a_type_error(entry, x):
    _raises(entry, NETWORKS["dense"], x, InputTypeError)


CASES = {  # network kind, input shape, message parts
    "dense width": ("dense", (3, 5), ["shape (3, 5)", "batch of shape (B, 4)"]),
    "dense one input unbatched": ("dense", (4,), ["shape (4,)", "pass x[None]"]),
    "dense extra axis": ("dense", (3, 2, 4), ["shape (3, 2, 4)", "(B, 4)"]),
    "dense scalar": ("dense", (), ["shape ()", "(B, 4)"]),
    "conv channels": ("conv", (3, 1, 6, 6), ["shape (3, 1, 6, 6)", "(B, 2, 6, 6)"]),
    "conv unbatched": ("conv", (2, 6, 6), ["shape (2, 6, 6)", "pass x[None]"]),
    "conv too small": ("conv", (3, 2, 2, 2), ["shape (3, 2, 2, 2)", "(B, 2, 6, 6)"]),
    "conv wrong size for the dense layer": ("conv", (3, 2, 7, 7),
                                            ["shape (3, 2, 7, 7)", "(B, 2, 6, 6)"]),
    "conv flat": ("conv", (3, 72), ["shape (3, 72)", "(B, 2, 6, 6)"]),
}


@entry_points
@pytest.mark.parametrize("case", sorted(CASES))
def test_wrong_shape_names_the_expected_shape(entry, case):
    kind, shape, messages = CASES[case]
    _raises(entry, NETWORKS[kind], torch.zeros(shape, dtype=torch.float64), InputError,
            *messages)


@entry_points
@kinds
def test_empty_batch(entry, kind):
    x = _inputs(kind)[:0]
    _raises(entry, NETWORKS[kind], x, InputError, "holds no inputs", "at least one")


@entry_points
def test_inputs_are_not_modified(entry):
    x = _inputs("dense")
    before = x.clone()
    ENTRY_POINTS[entry](NETWORKS["dense"], x)
    assert torch.equal(x, before) and not x.requires_grad


# ------------------------------------------------------------------------------------------
# networks, weights and layer indices
# ------------------------------------------------------------------------------------------


@given(data=st.data())
def test_capture_refuses_non_finite_parameters(data):
    model = data.draw(st.sampled_from([_dense, _conv]))()
    names = [name for name, t in model.state_dict().items() if t.is_floating_point()]
    name = data.draw(st.sampled_from(names))
    tensor = model.state_dict()[name]
    flat = data.draw(st.integers(0, tensor.numel() - 1))
    value = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    with torch.no_grad():
        tensor.view(-1)[flat] = value
    message = rf"non-finite parameters: {re.escape(name)} \(1 (NaN|Inf) of {tensor.numel()}\)"
    with pytest.raises(InputError, match=message):
        capture(model, SHAPES["dense" if isinstance(model[0], nn.Linear) else "conv"])


def _with_weight(net: Graph, index: int, weight: torch.Tensor) -> Graph:
    return net.replace(index, net.layer(index).with_weight(weight))


@entry_points
def test_hand_built_graph_that_does_not_fit_its_inputs_names_the_node(entry):
    net = NETWORKS["conv"]
    last = net.affine_indices[-1]
    layer = net.layer(last)  # a dense layer after the flatten, 48 inputs
    wider = net.replace(last, Affine(torch.zeros(3, 47, dtype=torch.float64), layer.bias))
    _raises(entry, wider, _inputs("conv"), InputError, f"node {last} ('4')", "mat1 and mat2",
            "(B, 2, 6, 6)")


@entry_points
@kinds
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_hand_built_network_with_non_finite_weights(entry, kind, value):
    net = NETWORKS[kind]
    last = net.affine_indices[-1]
    weight = net.layer(last).weight.clone()
    weight[1, 2] = value
    bad = _with_weight(net, last, weight)
    _raises(entry, bad, _inputs(kind), InputError, "non-finite parameters",
            f"{net.nodes[last].name}.weight (1 ")


@entry_points
def test_hand_built_network_with_float32_weights(entry):
    net = NETWORKS["dense"]
    first = net.affine_indices[0]
    bad = _with_weight(net, first, net.layer(first).weight.float())
    _raises(entry, bad, _inputs("dense"), InputTypeError, "must be a float64 tensor")


@entry_points
def test_a_module_is_not_a_network(entry):
    _raises(entry, _dense(), _inputs("dense"), InputTypeError,
            "certify.capture.export.capture(model, example)")


@pytest.mark.parametrize("index, error, message", [
    (0, InputError, "node 0 is not an affine"), (2, InputError, "node 2 is not an affine"),
    (4, InputError, "node 4 is not an affine"),
    (-1, InputError, "the affine layers are at nodes 1 ('0'), 3 ('2')"),
    (1.0, InputTypeError, "integer node index"), ("1", InputTypeError, "integer node index"),
    (True, InputTypeError, "integer node index"),
])
def test_layer_radii_index_must_be_an_affine_node(index, error, message):
    with pytest.raises(error) as info:
        layer_radii(NETWORKS["dense"], _inputs("dense"), index, "fro")
    assert message in str(info.value)


@pytest.mark.parametrize("option, value", [("norm", "l2"), ("refine", "yes"),
                                           ("concretise", "box"), ("enclose", 1.5)])
def test_layer_radii_names_an_unknown_option_and_its_choices(option, value):
    kwargs = {"norm": "fro", option: value}
    with pytest.raises(InputError, match=f"{option} must be .*got {value!r}"):
        layer_radii(NETWORKS["conv"], _inputs("conv"), 1, **kwargs)


def test_layer_radii_accepts_integer_like_indices():
    x = _inputs("dense")
    assert _equal(layer_radii(NETWORKS["dense"], x, np.int64(3), "max"),
                  layer_radii(NETWORKS["dense"], x, 3, "max"))


# ------------------------------------------------------------------------------------------
# the caller's module is left as it was
# ------------------------------------------------------------------------------------------


def _trainable() -> nn.Module:
    """float32, in train mode, with a submodule in eval mode: every flag must survive."""
    model = nn.Sequential(_conv(), nn.Dropout(0.5)).train()
    model[0][1].eval()
    return model


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(name, m.training) for name, m in model.named_modules()])


def _assert_unchanged(model: nn.Module, snapshot) -> None:
    state, modes = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k
    assert [(name, m.training) for name, m in model.named_modules()] == modes


@pytest.mark.parametrize("call", [lambda m: capture(m, SHAPES["conv"]), load_model],
                         ids=["capture", "load_model"])
def test_module_is_left_unchanged(call):
    model = _trainable()
    snapshot = _snapshot(model)
    call(model)
    _assert_unchanged(model, snapshot)
    assert snapshot[1][0] == ("", True) and ("0.1", False) in snapshot[1]


def test_capture_leaves_the_module_as_it_was_when_it_fails():
    model = nn.Sequential(nn.Linear(2, 2), nn.LogSoftmax(-1), nn.Linear(2, 2)).train()
    snapshot = _snapshot(model)
    with pytest.raises(UnsupportedModelError, match="only supported at the output"):
        capture(model, (2,))
    _assert_unchanged(model, snapshot)


def test_network_is_a_copy_of_the_weights():
    model = _dense().double()
    net = capture(model, SHAPES["dense"])
    frozen = copy.deepcopy(net)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    pairs = [(a.op, b.op) for a, b in zip(net.nodes, frozen.nodes) if isinstance(a.op, Affine)]
    assert len(pairs) == 2 and all(torch.equal(a.weight, b.weight) and
                                   torch.equal(a.bias, b.bias) for a, b in pairs)


def test_load_model_returns_a_float64_eval_copy():
    model = _trainable()
    loaded = load_model(model)
    assert loaded is not model and not any(m.training for m in loaded.modules())
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    x = _inputs("conv")
    with torch.no_grad():
        expected = model.eval()(x.float()).double()
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)


def test_load_model_of_an_uncopyable_module_says_so():
    model = _dense()
    model.feed = (i for i in range(3))  # generators refuse deepcopy
    with pytest.raises(ModelLoadError, match="cannot copy the given Sequential"):
        load_model(model)
