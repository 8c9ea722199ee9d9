"""What the command line is given, read and checked before any long work starts: output
paths, option values, and the data file (``x``, optional labels ``y``) against the model.

Every problem is a ``CommandError`` (exit status 2) whose message says how to fix it.
"""

from __future__ import annotations

import argparse
from pathlib import Path


class CommandError(Exception):
    """A usage or input error of a command (exit status 2); the message says how to fix it."""


def writable(path: str | None, option: str) -> Path | None:
    """``path`` can be written: its folder exists and it is not a folder itself."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise CommandError(f"{option} {path} is a folder; give a file name inside it")
    if not path.parent.is_dir():
        raise CommandError(f"{option} {path}: the folder {path.parent} does not exist; "
                           "create it first")
    return path


def plot_path(path: str | None) -> Path | None:
    """``--plot``: a PNG unless the name asks for another format matplotlib writes."""
    path = writable(path, "--plot")
    if path is None:
        return None
    if not path.suffix:
        return path.with_suffix(".png")
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise CommandError(f"--plot {path}: unknown image format {path.suffix!r}; use one of "
                           f"{', '.join('.' + f for f in sorted(formats))} (e.g. radii.png)")
    return path


def positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive whole number, got "
                                             f"{text!r}")
        return value
    return parse


def steps_option(text: str) -> int:
    """``--optimise``: a whole number of steps, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--optimise must be a whole number of steps (0 or "
                                         f"more, e.g. 20), got {text!r}")
    return value


def read_data(path: str):
    """``x`` (and ``y`` if present) from a ``.npz`` archive, or ``x`` from a ``.npy`` array."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise CommandError(f"--data {path}: no such file")
    if path.suffix.lower() not in (".npz", ".npy"):
        raise CommandError(f"--data {path}: expected a .npz archive with an array x (and "
                           "optionally labels y) or a .npy array of inputs")
    try:
        with open(path, "rb"):
            loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded, None
        with loaded as data:
            if "x" not in data:
                raise CommandError(f"{path} has no array 'x' (found {list(data)}); save the "
                                   "inputs as x, e.g. np.savez(path, x=inputs, y=labels)")
            return data["x"], (data["y"] if "y" in data else None)
    except (OSError, ValueError, EOFError) as err:
        raise CommandError(f"cannot read {path} as {path.suffix}: {err}") from None


def inputs(x, path: str, limit: int | None):
    import numpy as np

    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise CommandError(f"{path}: 'x' holds {x.dtype} values; inputs must be numbers")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2:
        raise CommandError(f"{path}: 'x' has shape {x.shape}; it needs a batch axis first, "
                           "(inputs, features...)")
    x = x[:limit]
    if len(x) == 0:
        raise CommandError(f"{path}: 'x' holds no inputs")
    bad = np.nonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0]
    if bad.size:
        raise CommandError(f"{path}: 'x' must be finite; inputs {bad[:5].tolist()} hold NaN or "
                           "Inf")
    return x


def labels(y, path: str, count: int, limit: int | None, classes: int):
    """``y`` as class indices, one per input of the file (``count``), then limited; or
    ``None`` when the data has no labels."""
    import numpy as np

    if y is None:
        return None
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != count:
        raise CommandError(f"{path}: 'y' has shape {y.shape} but 'x' has {count} inputs; y "
                           "holds one class index per input")
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating)
                                                   and np.all(np.mod(y, 1) == 0))):
        raise CommandError(f"{path}: 'y' must hold class indices (integers), got {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= classes:
        raise CommandError(f"{path}: 'y' holds classes outside 0..{classes - 1}, the model's "
                           f"{classes} outputs")
    return y[:limit]


CROSSCHECK_INPUTS = 16


def crosscheck_onnx(path: str, module, x) -> str:
    """Compare the converted ONNX model with onnxruntime on the first inputs (at most
    ``CROSSCHECK_INPUTS``); the line that reports the largest difference. A disagreement is a
    ``ModelLoadError`` (exit status 2)."""
    from certify.formats.loading import onnx_crosscheck

    checked = x[:CROSSCHECK_INPUTS]
    largest = onnx_crosscheck(path, module, checked)
    return (f"onnxruntime cross-check: largest difference {largest:.2g} on {len(checked)} "
            f"input{'s' if len(checked) != 1 else ''}")


def load(args: argparse.Namespace):
    """Network (the model's graph, captured for inputs shaped like the data's), inputs,
    labels (or ``None``) and model hash, validated. An ONNX model is cross-checked against
    onnxruntime first (the result on stderr)."""
    import sys

    from certify.capture.export import UnsupportedModelError, capture
    from certify.formats.loading import file_sha256, load_model

    x, y = read_data(args.data)
    count = len(x)
    x = inputs(x, args.data, args.limit)
    module = load_model(args.model, factory=args.factory)
    if Path(args.model).suffix.lower() == ".onnx":
        print(crosscheck_onnx(args.model, module, x), file=sys.stderr, flush=True)
    try:
        network = capture(module, x[:1])
    except UnsupportedModelError:
        refusal = _refusal(module, x[:1])
        if refusal is not None:  # the data, not the model, is the problem
            raise CommandError(f"inputs of shape {x.shape[1:]} do not fit the model: "
                               f"{refusal}") from None
        raise
    y = labels(y, args.data, count, args.limit, network.nodes[-1].shape[0])
    return network, x, y, file_sha256(args.model)


def _refusal(module, x) -> str | None:
    """Why ``module`` itself cannot take the inputs ``x`` (run on a float64 copy in eval
    mode), or ``None`` when it can."""
    import torch

    from certify.capture.export import float64_copy

    try:
        copied = float64_copy(module)
        with torch.no_grad():
            copied(torch.from_numpy(x))
    except Exception as err:  # a module can fail on a wrong shape in any way it likes
        lines = str(err).strip().splitlines()
        return f"{type(err).__name__}: {lines[0] if lines else ''}"
    return None
