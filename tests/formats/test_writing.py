"""``write_weights`` on real files: an MLP and a model with every layout of a certified weight
(a convolution and a dense layer with folded batch norms, a transposed convolution with one,
a dense layer stored transposed), exported by both ONNX exporters and to ``.pt2``, and a CNN
as state dicts with its factory; a weight in an ONNX ``Constant`` node and in external data.
Each copy is read back the way the command line reads a model, and must hold the new weights
and compute what the graph with them computes. Then the refusals: bad weights, paths that are
no model file or not a copy of one, a tensor two layers read, a weight no tensor holds, a
channel its batch norm zeroes, and a copy that reads back otherwise (not kept).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file
from torch import nn

import model_factories
from certify.capture.export import capture
from certify.formats.errors import ModelLoadError
from certify.formats.loading import load_model
from certify.formats.writing import write_weights
from certify.graph.inputs import InputError


def batch_norms_as_trained(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model.eval()


def layouts() -> nn.Module:
    """The legacy exporter folds the first batch norm into its convolution and keeps the
    others, storing the bias-free dense layer transposed (``MatMul``); the dynamo exporter
    folds them all; ``.pt2`` keeps them all, which certify folds."""
    torch.manual_seed(2)
    return batch_norms_as_trained(nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.ConvTranspose2d(4, 3, 2, stride=2), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(4),
        nn.Flatten(), nn.Linear(48, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, 5)))


class Twice(nn.Module):
    """One dense layer applied twice: in ONNX, two certified layers that read one initializer
    (onnx2torch gives each node its own copy)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.fc(x)))


