"""torchvision's classification architectures, built beside the CPU torch certify pins.

torchvision's model definitions are plain Python, but ``import torchvision`` runs its package
``__init__``, which registers fake kernels for its compiled operators (``torchvision::nms``):
where the installed wheel was built for another torch (PyPI's ``torchvision==0.28.0`` is built
for CUDA torch 2.13.0), that fails with ``operator torchvision::nms does not exist``.
``architectures()`` imports ``torchvision.models`` under a package object that skips that
``__init__`` (no compiled operator is needed to build or run a classifier), then restores
``sys.modules`` so that nothing else in the process sees the partial package. A torchvision
that imports normally (the CPU build from PyTorch's CPU index) is used as it is.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable

import torch

# The smallest square input each family accepts (its pooling and striding leave at least one
# position), tried in this order; a ViT takes its image size as an argument instead.
SIZES = (32, 64, 96, 128, 160, 192, 224, 299)


def _models_module():
    try:
        import torchvision.models as models  # noqa: PLC0415 (a working install)
        return models
    except (ImportError, RuntimeError):
        pass
    saved = {name: module for name, module in sys.modules.items()
             if name == "torchvision" or name.startswith("torchvision.")}
    for name in saved:
        del sys.modules[name]
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        raise ImportError("torchvision is not installed")
    package = types.ModuleType("torchvision")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    sys.modules["torchvision"] = package
    try:
        return importlib.import_module("torchvision.models")
    finally:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def architectures() -> dict[str, Callable[..., torch.nn.Module]]:
    """Every classification architecture of ``torchvision.models``: name -> builder."""
    models = _models_module()
    return {name: models.get_model_builder(name) for name in models.list_models(module=models)}


def calibrate(model: torch.nn.Module, side: int, batches: int = 2) -> None:
    """Batch-norm statistics from random inputs (torchvision's initial ones, mean 0 and
    variance 1, leave a random deep network's logits near 1e-10): the layers normalise what
    reaches them, as trained ones do, so margins and radii are of a usable size."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
        m.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(8, 3, side, side))
    model.eval()


def build(name: str, classes: int = 10, seed: int = 0) -> tuple[torch.nn.Module, int]:
    """Architecture ``name`` with random weights (``seed``) and ``classes`` outputs, in eval
    mode and float64, with ``calibrate``d batch norms, and the smallest square input side
    it accepts."""
    builder = architectures()[name]
    torch.manual_seed(seed)
    for side in SIZES:
        kwargs = {"num_classes": classes}
        if name.startswith("vit_"):
            kwargs["image_size"] = side
        if name in ("googlenet", "inception_v3"):  # no auxiliary heads, no weight download
            kwargs.update(aux_logits=False, init_weights=False)
        try:
            model = builder(weights=None, **kwargs).eval()
            with torch.no_grad():
                model(torch.zeros(1, 3, side, side))
        except (RuntimeError, ValueError, AssertionError):
            continue
        calibrate(model, side)  # in float32: a float64 depthwise convolution is slow on CPU
        return model.double(), side
    raise ValueError(f"{name} accepts none of the input sizes {SIZES}")


# The architectures capture refuses, and why (docs/models.md quotes it).
SWIN = ("window attention folds the windows into the batch axis (a reshape to (B windows, "
        "tokens, C)); certify needs every operation to act on each input separately")
REFUSED = {
    "swin_t": SWIN, "swin_s": SWIN, "swin_b": SWIN,
    "maxvit_t": "windows folded into the batch axis, as in swin, and torch.einsum of two "
                "computed tensors",
    # Capture's check against the module: 4e-4 of the logits apart, far above the rounding
    # that moving the input by 1e-15 causes (2e-8); not yet understood, so refused.
    "efficientnet_v2_l": "the captured graph does not reproduce the module",
}


def expected_refusal(name: str) -> str | None:
    """Why capture refuses ``name``, or None where it captures it."""
    return REFUSED.get(name)
