"""Example 5: a regression test for your own model. Copy this file next to your tests.

Run it with ``pytest examples/test_my_model.py``. It trains a small MLP on scikit-learn's
digits as a stand-in; replace ``model`` and ``calibration`` with yours (or, with the
installed pytest plugin, use the ``certify_model`` and ``certify_data`` fixtures and run
``pytest --certify-model model.onnx --certify-data calibration.npz``).

The assertions are proofs, not samples: when one fails, the message names the layer, the
input, its certified radius against the required one, and its logit margin.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from certify.models import small as small_models
from certify.testing import assert_compression_safe, assert_robust, perturbations


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    data = small_models.load("digits", seed=0)
    net = small_models.digits_mlp()
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(3):
        for batch in torch.randperm(len(data.x_train)).split(64):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(net(data.x_train[batch]),
                                              data.y_train[batch]).backward()
            optimiser.step()
    return net.double().eval()  # certify works in float64


@pytest.fixture(scope="module")
def calibration():
    return small_models.load("digits", seed=0).x_test[:16].double()


def test_quantising_the_hidden_layers_is_safe(model, calibration):
    # Any symmetric quantisation of layer "1" or of layer "3" (each alone) to 12 or more
    # bits, per tensor or per channel, provably keeps every prediction.
    assert_robust(model, calibration, bits=12, layers=["1", "3"])


def test_the_deployed_int16_model_is_safe(model, calibration):
    # The concrete compression of every layer at once: proved, and the compressed model run.
    assert_compression_safe(model, calibration, "bits=16")


@settings(max_examples=10, deadline=None)
@given(st.data())
def test_small_weight_changes_never_flip_a_prediction(model, calibration, data):
    # Property-based: perturbations of the last layer inside 99 % of the certified radius.
    # This is the certificate's promise, checked by forward passes.
    change = data.draw(perturbations(model, calibration[:8], "5", "fro", inside=0.99))
    assert torch.equal(change.classes(model), model(calibration[:8]).argmax(-1))
