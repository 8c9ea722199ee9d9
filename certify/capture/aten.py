"""ATen operators, as ``torch.export`` writes them, read as ``certify.graph.operators``.

``BUILDERS`` maps an ATen operator (its overload packet) to a rule that adds the matching
node to a ``Build``; ``IDENTITIES`` are dropped (copies, dropout in eval mode, float casts),
and softmax and log-softmax may end the graph (``Tail``: the argmax is kept, and log-softmax
keeps the margins ``o_y - o_j`` exactly); a softmax used inside the network (attention) is a
``Softmax`` node. Products of two computed tensors (``Q K^T``, attention times values) are
``Product`` nodes, and ``x / max(||x||, eps)`` (``F.normalize``) is one ``Normalize`` node.
Arguments are per-batch in the export; every rule converts them to per-input shapes and axes
(``Build.shape``, ``Build.dim``, from wherever the batch axis is: ``MOVABLE`` lists the
operators that follow it away from the front) and refuses operations along the batch axis.

The rules of activations, arithmetic, pooling and the output here; those of the certified
layers (dense, convolutions, batch norm) in ``certify.capture.layers``, those that move, cut
and join tensors in ``certify.capture.layout``, the normalisations in ``certify.capture.norms``, those of
attention (scaled dot-product attention decomposed into products and a softmax, constant
masks, the vector norm of ``F.normalize``) in ``certify.capture.transformers``, those of
padding by the input's own entries and of interpolation in ``certify.capture.resampling``,
those of recurrent layers (LSTM, GRU, RNN and their cells, unrolled) in
``certify.capture.recurrent``, and ``certify.capture.time_major`` extends the rules of
indexing, transposing, concatenating and reducing to the time-major tensors recurrent layers
return (``TIME_MAJOR_USERS``: the operators that may read them). All read constant operands
(weights, biases, the constants of arithmetic) with ``certify.capture.operands``.
"""

from __future__ import annotations

import math
import operator

import torch

from certify.capture.build import Build, Masked, Norm, Ref, UnsupportedModelError
from certify.capture.layers import (_addmm, _batch_norm, _batch_norm_no_training, _conv,
                                    _conv_transpose, _convolution, _linear, _mm, _tuple)
from certify.capture.layout import (_cat, _chunk, _pad, _pad_nd, _permute, _reshape, _select,
                                    _slice, _split, _tensor_split, _transpose, _unbind)
from certify.capture.norms import _group_norm, _instance_norm, _layer_norm, _native_layer_norm
from certify.capture.operands import _const, _per_input
from certify.capture.recurrent import RULES as RECURRENT
from certify.capture.recurrent import SUPPORTED as RECURRENT_SUPPORTED
from certify.capture.resampling import BUILDERS as RESAMPLING
from certify.capture.time_major import TIME_MAJOR
from certify.capture.transformers import (_add_constant, _attention, _clamp_min, _expand_norm,
                                          _masked_fill, _vector_norm, _where)
from certify.graph.operators import (Activation, Add, AvgPool, MaxPool, Normalize,
                                     PReLU, Product, Reduce, ScaleShift)

aten = torch.ops.aten


# -------------------------------------------------------------------- rules


