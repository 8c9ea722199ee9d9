"""Constant operands of ATen calls, as the rules of ``certify.capture.aten`` and
``certify.capture.transformers`` read them: a layer's weight and bias must be constants (one
computed from the input is refused), an absent bias is zeros, and the constant of an
arithmetic operation broadcasts per input (it may not vary along the batch axis).
"""

from __future__ import annotations

import torch

from certify.capture.build import Const, UnsupportedModelError


def _const(value, fx, what: str) -> Const:
    if isinstance(value, Const):
        return value
    raise UnsupportedModelError(
        f"{fx.name}: {what} is computed from the input; certify reads a layer's weight and "
        "bias as parameters or constants")


def _zeros(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.float64)


def _per_input(value, fx, what: str, ndim: int, axis: int = 0) -> torch.Tensor:
    """A constant operand as a tensor that broadcasts per input: aligned from the right with
    a computed tensor of ``ndim`` axes whose batch axis is ``axis``, the constant's axis there
    dropped. Along it the constant must repeat one slice (size one, or a constant expanded to
    the batch: ``cls.expand(B, -1, -1)``, a mask repeated for every input). Numbers become
    float64; masks stay boolean."""
    t = value.value if isinstance(value, Const) else torch.tensor(float(value), dtype=torch.float64)
    if t.ndim > ndim:
        raise UnsupportedModelError(f"{fx.name} ({what}) uses a constant of shape "
                                    f"{tuple(t.shape)}, with more axes than the computed tensor")
    here = t.ndim - ndim + axis  # the constant's axis along the batch, if it reaches it
    if here >= 0:
        first = t.select(here, 0)
        if not bool((t == first.unsqueeze(here)).all()):
            raise UnsupportedModelError(
                f"{fx.name} ({what}) uses a constant that varies along the batch axis (shape "
                f"{tuple(t.shape)}); certify treats every input alike: give the constant one "
                "slice along the batch (size 1), the same for every input")
        t = first
    return t if t.dtype == torch.bool else t.to(torch.float64)
