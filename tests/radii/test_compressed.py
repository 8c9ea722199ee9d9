"""Concrete compressions (THEORY.md section 6): ``compress`` against a numpy recomputation,
the error norms against their closed forms, and the theorem: a compression of ONE layer
whose error is below an input's certified radius never changes that input's class."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from compression_cases import cnns, mlps, radii
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx_files import export

from certify.cli import main
from certify.closed_forms.compressions import Compression, parse_compression, prune_count
from certify.radii.compressed import compress, compressed_indices, compression_check
from certify.closed_forms.thresholds import threshold_rank
from certify.capture.export import capture
from certify.check.compressions import compress_matrix as numpy_compress
from certify.check.compressions import prune_count as numpy_prune_count


EPS = np.finfo(np.float64).eps


@st.composite
def single_layer_compressions(draw, model_and_shape):
    """A network, inputs, one affine layer and a compression of it at any level."""
    model, shape = model_and_shape
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(6, *shape, dtype=torch.float64)
    net = capture(model, x)
    index = draw(st.sampled_from(net.affine_indices))
    W = net.layer(index).matrix
    kind = draw(st.sampled_from(["rank", "bits", "bits_per_channel", "prune", "prune_global"]))
    # Pruned fractions cover every count k and the gaps between k/N and (k+1)/N.
    fraction = st.builds(lambda k, u: min(1.0, (k + u) / W.numel()),
                         st.integers(0, W.numel()), st.floats(0, 1, exclude_max=True))
    level = {"rank": st.integers(0, min(W.shape)), "bits": st.integers(2, 12),
             "bits_per_channel": st.integers(2, 12), "prune": fraction,
             "prune_global": fraction}[kind]
    return model, net, x, index, Compression(kind, draw(level), (net.nodes[index].name,))


PROBLEMS = st.one_of(mlps(), cnns()).flatmap(single_layer_compressions)


@settings(max_examples=40, deadline=None)
@given(PROBLEMS)
def test_compress_matches_numpy(problem):
    model, net, x, index, c = problem
    small = compress(net, c)
    assert [node.name for node in small.nodes] == [node.name for node in net.nodes]
    for i, (before, after) in enumerate(zip(net.nodes, small.nodes)):
        assert after.inputs == before.inputs and after.shape == before.shape
        if i != index:
            assert after.op is before.op
    layer, new = net.layer(index), small.layer(index)
    W = layer.matrix.numpy()
    expected = numpy_compress(W, c.kind, c.level)
    if c.kind == "rank":
        np.testing.assert_allclose(new.matrix.numpy(), expected, rtol=0,
                                   atol=1e-12 * np.linalg.norm(W, 2))
        assert np.linalg.matrix_rank(new.matrix.numpy(), tol=1e-9 * np.abs(W).max()) <= c.level
    else:  # the same IEEE operations: bit for bit
        assert np.array_equal(new.matrix.numpy(), expected)
    assert torch.equal(new.bias, layer.bias) and new.weight.shape == layer.weight.shape
    assert (new.stride, new.padding, new.dilation) == (layer.stride, layer.padding,
                                                       layer.dilation)
    if not layer.is_conv and index == net.affine_indices[0]:
        # Independent forward: the torch module itself with the numpy weight swapped in.
        linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][0]
        saved = linear.weight.data.clone()
        linear.weight.data = torch.from_numpy(expected)
        try:
            with torch.no_grad():
                np.testing.assert_allclose(small(x).numpy(), model(x).numpy(), atol=1e-9)
        finally:
            linear.weight.data = saved


@settings(max_examples=40, deadline=None)
@given(PROBLEMS)
def test_errors_and_changes_match_closed_forms(problem):
    _, net, x, index, c = problem
    layer = net.layer(index)
    W = layer.matrix.numpy()
    E = W - numpy_compress(W, c.kind, c.level)
    (result,) = compression_check(net, x, c).layers
    scale = np.linalg.norm(W, 2)
    # Upper bounds of the true norms, and tight.
    for bound, true in [(result.error_fro, np.linalg.norm(E)),
                        (result.error_spectral, np.linalg.norm(E, 2)),
                        (result.error_max, np.abs(E).max())]:
        assert true - 1e-12 * scale <= bound <= true * (1 + 1e-9) + 1e-12 * scale
    if c.kind == "rank":  # Eckart-Young-Mirsky
        sigma = np.append(np.linalg.svd(W, compute_uv=False), 0.0)
        r = min(c.level, len(sigma) - 1)
        assert result.error_spectral == pytest.approx(sigma[r], rel=1e-9, abs=1e-10 * scale)
        assert result.error_fro == pytest.approx(np.sqrt(np.sum(sigma[r:] ** 2)), rel=1e-9,
                                                 abs=1e-10 * scale)
    elif c.kind in ("prune", "prune_global"):
        count = max(k for k in range(W.size + 1) if k / W.size <= c.level)
        pruned = np.sort(np.abs(W).ravel())[:count]
        assert result.error_max == pytest.approx(pruned.max(initial=0.0), rel=1e-12)
        assert result.error_fro == pytest.approx(np.linalg.norm(pruned), rel=1e-12)
    else:  # round to nearest: at most half a step, per row for bits_per_channel
        top = np.abs(W).max(axis=1 if c.kind == "bits_per_channel" else None)
        s = top / (2 ** (c.level - 1) - 1)
        assert np.all(np.abs(E).max(axis=1) <= s / 2 + 4 * EPS * top)
    # The change of the layer's output, from two forward passes of the layer (bias cancels).
    h = net.values(x)[net.input_of(index)]
    new = compress(net, c).layer(index)
    delta = (layer(h) - new(h)).reshape(len(x), -1).numpy()
    np.testing.assert_allclose(result.change_fro.numpy(), np.linalg.norm(delta, axis=1),
                               rtol=1e-9, atol=1e-12 * scale)
    np.testing.assert_allclose(result.change_max.numpy(), np.abs(delta).max(axis=1),
                               rtol=1e-9, atol=1e-12 * scale)
    # The reach: that change as a weight radius, from the section-4 region's scales.
    P = layer.patches(h).numpy()
    dZ = E @ P
    with np.errstate(invalid="ignore", divide="ignore"):
        fro = np.linalg.norm(dZ, axis=(1, 2)) / np.linalg.norm(P, 2, axis=(1, 2))
        per_column = (np.abs(dZ).max(axis=1) / np.abs(P).sum(axis=1)).max(axis=1)
    for got, want in ((result.reach_fro, fro), (result.reach_max, per_column)):
        finite = np.isfinite(want)
        np.testing.assert_allclose(got.numpy()[finite], want[finite], rtol=1e-8,
                                   atol=1e-300)


@pytest.mark.parametrize("prune_count", [prune_count, numpy_prune_count],
                         ids=["torch", "numpy checker"])
def test_prune_count_reads_k_over_n_as_k(prune_count):
    """A ratio ``k / N`` (what ``threshold_prune_ratio`` returns) prunes exactly ``k``;
    anything short of it, one fewer; the count never rounds up."""
    for size in range(1, 120):
        for k in range(size + 1):
            assert prune_count(k / size, size) == k
            if k:
                assert prune_count(np.nextafter(k / size, 0), size) == k - 1
            if k < size:
                assert prune_count((k + 0.5) / size, size) == k


LEVELS = ([("rank", r) for r in range(13)] + [("bits", b) for b in range(2, 13)]
          + [("bits_per_channel", b) for b in range(2, 13)]
          + [("prune", p / 10) for p in range(11)])


def joint(result) -> torch.Tensor:
    """The section-10 certificate, all ``False`` where an operator has no remainder rule."""
    return torch.zeros_like(result.changed) if result.jointly is None else result.jointly


@settings(max_examples=15, deadline=None)
@given(st.one_of(mlps(), cnns()), st.integers(0, 2**31 - 1), st.data())
def test_harmless_single_layer_compression_never_changes_the_class(model_and_shape, seed, data):
    model, shape = model_and_shape
    torch.manual_seed(seed)
    x = torch.randn(8, *shape, dtype=torch.float64)
    net = capture(model, x)
    index = data.draw(st.sampled_from(net.affine_indices))
    layer, name = net.layer(index), net.nodes[index].name
    lower = radii(net, x, [index])
    for kind, level in LEVELS:  # every level, from destructive to harmless
        if kind == "rank" and level > min(layer.matrix.shape):
            continue
        result = compression_check(net, x, Compression(kind, level, (name,)), lower)
        bad = torch.nonzero(result.harmless & result.changed)[:, 0].tolist()
        assert result.violations == 0, f"{kind}={level} on {name}: {bad} harmless, changed"
        assert torch.equal(result.harmless, result.layers[0].harmless | joint(result))
        # Harmless in one norm => the output change lies in the region of Z that this radius
        # certifies (section 4): ||E P||_F <= rho sigma_max(P), |(E P)_cj| <= rho ||P_:j||_1.
        P = layer.patches(net.values(x)[net.input_of(index)]).numpy()
        reach = {"fro": np.linalg.norm(P, 2, axis=(1, 2)), "max": np.abs(P).sum(1).max(1)}
        for norm, change in (("fro", result.layers[0].change_fro),
                             ("max", result.layers[0].change_max)):
            alone = compression_check(net, x, result.compression,
                                      {name: {norm: lower[name][norm]}})
            # An input whose layer input is zero has radius inf and nothing to change.
            with np.errstate(invalid="ignore"):
                bound = lower[name][norm].numpy() * reach[norm] * (1 + 1e-9)
            inside = (change.numpy() == 0) | (change.numpy() <= bound)
            assert np.all(inside[alone.layers[0].harmless.numpy()]), (kind, level, norm)
        if kind == "rank" and net.is_dense(index):
            # compression.py's threshold rank agrees: every rank from it on is harmless.
            safe = threshold_rank(layer.matrix, float(lower[name]["fro"].min()))
            assert result.harmless.all() or level < safe


def test_the_output_change_vouches_where_the_weight_error_cannot():
    """Pruning a hidden layer more and more: at some levels the weight error is above an
    input's certified radii while the exact output change of that input is not, so the reach
    vouches for inputs the weight error cannot (and none of them changes class)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 4)).double()
    x = torch.randn(32, 20, dtype=torch.float64)
    net = capture(model, x)
    index = net.affine_indices[1]
    name = net.nodes[index].name
    lower = radii(net, x, [index])
    only_by_reach = 0
    for level in (0.1, 0.2, 0.3, 0.5, 0.7):
        result = compression_check(net, x, Compression("prune", level, (name,)), lower)
        layer = result.layers[0]
        by_weight = (layer.error_spectral < lower[name]["fro"]) | \
            (layer.error_max < lower[name]["max"])
        assert not (by_weight & ~result.harmless).any()  # the reach only adds
        only_by_reach += int((result.harmless & ~by_weight).sum())
        assert result.violations == 0
    assert only_by_reach > 0


