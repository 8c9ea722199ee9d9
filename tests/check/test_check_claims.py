"""`certify check` verifies every claim of a certificate: every tampered field is refuted
(exit status 1), a malformed document is refused (exit status 2), and hypothesis-made
mutations of a real certificate never pass silently or crash."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from certified_models import certify
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from certify.cli import main


@pytest.fixture(scope="module", params=["mlp", "cnn", "resnet"])
def certified(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    args = certify(tmp, request.param)
    return tmp, args, json.loads((tmp / "cert.json").read_text())


def run_check(tmp, args, document=None, text=None, capsys=None) -> int:
    """``certify check`` on ``document`` (or raw ``text``) with the real witnesses."""
    path = tmp / "tampered.json"
    path.write_text(text if text is not None else json.dumps(document))
    (tmp / "tampered.witnesses.npz").write_bytes((tmp / "cert.witnesses.npz").read_bytes())
    status = main(["check", str(path), *args])
    if capsys is not None:
        captured = capsys.readouterr()
        assert "Traceback" not in captured.out + captured.err
    return status


def test_every_model_certifies_and_checks(certified, capsys):
    tmp, args, document = certified
    assert main(["check", str(tmp / "cert.json"), *args]) == 0
    out = capsys.readouterr().out
    assert "0 refuted" in out
    assert {"labels", "compression_checks", "multilayer"} <= set(document)


# -- every field that carries a number or a verdict, tampered ------------------------------

def _hidden(document):
    return document["layers"][0]


def _last(document):
    return document["layers"][-1]


def _with_witness(claims) -> int:
    return next(i for i, v in enumerate(claims["upper"]) if v is not None)


def _t_lower(d):
    c = _hidden(d)["fro"]
    i = _with_witness(c)
    c["lower"][i] = 2 * c["upper"][i]


def _t_lower_last(d):
    c = _last(d)["max"]
    c["lower"][0] = 1.01 * c["lower"][0] / (1 - 1e-9)  # beyond the exact radius


def _t_upper(d):
    c = _hidden(d)["max"]
    i = _with_witness(c)
    c["upper"][i] *= 0.5


def _t_upper_null(d):
    c = _hidden(d)["fro"]
    c["upper"] = [None] * len(c["upper"])


def _t_estimate(d):
    c = _hidden(d)["fro"]
    c["estimate"][0] = 1.5 * c["estimate"][0]


def _t_method_hidden(d):
    _hidden(d)["fro"]["method"] = "exact"


def _t_method_last(d):
    _last(d)["max"]["method"] = "lipschitz+crown"


def _t_rank_unsafe(d):
    _hidden(d)["fro"]["threshold"]["rank"] = 0


def _t_rank_not_minimal(d):
    _hidden(d)["fro"]["threshold"]["rank"] += 1  # at full rank: a rank beyond the matrix's


def _t_bits_unsafe(d):
    _hidden(d)["max"]["threshold"]["bits"] = 2


def _t_bits_not_minimal(d):
    t = _hidden(d)["max"]["threshold"]
    t["bits"] = 64 if t["bits"] is None else t["bits"] + 1


def _t_bits_per_channel(d):
    t = _hidden(d)["fro"]["threshold"]
    t["bits_per_channel"] = 2


def _t_prune_unsafe(d):
    _hidden(d)["max"]["threshold"]["prune_ratio"] = 1.0


def _t_prune_not_maximal(d):
    t = _hidden(d)["fro"]["threshold"]
    size = int(np.prod(_hidden(d)["shape"]))
    t["prune_ratio"] = max(0.0, round(t["prune_ratio"] * size) - 1) / size \
        if t["prune_ratio"] > 0 else 0.0
    if t["prune_ratio"] == 0.0:  # nothing to take away: claim too much instead
        t["prune_ratio"] = 1.0


def _t_shape(d):
    _hidden(d)["shape"][0] += 1


def _t_name(d):
    _hidden(d)["name"] = "not-a-layer"


def _t_prediction(d):
    d["predictions"][0] = (d["predictions"][0] + 1) % 3


def _t_bias(d):
    d["bias_perturbed"] = not d["bias_perturbed"]


def _t_model_hash(d):
    d["model_sha256"] = "0" * 64


def _t_inputs_hash(d):
    d["inputs_sha256"] = "f" * 64


def _t_multilayer_budget(d):
    c = d["multilayer"]["fro"]
    c["uniform_budget"][0] += 1.0
    c["min"] = min(c["uniform_budget"])


def _t_multilayer_min(d):
    d["multilayer"]["max"]["min"] *= 0.5


def _t_accuracy(d):
    d["labels"]["accuracy"] = (d["labels"]["accuracy"] + 0.5) % 1.0


def _t_misclassified(d):
    wrong = d["labels"]["misclassified"]
    d["labels"]["misclassified"] = wrong[1:] if wrong else [0]


def _t_labels_hash(d):
    d["labels"]["labels_sha256"] = "a" * 64


def _t_changed(d):
    for entry in d["compression_checks"]:  # the tampering: nothing changed, all safe
        entry["changed"] = []
        entry["harmless"] = [True] * len(d["predictions"])
        entry["violations"] = 0
        entry["harmless_per_layer"] = {k: [True] * len(v)
                                       for k, v in entry["harmless_per_layer"].items()}


def _t_joint_harmless(d):
    """A compression of several layers: one input the all-layers bound does not certify is
    claimed harmless (or, where it certifies every input, one is claimed not to be)."""
    harmless = next(e for e in d["compression_checks"] if len(e["layers"]) > 1)["harmless"]
    k = harmless.index(False) if False in harmless else 0
    harmless[k] = not harmless[k]


def _t_violations(d):
    d["compression_checks"][0]["violations"] = 3


def _t_weight_error(d):
    errors = d["compression_checks"][0]["weight_error"]
    next(iter(errors.values()))["max"] *= 0.5


def _t_harmless_per_layer(d):
    per_layer = d["compression_checks"][0]["harmless_per_layer"]
    name = next(iter(per_layer))
    per_layer[name] = [not v for v in per_layer[name]]


def _t_compressed_layers(d):
    d["compression_checks"][0]["layers"] = ["0"]


def _t_jointly(d):
    """One input whose class the compression changes, claimed jointly harmless."""
    entry = next(e for e in d["compression_checks"] if e["changed"] and e["jointly"])
    entry["jointly"][entry["changed"][0]] = True


def _t_strength(d):
    """One input claimed safe against every compression of a strength where it is not."""
    entry = next(e for e in d["compression_checks"]
                 if e["strength"] is not None and not all(e["strength"]))
    entry["strength"][entry["strength"].index(False)] = True


def _t_whole_model_bits(d):
    """The input with the fewest bits claims two fewer (never certified at 2 bits here)."""
    for kind in ("bits", "bits_per_channel"):
        bits = d["whole_model"][kind]
        k = bits.index(min(b for b in bits if b is not None))
        bits[k] = max(2, bits[k] - 2)


def _t_whole_model_prune_global(d):
    ratios = d["whole_model"]["prune_global"]
    ratios[0] = min(1.0, 4 * ratios[0] + 0.2)
    d["whole_model"]["threshold"]["prune_global"] = min(r for r in ratios if r > 0)


def _t_whole_model_relative(d):
    t = d["whole_model"]["relative"]
    t[0] = 10 * t[0] + 0.1
    d["whole_model"]["threshold"]["relative"] = min(v for v in t if v > 0)


def _t_whole_model_threshold(d):
    d["whole_model"]["threshold"]["bits"] = 2


TAMPERS = {name[3:]: f for name, f in globals().items() if name.startswith("_t_")}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_every_tampered_field_is_refuted(certified, tamper, capsys):
    tmp, args, document = certified
    document = copy.deepcopy(document)
    TAMPERS[tamper](document)
    if tamper == "compressed_layers" and document["compression_checks"][0]["layers"] == \
            json.loads((tmp / "cert.json").read_text())["compression_checks"][0]["layers"]:
        document["compression_checks"][0]["layers"] = ["5"]
    assert run_check(tmp, args, document, capsys=capsys) == 1


def test_the_tampering_tests_cover_every_claim_field(certified):
    """A new field in the certificate needs a tampering test here."""
    _, _, document = certified
    covered = {"lower", "upper", "estimate", "method", "rank", "bits", "bits_per_channel",
               "prune_ratio", "shape", "name", "predictions", "bias_perturbed", "model_sha256",
               "inputs_sha256", "uniform_budget", "min", "accuracy", "misclassified",
               "labels_sha256", "changed", "harmless", "violations", "weight_error",
               "harmless_per_layer", "layers", "jointly", "strength", "whole_model",
               "prune_global", "relative"}
    # checked by the schema; ``device`` is provenance (numbers agree across devices)
    free_text = {"format", "tool_version", "note", "compression", "device"}
    structure = {"fro", "max", "threshold", "multilayer", "labels", "compression_checks",
                 "spectral"}

    def keys(value):
        if isinstance(value, dict):
            for key, item in value.items():
                yield key
                yield from keys(item)
        elif isinstance(value, list):
            for item in value:
                yield from keys(item)

    names = {layer["name"] for layer in document["layers"]}  # keys of per-layer maps
    assert set(keys(document)) - names <= covered | free_text | structure


# -- malformed documents: refused with a clear message -------------------------------------

MALFORMED = {
    "not json": "{not json",
    "binary": "\x00\xff\x13",
    "empty": "",
    "a list": "[]",
    "NaN": None,  # filled in from the document below
    "unknown format": None,
    "multilayer deleted": None,
    "predictions deleted": None,
    "lower shortened": None,
    "threshold deleted": None,
    "bad method": None,
}


def _malformed(name: str, document: dict) -> str:
    d = copy.deepcopy(document)
    if name == "NaN":
        return json.dumps(d).replace(json.dumps(d["layers"][0]["fro"]["lower"][0]), "NaN", 1)
    if name == "unknown format":
        d["format"] = "certify/weight-radii/2"
    elif name == "multilayer deleted":
        del d["multilayer"]
    elif name == "predictions deleted":
        del d["predictions"]
    elif name == "lower shortened":
        d["layers"][0]["max"]["lower"].pop()
    elif name == "threshold deleted":
        del d["layers"][-1]["fro"]["threshold"]
    elif name == "bad method":
        d["layers"][0]["fro"]["method"] = "trust me"
    return json.dumps(d)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_documents_are_refused_with_a_message(certified, name, capsys):
    tmp, args, document = certified
    text = MALFORMED[name] if MALFORMED[name] is not None else _malformed(name, document)
    assert run_check(tmp, args, text=text) == 2
    err = capsys.readouterr().err
    assert err.startswith("certify: ") and "Traceback" not in err and len(err.splitlines()) == 1


def test_missing_or_broken_witnesses_are_input_errors(certified, tmp_path, capsys):
    tmp, args, document = certified
    (tmp_path / "c.json").write_text(json.dumps(document))
    assert main(["check", str(tmp_path / "c.json"), *args]) == 2
    assert "witnesses" in capsys.readouterr().err
    (tmp_path / "c.witnesses.npz").write_bytes(b"not a zip")
    assert main(["check", str(tmp_path / "c.json"), *args]) == 2
    assert "cannot read the witnesses" in capsys.readouterr().err


def test_check_with_other_limit_says_so(certified, capsys):
    tmp, args, _ = certified
    assert main(["check", str(tmp / "cert.json"), *args, "--limit", "5"]) == 2
    assert "the certificate covers 12 inputs but the data has 5" in capsys.readouterr().err


def test_check_without_labels_refutes_the_accuracy(certified, tmp_path, capsys):
    tmp, args, _ = certified
    x = np.load(tmp / "data.npz")["x"]
    np.save(tmp_path / "x.npy", x)  # the same inputs without y, as a .npy array
    data = args.index("--data") + 1
    plain = args[:data] + [str(tmp_path / "x.npy")] + args[data + 1:]
    assert main(["check", str(tmp / "cert.json"), *plain]) == 1
    assert "data has no y" in capsys.readouterr().out


# -- hypothesis: mutations of a real certificate --------------------------------------------

def _paths(value, path=()):
    """Every (path, value) in the document."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*path, i))


