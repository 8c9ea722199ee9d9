"""Validation of what callers pass to the public API: a batch of inputs for a network, an
affine layer's index, finite parameters.

Two exceptions, raised by ``certify.radius.layer_radii``,
``certify.certificate.certify_network``, ``certify.multilayer.multilayer_bound`` and
``uniform_budget``, ``certify.compressed.compression_check`` and
``certify.network.Network.from_module``; messages say what is wrong and how to fix it:

* :class:`InputError` (a ``ValueError``): a value certify cannot use: NaN or Inf in the
  inputs or in the network's weights, an empty batch, a shape the network cannot take, an
  index that is not an affine layer, an unknown option;
* :class:`InputTypeError` (a ``TypeError``): an argument of the wrong kind: inputs that are
  not a tensor or numpy array of floats (integers, booleans, complex numbers), a network that
  is not a ``certify.network.Network``, a hand-built network whose weights are not float64.

Floating-point inputs of any precision are accepted and converted to float64 (every float16,
bfloat16 or float32 value is a float64 value, so nothing is lost). The caller's tensors and
modules are never modified.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import numpy as np
import torch

from certify.network import Affine, Flatten, Network, advance

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
    """A ``Network`` whose affine steps have finite float64 weights and biases.

    ``Network.from_module`` guarantees both; a network built from its steps by hand may not,
    and NaN weights would otherwise come out as NaN radii.
    """
    if not isinstance(network, Network):
        raise InputTypeError(
            f"network must be a certify.network.Network, got {type(network).__name__}; build "
            "one from a model with Network.from_module(model)")
    if not network.affine_indices:
        raise InputError("the network has no affine (Linear or Conv2d) step to certify")
    for i in network.affine_indices:
        step = network.steps[i]
        for part in ("weight", "bias"):
            tensor = getattr(step, part)
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float64:
                raise InputTypeError(
                    f"layer {step.name!r}: its {part} must be a float64 tensor, got "
                    f"{getattr(tensor, 'dtype', type(tensor).__name__)}; build the steps from "
                    "float64 tensors (Network.from_module converts)")
    require_finite(((f"{network.steps[i].name}.{part}", getattr(network.steps[i], part))
                    for i in network.affine_indices for part in ("weight", "bias")), "the network")


def affine_index(network: Network, index) -> int:
    """``index`` as an int, checked to be the step index of an affine layer."""
    if isinstance(index, bool):  # an int to Python, never meant as a layer
        raise InputTypeError(f"index must be an integer step index, got {index!r}")
    try:
        index = operator.index(index)
    except TypeError:
        raise InputTypeError(
            f"index must be an integer step index, got {type(index).__name__} {index!r}; the "
            f"affine layers are at {network.affine_indices}") from None
    if index not in network.affine_indices:
        names = ", ".join(f"{i} ({network.steps[i].name!r})" for i in network.affine_indices)
        raise InputError(f"step {index} is not an affine (Linear or Conv2d) layer; the affine "
                         f"layers are at steps {names}")
    return index


def _expected(network: Network) -> tuple[str, int | None, int | None]:
    """What the first affine layer (``check_network`` ensures there is one) needs: the shape
    in words, the number of dimensions and the size of axis 1 (``None``: not fixed by that
    layer alone)."""
    flattened = False
    for step in network.steps:
        if isinstance(step, Flatten):
            flattened = True
        if isinstance(step, Affine):
            break
    n = step.weight.shape[1]
    if flattened:
        return f"(B, ...) with {n} values per input once flattened", None, None
    if step.is_conv:
        return f"(B, {n}, H, W)", 4, n
    return f"(B, {n})", 2, n


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


def inputs_for(network: Network, x, name: str = "x") -> torch.Tensor:
    """``x`` checked to be a batch the network can take, as a float64 tensor.

    ``x``: a torch tensor or numpy array of floating-point values (any precision; converted
    to float64 without loss) with at least one input, shaped for the network's first affine
    layer (``(B, in_features)`` for a dense one, ``(B, C, H, W)`` for a convolution) and
    finite. The network is checked too (:func:`check_network`).

    Raises :class:`InputTypeError` for a wrong type or dtype and :class:`InputError` for an
    empty batch, a wrong shape or NaN/Inf entries (naming the first offending inputs).
    """
    check_network(network)
    x = _as_float64(x, name)
    expected, ndim, width = _expected(network)
    shape = tuple(x.shape)
    if x.ndim < 2 or (ndim is not None and x.ndim != ndim) or \
            (width is not None and shape[1] != width):
        hint = f"; for a single input pass {name}[None]" \
            if ndim is not None and x.ndim == ndim - 1 and shape[:1] == (width,) else ""
        raise InputError(f"{name} has shape {shape} but the network takes a batch of shape "
                         f"{expected}{hint}")
    if shape[0] == 0:
        raise InputError(f"{name} holds no inputs (shape {shape}); pass at least one")
    bad = (~torch.isfinite(x)).reshape(shape[0], -1).any(dim=1).nonzero()[:, 0].tolist()
    if bad:
        raise InputError(f"{name} has NaN or Inf entries in {len(bad)} of {shape[0]} inputs, "
                         f"at indices {brief(bad)}; certificates need finite inputs: remove or "
                         "repair them")
    # Later steps constrain the shape too (a convolution's spatial size must fit the dense
    # layer after it): run one input, naming the step that refuses it.
    value, stack = x[:1], ()
    for i, step in enumerate(network.steps):
        try:
            value, stack = advance(step, value, stack)
        except (RuntimeError, IndexError) as err:
            raise InputError(
                f"{name} has shape {shape}, which step {i} ({step.name!r}) of the network cannot "
                f"take ({str(err).splitlines()[0]}); pass inputs of the size the network was "
                f"built for, a batch of shape {expected}") from None
    return x
