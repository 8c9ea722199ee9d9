"""onnx2torch, and fixes to the torch module it converts an ONNX graph into.

* Importing onnx2torch (``_import_onnx2torch``) without torchvision, which it imports only
  for two operators certify does not certify, and teaching it certify's private domain
  (what ``certify.formats.onnx.rewrites`` puts there): ``Gelu`` as ``nn.GELU``,
  ``LayerNormalization`` as LayerNormalization-17, ``Pad`` with constant amounts as
  ``ConstantPad`` (``F.pad`` with the amounts as Python integers).
* After conversion (``_converted``): onnx2torch's ``OnnxReshape``, ``OnnxSqueezeDynamicAxes``
  (Squeeze from opset 13 on: what both exporters write for ``x.squeeze(-1)``, and the
  default one for ``nn.AdaptiveAvgPool1d``) and ``OnnxSlice`` (Slice from opset 10 on) read
  their shape, axes or bounds from tensors (``torch.any(shape == 0)``, ``for axis in axes``,
  ``.numpy()``), which ``torch.export`` cannot capture (it reports a data-dependent
  expression). Where those are constants, the module is replaced by ``ConstantReshape``,
  ``ConstantSqueeze`` or ``ConstantSlice``, the same operation with Python integers, so the
  loaded module can be exported again. Likewise ``OnnxResize`` reads its scales or sizes from
  a tensor (``scales.tolist()``): where they are constants it becomes ``ConstantResize``, the
  same ``F.interpolate`` with Python numbers. ``MatMul`` by a constant matrix and the ``Add``
  of a constant bias after it (what both exporters write for ``nn.Linear`` on tokens) become
  one ``nn.Linear`` named after the MatMul node: certificates name the layer after its node,
  and its bias is the layer's.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
import torch.nn.functional as F

from certify.formats.errors import ModelLoadError
from certify.formats.onnx.rewrites import _CERTIFY_DOMAIN


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
    ``approximate``, ``LayerNormalization`` as onnx2torch's LayerNormalization-17, ``Pad``
    as ``ConstantPad``."""
    from onnx2torch.node_converters.registry import add_converter, get_converter
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    def gelu(node, graph):  # the converter signature of onnx2torch
        approximate = node.attributes.get("approximate", "none")
        if approximate not in ("none", "tanh"):
            raise NotImplementedError(f"Gelu(approximate={approximate!r})")
        return OperationConverterResult(
            torch_module=torch.nn.GELU(approximate=approximate),
            onnx_mapping=onnx_mapping_from_node(node=node),
        )

    def pad(node, graph):
        return OperationConverterResult(
            torch_module=ConstantPad(node.attributes["pads"], node.attributes["mode"],
                                     node.attributes["value"]),
            onnx_mapping=onnx_mapping_from_node(node=node),
        )

    for op_type, converter in (("Gelu", gelu),
                               ("LayerNormalization", get_converter("LayerNormalization", 17)),
                               ("Pad", pad)):
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