def _activation(kind, **defaults):
    def rule(b: Build, fx, where, x, *args, **kwargs):
        if kind == "gelu":
            approximate = (args or (kwargs.get("approximate", "none"),))[0]
            return b.node(Activation("gelu" if approximate == "none" else "gelu_tanh"), [x], fx)
        names = list(defaults)
        values = dict(defaults)
        values.update(zip(names, args))
        values.update(kwargs)
        if kind == "hardtanh":  # aten.clamp names its bounds min and max
            values.update({f"{k}_val": values.pop(k) for k in ("min", "max") if k in values})
        if kind == "leaky_relu":
            if values["negative_slope"] < 0:
                raise UnsupportedModelError(f"LeakyReLU with negative_slope="
                                            f"{values['negative_slope']}: not monotone ({where})")
            op = Activation(kind, float(values["negative_slope"]))
        elif kind == "elu":
            if not (values["alpha"] >= 0 and values["scale"] > 0 and values["input_scale"] > 0):
                raise UnsupportedModelError(f"ELU with alpha={values['alpha']}, scale="
                                            f"{values['scale']}: not monotone ({where})")
            op = Activation(kind, float(values["alpha"]), float(values["scale"]),
                            float(values["input_scale"]))
        elif kind == "softplus":
            if not values["beta"] > 0:
                raise UnsupportedModelError(f"Softplus with beta={values['beta']} ({where})")
            op = Activation(kind, float(values["beta"]), float(values["threshold"]))
        elif kind == "hardtanh":  # also ReLU6, and clamp(min, max) with constant bounds
            low, high = values["min_val"], values["max_val"]
            low, high = -math.inf if low is None else low, math.inf if high is None else high
            if not all(isinstance(v, (int, float)) for v in (low, high)):
                raise UnsupportedModelError(f"{fx.name}: a clamp between computed tensors "
                                            f"({where}); supported: constant bounds")
            if not low <= high:
                raise UnsupportedModelError(f"{fx.name}: a clamp with min {low} above max "
                                            f"{high} ({where})")
            op = Activation(kind, float(low), float(high))
        else:
            op = Activation(kind)
        return b.node(op, [x], fx)
    return rule


def _prelu(b: Build, fx, where, x, weight):
    """``nn.PReLU``: one slope, or one per channel (the input's first axis after the batch)."""
    slopes = _const(weight, fx, "the PReLU slopes").value.detach().to(torch.float64).flatten()
    shape = b.shape(fx)
    if slopes.numel() != 1 and (len(shape) < 1 or slopes.numel() != shape[0]):
        raise UnsupportedModelError(f"{fx.name}: {slopes.numel()} PReLU slopes for an input of "
                                    f"shape {tuple(shape)} per example ({where})")
    return b.node(PReLU(slopes.reshape(-1, *[1] * (len(shape) - 1))), [x], fx)


def _finite(t: torch.Tensor, fx, where) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise UnsupportedModelError(f"{fx.name}: arithmetic with a constant that is not finite "
                                    f"({where}); supported: finite constants, and -inf added "
                                    "before a softmax (an attention mask)")
    return t


def _arith(kind):
    def rule(b: Build, fx, where, a, c, alpha=1, **kwargs):
        if kwargs.get("rounding_mode") is not None:
            raise UnsupportedModelError(f"division with rounding_mode ({where})")
        if kind not in ("add", "sub") or all(isinstance(v, (Ref, Masked)) for v in (a, c)):
            # only a constant added to a masked tensor keeps it masked
            a, c = (b.inside(v, where) if isinstance(v, Masked) else v for v in (a, c))
        if kind in ("add", "sub") and isinstance(a, Ref) and isinstance(c, Ref):
            return b.node(Add(alpha if kind == "add" else -alpha), [a, c], fx)
        if kind == "mul" and isinstance(a, Ref) and isinstance(c, Ref):
            return b.node(Product(), [a, c], fx)
        if kind == "div" and isinstance(c, Norm):
            if c.ref != a:
                raise UnsupportedModelError(
                    f"{fx.name}: division by the norm of another tensor ({where}); supported: "
                    "x / max(||x||, eps) over the last axis (F.normalize)")
            return b.node(Normalize(c.eps), [a], fx)
        if isinstance(c, (Ref, Masked)) and kind in ("add", "mul"):
            a, c = c, a
        if isinstance(c, (Ref, Masked)):
            if kind == "sub":  # constant - x (-x hides nothing: +inf)
                return _rsub(b, fx, where, b.inside(c, where), a, alpha)
            raise UnsupportedModelError(
                f"{fx.name}: division by a computed tensor ({where}); supported: division by "
                "a constant, and x / max(||x||, eps) over the last axis (F.normalize)")
        if kind in ("add", "sub"):  # a ScaleShift, or an attention mask (-inf entries)
            ref = a.ref if isinstance(a, Masked) else a
            t = _per_input(c, fx, kind, b.ndim(ref), b.at)
            return _add_constant(b, fx, where, a, (alpha if kind == "add" else -alpha) * t)
        t = _finite(_per_input(c, fx, kind, b.ndim(a), b.at), fx, where)
        zero = torch.zeros((), dtype=torch.float64)
        op = ScaleShift(t if kind == "mul" else _finite(1 / t, fx, where), zero)
        return b.node(op, [a], fx)
    return rule


