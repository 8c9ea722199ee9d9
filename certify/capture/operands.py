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


def _per_input(value, fx, what: str, ndim: int):
    """A constant operand as a tensor that broadcasts per input (batch axis dropped)."""
    t = value.value if isinstance(value, Const) else torch.tensor(float(value), dtype=torch.float64)
    if t.ndim >= ndim:
        if t.ndim > ndim or t.shape[0] != 1:
            raise UnsupportedModelError(f"{fx.name}: {what} by a constant that varies along "
                                        "the batch axis")
        t = t[0]
    return t.to(torch.float64)
