"""State dicts (``.safetensors``, ``.pt``, ``.pth``) and the ``--factory`` that builds their model.

A state dict holds weights only; the architecture comes from the user's own code:
``factory="package.module:callable"`` is imported, called with no arguments, and must return
the ``torch.nn.Module`` the weights belong to, which they are loaded into with
``load_state_dict(strict=True)`` after a check that lists every missing, unexpected or
mis-shaped key.

Nothing in the file is executed: ``.safetensors`` is plain tensor data, and ``.pt`` / ``.pth``
are read with ``torch.load(..., weights_only=True)``, which only rebuilds tensors and plain
containers; a pickled model (or any other object) is refused, not unpickled.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from certify.formats.errors import ModelLoadError, first_line
from certify.graph.inputs import brief

_EXPORT_HINT = (
    "save the weights with torch.save(model.state_dict(), 'model.pt') (or "
    "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')) and pass "
    "--factory package.module:callable naming a function that builds the model, or export "
    "the whole model with torch.export.save(torch.export.export(model, (x,)), 'model.pt2') or "
    "torch.onnx.export(model, (x,), 'model.onnx')"
)


def load_state_dict_into_factory(path: Path, factory: str | None) -> torch.nn.Module:
    """The model that ``factory`` builds, with the weights of the state dict at ``path``."""
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
    return module


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            loaded: Any = load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelLoadError(
                f"{path.name} is not a readable safetensors file ({first_line(exc)}); it may "
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
            f"({detail.group(0) if detail else first_line(exc)}); it may be truncated or "
            "corrupt, or written with pickle rather than torch.save (certify never unpickles "
            "code): save it again with torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:
        raise ModelLoadError(
            f"{path.name} is not a readable torch.save file ({type(exc).__name__}: "
            f"{first_line(exc)}); it may be truncated or corrupt: save it again with "
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
            f"{type(exc).__name__}: {first_line(exc)}"
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
                f"{first_line(exc)}; wrap it, e.g. def build(): return Net(hidden=32)"
            ) from None
        raise ModelLoadError(
            f"--factory {factory!r} raised TypeError: {first_line(exc)}"
        ) from None
    except Exception as exc:
        raise ModelLoadError(
            f"--factory {factory!r} raised {type(exc).__name__}: {first_line(exc)}"
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
            f"{path.name} does not fit the model built by {factory!r}: {first_line(exc)}"
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

