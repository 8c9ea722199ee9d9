"""Read an ONNX file and convert it to a ``torch.fx.GraphModule``, never running code from it.

An ONNX file is protobuf data; what it computes is converted by onnx2torch, in these steps:

* ``onnx.checker`` (full check, with shape inference) validates the file first.
* Node names: onnx2torch names the torch submodules after the ONNX node names and ``torch.fx``
  pastes those names into generated Python source (``getattr(self, "<name>")``), so a crafted
  node name is code. Node names that are not plain ``[A-Za-z0-9_./-]`` are replaced before
  conversion.
* Shapes computed in the graph: the legacy exporter writes ``x.flatten(2)`` as
  ``Reshape(x, Concat(Slice(Shape(x)), [-1]))``, which onnx2torch computes from tensors and
  ``torch.export`` cannot capture. Where shape inference finds ``x``'s shape static, ``Shape``
  and the computations on it with constants alone become constants (a symbolic batch size,
  ``dynamic_axes``, is taken as 1 for this); the value shapes are inferred again (onnx2torch
  builds ``nn.LayerNorm`` from them).
* What the default (``torch.export``-based, "dynamo") exporter writes: ``Reshape`` with
  ``allowzero=1`` (onnx2torch refuses it; it computes the same as ``allowzero=0`` when the
  shape is a constant without zeros, so the attribute is dropped there), and ``Reshape``
  shapes that repeat the graph's static batch size (``nn.Flatten`` becomes ``Reshape(x,
  [4, 784])`` for an export with 4 inputs). Where ONNX shape inference shows that the first
  axis of such a Reshape's input is the graph input's batch axis, that entry becomes ``0``
  (copy the input's axis): the same at the exported batch size, and the converted module
  then takes any number of inputs.
* Decomposed operators become the operator again, where no other node uses the inner values:
  exact GELU before opset 20 (``x * 0.5 * (1 + erf(x / sqrt(2)))``, both exporters) becomes
  ``Gelu``, and ``nn.LayerNorm`` before opset 17 (``ReduceMean``, ``Sub``, ``Pow``,
  ``ReduceMean``, ``Add``, ``Sqrt``, ``Div``, ``Mul``, ``Add``: the legacy exporter)
  becomes ``LayerNormalization``, so that certify reads one GELU or layer norm.
* Opsets: onnx2torch 1.5.15 converts the versions of its operators up to opset 17
  (GreaterOrEqual and LessOrEqual-16 aside) and misses newer ones (AveragePool-19,
  Reshape-19, ...): files with a newer opset that fail to convert are down-converted to opset
  17 with ``onnx.version_converter`` and tried again. ``Gelu`` (opset 20, what both exporters
  write for ``nn.GELU`` at their default opset) has no older version and no onnx2torch
  converter: it is moved to a private domain that the down-conversion leaves alone and
  converted to ``nn.GELU``; a ``LayerNormalization`` recovered in a file older than opset 17
  lives there too and is converted as LayerNormalization-17.
* After conversion: onnx2torch's ``OnnxReshape`` reads its target shape from a tensor and
  branches on its values (``torch.any(shape == 0)``), which ``torch.export`` cannot capture.
  Where the shape is a constant, the module is replaced by :class:`ConstantReshape`, the same
  reshape with the shape as Python integers, so the loaded module can be exported again.
  ``MatMul`` by a constant matrix and the ``Add`` of a constant bias after it (what both
  exporters write for ``nn.Linear`` on tokens) become one ``nn.Linear`` named after the
  MatMul node: certificates name the layer after its node, and its bias is the layer's.

:func:`onnx_external_files` lists the external data files a model refers to (the certificate's
hash covers them). The converted module is compared with onnxruntime by
:func:`certify.onnx_crosscheck.onnx_crosscheck`.
"""

from __future__ import annotations

import math
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from certify.load_errors import ModelLoadError, first_line

