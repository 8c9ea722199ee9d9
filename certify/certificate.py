"""The JSON certificate of a network on a data set: radii and thresholds per layer.

Schema (``format`` = ``FORMAT``)::

    {
      "format": "certify/weight-radii/1", "tool_version": "0.1.0",
      "model_sha256": "...", "inputs_sha256": "...", "bias_perturbed": false,
      "predictions": [int, ...],
      "layers": [
        {"name": "1", "shape": [1024, 784],
         "fro": {"lower": [...], "upper": [...], "estimate": [...], "method": "...",
                 "threshold": {"rank": int, "bits": int|null, "bits_per_channel": int|null,
                               "prune_ratio": float}},
         "max": {... the same ...}}
      ],
      "multilayer": {"fro": {"uniform_budget": [float, ...], "min": float},
                     "max": {... the same ...}},
      "compression_checks": [  (only with ``certify model --compress``)
        {"compression": "rank=8@1", "layers": ["1"], "changed": [int, ...],
         "harmless": [bool, ...]|null, "violations": int|null,
         "harmless_per_layer": {"1": [bool, ...]},
         "weight_error": {"1": {"fro": float, "spectral": float, "max": float}}, "note": "..."}
      ]
    }

``lower`` is a certificate, ``upper`` the norm of a witness (``null``: none found; its
perturbation is stored in the ``.witnesses.npz`` file beside the JSON), ``estimate`` the
first-order value. Thresholds are taken against the smallest ``lower`` of the layer.
``multilayer``: per input the certified ``t`` of ``certify.multilayer.uniform_budget``, no
change of every affine layer at once with ``||D_k|| <= t ||W~_k||`` (in that norm) changes
the class; ``min`` is the smallest over the inputs.
``compression_checks`` (``certify.compressed``, THEORY.md section 6): a concrete compression
applied to the named layers; ``changed`` the indices of the inputs whose class changed;
``harmless`` per input, the weight error is below the input's ``lower`` in that layer (then
the class provably cannot change), ``violations`` the harmless inputs that changed (always 0).
Both are ``null`` when several layers are compressed at once: single-layer radii do not
compose, so only ``harmless_per_layer`` is reported and nothing is certified.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from certify import __version__
from certify.compression import thresholds
from certify.inputs import InputError, inputs_for
from certify.multilayer import uniform_budget
from certify.graph import Graph
from certify.radius import NORMS, Witness, layer_radii
from certify.schema import FORMAT



def array_sha256(x: np.ndarray) -> str:
    """Hash of an array's float64 values and shape."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float64))
    digest = hashlib.sha256(str(x.shape).encode())
    digest.update(x.tobytes())
    return digest.hexdigest()


def _floats(t: torch.Tensor) -> list[float | None]:
    return [float(v) if math.isfinite(v) else None for v in t.tolist()]


@dataclass(frozen=True)
class Result:
    """A certificate in memory: the JSON document and the witnesses it refers to."""

    document: dict
    witnesses: dict[str, np.ndarray]


def _witness_arrays(key: str, parts: list[Witness]) -> dict[str, np.ndarray]:
    if parts[0].full is not None:
        return {f"{key}/full": torch.cat([w.full for w in parts]).numpy()}
    return {f"{key}/left": torch.cat([w.left for w in parts]).numpy(),
            f"{key}/right": torch.cat([w.right for w in parts]).numpy()}


def certify_network(network: Graph, x: torch.Tensor, *, model_sha256: str,
                    bias: bool = False, chunk: int = 64, progress: bool = True) -> Result:
    """Radii of every affine layer of the graph for both norms, in chunks of inputs, with
    thresholds.

    Raises ``certify.inputs.InputTypeError`` / ``InputError`` for inputs that are not floats,
    are not finite or do not fit the network, as ``layer_radii`` does, and ``InputError``
    for a ``chunk`` below 1."""
    x = inputs_for(network, x)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"chunk must be a positive number of inputs per batch, got {chunk!r}")
    predictions = torch.cat([network(x[i:i + chunk]).argmax(-1) for i in range(0, len(x), chunk)])
    layers, witnesses = [], {}
    jobs = [(i, norm) for i in network.affine_indices for norm in NORMS]
    bar = tqdm(jobs, desc="certifying", unit="layer-norm", disable=not progress)
    per_layer: dict[int, dict] = {}
    for index, norm in bar:
        layer, name = network.layer(index), network.nodes[index].name
        bar.set_postfix(layer=name, norm=norm)
        parts = [layer_radii(network, x[i:i + chunk], index, norm, bias)
                 for i in range(0, len(x), chunk)]
        lower = torch.cat([p.lower for p in parts])
        entry = per_layer.setdefault(index, {"name": name, "shape": list(layer.weight.shape)})
        limit = float(lower.min()) if len(lower) else math.inf
        t = thresholds(layer.matrix, limit, norm, dense=network.is_dense(index))
        entry[norm] = {
            "lower": _floats(lower),
            "upper": _floats(torch.cat([p.upper for p in parts])),
            "estimate": _floats(torch.cat([p.estimate for p in parts])),
            "method": parts[0].method,
            "threshold": {"rank": t.rank, "bits": t.bits, "bits_per_channel": t.bits_per_channel,
                          "prune_ratio": t.prune_ratio},
        }
        witnesses |= _witness_arrays(f"{name}/{norm}", [p.witness for p in parts])
    layers = [per_layer[i] for i in network.affine_indices]
    multilayer = {}
    for norm in NORMS:
        t = torch.cat([uniform_budget(network, x[i:i + chunk], norm, bias)
                       for i in range(0, len(x), chunk)])
        multilayer[norm] = {"uniform_budget": _floats(t), "min": float(t.min())}
    document = {
        "format": FORMAT,
        "tool_version": __version__,
        "model_sha256": model_sha256,
        "inputs_sha256": array_sha256(x.numpy()),
        "bias_perturbed": bias,
        "predictions": predictions.tolist(),
        "layers": layers,
        "multilayer": multilayer,
    }
    return Result(document, witnesses)


def parameters_sha256(module: torch.nn.Module) -> str:
    """Hash of a module's parameters and buffers, for models given in Python."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(array_sha256(tensor.detach().double().cpu().numpy()).encode())
    return digest.hexdigest()
