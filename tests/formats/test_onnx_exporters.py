"""Six models through both ONNX exporters and torch.export: loaded, cross-checked against
onnxruntime, compared with the original in float64, and captured again by torch.export.
The MNIST vision transformer also at the older opsets, where the exporters decompose layer
norms and GELU: the loader recovers the operators, and certify reads them.

``torch.onnx.export(model, (x,), path)`` uses the torch.export-based ("dynamo") exporter in
torch 2.13 (it needs onnxscript); ``dynamo=False`` the TorchScript-based one. The dynamo
exporter writes static shapes: ``nn.Flatten`` becomes ``Reshape(x, [4, 784])`` for an export
with 4 inputs, which certify.formats.onnx.files turns into a reshape that copies the batch size, so the
loaded module takes any number of inputs. The graph capture of certify.capture.export does exactly
what ``_reexport`` does.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from certify.models import small as small_models
from certify.capture.export import UnsupportedModelError, capture
from certify.cli.inputs import crosscheck_onnx
from certify.formats.loading import ModelLoadError, load_model, onnx_crosscheck
from certify.formats.onnx.converted import ConstantReshape, ConstantResize
from certify.graph.operators import Activation, Interpolate, LayerNorm

BATCH = 4  # the batch size of every export


class ViewMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.view(-1, 784))))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 10))


class ProjectionBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + proj(x))`` with a strided 1x1 conv shortcut."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.proj = nn.Conv2d(c_in, c_out, 1, stride=2)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.proj(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.block = ProjectionBlock(4, 8)
        self.head = nn.Linear(8 * 14 * 14, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.block(torch.relu(self.bn(self.stem(x)))), 1))


class Normalised(nn.Module):
    """``(x - mean) / std`` with constant tensors, then an MLP."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.full((1, 1, 1), 0.1307))
        self.register_buffer("std", torch.full((1, 1, 1), 0.3081))
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.body((x - self.mean) / self.std)


class Concat(nn.Module):
    """Two branches joined by ``torch.cat``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Flatten(), nn.Linear(784, 12), nn.ReLU())
        self.b = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.Tanh())
        self.head = nn.Linear(20, 10)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1))


def resnet() -> nn.Module:
    model = ResNet()
    with torch.no_grad():  # batch-norm statistics as after training
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model


MODELS = {"view_mlp": ViewMLP, "cnn": cnn, "resnet": resnet, "normalised": Normalised,
          "concat": Concat, "vit": small_models.mnist_vit}
KINDS = ("dynamo", "legacy", "pt2")


def build(name: str) -> nn.Module:
    torch.manual_seed(1)
    return MODELS[name]().eval()


def inputs(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def export(model: nn.Module, kind: str, path: Path, opset: int | None = None) -> Path:
    x = inputs(BATCH)
    version = {} if opset is None else {"opset_version": opset}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "dynamo":
            torch.onnx.export(model, (x,), str(path), **version)  # the default exporter
        elif kind == "legacy":
            torch.onnx.export(model, (x,), str(path), dynamo=False, **version)
        else:
            torch.export.save(torch.export.export(model, (x,)), str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("exporters")
    return {
        (name, kind): export(build(name), kind, root / f"{name}_{kind}.{'pt2' if kind == 'pt2' else 'onnx'}")
        for name in MODELS for kind in KINDS
    }


def reference(name: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return build(name).double()(x.double())


def reexport(module: nn.Module, x64: torch.Tensor):
    """What certify's graph capture does with a loaded module."""
    module = copy.deepcopy(module).to(torch.float64)
    for sub in module.modules():
        sub.training = False
    return torch.export.export(module, (x64,), strict=False)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_loads_matches_and_exports_again(files, name, kind):
    path = files[name, kind]
    if kind == "dynamo":
        assert onnx.load(str(path)).opset_import[0].version > 17  # needs the down-conversion
    module = load_model(path)
    x = inputs(BATCH, seed=1)
    expected = reference(name, x)
    with torch.no_grad():
        got = module(x.double())
    # the exporters fold batch norm into the convolutions in float32: not bit-exact
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if kind != "pt2":
        assert 0.0 <= onnx_crosscheck(path, module, x) < 1e-5
    program = reexport(module, x.double())
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x.double()), got, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["dynamo", "legacy"])
@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_module_takes_other_batch_sizes(files, name, kind):
    # The files fix the batch size at 4; the loaded module computes the same per input.
    module = load_model(files[name, kind])
    for batch in (1, 7):
        x = inputs(batch, seed=2)
        with torch.no_grad():
            got = module(x.double())
        torch.testing.assert_close(got, reference(name, x), rtol=1e-5, atol=1e-5)
        # onnxruntime runs the file on batches of 4 (the last filled up with the first inputs)
        assert onnx_crosscheck(files[name, kind], module, x) < 1e-5


