"""How a certificate names the bound that certified a layer (its ``method``): ``exact`` on
the last dense layer, else ``lipschitz+crown`` (or ``crown`` where no global bound exists)
with the local bound's options in parentheses, which ``certify check`` reads to recompute
each claim the same way."""

from __future__ import annotations

from certify.graph.inputs import InputError

# The local bound's options, as ``method`` names them; "deviation": the second-order bound of
# THEORY.md section 9 (certify.bounds.deviations) certified some inputs; "optimised": some
# were certified on optimised ReLU slopes (certify.bounds.slopes), stored in the witnesses.
OPTIONS = ("forward", "refined", "ball", "deviation", "optimised")


def check_switch(name: str, value) -> None:
    """``InputError`` unless the option ``name`` (``refine``, ``enclose``, ``ball``,
    ``deviation``) is ``True``, ``False`` or ``"auto"``."""
    if value not in (True, False, "auto"):
        raise InputError(f"{name} must be True, False or 'auto', got {value!r}")


def check_steps(optimise) -> None:
    """``InputError`` unless ``optimise`` (steps of the optimised slopes) is an int >= 0."""
    if isinstance(optimise, bool) or not isinstance(optimise, int) or optimise < 0:
        raise InputError(f"optimise must be a number of steps (an int >= 0), got {optimise!r}")


def method_options(enclose: bool, refine: bool, ball: bool = False,
                   deviation: bool = False, optimised: bool = False) -> str:
    """The local bound's options as ``method`` names them, in ``OPTIONS``' order:
    ``forward`` (enclosures), ``refined`` (some inputs refined), ``ball`` (SDP-CROWN's
    offsets), ``deviation`` (section 9's bound), ``optimised`` (optimised slopes), e.g.
    ``(forward,ball)``; nothing without any."""
    used = (enclose, refine, ball, deviation, optimised)
    options = [name for name, on in zip(OPTIONS, used) if on]
    return f"({','.join(options)})" if options else ""


def merged_method(methods) -> str:
    """One ``method`` for the chunks of a batch (each chunk's refinement policy decides on
    its own inputs): every option any chunk used, which ``certify check`` tries in turn."""
    base = {m.partition("(")[0] for m in methods}
    if len(base) != 1:
        raise ValueError(f"the chunks of one layer name different bounds: {sorted(base)}")
    used = set().union(*(m.partition("(")[2].rstrip(")").split(",") for m in methods))
    return base.pop() + method_options(*(name in used for name in OPTIONS))
