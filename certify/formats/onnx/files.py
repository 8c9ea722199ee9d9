"""Read an ONNX file and convert it to a ``torch.fx.GraphModule``, never running code from it.

An ONNX file is protobuf data; what it computes is converted by onnx2torch, in these steps:

* ``onnx.checker`` (full check, with shape inference) validates the file first.
* The graph is rewritten at the ONNX level, without changing what it computes, into what
  onnx2torch converts and certify reads (``certify.formats.onnx.rewrites``): safe node names,
  shapes computed in the graph folded into constants and the batch size copied where a
  Reshape repeats it (``certify.formats.onnx.shapes``), decomposed GELU and layer norms put back
  into one operator.
* Opsets: onnx2torch 1.5.15 converts the versions of its operators up to opset 17
  (GreaterOrEqual and LessOrEqual-16 aside) and misses newer ones (AveragePool-19,
  Reshape-19, ...): files with a newer opset that fail to convert are down-converted to opset
  17 with ``onnx.version_converter`` and tried again. ``Gelu`` (opset 20, what both exporters
  write for ``nn.GELU`` at their default opset) has no older version and no onnx2torch
  converter: it lives in a private domain that the down-conversion leaves alone
  (``certify.formats.onnx.rewrites``) and is converted to ``nn.GELU``; so does a ``Pad`` by
  constant amounts (Pad-18 and Pad-19, what both exporters write at opsets 18 to 20, cannot
  be down-converted: Pad-18 added ``axes``), converted to ``F.pad``. ``ConstantOfShape``-20
  cannot be down-converted either; where the legacy exporter writes it at its default opset
  (20), it computes pad amounts from constants and is folded away with them.
* onnx2torch (imported without torchvision) converts the graph, and its module is made
  capturable by ``torch.export`` and given the layers certify names
  (``certify.formats.onnx.converted``). It has no converter for the recurrent operators
  (``LSTM``, ``GRU``, ``RNN``: what both exporters write for ``nn.LSTM``, ``nn.GRU`` and
  ``nn.RNN``), so files with them are refused by name, pointing to the ``.pt2`` archive,
  which certify reads them from.

``onnx_external_files`` lists the external data files a model refers to (the certificate's
hash covers them). The converted module is compared with onnxruntime by
``certify.formats.onnx.crosscheck.onnx_crosscheck``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from certify.formats.errors import ModelLoadError, first_line
from certify.formats.onnx.converted import _converted, _import_onnx2torch
from certify.formats.onnx.rewrites import _sanitise_onnx

_ONNX2TORCH_OPSET = 17
_RECURRENT = ("GRU", "LSTM", "RNN")  # no onnx2torch converter


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

    recurrent = sorted({node.op_type for node in model.graph.node
                        if node.op_type in _RECURRENT and node.domain in ("", "ai.onnx")})
    if recurrent:
        raise ModelLoadError(
            f"{path.name} has ONNX {'/'.join(recurrent)} nodes (nn.LSTM, nn.GRU or nn.RNN), "
            "which onnx2torch cannot convert; certify reads recurrent layers from PyTorch: "
            "pass the module itself, or save it with "
            "torch.export.save(torch.export.export(model, (x,)), 'model.pt2')"
        )
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


def _default_opset(model) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None
