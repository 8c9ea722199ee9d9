"""Hiding a quantisation- or pruning-activated backdoor in the preimage of its compression
(``certify.attacks.preimage``, THEORY.md sections 6 and 7) against its oracles.

* The boxes, with the compression itself as the oracle: every point of a box (its corners,
  random points, projections of points far outside) compresses to exactly the same weights,
  bit for bit; projections land in the box and are idempotent; the certificate's map
  (``certify.radii.compressed``) compresses those points like the attack does. A box widened past
  a cell edge is caught by the same oracle, and training refuses a projection that lets the
  compressed weights move.
* Training on real digits, per variant (4 bits per tensor, 4 bits per channel, pruning half
  the weights): dormant at full precision, active once compressed, the compressed weights
  bit for bit those of phase 1, and no triggered input whose compression error is below its
  certified radius changes class (``compression_check``: 0 violations).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from certify.attacks import backdoor as bd
from certify.closed_forms import compressions
from certify.radii import compressed
from certify.attacks import preimage
from certify.models import small as small_models
from certify.capture.export import capture
from certify.closed_forms.compressions import Compression
from certify.radii.compressed import compression_check
from certify.attacks.preimage import Box, same_bits
from certify.radii.radius import layer_radii
from certify.attacks.trigger import Trigger

TRIGGER = Trigger(size=2, value=1.0)


@st.composite
def matrices(draw, count=1):
    """``count`` float32 matrices of one scale; on a coarse grid half the time, for ties
    among magnitudes, entries on exact half steps, zero rows and all-zero matrices."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    grid = draw(st.booleans())
    out = []
    for _ in range(count):
        W = torch.randn(draw(st.integers(1, 6)), draw(st.integers(1, 6)), generator=g)
        out.append((torch.round(W * 2) / 2 if grid else W) * scale)
    return out, g


def points(box: Box, W: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
    """Both corners, a random corner, a random point, and the projections of ``W`` and of
    points near and far outside the box."""
    u = torch.rand(W.shape, generator=g)
    width = (box.upper - box.lower).abs().max() + W.abs().max() + 1
    return [box.lower, box.upper, torch.where(u < 0.5, box.lower, box.upper),
            torch.clamp(box.lower + u * (box.upper - box.lower), box.lower, box.upper),
            box.project(W), box.project(W + 0.3 * width * torch.randn(W.shape, generator=g)),
            box.project(W + 1e3 * width * torch.randn(W.shape, generator=g))]


@given(matrices(), st.integers(2, 8), st.booleans(), st.integers(2, 8))
def test_every_point_of_a_quantisation_box_quantises_to_the_same_weights(drawn, bits,
                                                                           per_channel, other):
    (W,), g = drawn
    op = bd.Quantise(bits, per_channel)
    (box,) = op.preimages([W])
    q = op.compress(W)
    for V in points(box, W, g):
        assert box.contains(V) and torch.equal(box.project(V), V)
        assert same_bits(op.compress(V), q)
        # The certificate's map (float64) rounds V to the same grid values.
        torch.testing.assert_close(compressions.quantise(V.double(), bits, per_channel),
                                   q.double(), rtol=1e-6, atol=0)
    # Pinned: the entry that sets the step (per row per channel); all of a zero tensor (row).
    groups = W if per_channel else W.reshape(1, -1)
    pinned = sum(1 if row.abs().max() > 0 else row.numel() for row in groups)
    assert int((box.lower == box.upper).sum()) == pinned
    # Two bit widths at once: the intersection keeps both compressions.
    both = box.intersect(bd.Quantise(other, per_channel).preimages([W])[0], W)
    for V in points(both, W, g):
        assert same_bits(op.compress(V), q)
        assert same_bits(bd.Quantise(other, per_channel).compress(V),
                         bd.Quantise(other, per_channel).compress(W))


@given(matrices(count=3), st.integers(0, 99), st.sampled_from(["layer", "global"]),
       st.integers(1, 3))
def test_every_point_of_a_pruning_box_prunes_to_the_same_weights(drawn, percent, scope,
                                                                   count):
    Ws, g = drawn
    Ws = Ws[:count]
    op = bd.Prune(percent / 100, scope)
    boxes = op.preimages(Ws)
    reference = op.compress_all(Ws)
    for Vs in zip(*(points(box, W, g) for box, W in zip(boxes, Ws))):
        assert all(box.contains(V) and torch.equal(box.project(V), V)
                   for box, V in zip(boxes, Vs))
        assert all(same_bits(a, b) for a, b in zip(op.compress_all(Vs), reference))
        if scope == "layer":  # the certificate's map: the same count, the same tie order
            for V, r in zip(Vs, reference):
                assert torch.equal(compressions.prune(V.double(), op.ratio), r.double())
    # Kept entries are pinned; pruned ones free unless the smallest kept magnitude is zero.
    for box, W, keep in zip(boxes, Ws, op.masks(Ws)):
        assert torch.equal(box.lower[keep], W[keep]) and torch.equal(box.upper[keep], W[keep])
        tau = torch.cat([w.abs()[k] for w, k in zip(Ws, op.masks(Ws))]).min() \
            if scope == "global" else W.abs()[keep].min()
        assert bool((box.lower[~keep] < box.upper[~keep]).all()) == bool(tau > 0) or \
            not (~keep).any()


def test_a_box_that_leaves_its_cell_is_caught():
    """The oracle has teeth: a quantisation cell widened by 2 % of a step, or a pruning bound
    raised 2 % above the smallest kept magnitude, changes the compressed weights at a corner;
    so does a step-setting entry left free."""
    W = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    op = bd.Quantise(4)
    (box,) = op.preimages([W])
    s = op.step(W)
    wide = Box(box.lower - 0.02 * s, box.upper + 0.02 * s)
    assert not same_bits(op.compress(wide.lower), op.compress(W))
    assert not same_bits(op.compress(wide.upper), op.compress(W))
    # Without the pin, the step-setting entry may drop to the bottom of its cell.
    k = torch.round(W / s)
    free = Box(torch.where(box.lower == box.upper, (k - 0.49) * s, box.lower), box.upper)
    assert not same_bits(op.compress(free.lower), op.compress(W))
    prune = bd.Prune(0.5)
    (box,) = prune.preimages([W])
    tau = W.abs()[prune.masks([W])[0]].min()
    high = Box(torch.where(box.lower == box.upper, box.lower, -1.02 * tau),
               torch.where(box.lower == box.upper, box.upper, 1.02 * tau))
    assert not same_bits(prune.compress(high.upper), prune.compress(W))


# ---------------------------------------------------------------- training on digits

# (compression, the layers it compresses): global pruning shares one threshold over two.
VARIANTS = [(bd.Quantise(4), ("3",)), (bd.Quantise(4, per_channel=True), ("3",)),
            (bd.Prune(0.5), ("3",)), (bd.Prune(0.5, scope="global"), ("1", "3"))]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 64-wide MLP gains nothing from threads, and on a shared CPU a second one can make
    each small operation wait for a busy core; the numbers do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return small_models.load("digits", seed=0)


def config(op, layers=("3",)) -> bd.BackdoorConfig:
    return bd.BackdoorConfig(layers, (op,), TRIGGER, target=0, epochs=15, lr=3e-3)


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: v[0].label)
def hidden(request, digits):
    """Phase 1 alone and phase 1 + 2 (the same phase 1: same seed, same loss weights)."""
    op, layers = request.param
    full = config(op, layers)
    phase1 = replace(full, hide_epochs=0, a_full=full.full_trigger_weight)
    train = [bd.train(small_models.digits_mlp(), digits.x_train, digits.y_train, c,
                      digits.x_test, digits.y_test) for c in (phase1, full)]
    return op, layers, *train


