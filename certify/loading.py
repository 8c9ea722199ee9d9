"""Turn a model file into a float64 ``torch.nn.Module``, never executing code from the file.

Supported sources (see :func:`load_model`):

* a ``torch.nn.Module`` instance (Python API; a copy is converted, the caller's is unchanged);
* ``.onnx``: checked with ``onnx.checker``, converted with onnx2torch (a ``torch.fx.GraphModule``);
  :func:`onnx_crosscheck` compares the conversion with onnxruntime on given inputs;
* ``.pt2``: a ``torch.export.save`` archive, vetted before ``torch.export`` deserialises it;
* a state dict (``.safetensors``, or ``.pt`` / ``.pth`` read with ``torch.load(weights_only=True)``)
  together with ``factory="package.module:callable"``, the user's own code that builds the model.

What "never executing code from the file" takes, format by format:

* ``.pt`` / ``.pth``: ``torch.load(..., weights_only=True)`` only rebuilds tensors and plain
  containers; a pickled model (or any other object) is refused, not unpickled.
* ``.onnx``: protobuf data. onnx2torch names the torch submodules after the ONNX node names and
  ``torch.fx`` pastes those names into generated Python source (``getattr(self, "<name>")``), so
  a crafted node name is code. Node names that are not plain ``[A-Za-z0-9_./-]`` are replaced
  before conversion.
* ``.pt2``: ``torch.export.load`` unpickles with ``weights_only=False`` in several places
  (weights and constants flagged ``use_pickle``, opaque objects, a fallback for the sample
  inputs), evaluates shape expressions with ``sympy.sympify`` (``eval``), ``exec``-s the archive's
  guard code in ``ExportedProgram.module()`` and pastes names from the graph into generated
  source. The archive is therefore read here first and refused unless every one of those inputs
  is inert: no pickled payloads, no AOTInductor binaries, shape expressions from a small sympy
  grammar, node targets ``torch.ops.aten`` / ``torch.ops.prims`` operators (and a few
  ``operator`` / ``math`` / ``torch.sym_*`` functions), every name a plain identifier path.
  The module is built with ``module(check_guards=False)`` so the archive's guard code is never
  compiled.

Every failure raises :class:`ModelLoadError` (a ``ValueError``) saying what went wrong and how
to fix it.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import io
import json
import os
import re
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from certify.inputs import brief, require_finite

__all__ = [
    "ModelLoadError",
    "SUPPORTED_SUFFIXES",
    "file_sha256",
    "load_model",
    "onnx_crosscheck",
]

SUPPORTED_SUFFIXES = (".onnx", ".pt2", ".safetensors", ".pt", ".pth")

# onnx2torch 1.5.15 converts the versions of its operators up to opset 17 (GreaterOrEqual and
# LessOrEqual-16 aside) and misses newer ones (AveragePool-19, Reshape-19, ...): files with a
# newer opset that fail to convert are down-converted to this opset and tried again.
_ONNX2TORCH_OPSET = 17

_EXPORT_HINT = (
    "save the weights with torch.save(model.state_dict(), 'model.pt') (or "
    "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')) and pass "
    "--factory package.module:callable naming a function that builds the model, or export "
    "the whole model with torch.export.save(torch.export.export(model, (x,)), 'model.pt2') or "
    "torch.onnx.export(model, (x,), 'model.onnx')"
)


class ModelLoadError(ValueError):
    """A model source that cannot be turned into a module; the message says how to fix it."""


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def load_model(source: Any, *, factory: str | None = None) -> torch.nn.Module:
    """Load ``source`` as a ``torch.nn.Module`` in eval mode with float64 parameters.

    ``source`` is a ``torch.nn.Module`` (a copy in eval mode and float64 is returned; the
    caller's module is not changed), or a path to a ``.onnx``, ``.pt2``, ``.safetensors``,
    ``.pt`` or ``.pth`` file. State dicts (``.safetensors``, ``.pt``, ``.pth``) need
    ``factory="package.module:callable"``: the callable is imported, called with no arguments
    and must return the ``nn.Module`` the weights belong to; they are loaded with
    ``load_state_dict(strict=True)``.

    Raises :class:`ModelLoadError` for anything that cannot be loaded, including parameters or
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
                f"{_first_line(exc)}); certify converts a copy to float64 so as not to change "
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
        module = _load_onnx(path)
    elif suffix == ".pt2":
        module = _load_pt2(path)
    else:
        state_dict = _load_state_dict_file(path)
        if factory is None:
            raise ModelLoadError(
                f"{path.name} is a state dict (weights only), so certify also needs the "
                "architecture: pass --factory package.module:callable (Python API: "
                "factory='package.module:callable') naming a function that takes no arguments "
                "and returns the torch.nn.Module these weights belong to; or export the whole "
                "model to .pt2 (torch.export.save) or .onnx instead"
            )
        module = _build_from_factory(factory)
        _load_into(module, state_dict, factory, path)
    return _finish(module, path.name)


def onnx_crosscheck(
    path: str | os.PathLike,
    module: torch.nn.Module,
    x: Any,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> float:
    """Run the ONNX file with onnxruntime and ``module`` in float64 on ``x``; compare.

    ``x`` is a tensor or array (or a sequence of them, one per graph input). Each input is cast
    to the dtype the ONNX graph declares (float32 for most files) and the same, already cast,
    values are fed to ``module`` as float64. Returns the largest absolute difference over all
    outputs; raises :class:`ModelLoadError` where ``|torch - ort| > atol + rtol * |ort|``.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"ONNX file not found: {path}")
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(
            f"onnxruntime cannot load {path.name}: {_first_line(exc)}"
        ) from None

    graph_inputs = session.get_inputs()
    arrays = list(x) if isinstance(x, (list, tuple)) else [x]
    if len(arrays) != len(graph_inputs):
        raise ModelLoadError(
            f"{path.name} has {len(graph_inputs)} input(s) "
            f"({', '.join(i.name for i in graph_inputs)}) but {len(arrays)} were given"
        )
    feed = {}
    for spec, value in zip(graph_inputs, arrays):
        dtype = _ORT_DTYPES.get(spec.type)
        if dtype is None:
            raise ModelLoadError(
                f"input {spec.name!r} of {path.name} has type {spec.type}; "
                "only float and integer inputs are supported"
            )
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        feed[spec.name] = np.ascontiguousarray(np.asarray(value), dtype=dtype)

    try:
        expected = session.run(None, feed)
    except Exception as exc:
        raise ModelLoadError(
            f"onnxruntime failed on the given inputs for {path.name}: {_first_line(exc)} "
            f"(input shapes given: {[a.shape for a in feed.values()]}; the graph expects "
            f"{[i.shape for i in graph_inputs]})"
        ) from None

    torch_inputs = [
        torch.from_numpy(a).to(torch.float64) if np.issubdtype(a.dtype, np.floating)
        else torch.from_numpy(a)
        for a in feed.values()
    ]
    try:
        module.eval()
    except NotImplementedError:  # torch.export modules: the mode is fixed in the graph
        pass
    try:
        with torch.no_grad():
            got = module(*torch_inputs)
    except Exception as exc:
        raise ModelLoadError(
            f"the converted module failed on the inputs that onnxruntime accepted: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from None
    got_list = _flatten_outputs(got)
    if len(got_list) != len(expected):
        raise ModelLoadError(
            f"the converted module returns {len(got_list)} output(s), onnxruntime "
            f"{len(expected)} for {path.name}"
        )

    largest = 0.0
    for index, (ours, theirs) in enumerate(zip(got_list, expected)):
        ours = ours.detach().to(torch.float64).cpu().numpy()
        theirs = np.asarray(theirs, dtype=np.float64)
        if ours.shape != theirs.shape:
            raise ModelLoadError(
                f"output {index} of {path.name}: converted module gives shape {ours.shape}, "
                f"onnxruntime {theirs.shape}"
            )
        if ours.size == 0:
            continue
        diff = np.abs(ours - theirs)
        if not np.all(np.isfinite(diff)):
            raise ModelLoadError(
                f"output {index} of {path.name} is not finite in the converted module or in "
                "onnxruntime on the given inputs"
            )
        largest = max(largest, float(diff.max()))
        excess = diff - (atol + rtol * np.abs(theirs))
        if np.any(excess > 0):
            worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
            raise ModelLoadError(
                f"the converted ONNX model disagrees with onnxruntime on output {index} of "
                f"{path.name}: largest difference {float(diff.max()):.3g} (at index "
                f"{tuple(int(i) for i in worst)}: torch {ours[worst]:.9g}, onnxruntime "
                f"{theirs[worst]:.9g}), beyond atol={atol:g} + rtol={rtol:g} * |onnxruntime|; "
                "the conversion is not faithful for this model (report it, or export to .pt2)"
            )
    return largest


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
        for name in _onnx_external_files(path):
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


def _onnx_external_files(path: Path) -> list[str]:
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
# common
# --------------------------------------------------------------------------------------------

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        flat: list[torch.Tensor] = []
        for item in out:
            flat.extend(_flatten_outputs(item))
        return flat
    raise ModelLoadError(f"the module returned a {type(out).__name__}, not tensors")


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


def _finish(module: torch.nn.Module, origin: str) -> torch.nn.Module:
    try:
        module.eval()
    except NotImplementedError:
        # torch.export modules refuse train()/eval(): their mode is fixed in the graph, which
        # _check_exported_eval_mode has checked.
        pass
    module.double()
    for _, owner, attr, value in list(_graph_constants(module)):
        if value.is_floating_point() and value.dtype != torch.float64:
            setattr(owner, attr, value.to(torch.float64))

    named = list(module.named_parameters()) + list(module.named_buffers())
    named += [(target, value) for target, _, _, value in _graph_constants(module)]
    require_finite(named, origin, ModelLoadError)
    return module


# --------------------------------------------------------------------------------------------
# state dicts and factories
# --------------------------------------------------------------------------------------------


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            loaded: Any = load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelLoadError(
                f"{path.name} is not a readable safetensors file ({_first_line(exc)}); it may "
                "be truncated or corrupt: save it again with "
                "safetensors.torch.save_file(model.state_dict(), path)"
            ) from None
    else:
        loaded = _torch_load_weights_only(path)
    return _as_state_dict(loaded, path)


_PICKLE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _torch_load_weights_only(path: Path) -> Any:
    import pickle

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        text = str(exc)
        # "Unsupported operand" is garbage, or a plain pickle.dump rather than torch.save.
        if "Weights only load failed" in text and "Unsupported operand" not in text:
            found = _PICKLE_GLOBAL.search(text)
            what = f" (it refers to {found.group(1)})" if found else ""
            raise ModelLoadError(
                f"{path.name} contains pickled Python objects, not only tensors{what}: "
                "probably a whole model saved with torch.save(model). certify never unpickles "
                "code from a model file (torch.load(weights_only=True) refuses it). Instead, "
                f"{_EXPORT_HINT}"
            ) from None
        detail = re.search(r"Unsupported operand \d+", text)
        raise ModelLoadError(
            f"{path.name} is not a readable torch.save file "
            f"({detail.group(0) if detail else _first_line(exc)}); it may be truncated or "
            "corrupt, or written with pickle rather than torch.save (certify never unpickles "
            "code): save it again with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:
        raise ModelLoadError(
            f"{path.name} is not a readable torch.save file ({type(exc).__name__}: "
            f"{_first_line(exc)}); it may be truncated or corrupt: save it again with "
            "torch.save(model.state_dict(), path)"
        ) from None


def _as_state_dict(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(loaded, torch.nn.Module):  # only reachable through add_safe_globals
        raise ModelLoadError(
            f"{path.name} holds a whole model object, not a state dict: {_EXPORT_HINT}"
        )
    if not isinstance(loaded, Mapping):
        raise ModelLoadError(
            f"{path.name} holds a {type(loaded).__name__}, not a state dict (a mapping from "
            "parameter names to tensors): save model.state_dict()"
        )
    not_tensors = [str(k) for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        nested = [
            str(k) for k, v in loaded.items()
            if isinstance(v, Mapping) and v and all(isinstance(t, torch.Tensor) for t in v.values())
        ]
        hint = (
            f"; it looks like a training checkpoint: save checkpoint[{nested[0]!r}] on its own"
            if nested else "; save model.state_dict() on its own"
        )
        raise ModelLoadError(
            f"{path.name} is not a plain state dict: entries that are not tensors: "
            f"{brief(not_tensors)}{hint}"
        )
    bad_keys = [repr(k) for k in loaded if not isinstance(k, str)]
    if bad_keys:
        raise ModelLoadError(
            f"{path.name}: state dict keys must be strings, got {brief(bad_keys)}"
        )
    if not loaded:
        raise ModelLoadError(f"{path.name} is an empty state dict")
    return dict(loaded)


_FACTORY = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


def _build_from_factory(factory: str) -> torch.nn.Module:
    if not isinstance(factory, str) or not _FACTORY.match(factory.strip()):
        raise ModelLoadError(
            f"bad --factory {factory!r}: expected 'package.module:callable', e.g. "
            "'mymodels.mnist:build_mlp' (a module importable from Python, a colon, and a "
            "function or class that takes no arguments and returns the torch.nn.Module)"
        )
    module_name, _, attr_path = factory.strip().partition(":")
    try:
        py_module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            cwd_note = "" if "" in sys.path or os.getcwd() in sys.path else (
                " (the current directory is not on sys.path: run with PYTHONPATH=. "
                "or pip install your package)"
            )
            raise ModelLoadError(
                f"--factory {factory!r}: cannot import module {module_name!r}: no module "
                f"named {missing!r}; make it importable: install the package it belongs to "
                f"or add its directory to PYTHONPATH{cwd_note}"
            ) from None
        raise ModelLoadError(
            f"--factory {factory!r}: importing {module_name!r} failed because it imports "
            f"{missing!r}, which is not installed"
        ) from None
    except Exception as exc:
        raise ModelLoadError(
            f"--factory {factory!r}: importing {module_name!r} raised "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from None

    target: Any = py_module
    walked = module_name
    for part in attr_path.split("."):
        if not hasattr(target, part):
            available = sorted(
                n for n, v in vars(target).items() if callable(v) and not n.startswith("_")
            ) if isinstance(target, types.ModuleType) else []
            suggestion = f" (callables there: {brief(available, 8)})" if available else ""
            raise ModelLoadError(
                f"--factory {factory!r}: {walked!r} has no attribute {part!r}{suggestion}"
            )
        target = getattr(target, part)
        walked = f"{walked}.{part}" if walked != module_name else f"{module_name}:{part}"
    if not callable(target):
        raise ModelLoadError(
            f"--factory {factory!r} names a {type(target).__name__}, not a callable"
        )
    if isinstance(target, torch.nn.Module):
        raise ModelLoadError(
            f"--factory {factory!r} names a module instance; name a function or class that "
            "builds it (it is called with no arguments)"
        )
    try:
        built = target()
    except TypeError as exc:
        if "argument" in str(exc):
            raise ModelLoadError(
                f"--factory {factory!r} must be callable with no arguments, but: "
                f"{_first_line(exc)}; wrap it, e.g. def build(): return Net(hidden=32)"
            ) from None
        raise ModelLoadError(
            f"--factory {factory!r} raised TypeError: {_first_line(exc)}"
        ) from None
    except Exception as exc:
        raise ModelLoadError(
            f"--factory {factory!r} raised {type(exc).__name__}: {_first_line(exc)}"
        ) from None
    if not isinstance(built, torch.nn.Module):
        raise ModelLoadError(
            f"--factory {factory!r} returned a {type(built).__name__}, not a torch.nn.Module"
        )
    return built


def _load_into(
    module: torch.nn.Module, state_dict: dict[str, torch.Tensor], factory: str, path: Path
) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys (in the model, not in the file): {brief(missing)}")
        if unexpected:
            parts.append(f"unexpected keys (in the file, not in the model): {brief(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {brief(mismatched, 3)}")
        hint = "; check that --factory builds the architecture these weights were saved from"
        prefix = _common_prefix_hint(missing, unexpected)
        if prefix:
            hint = f"; {prefix}"
        raise ModelLoadError(
            f"{path.name} does not fit the model built by {factory!r}: "
            + "; ".join(parts) + hint
        )
    try:
        module.load_state_dict(state_dict, strict=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{path.name} does not fit the model built by {factory!r}: {_first_line(exc)}"
        ) from None


def _common_prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    if not missing or not unexpected:
        return ""
    prefixes = {k.split(".", 1)[0] + "." for k in unexpected if "." in k}
    if len(prefixes) == 1:
        prefix = prefixes.pop()
        stripped = {k[len(prefix):] for k in unexpected if k.startswith(prefix)}
        if set(missing) <= stripped:
            return (
                f"every key in the file starts with {prefix!r} (saved from a wrapper such as "
                "DataParallel or a training module): save the inner model's state_dict(), or "
                f"strip the prefix: {{k.removeprefix({prefix!r}): v for k, v in sd.items()}}"
            )
    return ""


# --------------------------------------------------------------------------------------------
# ONNX
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
    _onnx2torch_module = onnx2torch
    return onnx2torch


_SAFE_ONNX_NODE_NAME = re.compile(r"[A-Za-z0-9_./\-]*\Z")


def _load_onnx(path: Path) -> torch.nn.Module:
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise ModelLoadError(
            f"{path.name} is not a readable ONNX file ({type(exc).__name__}: "
            f"{_first_line(exc)}); it may be truncated or corrupt, or its external data file "
            "is missing: export it again with torch.onnx.export"
        ) from None
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{path.name} fails the ONNX checker ({_first_line(exc)}); it may be truncated or "
            "corrupt: export it again with torch.onnx.export"
        ) from None
    if len(model.graph.node) == 0:
        raise ModelLoadError(f"{path.name} has an empty ONNX graph")

    _sanitise_onnx(model)
    onnx2torch = _import_onnx2torch()
    opset = _default_opset(model)
    try:
        return onnx2torch.convert(model)
    except NotImplementedError as exc:
        first_error = exc
    except Exception as exc:
        raise ModelLoadError(
            f"onnx2torch cannot convert {path.name}: {type(exc).__name__}: {_first_line(exc)}"
        ) from None

    if opset is not None and opset > _ONNX2TORCH_OPSET:
        from onnx import version_converter

        try:
            older = version_converter.convert_version(model, _ONNX2TORCH_OPSET)
            _sanitise_onnx(older)
            return onnx2torch.convert(older)
        except Exception as exc:
            first_error = exc
    raise ModelLoadError(
        f"onnx2torch cannot convert {path.name} (opset {opset}): {_first_line(first_error)}; "
        f"certify converts standard ONNX operators up to opset {_ONNX2TORCH_OPSET}: export with "
        f"torch.onnx.export(model, (x,), path, opset_version={_ONNX2TORCH_OPSET}, dynamo=False), "
        "or export to .pt2 with torch.export.save"
    ) from None


def _default_opset(model) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def _sanitise_onnx(model) -> None:
    """Make the graph safe and convertible without changing what it computes.

    * Node names become torch submodule names that torch.fx writes into generated source:
      any name outside [A-Za-z0-9_./-] is replaced by ``<op_type>_<index>``.
    * ``Reshape(allowzero=1)`` (written by the torch.export-based exporter; onnx2torch refuses
      it) computes the same as ``allowzero=0`` when the shape is a constant without zeros, so
      the attribute is dropped there.
    """
    from onnx import numpy_helper

    for index, node in enumerate(model.graph.node):
        if not _SAFE_ONNX_NODE_NAME.match(node.name):
            node.name = f"{node.op_type if node.op_type.isidentifier() else 'node'}_{index}"

    constants = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants[node.output[0]] = attr.t
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        for attr in list(node.attribute):
            if attr.name == "allowzero" and attr.i == 1 and node.input[1] in constants:
                shape = numpy_helper.to_array(constants[node.input[1]])
                if shape.size and bool(np.all(shape != 0)):
                    node.attribute.remove(attr)


# --------------------------------------------------------------------------------------------
# .pt2 (torch.export)
# --------------------------------------------------------------------------------------------

# Strings in the archive's JSON that never reach eval/exec/generated source (metadata kept in
# node.meta, constant string arguments that torch.fx writes with repr(), the torch version,
# and guard code, which module(check_guards=False) never compiles).
_PT2_FREE_TEXT_KEYS = frozenset({
    "stack_trace", "nn_module_stack", "source_fn_stack", "torch_fn", "custom", "from_node",
    "as_string", "as_strings", "torch_version", "guards_code",
})
# JSON documents stored as strings (pytree specs and their contexts): parsed and vetted.
_PT2_NESTED_JSON_KEYS = frozenset({"in_spec", "out_spec", "context"})
_PT2_SAFE_STR = re.compile(r"[A-Za-z0-9_.+\-]*\Z")
_PT2_KEY = re.compile(r"[A-Za-z0-9_.\-]+\Z")
_PT2_FQN = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*\Z")
_PT2_OP_TARGET = re.compile(
    r"torch\.ops\.(?:aten|prims)\.(?!__)[A-Za-z0-9_]+\.(?!__)[A-Za-z0-9_]+\Z"
)
_PT2_DENIED_OPS = frozenset({"from_file"})
_PT2_PY_TARGETS = frozenset(
    [f"_operator.{n}" for n in (
        "getitem", "add", "sub", "mul", "floordiv", "truediv", "neg", "mod", "pow",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "pos", "abs",
    )]
    + [f"math.{n}" for n in ("ceil", "floor", "trunc", "sqrt")]
    + [f"torch.{n}" for n in (
        "sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_sqrt", "sym_ite", "sym_sum",
    )]
)
_SYMPY_NAMES = frozenset({
    # sympy classes that srepr writes
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Mod", "Abs",
    "floor", "ceiling", "Equality", "Unequality", "StrictLessThan", "LessThan",
    "StrictGreaterThan", "GreaterThan", "And", "Or", "Not", "Piecewise", "ExprCondPair",
    "true", "false", "oo", "zoo", "nan", "Infinity", "NegativeInfinity", "NaN", "One", "Zero",
    "NegativeOne", "Half", "BooleanTrue", "BooleanFalse", "True", "False", "None",
    # torch.utils._sympy.functions, as torch's deserializer names them
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity",
    # keyword arguments: assumptions and Float's precision
    "precision", "algebraic", "antihermitian", "commutative", "complex", "composite", "even",
    "extended_negative", "extended_nonnegative", "extended_nonpositive", "extended_nonzero",
    "extended_positive", "extended_real", "finite", "hermitian", "imaginary", "infinite",
    "integer", "irrational", "negative", "noninteger", "nonnegative", "nonpositive", "nonzero",
    "odd", "polar", "positive", "prime", "rational", "real", "transcendental", "zero",
})
_SYMPY_SYMBOL_NAME = re.compile(r"[a-z]+[0-9]+\Z")
_SYMPY_TOKEN = re.compile(
    r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<number>[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)"
    r"|(?P<string>'[A-Za-z0-9_.+\-]*')"
    r"|(?P<op>\*\*|==|!=|<=|>=|[-+*/%(),=<>]))"
)


class _Pt2Refused(Exception):
    pass


def _load_pt2(path: Path) -> torch.nn.Module:
    data = path.read_bytes()
    try:
        from torch.export.pt2_archive._package import PT2ArchiveReader, load_pt2

        with PT2ArchiveReader(io.BytesIO(data)) as reader:
            _vet_pt2_archive(reader)
    except _Pt2Refused as exc:
        raise ModelLoadError(
            f"{path.name} was refused: {exc}. certify never runs code from a model file; "
            "export plain models with torch.export.save(torch.export.export(model.eval(), "
            "(x,)), path) on CPU"
        ) from None
    except Exception as exc:
        raise ModelLoadError(
            f"{path.name} is not a readable torch.export archive ({type(exc).__name__}: "
            f"{_first_line(exc)}); it may be truncated or corrupt, or not made by "
            "torch.export.save: export it again with torch.export.save"
        ) from None

    try:
        contents = load_pt2(io.BytesIO(data))
        programs = contents.exported_programs
        if "model" not in programs:
            raise RuntimeError(f"no program named 'model' (found {sorted(programs)})")
        module = programs["model"].module(check_guards=False)
    except Exception as exc:
        raise ModelLoadError(
            f"torch.export cannot load {path.name} ({type(exc).__name__}: {_first_line(exc)}); "
            f"export it again with torch.export.save under torch {torch.__version__}"
        ) from None
    _check_exported_eval_mode(module, path)
    return module


def _check_exported_eval_mode(module: torch.fx.GraphModule, path: Path) -> None:
    """An exported graph keeps the train/eval mode it was traced in; certify needs eval."""
    in_training = []
    for node in module.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for index, argument in enumerate(node.target._schema.arguments):
            if argument.name not in ("training", "train"):
                continue
            value = node.args[index] if index < len(node.args) else node.kwargs.get(
                argument.name, argument.default_value if argument.has_default_value() else None
            )
            if value is True:
                in_training.append(f"{node.name} ({node.target})")
    if in_training:
        raise ModelLoadError(
            f"{path.name} was exported in training mode (batch norm would use batch "
            f"statistics, dropout would be active), in: {brief(in_training, 3)}; call "
            "model.eval() before torch.export.export and save it again"
        )


def _vet_pt2_archive(reader) -> None:
    from torch.export.pt2_archive import constants as C

    names = reader.get_file_names()
    if len(set(names)) != len(names):
        raise _Pt2Refused("the archive has duplicate entries")
    if reader.read_string(C.ARCHIVE_VERSION_PATH) != C.ARCHIVE_VERSION_VALUE:
        raise _Pt2Refused("unknown archive version")
    for name in names:
        if name.startswith(C.AOTINDUCTOR_DIR) or name.startswith(C.EXECUTORCH_DIR):
            raise _Pt2Refused(
                f"it contains compiled code ({name}); AOTInductor / ExecuTorch packages are "
                "not accepted"
            )
    models = [
        n[len(C.MODELS_DIR):-len(".json")] for n in names
        if n.startswith(C.MODELS_DIR) and n.endswith(".json")
    ]
    if "model" not in models:
        raise _Pt2Refused("it holds no exported program named 'model'")
    for model in models:
        if not _PT2_FQN.match(model):
            raise _Pt2Refused(f"unexpected program name {model!r}")
        for legacy in (f"{C.WEIGHTS_DIR}{model}.pt", f"{C.CONSTANTS_DIR}{model}.pt"):
            if legacy in names:
                raise _Pt2Refused(f"it uses the legacy pickled layout ({legacy})")
        for config_name, is_constants in (
            (C.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model), False),
            (C.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model), True),
        ):
            if config_name not in names:
                raise _Pt2Refused(f"{config_name} is missing")
            config = json.loads(reader.read_string(config_name))
            entries = config.get("config") if isinstance(config, dict) else None
            if not isinstance(entries, dict):
                raise _Pt2Refused(f"{config_name} is malformed")
            for fqn, meta in entries.items():
                if not _PT2_FQN.match(fqn) or not isinstance(meta, dict):
                    raise _Pt2Refused(f"unexpected entry {fqn!r} in {config_name}")
                if meta.get("use_pickle"):
                    raise _Pt2Refused(f"{fqn!r} is stored as a pickle")
                path_name = meta.get("path_name", "")
                if not isinstance(path_name, str) or not _PT2_SAFE_STR.match(path_name):
                    raise _Pt2Refused(f"unexpected payload name for {fqn!r}")
                if is_constants and not path_name.startswith(C.TENSOR_CONSTANT_FILENAME_PREFIX):
                    raise _Pt2Refused(
                        f"constant {fqn!r} is a Python or TorchScript object, not a tensor"
                    )
        sample = C.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)
        if sample in names:
            payload = reader.read_bytes(sample)
            if payload:
                # torch retries with weights_only=False when this fails; make sure it cannot.
                try:
                    torch.load(io.BytesIO(payload), weights_only=True)
                except Exception:
                    raise _Pt2Refused(
                        "its sample inputs hold objects other than tensors (or were saved on "
                        "a device this machine lacks)"
                    ) from None
        document = json.loads(reader.read_string(C.MODELS_FILENAME_FORMAT.format(model)))
        _vet_pt2_json(document, key=None, where=f"models/{model}.json")


def _vet_pt2_json(value: Any, key: str | None, where: str) -> None:
    if isinstance(value, dict):
        if "as_custom_obj" in value:
            raise _Pt2Refused("it uses custom (TorchScript or opaque) objects")
        is_node = "target" in value and "inputs" in value
        for child_key, child in value.items():
            if not isinstance(child_key, str) or not _PT2_KEY.match(child_key):
                raise _Pt2Refused(f"unexpected key {str(child_key)[:60]!r} in {where}")
            if child_key == "target" and is_node:
                _vet_pt2_target(child)
            elif child_key == "as_operator":
                _vet_pt2_target(child)
            _vet_pt2_json(child, child_key, where)
    elif isinstance(value, list):
        for item in value:
            _vet_pt2_json(item, key, where)
    elif isinstance(value, str):
        if key in _PT2_FREE_TEXT_KEYS:
            return
        if key == "expr_str":
            _vet_sympy_expression(value)
        elif key in _PT2_NESTED_JSON_KEYS and not _PT2_SAFE_STR.match(value):
            try:
                nested = json.loads(value)
            except ValueError:
                raise _Pt2Refused(f"malformed {key} in {where}") from None
            _vet_pt2_json(nested, key, where)
        elif not _PT2_SAFE_STR.match(value):
            raise _Pt2Refused(f"unexpected {key or 'value'} {value[:60]!r} in {where}")
    elif value is None or isinstance(value, (bool, int, float)):
        return
    else:  # pragma: no cover - json only produces the types above
        raise _Pt2Refused(f"unexpected value in {where}")


def _vet_pt2_target(target: Any) -> None:
    if not isinstance(target, str):
        raise _Pt2Refused("a node target is not a string")
    if _PT2_OP_TARGET.match(target):
        if target.split(".")[3] in _PT2_DENIED_OPS:
            raise _Pt2Refused(f"it calls {target}")
        return
    if target in _PT2_PY_TARGETS:
        return
    raise _Pt2Refused(
        f"it calls {target[:80]!r}; only torch.ops.aten / torch.ops.prims operators (and basic "
        "operator / math / torch.sym_* functions) are accepted"
    )


def _vet_sympy_expression(text: str) -> None:
    if len(text) > 10_000:
        raise _Pt2Refused("a shape expression is too long")
    position = 0
    while position < len(text):
        match = _SYMPY_TOKEN.match(text, position)
        if match is None or match.end() == position:
            if text[position:].strip() == "":
                return
            raise _Pt2Refused(f"unexpected shape expression {text[:60]!r}")
        name = match.group("name")
        if name is not None and name not in _SYMPY_NAMES and not _SYMPY_SYMBOL_NAME.match(name):
            raise _Pt2Refused(f"unexpected name {name[:40]!r} in shape expression")
        position = match.end()

