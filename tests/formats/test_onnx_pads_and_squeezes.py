"""ONNX operators whose sizes the file holds in tensors: Pad, Squeeze and Slice.

Regressions (issue 28), each in files from both exporters of ``torch.onnx.export``:

* The legacy exporter (``dynamo=False``) computes ``F.pad``'s amounts in the graph from
  integer constants (``ConstantOfShape``, ``Concat``, ``Reshape``, ``Slice``, ``Transpose``,
  ``Cast``). Unfolded, onnx2torch read them with ``pads.tolist()``, which ``torch.export``
  cannot capture (at opset 17), and at its default opset 20 the down-conversion to opset 17
  failed on ``ConstantOfShape``: certify folds integer computations on constants.
* The default exporter writes Pad-18/19 at opsets 18 and 20, which onnx2torch has no converter
  for and ``onnx.version_converter`` cannot take back to opset 17: a Pad with constant amounts
  becomes certify's own ``Pad`` (``F.pad`` with integer amounts).
* 1-D CNNs (Conv1d, ReLU, MaxPool1d or AvgPool1d, Conv1d, then a flattened head) failed
  capture with a data-dependent error: the default exporter writes
  ``nn.AdaptiveAvgPool1d``/``nn.AdaptiveMaxPool1d`` as Unsqueeze, pooling, Squeeze, and both
  exporters write ``x.squeeze(-1)`` as Squeeze-13, whose axes onnx2torch squeezes along from a
  tensor. Squeeze (and Slice) by constants become ``ConstantSqueeze`` (``ConstantSlice``), and
  capture refuses a shape computed from tensor values by name.
* Reflect padding reaches capture and is refused by name (mode='reflect'), unless certify
  reads it, in which case the graph equals the module.
"""

from __future__ import annotations

import copy
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx_files import export as export_for_cli
from torch import nn

from certify.capture.export import UnsupportedModelError, capture
from certify.cli import main
from certify.formats.loading import load_model, onnx_crosscheck
from certify.formats.onnx.converted import ConstantSlice, _import_onnx2torch

BATCH = 4  # the batch size of every export


class Padded(nn.Module):
    """A convolution, ReLU, ``F.pad(h, (1, 2, 0, 1))`` in ``mode``, and a dense head. The pad
    follows the ReLU: the default exporter folds a zero pad that feeds a Conv into its pads."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.conv, self.head = nn.Conv2d(1, 2, 3), nn.Linear(2 * 4 * 7, 3)

    def forward(self, x):
        return self.head(F.pad(torch.relu(self.conv(x)), (1, 2, 0, 1), self.mode).flatten(1))


class Squeezed(nn.Module):
    """``h.squeeze(-1)`` of a global pooling's output."""

    def forward(self, h):
        return h.squeeze(-1)


def cnn1d(pool: str) -> nn.Module:
    """The 1-D CNN of issue 28 (Conv1d, ReLU, MaxPool1d or AvgPool1d, Conv1d, flattened into
    a Linear head), with adaptive average pooling before the head: to 2 then ``nn.Flatten``,
    or to 1 then ``squeeze(-1)``."""
    if pool == "max":
        return nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(4, 4, 3),
                             nn.ReLU(), nn.AdaptiveAvgPool1d(2), nn.Flatten(), nn.Linear(8, 3))
    return nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.AvgPool1d(2), nn.Conv1d(4, 4, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool1d(1), Squeezed(), nn.Linear(4, 3))


MODELS = {"zero_pad": (lambda: Padded("constant"), (1, 5, 6)),
          "reflect_pad": (lambda: Padded("reflect"), (1, 5, 6)),
          "cnn1d_max": (lambda: cnn1d("max"), (2, 18)),
          "cnn1d_avg": (lambda: cnn1d("avg"), (2, 18))}
