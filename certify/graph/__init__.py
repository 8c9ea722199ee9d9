"""A network as a graph of operators (THEORY.md section 8): the ``Graph`` and its nodes, the
operators with all their rules (``certify.graph.operators``), the validation of what callers
pass in (``inputs``) and the device the torch computation runs on (``devices``).

Imports only ``certify.closed_forms`` (rigorous singular values).
"""

from __future__ import annotations

from certify.graph.devices import DeviceError
from certify.graph.graph import Graph, Node
from certify.graph.inputs import InputError, InputTypeError

__all__ = ["DeviceError", "Graph", "InputError", "InputTypeError", "Node"]
