"""Compressions of several layers at once (THEORY.md sections 5 and 6): inputs the
all-layers bound vouches for never change class, not under the compression and not under an
attack on every compressed layer within the same budgets (which does flip inputs beyond
them); the verdict equals a numpy recomputation and ``certify check`` refutes a tampered one.
Global pruning (``prune_global``) is the backdoor's ``compressors.Prune(scope="global")``
bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from compression_cases import cnns, mlps, radii
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx_files import export
from torch import nn
from weight_attacks import attacks, perturbed_logits

from certify.capture.export import capture
from certify.cli import main
from certify.closed_forms.compressions import KINDS, Compression, parse_compression, prune, prune_together
from certify.radii.compressed import compress, compressed_indices, compression_check
from certify.attacks.compressors import Prune
from certify.radii.multilayer import multilayer_bound
from certify.check.bounds import multilayer_bound as numpy_multilayer_bound
from certify.check.compressions import compress_matrices as numpy_compress_matrices
from certify.check.compressions import prune_together as numpy_prune_together
from certify.check.forward import NumpyGraph

NORMS = ("fro", "max")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (on a loaded machine a second one makes every small
    im2col wait, 50 ms instead of 10 us); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@st.composite
def joint_compressions(draw, model_and_shape):
    """A network with at least two affine layers, 8 inputs, and a compression of two or more
    of its layers (listed in any order) at a level that is often harmless."""
    model, shape = model_and_shape
    torch.manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(8, *shape, dtype=torch.float64)
    net = capture(model, x)
    chosen = draw(st.lists(st.sampled_from(net.layer_names), min_size=2, unique=True))
    kind = draw(st.sampled_from(KINDS))
    top_rank = max(min(net.layer(i).matrix.shape) for i in net.affine_indices)
    level = {"rank": st.integers(0, top_rank), "bits": st.integers(2, 16),
             "bits_per_channel": st.integers(2, 16), "prune": st.floats(0, 0.4),
             "prune_global": st.floats(0, 0.4)}[kind]
    return net, x, Compression(kind, draw(level), tuple(chosen))


JOINT = st.one_of(mlps(), cnns()).flatmap(joint_compressions)


def budgets(net, result, norm: str) -> list[float]:
    """The compressed layers' weight errors in ``norm`` (0 for the other layers)."""
    errors = {layer.name: getattr(layer, f"error_{norm}") for layer in result.layers}
    return [errors.get(name, 0.0) for name in net.layer_names]


def flipped_by_attacks(net, x, y, e: list[float], norm: str) -> torch.Tensor:
    """Inputs whose class some random or PGD perturbation ``||D_k|| <= e_k`` changes."""
    radii = [torch.full((len(x),), v, dtype=torch.float64) for v in e]
    flipped = torch.zeros(len(x), dtype=torch.bool)
    for Ds in attacks(net, x, y, radii, norm, False):
        flipped |= perturbed_logits(net, x, Ds, False).argmax(-1) != y
    return flipped


@settings(max_examples=25, deadline=None)
@given(JOINT)
def test_jointly_harmless_inputs_keep_their_class_under_the_compression_and_attacks(problem):
    net, x, c = problem
    result = compression_check(net, x, c)
    assert len(result.layers) >= 2 and "section 5" in result.note
    bad = torch.nonzero(result.harmless & result.changed)[:, 0].tolist()
    assert result.violations == 0 and not bad, f"{c}: inputs {bad} harmless yet changed"
    y = result.predictions
    small = compress(net, c)
    either = torch.zeros_like(result.harmless)
    for norm in NORMS:
        e = budgets(net, result, norm)
        for i, k in enumerate(net.affine_indices):  # the compression is inside the budgets
            E = (net.layer(k).matrix - small.layer(k).matrix).numpy()
            assert (np.linalg.norm(E) if norm == "fro" else np.abs(E).max(initial=0)) <= e[i]
        certified = multilayer_bound(net, x, e, norm).certified
        either |= certified
        broken = torch.nonzero(certified & flipped_by_attacks(net, x, y, e, norm))[:, 0]
        assert not broken.numel(), f"{c}, {norm}: an attack within the budgets flipped " \
            f"certified inputs {broken.tolist()}"
    assert torch.equal(result.all_layers, either)  # section 5: certified in either norm
    jointly = torch.zeros_like(either) if result.jointly is None else result.jointly
    assert torch.equal(result.harmless, either | jointly)