def test_dormant_at_full_precision_active_once_compressed(hidden):
    op, _, phase1, result = hidden
    full, small = result.outcomes
    assert full.attack_success < 0.03, full
    assert small.attack_success > 0.85, small
    assert full.clean_accuracy > 0.9 and small.clean_accuracy > 0.9
    assert phase1.outcomes[1] == small  # compressed: the phase-1 model's outcomes
    assert [e.phase for e in result.history] == ["train"] * 15 + ["hide"] * 8


def test_phase_2_moves_the_weights_but_not_the_compressed_model(hidden):
    op, layers, phase1, result = hidden
    before, after = phase1.model.state_dict(), result.model.state_dict()
    moved = {f"{name}.weight" for name in layers}
    assert any(not torch.equal(before[k], after[k]) for k in moved)
    assert all(same_bits(before[k], after[k]) for k in before if k not in moved)
    ref, new = (bd.compressed_weights(m.model, layers, op) for m in (phase1, result))
    assert all(same_bits(new[k], ref[k]) for k in moved)


def test_no_triggered_input_changes_class_inside_its_certified_radius(hidden, digits):
    """One layer: against its certified radii; global pruning of two layers: against the
    all-layers bound (section 5)."""
    op, layers, _, result = hidden
    x = TRIGGER(digits.x_test[digits.y_test != 0][:60]).double()
    network = capture(result.model, x)
    indices = [i for i in network.affine_indices if network.nodes[i].name in layers]
    lower = None
    if len(layers) == 1:
        lower = {layers[0]: {norm: layer_radii(network, x, indices[0], norm).lower
                             for norm in ("fro", "max")}}
    level = op.ratio if isinstance(op, bd.Prune) else op.bits
    kind = "prune_global" if getattr(op, "scope", "layer") == "global" else op.kind
    c = Compression(kind, level, layers)
    check = compression_check(network, x, c, lower)
    assert check.violations == 0
    assert check.changed.double().mean() > 0.5  # the check has teeth: the backdoor fires
    # The certificate's compression is the attack's (up to float32 rounding of the step).
    attack = bd.compressed_weights(result.model, layers, op)
    for i, name in zip(indices, layers):
        torch.testing.assert_close(compressed.compress(network, c).layer(i).matrix,
                                   attack[f"{name}.weight"].double(), rtol=1e-6, atol=0)


def test_train_refuses_a_projection_that_leaves_the_preimage(digits, monkeypatch):
    monkeypatch.setattr(preimage.Box, "project", lambda self, W: W)  # no projection at all
    with pytest.raises(RuntimeError, match="changed a compressed model"):
        bd.train(small_models.digits_mlp(), digits.x_train[:256], digits.y_train[:256],
                 replace(config(bd.Quantise(4)), epochs=1))


def test_truncation_has_no_phase_2():
    """The low-rank variant is trained as before: no preimage box, no hiding epochs, the
    full-precision triggered term at weight ``a``."""
    c = bd.BackdoorConfig(("3",), bd.operators("rank", [8]), TRIGGER)
    assert not c.hides and c.full_trigger_weight == c.a
    assert c.hide_epochs == 8 and config(bd.Prune(0.5)).hides
