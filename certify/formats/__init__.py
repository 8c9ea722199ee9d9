"""Model files to a float64 ``torch.nn.Module``, never executing code from the file: ONNX
(both exporters, via onnx2torch and the rewrites in ``certify.formats.onnx``), ``.pt2``
archives of ``torch.export`` and state dicts with a user's factory; and back: a copy of a
model file with new weights for some of its certified layers (``write_weights``).
"""

from __future__ import annotations

from certify.formats.errors import ModelLoadError
from certify.formats.loading import file_sha256, load_model, onnx_crosscheck
from certify.formats.writing import write_weights

__all__ = ["ModelLoadError", "file_sha256", "load_model", "onnx_crosscheck", "write_weights"]
