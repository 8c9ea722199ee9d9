"""Bad inputs: each gives a ValueError or TypeError whose message names the problem.

Covers NaN/Inf, wrong shapes, empty vectors, non-numeric data, unknown norm names and
entrywise exponents p < 1 for every public entry point of ``certify.closed_forms.perturbation``.
(``p = 1`` is NOT an error: it is the entrywise sum norm, checked below.)
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import certify

NAN, INF = float("nan"), float("inf")
ALL_NORMS = ["fro", "spectral", "max", "sum", 3.0]


def tc(r, h, norm="fro", **kw):
    return certify.target_change(r, h, norm, **kw)


def mf(c, h, m, norm="fro", **kw):
    return certify.margin_functional(c, h, m, norm, **kw)


def cp_(logits, h, norm="fro", **kw):
    return certify.class_pair_radius(logits, h, norm, **kw)


def bt(R, H, norm="fro"):
    return certify.batch_target_change(R, H, norm)


R2 = np.ones((2, 3))
H2 = np.arange(12.0).reshape(4, 3)

# (call, expected exception, substring of the message)
CASES = {
    # --- NaN / Inf, named by argument
    "target r NaN": (lambda n: tc([1.0, NAN], [1.0, 2.0], n), ValueError, "r contains NaN or Inf"),
    "target h Inf": (lambda n: tc([1.0], [INF, 2.0], n), ValueError, "h contains NaN or Inf"),
    "target h -Inf": (lambda n: tc([1.0], [-INF, 2.0], n), ValueError, "h contains NaN or Inf"),
    "target r NaN in batch": (lambda n: tc([[1.0], [NAN]], [1.0, 2.0], n), ValueError,
                              "r contains NaN or Inf"),
    "target h NaN with bias": (lambda n: tc([1.0], [NAN], n, bias=True), ValueError,
                               "h contains NaN or Inf"),
    "target torch NaN": (lambda n: tc(torch.tensor([NAN]), torch.ones(2), n), ValueError,
                         "r contains NaN or Inf"),
    "margin c NaN": (lambda n: mf([NAN, 1.0], [1.0], 1.0, n), ValueError, "c contains NaN or Inf"),
    "margin h Inf": (lambda n: mf([1.0], [1.0, INF], 1.0, n), ValueError, "h contains NaN or Inf"),
    "margin m NaN": (lambda n: mf([1.0], [1.0], NAN, n), ValueError, "m contains NaN or Inf"),
    "margin m Inf": (lambda n: mf([1.0], [1.0], INF, n), ValueError, "m contains NaN or Inf"),
    "pair logits NaN": (lambda n: cp_([1.0, NAN], [1.0], n), ValueError,
                        "logits contains NaN or Inf"),
    "pair h Inf": (lambda n: cp_([1.0, 0.0], [INF], n), ValueError, "h contains NaN or Inf"),
    # --- empty vectors
    "target r empty": (lambda n: tc([], [1.0], n), ValueError,
                       "r must have shape (..., k) with k >= 1"),
    "target h empty": (lambda n: tc([1.0], [], n), ValueError,
                       "h must have shape (..., k) with k >= 1"),
    "target h empty 2d": (lambda n: tc([[1.0]], np.zeros((1, 0)), n), ValueError,
                          "h must have shape (..., k) with k >= 1"),
    "margin c empty": (lambda n: mf([], [1.0], 1.0, n), ValueError, "c must have shape"),
    "margin h empty": (lambda n: mf([1.0], [], 1.0, n), ValueError, "h must have shape"),
    "pair logits empty": (lambda n: cp_([], [1.0], n), ValueError, "logits must have shape"),
    "pair h empty": (lambda n: cp_([1.0, 0.0], [], n), ValueError, "h must have shape"),
    # --- wrong shapes
    "target r scalar": (lambda n: tc(1.0, [1.0], n), ValueError, "r must have shape (..., k)"),
    "target h scalar": (lambda n: tc([1.0], 2.0, n), ValueError, "h must have shape (..., k)"),
    "target batch mismatch": (lambda n: tc(np.ones((2, 3)), np.ones((3, 4)), n), ValueError,
                              "do not broadcast"),
    "margin m batch mismatch": (lambda n: mf(np.ones((2, 3)), np.ones((2, 4)), np.ones(3), n),
                                ValueError, "do not broadcast"),
    "pair one class": (lambda n: cp_([1.0], [1.0], n), ValueError, "at least 2 classes"),
    "pair batch mismatch": (lambda n: cp_(np.ones((2, 3)), np.ones(4), n), ValueError,
                            "must share the batch shape"),
    # --- non-numeric data
    "target r strings": (lambda n: tc(["a", "b"], [1.0], n), TypeError,
                         "r must be a numeric array or tensor"),
    "target h ragged": (lambda n: tc([1.0], [[1.0, 2.0], [3.0]], n), TypeError,
                        "h must be a numeric array or tensor"),
    "target h None": (lambda n: tc([1.0], None, n), TypeError, "h must be a numeric array"),
    "target r complex": (lambda n: tc([1j], [1.0], n), TypeError, "r must be real-valued"),
    "margin c bool": (lambda n: mf([True], [1.0], 1.0, n), TypeError, "c must be real-valued"),
}


@pytest.mark.parametrize("norm", ALL_NORMS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_named(case, norm):
    call, exc, message = CASES[case]
    with pytest.raises(exc) as info:
        call(norm)
    assert message in str(info.value), f"message {str(info.value)!r} lacks {message!r}"


BATCH_CASES = {
    "R NaN": (lambda: bt(np.full((2, 3), NAN), H2), ValueError, "R contains NaN or Inf"),
    "H Inf": (lambda: bt(R2, np.where(H2 > 5, INF, H2)), ValueError, "H contains NaN or Inf"),
    "R vector": (lambda: bt(np.ones(3), H2), ValueError, "R must be (..., m, N) and H (..., n, N)"),
    "H vector": (lambda: bt(R2, np.ones(3)), ValueError, "R must be (..., m, N) and H (..., n, N)"),
    "N differs": (lambda: bt(np.ones((2, 4)), H2), ValueError, "with the same N"),
    "R strings": (lambda: bt(np.array([["a"]]), H2), TypeError, "R must be a numeric array"),
    "unknown norm": (lambda: bt(R2, H2, "frobenius"), ValueError,
                     "supports 'fro' and 'spectral'"),
    "entrywise norm": (lambda: bt(R2, H2, "max"), ValueError, "supports 'fro' and 'spectral'"),
}


@pytest.mark.parametrize("case", sorted(BATCH_CASES))
def test_batch_bad_input_is_named(case):
    call, exc, message = BATCH_CASES[case]
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value), f"message {str(info.value)!r} lacks {message!r}"


@pytest.mark.parametrize("norm", ["l2", "frobenius", "Fro", "nuc", "inf", "2", ""])
@pytest.mark.parametrize("fn", ["target", "margin", "pair"])
def test_unknown_norm_name(fn, norm):
    call = {"target": lambda: tc([1.0], [1.0, 2.0], norm),
            "margin": lambda: mf([1.0], [1.0, 2.0], 1.0, norm),
            "pair": lambda: cp_([1.0, 0.0], [1.0, 2.0], norm)}[fn]
    with pytest.raises(ValueError, match=rf"unknown norm {re.escape(repr(norm))}.*use one of"):
        call()


@pytest.mark.parametrize("p", [0.999, 0.5, 0.0, -1.0, -2, -INF, NAN, True, False, None])
@pytest.mark.parametrize("fn", ["target", "margin", "pair"])
def test_bad_exponent(fn, p):
    """Entrywise l_p needs p >= 1 (p = 1 is the sum norm); booleans and None are not p."""
    call = {"target": lambda: tc([1.0], [1.0, 2.0], p),
            "margin": lambda: mf([1.0], [1.0, 2.0], 1.0, p),
            "pair": lambda: cp_([1.0, 0.0], [1.0, 2.0], p)}[fn]
    with pytest.raises(ValueError, match=r"unknown norm .* p >= 1 for the entrywise l_p norm"):
        call()


@pytest.mark.parametrize("p,name", [(1, "sum"), (1.0, "sum"), (2, "fro"), (2.0, "fro"),
                                    (INF, "max")])
def test_special_exponents_are_the_named_norms(p, name):
    """p = 1, 2, inf are the sum, Frobenius and max norms (not errors)."""
    r, h = np.array([1.0, -2.0, 0.5]), np.array([3.0, -1.0])
    by_p, by_name = tc(r, h, p), tc(r, h, name)
    assert by_p.norm == name
    torch.testing.assert_close(by_p.value, by_name.value, rtol=0, atol=0)
    torch.testing.assert_close(by_p.minimiser, by_name.minimiser, rtol=0, atol=0)
    expected = {"sum": 3.5 / 3.0, "fro": math.sqrt(5.25 / 10.0), "max": 2.0 / 4.0}[name]
    assert float(by_p.value) == pytest.approx(expected, rel=1e-15, abs=0)


@pytest.mark.parametrize("norm", ALL_NORMS)
def test_infeasible_messages(norm):
    """Infeasibility is a ValueError naming the cause and the batch index, never inf/nan."""
    with pytest.raises(ValueError, match=r"infeasible at batch index \[\[1\]\]: h = 0 but r != 0"):
        tc(np.ones((3, 2)), np.array([[1.0], [0.0], [2.0]]), norm)
    with pytest.raises(ValueError, match=r"c h\^T = 0 but m != 0"):
        mf([0.0, 0.0], [1.0], 2.0, norm)
    with pytest.raises(ValueError, match=r"R is not in the row space of H"):
        bt(np.eye(2), np.array([[1.0, 1.0]]), "fro" if norm in ("fro", 3.0) else "spectral")
