"""Turn a model file into a float64 ``torch.nn.Module``, never executing code from the file.

Supported sources (see ``load_model``), each read by its own module, whose docstring says
what "never executing code from the file" takes for that format:

* a ``torch.nn.Module`` instance (Python API; a copy is converted, the caller's is unchanged);
* ``.onnx`` (``certify.formats.onnx.files``): checked with ``onnx.checker``, converted with
  onnx2torch (a ``torch.fx.GraphModule``; crafted node names are replaced before conversion);
  ``onnx_crosscheck`` (``certify.formats.onnx.crosscheck``) compares the conversion with
  onnxruntime on given inputs;
* ``.pt2`` (``certify.formats.pt2``): a ``torch.export.save`` archive, vetted before
  ``torch.export`` deserialises it (no pickles, no compiled code, no guard code run);
* a state dict (``certify.formats.state_dicts``: ``.safetensors``, or ``.pt`` / ``.pth`` read with
  ``torch.load(weights_only=True)``) together with ``factory="package.module:callable"``, the
  user's own code that builds the model.

Every loaded module can be captured again with ``torch.export.export`` (after
``.to(torch.float64)``), ONNX models included where their reshapes have constant shapes.
``file_sha256`` hashes a model file (and an ONNX model's external data files) for the
certificate. Every failure raises ``ModelLoadError`` (a ``ValueError``) saying what went
wrong and how to fix it.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from certify.formats.errors import ModelLoadError, first_line
from certify.formats.onnx.crosscheck import onnx_crosscheck
from certify.formats.onnx.files import load_onnx_file, onnx_external_files
from certify.formats.pt2 import load_pt2_file
from certify.formats.state_dicts import load_state_dict_into_factory
from certify.graph.inputs import require_finite

__all__ = [
    "SUPPORTED_SUFFIXES",
    "ModelLoadError",
    "file_sha256",
    "load_model",
    "onnx_crosscheck",
]

SUPPORTED_SUFFIXES = (".onnx", ".pt2", ".safetensors", ".pt", ".pth")


def load_model(source: Any, *, factory: str | None = None) -> torch.nn.Module:
    """Load ``source`` as a ``torch.nn.Module`` in eval mode with float64 parameters.

    ``source`` is a ``torch.nn.Module`` (a copy in eval mode and float64 is returned; the
    caller's module is not changed), or a path to a ``.onnx``, ``.pt2``, ``.safetensors``,
    ``.pt`` or ``.pth`` file. State dicts (``.safetensors``, ``.pt``, ``.pth``) need
    ``factory="package.module:callable"``: the callable is imported, called with no arguments
    and must return the ``nn.Module`` the weights belong to; they are loaded with
    ``load_state_dict(strict=True)``.

    Raises ``ModelLoadError`` for anything that cannot be loaded, including parameters or
    buffers that are NaN or infinite.
    """
    if isinstance(source, torch.nn.Module):
        if factory is not None:
            raise ModelLoadError(
                "factory is only used with a state dict file (.safetensors, .pt, .pth); "
                "a torch.nn.Module instance is already a model: drop factory"
            )
        try:
            module = copy.deepcopy(source)
        except Exception as exc:  # deepcopy fails in as many ways as objects can refuse it
            raise ModelLoadError(
                f"cannot copy the given {type(source).__name__} ({type(exc).__name__}: "
                f"{first_line(exc)}); certify converts a copy to float64 so as not to change "
                "your module: make it copyable with copy.deepcopy, or save it to a file and "
                "load that"
            ) from None
        return _finish(module, "the given module")

    if not isinstance(source, (str, os.PathLike)):
        raise ModelLoadError(
            f"cannot load a model from a {type(source).__name__}: pass a path to a model file "
            f"({', '.join(SUPPORTED_SUFFIXES)}) or a torch.nn.Module"
        )
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path} (check the path)")
    if not path.is_file():
        raise ModelLoadError(f"not a file: {path} (pass the model file itself)")

    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ModelLoadError(
            f"unsupported model file extension {path.suffix!r} for {path.name}: supported are "
            ".onnx (ONNX), .pt2 (torch.export.save), and state dicts .safetensors / .pt / .pth "
            "together with --factory package.module:callable"
        )
    if suffix in (".onnx", ".pt2") and factory is not None:
        raise ModelLoadError(
            f"--factory is only used with state dict files (.safetensors, .pt, .pth); "
            f"{path.name} already contains the architecture: drop --factory"
        )

    if suffix == ".onnx":
        module = load_onnx_file(path)
    elif suffix == ".pt2":
        module = load_pt2_file(path)
    else:
        module = load_state_dict_into_factory(path, factory)
    return _finish(module, path.name)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the model file's bytes; for an ONNX model whose weights live in
    external data files, those files' names and bytes too (sorted by name), so that a
    certificate pins every weight it speaks about."""
    path = Path(path)
    digest = hashlib.sha256()
    try:
        _hash_file(digest, path)
    except FileNotFoundError:
        raise ModelLoadError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise ModelLoadError(f"not a file: {path}") from None
    if path.suffix == ".onnx":
        for name in onnx_external_files(path):
            digest.update(name.encode())
            try:
                _hash_file(digest, path.parent / name)
            except OSError:
                raise ModelLoadError(f"{path.name}: its external data file {name!r} cannot be "
                                     "read; keep it beside the model") from None
    return digest.hexdigest()


def _hash_file(digest, path: Path) -> None:
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)


def _graph_constants(module: torch.nn.Module):
    """Tensors that get_attr nodes of a GraphModule reach but are not parameters or buffers."""
    if not isinstance(module, torch.fx.GraphModule):
        return
    registered = {id(t) for t in module.parameters()} | {id(t) for t in module.buffers()}
    for node in module.graph.nodes:
        if node.op != "get_attr":
            continue
        owner_name, _, attr = node.target.rpartition(".")
        try:
            owner = module.get_submodule(owner_name) if owner_name else module
            value = getattr(owner, attr)
        except AttributeError:
            continue
        if isinstance(value, torch.Tensor) and id(value) not in registered:
            yield node.target, owner, attr, value


def _float64_operations(module: torch.nn.Module) -> None:
    """The floating dtypes a GraphModule's operations name become float64, as its parameters
    do: ``torch.export`` writes ``zeros(..., dtype=torch.float32)`` for the initial state of
    an ``nn.LSTM`` or ``nn.GRU``, which a float64 module could not run."""
    if not isinstance(module, torch.fx.GraphModule):
        return
    named = [node for node in module.graph.nodes
             if isinstance(node.kwargs.get("dtype"), torch.dtype)
             and node.kwargs["dtype"].is_floating_point and node.kwargs["dtype"] != torch.float64]
    for node in named:
        node.update_kwarg("dtype", torch.float64)
    if named:
        module.recompile()


def _finish(module: torch.nn.Module, origin: str) -> torch.nn.Module:
    """Eval mode, float64 parameters, buffers, graph constants and operations, all of them
    finite."""
    try:
        module.eval()
    except NotImplementedError:
        # torch.export modules refuse train()/eval(): their mode is fixed in the graph, which
        # certify.formats.pt2 has checked.
        pass
    module.double()
    for _, owner, attr, value in list(_graph_constants(module)):
        if value.is_floating_point() and value.dtype != torch.float64:
            setattr(owner, attr, value.to(torch.float64))
    _float64_operations(module)

    named = list(module.named_parameters()) + list(module.named_buffers())
    named += [(target, value) for target, _, _, value in _graph_constants(module)]
    require_finite(named, origin, ModelLoadError)
    return module