_ONNX2TORCH_OPSET = 17
_SAFE_ONNX_NODE_NAME = re.compile(r"[A-Za-z0-9_./\-]*\Z")
_BATCH = "certify_batch"  # the symbolic batch size that shape inference propagates
_CERTIFY_DOMAIN = "certify"  # operators the down-conversion leaves alone (Gelu, ...)


def load_onnx_file(path: Path) -> torch.fx.GraphModule:
    """The ONNX model at ``path`` as a torch module (float32, as in the file)."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ModelLoadError(
            f"{path.name} is not a readable ONNX file ({type(exc).__name__}: "
            f"{first_line(exc)}); it may be truncated or corrupt, or its external data file "
            "is missing: export it again with torch.onnx.export"
        ) from None
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{path.name} fails the ONNX checker ({first_line(exc)}); it may be truncated or "
            "corrupt: export it again with torch.onnx.export"
        ) from None
    if len(model.graph.node) == 0:
        raise ModelLoadError(f"{path.name} has an empty ONNX graph")

    _sanitise_onnx(model)
    onnx2torch = _import_onnx2torch()
    opset = _default_opset(model)
    try:
        return _converted(onnx2torch.convert(model))
    except NotImplementedError as exc:
        first_error = exc
    except Exception as exc:
        raise ModelLoadError(
            f"onnx2torch cannot convert {path.name}: {type(exc).__name__}: {first_line(exc)}"
        ) from None

    if opset is not None and opset > _ONNX2TORCH_OPSET:
        from onnx import version_converter

        try:
            older = version_converter.convert_version(model, _ONNX2TORCH_OPSET)
            _sanitise_onnx(older)
            return _converted(onnx2torch.convert(older))
        except Exception as exc:
            first_error = exc
    raise ModelLoadError(
        f"onnx2torch cannot convert {path.name} (opset {opset}): {first_line(first_error)}; "
        f"certify converts standard ONNX operators up to opset {_ONNX2TORCH_OPSET}: export with "
        f"torch.onnx.export(model, (x,), path, opset_version={_ONNX2TORCH_OPSET}, dynamo=False), "
        "or export to .pt2 with torch.export.save"
    ) from None


def onnx_external_files(path: Path) -> list[str]:
    """Names of the external data files an ONNX model refers to (relative, inside its folder)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return []  # not readable as ONNX: loading reports that, with a clear message
    names = set()
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            if Path(location).is_absolute() or ".." in Path(location).parts:
                raise ModelLoadError(f"{path.name}: external data location {location!r} "
                                     "points outside the model's folder")
            names.add(location)
    return sorted(names)


# --------------------------------------------------------------------------------------------
# before conversion: the ONNX graph
# --------------------------------------------------------------------------------------------


def _default_opset(model) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def _sanitise_onnx(model) -> None:
    """Make the graph safe and convertible without changing what it computes (see the module
    docstring): safe node names, shape computations folded, the batch size copied where
    Reshape repeats it, decomposed GELU and layer norms recovered, Gelu in certify's domain,
    and ``allowzero=1`` dropped where it makes no difference."""
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


def _constant_tensors(model) -> dict[str, Any]:
    """Initializers and the outputs of Constant nodes and of Identity nodes of constants
    (the legacy exporter's copies of shared initializers), by name (TensorProto)."""
    constants = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = attr.t
        elif node.op_type == "Identity" and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]
    return constants


