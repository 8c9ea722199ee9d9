"""certify.formats.loading: real model files written to tmp_path, loaded back, compared with the source.

Covers ONNX (torch.onnx.export and a hand-built opset-20 graph in the style of the
torch.export-based exporter), .pt2 (torch.export.save), state dicts (.safetensors, .pt, .pth)
with a factory from tests/support/model_factories.py, every error path, and files built to run code
when loaded (pickles, a crafted ONNX node name, crafted .pt2 archives): none may run.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file
from torch import nn

import model_factories
from certify.formats.loading import (
    ModelLoadError,
    file_sha256,
    load_model,
    onnx_crosscheck,
)

INPUT_SHAPE = (1, 28, 28)


@pytest.fixture(autouse=True)
def _quiet_exporters():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _inputs(batch: int = 5, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *INPUT_SHAPE, generator=generator)


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The float64 output of the original float32 model (weights upcast exactly)."""
    import copy

    with torch.no_grad():
        return copy.deepcopy(model).eval().double()(x.double())


def _run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x.double())


def _export_onnx(model: nn.Module, path: Path, **kwargs) -> Path:
    kwargs.setdefault("dynamic_axes", {"x": {0: "batch"}, "y": {0: "batch"}})
    torch.onnx.export(
        model.eval(), (_inputs(2),), str(path), dynamo=False,
        input_names=["x"], output_names=["y"], **kwargs,
    )
    return path


def _export_pt2(model: nn.Module, path: Path, dynamic: bool = True) -> Path:
    shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None
    program = torch.export.export(model, (_inputs(2),), dynamic_shapes=shapes)
    torch.export.save(program, str(path))
    return path


def _module_types(module: nn.Module) -> set[type]:
    return {
        type(module.get_submodule(node.target))
        for node in module.graph.nodes if node.op == "call_module"
    }


