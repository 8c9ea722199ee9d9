"""Recurrent layers in model files: a ``.pt2`` archive of an ``nn.GRU`` or ``nn.LSTM``
classifier loads and is captured exactly (``torch.export`` writes its zero initial state
as ``zeros(..., dtype=torch.float32)``, which loading makes float64 like the parameters),
and ``certify model`` then ``certify check`` certify and confirm a GRU's; ONNX files from
either exporter hold a ``GRU``/``LSTM`` node, which onnx2torch cannot convert: they are
refused by name, pointing to ``.pt2``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from certify.capture import capture
from certify.certificate.schema import read_certificate
from certify.cli import main
from certify.formats.loading import ModelLoadError, load_model


class Classifier(nn.Module):
    def __init__(self, kind: str, layers: int = 2, bidirectional: bool = True):
        super().__init__()
        self.rnn = getattr(nn, kind)(3, 4, num_layers=layers, bidirectional=bidirectional,
                                     batch_first=True)
        self.head = nn.Linear(8 if bidirectional else 4, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_a_pt2_archive_of_a_recurrent_classifier_is_captured_exactly(kind, tmp_path):
    torch.manual_seed(0)
    model = Classifier(kind).eval()
    x = torch.randn(2, 5, 3)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "model.pt2")
    network = capture(load_model(str(tmp_path / "model.pt2")), x.double())
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(network(x), model.double()(x), rtol=1e-12, atol=1e-12)


def test_certify_model_and_check_on_a_gru_archive(tmp_path, capsys):
    torch.manual_seed(0)
    model = Classifier("GRU", layers=1, bidirectional=False).eval()
    x = torch.randn(5, 3, 3)
    torch.export.save(torch.export.export(model, (x[:2],)), tmp_path / "model.pt2")
    np.savez(tmp_path / "data.npz", x=x.numpy())
    args = [str(tmp_path / "model.pt2"), "--data", str(tmp_path / "data.npz")]
    assert main(["model", *args, "--out", str(tmp_path / "cert.json")]) == 0, \
        capsys.readouterr().err
    document = read_certificate(tmp_path / "cert.json")
    assert [layer["name"] for layer in document["layers"]] == ["rnn.weight_ih_l0", "head"]
    assert main(["check", str(tmp_path / "cert.json"), *args]) == 0, capsys.readouterr()


@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_recurrent_nodes_are_refused_by_name(dynamo, tmp_path):
    model, path = Classifier("GRU").eval(), tmp_path / "model.onnx"
    options = {} if dynamo else {"opset_version": 17}
    torch.onnx.export(model, (torch.randn(2, 5, 3),), path, dynamo=dynamo, **options)
    with pytest.raises(ModelLoadError, match=r"ONNX GRU nodes .*model\.pt2"):
        load_model(str(path))