def test_the_theorem_is_not_vacuous():
    """On a fixed model the sweep above meets both harmless and class-changing levels."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(),
                                torch.nn.Linear(10, 3)).double()
    x = torch.randn(30, 6, dtype=torch.float64)
    net = capture(model, x)
    lower = radii(net, x, net.affine_indices)
    harmless = changed = 0
    for kind, level in LEVELS:
        for i in net.affine_indices:
            if kind == "rank" and level > min(net.layer(i).matrix.shape):
                continue
            result = compression_check(net, x, Compression(kind, level, (net.nodes[i].name,)),
                                       lower)
            harmless += int(result.harmless[result.layers[0].error_max > 0].sum())
            changed += int(result.changed.sum())
            assert result.violations == 0
    assert harmless > 50 and changed > 50


@settings(max_examples=20, deadline=None)
@given(st.integers(3, 8), st.floats(0.1, 10), st.floats(1.1, 5), st.floats(1e-3, 0.5),
       st.integers(0, 2**31 - 1))
def test_harmless_is_tight_at_the_exact_last_layer_radius(n, s, gap, delta, seed):
    """A last layer ``W = a w z^T + s u v^T`` with ``v = h / ||h||``: truncation to rank 1
    removes exactly the worst direction, its error ``s`` is just above the exact radius
    ``s (1 - delta)``, and the class changes: never harmless (a lenient comparison would
    claim it is)."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=n)
    v = h / np.linalg.norm(h)
    z = rng.normal(size=n)
    z -= (z @ v) * v
    u, w = np.array([1.0, -1.0]) / np.sqrt(2), np.array([1.0, 1.0]) / np.sqrt(2)
    W = gap * s * np.outer(w, z / np.linalg.norm(z)) + s * np.outer(u, v)
    b = np.array([0.0, delta * s * np.linalg.norm(h) * np.sqrt(2)])  # margin s|h|sqrt2 (1-d)
    linear = torch.nn.Linear(n, 2).double()
    linear.weight.data, linear.bias.data = torch.from_numpy(W), torch.from_numpy(b)
    x = torch.from_numpy(h)[None]
    net = capture(torch.nn.Sequential(linear), x)
    lower = radii(net, x, net.affine_indices)
    assert float(lower["0"]["fro"][0]) == pytest.approx(s * (1 - delta), rel=1e-8)  # SAFETY
    result = compression_check(net, x, parse_compression("rank=1"), lower)
    assert result.layers[0].error_spectral == pytest.approx(s, rel=1e-9)
    assert result.changed.item() and not result.harmless.item() and result.violations == 0


