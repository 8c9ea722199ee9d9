"""Certificates made with optimised ReLU slopes (``certify model --optimise``): the slopes
go into the witnesses file, ``certify check`` confirms every claim with them, and refutes
the claims when the slopes are tampered with (set back to CROWN's, or removed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from certified_models import certify

from certify.cli import main


@pytest.fixture(scope="module")
def optimised(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deep")
    args = certify(tmp, "deep_mlp", inputs=6, options=("--optimise", "5"))
    return tmp, args, json.loads((tmp / "cert.json").read_text())


def _slopes(tmp) -> dict:
    with np.load(tmp / "cert.witnesses.npz") as stored:
        return dict(stored)


def _check_with(tmp, args, arrays, capsys) -> tuple[int, str]:
    np.savez(tmp / "tampered.witnesses.npz", **arrays)
    (tmp / "tampered.json").write_text((tmp / "cert.json").read_text())
    status = main(["check", str(tmp / "tampered.json"), *args])
    out = capsys.readouterr().out
    assert "Traceback" not in out
    return status, out


def test_the_optimised_certificate_names_its_slopes_and_checks(optimised, capsys):
    tmp, args, document = optimised
    methods = [layer[norm]["method"] for layer in document["layers"] for norm in ("fro", "max")]
    assert any("optimised" in m for m in methods)
    stored = [k for k in _slopes(tmp) if "/slopes/" in k]
    assert stored and all(_slopes(tmp)[k].dtype == np.uint8 for k in stored)
    assert main(["check", str(tmp / "cert.json"), *args]) == 0
    assert "0 refuted" in capsys.readouterr().out


def test_slopes_set_back_to_crowns_are_refuted(optimised, capsys):
    tmp, args, _ = optimised
    arrays = {k: np.full_like(v, 255) if "/slopes/" in k else v
              for k, v in _slopes(tmp).items()}
    status, out = _check_with(tmp, args, arrays, capsys)
    assert status == 1 and "is not confirmed" in out


def test_missing_slopes_are_refuted(optimised, capsys):
    tmp, args, _ = optimised
    arrays = {k: v for k, v in _slopes(tmp).items() if "/slopes/" not in k}
    status, out = _check_with(tmp, args, arrays, capsys)
    assert status == 1 and "slopes" in out and "missing" in out


def test_slopes_of_the_wrong_shape_are_refuted(optimised, capsys):
    tmp, args, _ = optimised
    arrays = {k: v[:, :1] if "/slopes/" in k else v for k, v in _slopes(tmp).items()}
    status, out = _check_with(tmp, args, arrays, capsys)
    assert status == 1 and "need uint8" in out


def test_a_bad_step_count_is_refused_before_any_work(tmp_path, capsys):
    assert main(["model", "m.onnx", "--data", "x.npz", "--out", str(tmp_path / "c.json"),
                 "--optimise", "-3"]) == 2
    assert "--optimise must be a whole number of steps" in capsys.readouterr().err