def _graph_input(model):
    """The graph's one input that is no initializer (``None`` unless there is exactly one)."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    return inputs[0] if len(inputs) == 1 and inputs[0].type.HasField("tensor_type") else None


def _fix_batch(model) -> None:
    """A symbolic batch size (``dynamic_axes``) becomes 1 while the graph is rewritten, so
    that shape computations fold (a batch-1 Reshape then copies the batch like any other);
    the file and its onnxruntime cross-check keep the symbol."""
    item = _graph_input(model)
    dims = item.type.tensor_type.shape.dim if item is not None else []
    if dims and not dims[0].HasField("dim_value") and \
            all(d.HasField("dim_value") for d in dims[1:]):
        dims[0].dim_value = 1


def _fold_shapes(model) -> None:
    """``Shape`` of a tensor whose shape inference finds static, and every computation on it
    with constants alone (``Slice``, ``Gather``, ``Concat``, ...), become initializers: the
    legacy exporter writes ``x.flatten(2)`` as ``Reshape(x, Concat(Slice(Shape(x)), [-1]))``,
    which onnx2torch computes from tensors and ``torch.export`` cannot capture. The batch
    size the file fixes is then copied where a Reshape repeats it, like any other."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return  # no shapes to go by: the graph stays as the file has it
    static = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input]:
        dims = info.type.tensor_type.shape.dim if info.type.HasField("tensor_type") else []
        if info.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            static[info.name] = [d.dim_value for d in dims]
    opsets = {entry.domain: entry.version for entry in model.opset_import}
    constants = {name: numpy_helper.to_array(t) for name, t in _constant_tensors(model).items()}
    folded, kept = set(), []
    for node in model.graph.node:
        inputs = [name for name in node.input if name]
        values = None
        if node.op_type == "Shape" and node.domain in ("", "ai.onnx") and inputs[0] in static:
            attrs = {a.name: a.i for a in node.attribute}
            values = [np.array(static[inputs[0]][attrs.get("start", 0):attrs.get("end")],
                               dtype=np.int64)]
        elif folded.intersection(inputs) and all(name in constants for name in inputs):
            try:
                values = ReferenceEvaluator(node, opsets=opsets).run(
                    None, {name: constants[name] for name in inputs})
            except Exception:  # an operator the evaluator lacks: left to onnx2torch
                pass
        if values is None:
            kept.append(node)
            continue
        for name, value in zip(node.output, values):
            constants[name] = value
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        folded.update(node.output)
    if folded:
        del model.graph.node[:]
        model.graph.node.extend(kept)
        _prune(model)


