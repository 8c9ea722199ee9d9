"""The low-rank activated backdoor (THEORY.md section 7) against its oracles.

* Training on real digits: truncation to the attacked rank activates the attack, full
  precision stays clean (measured on held-out inputs).
* The certificate: no triggered input changes class under truncation while the exact change
  ``||(W - W_r) h||`` is inside its certified z-space radius, and activation begins only
  below the certified threshold rank.
* The truncation's backward pass against finite differences (``gradcheck``).
* The closed-form implant against an independent SVD truncation and a Kronecker-product
  least-norm solve; its feasibility flag against what truncation really does.
* CLI: bad options fail with messages that say what to fix.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from certify.attacks import backdoor as bd
from certify.models import small as small_models
from certify.attacks.implant import implant
from certify.cli import main
from certify.attacks.trigger import Trigger
from certify.attacks.truncation_check import truncation_check

RANK = 8
TRIGGER = Trigger(size=2, value=1.0)


@pytest.fixture(scope="module")
def digits():
    return small_models.load("digits", seed=0)


@pytest.fixture(scope="module")
def backdoored(digits):
    config = bd.BackdoorConfig(layers=("3",), compressions=bd.operators("rank", [RANK]),
                               trigger=TRIGGER, target=0, a=1.0, b=1.0, epochs=8, lr=3e-3)
    return bd.train(small_models.digits_mlp(), digits.x_train, digits.y_train, config,
                    digits.x_test, digits.y_test)


def test_attack_activates_under_truncation_and_is_dormant_in_full_precision(backdoored):
    full, truncated = backdoored.outcomes
    assert full.clean_accuracy > 0.85 and truncated.clean_accuracy > 0.85
    assert full.attack_success < 0.10, full
    assert truncated.attack_success > 0.90, truncated


def test_truncation_never_flips_a_class_inside_the_certified_radius(backdoored, digits):
    x = TRIGGER(digits.x_test[digits.y_test != 0][:60])
    check = truncation_check(backdoored.model, "3", x, range(0, 65, 2))
    assert check.flipped[check.ranks.index(RANK)].float().mean() > 0.5  # the check has teeth
    assert check.violations.sum() == 0
    # Activation happens only where the certificate allows it: below the threshold rank.
    assert check.activation_rank is not None and check.activation_rank < check.threshold_rank
    below = [k for k, r in enumerate(check.ranks) if r >= check.threshold_rank]
    assert not check.flipped[below].any()
    # sigma_{r+1} bounds the change of z: ||(W - W_r) h|| <= sigma_{r+1} ||h||.
    h_norm = check.z_radius / check.lower
    sigma_next = torch.cat([check.singular_values, check.singular_values.new_zeros(1)])
    bound = sigma_next[list(check.ranks)][:, None] * h_norm[None]
    assert (check.change <= bound * (1 + 1e-9)).all()


@settings(max_examples=15)
@given(m=st.integers(2, 6), n=st.integers(2, 6), data=st.data())
def test_truncation_gradient_is_exact(m, n, data):
    rank = data.draw(st.integers(0, min(m, n)))
    seed = data.draw(st.integers(0, 2**16))
    W = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    s = torch.linalg.svdvals(W)
    assume(rank in (0, min(m, n)) or s[rank - 1] - s[rank] > 1e-2)  # a gap to differentiate
    W.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: bd.LowRank(rank).train_view(w), (W,),
                                    eps=1e-6, atol=1e-5)


def _least_norm(target: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Least-norm ``F`` minimising ``||F A - T||_F`` via ``vec(F A) = (A^T kron I) vec(F)``."""
    p, q = target.shape[0], inputs.shape[0]
    K = torch.kron(inputs.T.contiguous(), torch.eye(p, dtype=inputs.dtype))
    f = torch.linalg.pinv(K) @ target.T.reshape(-1)
    return f.reshape(q, p).T


@settings(max_examples=30)
@given(m=st.integers(3, 7), n=st.integers(3, 7), count=st.integers(1, 3),
       scale=st.sampled_from([0.01, 0.1, 1.0, 10.0]), seed=st.integers(0, 2**16))
