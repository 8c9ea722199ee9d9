"""The rules of ``certify.capture.aten``'s ``BUILDERS`` for the normalisations over the
entries of each input: layer norm, group norm and instance norm (eval mode).

All are the ``LayerNorm`` operator (``x - mean`` over its last axis, divided by
``sqrt(var + eps)``, the biased variance) on a reshaped input:

* layer norm over the trailing axes ``shape``: one ``LayerNorm`` node when only the last of
  them has several entries; otherwise the input reshaped to one last axis of their
  product, normalised with the flattened weight and bias, and reshaped back;
* group norm with ``G`` groups of an input ``(C, *positions)``: reshaped to
  ``(G, C / G * positions)``, normalised without weight, reshaped back, then the per-channel
  weight and bias as a ``ScaleShift``;
* instance norm: group norm with one group per channel; with running statistics (its
  ``track_running_stats`` in eval mode) a per-channel ``ScaleShift`` like a batch norm.
"""

from __future__ import annotations

import math

import torch

from certify.capture.build import Build, UnsupportedModelError
from certify.capture.operands import _const, _zeros
from certify.graph.operators import LayerNorm, Reshape, ScaleShift


def _layer_norm(b: Build, fx, where, x, shape, weight=None, bias=None, eps=1e-5, cudnn=True):
    n, k = b.ndim(x), len(shape)
    for d in range(n - k, n):
        b.dim(d, n, fx, "layer norm")
    size = math.prod(shape)
    g = torch.ones(size, dtype=torch.float64) if weight is None else \
        _const(weight, fx, "the weight").value.reshape(size)
    beta = _zeros(size) if bias is None else _const(bias, fx, "the bias").value.reshape(size)
    if shape[-1] == size:  # over (1, ..., 1, n): the last-axis layer norm
        return b.node(LayerNorm(g, beta, float(eps)), [x], fx)
    per = b.nodes[x.index].shape
    flat = per[:len(per) - k] + (size,)
    ref = b.node(Reshape(flat), [x], fx, f"{fx.name}/flatten", flat)
    ref = b.node(LayerNorm(g, beta, float(eps)), [ref], fx, f"{fx.name}/norm", flat)
    return b.node(Reshape(per), [ref], fx)


def _native_layer_norm(b: Build, fx, where, x, shape, weight, bias, eps):
    return (_layer_norm(b, fx, where, x, shape, weight, bias, eps), None, None)


def _grouped(b: Build, fx, where, x, groups: int, weight, bias, eps) -> object:
    """Each of ``groups`` groups of channels normalised over its channels and positions,
    then ``weight * y + bias`` per channel."""
    shape = b.nodes[x.index].shape
    if not shape or shape[0] % groups:
        raise UnsupportedModelError(f"{fx.name}: {groups} groups for an input of shape "
                                    f"{shape} per example ({where})")
    flat = (groups, math.prod(shape) // groups)
    ref = b.node(Reshape(flat), [x], fx, f"{fx.name}/groups", flat)
    ones, zeros = torch.ones(flat[1], dtype=torch.float64), _zeros(flat[1])
    ref = b.node(LayerNorm(ones, zeros, float(eps)), [ref], fx, f"{fx.name}/norm", flat)
    if weight is None and bias is None:
        return b.node(Reshape(shape), [ref], fx)
    ref = b.node(Reshape(shape), [ref], fx, f"{fx.name}/channels", shape)
    channels = (shape[0],) + (1,) * (len(shape) - 1)
    scale = torch.ones((), dtype=torch.float64) if weight is None else \
        _const(weight, fx, "the weight").value.reshape(channels)
    shift = torch.zeros((), dtype=torch.float64) if bias is None else \
        _const(bias, fx, "the bias").value.reshape(channels)
    return b.node(ScaleShift(scale, shift), [ref], fx)


def _group_norm(b: Build, fx, where, x, groups, weight=None, bias=None, eps=1e-5, cudnn=True):
    return _grouped(b, fx, where, x, groups, weight, bias, eps)


def _instance_norm(b: Build, fx, where, x, weight, bias, mean, var, use_input_stats, momentum,
                   eps, cudnn=True):
    if use_input_stats:
        return _grouped(b, fx, where, x, b.nodes[x.index].shape[0], weight, bias, eps)
    return b.batch_norm(x, fx, weight, bias, mean, var, eps)