class ConstantResize(torch.nn.Module):
    """ONNX ``Resize`` (opsets 11 to 17) with constant ``scales`` or ``sizes`` (``(batch,
    channels, *spatial)``, as ONNX writes them): ``F.interpolate`` of the spatial axes in
    torch's ``mode``, as onnx2torch's ``OnnxResize`` computes it. The batch size of
    ``sizes`` is the export's; the module takes any."""

    def __init__(self, mode: str, align_corners: bool | None, scales: list[float] | None,
                 sizes: list[int] | None) -> None:
        super().__init__()
        self.mode, self.align_corners = mode, align_corners
        self.scales = None if scales is None else [float(s) for s in scales[2:]]
        self.sizes = None if sizes is None else [int(s) for s in sizes[2:]]
        self.channels = None if sizes is None else int(sizes[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels is not None and x.shape[1] != self.channels:
            raise NotImplementedError("Resize of the channel axis: F.interpolate resizes the "
                                      "axes after the batch and channel axes only")
        return torch.nn.functional.interpolate(x, size=self.sizes, scale_factor=self.scales,
                                               mode=self.mode, align_corners=self.align_corners)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, scales={self.scales}, sizes={self.sizes}"


class ConstantSqueeze(torch.nn.Module):
    """ONNX ``Squeeze`` along constant axes (negative ones count from the end), all at once.
    Replaces onnx2torch's ``OnnxSqueezeDynamicAxes``, which reads the axes from a tensor."""

    def __init__(self, axes: list[int]) -> None:
        super().__init__()
        self.axes = tuple(int(a) for a in axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.squeeze(x, self.axes)

    def extra_repr(self) -> str:
        return f"axes={self.axes}"


class ConstantSlice(torch.nn.Module):
    """ONNX ``Slice`` (opset 10 on) by constant ``starts``, ``ends``, ``axes`` and ``steps``:
    along each axis of size ``n``, the entries ``range(n)[start:end:step]``, which counts and
    clamps negative and out-of-range starts and ends as ONNX does. Replaces onnx2torch's
    ``OnnxSlice``, which reads them from tensors (``.numpy()``). torch slices with positive
    steps only: a negative step reads the flipped axis."""

    def __init__(self, starts: list[int], ends: list[int], axes: list[int] | None = None,
                 steps: list[int] | None = None) -> None:
        super().__init__()
        axes = range(len(starts)) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        self.cuts = tuple(tuple(int(v) for v in cut) for cut in zip(axes, starts, ends, steps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for axis, start, end, step in self.cuts:
            size = x.shape[axis]
            kept = range(size)[start:end:step]
            first, stride = kept.start, kept.step
            if stride < 0:
                x, first, stride = torch.flip(x, (axis,)), size - 1 - first, -stride
            where = [slice(None)] * x.dim()
            where[axis] = slice(first, first + len(kept) * stride, stride)
            x = x[tuple(where)]
        return x

    def extra_repr(self) -> str:
        return f"cuts={self.cuts} (axis, start, end, step)"


_TORCH_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate",
                    "wrap": "circular"}


class ConstantPad(torch.nn.Module):
    """ONNX ``Pad`` by constant amounts ``pads = [b_1, ..., b_n, e_1, ..., e_n]`` (``b_i``
    entries before axis ``i``, ``e_i`` after it) as ``F.pad``, which lists them from the last
    axis on: ``(b_n, e_n, ..., b_1, e_1)``. ONNX's ``edge`` and ``wrap`` are torch's
    ``replicate`` and ``circular``; ``value`` fills in ``constant`` mode only. In the other
    modes torch pads the last ``max(n - 2, 1)`` axes of an ``n``-d tensor (at most 3): the
    amounts of the leading axes must be 0 and are left out."""

    def __init__(self, pads: list[int], mode: str, value: float) -> None:
        super().__init__()
        if mode not in _TORCH_PAD_MODES:
            raise NotImplementedError(f"Pad(mode={mode!r}); ONNX's modes are "
                                      f"{', '.join(_TORCH_PAD_MODES)}")
        n = len(pads) // 2
        amounts = [int(a) for axis in reversed(range(n)) for a in (pads[axis], pads[n + axis])]
        kept = len(amounts) if mode == "constant" else 2 * max(n - 2, 1)
        if mode != "constant" and (kept > 6 or any(amounts[kept:])):
            raise NotImplementedError(
                f"Pad(mode={mode!r}) by {[int(a) for a in pads]} of a {n}-d tensor: torch pads "
                f"only the last {min(kept // 2, 3)} axes in this mode")
        self.pads, self.mode = tuple(amounts[:kept]), _TORCH_PAD_MODES[mode]
        self.value = float(value) if mode == "constant" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pads, self.mode, self.value)

    def extra_repr(self) -> str:
        return f"pads={self.pads}, mode={self.mode!r}, value={self.value}"


def _converted(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """onnx2torch's module, made capturable (``_constant_arguments``, ``_constant_resizes``)
    and with its layers as certify names them (``_linear_matmuls``)."""
    graph = module.graph
    attributes = {node.target for node in graph.nodes if node.op == "get_attr"}
    _constant_arguments(module)
    _constant_resizes(module)
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


def _constant_arguments(module: torch.fx.GraphModule) -> None:
    """Replace every ``OnnxReshape``, ``OnnxSqueezeDynamicAxes`` and ``OnnxSlice`` whose
    arguments past the input are constants by ``ConstantReshape``, ``ConstantSqueeze`` and
    ``ConstantSlice``."""
    from onnx2torch.node_converters.reshape import OnnxReshape
    from onnx2torch.node_converters.slice import OnnxSlice
    from onnx2torch.node_converters.squeeze import OnnxSqueezeDynamicAxes

    constant = {OnnxReshape: ConstantReshape, OnnxSqueezeDynamicAxes: ConstantSqueeze,
                OnnxSlice: ConstantSlice}
    for node in list(module.graph.nodes):
        kind = next((k for k in constant if _calls(module, node, k)), None)
        if kind is None or len(node.args) < 2 or node.kwargs:
            continue
        held = [_held(module, arg) for arg in node.args[1:]]
        if any(h is None or h.dim() != 1 or h.is_floating_point() for h in held):
            continue  # computed in the graph: left to onnx2torch
        _replace(module, node, constant[kind](*(h.tolist() for h in held)))
        node.args = node.args[:1]


def _constant_resizes(module: torch.fx.GraphModule) -> None:
    """Replace every ``OnnxResize`` without a region of interest whose scales (batch and
    channel factors 1) or sizes are constants by ``ConstantResize``; any other is left to
    onnx2torch (and its errors)."""
    from onnx2torch.node_converters.resize import OnnxResize, _onnx_mode_to_torch_mode

    for node in list(module.graph.nodes):
        if not _calls(module, node, OnnxResize):
            continue
        resize = module.get_submodule(node.target)
        given = {**dict(zip(("input_tensor", "roi", "scales", "sizes"), node.args)),
                 **node.kwargs}
        held = {name: _held(module, given.get(name)) for name in ("roi", "scales", "sizes")}
        if any(given.get(name) is not None and (value is None or value.dim() != 1)
               for name, value in held.items()):
            continue  # computed in the graph: left to onnx2torch
        roi, scales, sizes = (None if v is None or v.numel() == 0 else v.tolist()
                              for v in held.values())
        if (roi is not None and not resize.ignore_roi) or (scales is None) == (sizes is None) \
                or (scales is not None and scales[:2] != [1, 1]):
            continue
        spatial = len(scales if scales is not None else sizes) - 2
        try:
            mode = _onnx_mode_to_torch_mode(resize.onnx_mode, spatial)
        except NotImplementedError:
            continue
        _replace(module, node, ConstantResize(mode, resize.align_corners, scales, sizes))
        node.args, node.kwargs = (given["input_tensor"],), {}


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