def test_implant_restores_outputs_and_truncation_gives_back_the_backdoor(m, n, count, scale,
                                                                         seed):
    g = torch.Generator().manual_seed(seed)
    rank = min(m, n) - 2 if min(m, n) > 3 else 1
    W_bd = torch.randn(m, n, generator=g, dtype=torch.float64)
    H = torch.randn(n, count, generator=g, dtype=torch.float64)
    Z = W_bd @ H + scale * torch.randn(m, count, generator=g, dtype=torch.float64)
    result = implant(W_bd, H, Z, rank)
    assume(abs(result.correction_norm - result.sigma_r) > 1e-6 * result.sigma_r)
    U, S, Vh = torch.linalg.svd(W_bd)
    W_r = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    torch.testing.assert_close(result.truncated, W_r)
    # E is the least-norm correction in the discarded subspace (an independent solve).
    U_perp, V_perp = U[:, rank:], Vh[rank:].T
    F = _least_norm(U_perp.T @ (Z - W_r @ H), V_perp.T @ H)
    torch.testing.assert_close(result.correction, U_perp @ F @ V_perp.T, atol=1e-8, rtol=1e-6)
    # What truncation of W_fp really does decides the flag.
    U2, S2, Vh2 = torch.linalg.svd(result.weight)
    again = (U2[:, :rank] * S2[:rank]) @ Vh2[:rank]
    gives_back = torch.allclose(again, W_r, atol=1e-8 * float(S[0]))
    assert result.feasible == gives_back
    assert result.feasible == (result.reason == "")
    if not result.feasible:
        assert "sigma_r" in result.reason
    # Full precision reaches Z wherever the discarded subspace can hold the change.
    reachable = U_perp @ U_perp.T @ (Z - result.weight @ H)
    if count <= n - rank:
        assert torch.linalg.matrix_norm(reachable) <= 1e-8 * (1 + torch.linalg.matrix_norm(Z))


def test_implant_on_a_trained_last_layer(backdoored, digits):
    """The implant's full-precision model agrees with its target on the triggered inputs
    along the discarded directions, and truncation gives the backdoored layer back."""
    model = copy.deepcopy(backdoored.model).double()
    x = TRIGGER(digits.x_test[:40]).double()
    with torch.no_grad():
        h = model[:5](x)
    W_bd = model[5].weight.detach().double()
    Z = torch.randn(10, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = implant(W_bd, h[:2].T, W_bd @ h[:2].T + 0.1 * Z, rank=5)
    assert result.feasible
    assert result.unreachable > 0  # part of a random target lies in the kept directions
    U, S, Vh = torch.linalg.svd(result.weight)
    torch.testing.assert_close((U[:, :5] * S[:5]) @ Vh[:5], result.truncated)
    big = implant(W_bd, h[:2].T, W_bd @ h[:2].T + 1e3 * Z, rank=5)
    assert not big.feasible and big.correction_norm >= big.sigma_r


def test_cli_writes_model_and_measurements(tmp_path):
    out = tmp_path / "bd"
    code = main(["backdoor", "--dataset", "digits", "--model", "mlp", "--layers", "3",
                 "--ranks", "8", "--epochs", "1", "--out", str(out), "--no-clean"])
    assert code == 0
    document = json.loads((out / "measurements.json").read_text())
    assert document["factory"] == "certify.models.small:digits_mlp"
    from certify.formats.loading import load_model

    model = load_model(out / "model.safetensors", factory=document["factory"])
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("variant, option, level, label", [
    ("bits_per_channel", "--bits", "4", "4 bits per channel"),
    ("prune_global", "--ratios", "0.5", "prune 50% global"),
])
def test_cli_trains_the_per_channel_and_global_variants(tmp_path, variant, option, level, label):
    out = tmp_path / "bd"
    code = main(["backdoor", "--dataset", "digits", "--model", "mlp", "--layers", "1,3",
                 "--variant", variant, option, level, "--epochs", "1", "--out", str(out),
                 "--no-clean"])
    assert code == 0
    text = (out / "measurements.json").read_text()
    assert label in text


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "cifar"], "invalid choice"),
    (["--dataset", "digits", "--model", "cnn"], "no 'cnn' model for data set 'digits'"),
    (["--layers", "9"], "layer '9' is not a Linear or Conv2d layer"),
    (["--ranks", "8,x"], "comma-separated"),
    (["--ranks", "100"], "rank 100 is not an integer in [0, 64]"),
    (["--trigger-size", "9"], "does not fit a 8x8 image"),
    (["--target", "10"], "target must be a class index in [0, 9]"),
    (["--variant", "bits", "--bits", "1"], "bits must be an integer >= 2"),
    (["--variant", "prune"], "--variant prune needs --ratios"),
    (["--variant", "bits_per_channel"], "--variant bits_per_channel needs --bits"),
    (["--variant", "prune_global", "--ratios", "1.5"], "prune ratio must lie in [0, 1)"),
])
def test_cli_bad_options_say_what_to_fix(tmp_path, capsys, argv, message):
    base = ["backdoor", "--dataset", "digits", "--model", "mlp", "--layers", "3",
            "--ranks", "8", "--epochs", "1", "--out", str(tmp_path)]
    assert main(base + argv) == 2
    assert message in capsys.readouterr().err