def test_dynamo_reshapes_become_plain_reshapes_that_copy_the_batch(files):
    path = files["cnn", "dynamo"]
    shapes = [numpy_helper.to_array(i).tolist() for i in onnx.load(str(path)).graph.initializer
              if i.dims == [2] and i.data_type == TensorProto.INT64]
    assert [BATCH, 288] in shapes  # the file pins the batch size
    module = load_model(path)
    reshapes = [m for m in module.modules() if isinstance(m, ConstantReshape)]
    assert [r.shape for r in reshapes] == [(0, 288)]
    assert not any(type(m).__name__ == "OnnxReshape" for m in module.modules())
    assert not any(b.dtype == torch.int64 for b in module.buffers())  # the shape is gone


def _transposed_reshape(path: Path) -> None:
    """x [4, 4, 3] -> Transpose(1, 0, 2) -> Reshape [4, 12]: the 4 it reshapes to is the
    second input axis, not the batch axis."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], name="t", perm=[1, 0, 2]),
             helper.make_node("Reshape", ["t", "shape"], ["y"], name="r")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 12])],
        initializer=[numpy_helper.from_array(np.array([4, 12], dtype=np.int64), "shape")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_a_reshape_off_the_batch_axis_keeps_its_shape(tmp_path):
    path = tmp_path / "transposed.onnx"
    _transposed_reshape(path)
    module = load_model(path)
    assert [m.shape for m in module.modules() if isinstance(m, ConstantReshape)] == [(4, 12)]
    x = torch.randn(4, 4, 3, generator=torch.Generator().manual_seed(3))
    assert onnx_crosscheck(path, module, x) == 0.0
    with pytest.raises(RuntimeError, match="invalid for input of size"):
        module(torch.randn(2, 4, 3).double())


def test_crosscheck_inputs_that_do_not_fit(files):
    module = load_model(files["cnn", "dynamo"])
    with pytest.raises(ModelLoadError, match=r"inputs of shape \(1, 27, 28\) do not fit the "
                                             r"model cnn_dynamo\.onnx: its input 'input' has shape "
                                             r"\[4, 1, 28, 28\]"):
        onnx_crosscheck(files["cnn", "dynamo"], module, torch.randn(4, 1, 27, 28))


@pytest.mark.parametrize("name", list(MODELS))
def test_a_tampered_conversion_of_a_dynamo_file_is_refused(files, name):
    path = files[name, "dynamo"]
    module = load_model(path)
    x = inputs(6, seed=4)
    assert crosscheck_onnx(str(path), module, x.numpy()).startswith(
        "onnxruntime cross-check: largest difference ")
    last = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.bias[3] += 1e-4
    with pytest.raises(ModelLoadError, match="disagrees with onnxruntime on output 0"):
        crosscheck_onnx(str(path), module, x.numpy())


def test_the_cli_cross_checks_at_most_16_inputs(files):
    path = files["concat", "dynamo"]
    module = load_model(path)
    assert crosscheck_onnx(str(path), module, inputs(20).numpy()).endswith(" on 16 inputs")
    assert crosscheck_onnx(str(path), module, inputs(1).numpy()).endswith(" on 1 input")


def _op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("kind, opset", [("dynamo", None), ("legacy", None), ("dynamo", 18),
                                         ("legacy", 17), ("legacy", 11)])
def test_gelu_becomes_nn_gelu(tmp_path, kind, opset, approximate):
    # At their default opset both exporters write Gelu-20, which has no older version to
    # down-convert to and no onnx2torch converter; before opset 20 they write its formula
    # with Erf or Tanh. certify converts both to nn.GELU.
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.GELU(approximate=approximate),
                          nn.Linear(16, 10)).eval()
    path = export(model, kind, tmp_path / "gelu.onnx", opset)
    written = "Gelu" if opset is None else "Erf" if approximate == "none" else "Tanh"
    assert written in _op_types(path)
    module = load_model(path)
    gelus = [m for m in module.modules() if isinstance(m, nn.GELU)]
    assert [g.approximate for g in gelus] == [approximate]
    x = inputs(BATCH, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(module(x.double()), copy.deepcopy(model).double()(x.double()),
                                   rtol=1e-5, atol=1e-5)
    assert onnx_crosscheck(path, module, x) < 1e-5
    reexport(module, x.double())


VIT_OPSETS = [("legacy", 11), ("legacy", 14), ("legacy", 16), ("legacy", 17), ("legacy", 18),
              ("legacy", None), ("dynamo", 18), ("dynamo", None)]


@pytest.mark.parametrize("kind, opset", VIT_OPSETS)
def test_a_vit_at_every_opset_is_read_as_its_operators(tmp_path, kind, opset):
    # Before opset 17 the legacy exporter decomposes nn.LayerNorm (ReduceMean, Sub, Pow, ...)
    # and before opset 20 both decompose GELU (Erf); the legacy exporter computes the shape of
    # x.flatten(2) in the graph (Shape, Slice, Concat). certify reads 5 layer norms and 2
    # GELUs, and 14 layers named after their ONNX nodes, each nn.Linear with its bias.
    path = export(build("vit"), kind, tmp_path / "vit.onnx", opset)
    written = _op_types(path)
    version = next(e.version for e in onnx.load(str(path)).opset_import if e.domain == "")
    assert ("Pow" in written) == (version < 17)
    assert ("Erf" in written) == (version < 20)
    assert ("Shape" in written) == (kind == "legacy")
    module = load_model(path)
    assert not {"OnnxErf", "OnnxPow", "OnnxShape"} & {type(m).__name__ for m in module.modules()}
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 13 and all(m.bias is not None for m in linears)
    x = inputs(BATCH, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(module(x.double()), reference("vit", x), rtol=1e-5, atol=1e-5)
    assert onnx_crosscheck(path, module, x) < 1e-5
    network = capture(module, x.double())
    ops = [node.op for node in network.nodes]
    assert sum(isinstance(op, LayerNorm) for op in ops) == 5
    assert [op.kind for op in ops if isinstance(op, Activation)] == ["gelu", "gelu"]
    nodes = {_plain(n.name) for n in onnx.load(str(path)).graph.node}
    assert len(network.layer_names) == 14
    assert all(_plain(n) in nodes for n in network.layer_names)


def _plain(name: str) -> str:
    """A node name as onnx2torch's module path may spell it."""
    return "".join(c for c in name if c.isalnum())


