"""The shapes of the smooth and hard activations that the bounds of
``certify.graph.operators.activation`` rely on: for those that fall to one minimum and then
rise (``DIPS``), the minimiser, a floor below the minimum and an interval containing the
derivative everywhere; for the clipped lines, their kinks and slope; the Lipschitz constants
of both GELUs, and the curvatures ``sup |phi''|`` the remainders of THEORY.md section 9 use
(``CURVATURE``). Each is derived or located in ``proofs/lipschitz.py`` (``certify prove``),
and the numpy checker derives its own copy (``certify.check.operators.activation``).
"""

import math

GELU_LIPSCHITZ = (1 + math.erf(1)) / 2 + math.exp(-1) / math.sqrt(math.pi)
# GELU decreases left of its minimiser and increases right of it; its minimum is -0.16997...,
# so GELU_FLOOR is a lower bound of it.
GELU_ARGMIN = -0.7517916
GELU_FLOOR = -0.17
# GELU' = Phi(x) + x phi(x) ranges over [1 - GELU_LIPSCHITZ, GELU_LIPSCHITZ] (extremes at
# -+sqrt(2), by the symmetry Phi(-x) = 1 - Phi(x)); widened for rounding.
GELU_DERIVATIVE = (-(GELU_LIPSCHITZ - 1) * (1 + 1e-12), GELU_LIPSCHITZ * (1 + 1e-12))

# GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): its derivative
# peaks at x = 1.41850400879 (checked in proofs/lipschitz.py), and phi'(-x) = 1 - phi'(x) because
# phi(x) - phi(-x) = x; its minimum -0.170040750571 lies at x = -0.7524614220710.
GELU_TANH_LIPSCHITZ = 1.1289930686587718 * (1 + 1e-12)
GELU_TANH_DERIVATIVE = (1 - GELU_TANH_LIPSCHITZ * (1 + 1e-12), GELU_TANH_LIPSCHITZ * (1 + 1e-12))
GELU_TANH_ARGMIN = -0.7524614220710
GELU_TANH_FLOOR = -0.1700408

# SiLU x sigmoid(x): phi' = s (1 + x (1 - s)) vanishes at -1.27846454276107 (the minimum,
# -0.27846454276107), and phi'' at -+2.39935728051547, where phi' is -0.0998393201288669
# and 1.0998393201288669 (proofs/lipschitz.py locates them).
SILU_DERIVATIVE = (-0.0998393201288670 * (1 + 1e-12), 1.0998393201288670 * (1 + 1e-12))
# Mish x tanh(softplus(x)): minimum -0.30884341301725 at -1.19243121451550; phi'' vanishes
# at -2.25637639636079 and 1.49057117948543, where phi' is -0.112526122389463 and
# 1.08849816125173 (proofs/lipschitz.py).
MISH_DERIVATIVE = (-0.112526122389463 * (1 + 1e-12), 1.08849816125173 * (1 + 1e-12))
# The activations that fall to one minimum and then rise: (minimiser, a floor below the
# minimum, an interval containing phi' everywhere). Hard-swish x relu6(x + 3) / 6 is 0 left
# of -3, x right of 3 and x (x + 3) / 6 between: minimum -3/8 at -3/2, phi' in [-1/2, 3/2].
DIPS = {"gelu": (GELU_ARGMIN, GELU_FLOOR, GELU_DERIVATIVE),
        "gelu_tanh": (GELU_TANH_ARGMIN, GELU_TANH_FLOOR, GELU_TANH_DERIVATIVE),
        "silu": (-1.27846454276107, -0.27847, SILU_DERIVATIVE),
        "mish": (-1.19243121451550, -0.30885, MISH_DERIVATIVE),
        "hardswish": (-1.5, -0.37501, (-0.5, 1.5))}
# The clipped lines phi(x) = clamp(a x + b, low, high): hard-sigmoid relu6(x + 3) / 6 and
# hardtanh(min_val, max_val); phi' is a between the kinks, 0 outside.
HARDSIGMOID = (-3.0, 3.0, 1 / 6)

# sup |phi''| over the real line, the curvature of the section-9 remainder
# |phi(u + d) - phi(u) - phi'(u) d| <= sup |phi''| d^2 / 2: GELU'' = phi(x) (2 - x^2) and its
# tanh approximation peak at 0 (sqrt(2 / pi)), tanh'' = -2 tanh sech^2 at atanh(1 / sqrt 3)
# (4 / (3 sqrt 3)), sigmoid'' = s (1 - s) (1 - 2 s) at s = 1/2 -+ 1/(2 sqrt 3) (1 / (6 sqrt 3)),
# SiLU'' = s' (2 + x (1 - 2 s)) at 0 (1/2), Mish'' at -0.0879 (0.64420463722641, located on a
# grid in tests/graph/test_deviation_rules.py). Raised by 1e-9 relative for rounding.
CURVATURE = {kind: value * (1 + 1e-9) for kind, value in {
    "gelu": math.sqrt(2 / math.pi), "gelu_tanh": math.sqrt(2 / math.pi),
    "tanh": 4 / (3 * math.sqrt(3)), "sigmoid": 1 / (6 * math.sqrt(3)), "silu": 0.5,
    "mish": 0.64420463722641 * (1 + 1e-6)}.items()}
