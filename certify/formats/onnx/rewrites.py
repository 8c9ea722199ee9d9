"""The ONNX-level rewrites before conversion: what the exporters write that onnx2torch or
certify cannot read, put back into the operators it decomposes, without changing what the
graph computes.

``_sanitise_onnx`` runs them all on the loaded ``ModelProto`` (``certify.formats.onnx.files``
converts the result):

* Node names: onnx2torch names the torch submodules after the ONNX node names and ``torch.fx``
  pastes those names into generated Python source (``getattr(self, "<name>")``), so a crafted
  node name is code. Node names that are not plain ``[A-Za-z0-9_./-]`` are replaced before
  conversion.
* Shapes computed in the graph, and Reshapes that repeat the exported batch size
  (``certify.formats.onnx.shapes``).
* ``Reshape`` with ``allowzero=1``, what the default (``torch.export``-based, "dynamo")
  exporter writes: onnx2torch refuses it; it computes the same as ``allowzero=0`` when the
  shape is a constant without zeros, so the attribute is dropped there.
* Decomposed operators become the operator again, where no other node uses the inner values:
  exact GELU before opset 20 (``x * 0.5 * (1 + erf(x / sqrt(2)))``, both exporters) becomes
  ``Gelu``, and ``nn.LayerNorm`` before opset 17 (``ReduceMean``, ``Sub``, ``Pow``,
  ``ReduceMean``, ``Add``, ``Sqrt``, ``Div``, ``Mul``, ``Add``: the legacy exporter)
  becomes ``LayerNormalization``, so that certify reads one GELU or layer norm
  (``_Patterns`` finds them).
* ``Gelu`` (opset 20) has no older version and no onnx2torch converter: it is moved to
  certify's private domain, which ``onnx.version_converter`` leaves alone when
  ``certify.formats.onnx.files`` down-converts a newer file to opset 17; a ``LayerNormalization``
  recovered in a file older than opset 17 lives there too. So does a ``Pad`` by constant
  amounts (``_static_pads``): Pad-18 and Pad-19, what both exporters write at their default
  opset, have no onnx2torch converter and no way back to opset 17. ``certify.formats.onnx.
  converted`` teaches onnx2torch that domain (``nn.GELU``, LayerNormalization-17, ``F.pad``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from certify.formats.onnx.shapes import (_constant_tensors, _copy_batch_in_reshapes, _fix_batch,
                                         _fold_shapes, _infer_value_shapes, _reshapes)

_SAFE_ONNX_NODE_NAME = re.compile(r"[A-Za-z0-9_./\-]*\Z")
_CERTIFY_DOMAIN = "certify"  # operators the down-conversion leaves alone (Gelu, ...)


def _sanitise_onnx(model) -> None:
    """Make the graph safe and convertible without changing what it computes (see the module
    docstring): safe node names, shape and integer computations folded, the batch size copied
    where Reshape repeats it, decomposed GELU and layer norms recovered, Gelu and Pads by
    constant amounts in certify's domain, and ``allowzero=1`` dropped where it makes no
    difference."""
    import onnx
    from onnx import numpy_helper

    for index, node in enumerate(model.graph.node):
        if not _SAFE_ONNX_NODE_NAME.match(node.name):
            node.name = f"{node.op_type if node.op_type.isidentifier() else 'node'}_{index}"

    _fix_batch(model)
    _fold_shapes(model)
    _infer_value_shapes(model)
    _copy_batch_in_reshapes(model)
    _gelus(model)
    _decomposed_layer_norms(model)
    _static_pads(model)
    for node in model.graph.node:
        if node.op_type == "Gelu" and node.domain in ("", "ai.onnx"):
            node.domain = _CERTIFY_DOMAIN
    if any(node.domain == _CERTIFY_DOMAIN for node in model.graph.node) and \
            all(entry.domain != _CERTIFY_DOMAIN for entry in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(_CERTIFY_DOMAIN, 1))
    constants = _constant_tensors(model)
    for node in _reshapes(model):
        for attr in list(node.attribute):
            if attr.name == "allowzero" and attr.i == 1 and node.input[1] in constants:
                shape = numpy_helper.to_array(constants[node.input[1]])
                if shape.size and bool(np.all(shape != 0)):
                    node.attribute.remove(attr)


class _Patterns:
    """An ONNX graph's nodes with their producers, users and constants, for rewriting a
    pattern of nodes into one node where no other node uses the pattern's inner values."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        self.nodes = list(model.graph.node)  # one wrapper per node, so that id() names it
        self.constants = {name: numpy_helper.to_array(t)
                          for name, t in _constant_tensors(model).items()}
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.users: dict[str, list] = {}
        for node in self.nodes:
            for name in node.input:
                self.users.setdefault(name, []).append(node)
        self.outputs = {out.name for out in model.graph.output}
        self.replaced: dict[int, Any] = {}  # id of a pattern's last node -> the new node
        self.removed: set[int] = set()

    def of(self, op_type: str) -> list:
        return [node for node in self.nodes if node.op_type == op_type]

    def made_by(self, name: str, op_type: str):
        """The node of type ``op_type`` that computes ``name``, if any."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def sole_user(self, name: str, op_type: str):
        """The one node that uses ``name``, if it has type ``op_type``."""
        found = self.users.get(name, [])
        if name in self.outputs or len(found) != 1 or found[0].op_type != op_type:
            return None
        return found[0]

    @staticmethod
    def other(node, name: str) -> str:
        """The operand of the binary ``node`` that is not ``name``."""
        a, b = node.input
        return b if a == name else a

    def scalar(self, name: str) -> float | None:
        c = self.constants.get(name)
        return float(c.reshape(())) if c is not None and c.size == 1 else None

    def is_const(self, name: str, value: float) -> bool:
        c = self.scalar(name)
        return c is not None and abs(c - value) <= 1e-6 * abs(value)

    def replace(self, pattern: list, last, node) -> None:
        """``node`` computes what ``last``, the end of ``pattern``, computed."""
        if not self.removed.intersection(map(id, pattern)):
            self.replaced[id(last)] = node
            self.removed.update(map(id, pattern))

    def apply(self) -> None:
        if self.replaced:
            kept = [self.replaced.get(id(n), n) for n in self.nodes
                    if id(n) in self.replaced or id(n) not in self.removed]
            del self.model.graph.node[:]
            self.model.graph.node.extend(kept)


def _gelus(model) -> None:
    """``x * 0.5 * (1 + erf(x / sqrt(2)))`` and ``x * 0.5 * (1 + tanh(sqrt(2 / pi) (x +
    0.044715 x^3)))``, what both exporters write for exact and tanh GELU before opset 20 (the
    products in any order), become one ``Gelu`` node (``nn.GELU``)."""
    import onnx

    g = _Patterns(model)
    for inner in g.of("Erf") + g.of("Tanh"):
        exact = inner.op_type == "Erf"
        head = (_erf_argument if exact else _tanh_argument)(g, inner.input[0])
        tail = head and g.sole_user(inner.input[0], inner.op_type) and \
            _gelu_tail(g, inner, head[0])
        if not tail:
            continue
        (x, inside), (last, outside) = head, tail
        g.replace([*inside, inner, *outside], last, onnx.helper.make_node(
            "Gelu", [x], list(last.output), name=last.name, domain=_CERTIFY_DOMAIN,
            **({} if exact else {"approximate": "tanh"})))
    g.apply()


def _erf_argument(g: _Patterns, name: str):
    """``(x, nodes)`` where ``name`` is ``x / sqrt(2)`` (or ``x * (1 / sqrt(2))``)."""
    scale = g.producer.get(name)
    if scale is not None and scale.op_type == "Div" and g.is_const(scale.input[1], 2 ** 0.5):
        return scale.input[0], [scale]
    if scale is not None and scale.op_type == "Mul":
        x = next((a for a in scale.input if g.is_const(g.other(scale, a), 2 ** -0.5)), None)
        return (x, [scale]) if x is not None else None
    return None


def _tanh_argument(g: _Patterns, name: str):
    """``(x, nodes)`` where ``name`` is ``sqrt(2 / pi) (x + 0.044715 x^3)``, the cube a
    ``Pow`` or two products."""
    scale = g.made_by(name, "Mul")
    inner = scale and next((a for a in scale.input
                            if g.is_const(g.other(scale, a), (2 / math.pi) ** 0.5)), None)
    add = inner and g.sole_user(inner, "Mul") and g.made_by(inner, "Add")
    for x in add.input if add else ():
        cubic = g.made_by(g.other(add, x), "Mul")
        w = cubic and g.sole_user(cubic.output[0], "Add") and next(
            (a for a in cubic.input if g.is_const(g.other(cubic, a), 0.044715)), None)
        cube = w and g.sole_user(w, "Mul") and g.producer.get(w)
        if not cube:
            continue
        if cube.op_type == "Pow" and cube.input[0] == x and g.is_const(cube.input[1], 3.0):
            return x, [cube, cubic, add, scale]
        square = cube.op_type == "Mul" and x in cube.input and \
            g.made_by(g.other(cube, x), "Mul")
        if square and list(square.input) == [x, x] and g.sole_user(square.output[0], "Mul"):
            return x, [square, cube, cubic, add, scale]
    return None


def _gelu_tail(g: _Patterns, inner, x: str):
    """``(last, nodes)`` where ``x * 0.5 * (1 + inner)`` ends at ``last``, if it does."""
    one = g.sole_user(inner.output[0], "Add")
    first = one and g.is_const(g.other(one, inner.output[0]), 1.0) and \
        g.sole_user(one.output[0], "Mul")
    if not first:
        return None
    factor = g.other(first, one.output[0])
    if factor == x or g.is_const(factor, 0.5):  # x (1 + inner) 0.5, or 0.5 (1 + inner) x
        last = g.sole_user(first.output[0], "Mul")
        rest = last and g.other(last, first.output[0])
        if last and (g.is_const(rest, 0.5) if factor == x else rest == x):
            return last, [one, first, last]
        return None
    half = g.made_by(factor, "Mul")  # (0.5 x) (1 + inner)
    if half is not None and g.sole_user(factor, "Mul") and x in half.input and \
            g.is_const(g.other(half, x), 0.5):
        return first, [half, one, first]
    return None


def _decomposed_layer_norms(model) -> None:
    """``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * gamma + beta`` over the last
    axis, what the legacy exporter writes for ``nn.LayerNorm`` before opset 17, becomes one
    ``LayerNormalization`` node (in certify's domain, which files before opset 17 have too)."""
    import onnx

    g = _Patterns(model)

    def last_axis_mean(node) -> bool:
        axes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        keep = axes.get("keepdims", 1)
        axes = axes.get("axes", g.constants.get(node.input[1]) if len(node.input) > 1 else None)
        return axes is not None and list(np.asarray(axes).reshape(-1)) == [-1] and keep == 1

    for sub in g.of("Sub"):
        x, mean_of_x = sub.input
        mean = g.made_by(mean_of_x, "ReduceMean")
        if mean is None or mean.input[0] != x or not last_axis_mean(mean) or \
                not g.sole_user(mean_of_x, "Sub"):
            continue
        users = g.users.get(sub.output[0], [])
        square = next((n for n in users if n.op_type == "Pow" and n.input[0] == sub.output[0]
                       and g.is_const(n.input[1], 2.0)), None)
        divide = next((n for n in users if n.op_type == "Div" and n.input[0] == sub.output[0]),
                      None)
        if len(users) != 2 or square is None or divide is None:
            continue
        variance = g.sole_user(square.output[0], "ReduceMean")
        shift = variance and last_axis_mean(variance) and \
            g.sole_user(variance.output[0], "Add")
        eps = shift and g.scalar(g.other(shift, variance.output[0]))
        root = eps is not None and eps > 0 and g.sole_user(shift.output[0], "Sqrt")
        if not root or divide.input[1] != root.output[0] or \
                not g.sole_user(root.output[0], "Div"):
            continue
        scale = g.sole_user(divide.output[0], "Mul")
        gamma = scale and g.other(scale, divide.output[0])
        if not scale or gamma not in g.constants or g.constants[gamma].ndim != 1:
            continue
        pattern, last, inputs = [mean, sub, square, variance, shift, root, divide, scale], \
            scale, [x, gamma]
        add = g.sole_user(scale.output[0], "Add")
        beta = add and g.other(add, scale.output[0])
        if add and beta in g.constants and g.constants[beta].shape == g.constants[gamma].shape:
            pattern, last, inputs = pattern + [add], add, inputs + [beta]
        g.replace(pattern, last, onnx.helper.make_node(
            "LayerNormalization", inputs, list(last.output), name=last.name,
            domain=_CERTIFY_DOMAIN, axis=-1, epsilon=eps))
    g.apply()


def _static_pads(model) -> None:
    """``Pad`` (opset 11 on) whose amounts, constant value and axes are constants becomes
    certify's ``Pad``, with them as attributes (``pads`` over every axis of the input,
    ``mode``, ``value``, as in Pad-2), which ``certify.formats.onnx.converted.ConstantPad``
    computes with ``F.pad`` by integer amounts. onnx2torch reads the amounts of Pad-11 and Pad-13 from a tensor (``pads.tolist()``),
    which ``torch.export`` cannot capture, and has no converter for Pad-18 and Pad-19 (what
    both exporters write at their default opset), which ``onnx.version_converter`` cannot
    take back to opset 17 either (Pad-18 added ``axes``); the down-conversion leaves certify's
    domain alone. Pad-18's ``axes`` need the input's rank, which shape inference gives."""
    import onnx
    from onnx import numpy_helper

    constants = {name: numpy_helper.to_array(t) for name, t in _constant_tensors(model).items()}
    ranks = {info.name: len(info.type.tensor_type.shape.dim)
             for info in [*model.graph.input, *model.graph.value_info]
             if info.type.tensor_type.HasField("shape")}
    for node in model.graph.node:
        if node.op_type != "Pad" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue  # Pad-2 has its amounts as attributes already
        x, pads, value, axes = [*node.input, "", ""][:4]
        if not pads or any(name and name not in constants for name in (pads, value, axes)):
            continue  # amounts computed in the graph: left to onnx2torch
        amounts = constants[pads].astype(np.int64).reshape(-1)
        if axes:  # amounts for these axes only: [begins, ends]
            chosen, rank = constants[axes].astype(np.int64).reshape(-1), ranks.get(x)
            if rank is None or amounts.size != 2 * chosen.size:
                continue
            full = np.zeros(2 * rank, dtype=np.int64)
            full[chosen % rank], full[rank + chosen % rank] = np.split(amounts, 2)
            amounts = full
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
        fill = float(constants[value].reshape(-1)[0]) if value and constants[value].size else 0.0
        node.CopyFrom(onnx.helper.make_node(
            "Pad", [x], list(node.output), name=node.name, domain=_CERTIFY_DOMAIN,
            pads=amounts.tolist(), mode=mode, value=fill))