def _targets(module: nn.Module) -> set[str]:
    return {str(node.target) for node in module.graph.nodes if node.op == "call_function"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Every legitimate file, exported once for the whole module."""
    root = tmp_path_factory.mktemp("models")
    mlp, cnn = model_factories.build_mlp(), model_factories.build_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based ONNX exporter is deprecated
        out = _export_all(root, mlp, cnn)
    torch.save(mlp.state_dict(), root / "mlp.pt")
    torch.save(cnn.state_dict(), root / "cnn.pth")
    save_file(mlp.state_dict(), str(root / "mlp.safetensors"))
    save_file(cnn.state_dict(), str(root / "cnn.safetensors"))
    for name in ("mlp.pt", "cnn.pth", "mlp.safetensors", "cnn.safetensors"):
        out[name] = root / name
    return out


def _export_all(root: Path, mlp: nn.Module, cnn: nn.Module) -> dict[str, Path]:
    return {
        # opset 17 without constant folding: batch norm stays a BatchNormalization node
        "mlp.onnx": _export_onnx(mlp, root / "mlp.onnx", opset_version=17),
        "cnn.onnx": _export_onnx(
            cnn, root / "cnn.onnx", opset_version=17, do_constant_folding=False
        ),
        # the exporter's default opset (20 in torch 2.13), batch norm folded into the convs:
        # onnx2torch needs the file down-converted to opset 17
        "cnn_default.onnx": _export_onnx(cnn, root / "cnn_default.onnx"),
        "mlp.pt2": _export_pt2(mlp, root / "mlp.pt2"),
        "cnn.pt2": _export_pt2(cnn, root / "cnn.pt2"),
        "mlp_static.pt2": _export_pt2(mlp, root / "mlp_static.pt2", dynamic=False),
    }


# ------------------------------------------------------------------------------------------
# loading real files
# ------------------------------------------------------------------------------------------


def test_module_instance_is_returned_in_eval_mode_and_float64():
    model = model_factories.build_cnn().train()
    loaded = load_model(model)
    assert loaded is not model  # a copy: the caller's module stays as it was
    assert model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert not loaded.training
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    assert all(b.dtype == torch.float64 for b in loaded.buffers() if b.is_floating_point())


@pytest.mark.parametrize(
    "name, build, folded",
    [
        ("mlp.onnx", model_factories.build_mlp, False),
        ("cnn.onnx", model_factories.build_cnn, False),
        ("cnn_default.onnx", model_factories.build_cnn, True),
    ],
)
def test_onnx_matches_original_and_onnxruntime(files, name, build, folded):
    model, x = build(), _inputs(5)
    loaded = load_model(files[name])
    assert isinstance(loaded, torch.fx.GraphModule)
    assert not loaded.training
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    got = _run(loaded, x)
    expected = _reference(model, x)
    # unfolded: the same float32 weights evaluated in float64 -> rounding level;
    # folded: the exporter folded batch norm into the convolutions in float32.
    tol = 1e-5 if folded else 1e-10
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(got.float(), model(x), rtol=1e-4, atol=1e-4)  # float32 model
    largest = onnx_crosscheck(files[name], loaded, x)
    assert 0.0 <= largest < 1e-5


def test_onnx_module_types(files):
    mlp = load_model(files["mlp.onnx"])
    assert _module_types(mlp) == {nn.Flatten, nn.Linear, nn.ReLU}
    cnn = load_model(files["cnn.onnx"])
    assert _module_types(cnn) == {
        nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Linear,
    }
    assert {node.op for node in cnn.graph.nodes} == {"placeholder", "call_module", "output"}
    # the default opset is newer than onnx2torch's: converted after down-conversion to 17
    assert onnx.load(files["cnn_default.onnx"]).opset_import[0].version > 17
    folded = load_model(files["cnn_default.onnx"])
    assert nn.BatchNorm2d not in _module_types(folded)


def _dynamo_style_mlp(path: Path) -> nn.Module:
    """Opset 20, Reshape(allowzero=1) with a constant shape: what the torch.export-based
    exporter writes for Flatten. onnx2torch refuses both as they are."""
    model = model_factories.build_mlp()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    initializers = [
        numpy_helper.from_array(np.array([-1, 784], dtype=np.int64), "shape"),
        numpy_helper.from_array(sd["1.weight"], "w1"),
        numpy_helper.from_array(sd["1.bias"], "b1"),
        numpy_helper.from_array(sd["3.weight"], "w3"),
        numpy_helper.from_array(sd["3.bias"], "b3"),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"], name="view", allowzero=1),
        helper.make_node("Gemm", ["flat", "w1", "b1"], ["h"], name="linear", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w3", "b3"], ["y"], name="linear_1", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "main_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        initializer=initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)
    return model


def test_onnx_in_the_style_of_the_dynamo_exporter(tmp_path):
    path = tmp_path / "dynamo_style.onnx"
    model = _dynamo_style_mlp(path)
    x = _inputs(4)
    loaded = load_model(path)
    torch.testing.assert_close(_run(loaded, x), _reference(model, x), rtol=1e-10, atol=1e-10)
    assert onnx_crosscheck(path, loaded, x) < 1e-5


def test_onnx_crosscheck_detects_a_wrong_conversion(files):
    loaded = load_model(files["mlp.onnx"])
    linear = next(m for m in loaded.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        linear.bias[0] += 1e-3
    with pytest.raises(ModelLoadError, match="disagrees with onnxruntime"):
        onnx_crosscheck(files["mlp.onnx"], loaded, _inputs(3))


def test_onnx_crosscheck_reports_wrong_input_count(files):
    loaded = load_model(files["mlp.onnx"])
    with pytest.raises(ModelLoadError, match="1 input"):
        onnx_crosscheck(files["mlp.onnx"], loaded, [_inputs(2), _inputs(2)])


@pytest.mark.parametrize(
    "name, build",
    [("mlp.pt2", model_factories.build_mlp), ("cnn.pt2", model_factories.build_cnn)],
)
def test_pt2_matches_original(files, name, build):
    model, x = build(), _inputs(7)  # batch 7: the export used batch 2 with a dynamic dim
    loaded = load_model(files[name])
    assert isinstance(loaded, torch.fx.GraphModule)
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    torch.testing.assert_close(_run(loaded, x), _reference(model, x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(_run(loaded, x).float(), model(x), rtol=1e-4, atol=1e-4)
    # built with check_guards=False: no _guards_fn call_module in the graph
    assert all(node.op != "call_module" for node in loaded.graph.nodes)


def test_pt2_node_targets(files):
    mlp = load_model(files["mlp.pt2"])
    assert _targets(mlp) == {
        "aten.flatten.using_ints", "aten.linear.default", "aten.relu.default",
    }
    cnn = load_model(files["cnn.pt2"])
    assert _targets(cnn) == {
        "aten.conv2d.default", "aten.batch_norm.default", "aten.relu.default",
        "aten.max_pool2d.default", "aten.avg_pool2d.default", "aten.flatten.using_ints",
        "aten.linear.default",
    }
    assert {node.op for node in cnn.graph.nodes} == {
        "placeholder", "get_attr", "call_function", "output",
    }


def test_pt2_static_batch_is_enforced(files):
    loaded = load_model(files["mlp_static.pt2"])
    _run(loaded, _inputs(2))
    with pytest.raises(RuntimeError, match="equal to 2"):
        _run(loaded, _inputs(3))


@pytest.mark.parametrize(
    "name, factory, build",
    [
        ("mlp.pt", "model_factories:build_mlp", model_factories.build_mlp),
        ("cnn.pth", "model_factories:build_cnn", model_factories.build_cnn),
        ("mlp.safetensors", "model_factories:build_mlp", model_factories.build_mlp),
        ("cnn.safetensors", "model_factories:build_cnn", model_factories.build_cnn),
    ],
)
def test_state_dict_with_factory_matches_original(files, name, factory, build):
    model, x = build(), _inputs(5)
    loaded = load_model(files[name], factory=factory)
    assert not loaded.training
    assert all(p.dtype == torch.float64 for p in loaded.parameters())
    torch.testing.assert_close(_run(loaded, x), _reference(model, x), rtol=1e-12, atol=1e-12)


def test_file_sha256(files):
    path = files["mlp.onnx"]
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ModelLoadError, match="not found"):
        file_sha256(path.with_name("missing.onnx"))


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope.onnx")


def test_directory(tmp_path):
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match="not a file"):
        load_model(folder)


def test_unknown_extension(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"\x89HDF")
    with pytest.raises(ModelLoadError, match=r"supported are \.onnx .*\.pt2.*\.safetensors"):
        load_model(path)


def test_unsupported_source_type():
    with pytest.raises(ModelLoadError, match="path to a model file"):
        load_model(42)


@pytest.mark.parametrize(
    "name, factory, message",
    [
        ("mlp.onnx", None, "not a readable ONNX file|fails the ONNX checker"),
        ("mlp.pt2", None, "not a readable torch.export archive"),
        ("mlp.safetensors", "model_factories:build_mlp", "not a readable safetensors file"),
        ("mlp.pt", "model_factories:build_mlp", "not a readable torch.save file"),
    ],
)
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_files(files, tmp_path, name, factory, message, damage):
    data = files[name].read_bytes()
    broken = tmp_path / name
    if damage == "truncated":
        broken.write_bytes(data[: len(data) // 2])
    else:
        broken.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ModelLoadError, match=message):
        load_model(broken, factory=factory)


def test_state_dict_without_factory(files):
    for name in ("mlp.pt", "mlp.safetensors"):
        with pytest.raises(ModelLoadError, match="--factory package.module:callable"):
            load_model(files[name])


def test_factory_with_a_full_model_file(files):
    for name in ("mlp.onnx", "mlp.pt2"):
        with pytest.raises(ModelLoadError, match="drop --factory"):
            load_model(files[name], factory="model_factories:build_mlp")


@pytest.mark.parametrize(
    "factory, message",
    [
        ("model_factories", "expected 'package.module:callable'"),
        ("model_factories:", "expected 'package.module:callable'"),
        ("model factories:build", "expected 'package.module:callable'"),
        ("model_factories:build_mlp()", "expected 'package.module:callable'"),
        ("certify_no_such_module_xyz:build", "cannot import module 'certify_no_such_module_xyz'"),
        ("model_factories:nope", "has no attribute 'nope'.*build_mlp"),
        ("model_factories:NOT_CALLABLE", "not a callable"),
        ("model_factories:not_a_module", "returned a int, not a torch.nn.Module"),
        ("model_factories:needs_argument", "callable with no arguments"),
        ("model_factories:raises", "raised RuntimeError: out of coffee"),
    ],
)
def test_bad_factories(files, factory, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(files["mlp.safetensors"], factory=factory)


def test_factory_module_with_missing_dependency(files, tmp_path, monkeypatch):
    (tmp_path / "factory_with_bad_import.py").write_text(
        "import certify_missing_dependency_xyz\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelLoadError, match="imports 'certify_missing_dependency_xyz'"):
        load_model(files["mlp.safetensors"], factory="factory_with_bad_import:build")


def test_key_mismatch_lists_keys(files):
    with pytest.raises(ModelLoadError) as info:
        load_model(files["mlp.safetensors"], factory="model_factories:build_cnn")
    text = str(info.value)
    assert "missing keys" in text and "0.weight" in text
    assert "unexpected keys" in text and "3.weight" in text


def test_shape_mismatch_lists_keys(files):
    with pytest.raises(ModelLoadError, match=r"shape mismatches: 1\.weight: file \(32, 784\) "
                                             r"vs model \(64, 784\)"):
        load_model(files["mlp.pt"], factory="model_factories:build_mlp_wide")


def test_prefixed_keys_get_a_hint(tmp_path):
    sd = {f"module.{k}": v for k, v in model_factories.build_mlp().state_dict().items()}
    path = tmp_path / "wrapped.pt"
    torch.save(sd, path)
    with pytest.raises(ModelLoadError, match="starts with 'module.'"):
        load_model(path, factory="model_factories:build_mlp")


def test_training_checkpoint_gets_a_hint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": model_factories.build_mlp().state_dict(), "epoch": 3}, path)
    with pytest.raises(ModelLoadError, match=r"training checkpoint.*checkpoint\['state_dict'\]"):
        load_model(path, factory="model_factories:build_mlp")


def test_nan_parameter_is_named(tmp_path):
    sd = model_factories.build_mlp().state_dict()
    sd["3.bias"][2] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ModelLoadError, match=r"3\.bias \(1 NaN of 10\)"):
        load_model(path, factory="model_factories:build_mlp")


def test_inf_parameter_in_module_and_onnx(tmp_path):
    model = model_factories.build_mlp()
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
    with pytest.raises(ModelLoadError, match=r"1\.weight \(1 Inf"):
        load_model(model)
    path = _export_onnx(model_factories.build_cnn(), tmp_path / "cnn.onnx", opset_version=17,
                        do_constant_folding=False)
    model_proto = onnx.load(path)
    for init in model_proto.graph.initializer:
        if init.name.endswith("running_var"):
            array = numpy_helper.to_array(init).copy()
            array[1] = np.inf
            init.CopyFrom(numpy_helper.from_array(array, init.name))
            break
    onnx.save(model_proto, path)
    with pytest.raises(ModelLoadError, match="running_var.*Inf"):
        load_model(path)


def test_onnx_unsupported_operator(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Hardmax", ["x"], ["y"], name="hardmax")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    path = tmp_path / "hardmax.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    message = "onnx2torch cannot convert.*Hardmax.*opset_version=17"
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_pt2_exported_in_training_mode(tmp_path):
    model = model_factories.build_cnn().train()
    path = tmp_path / "train.pt2"
    torch.export.save(torch.export.export(model, (_inputs(2),)), str(path))
    with pytest.raises(ModelLoadError, match=r"training mode.*model\.eval\(\)"):
        load_model(path)


# ------------------------------------------------------------------------------------------
# nothing from the file is executed
# ------------------------------------------------------------------------------------------


class _WritesMarker:
    """Unpickling this calls open(marker, 'w'): a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_pickled_full_model_is_refused(tmp_path):
    path = tmp_path / "full_model.pt"
    torch.save(model_factories.TinyNet(), path)
    for factory in (None, "model_factories:build_mlp"):
        with pytest.raises(ModelLoadError) as info:
            load_model(path, factory=factory)
        text = str(info.value)
        assert "never unpickles code" in text
        assert "model_factories.TinyNet" in text
        assert "torch.save(model.state_dict()" in text and "torch.export" in text


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_not_executed(tmp_path, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = {"fc.weight": torch.zeros(2, 4), "fc.bias": _WritesMarker(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle)
    with pytest.raises(ModelLoadError):
        load_model(path, factory="model_factories:TinyNet")
    assert not marker.exists()


def test_onnx_node_name_cannot_inject_code(tmp_path):
    marker = tmp_path / "PWNED"
    # onnx2torch names a submodule after the node and torch.fx writes
    # getattr(self, "<name>") into generated source: this name would call open().
    evil = f'r") if open("{marker}", "w") else getattr(self, "r'
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name=evil)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    path = tmp_path / "evil.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    loaded = load_model(path)
    x = torch.randn(2, 3)
    torch.testing.assert_close(_run(loaded, x), torch.relu(x.double()))
    assert all('"' not in node.name and '"' not in str(node.target) for node in loaded.graph.nodes)
    assert not marker.exists()


def _rewrite_pt2(source: Path, target: Path, edit) -> Path:
    """Copy a .pt2 zip, passing each entry (name without the archive folder) through edit."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = edit(info.filename.split("/", 1)[1], zin.read(info.filename))
            zout.writestr(info.filename, data)
    return target


def _edit_model_json(change):
    def edit(name, data):
        if name == "models/model.json":
            document = json.loads(data)
            change(document)
            return json.dumps(document).encode()
        return data
    return edit


def _first_expr(document):
    """The first shape expression in the graph (the dynamic batch dimension)."""
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "expr_str" in item:
                return item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    raise AssertionError("no shape expression")


def test_pt2_rewritten_copy_still_loads(files, tmp_path):
    copy = _rewrite_pt2(files["mlp.pt2"], tmp_path / "copy.pt2", lambda name, data: data)
    x = _inputs(3)
    torch.testing.assert_close(_run(load_model(copy), x), _run(load_model(files["mlp.pt2"]), x))


def test_pt2_pickled_weight_is_refused(files, tmp_path):
    marker = tmp_path / "PWNED"

    def edit(name, data):
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            for entry in config["config"].values():
                entry["use_pickle"] = True
            return json.dumps(config).encode()
        if name.startswith("data/weights/weight_"):
            return pickle.dumps(_WritesMarker(marker))
        return data

    path = _rewrite_pt2(files["mlp.pt2"], tmp_path / "evil.pt2", edit)
    with pytest.raises(ModelLoadError, match="stored as a pickle.*never runs code"):
        load_model(path)
    assert not marker.exists()


def test_pt2_pickled_sample_inputs_are_refused(files, tmp_path):
    marker = tmp_path / "PWNED"

    def edit(name, data):
        if name.startswith("data/sample_inputs/"):
            return pickle.dumps(_WritesMarker(marker))
        return data

    path = _rewrite_pt2(files["mlp.pt2"], tmp_path / "evil.pt2", edit)
    with pytest.raises(ModelLoadError, match="sample inputs"):
        load_model(path)
    assert not marker.exists()


def test_pt2_shape_expression_is_not_evaluated(files, tmp_path):
    marker = tmp_path / "PWNED"

    def change(document):
        _first_expr(document)["expr_str"] = f"Symbol(str(open('{marker}', 'w')))"

    path = _rewrite_pt2(files["mlp.pt2"], tmp_path / "evil.pt2", _edit_model_json(change))
    with pytest.raises(ModelLoadError, match="shape expression"):
        load_model(path)
    assert not marker.exists()


def test_pt2_guard_code_is_not_run(files, tmp_path):
    marker = tmp_path / "PWNED"

    def change(document):
        document["guards_code"] = [f"open('{marker}', 'w') is not None"]

    path = _rewrite_pt2(files["mlp.pt2"], tmp_path / "evil.pt2", _edit_model_json(change))
    loaded = load_model(path)
    _run(loaded, _inputs(3))
    assert not marker.exists()


@pytest.mark.parametrize(
    "old, new, message",
    [
        ('"torch.ops.aten.relu.default"', '"torch.os.system"', "it calls 'torch.os.system'"),
        ('"forward_arg_names": ["input"]', '"forward_arg_names": ["input=print(1)"]',
         "unexpected forward_arg_names"),
        ('"parameter_name": "1.weight"', '"parameter_name": "1\\")or print(\\"x"',
         "unexpected parameter_name"),
    ],
)
def test_pt2_crafted_graph_is_refused(files, tmp_path, old, new, message):
    def edit(name, data):
        if name == "models/model.json":
            text = data.decode()
            assert old in text
            return text.replace(old, new, 1).encode()
        return data

    path = _rewrite_pt2(files["mlp.pt2"], tmp_path / "evil.pt2", edit)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def _external_onnx(tmp_path: Path, location: str = "weights.bin") -> Path:
    """An ONNX model whose every initializer lives in one external data file."""
    model = model_factories.build_mlp()
    inline = _export_onnx(model, tmp_path / "inline.onnx")
    path = tmp_path / "external.onnx"
    onnx.save_model(onnx.load(str(inline)), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=location, size_threshold=0)
    return path


def test_sha256_covers_onnx_external_data(tmp_path):
    path = _external_onnx(tmp_path)
    before = file_sha256(path)
    assert before != hashlib.sha256(path.read_bytes()).hexdigest()  # data is included
    data = tmp_path / "weights.bin"
    flipped = bytearray(data.read_bytes())
    flipped[-1] ^= 1
    data.write_bytes(bytes(flipped))
    assert file_sha256(path) != before  # a changed weight changes the certificate's hash
    data.unlink()
    with pytest.raises(ModelLoadError, match="external data file 'weights.bin'"):
        file_sha256(path)


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    path = _external_onnx(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere.bin"
    onnx.save_model(model, str(path))
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        file_sha256(path)