KINDS = [("legacy", None), ("legacy", 17), ("dynamo", None)]
READ_FROM_TENSORS = {"OnnxPadDynamic", "OnnxSqueezeDynamicAxes", "OnnxSlice", "OnnxReshape"}


def build(name: str) -> nn.Module:
    torch.manual_seed(2)
    return MODELS[name][0]().eval()


def inputs(name: str, batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *MODELS[name][1], generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pads")
    written = {}
    for name in MODELS:
        for kind, opset in KINDS:
            path = root / f"{name}_{kind}_{opset}.onnx"
            version = {} if opset is None else {"opset_version": opset}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(build(name), (inputs(name, BATCH),), str(path),
                                  dynamo=kind == "dynamo", verbose=False, **version)
            written[name, kind, opset] = path
    return written


def _op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("kind, opset", KINDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_loads_equals_the_module_and_captures(files, name, kind, opset):
    path = files[name, kind, opset]
    written = _op_types(path)
    if name.endswith("pad"):
        assert "Pad" in written
        assert ("ConstantOfShape" in written) == (kind == "legacy")
    elif name == "cnn1d_avg" or kind == "dynamo":
        assert "Squeeze" in written
    module = load_model(path)
    x = inputs(name, 5, seed=1).double()  # not the exported batch size
    with torch.no_grad():
        got = module(x)
        torch.testing.assert_close(got, copy.deepcopy(build(name)).double()(x),
                                   rtol=1e-6, atol=1e-6)
    assert onnx_crosscheck(path, module, x) < 1e-5
    try:
        network = capture(module, x)
    except UnsupportedModelError as refused:
        assert name == "reflect_pad", refused
        # what the file asks for, and the ONNX node in the path of certify's module
        assert re.match(r"padding with mode='reflect' \(module 'certify/[^']+' "
                        r"\(ConstantPad\), .*; supported: zero padding", str(refused)), refused
    else:
        torch.testing.assert_close(network(x), got, rtol=1e-9, atol=1e-9)
    assert not READ_FROM_TENSORS & {type(m).__name__ for m in module.modules()}


@pytest.mark.parametrize("name, kind", [("zero_pad", "command line"), ("cnn1d_avg", "dynamo")])
def test_certify_model_and_check(files, name, kind, tmp_path, capsys):
    x = inputs(name, 3, seed=3)
    if kind == "dynamo":
        path = files[name, kind, None]
    else:  # the legacy exporter at its default opset (20), with a dynamic batch axis
        path = tmp_path / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_for_cli(build(name), x, path)
    np.savez(tmp_path / "data.npz", x=x.numpy())
    args = [str(path), "--data", str(tmp_path / "data.npz")]
    assert main(["model", *args, "--out", str(tmp_path / "cert.json")]) == 0, \
        capsys.readouterr().err
    assert main(["check", str(tmp_path / "cert.json"), *args]) == 0
    assert " 0 refuted" in capsys.readouterr().out


def _pad_file(path: Path, shape, pads, axes, mode: str, value, opset: int) -> None:
    """``Pad(x, pads, value, axes)`` alone, as the default exporter writes it (opset 18 on)."""
    initializers = [numpy_helper.from_array(np.array(pads, dtype=np.int64), "pads"),
                    numpy_helper.from_array(np.array(value, dtype=np.float32), "value")]
    names = ["x", "pads", "value"]
    if axes is not None:
        initializers.append(numpy_helper.from_array(np.array(axes, dtype=np.int64), "axes"))
        names.append("axes")
    graph = helper.make_graph(
        [helper.make_node("Pad", names, ["y"], name="pad", mode=mode)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in shape])],
        initializer=initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)