class Factored(nn.Module):
    """A dense layer stored as the product of two factors: no tensor of the file is its weight."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(2, 6))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.a @ self.b)


MODELS = {"mlp": (model_factories.build_mlp, (1, 28, 28)), "layouts": (layouts, (1, 8, 8)),
          "cnn": (model_factories.build_cnn, (1, 28, 28))}
CASES = [("mlp", "legacy"), ("mlp", "dynamo"), ("mlp", "pt2"), ("layouts", "legacy"),
         ("layouts", "dynamo"), ("layouts", "pt2"), ("cnn", "safetensors"), ("cnn", "pt")]
SUFFIX = {"legacy": ".onnx", "dynamo": ".onnx", "pt2": ".pt2", "safetensors": ".safetensors",
          "pt": ".pt"}


def save(model: nn.Module, fmt: str, path, shape) -> None:
    x = torch.randn(2, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt in ("legacy", "dynamo"):
            torch.onnx.export(model, (x,), str(path), dynamo=fmt == "dynamo", verbose=False)
        elif fmt == "pt2":
            torch.export.save(torch.export.export(model, (x,)), str(path))
        elif fmt == "safetensors":
            save_file(model.state_dict(), str(path))
        else:
            torch.save(model.state_dict(), path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    found = {}
    for name, fmt in CASES:
        build, shape = MODELS[name]
        found[name, fmt] = root / f"{name}_{fmt}{SUFFIX[fmt]}"
        save(build(), fmt, found[name, fmt], shape)
    return found


def reader(shape, factory: str | None = None):
    """How the command line reads a model file into a graph: ``load_model``, ``capture``."""
    return lambda path: capture(load_model(path, factory=factory), shape)


def case_reader(name: str, fmt: str):
    factory = f"model_factories:build_{name}" if fmt in ("safetensors", "pt") else None
    return reader(MODELS[name][1], factory)


def on_a_grid(network) -> dict[str, torch.Tensor]:
    """Every layer but the last, rounded to multiples of 1/64 (exact in float32)."""
    return {name: torch.round(network.layer(i).matrix * 64) / 64
            for i, name in zip(network.affine_indices[:-1], network.layer_names[:-1])}


def with_weights(network, weights):
    for i, name in zip(network.affine_indices, network.layer_names):
        if name in weights:
            network = network.replace(i, network.layer(i).with_weight(weights[name]))
    return network


@pytest.mark.parametrize("name, fmt", CASES)
def test_the_copy_reads_back_with_the_new_weights(files, tmp_path, name, fmt):
    source, reload = files[name, fmt], case_reader(name, fmt)
    network = reload(source)
    weights = on_a_grid(network)
    out = tmp_path / f"copy{source.suffix}"
    written = write_weights(source, network, weights, out, reload=reload)
    assert written.layer_names == network.layer_names
    for i, layer in zip(network.affine_indices, network.layer_names):
        got = written.layer(i).matrix
        if layer not in weights:
            assert torch.equal(got, network.layer(i).matrix)
        elif name == "mlp":  # stored as is
            assert torch.equal(got, weights[layer])
        else:  # folded layers are stored divided by their factor, in float32
            torch.testing.assert_close(got, weights[layer], rtol=1e-6, atol=0)
        assert torch.equal(written.layer(i).bias, network.layer(i).bias)
    x = torch.randn(5, *MODELS[name][1], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(written(x), with_weights(network, weights)(x), rtol=1e-5,
                                   atol=1e-5)


def test_a_float32_file_rounds_the_new_weights(files, tmp_path):
    source, reload = files["mlp", "pt2"], case_reader("mlp", "pt2")
    network = reload(source)
    first = network.layer_names[0]
    new = network.layer(network.affine_indices[0]).matrix + 1e-3 / 3
    written = write_weights(source, network, {first: new}, tmp_path / "copy.pt2", reload=reload)
    got = written.layer(written.affine_indices[0]).matrix
    assert not torch.equal(got, new) and torch.equal(got, new.float().double())


def test_onnx_external_data_is_written_beside_the_copy(files, tmp_path):
    source = tmp_path / "external.onnx"
    onnx.save(onnx.load(str(files["layouts", "legacy"])), str(source),
              save_as_external_data=True, location="external.onnx.data", size_threshold=0)
    data = (tmp_path / "external.onnx.data").read_bytes()
    reload = case_reader("layouts", "legacy")
    network = reload(source)
    weights = on_a_grid(network)
    out = tmp_path / "copy" / "copy.onnx"
    out.parent.mkdir()
    written = write_weights(source, network, weights, out, reload=reload)
    assert sorted(p.name for p in out.parent.iterdir()) == ["copy.onnx", "copy.onnx.data"]
    assert (tmp_path / "external.onnx.data").read_bytes() == data
    for i, name in zip(network.affine_indices[:-1], network.layer_names[:-1]):
        torch.testing.assert_close(written.layer(i).matrix, weights[name], rtol=1e-6, atol=0)


def test_a_weight_in_an_onnx_constant_node(tmp_path):
    """``x @ W`` with ``W`` ``(n, m)`` the value of a ``Constant`` node, not an initializer."""
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 7, "w")
    nodes = [helper.make_node("Constant", [], ["w"], value=w),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])])
    source = tmp_path / "constant.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    network = reader((4,))(source)
    (name,) = network.layer_names
    new = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4)
    written = write_weights(source, network, {name: new}, tmp_path / "copy.onnx",
                            reload=reader((4,)))
    assert torch.equal(written.layer(written.affine_indices[0]).matrix, new.float().double())
    assert [n.op_type for n in onnx.load(str(tmp_path / "copy.onnx")).graph.node] == \
        ["Constant", "MatMul"]


@pytest.mark.parametrize("kind", ["unknown name", "wrong shape", "NaN"])
def test_bad_weights_are_refused(files, tmp_path, kind):
    source, reload = files["mlp", "pt2"], case_reader("mlp", "pt2")
    network = reload(source)
    first, w = network.layer_names[0], network.layer(network.affine_indices[0]).matrix
    weights, match = {
        "unknown name": ({"fc9": w}, (r"weights name no layer of the graph: 'fc9'; its "
                                      r"certified layers are '")),
        "wrong shape": ({first: w.T}, (r"is a torch.float64 tensor of shape \(784, 32\); layer "
                                       r"'.*' has a real weight matrix of shape \(32, 784\)")),
        "NaN": ({first: w.index_fill(1, torch.tensor([3]), torch.nan)},
                r"has 32 NaN or infinite entries of 25088; a model file needs finite weights"),
    }[kind]
    with pytest.raises(InputError, match=match):
        write_weights(source, network, weights, tmp_path / "copy.pt2", reload=reload)
    assert not (tmp_path / "copy.pt2").exists()


def test_unsupported_paths_are_refused(files, tmp_path):
    source, reload = files["mlp", "pt2"], case_reader("mlp", "pt2")
    network = reload(source)
    keras = tmp_path / "model.h5"
    keras.write_bytes(b"\x89HDF")
    with pytest.raises(ModelLoadError, match=r"cannot write weights into model.h5: certify "
                                             r"writes the formats it reads, .onnx, .pt2, "):
        write_weights(keras, network, {}, tmp_path / "copy.h5", reload=reload)
    with pytest.raises(ModelLoadError, match=r"cannot write copy.onnx: the copy of "
                                             r"mlp_pt2.pt2 keeps its format: name it with .pt2"):
        write_weights(source, network, {}, tmp_path / "copy.onnx", reload=reload)
    with pytest.raises(ModelLoadError, match="is the model file itself: write the copy to "
                                             "another path"):
        write_weights(source, network, {}, source, reload=reload)


def test_a_tensor_two_layers_read_is_refused(tmp_path):
    torch.manual_seed(3)
    source = tmp_path / "twice.onnx"
    save(Twice().eval(), "legacy", source, (4,))
    network = capture(load_model(source), (4,))
    first, second = network.layer_names
    with pytest.raises(ModelLoadError, match=rf"layer '{re.escape(first)}' shares tensor "
                                             rf"'fc.weight' of twice.onnx with "
                                             rf"'{re.escape(second)}'; certify writes only"):
        write_weights(source, network, {first: torch.zeros(4, 4)}, tmp_path / "copy.onnx",
                      reload=reader((4,)))


def test_a_weight_no_tensor_holds_is_refused(tmp_path):
    torch.manual_seed(4)
    source = tmp_path / "factored.pt2"
    save(Factored().eval(), "pt2", source, (6,))
    network = capture(load_model(source), (6,))
    (name,) = network.layer_names
    with pytest.raises(ModelLoadError, match=rf"no tensor of factored.pt2 holds the weight "
                                             rf"of layer '{re.escape(name)}', as is, "
                                             "transposed, swapped"):
        write_weights(source, network, {name: torch.zeros(3, 6)}, tmp_path / "copy.pt2",
                      reload=reader((6,)))


def test_a_channel_its_batch_norm_zeroes_stays_zero(tmp_path):
    torch.manual_seed(5)
    model = batch_norms_as_trained(nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3),
                                                 nn.Flatten(), nn.Linear(12, 2)))
    with torch.no_grad():
        model[1].weight[1] = 0.0
    source = tmp_path / "zeroed.pt2"
    save(model, "pt2", source, (1, 4, 4))
    network = capture(load_model(source), (1, 4, 4))
    conv = network.layer_names[0]
    new = torch.ones(3, 9)
    reload = reader((1, 4, 4))
    with pytest.raises(ModelLoadError, match=rf"layer '{re.escape(conv)}': output channels 1 "
                                             "are zero in the file or zeroed by the batch norm"):
        write_weights(source, network, {conv: new}, tmp_path / "copy.pt2", reload=reload)
    new[1] = 0.0
    written = write_weights(source, network, {conv: new}, tmp_path / "copy.pt2", reload=reload)
    torch.testing.assert_close(written.layer(written.affine_indices[0]).matrix,
                               new.double(), rtol=1e-6, atol=0)


def test_a_copy_that_reads_back_otherwise_is_not_kept(files, tmp_path):
    source, reload = files["layouts", "pt2"], case_reader("layouts", "pt2")
    network = reload(source)
    out = tmp_path / "copy.pt2"
    with pytest.raises(ModelLoadError, match=r"copy.pt2 does not read back as written: layers "
                                             r"'.*' hold other weights than asked for"):
        write_weights(source, network, on_a_grid(network), out, reload=lambda path: network)
    assert not out.exists()
