"""``certify.testing``: the strategies build what they promise, and the assertions are sound
against real attacks (a concrete compression or a verified witness that changes a class
always fails them) and pass where the certificate holds; their messages name the layer,
the input, its radius against the required one and its margin."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

from certify.closed_forms.compressions import Compression, prune_count

from certify.radii.compressed import compress
from certify.radii.multilayer import multilayer_bound
from certify.capture.export import capture
from certify.graph.graph import Graph
from certify.radii.radius import layer_radii, predictions
from certify.testing import (assert_compression_safe, assert_robust, compressions, inputs,
                             networks, perturbations)
from certify.testing.assertions import _compression_errors

MLPS = networks(layer_types=("linear",), input_shape=(6,), widths=(2, 8), depth=(1, 2))
CNNS = networks(layer_types=("conv",), input_shape=(1, 6, 6), widths=(1, 3), depth=1)


def small_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)).double().eval()


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([("linear",), ("conv",), ("linear", "conv")]), st.data())
def test_networks_and_inputs_are_valid(types, data):
    shape = (6,) if types == ("linear",) else (2, 5, 5)
    model = data.draw(networks(layer_types=types, input_shape=shape, depth=(1, 2),
                               classes=(2, 4)))
    x = data.draw(inputs(shape, batch=(1, 5)))
    assert x.dtype == torch.float64 and x.shape[1:] == shape and 1 <= len(x) <= 5
    assert not model.training
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if types == ("linear",):
        assert not convs and len(linears) >= 2
    if types == ("conv",):
        assert convs and len(linears) == 1
    net = capture(model, x)  # supported by certify, BatchNorm folded
    out = model(x)
    assert net.is_last_dense(net.output) and len(net.affine_indices) == len(convs + linears)
    assert out.shape == (len(x), net.layer(net.output).weight.shape[0]) and \
        2 <= out.shape[1] <= 4
    torch.testing.assert_close(net(x), out, rtol=1e-10, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(MLPS, compressions(layers=["1", "3"], ranks=(0, 8)))
def test_compressions_are_valid_single_layer_compressions(model, c):
    assert isinstance(c, Compression) and c.layers in (("1",), ("3",))
    net = capture(model, (6,))
    if c.layers[0] in net.layer_names:  # only the named layer is touched
        small = compress(net, c)
        assert [a.op is b.op for a, b in zip(small.nodes, net.nodes)] == \
            [i not in net.affine_indices or node.name != c.layers[0]
             for i, node in enumerate(net.nodes)]


@settings(max_examples=12, deadline=None)
@given(st.one_of(MLPS, CNNS), st.sampled_from(["fro", "max"]), st.data())
def test_perturbations_inside_keep_and_outside_change_the_class(model, norm, data):
    shape = (1, 6, 6) if any(isinstance(m, nn.Conv2d) for m in model.modules()) else (6,)
    x = data.draw(inputs(shape, batch=(2, 5)))
    net = capture(model, x)
    layer = net.nodes[data.draw(st.sampled_from(net.affine_indices))].name
    y = predictions(net, x)[0]
    inside = data.draw(perturbations(model, x, layer, norm, inside=0.99))
    assert torch.all(inside.size <= 0.99 * inside.lower)
    assert torch.equal(inside.classes(model), y)
    radii = layer_radii(net, x, net.affine_indices[net.layer_names.index(layer)], norm)
    if torch.isfinite(radii.upper).any():
        outside = data.draw(perturbations(net, x, layer, norm, outside=1.0))
        assert torch.all(outside.size >= outside.lower)
        torch.testing.assert_close(outside.size, outside.upper, rtol=1e-12, atol=0)
        found = torch.isfinite(radii.upper)
        assert torch.all(outside.classes(net) != y[found])


def _attack(net: Graph, x, c: Compression) -> bool:
    """The real attack: does the compressed network change any prediction?"""
    return bool((compress(net, c)(x).argmax(-1) != net(x).argmax(-1)).any())


@settings(max_examples=15, deadline=None)
@given(MLPS, inputs((6,), batch=(4, 8)), st.data())
def test_assert_robust_fails_whenever_a_compression_flips_and_holds_when_it_passes(
        model, x, data):
    net = capture(model, x)
    index = data.draw(st.sampled_from(net.affine_indices))
    layer, name = net.layer(index), net.nodes[index].name
    c = data.draw(compressions(kinds=("rank", "bits", "bits_per_channel", "prune"),
                               layers=[name], ranks=(0, 8), bits=(2, 14)))
    kind = "bits" if c.kind == "bits_per_channel" else c.kind
    try:
        assert_robust(model, x, layers=[name], **{kind: c.level})
    except AssertionError as err:
        message = str(err)
        assert f"layer '{name}'" in message and "certified radius" in message
        event("not proved")
        return
    event("proved")
    # Proved: every gentler level of every covered kind changes nothing, concretely.
    m, n = layer.matrix.shape
    if kind == "rank":
        gentler = [("rank", r) for r in range(c.level, min(m, n))]
    elif kind == "bits":
        gentler = [(k, b) for b in range(c.level, c.level + 3)
                   for k in ("bits", "bits_per_channel")]
    else:
        gentler = [("prune", k / (m * n)) for k in range(prune_count(c.level, m * n) + 1)]
    for g in (Compression(k, level, (name,)) for k, level in gentler):
        assert not _attack(net, x, g), f"assert_robust passed {c} but {g} changes a class"


def test_a_rank_that_really_flips_fails_with_a_precise_message():
    model = small_mlp()
    x = torch.randn(20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    net = capture(model, x)
    first = net.affine_indices[0]
    flips = [r for r in range(4) if _attack(net, x, Compression("rank", r, ("0",)))]
    assert flips, "no rank flips a class: the test would be vacuous"
    r = max(flips)
    with pytest.raises(AssertionError) as info:
        assert_robust(model, x, rank=r, layers="0")
    line = str(info.value).splitlines()[1]
    match = re.search(r"layer '0', rank >= (\d+): not proved on input (\d+) \(class (\d+), "
                      r"margin ([\d.e-]+)\): certified radius ([\d.e-]+) \((fro|max)\) < "
                      r"required ([\d.e-]+)", line)
    assert match, line
    i, radius, required = int(match[2]), float(match[5]), float(match[7])
    lower = layer_radii(net, x, first, match[6]).lower
    assert radius == pytest.approx(float(lower[i]), rel=1e-2) and radius < required
    assert float(match[4]) == pytest.approx(float(predictions(net, x)[1][i].min()), rel=1e-2)
    sigma = torch.linalg.svdvals(net.layer(first).matrix)
    assert required == pytest.approx(float(sigma[r]), rel=1e-2)  # ||W - W_r||_2
    with pytest.raises(AssertionError, match=rf"rank={r}@0: REFUTED on input \d+ .*"
                                             r"the compressed model predicts \d"):
        assert_compression_safe(model, x, f"rank={r}@0")


def test_robust_cases_pass_and_radii_beyond_a_witness_are_refuted():
    model = small_mlp()
    x = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    net = capture(model, x)
    lower = min(float(layer_radii(net, x, i, "fro").lower.min()) for i in net.affine_indices)
    claims = assert_robust(model, x, bits=24, radius=0.99 * lower)
    assert len(claims) == 4 and all(bool(c.proved.all()) for c in claims)
    assert_compression_safe(model, x, bits=24)  # both layers at once: section 5
    assert_compression_safe(model, x, "bits_per_channel=24@2")
    upper = layer_radii(net, x, net.affine_indices[1], "max").upper
    with pytest.raises(AssertionError) as info:
        assert_robust(model, x, radius=1.01 * float(upper.min()), norm="max", layers=["2"])
    i = int(upper.argmin())
    assert re.search(rf"layer '2', \|\|D\|\|_max < [\d.e-]+: REFUTED on input {i} .*a witness "
                     rf"of norm {float(upper[i]):.3g} changes its class", str(info.value))


def test_several_layers_at_once_fail_when_the_compressed_model_flips():
    model = small_mlp()
    x = torch.randn(20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    net = capture(model, x)
    assert _attack(net, x, Compression("bits", 2))
    with pytest.raises(AssertionError, match=r"layers '0,2', bits=2: REFUTED .*section-5 "
                                             r"bound: margin / margin change"):
        assert_compression_safe(model, x, bits=2)


@pytest.mark.parametrize("call,match", [
    (lambda m, x: assert_robust(m, x), "nothing to prove"),
    (lambda m, x: assert_robust(m, x, rank=2, layers=["9"]), "affine layers are: 0, 2"),
    (lambda m, x: assert_robust(m, x, radius=0.1, norm="l2"), "norm must be one of"),
    (lambda m, x: assert_robust(m, x, bits=1), "between 2 and 64"),
    (lambda m, x: assert_robust(m, x, radius=-1.0), "radius must be a number >= 0"),
    (lambda m, x: assert_robust(m, x[0], rank=2), "add a batch axis"),
    (lambda m, x: assert_robust("model.onnx", x, rank=2), "torch.nn.Module"),
    (lambda m, x: assert_compression_safe(m, x), "nothing to check"),
    (lambda m, x: assert_compression_safe(m, x, "svd=3"), "unknown compression kind"),
    (lambda m, x: perturbations(m, x, "0", inside=1.0), r"\[0, 1\)"),
    (lambda m, x: perturbations(m, x, "0"), "exactly one of"),
    (lambda m, x: networks(layer_types=("conv",), input_shape=(6,)), "channels, height"),
])
def test_bad_input_is_explained(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(small_mlp(), torch.zeros(3, 6, dtype=torch.float64))


def test_strategies_without_hypothesis_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    with pytest.raises(ImportError, match=r"pip install certify\[test\]"):
        networks()


def test_pytest_plugin_fixtures(tmp_path):
    model = small_mlp()
    x = torch.randn(8, 6, dtype=torch.float64)
    torch.onnx.export(model.float(), (x[:1].float(),), str(tmp_path / "m.onnx"), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    np.savez(tmp_path / "calib.npz", x=x.numpy())
    (tmp_path / "test_guard.py").write_text(textwrap.dedent("""
        from certify.testing import assert_robust

        def test_guard(certify_model, certify_data):
            assert certify_data.shape == (8, 6)
            assert_robust(certify_model, certify_data, bits=24)
    """))
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}

    def run(*options):
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "certify.testing.pytest_plugin",
                               "-q", "-rs", "test_guard.py", *options], cwd=tmp_path, env=env,
                              capture_output=True, text=True)

    done = run("--certify-model", "m.onnx", "--certify-data", "calib.npz")
    assert "1 passed" in done.stdout, done.stdout + done.stderr
    skipped = run()
    assert "1 skipped" in skipped.stdout and "--certify-model PATH" in skipped.stdout


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 7), st.integers(1, 7), st.booleans(), st.integers(0, 2**31 - 1),
       st.sampled_from(["rank", "bits", "prune"]), st.data())
def test_claimed_errors_cover_every_gentler_compression(m, n, dense, seed, kind, data):
    """The bound behind ``rank >= r``, ``bits >= b``, ``prune <= p`` against the real error
    of every level it covers, recomputed in numpy (spectral norm for a dense ``fro`` radius,
    Frobenius for a convolution's, entrywise max for ``max``)."""
    W = np.random.default_rng(seed).normal(size=(m, n)) * 10.0 ** data.draw(st.integers(-3, 3))
    if kind == "rank":
        level = data.draw(st.integers(0, min(m, n)))
        U, s, Vt = np.linalg.svd(W, full_matrices=False)
        # certify keeps W itself at full rank; elsewhere the residual carries rounding.
        errors = [W - (U[:, :r] * s[:r]) @ Vt[:r] for r in range(level, min(m, n))] + \
            [np.zeros_like(W)]
    elif kind == "bits":
        level = data.draw(st.integers(2, 10))
        errors = []
        for b in range(level, level + 4):
            for axis in (None, 1):
                step = np.abs(W).max(axis=axis, keepdims=True) / (2 ** (b - 1) - 1)
                errors.append(W - step * np.round(W / step))
    else:
        level = data.draw(st.floats(0, 1))
        order = np.argsort(np.abs(W).ravel(), kind="stable")
        errors = []
        for k in range(prune_count(level, W.size) + 1):
            E = np.zeros(W.size)
            E[order[:k]] = W.ravel()[order[:k]]
            errors.append(E.reshape(W.shape))
    bound = _compression_errors(torch.from_numpy(W), kind, level, dense)
    slack = 1e-12 * np.linalg.norm(W, 2) if kind == "rank" else 0.0
    for E in errors:
        assert np.linalg.norm(E, 2 if dense else "fro") <= bound["fro"] + slack
        assert np.abs(E).max() <= bound["max"] + slack
    # Tight at the level itself (up to the documented float64 margins).
    E = errors[-1 if kind == "prune" else 0]
    if kind != "bits":
        assert bound["max"] <= (np.linalg.norm(E, 2) if kind == "rank" else np.abs(E).max()) \
            * (1 + 1e-9) + 1e-12 * np.abs(W).max()


def test_several_layers_unproved_fail_although_the_compressed_model_agrees():
    model = small_mlp()
    x = torch.randn(20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    net = capture(model, x)
    for bits in range(2, 16):  # the first level that changes nothing concretely
        if not _attack(net, x, Compression("bits", bits)):
            break
    small = compress(net, Compression("bits", bits))
    E = [float((net.layer(i).matrix - small.layer(i).matrix).abs().max())
         for i in net.affine_indices]
    assert not multilayer_bound(net, x, E, "max").certified.all()
    with pytest.raises(AssertionError, match=rf"layers '0,2', bits={bits}: not proved"):
        assert_compression_safe(model, x, bits=bits)