def numpy_jointly_certified(net, x, c, scale: float) -> np.ndarray:
    """Independently in numpy: the compression, its errors and the section-5 recursion with
    budgets ``scale`` times those errors, certified in either norm."""
    graph = NumpyGraph.of(net)
    values = graph.values(x.numpy())
    indices = compressed_indices(net, c)
    Ws = [graph.layer(i).matrix for i in indices]
    errors = dict(zip(indices, (W - G for W, G in zip(Ws, numpy_compress_matrices(
        Ws, c.kind, c.level)))))
    logits = values[-1]
    y = logits.argmax(axis=1)
    margins = logits[np.arange(len(y)), y][:, None] - logits
    margins[np.arange(len(y)), y] = np.inf
    certified = np.zeros(len(y), dtype=bool)
    for norm in NORMS:
        size = {"fro": np.linalg.norm, "max": lambda E: np.abs(E).max()}[norm]
        e = np.array([[scale * size(errors[i]) if i in errors else 0.0] * len(y)
                      for i in graph.affine_indices])
        bound = numpy_multilayer_bound(graph, values, y, e, norm, bias=False)
        certified |= (bound < margins).all(axis=1)
    return certified


@settings(max_examples=25, deadline=None)
@given(JOINT)
def test_joint_harmless_is_the_numpy_recomputation(problem):
    net, x, c = problem
    harmless = compression_check(net, x, c).all_layers.numpy()
    assert not (harmless & ~numpy_jointly_certified(net, x, c, 1 - 1e-6)).any()
    assert not (numpy_jointly_certified(net, x, c, 1 + 1e-6) & ~harmless).any()


def fixed_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(50, 6, dtype=torch.float64)
    return capture(model, x), x


def test_the_joint_certificate_and_the_attack_have_teeth():
    """On a fixed MLP, 6-bit quantisation of both layers: the bound vouches for most inputs,
    the attack never flips one within the budgets, yet flips certified inputs at 5 times the
    budgets, and uncertified ones within them (the certificate removed)."""
    net, x = fixed_mlp()
    result = compression_check(net, x, parse_compression("bits=6"))
    assert int(result.harmless.sum()) >= 40 and result.violations == 0
    for norm in NORMS:
        e = budgets(net, result, norm)
        certified = multilayer_bound(net, x, e, norm).certified
        assert not (flipped_by_attacks(net, x, result.predictions, e, norm) & certified).any()
        beyond = flipped_by_attacks(net, x, result.predictions, [5 * v for v in e], norm)
        assert (beyond & certified).any(), f"{norm}: 5x the budgets flips no certified input"
        uncertified = flipped_by_attacks(net, x, result.predictions, e, norm) & ~certified
        assert uncertified.any(), f"{norm}: the attack flips nothing even uncertified"


def test_several_layers_are_certified_jointly_with_or_without_radii():
    """Per layer, the same as compressing the layer alone; overall, the section-5 bound and
    the joint bound, with or without radii; per-layer harmlessness does not imply the
    section-5 bound."""
    net, x = fixed_mlp()
    lower = radii(net, x, net.affine_indices)
    for text in ("bits=3", "bits=6", "prune_global=0.2", "rank=2"):
        both = compression_check(net, x, parse_compression(text), lower)
        assert [layer.name for layer in both.layers] == ["0", "2"]
        for layer in both.layers:
            alone = compression_check(net, x, parse_compression(f"{text}@{layer.name}"), lower)
            if not text.startswith("prune_global"):  # a global threshold differs per layer
                assert torch.equal(alone.layers[0].harmless, layer.harmless)
                assert alone.layers[0].error_max == layer.error_max
        plain = compression_check(net, x, parse_compression(text))
        assert torch.equal(plain.harmless, both.harmless) and plain.layers[0].harmless is None
        per_layer = both.layers[0].harmless & both.layers[1].harmless
        assert (per_layer & ~both.all_layers).any(), text
        assert torch.equal(both.harmless, both.all_layers | both.jointly)
    one = compression_check(net, x, parse_compression("bits=6@0"))
    assert torch.equal(one.harmless, one.jointly) and "section 10" in one.note


