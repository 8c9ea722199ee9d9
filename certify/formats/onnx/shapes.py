"""Shapes an ONNX graph computes, made constants, and the batch size the exporters fix:
rewrites before conversion (``certify.formats.onnx.rewrites._sanitise_onnx`` runs them).

* Shapes computed in the graph: the legacy exporter writes ``x.flatten(2)`` as
  ``Reshape(x, Concat(Slice(Shape(x)), [-1]))``, which onnx2torch computes from tensors and
  ``torch.export`` cannot capture. Where shape inference finds ``x``'s shape static, ``Shape``
  and the computations on it with constants alone become constants (a symbolic batch size,
  ``dynamic_axes``, is taken as 1 for this); the value shapes are inferred again (onnx2torch
  builds ``nn.LayerNorm`` from them). So do integer computations on constants alone, such as
  the legacy exporter's amounts of ``F.pad``.
* ``Reshape`` shapes that repeat the graph's static batch size, what the default
  (``torch.export``-based, "dynamo") exporter writes (``nn.Flatten`` becomes ``Reshape(x,
  [4, 784])`` for an export with 4 inputs). Where ONNX shape inference shows that the first
  axis of such a Reshape's input is the graph input's batch axis, that entry becomes ``0``
  (copy the input's axis): the same at the exported batch size, and the converted module
  then takes any number of inputs. Inference is told that a ``Resize`` (``nn.Upsample``)
  keeps the batch axis, which it cannot find itself.

Also here: how the rewrites read a graph's constants (``_constant_tensors``) and its
input (``_graph_input``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_BATCH = "certify_batch"  # the symbolic batch size that shape inference propagates


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
    size the file fixes is then copied where a Reshape repeats it, like any other.

    So does every standard operator on integer constants that gives integers: the legacy
    exporter computes ``F.pad``'s amounts from ``(1, 2, 0, 1)`` with ``ConstantOfShape``,
    ``Concat``, ``Reshape``, ``Slice``, ``Transpose`` and ``Cast``. Such a node computes one
    value, whatever the input, and the reference evaluator computes it as the ONNX
    specification does. Computations on float constants are left to capture, which folds
    them in float64; random operators take or give floats, so they are never folded."""
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
        elif node.domain in ("", "ai.onnx") and inputs and \
                all(name in constants for name in inputs):
            on_shapes = bool(folded.intersection(inputs))
            if on_shapes or all(_integral(constants[name]) for name in inputs):
                try:
                    values = ReferenceEvaluator(node, opsets=opsets).run(
                        None, {name: constants[name] for name in inputs})
                except Exception:  # an operator the evaluator lacks: left to onnx2torch
                    pass
            if values is not None and not on_shapes and not all(map(_integral, values)):
                values = None  # floats from integer constants: left to capture
        if values is None:
            kept.append(node)
            continue
        for name, value in zip(node.output, values):
            if not name:
                continue  # an optional output the graph does not use
            constants[name] = value
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        folded.update(node.output)
    if folded:
        del model.graph.node[:]
        model.graph.node.extend(kept)
        _prune(model)


def _integral(value) -> bool:
    return np.issubdtype(np.asarray(value).dtype, np.integer)


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


def _resizes_keeping(model, constants, batch: int, on_batch: set) -> dict[int, list]:
    """The Resize nodes (by index) whose input has the batch axis first and that keep it,
    with their sizes after the batch axis (``None`` where not constant): constant scales with
    a batch factor of 1, or constant sizes that start with the batch size. Shape inference
    cannot tell: it multiplies the symbolic batch size by the factor (an unknown size) or
    reads the constant size."""
    from onnx import numpy_helper

    found = {}
    for index, node in enumerate(model.graph.node):
        if node.op_type != "Resize" or node.domain not in ("", "ai.onnx") or \
                node.input[0] not in on_batch:
            continue
        scales, sizes = (numpy_helper.to_array(constants[name]).tolist()
                         if name in constants else []
                         for name in (list(node.input[2:4]) + ["", ""])[:2])
        if sizes and sizes[0] == batch:
            found[index] = sizes[1:]
        elif not sizes and scales and scales[0] == 1:
            found[index] = [None] * (len(scales) - 1)
    return found


def _keep_batch(probe, keeping: dict[int, list]) -> None:
    """Declare the outputs of the ``keeping`` Resize nodes of ``probe`` (a copy for shape
    inference) with the symbolic batch size first, which inference then keeps, and their
    constant sizes (which inference must then not read: a fresh input stands in for them)."""
    from onnx import TensorProto, helper

    for index, after in keeping.items():
        node = probe.graph.node[index]
        if len(node.input) > 3 and node.input[3]:
            stand_in = f"{node.input[3]}_certify_unknown_{index}"
            probe.graph.input.append(helper.make_tensor_value_info(
                stand_in, TensorProto.INT64, [len(after) + 1]))
            node.input[3] = stand_in
        probe.graph.value_info.append(helper.make_tensor_value_info(
            node.output[0], TensorProto.FLOAT, [_BATCH, *after]))


def _copy_batch_in_reshapes(model) -> None:
    """Where a Reshape's constant shape starts with the graph's static batch size and its
    input's first axis is the batch axis, make that entry 0 (copy the input's axis).

    The batch axis is found by shape inference on a copy whose input has a symbolic batch
    size: an axis whose inferred size is that symbol. Each rewritten Reshape passes the symbol
    on, and so does each Resize of the batch axis by 1 (or to the batch size) that has it
    (``_resizes_keeping``), so inference is repeated until nothing changes.
    """
    import onnx
    from onnx import numpy_helper

    graph_input = _graph_input(model)
    dims = graph_input.type.tensor_type.shape.dim if graph_input is not None else []
    if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value < 1:
        return
    batch = dims[0].dim_value
    done: set[int] = set()
    keeping: dict[int, list] = {}  # Resize nodes that keep the batch axis: their sizes
    for _ in range(len(model.graph.node)):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        for item in [*probe.graph.input, *probe.graph.output]:
            if item.name == graph_input.name:
                item.type.tensor_type.shape.dim[0].dim_param = _BATCH
            elif item.type.HasField("tensor_type"):
                item.type.tensor_type.ClearField("shape")
        del probe.graph.value_info[:]
        _keep_batch(probe, keeping)
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
        kept = _resizes_keeping(model, constants, batch, on_batch)
        changed = kept.keys() != keeping.keys()
        keeping = kept
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