def _set(document, path, value):
    target = document
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value


_DELETE = object()
# Sections a certificate may leave out; "device" is absent from certificates made before it.
OPTIONAL = {("labels",), ("compression_checks",), ("device",)}
OTHER_TYPES = ["a string", {"k": 1}, [1, "x"]]


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_certificates_never_pass_or_crash(certified, data, capsys):
    """Deleting a key, or giving a value another JSON type, is refused (exit 2); dropping
    a list entry is refused or refuted; never a silent pass, never an internal error."""
    tmp, args, document = certified
    paths = [p for p, _ in _paths(document) if p]
    path = data.draw(st.sampled_from(paths))
    d = copy.deepcopy(document)
    value = _value(d, path)
    kind = data.draw(st.sampled_from(["delete", "retype", "shorten"]))
    if kind == "delete" and isinstance(path[-1], str) and path not in OPTIONAL:
        _set(d, path, _DELETE)
        # A layer's entry of a per-layer map is a claim about that layer: refuted.
        expected = {1, 2} if path[-2:-1] in (("weight_error",), ("harmless_per_layer",)) else {2}
    elif kind == "shorten" and isinstance(value, list) and value and \
            path != ("compression_checks",):  # dropping a whole check drops its claims
        value.pop()
        expected = {1, 2}
    else:
        kind = "retype"
        options = [o for o in OTHER_TYPES if type(o) is not type(value)]
        _set(d, path, data.draw(st.sampled_from(options)))
        expected = {2}
    assert run_check(tmp, args, d, capsys=capsys) in expected, (kind, path)


def _value(document, path):
    for key in path:
        document = document[key]
    return document