def _rsub(b: Build, fx, where, x, c, alpha=1):
    """``c - alpha x`` for a constant ``c``."""
    shift = _finite(_per_input(c, fx, "rsub", b.ndim(x), b.at), fx, where)
    return b.node(ScaleShift(torch.tensor(-float(alpha), dtype=torch.float64), shift), [x], fx)


def _neg(b: Build, fx, where, x):
    return b.node(ScaleShift(-torch.ones((), dtype=torch.float64),
                             torch.zeros((), dtype=torch.float64)), [x], fx)


def _reduce(mean):
    def rule(b: Build, fx, where, x, dim=None, keepdim=False, dtype=None):
        n = b.ndim(x)
        dims = range(n) if dim is None or dim == [] else (dim if isinstance(dim, (list, tuple))
                                                          else [dim])
        axes = tuple(b.dim(d, n, fx, "mean" if mean else "sum") for d in dims)
        axis = x.axis if keepdim else x.axis - sum(d % n < x.axis for d in dims)
        return b.node(Reduce(axes, keepdim, mean), [x], fx, axis=axis)
    return rule


def _avg_pool(two):
    def rule(b: Build, fx, where, x, kernel, stride=None, padding=0, ceil_mode=False,
             count_include_pad=True, divisor_override=None):
        n = 2 if two else 1
        k = _tuple(kernel, n)
        if divisor_override is not None and divisor_override <= 0:
            raise UnsupportedModelError(f"average pooling with divisor_override="
                                        f"{divisor_override} ({where}); it must be positive")
        return b.node(AvgPool(k, _tuple(stride, n) if stride else k, _tuple(padding, n),
                              ceil_mode, count_include_pad, divisor_override), [x], fx)
    return rule


def _adaptive(two):
    def rule(b: Build, fx, where, x, output_size):
        return b.node(AvgPool(_tuple(output_size, 2 if two else 1), adaptive=True), [x], fx)
    return rule


def _max_pool(two, indices):
    def rule(b: Build, fx, where, x, kernel, stride=None, padding=0, dilation=1,
             ceil_mode=False):
        n = 2 if two else 1
        k = _tuple(kernel, n)
        ref = b.node(MaxPool(k, _tuple(stride, n) if stride else k, _tuple(padding, n),
                             _tuple(dilation, n), ceil_mode), [x], fx)
        return (ref, None) if indices else ref
    return rule


def _getitem(b: Build, fx, where, values, index):
    item = values[index]
    if item is None:
        raise UnsupportedModelError(f"{fx.name}: uses the indices or statistics output of "
                                    f"an operator ({where})")
    return item


def _dropout(b: Build, fx, where, x, p=0.5, train=False):
    if train:
        raise UnsupportedModelError(f"dropout in training mode ({where})")
    return x


def _to_copy(b: Build, fx, where, x, *args, dtype=None, **kwargs):
    if dtype is not None and not dtype.is_floating_point:
        raise UnsupportedModelError(f"a cast to {dtype} ({where}); certify works in float64")
    return x


def _sym_size(b: Build, fx, where, x, dim):
    return int(fx.meta["val"])


def _tail(log):
    def rule(b: Build, fx, where, x, dim, *args, **kwargs):
        ref = x.ref if isinstance(x, Masked) else x
        n = b.ndim(ref)
        if (dim + n if dim < 0 else dim) != n - 1:
            raise UnsupportedModelError(f"{'log-' if log else ''}softmax over an axis other "
                                        f"than the last ({where})")
        b.dim(dim, n, fx, "softmax")
        return b.tail(x, fx, log)
    return rule


