"""``certify compress`` end to end: an ONNX and a ``.pt2`` model compressed at every layer at
once, the copy written in the same format, its certificate confirmed by ``certify check``,
a tampered claim refuted, and bad input explained before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from onnx_files import export
from torch import nn

from certify.capture.export import capture
from certify.cli import main
from certify.formats.loading import load_model


def _model():
    """A small trained-looking MLP: seeded, with one wide margin and some narrow ones."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 16),
                         nn.Tanh(), nn.Linear(16, 4)).eval()


@pytest.fixture(scope="module", params=["onnx", "pt2"])
def compressed(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"compress_{request.param}")
    model = _model()
    x = torch.randn(40, 4, 4)
    path = tmp / f"model.{request.param}"
    if request.param == "onnx":
        export(model, x, path)
    else:
        torch.export.save(torch.export.export(model, (x[:1],)), path)
    np.savez(tmp / "data.npz", x=x.numpy())
    args = [str(path), "--data", str(tmp / "data.npz")]
    assert main(["compress", *args, "--to", "bits=4", "--out", str(tmp / "out")]) == 0
    document = json.loads((tmp / "out" / "compression.json").read_text())
    return tmp, args, path, document


def test_the_copy_is_the_compression_and_the_certificate_vouches_only_for_kept_classes(
        compressed):
    tmp, _, path, document = compressed
    copy = tmp / "out" / document["compressed_model"]
    assert copy.suffix == path.suffix and len(document["layers"]) == 3
    x = torch.from_numpy(np.load(tmp / "data.npz")["x"]).double()
    original = capture(load_model(path), x[:1])
    small = capture(load_model(copy), x[:1])
    before, after = original(x).argmax(-1), small(x).argmax(-1)
    changed = (before != after).nonzero()[:, 0].tolist()
    assert document["changed"] == changed
    harmless = np.array(document["harmless"])
    assert not harmless[changed].any() and document["violations"] == 0
    assert document["not_vouched"] == np.nonzero(~harmless)[0].tolist()
    # 4 bits on every layer: most inputs keep their class and are vouched for, some not.
    assert harmless.sum() >= len(x) // 2, document
    strength = np.array(document["strength"])
    assert not (strength & ~harmless).any()  # every compression of this strength: fewer


def check(tmp, args, document, capsys) -> list[str]:
    (tmp / "out" / "t.json").write_text(json.dumps(document))
    capsys.readouterr()
    status = main(["check", str(tmp / "out" / "t.json"), *args])
    refuted = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith("REFUTED")]
    assert status == (1 if refuted else 0)
    return refuted


def test_check_confirms_the_certificate_and_refutes_tampered_claims(compressed, capsys):
    tmp, args, _, document = compressed
    assert check(tmp, args, document, capsys) == []
    k = document["changed"][0]  # 4 bits change some input's class
    tampered = json.loads(json.dumps(document))
    tampered["harmless"][k] = True
    tampered["not_vouched"].remove(k)
    tampered["violations"] += 1
    assert any("claimed harmless but the compressed copy changes their class" in r
               for r in check(tmp, args, tampered, capsys))
    tampered = json.loads(json.dumps(document))
    k = document["strength"].index(False)
    tampered["strength"][k] = True
    refuted = check(tmp, args, tampered, capsys)
    assert len(refuted) == 1 and f"inputs [{k}] are claimed safe against every compression" \
        in refuted[0]
    tampered = json.loads(json.dumps(document))
    tampered["changed"] = []
    assert any("claimed changed" in r for r in check(tmp, args, tampered, capsys))


def test_a_changed_copy_is_refuted(compressed, capsys):
    tmp, args, path, document = compressed
    copy = tmp / "out" / document["compressed_model"]
    saved = copy.read_bytes()
    try:
        copy.write_bytes(path.read_bytes())  # the uncompressed model in the copy's place
        refuted = check(tmp, args, document, capsys)
        assert any("compressed model's sha256" in r for r in refuted)
        assert any("are not bits=4 of the model's" in r for r in refuted)
    finally:
        copy.write_bytes(saved)


@pytest.mark.parametrize("to, message", [
    ("svd=3", "unknown compression kind"),
    ("bits=4@nope", "unknown layer"),
    ("bits=1", "between 2 and 64"),
])
def test_bad_compressions_are_explained(compressed, to, message, capsys):
    tmp, args, _, _ = compressed
    capsys.readouterr()
    assert main(["compress", *args, "--to", to, "--out", str(tmp / "bad")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp / "bad").exists()


def test_an_out_that_is_a_file_is_refused(compressed, capsys):
    tmp, args, _, _ = compressed
    (tmp / "file").write_text("")
    assert main(["compress", *args, "--to", "bits=8", "--out", str(tmp / "file")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
