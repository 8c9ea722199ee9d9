"""The JSON certificate of a network on a data set: radii and thresholds per layer.

Schema (``format`` = ``FORMAT``)::

    {
      "format": "certify/weight-radii/1", "tool_version": "0.1.0",
      "model_sha256": "...", "inputs_sha256": "...", "bias_perturbed": false,
      "device": "cpu",
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

``device`` is where the torch computation ran (numbers agree across devices to rounding).
``lower`` is a certificate, ``upper`` the norm of a witness (``null``: none found; its
perturbation is stored in the ``.witnesses.npz`` file beside the JSON), ``estimate`` the
first-order value. Where a layer's ``method`` names ``optimised``, the same file holds the
ReLU slopes its lower bounds used, ``<layer>/<norm>/slopes/<node>`` (bytes ``(inputs,
classes, *node shape)``, ``certify.bounds.slopes``), which ``certify check`` repeats.
Thresholds are taken against the smallest ``lower`` of the layer.
``multilayer``: per input the certified ``t`` of ``certify.radii.multilayer.uniform_budget``, no
change of every affine layer at once with ``||D_k|| <= t ||W~_k||`` (in that norm) changes
the class; ``min`` is the smallest over the inputs.
``compression_checks`` (``certify.radii.compressed``, THEORY.md section 6): a concrete compression
applied to the named layers; ``changed`` the indices of the inputs whose class changed;
``harmless`` per input, the weight error, or the exact change of the layer's output seen as
a radius (``compressed.LayerCompression.reach_*``), is below the input's ``lower`` in that
layer (then the class provably cannot change), ``violations`` the harmless inputs that changed (always 0).
When several layers are compressed at once, single-layer radii do not compose:
``harmless_per_layer`` certifies nothing on its own, and ``harmless`` is the all-layers
bound of THEORY.md section 5 with budgets the layers' weight errors (``weight_error``
``fro`` and ``max``), in either norm.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from certify.bounds.slopes import ADAPTIVE
from certify.certificate.memory import chunked
from certify.certificate.schema import FORMAT, array_sha256
from certify.closed_forms.thresholds import thresholds
from certify.graph import devices
from certify.graph.graph import Graph
from certify.graph.inputs import InputError, inputs_for
from certify.radii import whole_model
from certify.radii.multilayer import uniform_budget
from certify.radii.whole_model import MILDEST_KINDS, whole_model_supported
from certify.radii.methods import check_steps, check_switch, merged_method
from certify.radii.radius import NORMS, LayerRadii, layer_radii
from certify.radii.witness import Witness
from certify.version import __version__



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


@dataclass(frozen=True)
class ChunkRadii:
    """One chunk of inputs certified on its own (``certify_chunk``): the per-input parts of
    a certificate, on the CPU. ``merge`` joins chunks in order of ``start``."""

    start: int  # index of the chunk's first input in the whole data set
    predictions: torch.Tensor
    radii: dict[tuple[int, str], LayerRadii]  # (layer index, norm)
    uniform_budget: dict[str, torch.Tensor]  # norm -> section-5 budget per input
    mildest: dict[str, torch.Tensor] | None = None  # kind -> section-10 level per input

    def __len__(self) -> int:
        return len(self.predictions)


def _on_cpu(r: LayerRadii) -> LayerRadii:
    w = r.witness
    return replace(r, lower=r.lower.cpu(), upper=r.upper.cpu(), estimate=r.estimate.cpu(),
                   lower_global=r.lower_global.cpu(), lower_local=r.lower_local.cpu(),
                   witness=Witness(**{k: None if t is None else t.cpu() for k, t in
                                      (("left", w.left), ("right", w.right), ("full", w.full))}),
                   slopes={node: c.cpu() for node, c in r.slopes.items()})


def _slope_arrays(key: str, parts: list[LayerRadii]) -> dict[str, np.ndarray]:
    """The slope codes of one layer and norm (``LayerRadii.slopes``) for all inputs:
    ``ADAPTIVE`` (CROWN's slopes) for the chunks that optimised none."""
    arrays = {}
    for node in sorted(set().union(*(p.slopes for p in parts))):
        shape = next(p.slopes[node].shape[1:] for p in parts if node in p.slopes)
        arrays[f"{key}/slopes/{node}"] = np.concatenate([
            p.slopes[node].numpy() if node in p.slopes else
            np.full((len(p.lower), *shape), ADAPTIVE, dtype=np.uint8) for p in parts])
    return arrays


def certify_chunk(network: Graph, x: torch.Tensor, start: int = 0, bias: bool = False,
                  done=lambda index, norm: None, refine: bool | str = "auto",
                  optimise: int = 0) -> ChunkRadii:
    """Radii of every affine layer for both norms, and the uniform budget, for one batch
    ``x`` on the device of the graph and ``x``; ``done(index, norm)`` after each layer and
    norm (progress); ``refine`` and ``optimise`` as in ``layer_radii``. Every number depends
    on this batch only (section 2: radii are per input), so chunks can be certified anywhere
    and merged."""
    radii = {}
    for index in network.affine_indices:
        for norm in NORMS:
            radii[index, norm] = _on_cpu(layer_radii(network, x, index, norm, bias,
                                                     refine=refine, optimise=optimise))
            done(index, norm)
    budgets = {norm: uniform_budget(network, x, norm, bias).cpu() for norm in NORMS}
    mildest = None
    if not bias and whole_model_supported(network):
        mildest = {kind: level.cpu() for kind, level in
                   whole_model.mildest_levels(network, x, MILDEST_KINDS).items()}
        # The same Frobenius balls, by section 5: its l2 recursion can beat the joint bound's
        # entrywise deviation boxes there (they widen a ball by sqrt(m) at each layer).
        mildest["relative"] = torch.maximum(mildest["relative"], budgets["fro"])
    return ChunkRadii(start, network(x).argmax(-1).cpu(), radii, budgets, mildest)


def merge(network: Graph, x: torch.Tensor, chunks: list[ChunkRadii], *, model_sha256: str,
          bias: bool, device: torch.device) -> Result:
    """The certificate of all inputs from their chunks: per-input claims concatenated in
    input order, then what depends on all inputs (thresholds against the smallest ``lower``
    of a layer, the smallest uniform budget). Raises ``ValueError`` unless the chunks cover
    the inputs exactly once, so a retried chunk can never be lost or counted twice."""
    chunks = sorted(chunks, key=lambda c: c.start)
    starts = [c.start for c in chunks]
    ends = [c.start + len(c) for c in chunks]
    if starts[:1] != [0] or starts[1:] != ends[:-1] or ends[-1] != len(x):
        raise ValueError(f"chunks {list(zip(starts, ends))} do not cover inputs 0..{len(x)} "
                         "exactly once")
    layers, witnesses = [], {}
    for index in network.affine_indices:
        layer, name = network.layer(index), network.nodes[index].name
        entry = {"name": name, "shape": list(layer.weight.shape)}
        for norm in NORMS:
            parts = [c.radii[index, norm] for c in chunks]
            lower = torch.cat([p.lower for p in parts])
            t = thresholds(layer.matrix.cpu(), float(lower.min()), norm,
                           dense=network.is_dense(index))
            entry[norm] = {
                "lower": _floats(lower),
                "upper": _floats(torch.cat([p.upper for p in parts])),
                "estimate": _floats(torch.cat([p.estimate for p in parts])),
                "method": merged_method([p.method for p in parts]),
                "threshold": {"rank": t.rank, "bits": t.bits,
                              "bits_per_channel": t.bits_per_channel,
                              "prune_ratio": t.prune_ratio},
            }
            witnesses |= _witness_arrays(f"{name}/{norm}", [p.witness for p in parts])
            witnesses |= _slope_arrays(f"{name}/{norm}", parts)
        layers.append(entry)
    multilayer = {}
    for norm in NORMS:
        t = torch.cat([c.uniform_budget[norm] for c in chunks])
        multilayer[norm] = {"uniform_budget": _floats(t), "min": float(t.min())}
    whole = None
    if all(c.mildest is not None for c in chunks):
        whole = whole_model_section({kind: torch.cat([c.mildest[kind] for c in chunks])
                                     for kind in MILDEST_KINDS})
    document = {
        "format": FORMAT,
        "tool_version": __version__,
        "model_sha256": model_sha256,
        "inputs_sha256": array_sha256(x.cpu().numpy()),
        "bias_perturbed": bias,
        "device": devices.describe(device),
        "predictions": torch.cat([c.predictions for c in chunks]).tolist(),
        "layers": layers,
        "multilayer": multilayer,
    }
    if whole is not None:
        document["whole_model"] = whole
    return Result(document, witnesses)


def whole_model_section(levels: dict[str, torch.Tensor]) -> dict:
    """The ``whole_model`` entry: per input the mildest level of each kind certified for
    every layer at once (``certify.radii.whole_model.mildest``; ``null`` where none is), and
    per kind the ``threshold``, the mildest level every input with a level is certified at
    (the most bits, the smallest ratio or budget), ``null`` when no input has one."""
    out = {}
    threshold = {}
    for kind, level in levels.items():
        values = [None if math.isnan(v) else (int(v) if kind.startswith("bits") else v)
                  for v in level.tolist()]
        out[kind] = values
        known = [v for v in values if v is not None and (kind.startswith("bits") or v > 0)]
        threshold[kind] = None if not known else (max(known) if kind.startswith("bits")
                                                  else min(known))
    return {**out, "threshold": threshold}


def chunk_starts(n: int, chunk: int) -> range:
    """Where the chunks of ``chunk`` inputs begin; every backend cuts the same chunks, so
    every backend computes the same numbers."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"chunk must be a positive number of inputs per batch, got {chunk!r}")
    return range(0, n, chunk)


def certify_network(network: Graph, x: torch.Tensor, *, model_sha256: str,
                    bias: bool = False, chunk: int = 64, progress: bool = True,
                    device: torch.device | str | None = None,
                    refine: bool | str = "auto", memory: int | None = None,
                    optimise: int = 0) -> Result:
    """Radii of every affine layer of the graph for both norms, in chunks of inputs, with
    thresholds; computed on ``device`` (default the CPU), always in float64. ``refine``: the
    local bound's backward refinement, as in ``radius.layer_radii`` (``True``: every input
    of every layer, usually tighter where the default skips it as too costly, and
    slower). ``memory``: a budget in bytes of this process's resident memory, to which the
    chunks (at most ``chunk`` inputs) are fitted (``certify.certificate.memory.chunked``; on
    the CPU only); ``None``: chunks of ``chunk`` inputs. ``optimise``: steps of the
    optimised ReLU slopes, as in ``radius.layer_radii`` (0: CROWN's).

    Raises ``certify.graph.inputs.InputTypeError`` / ``InputError`` for inputs that are not floats,
    are not finite or do not fit the network, as ``layer_radii`` does, ``InputError`` for a
    ``chunk`` below 1, an unknown ``refine`` or a bad ``optimise``, and ``certify.graph.devices.DeviceError`` for a
    device this machine lacks."""
    check_switch("refine", refine)
    check_steps(optimise)
    x = inputs_for(network, x)
    chunk_starts(len(x), chunk)  # validates chunk
    device = devices.resolve(device)
    on_device = network.to(device)
    jobs = len(network.affine_indices) * len(NORMS)
    bar = tqdm(total=len(x) * jobs, desc="certifying", unit="input-layer-norm",
               disable=not progress)

    def certified(start: int, stop: int) -> ChunkRadii:
        def done(index, norm):
            bar.update(stop - start)
            bar.set_postfix(layer=network.nodes[index].name, norm=norm)
        return certify_chunk(on_device, x[start:stop].to(device), start, bias, done, refine,
                             optimise)

    chunks = chunked(len(x), chunk, memory if device.type == "cpu" else None, certified,
                     warn=bar.write)
    bar.close()
    return merge(network, x, chunks, model_sha256=model_sha256, bias=bias, device=device)


@dataclass(frozen=True)
class Agreement:
    """How two certificates of the same model and inputs agree (``compare``)."""

    max_relative: float  # largest relative difference of any number (radii, budgets, witnesses)
    mismatches: tuple[str, ...]  # paths of fields that differ otherwise (structure, classes, ...)

    def within(self, rtol: float) -> bool:
        return not self.mismatches and self.max_relative <= rtol


def compare(a: Result, b: Result) -> Agreement:
    """Field by field: every float compared relatively (``null`` only with ``null``),
    everything else (predictions, methods, thresholds, names, hashes) for equality, the
    ``device`` not at all; for certificates made on different backends or devices, which
    agree to rounding."""
    worst, mismatches = 0.0, []

    def relative(u: np.ndarray, v: np.ndarray) -> float:
        scale = np.maximum(np.abs(u), np.abs(v))
        gap = np.abs(u - v)
        return float(np.max(np.where(gap == 0, 0.0, gap / np.where(scale > 0, scale, 1.0)),
                            initial=0.0))

    def walk(u, v, where):
        nonlocal worst
        if where == "/device":  # provenance, not a claim
            return
        if isinstance(u, dict) and isinstance(v, dict) and u.keys() == v.keys():
            for k in u:
                walk(u[k], v[k], f"{where}/{k}")
        elif isinstance(u, list) and isinstance(v, list) and len(u) == len(v):
            for i, (p, q) in enumerate(zip(u, v)):
                walk(p, q, f"{where}[{i}]")
        elif isinstance(u, float) and isinstance(v, float):
            worst = max(worst, relative(np.array(u), np.array(v)))
        elif u != v:
            mismatches.append(where)

    walk(a.document, b.document, "")
    for key in sorted(a.witnesses.keys() | b.witnesses.keys()):
        u, v = a.witnesses.get(key), b.witnesses.get(key)
        if u is None or v is None or u.shape != v.shape:
            mismatches.append(f"witnesses/{key}")
        else:  # in float64: the slopes' bytes would wrap around when subtracted
            worst = max(worst, relative(u.astype(np.float64), v.astype(np.float64)))
    return Agreement(worst, tuple(mismatches))


def parameters_sha256(module: torch.nn.Module) -> str:
    """Hash of a module's parameters and buffers, for models given in Python."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(array_sha256(tensor.detach().double().cpu().numpy()).encode())
    return digest.hexdigest()
