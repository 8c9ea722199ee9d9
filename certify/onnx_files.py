"""Read an ONNX file and convert it to a ``torch.fx.GraphModule``, never running code from it.

An ONNX file is protobuf data; what it computes is converted by onnx2torch, in these steps:

* ``onnx.checker`` (full check, with shape inference) validates the file first.
* Node names: onnx2torch names the torch submodules after the ONNX node names and ``torch.fx``
  pastes those names into generated Python source (``getattr(self, "<name>")``), so a crafted
  node name is code. Node names that are not plain ``[A-Za-z0-9_./-]`` are replaced before
  conversion.
* What the default (``torch.export``-based, "dynamo") exporter writes: ``Reshape`` with
  ``allowzero=1`` (onnx2torch refuses it; it computes the same as ``allowzero=0`` when the
  shape is a constant without zeros, so the attribute is dropped there), and ``Reshape``
  shapes that repeat the graph's static batch size (``nn.Flatten`` becomes ``Reshape(x,
  [4, 784])`` for an export with 4 inputs). Where ONNX shape inference shows that the first
  axis of such a Reshape's input is the graph input's batch axis, that entry becomes ``0``
  (copy the input's axis): the same at the exported batch size, and the converted module
  then takes any number of inputs.
* Opsets: onnx2torch 1.5.15 converts the versions of its operators up to opset 17
  (GreaterOrEqual and LessOrEqual-16 aside) and misses newer ones (AveragePool-19,
  Reshape-19, ...): files with a newer opset that fail to convert are down-converted to opset
  17 with ``onnx.version_converter`` and tried again. ``Gelu`` (opset 20, what both exporters
  write for ``nn.GELU`` at their default opset) has no older version and no onnx2torch
  converter: it is moved to a private domain that the down-conversion leaves alone and
  converted to ``nn.GELU``.
* After conversion: onnx2torch's ``OnnxReshape`` reads its target shape from a tensor and
  branches on its values (``torch.any(shape == 0)``), which ``torch.export`` cannot capture.
  Where the shape is a constant, the module is replaced by :class:`ConstantReshape`, the same
  reshape with the shape as Python integers, so the loaded module can be exported again.

:func:`onnx_external_files` lists the external data files a model refers to (the certificate's
hash covers them). The converted module is compared with onnxruntime by
:func:`certify.onnx_crosscheck.onnx_crosscheck`.
"""

from __future__ import annotations

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
_GELU_DOMAIN = "certify"  # where Gelu nodes wait out the down-conversion


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
        return _constant_reshapes(onnx2torch.convert(model))
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
            return _constant_reshapes(onnx2torch.convert(older))
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
    docstring): safe node names, the batch size copied where Reshape repeats it, and
    ``allowzero=1`` dropped where it makes no difference, Gelu in certify's domain."""
    import onnx
    from onnx import numpy_helper

    for index, node in enumerate(model.graph.node):
        if not _SAFE_ONNX_NODE_NAME.match(node.name):
            node.name = f"{node.op_type if node.op_type.isidentifier() else 'node'}_{index}"

    _copy_batch_in_reshapes(model)
    gelus = [node for node in model.graph.node
             if node.op_type == "Gelu" and node.domain in ("", "ai.onnx")]
    for node in gelus:
        node.domain = _GELU_DOMAIN
    if gelus and all(entry.domain != _GELU_DOMAIN for entry in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(_GELU_DOMAIN, 1))
    constants = _constant_tensors(model)
    for node in _reshapes(model):
        for attr in list(node.attribute):
            if attr.name == "allowzero" and attr.i == 1 and node.input[1] in constants:
                shape = numpy_helper.to_array(constants[node.input[1]])
                if shape.size and bool(np.all(shape != 0)):
                    node.attribute.remove(attr)


def _constant_tensors(model) -> dict[str, Any]:
    """Initializers and the outputs of Constant nodes, by name (TensorProto)."""
    constants = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = attr.t
    return constants


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

    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or not inputs[0].type.HasField("tensor_type"):
        return
    dims = inputs[0].type.tensor_type.shape.dim
    if not dims or not dims[0].HasField("dim_value") or dims[0].dim_value < 1:
        return
    batch = dims[0].dim_value
    done: set[int] = set()
    for _ in range(len(_reshapes(model))):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        for item in [*probe.graph.input, *probe.graph.output]:
            if item.name == inputs[0].name:
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
    _register_gelu()
    _onnx2torch_module = onnx2torch
    return onnx2torch


def _register_gelu() -> None:
    """Teach onnx2torch certify's Gelu: ``nn.GELU`` with the node's ``approximate``."""
    from onnx2torch.node_converters.registry import add_converter
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    def convert(node, graph):  # the converter signature of onnx2torch
        approximate = node.attributes.get("approximate", "none")
        if approximate not in ("none", "tanh"):
            raise NotImplementedError(f"Gelu(approximate={approximate!r})")
        return OperationConverterResult(
            torch_module=torch.nn.GELU(approximate=approximate),
            onnx_mapping=onnx_mapping_from_node(node=node),
        )

    try:
        add_converter(operation_type="Gelu", version=1, domain=_GELU_DOMAIN)(convert)
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


def _constant_reshapes(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace every ``OnnxReshape`` whose shape is a constant by :class:`ConstantReshape`."""
    from onnx2torch.node_converters.constant import OnnxConstant
    from onnx2torch.node_converters.reshape import OnnxReshape

    graph = module.graph
    orphans = set()
    for node in list(graph.nodes):
        if node.op != "call_module" or type(module.get_submodule(node.target)) is not OnnxReshape \
                or len(node.args) != 2 or node.kwargs or not isinstance(node.args[1], torch.fx.Node):
            continue
        source = node.args[1]
        if source.op == "get_attr":
            owner, _, attr = source.target.rpartition(".")
            shape = getattr(module.get_submodule(owner) if owner else module, attr, None)
        elif source.op == "call_module" and not source.args and isinstance(
                module.get_submodule(source.target), OnnxConstant):
            shape = module.get_submodule(source.target).value
        else:
            continue  # a shape computed in the graph: left to onnx2torch
        if not isinstance(shape, torch.Tensor) or shape.dim() != 1 or shape.is_floating_point():
            continue
        owner, _, name = node.target.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, name,
                ConstantReshape(shape.tolist()))
        node.args = (node.args[0],)
        if source.op == "get_attr":
            orphans.add(source.target)
    graph.eliminate_dead_code()
    used = {node.target for node in graph.nodes if node.op == "get_attr"}
    for target in orphans - used:
        owner, _, attr = target.rpartition(".")
        delattr(module.get_submodule(owner) if owner else module, attr)
    module.delete_all_unused_submodules()
    module.recompile()
    return module
