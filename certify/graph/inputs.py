"""Validation of what callers pass to the public API: a batch of inputs for a network, an
affine layer's index, finite parameters.

Two exceptions, raised by ``certify.radii.radius.layer_radii``,
``certify.certificate.document.certify_network``, ``certify.radii.multilayer.multilayer_bound`` and
``uniform_budget``, ``certify.radii.compressed.compression_check`` and
``certify.capture.export.capture``; messages say what is wrong and how to fix it:

* ``InputError`` (a ``ValueError``): a value certify cannot use: NaN or Inf in the
  inputs or in the network's weights, an empty batch, a shape the network cannot take,
  inputs on another device than the network, an index that is not an affine layer, an
  unknown option;
* ``InputTypeError`` (a ``TypeError``): an argument of the wrong kind: inputs that are
  not a tensor or numpy array of floats (integers, booleans, complex numbers), a network that
  is not a ``certify.graph.graph.Graph``, a hand-built graph whose weights are not float64.

Floating-point inputs of any precision are accepted and converted to float64 (every float16,
bfloat16 or float32 value is a float64 value, so nothing is lost). The caller's tensors and
modules are never modified.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import numpy as np
import torch

from certify.graph.graph import Graph

__all__ = ["InputError", "InputTypeError", "affine_index", "check_network", "inputs_for",
           "require_finite"]


class InputError(ValueError):
    """A value the public API cannot use; the message says what is wrong and how to fix it."""


class InputTypeError(TypeError):
    """An argument of the wrong type or dtype; the message says what to pass instead."""


def require_finite(named: Iterable[tuple[str, torch.Tensor]], what: str,
                   error: type[Exception] = InputError) -> None:
    """Raise ``error`` naming every floating tensor of ``named`` with a NaN or Inf entry
    (``what``: whose parameters they are, e.g. "the model")."""
    bad = []
    for name, tensor in named:
        tensor = tensor.detach()
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            continue
        kinds = [kind for kind, test in (("NaN", torch.isnan), ("Inf", torch.isinf))
                 if bool(test(tensor).any())]
        bad.append(f"{name} ({int((~finite).sum())} {'/'.join(kinds)} of {tensor.numel()})")
    if bad:
        raise error(f"{what} has non-finite parameters: {brief(bad)}; certificates need finite "
                    "weights: check the training run (diverged?) or the model file")


def brief(items, limit: int = 5) -> str:
    """The first ``limit`` items, and how many more there are."""
    items = list(items)
    shown = ", ".join(map(str, items[:limit]))
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def check_network(network) -> None:
    """A ``Graph`` whose affine layers have finite float64 weights and biases.

    ``certify.capture.export.capture`` guarantees both; a graph changed by hand
    (``Graph.replace``) may not, and NaN weights would otherwise come out as NaN radii.
    """
    if not isinstance(network, Graph):
        raise InputTypeError(
            f"network must be a certify.graph.graph.Graph, got {type(network).__name__}; build "
            "one from a model with certify.capture.export.capture(model, example)")
    if not network.affine_indices:
        raise InputError("the network has no affine layer (Linear, Conv1d/Conv2d, matmul by "
                         "a weight) to certify")
    for i in network.affine_indices:
        layer = network.layer(i)
        for part in ("weight", "bias"):
            tensor = getattr(layer, part)
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float64:
                raise InputTypeError(
                    f"layer {network.nodes[i].name!r}: its {part} must be a float64 tensor, "
                    f"got {getattr(tensor, 'dtype', type(tensor).__name__)}; build the "
                    "operators from float64 tensors (certify.capture.export.capture converts)")
            if tensor.device != network.device:
                raise InputError(
                    f"layer {network.nodes[i].name!r}: its {part} is on {tensor.device} but "
                    f"the first layer's weight on {network.device}; move the whole graph "
                    "with network.to(device)")
    require_finite(((f"{network.nodes[i].name}.{part}", getattr(network.layer(i), part))
                    for i in network.affine_indices for part in ("weight", "bias")), "the network")


def affine_index(network: Graph, index) -> int:
    """``index`` as an int, checked to be the node index of an affine layer."""
    if isinstance(index, bool):  # an int to Python, never meant as a layer
        raise InputTypeError(f"index must be an integer node index, got {index!r}")
    try:
        index = operator.index(index)
    except TypeError:
        raise InputTypeError(
            f"index must be an integer node index, got {type(index).__name__} {index!r}; the "
            f"affine layers are at {network.affine_indices}") from None
    if index not in network.affine_indices:
        names = ", ".join(f"{i} ({network.nodes[i].name!r})" for i in network.affine_indices)
        raise InputError(f"node {index} is not an affine (Linear or convolution) layer; the "
                         f"affine layers are at nodes {names}")
    return index


def _expected(network: Graph) -> str:
    """The batch shape the graph takes, in words: ``(B, *input_shape)``."""
    return "(B, " + ", ".join(map(str, network.input_shape)) + ")"


def _as_float64(x, name: str) -> torch.Tensor:
    floats_only = "pass float16, float32 or float64 values (ints, bools and complex numbers " \
        "are not inputs)"
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f" or x.dtype.itemsize > 8:  # long double does not fit float64
            raise InputTypeError(f"{name} has numpy dtype {x.dtype}; {floats_only}, e.g. "
                                 f"{name}.astype(np.float64)")
        return torch.from_numpy(np.array(x, dtype=np.float64, order="C"))
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor or numpy array of inputs, got "
                             f"{type(x).__name__}; convert with torch.tensor(..., "
                             "dtype=torch.float64)")
    if not x.is_floating_point():
        raise InputTypeError(f"{name} has dtype {x.dtype}; {floats_only}, e.g. {name}.double()")
    return x.detach().to(torch.float64)


def inputs_for(network: Graph, x, name: str = "x") -> torch.Tensor:
    """``x`` checked to be a batch the network can take, as a float64 tensor.

    ``x``: a torch tensor or numpy array of floating-point values (any precision; converted
    to float64 without loss) with at least one input, of the shape the graph was captured
    for (``(B, *network.input_shape)``) and finite; a tensor on the network's device
    (``Graph.device``; a numpy array is put there). The network is checked too
    (``check_network``).

    Raises ``InputTypeError`` for a wrong type or dtype and ``InputError`` for an
    empty batch, a wrong shape, a tensor on another device or NaN/Inf entries (naming the
    first offending inputs).
    """
    check_network(network)
    if isinstance(x, np.ndarray):  # an array has no device: it goes where the network is
        x = _as_float64(x, name).to(network.device)
    else:
        x = _as_float64(x, name)
        if x.device != network.device:
            raise InputError(f"{name} is on {x.device} but the network on {network.device}; "
                             f"move one of them: {name}.to({str(network.device)!r}) or "
                             f"network.to({str(x.device)!r})")
    expected = _expected(network)
    shape = tuple(x.shape)
    if x.ndim < 2 or shape[1:] != tuple(network.input_shape):
        hint = f"; for a single input pass {name}[None]" \
            if shape == tuple(network.input_shape) else ""
        raise InputError(f"{name} has shape {shape} but the network takes a batch of shape "
                         f"{expected}{hint}")
    if shape[0] == 0:
        raise InputError(f"{name} holds no inputs (shape {shape}); pass at least one")
    bad = (~torch.isfinite(x)).reshape(shape[0], -1).any(dim=1).nonzero()[:, 0].tolist()
    if bad:
        raise InputError(f"{name} has NaN or Inf entries in {len(bad)} of {shape[0]} inputs, "
                         f"at indices {brief(bad)}; certificates need finite inputs: remove or "
                         "repair them")
    # A graph changed by hand may not fit its own input shape: run one input, naming the
    # node that refuses it.
    values = [x[:1]]
    for i, node in enumerate(network.nodes[1:], start=1):
        try:
            values.append(node.op(*(values[j] for j in node.inputs)))
        except (RuntimeError, IndexError) as err:
            raise InputError(
                f"{name} has shape {shape}, which node {i} ({node.name!r}) of the network "
                f"cannot take ({str(err).splitlines()[0]}); pass inputs of the size the "
                f"network was built for, a batch of shape {expected}") from None
    return x