@st.composite
def pads(draw):
    """A Pad node on a (2, 3, 4, 5) or (2, 4, 6) input in every mode and opset 18 on: amounts
    up to 2 (constant mode also -1: cropping) for some axes past the batch axis (past the
    channel axis too in the modes torch pads fewer axes in), listed with ``axes`` in any order
    and sign, or for every axis without ``axes``."""
    shape = draw(st.sampled_from([(2, 3, 4, 5), (2, 4, 6)]))
    mode = draw(st.sampled_from(["constant", "reflect", "edge", "wrap"]))
    rank = len(shape)
    padded = list(range(1 if mode == "constant" else 2, rank))
    axes = draw(st.permutations(padded).flatmap(
        lambda p: st.integers(1, len(p)).map(lambda k: p[:k])))
    low = -1 if mode == "constant" else 0
    amounts = draw(st.lists(st.integers(low, 2), min_size=2 * len(axes),
                            max_size=2 * len(axes)))
    value = draw(st.sampled_from([0.0, 0.5, -2.0])) if mode == "constant" else 0.0
    opset = 19 if mode == "wrap" else draw(st.sampled_from([18, 19, 20]))
    if draw(st.booleans()):  # the same amounts for every axis, without axes
        full = [0] * (2 * rank)
        for i, axis in enumerate(axes):
            full[axis], full[rank + axis] = amounts[i], amounts[len(axes) + i]
        return shape, full, None, mode, value, opset
    signed = [a - rank if draw(st.booleans()) else a for a in axes]
    return shape, amounts, signed, mode, value, opset


@given(pads(), st.integers(0, 2**16))
def test_a_pad_with_constant_amounts_equals_onnxruntime(case, seed):
    # onnxruntime is the oracle: every mode, axes and opset the default exporter may write
    shape, amounts, axes, mode, value, opset = case
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pad.onnx"
        _pad_file(path, shape, amounts, axes, mode, value, opset)
        module = load_model(path)
        assert "ConstantPad" in {type(m).__name__ for m in module.modules()}
        assert onnx_crosscheck(path, module, x, rtol=0.0, atol=0.0) == 0.0


def _slice_bounds(size: int):
    big = st.sampled_from([2**63 - 1, -2**63, 2 * size, -2 * size])
    return st.one_of(st.integers(-size - 1, size + 1), big)


@given(st.data())
def test_constant_slice_equals_the_onnx_reference(data):
    # ONNX's reference evaluator is the oracle: negative, clamped and huge bounds, any step
    shape = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    axes = data.draw(st.permutations(range(len(shape))).map(lambda p: p[:max(1, len(p) - 1)]))
    starts = [data.draw(_slice_bounds(shape[a])) for a in axes]
    ends = [data.draw(_slice_bounds(shape[a])) for a in axes]
    steps = [data.draw(st.sampled_from([1, 2, 3, -1, -2])) for _ in axes]
    signed = [a - len(shape) if data.draw(st.booleans()) else a for a in axes]
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    node = helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"])
    expected = ReferenceEvaluator(node, opsets={"": 17}).run(None, {
        "x": x, "starts": np.array(starts), "ends": np.array(ends),
        "axes": np.array(signed), "steps": np.array(steps)})[0]
    got = ConstantSlice(starts, ends, signed, steps)(torch.from_numpy(x))
    np.testing.assert_array_equal(got.numpy(), expected)


def test_a_shape_computed_from_tensor_values_is_refused_by_name():
    # onnx2torch's own Pad-13 reads its amounts with pads.tolist(): the padded tensor's shape
    # is a symbol under torch.export, which capture refuses by name (not torch's
    # GuardOnDataDependentSymNode from deep inside the reading of the graph)
    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads"], ["y"], name="pad")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1, 6])],
        initializer=[numpy_helper.from_array(np.array([0, 0, 1, 0, 0, 1]), "pads")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    module = _import_onnx2torch().convert(model)
    with pytest.raises(UnsupportedModelError, match=r"pad\.default gives a tensor whose shape "
                                                    r"depends on the values of a tensor \(module "
                                                    r"'pad' \(OnnxPadDynamic\)"):
        capture(module, torch.randn(2, 1, 4).double())