BUILDERS = {
    aten.linear: _linear, aten.addmm: _addmm, aten.mm: _mm, aten.matmul: _mm,
    aten.conv1d: _conv, aten.conv2d: _conv, aten.convolution: _convolution,
    aten.conv_transpose1d: _conv_transpose, aten.conv_transpose2d: _conv_transpose,
    aten.batch_norm: _batch_norm,
    aten._native_batch_norm_legit_no_training: _batch_norm_no_training,
    aten.relu: _activation("relu"), aten.relu_: _activation("relu"),
    aten.leaky_relu: _activation("leaky_relu", negative_slope=0.01),
    aten.leaky_relu_: _activation("leaky_relu", negative_slope=0.01),
    aten.elu: _activation("elu", alpha=1.0, scale=1.0, input_scale=1.0),
    aten.elu_: _activation("elu", alpha=1.0, scale=1.0, input_scale=1.0),
    aten.tanh: _activation("tanh"), aten.sigmoid: _activation("sigmoid"),
    aten.gelu: _activation("gelu"), aten.softplus: _activation("softplus", beta=1.0,
                                                               threshold=20.0),
    **{op: _activation(kind) for kind in ("silu", "mish", "hardswish", "hardsigmoid")
       for op in (getattr(aten, kind), getattr(aten, kind + "_"))},
    **{op: _activation("hardtanh", min_val=-1.0, max_val=1.0)
       for op in (aten.hardtanh, aten.hardtanh_)},
    **{op: _activation("hardtanh", min_val=None, max_val=None)
       for op in (aten.clamp, aten.clamp_)},
    aten.prelu: _prelu, aten._prelu_kernel: _prelu,
    aten.view: _reshape, aten.reshape: _reshape, aten._unsafe_view: _reshape,
    aten.flatten: _reshape, aten.unflatten: _reshape, aten.squeeze: _reshape,
    aten.unsqueeze: _reshape, aten.permute: _permute, aten.transpose: _transpose,
    aten.expand: _expand_norm, aten.slice: _slice, aten.select: _select,
    aten.cat: _cat(False), aten.stack: _cat(True),
    aten.split: _split, aten.split_with_sizes: _split, aten.chunk: _chunk,
    aten.tensor_split: _tensor_split, aten.unbind: _unbind,
    aten.add: _arith("add"), aten.add_: _arith("add"), aten.sub: _arith("sub"),
    aten.sub_: _arith("sub"), aten.mul: _arith("mul"), aten.mul_: _arith("mul"),
    aten.div: _arith("div"), aten.div_: _arith("div"), aten.rsub: _rsub, aten.neg: _neg,
    aten.mean: _reduce(True), aten.sum: _reduce(False),
    aten.avg_pool2d: _avg_pool(True), aten.avg_pool1d: _avg_pool(False),
    aten.adaptive_avg_pool2d: _adaptive(True), aten._adaptive_avg_pool2d: _adaptive(True),
    aten.adaptive_avg_pool1d: _adaptive(False),
    aten.max_pool2d: _max_pool(True, False), aten.max_pool1d: _max_pool(False, False),
    aten.max_pool2d_with_indices: _max_pool(True, True),
    aten.max_pool1d_with_indices: _max_pool(False, True),
    aten.constant_pad_nd: _pad_nd, aten.pad: _pad,
    aten.dropout: _dropout, aten.feature_dropout: _dropout, aten.alpha_dropout: _dropout,
    aten.dropout_: _dropout, aten.feature_dropout_: _dropout, aten.alpha_dropout_: _dropout,
    aten.feature_alpha_dropout: _dropout, aten.feature_alpha_dropout_: _dropout,
    aten.softmax: _tail(False), aten._softmax: _tail(False), aten.log_softmax: _tail(True),
    aten._log_softmax: _tail(True),
    aten.layer_norm: _layer_norm, aten.native_layer_norm: _native_layer_norm,
    aten.group_norm: _group_norm, aten.instance_norm: _instance_norm,
    aten.scaled_dot_product_attention: _attention, aten.bmm: _mm,
    aten.masked_fill: _masked_fill, aten.masked_fill_: _masked_fill, aten.where: _where,
    aten.linalg_vector_norm: _vector_norm, aten.clamp_min: _clamp_min,
    aten.expand_as: _expand_norm,
    aten._to_copy: _to_copy, aten.to: _to_copy, aten.sym_size: _sym_size,
    operator.getitem: _getitem,
    **RESAMPLING,
    **RECURRENT,
}
BUILDERS.update({op: extend(BUILDERS[op]) for op, extend in TIME_MAJOR.items()})

