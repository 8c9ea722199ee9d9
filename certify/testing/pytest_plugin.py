"""pytest plugin (entry point ``pytest11``): a model and calibration inputs from the command
line, so that one test file can guard any exported model in CI::

    pytest tests/test_robust.py --certify-model model.onnx --certify-data calibration.npz

    def test_truncation_is_safe(certify_model, certify_data):
        certify.testing.assert_robust(certify_model, certify_data, rank=32)

``certify_model``: the model loaded by ``certify.formats.loading.load_model`` (ONNX, ``.pt2``, or a
state dict with ``--certify-factory package.module:callable``). ``certify_data``: the array
``x`` of an ``.npz`` file as float64. A test using either fixture is skipped, with the
option to give, when the option is absent. Nothing is imported until a fixture is used.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("certify", "certify: weight-perturbation certificates")
    group.addoption("--certify-model", metavar="PATH",
                    help="model for the certify_model fixture (.onnx, .pt2, .safetensors, .pt)")
    group.addoption("--certify-factory", metavar="MODULE:CALLABLE",
                    help="builds the model that a state dict given by --certify-model fills")
    group.addoption("--certify-data", metavar="NPZ",
                    help=".npz with an array x of inputs for the certify_data fixture")


@pytest.fixture(scope="session")
def certify_model(request):
    """The model given by ``--certify-model`` (eval mode)."""
    path = request.config.getoption("certify_model")
    if path is None:
        pytest.skip("no model to certify: run pytest with --certify-model PATH")
    from certify.formats.loading import ModelLoadError, load_model

    try:
        return load_model(path, factory=request.config.getoption("certify_factory"))
    except ModelLoadError as err:
        raise pytest.UsageError(f"--certify-model: {err}") from None


@pytest.fixture(scope="session")
def certify_data(request):
    """The inputs ``x`` of the ``.npz`` given by ``--certify-data``, as a float64 tensor."""
    path = request.config.getoption("certify_data")
    if path is None:
        pytest.skip("no inputs to certify on: run pytest with --certify-data FILE.npz")
    import numpy as np
    import torch

    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data:
                raise pytest.UsageError(f"--certify-data: {path} has no array 'x' "
                                        f"(found {', '.join(data) or 'none'})")
            return torch.from_numpy(np.asarray(data["x"], dtype=np.float64))
    except (OSError, ValueError) as err:
        raise pytest.UsageError(f"--certify-data: cannot read {path} as .npz: {err}") from None
