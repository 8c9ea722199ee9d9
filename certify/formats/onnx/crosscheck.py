"""Compare a converted ONNX model with onnxruntime on given inputs.

certify certifies the torch module that onnx2torch makes of an ONNX file, in float64; the file
itself is run by onnxruntime. ``onnx_crosscheck`` runs both on the same inputs and raises
``certify.formats.errors.ModelLoadError`` where they disagree, so a conversion that does not
compute what the file does is never certified in its place. ``certify model`` and ``certify
check`` run it on the first inputs of every ONNX model they load.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from certify.formats.errors import ModelLoadError, first_line

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
    values are fed to ``module`` as float64. A graph with a fixed batch size (the default
    exporter writes one) is run on batches of that size, the last one filled up with the
    first inputs again. Returns the largest absolute difference over all outputs; raises
    ``ModelLoadError`` where ``|torch - ort| > atol + rtol * |ort|``, or where the inputs
    do not fit the graph.
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
            f"onnxruntime cannot load {path.name}: {first_line(exc)}"
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
        value = np.ascontiguousarray(np.asarray(value), dtype=dtype)
        _check_fits(value, spec, path)
        feed[spec.name] = value

    largest = 0.0
    for batch in _batches(feed, graph_inputs):
        largest = max(largest, _compare(session, batch, module, path, graph_inputs, rtol, atol))
    return largest


def _check_fits(value: np.ndarray, spec, path: Path) -> None:
    """``value`` has the rank the graph input declares and its fixed sizes past the first."""
    declared = list(spec.shape) if spec.shape is not None else None
    if declared is None:
        return
    fits = value.ndim == len(declared) and all(
        not isinstance(size, int) or size == given
        for size, given in zip(declared[1:], value.shape[1:])
    )
    if not fits:
        shown = ", ".join(str(s) if isinstance(s, int) else "batch" for s in declared)
        raise ModelLoadError(
            f"inputs of shape {tuple(value.shape[1:])} do not fit the model {path.name}: its "
            f"input {spec.name!r} has shape [{shown}]"
        )


def _batches(feed: dict[str, np.ndarray], graph_inputs) -> list[dict[str, np.ndarray]]:
    """``feed`` at once, or in batches of the graph's fixed batch size when it has one that
    differs from the number of inputs given (the last batch filled up cyclically)."""
    sizes = {spec.shape[0] if spec.shape else None for spec in graph_inputs}
    counts = {len(a) if a.ndim else None for a in feed.values()}
    if len(sizes) != 1 or len(counts) != 1:
        return [feed]
    size, count = sizes.pop(), counts.pop()
    if not isinstance(size, int) or size < 1 or not count or size == count:
        return [feed]
    rows = np.arange(-(-count // size) * size) % count
    return [
        {name: a[rows[start:start + size]] for name, a in feed.items()}
        for start in range(0, len(rows), size)
    ]


def _compare(session, feed, module, path: Path, graph_inputs, rtol, atol) -> float:
    try:
        expected = session.run(None, feed)
    except Exception as exc:
        raise ModelLoadError(
            f"onnxruntime failed on the given inputs for {path.name}: {first_line(exc)} "
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
            f"{type(exc).__name__}: {first_line(exc)}"
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
                "either the conversion is not faithful for this model (report it, or export to "
                ".pt2), or the model is so sensitive to rounding that the file's float32 and "
                "certify's float64 give different results (certify would certify the latter)"
            )
    return largest


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