# The operators that may read a time-major tensor (``certify.capture.build.Leading``).
TIME_MAJOR_USERS = {*TIME_MAJOR, *RECURRENT, operator.getitem, aten.dropout,
                    aten.feature_dropout, aten.alpha_dropout, aten._to_copy, aten.to}

IDENTITIES = {aten.clone, aten.alias, aten.detach, aten.contiguous, aten.lift_fresh_copy}

# The operators that read a tensor whose batch axis a transpose moved (``Ref.axis``): their
# rules convert axes from where it is (``Build.at``). Any other needs it first.
MOVABLE = {
    aten.linear, aten.relu, aten.relu_, aten.leaky_relu, aten.leaky_relu_, aten.elu, aten.elu_,
    aten.tanh, aten.sigmoid, aten.gelu, aten.softplus, aten.silu, aten.silu_, aten.mish,
    aten.mish_, aten.hardswish, aten.hardswish_, aten.hardsigmoid, aten.hardsigmoid_,
    aten.hardtanh, aten.hardtanh_, aten.clamp, aten.clamp_,
    aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze,
    aten.unsqueeze, aten.permute, aten.transpose, aten.expand, aten.slice, aten.select,
    aten.cat, aten.stack, aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split,
    aten.unbind, aten.add, aten.add_, aten.sub, aten.sub_, aten.mul, aten.mul_, aten.div,
    aten.div_, aten.rsub, aten.neg, aten.mean, aten.sum, aten.dropout, aten.feature_dropout,
    aten.alpha_dropout, aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax,
    aten.layer_norm, aten.native_layer_norm, aten.scaled_dot_product_attention,
    aten.masked_fill, aten.masked_fill_, aten.where, aten._to_copy, aten.to, operator.getitem,
    # a recurrent layer with batch_first=False reads (T, B, features): the batch second
    *(op for op in RECURRENT if not op.__name__.endswith("_cell")),
    aten.dropout_, aten.feature_dropout_, aten.alpha_dropout_,
}

# The operators a masked tensor (``-inf`` where an attention mask hides it) may feed on its
# way to a softmax.
MASK_USERS = {aten.add, aten.add_, aten.sub, aten.sub_, aten.masked_fill, aten.masked_fill_,
              aten.where, aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax,
              aten.dropout, aten._to_copy, aten.to}

SUPPORTED = (
    "linear, addmm/mm/matmul by a weight, conv1d/conv2d (grouped, depthwise, transposed), "
    "batch norm in eval mode, "
    "relu, leaky_relu, elu, tanh, sigmoid, gelu (exact and tanh), softplus, silu, mish, "
    "hardswish, hardsigmoid, hardtanh/relu6/clamp (constant bounds), prelu, max and average "
    "pooling (1-d, 2-d, adaptive average), layer norm (trailing axes), group norm, instance "
    "norm, view/reshape/flatten/squeeze/unsqueeze, permute/transpose (the batch axis too), "
    "expand, slice/select, split/chunk/tensor_split/unbind, "
    "cat/stack (also with constants), addition, subtraction and products (mul, matmul/bmm) of "
    "computed tensors, scaled_dot_product_attention (constant masks, is_causal), "
    "nn.MultiheadAttention (self-attention), masked_fill and where with constant masks, "
    "softmax over the last axis, "
    "F.normalize (l2, last axis), arithmetic with constants, mean/sum, zero padding, "
    "reflect/replicate/circular padding (1-d to 3-d), nearest, nearest-exact, linear and "
    "bilinear interpolation (nn.Upsample, F.interpolate; 1-d and 2-d), "
    "dropout and copies (dropped), log-softmax at the output, "
    f"{RECURRENT_SUPPORTED} (unrolled over the example's sequence length)"
)