@pytest.mark.parametrize("text,match", [
    ("rank=-1", "rank must be >= 0"),
    ("rank=2.5", "rank must be an integer"),
    ("bits=1", "between 2 and 64"),
    ("bits_per_channel=80", "between 2 and 64"),
    ("prune=1.5", r"fraction in \[0, 1\]"),
    ("prune=-0.1", r"fraction in \[0, 1\]"),
    ("prune=nan", r"fraction in \[0, 1\]"),
    ("svd=3", "unknown compression kind 'svd'"),
    ("rank", "KIND=LEVEL"),
    ("rank=", "KIND=LEVEL"),
    ("rank=8@", "empty layer name"),
    ("rank=8@fc1,,fc2", "empty layer name"),
])
def test_bad_compression_text_is_explained(text, match):
    with pytest.raises(ValueError, match=match):
        parse_compression(text)


def test_parsing_round_trips_and_checks_layer_names():
    for text in ("rank=8", "bits=4@fc1", "bits_per_channel=4@fc1,fc2", "prune=0.5", "prune=1.0"):
        assert str(parse_compression(text)) == text
    assert parse_compression(" prune = 0.25 @ a , b ") == Compression("prune", 0.25, ("a", "b"))
    with pytest.raises(ValueError, match="the affine layers are: fc1, fc2"):
        parse_compression("rank=2@fc3", ["fc1", "fc2"])
    net = capture(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()), (3,))
    with pytest.raises(ValueError, match=r"unknown layer\(s\) '1'.*affine layers are: 0"):
        compressed_indices(net, parse_compression("rank=1@1"))
    with pytest.raises(ValueError, match="layer names"):
        Compression("rank", 1, "0")
    with pytest.raises(ValueError, match="no radii for the compressed layer '0'"):
        compression_check(net, torch.zeros(2, 3), parse_compression("rank=1"), {"x": {}})
    with pytest.raises(ValueError, match="one radius per input"):
        compression_check(net, torch.zeros(2, 3), parse_compression("rank=1"),
                          {"0": {"fro": torch.ones(3)}})