def _infer_value_shapes(model) -> None:
    """The shapes of the graph's values as shape inference finds them (after folding):
    onnx2torch builds some modules from them (``nn.LayerNorm`` for a LayerNormalization
    with constant weights) and reads an empty shape where the file has none."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return  # the file's own shapes, if any, stay
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)


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


def _prune(model) -> None:
    """Drop the nodes whose outputs nothing uses (what folding left behind)."""
    needed = {out.name for out in model.graph.output}
    kept = []
    for node in reversed(model.graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))


def _is_reshape(node) -> bool:
    return node.op_type == "Reshape" and node.domain in ("", "ai.onnx") and len(node.input) >= 2


def _reshapes(model) -> list:
    return [node for node in model.graph.node if _is_reshape(node)]


def _copy_batch_in_reshapes(model) -> None:
    """Where a Reshape's constant shape starts with the graph's static batch size and its
    input's first axis is the batch axis, make that entry 0 (copy the input's axis).

    The batch axis is found by shape inference on a copy whose input has a symbolic batch
    size: an axis whose inferred size is that symbol. Each rewritten Reshape passes the symbol
    on, so inference is repeated until nothing changes.
    """
    import onnx
    from onnx import numpy_helper

    graph_input = _graph_input(model)
    dims = graph_input.type.tensor_type.shape.dim if graph_input is not None else []
    if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value < 1:
        return
    batch = dims[0].dim_value
    done: set[int] = set()
    for _ in range(len(_reshapes(model))):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        for item in [*probe.graph.input, *probe.graph.output]:
            if item.name == graph_input.name:
                item.type.tensor_type.shape.dim[0].dim_param = _BATCH
            elif item.type.HasField("tensor_type"):
                item.type.tensor_type.ClearField("shape")
        del probe.graph.value_info[:]
        try:
            inferred = onnx.shape_inference.infer_shapes(probe)
        except Exception:
            return  # no shapes to go by: the Reshapes stay as the file has them
        on_batch = {
            info.name for info in [*inferred.graph.value_info, *inferred.graph.input]
            if info.type.HasField("tensor_type") and info.type.tensor_type.shape.dim
            and info.type.tensor_type.shape.dim[0].dim_param == _BATCH
        }
        constants = _constant_tensors(model)
        changed = False
        for index, node in enumerate(model.graph.node):
            if index in done or not _is_reshape(node) or node.input[0] not in on_batch \
                    or node.input[1] not in constants:
                continue
            shape = numpy_helper.to_array(constants[node.input[1]])
            allowzero = any(a.name == "allowzero" and a.i == 1 for a in node.attribute)
            if shape.ndim != 1 or shape.size == 0 or int(shape[0]) != batch or (
                    allowzero and bool(np.any(shape == 0))):
                continue
            copied = shape.copy()
            copied[0] = 0
            name = f"{node.input[1]}_certify_batch_{index}"
            model.graph.initializer.append(numpy_helper.from_array(copied, name))
            node.input[1] = name
            for attr in [a for a in node.attribute if a.name == "allowzero"]:
                node.attribute.remove(attr)  # allowzero=0: the 0 copies the input's axis
            done.add(index)
            changed = True
        if not changed:
            return


# --------------------------------------------------------------------------------------------
# onnx2torch and its output
# --------------------------------------------------------------------------------------------

_onnx2torch_module: Any = None


def _import_onnx2torch():
    """Import onnx2torch without importing torchvision.

    onnx2torch imports torchvision at import time, only for its NonMaxSuppression and RoiAlign
    converters. The PyPI torchvision wheel that matches torch 2.13.0 is linked against CUDA
    torch and fails to import next to the CPU build (``operator torchvision::nms does not
    exist``). certify certifies neither op, so unless torchvision is already imported the
    import sees a stand-in whose functions raise.
    """
    global _onnx2torch_module
    if _onnx2torch_module is not None:
        return _onnx2torch_module
    if "onnx2torch" in sys.modules or "torchvision" in sys.modules:
        import onnx2torch
    else:
        def unavailable(*args, **kwargs):
            raise ModelLoadError(
                "this ONNX model uses NonMaxSuppression or RoiAlign, which need torchvision; "
                "certify does not support them"
            )

        stand_in = types.ModuleType("torchvision")
        ops = types.ModuleType("torchvision.ops")
        ops.nms = ops.roi_align = ops.box_convert = unavailable
        stand_in.ops = ops
        saved = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.ops")}
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stand_in, ops
        try:
            import onnx2torch
        finally:
            for name, previous in saved.items():
                if previous is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = previous
    _register_certify_domain()
    _onnx2torch_module = onnx2torch
    return onnx2torch


def _register_certify_domain() -> None:
    """Teach onnx2torch certify's domain: ``Gelu`` as ``nn.GELU`` with the node's
    ``approximate``, ``LayerNormalization`` as onnx2torch's LayerNormalization-17."""
    from onnx2torch.node_converters.registry import add_converter, get_converter
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    def convert(node, graph):  # the converter signature of onnx2torch
        approximate = node.attributes.get("approximate", "none")
        if approximate not in ("none", "tanh"):
            raise NotImplementedError(f"Gelu(approximate={approximate!r})")
        return OperationConverterResult(
            torch_module=torch.nn.GELU(approximate=approximate),
            onnx_mapping=onnx_mapping_from_node(node=node),
        )

    for op_type, converter in (("Gelu", convert),
                               ("LayerNormalization", get_converter("LayerNormalization", 17))):
        try:
            add_converter(operation_type=op_type, version=1, domain=_CERTIFY_DOMAIN)(converter)
        except ValueError:  # registered before (onnx2torch was imported again)
            pass


