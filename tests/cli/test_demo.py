"""`certify demo --quick` end to end, for each attack (truncation, quantisation, pruning): its
files, `certify check` on both certificates, and every number of its table recomputed
independently in numpy from the files it wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from certify.models import small as small_models
from certify.cli import main
from certify.cli.demo import FACTORY, LAYER, quick
from certify.attacks.trigger import Trigger

MODELS = ("clean", "backdoored")


ATTACKS = ("rank", "bits", "prune")


@pytest.fixture(scope="module", params=ATTACKS)
def demo(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"demo_{request.param}") / "out"
    assert main(["demo", "--quick", "--attack", request.param, "--out", str(out)]) == 0
    return out, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def split(demo):
    return small_models.load("mnist", seed=demo[1]["config"]["seed"])


def test_writes_every_file(demo):
    out, _ = demo
    for name in ("demo.png", "summary.json", "summary.md", "triggered.npz"):
        assert (out / name).stat().st_size > 0, name
    for model in MODELS:
        for name in ("model.safetensors", "measurements.json", "certificate.json",
                     "certificate.witnesses.npz"):
            assert (out / model / name).stat().st_size > 0, f"{model}/{name}"


@pytest.mark.parametrize("model", MODELS)
def test_certificates_pass_certify_check(demo, model, capsys):
    out, _ = demo
    assert main(["check", str(out / model / "certificate.json"),
                 str(out / model / "model.safetensors"), "--factory", FACTORY,
                 "--data", str(out / "triggered.npz")]) == 0
    assert " 0 refuted" in capsys.readouterr().out


def _forward(weights: dict, x: np.ndarray, W3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Layer-3 input ``h`` and logits of the MLP with layer 3's matrix replaced by ``W3``."""
    w = {k: v.astype(np.float64) for k, v in weights.items()}
    h = np.maximum(x.reshape(len(x), -1) @ w["1.weight"].T + w["1.bias"], 0)
    z = np.maximum(h @ W3.T + w["3.bias"], 0)
    return h, z @ w["5.weight"].T + w["5.bias"]


def _compressed(W: np.ndarray, attack: str, level) -> np.ndarray:
    """The compression in numpy, written from THEORY.md section 6, not from certify."""
    if attack == "rank":
        U, s, Vt = np.linalg.svd(W)
        return (U[:, :level] * s[:level]) @ Vt[:level]
    if attack == "bits":
        step = np.abs(W).max() / (2 ** (level - 1) - 1)
        return np.round(W / step) * step
    out = W.copy().ravel()
    out[np.argsort(np.abs(out), kind="stable")[:int(np.floor(level * out.size))]] = 0
    return out.reshape(W.shape)


@pytest.mark.parametrize("model", MODELS)
def test_table_recomputed_in_numpy(demo, split, model):
    """Per level: certified share and changed share on the triggered inputs (certified from
    the JSON radii and the exact change of layer 3's output, inside the l2 ball
    ``lower_fro ||h||_2`` (every attack) or the box ``lower_max ||h||_1`` (bits, prune), no
    certified input that changes class, and accuracy / ASR on the test split, all from the
    written files."""
    out, summary = demo
    attack = summary["config"]["attack"]
    report = summary["models"][model]
    weights = load_file(str(out / model / "model.safetensors"))
    W = weights[f"{LAYER}.weight"].astype(np.float64)
    with np.load(out / "triggered.npz") as data:
        x = data["x"]
    layer = next(e for e in json.loads((out / model / "certificate.json").read_text())["layers"]
                 if e["name"] == LAYER)
    lower = {n: np.array([np.inf if v is None else v for v in layer[n]["lower"]])
             for n in ("fro", "max")}
    h, logits = _forward(weights, x, W)
    ball = lower["fro"] * np.linalg.norm(h, axis=1)
    box = lower["max"] * np.abs(h).sum(axis=1)
    x_test, y_test = split.x_test.numpy(), split.y_test.numpy()
    trigger = Trigger(**summary["config"]["trigger"])(split.x_test)
    others = y_test != summary["config"]["target"]
    threshold = {"rank": layer["fro"]["threshold"]["rank"],
                 "bits": layer["max"]["threshold"]["bits"],
                 "prune": max(layer[n]["threshold"]["prune_ratio"] for n in ("fro", "max"))}
    assert threshold[attack] == report["threshold"]
    assert np.array_equal(x, trigger[others][:len(x)].double().numpy()), \
        "triggered.npz is not the trigger stamped on the first non-target test images"
    for row in report["rows"]:
        W_g = W if row["level"] is None else _compressed(W, attack, row["level"])
        accuracy = (_forward(weights, x_test, W_g)[1].argmax(1) == y_test).mean()
        hits = _forward(weights, trigger.numpy(), W_g)[1].argmax(1) == summary["config"]["target"]
        # The demo measures in float32, this recomputation in float64: near-ties may differ.
        assert row["accuracy"] == pytest.approx(accuracy, abs=2.01 / len(y_test))
        assert row["asr"] == pytest.approx(hits[others].mean(), abs=2.01 / others.sum())
        if row["level"] is None:
            continue
        dz = h @ (W - W_g).T
        certified = np.linalg.norm(dz, axis=1) < ball
        if attack != "rank":
            certified |= np.abs(dz).max(axis=1) < box
        changed = _forward(weights, x, W_g)[1].argmax(1) != logits.argmax(1)
        assert not (certified & changed).any(), "a certified input changed class"
        assert row["violations"] == 0
        assert row["certified"] == pytest.approx(certified.mean(), abs=1.01 / len(x))
        assert row["changed"] == pytest.approx(changed.mean(), abs=1e-12)


def test_summary_states_targets_and_verdict(demo):
    out, summary = demo
    attack = summary["config"]["attack"]
    level = {"rank": "rank {}", "bits": "bits {}", "prune": "pruned {:.0%}"}[attack]
    assert set(summary["targets"]) >= {"full-precision ASR <= 2%"} | {
        f"{level.format(r)} ASR >= 95%" for r in quick(attack).attacked}
    assert any("Soundness: 0 inputs" in line for line in summary["verdict"])
    text = (out / "summary.md").read_text()
    assert all(f"certify check {out / m / 'certificate.json'}" in text for m in MODELS)


def test_bad_options_are_explained(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["demo", "--quick", "--out", str(tmp_path / "file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert main(["demo", "--quick", "--seed", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "seed must be a non-negative integer" in capsys.readouterr().err
