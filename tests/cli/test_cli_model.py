"""`certify model` writes a certificate that `certify check` confirms in numpy, and any
tampering with a claim is refuted."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from networks import Residual
from onnx import TensorProto, helper, numpy_helper
from onnx_files import export
from torch import nn

from certify.radii import radius
from certify.certificate.document import FORMAT, certify_network
from certify.cli import main
from certify.formats.loading import load_model
from certify.capture.export import capture
from certify.graph.inputs import InputError
from certify.graph.operators import Affine


def residual_model() -> nn.Module:
    """Two residual blocks, the second nested in an identity block, between MLP layers."""
    inner = Residual(nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12)),
                     nn.Linear(12, 12))
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(),
                         Residual(nn.Sequential(inner, nn.Tanh()), nn.Identity()), nn.ReLU(),
                         nn.Linear(12, 4))


@pytest.fixture(scope="module", params=["mlp", "cnn", "residual"])
def certified(request, tmp_path_factory):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
        x = torch.randn(12, 4, 4)
    elif request.param == "residual":
        model = residual_model()
        x = torch.randn(12, 4, 4)
    else:
        model = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2), nn.ReLU(), nn.AvgPool2d(1),
                              nn.Flatten(), nn.Linear(12, 3))
        x = torch.randn(12, 1, 6, 6)
    export(model, x, tmp / "model.onnx")
    np.savez(tmp / "data.npz", x=x.numpy())
    args = [str(tmp / "model.onnx"), "--data", str(tmp / "data.npz")]
    assert main(["model", *args, "--out", str(tmp / "cert.json"), "--plot", str(tmp / "c.png")]) == 0
    return tmp, args


def run_check(tmp, args, document=None) -> int:
    if document is not None:
        (tmp / "tampered.json").write_text(json.dumps(document))
        (tmp / "tampered.witnesses.npz").write_bytes((tmp / "cert.witnesses.npz").read_bytes())
        return main(["check", str(tmp / "tampered.json"), *args])
    return main(["check", str(tmp / "cert.json"), *args])


def test_certificate_schema_and_check(certified, capsys):
    tmp, args = certified
    document = json.loads((tmp / "cert.json").read_text())
    assert document["format"] == FORMAT
    assert {"model_sha256", "inputs_sha256", "tool_version", "predictions", "layers"} <= set(document)
    for layer in document["layers"]:
        assert {"name", "shape", "fro", "max"} <= set(layer)
        for norm in ("fro", "max"):
            claims = layer[norm]
            assert len(claims["lower"]) == len(claims["upper"]) == len(document["predictions"])
            assert set(claims["threshold"]) == {"rank", "bits", "bits_per_channel", "prune_ratio"}
    assert (tmp / "c.png").stat().st_size > 0
    assert run_check(tmp, args) == 0
    assert "0 refuted" in capsys.readouterr().out


@pytest.mark.parametrize("tamper", ["lower", "upper", "prediction", "rank", "multilayer"])
def test_tampered_claims_are_refuted(certified, tamper):
    tmp, args = certified
    document = json.loads((tmp / "cert.json").read_text())
    hidden = document["layers"][0]["fro"]
    if tamper == "lower":  # claim twice the verified upper bound: impossible
        hidden["lower"][0] = 2 * hidden["upper"][0]
    elif tamper == "upper":
        hidden["upper"][0] = 0.5 * hidden["upper"][0]
    elif tamper == "prediction":
        document["predictions"][0] = (document["predictions"][0] + 1) % 3
    elif tamper == "rank":  # claim that truncation to rank 0 is safe
        hidden["threshold"]["rank"] = 0
    else:  # every layer may change by its own size: far beyond any certificate
        claims = document["multilayer"]["fro"]
        claims["uniform_budget"][0] += 1.0
        claims["min"] = min(claims["uniform_budget"])
    assert run_check(tmp, args, document) == 1


def test_lower_inflated_below_upper_is_refuted(certified):
    # A lower bound between the true certificate and the witness: neither the Lipschitz
    # bound nor interval propagation confirms it, unless it is already tight.
    tmp, args = certified
    document = json.loads((tmp / "cert.json").read_text())
    claims = document["layers"][0]["max"]
    lower, upper = (np.array([np.inf if v is None else v for v in claims[key]])
                    for key in ("lower", "upper"))  # None: no witness found (inf)
    loose = np.nonzero(np.isfinite(upper) & (lower < 0.5 * upper))[0]
    if loose.size == 0:
        pytest.skip("every lower bound is already within a factor 2 of its witness")
    claims["lower"][int(loose[0])] = 0.99 * upper[loose[0]]
    assert run_check(tmp, args, document) == 1


def test_budgets_count_the_inputs_certified_with_all_layers_at_once(certified, tmp_path,
                                                                    capsys):
    tmp, args = certified
    out = ["--out", str(tmp_path / "c.json"), "--limit", "4"]
    n = len(json.loads((tmp / "cert.json").read_text())["layers"])
    zeros = ",".join(["0"] * n)
    assert main(["model", *args, *out, "--budgets", zeros]) == 0
    printed = capsys.readouterr().out
    assert "all layers at once, fro" in printed
    assert f"{zeros} (fro, all layers at once): 4 of 4" in printed
    big = ",".join(["0"] * (n - 1) + ["1e3"])
    assert main(["model", *args, *out, "--budgets", big, "--budget-norm", "max"]) == 0
    assert "0 of 4 inputs certified" in capsys.readouterr().out
    assert main(["model", *args, *out, "--budgets", ",".join(["0.1"] * (n + 1))]) == 2
    assert f"got {n + 1} budgets but the network has {n} affine" in capsys.readouterr().err
    assert main(["model", *args, *out, "--budgets", "0.1;0"]) == 2
    assert "comma-separated numbers" in capsys.readouterr().err


def test_bad_data_gets_a_clear_error(certified, tmp_path, capsys):
    tmp, args = certified
    out = ["--out", str(tmp_path / "o.json")]
    cases = [("nox.npz", {"y": np.zeros(3)}, "no array 'x'"),
             ("shape.npz", {"x": np.zeros((3, 7))}, "do not fit the model"),
             ("nan.npz", {"x": np.full((2, 4, 4), np.nan)}, "finite")]
    for name, arrays, message in cases:
        np.savez(tmp_path / name, **arrays)
        assert main(["model", args[0], "--data", str(tmp_path / name), *out]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_onnx_export_of_a_residual_model_captures_to_the_same_graph(tmp_path):
    torch.manual_seed(1)
    model = residual_model().eval()
    x = torch.randn(3, 4, 4)
    export(model, x, tmp_path / "r.onnx")
    ours, theirs = (capture(m, x) for m in (model, load_model(tmp_path / "r.onnx")))
    assert [type(n.op) for n in theirs.nodes] == [type(n.op) for n in ours.nodes]
    assert [n.inputs for n in theirs.nodes] == [n.inputs for n in ours.nodes]
    for a, b in zip(ours.nodes, theirs.nodes):
        if isinstance(a.op, Affine):
            assert torch.allclose(a.op.weight, b.op.weight) and \
                torch.allclose(a.op.bias, b.op.bias)
    x = x.double()
    assert torch.allclose(theirs(x), model.double()(x), atol=1e-5)


def test_onnx_models_are_cross_checked_against_onnxruntime(certified, tmp_path, capsys):
    tmp, args = certified
    line = re.compile(r"^onnxruntime cross-check: largest difference (\S+) on (\d+) inputs$",
                      re.MULTILINE)
    assert main(["model", *args, "--out", str(tmp_path / "c.json"), "--limit", "5"]) == 0
    found = line.findall(capsys.readouterr().err)
    assert len(found) == 1 and found[0][1] == "5" and 0 <= float(found[0][0]) < 1e-5
    assert run_check(tmp, args) == 0
    found = line.findall(capsys.readouterr().err)
    assert len(found) == 1 and found[0][1] == "12" and float(found[0][0]) < 1e-5


def test_onnx_model_that_onnxruntime_computes_otherwise_is_refused(tmp_path, capsys):
    # (x + 1e4) - 1e4 loses x's low bits in the file's float32 (onnxruntime), not in
    # certify's float64: a real disagreement, found before any certification.
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Add", ["x", "big"], ["a"], name="add"),
             helper.make_node("Sub", ["a", "big"], ["s"], name="sub"),
             helper.make_node("Gemm", ["s", "w"], ["y"], name="linear", transB=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(np.array(1e4, dtype=np.float32), "big"),
                     numpy_helper.from_array(rng.normal(size=(3, 4)).astype(np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")
    np.savez(tmp_path / "data.npz", x=rng.normal(size=(6, 4)))
    status = main(["model", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "data.npz"),
                   "--out", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("certify: the converted ONNX model disagrees with onnxruntime on "
                          "output 0 of m.onnx: largest difference ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "c.json").exists()


def test_state_dicts_are_not_cross_checked(tmp_path, capsys):
    import model_factories

    torch.save(model_factories.build_mlp().state_dict(), tmp_path / "m.pt")
    np.savez(tmp_path / "data.npz", x=np.zeros((2, 1, 28, 28)))
    assert main(["model", str(tmp_path / "m.pt"), "--factory", "model_factories:build_mlp",
                 "--data", str(tmp_path / "data.npz"), "--out", str(tmp_path / "c.json")]) == 0
    assert "cross-check" not in capsys.readouterr().err


@pytest.mark.parametrize("choice,no_thresholds,refined", [
    ("always", True, True), ("auto", True, False), ("auto", False, True), ("never", False, False)])
def test_refine_chooses_the_refinement_and_check_confirms_it(tmp_path, monkeypatch, choice,
                                                             no_thresholds, refined):
    """``--refine``: ``always`` refines every hidden layer even where ``auto`` would not
    (work thresholds below 0, as on a layer too costly to refine), ``never`` not even where
    ``auto`` does (this small net's work is below ``REFINE_WORK``); ``certify check``
    confirms each certificate with the refinement its methods name."""
    if no_thresholds:
        monkeypatch.setattr(radius, "REFINE_WORK", -1.0)
        monkeypatch.setattr(radius, "REFINE_LIMIT", -1.0)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 12),
                          nn.ReLU(), nn.Linear(12, 4))
    x = torch.randn(8, 4, 4)
    export(model, x, tmp_path / "model.onnx")
    np.savez(tmp_path / "data.npz", x=x.numpy())
    args = [str(tmp_path / "model.onnx"), "--data", str(tmp_path / "data.npz")]
    out = tmp_path / "cert.json"
    assert main(["model", *args, "--out", str(out), "--refine", choice]) == 0
    methods = [layer[norm]["method"] for layer in json.loads(out.read_text())["layers"]
               for norm in ("fro", "max")]
    hidden = [m for m in methods if m != "exact"]
    assert len(hidden) == 4 and all(("refined" in m) == refined for m in hidden), methods
    assert main(["check", str(out), *args]) == 0


def test_an_unknown_refine_is_refused_before_any_work(certified, capsys):
    tmp, args = certified
    assert main(["model", *args, "--out", str(tmp / "r.json"), "--refine", "sometimes"]) == 2
    assert not (tmp / "r.json").exists()
    assert "invalid choice: 'sometimes' (choose from 'auto', 'always', 'never')" in \
        capsys.readouterr().err
    with pytest.raises(InputError, match="refine must be True, False or 'auto', got 'sometimes'"):
        certify_network(load_model(tmp / "model.onnx"), torch.zeros(1, 4, 4), model_sha256="",
                        refine="sometimes")