class ConstantReshape(torch.nn.Module):
    """ONNX ``Reshape`` (``allowzero=0``) to a constant shape: ``0`` copies that axis of the
    input, ``-1`` is inferred. Replaces onnx2torch's ``OnnxReshape``, which reads the shape
    from a tensor and so cannot be captured by ``torch.export``."""

    def __init__(self, shape: list[int]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.reshape(x, [x.shape[i] if s == 0 else s for i, s in enumerate(self.shape)])

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def _converted(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """onnx2torch's module, made capturable (:func:`_constant_reshapes`) and with its layers
    as certify names them (:func:`_linear_matmuls`)."""
    graph = module.graph
    attributes = {node.target for node in graph.nodes if node.op == "get_attr"}
    _constant_reshapes(module)
    _linear_matmuls(module)
    graph.eliminate_dead_code()
    for target in attributes - {node.target for node in graph.nodes if node.op == "get_attr"}:
        owner, _, attr = target.rpartition(".")
        delattr(module.get_submodule(owner) if owner else module, attr)
    module.delete_all_unused_submodules()
    module.recompile()
    return module


def _held(module: torch.fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor that graph node ``node`` holds (a ``get_attr``, or an ``OnnxConstant``
    without inputs); ``None`` for a value computed in the graph."""
    from onnx2torch.node_converters.constant import OnnxConstant

    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "get_attr":
        owner, _, attr = node.target.rpartition(".")
        value = getattr(module.get_submodule(owner) if owner else module, attr, None)
    elif node.op == "call_module" and not node.args and isinstance(
            module.get_submodule(node.target), OnnxConstant):
        value = module.get_submodule(node.target).value
    else:
        return None
    return value if isinstance(value, torch.Tensor) else None


def _calls(module: torch.fx.GraphModule, node, kind) -> bool:
    return node.op == "call_module" and type(module.get_submodule(node.target)) is kind


def _replace(module: torch.fx.GraphModule, node, replacement: torch.nn.Module) -> None:
    owner, _, name = node.target.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, name, replacement)


def _constant_reshapes(module: torch.fx.GraphModule) -> None:
    """Replace every ``OnnxReshape`` whose shape is a constant by :class:`ConstantReshape`."""
    from onnx2torch.node_converters.reshape import OnnxReshape

    for node in list(module.graph.nodes):
        if not _calls(module, node, OnnxReshape) or len(node.args) != 2 or node.kwargs:
            continue
        shape = _held(module, node.args[1])
        if shape is None or shape.dim() != 1 or shape.is_floating_point():
            continue  # a shape computed in the graph: left to onnx2torch
        _replace(module, node, ConstantReshape(shape.tolist()))
        node.args = (node.args[0],)


def _linear_matmuls(module: torch.fx.GraphModule) -> None:
    """``MatMul(x, W)`` by a constant matrix, and the ``Add`` of a constant bias vector that
    follows it, become one ``nn.Linear`` in the MatMul's place: what both exporters write for
    ``nn.Linear`` on tokens (``Gemm`` is only for 2-d inputs). The layer's weight is then a
    parameter named after the MatMul node, as certificates name layers, and its bias is the
    layer's (``--bias``). A matrix used more than once (tied weights) is left as it is."""
    from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation
    from onnx2torch.node_converters.matmul import OnnxMatMul

    graph = module.graph
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            uses[node.target] = uses.get(node.target, 0) + len(node.users)

    def sole(node) -> bool:
        """Whether nothing else uses the tensor that ``node`` holds."""
        return (uses[node.target] if node.op == "get_attr" else len(node.users)) == 1

    for node in list(graph.nodes):
        if not _calls(module, node, OnnxMatMul) or len(node.args) != 2 or node.kwargs:
            continue
        x, w = node.args
        weight = _held(module, w)
        if weight is None or weight.dim() != 2 or not weight.is_floating_point() or not sole(w):
            continue
        linear = torch.nn.utils.skip_init(torch.nn.Linear, *weight.shape, bias=False)
        linear.weight = torch.nn.Parameter(weight.T.clone())
        add = next(iter(node.users)) if len(node.users) == 1 else None
        if add is not None and _calls(module, add, OnnxBinaryMathOperation) and \
                module.get_submodule(add.target).math_op_function is torch.add and \
                module.get_submodule(add.target).broadcast is None and len(add.args) == 2:
            b = add.args[1] if add.args[0] is node else add.args[0]
            bias = _held(module, b)
            if bias is not None and bias.shape == (weight.shape[1],) and sole(b):
                linear.bias = torch.nn.Parameter(bias.clone())
                add.replace_all_uses_with(node)
                graph.erase_node(add)
        _replace(module, node, linear)
        node.args = (x,)
