"""Writing a model to the ONNX file the command line reads: ``export`` uses the TorchScript
exporter (``dynamo=False``) with a dynamic batch axis on the input ``x``."""

from __future__ import annotations

import torch
from torch import nn


def export(model: nn.Module, x: torch.Tensor, path) -> None:
    torch.onnx.export(model.eval(), (x[:1],), str(path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