def test_cli_model_compress(tmp_path, capsys):
    torch.manual_seed(1)  # predictions of three classes, and rank 1 changes some
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.ReLU(),
                                torch.nn.Linear(12, 4))
    x = torch.randn(12, 4, 4)
    export(model, x, tmp_path / "model.onnx")
    np.savez(tmp_path / "data.npz", x=x.numpy())
    args = [str(tmp_path / "model.onnx"), "--data", str(tmp_path / "data.npz")]
    out = tmp_path / "cert.json"
    texts = ["rank=1@3/Gemm", "bits=8@1/Gemm", "prune=0.3", "prune_global=0.5@3/Gemm,1/Gemm"]
    command = ["model", *args, "--out", str(out)]
    assert main(command + [a for t in texts for a in ("--compress", t)]) == 0
    table = capsys.readouterr().out
    document = json.loads(out.read_text())
    entries = document["compression_checks"]
    assert [e["compression"] for e in entries] == texts
    # Recomputed from the certificate's own radii, on the network the CLI loaded.
    from certify.formats.loading import load_model

    net = capture(load_model(tmp_path / "model.onnx"), x)
    lower = {layer["name"]: {n: [math.inf if v is None else v for v in layer[n]["lower"]]
                             for n in ("fro", "max")} for layer in document["layers"]}
    for text, entry in zip(texts, entries):
        result = compression_check(net, torch.from_numpy(x.numpy()).double(),
                                   parse_compression(text), lower)
        assert entry["changed"] == result.changed.nonzero()[:, 0].tolist()
        assert entry["harmless"] == result.harmless.tolist() and entry["violations"] == 0
        assert set(entry["harmless_per_layer"]) == set(entry["layers"])
        line = next(row for row in table.splitlines() if row.startswith(text[:28]))
        assert f"{len(entry['changed'])}/12" in line
        assert line.split()[3:5] == [f"{sum(entry['harmless'])}/12", f"{sum(entry['strength'])}/12"]
    assert entries[0]["changed"], "rank 1 should change some class (else the test is vacuous)"
    assert entries[3]["layers"] == ["1/Gemm", "3/Gemm"] and entries[3]["changed"]
    assert "joint bound of THEORY.md section 10" in table
    # `certify check` recomputes the compression checks too: more claims, all confirmed.
    assert main(["check", str(out), *args]) == 0
    del document["compression_checks"]
    (tmp_path / "plain.json").write_text(json.dumps(document))
    (tmp_path / "plain.witnesses.npz").write_bytes((tmp_path / "cert.witnesses.npz").read_bytes())
    assert main(["check", str(tmp_path / "plain.json"), *args]) == 0
    with_key, without = (int(n) for n in
                         re.findall(r"(\d+) claims confirmed, 0 refuted", capsys.readouterr().out))
    assert with_key > without
    assert main(command + ["--compress", "rank=1@fc9"]) == 2
    assert "the affine layers are: 1/Gemm, 3/Gemm" in capsys.readouterr().err
    assert main(command + ["--compress", "bits=1"]) == 2
    assert "between 2 and 64" in capsys.readouterr().err