# -- prune_global ---------------------------------------------------------------------------

TIES = st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0])
ENTRIES = st.one_of(TIES, st.floats(-4, 4, allow_subnormal=False))


@st.composite
def matrices(draw):
    """One to three float64 matrices with many tied magnitudes (signed zeros included)."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        m, n = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        out.append(torch.tensor(draw(st.lists(ENTRIES, min_size=m * n, max_size=m * n)),
                                dtype=torch.float64).reshape(m, n))
    return out


def bits(t: torch.Tensor) -> list[int]:
    return t.flatten().view(torch.int64).tolist()


RATIOS = st.one_of(st.floats(0, 1), st.sampled_from([0.0, 0.25, 0.5, 1.0]))


@settings(max_examples=60, deadline=None)
@given(matrices(), RATIOS)
def test_prune_global_is_the_backdoors_global_pruning_bit_for_bit(Ws, ratio):
    """The same bits as ``Prune(ratio, scope="global")``, as the numpy twin, and as an
    oracle that zeroes the first ``k = max{k : k / N <= ratio}`` entries sorted by
    (magnitude, position in the concatenation) and turns ``-0.0`` into ``+0.0``."""
    got = prune_together(Ws, ratio)
    flat = [v for W in Ws for v in W.flatten().tolist()]
    N = len(flat)
    k = max(j for j in range(N + 1) if j / N <= ratio)
    pruned = set(sorted(range(N), key=lambda i: (abs(flat[i]), i))[:k])
    oracle = torch.tensor([0.0 if i in pruned else flat[i] + 0.0 for i in range(N)],
                          dtype=torch.float64)
    assert bits(torch.cat([G.flatten() for G in got])) == bits(oracle)
    assert [G.shape for G in got] == [W.shape for W in Ws]
    reference = Prune(ratio, scope="global").compress_all(Ws)
    assert [bits(G) for G in got] == [bits(R) for R in reference]
    twin = numpy_prune_together([W.numpy() for W in Ws], ratio)
    assert [bits(G) for G in got] == [bits(torch.from_numpy(T)) for T in twin]
    if len(Ws) == 1:
        assert bits(got[0]) == bits(prune(Ws[0], ratio))
        assert bits(got[0]) == bits(Prune(ratio).compress(Ws[0]))


@settings(max_examples=20, deadline=None)
@given(st.one_of(mlps(), cnns()), st.floats(0, 1), st.data())
def test_prune_global_on_a_network_follows_the_affine_order(model_and_shape, ratio, data):
    """Weights rounded to quarters, so that magnitudes tie across layers: the earlier layer's
    go first, whatever order the layers are named in."""
    model, shape = model_and_shape
    net = capture(model, shape)
    for i in net.affine_indices:
        net = net.replace(i, net.layer(i).with_weight(torch.round(4 * net.layer(i).weight) / 4))
    names = data.draw(st.permutations(net.layer_names))  # the order they are named in
    small = compress(net, Compression("prune_global", ratio, tuple(names)))
    Ws = [net.layer(i).matrix for i in net.affine_indices]
    expected = Prune(ratio, scope="global").compress_all(Ws)
    assert [bits(small.layer(i).matrix) for i in net.affine_indices] == \
        [bits(G) for G in expected]
    total = sum(W.numel() for W in Ws)
    count = max(j for j in range(total + 1) if j / total <= ratio)
    assert sum(int((~keep).sum()) for keep in Prune(ratio, scope="global").masks(Ws)) == count
    one = net.layer_names[-1]  # one layer: the per-layer pruning
    alone = compress(net, Compression("prune_global", ratio, (one,))).layer(net.affine_indices[-1])
    per_layer = compress(net, Compression("prune", ratio, (one,))).layer(net.affine_indices[-1])
    assert bits(alone.matrix) == bits(per_layer.matrix)


@pytest.mark.parametrize("text,match", [
    ("prune_global=1.5", r"prune_global ratio must be a fraction in \[0, 1\]"),
    ("prune_global=-0.1", r"prune_global ratio must be a fraction in \[0, 1\]"),
    ("prune_global=half", r"prune_global must be a fraction in \[0, 1\]"),
])
def test_bad_prune_global_is_explained(text, match):
    with pytest.raises(ValueError, match=match):
        parse_compression(text)


def test_prune_global_parses_and_round_trips():
    c = parse_compression("prune_global=0.5@fc2,fc1")
    assert c == Compression("prune_global", 0.5, ("fc2", "fc1")) and str(c) == \
        "prune_global=0.5@fc2,fc1"
    with pytest.raises(ValueError, match="prune, prune_global"):
        parse_compression("svd=1")


# -- certify model --compress, then certify check ---------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """``certify model`` on a small MLP with 3-bit quantisation of both layers (one input
    changes class, the joint bound vouches for 10 of 12)."""
    tmp = tmp_path_factory.mktemp("joint")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    x = torch.randn(12, 4, 4)
    export(model, x, tmp / "model.onnx")
    np.savez(tmp / "data.npz", x=x.numpy())
    args = [str(tmp / "model.onnx"), "--data", str(tmp / "data.npz")]
    assert main(["model", *args, "--out", str(tmp / "cert.json"), "--compress", "bits=3"]) == 0
    return tmp, args, json.loads((tmp / "cert.json").read_text())


def check_refutes(tmp, args, document, capsys) -> list[str]:
    (tmp / "t.json").write_text(json.dumps(document))
    (tmp / "t.witnesses.npz").write_bytes((tmp / "cert.witnesses.npz").read_bytes())
    capsys.readouterr()
    status = main(["check", str(tmp / "t.json"), *args])
    refuted = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith("REFUTED")]
    assert status == (1 if refuted else 0)
    return refuted


def test_check_confirms_the_joint_harmless_and_refutes_a_tampered_one(certificate, capsys):
    tmp, args, document = certificate
    (entry,) = document["compression_checks"]
    harmless = entry["harmless"]
    assert entry["layers"] == ["1/Gemm", "3/Gemm"] and any(harmless) and not all(harmless)
    assert check_refutes(tmp, args, document, capsys) == []
    for target in (False, True):  # claim one uncertified input harmless, or one certified not
        k = next(i for i, h in enumerate(harmless) if h == target and i not in entry["changed"])
        tampered = json.loads(json.dumps(document))
        tampered["compression_checks"][0]["harmless"][k] = not target
        refuted = check_refutes(tmp, args, tampered, capsys)
        assert len(refuted) == 1 and f"harmless is wrong for inputs [{k}]" in refuted[0], refuted
    tampered = json.loads(json.dumps(document))
    tampered["compression_checks"][0]["harmless"] = None
    assert any("harmless and violations are due" in r
               for r in check_refutes(tmp, args, tampered, capsys))
    # Both null, as certificates before the all-layers bound wrote them: nothing claimed.
    tampered["compression_checks"][0]["violations"] = None
    assert check_refutes(tmp, args, tampered, capsys) == []


def test_check_refutes_tampered_joint_claims(certificate, capsys):
    """``jointly`` (the change made) is confirmed on the compressed model, ``strength``
    (every compression of this strength) by the numpy twin of the joint bound."""
    tmp, args, document = certificate
    (entry,) = document["compression_checks"]
    (k,) = entry["changed"]
    tampered = json.loads(json.dumps(document))
    tampered["compression_checks"][0]["jointly"][k] = True
    assert any(f"inputs [{k}] are claimed jointly harmless but the compressed model changes"
               in r for r in check_refutes(tmp, args, tampered, capsys))
    assert not any(entry["strength"])  # 3 bits: some rounding of that strength flips each
    tampered = json.loads(json.dumps(document))
    tampered["compression_checks"][0]["strength"][0] = True
    refuted = check_refutes(tmp, args, tampered, capsys)
    assert len(refuted) == 1 and "inputs [0] are claimed safe against every compression" \
        in refuted[0], refuted
