"""The rules of ``certify.capture.aten``'s ``BUILDERS`` for resampling: padding that repeats
the input's entries and interpolation, each one ``certify.graph.operators.resampling`` node.

``torch.export`` writes ``nn.ReflectionPad*``, ``nn.ReplicationPad*``, ``nn.CircularPad*``,
``F.pad(x, p, mode)`` and the ``padding_mode`` of a convolution as ``aten.pad(x, p, mode)``
(zero padding stays in ``aten``: ``ZeroPad``); ``reflection_pad*``, ``replication_pad*`` and
``_pad_circular`` are read too. ``nn.Upsample`` and ``F.interpolate`` become
``upsample_nearest1d/2d``, ``_upsample_nearest_exact1d/2d``, ``upsample_linear1d`` and
``upsample_bilinear2d`` (overload ``vec``: a list of scale factors; ``default``: one per
axis). The output size is read from the export; a scale factor that torch's CPU kernel
ignores in (bi)linear modes (with ``align_corners``, or when the size stays: a copy) is
dropped, so that the graph computes what the module does on the CPU on every device.
"""

from __future__ import annotations

import torch

from certify.capture.build import Build, UnsupportedModelError
from certify.graph.operators import Interpolate, Pad
from certify.graph.operators.resampling import PAD_MODES

aten = torch.ops.aten


def _edge_pad(b: Build, fx, where, x, pad, mode: str):
    """``Pad(pad, mode)`` over the last ``len(pad) / 2`` axes (at most three, none the batch)."""
    pad = tuple(int(p) for p in pad)
    axes = len(pad) // 2
    if mode not in PAD_MODES:
        raise UnsupportedModelError(f"padding with mode={mode!r} ({where}); supported: "
                                    "'constant' (value 0), 'reflect', 'replicate', 'circular'")
    if len(pad) % 2 or not 1 <= axes <= min(3, len(b.nodes[x.index].shape)):
        raise UnsupportedModelError(f"{fx.name}: {mode} padding {list(pad)} ({where}); "
                                    "supported: pairs (before, after) for the last one to "
                                    "three axes after the batch axis")
    if mode == "circular" and min(pad) < 0:
        raise UnsupportedModelError(f"{fx.name}: circular padding with a negative amount "
                                    f"{list(pad)} ({where}); supported: amounts >= 0 (crop "
                                    "with a slice first)")
    return b.node(Pad(pad, mode), [x], fx)


def _pad_rule(mode: str):
    """``reflection_pad*``, ``replication_pad*``, ``_pad_circular``: ``(x, padding)``."""
    def rule(b: Build, fx, where, x, padding):
        return _edge_pad(b, fx, where, x, padding, mode)
    return rule


def _scale(scale, n: int, m: int, mode: str, align_corners: bool):
    """The scale factor from ``n`` entries to ``m`` as the graph keeps it: ``None`` where
    torch uses none (nonpositive), and for (bi)linear modes where the CPU kernel ignores it
    (``align_corners``, or ``m = n``: a copy) but another device's might not."""
    if scale is None or scale <= 0 or ("linear" in mode and (align_corners or m == n)):
        return None
    return float(scale)


def _interpolate(mode: str, axes: int):
    """``upsample_*`` of ``axes`` axes, either overload: the schema's names say where the
    scale factors are (``scale_factors``, or ``scales`` / ``scales_h``, ``scales_w``)."""
    def rule(b: Build, fx, where, x, *args, **kwargs):
        names = [a.name for a in fx.target._schema.arguments[1:]]
        values = {**dict(zip(names, args)), **kwargs}
        align = bool(values.get("align_corners") or False)
        if "scale_factors" in names:
            scales = values.get("scale_factors") or [None] * axes
        else:
            scales = [values.get(name) for name in names if name.startswith("scales")]
        before, after = b.nodes[x.index].shape[-axes:], b.shape(fx)[-axes:]
        scales = tuple(_scale(s, n, m, mode, align) for s, n, m in zip(scales, before, after))
        if all(s is None for s in scales):
            scales = ()
        return b.node(Interpolate(tuple(after), mode, align, scales), [x], fx)
    return rule


BUILDERS = {
    aten.reflection_pad1d: _pad_rule("reflect"), aten.reflection_pad2d: _pad_rule("reflect"),
    aten.reflection_pad3d: _pad_rule("reflect"),
    aten.replication_pad1d: _pad_rule("replicate"),
    aten.replication_pad2d: _pad_rule("replicate"),
    aten.replication_pad3d: _pad_rule("replicate"), aten._pad_circular: _pad_rule("circular"),
    aten.upsample_nearest1d: _interpolate("nearest", 1),
    aten.upsample_nearest2d: _interpolate("nearest", 2),
    aten._upsample_nearest_exact1d: _interpolate("nearest-exact", 1),
    aten._upsample_nearest_exact2d: _interpolate("nearest-exact", 2),
    aten.upsample_linear1d: _interpolate("linear", 1),
    aten.upsample_bilinear2d: _interpolate("bilinear", 2),
}