class Tokens(nn.Module):
    """Patches as tokens through a linear layer, then flattened with ``x.shape[0]``."""

    def __init__(self):
        super().__init__()
        self.patch, self.fc = nn.Conv2d(1, 4, 7, stride=7), nn.Linear(4, 4)
        self.head = nn.Linear(16 * 4, 10)

    def forward(self, x):
        tokens = self.fc(self.patch(x).flatten(2).transpose(1, 2))
        return self.head(tokens.reshape(x.shape[0], -1))


def test_a_file_with_a_dynamic_batch_axis_takes_any_batch(tmp_path):
    # With dynamic_axes the legacy exporter computes every shape from Shape(x); certify folds
    # them at batch size 1, and the reshapes copy the batch.
    torch.manual_seed(8)
    model, path = Tokens().eval(), tmp_path / "dynamic.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (inputs(BATCH),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    assert "Shape" in _op_types(path)
    module = load_model(path)
    for batch in (1, 3):
        x = inputs(batch, seed=9)
        with torch.no_grad():
            torch.testing.assert_close(module(x.double()), model.double()(x.double()),
                                       rtol=1e-5, atol=1e-5)
        assert onnx_crosscheck(path, module, x) < 1e-5
    assert capture(module, inputs(2).double()).layer_names == ["patch/Conv", "fc/MatMul",
                                                                "head/Gemm"]


class ErfHead(nn.Module):
    """``erf`` on its own: not a GELU."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 16), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(torch.erf(self.fc1(x.flatten(1))))


@pytest.mark.parametrize("kind", ["dynamo", "legacy"])
def test_an_operator_certify_does_not_read_is_named(tmp_path, kind):
    path = export(ErfHead().eval(), kind, tmp_path / "erf.onnx")
    module = load_model(path)
    with pytest.raises(UnsupportedModelError, match=r"erf\.default is not supported \(module "
                                                    r"'[^']+' \(OnnxErf\)"):
        capture(module, inputs(2).double())


UPSAMPLES = {
    "nearest": lambda: nn.Upsample(scale_factor=2),
    "nearest_size": lambda: nn.Upsample(size=(11, 13)),
    "bilinear": lambda: nn.Upsample(scale_factor=1.7, mode="bilinear"),
    "bilinear_corners": lambda: nn.Upsample(size=(9, 9), mode="bilinear", align_corners=True),
}


@pytest.mark.parametrize("kind", ["dynamo", "legacy"])
@pytest.mark.parametrize("name", sorted(UPSAMPLES))
def test_upsampling_is_read_as_one_interpolation(tmp_path, kind, name):
    # Both exporters write nn.Upsample as Resize with constant scales or sizes (the sizes
    # with the batch size of the export, which shape inference cannot follow through a
    # Resize); onnx2torch reads them from tensors, which torch.export cannot capture.
    # certify's ConstantResize holds them as numbers, the Reshape after the Resize copies the
    # batch size, and capture reads one Interpolate node.
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), UPSAMPLES[name](),
                          nn.Conv2d(3, 2, 3), nn.Flatten()).eval()
    x = torch.randn(BATCH, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    model.append(nn.Linear(model(x).shape[1], 3).eval())
    path = tmp_path / "upsample.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **({} if kind == "dynamo" else
                                                      {"dynamo": False, "opset_version": 17}))
    assert "Resize" in _op_types(path)
    module = load_model(path)
    assert [type(m) for m in module.modules()].count(ConstantResize) == 1
    assert onnx_crosscheck(path, module, x) < 1e-5
    network = capture(module, x.double())
    assert sum(isinstance(node.op, Interpolate) for node in network.nodes) == 1
    reference = copy.deepcopy(model).double()
    for batch in (1, 7):  # the file's batch size is 4
        y = torch.randn(batch, 1, 8, 8, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(network(y), module(y), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(module(y), reference(y), rtol=1e-5, atol=1e-5)
