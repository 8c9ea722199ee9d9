"""Any ``torch.nn.Module`` to a ``certify.graph.Graph`` through ``torch.export``: the ATen
operators read as graph operators (``aten``, ``transformers``, ``operands``) and the graph
built from them (``build``); THEORY.md section 8.
"""

from __future__ import annotations

from certify.capture.build import UnsupportedModelError
from certify.capture.export import capture, float64_copy

__all__ = ["UnsupportedModelError", "capture", "float64_copy"]
