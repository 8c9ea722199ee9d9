"""The rules of the certified layers, as ``torch.export`` writes them: dense layers
(``linear``, ``addmm``, ``mm``/``matmul``/``bmm`` by a weight; a product of two computed
tensors is a ``Product``), convolutions (grouped, depthwise and transposed; 1-d and 2-d) and
a batch norm in eval mode (folded into the layer before it where it can be:
``Build.batch_norm``). ``certify.capture.aten`` maps the ATen operators to them.
"""

from __future__ import annotations

from certify.capture.build import Build, Ref, UnsupportedModelError
from certify.capture.operands import _const, _zeros
from certify.graph.operators import Affine, Product
from certify.graph.operators.affine import swap_kernel


def _linear(b: Build, fx, where, x, weight, bias=None):
    b.dim(-1, b.ndim(x), fx, "linear")
    W = _const(weight, fx, "the weight")
    bias = _zeros(W.value.shape[0]) if bias is None else _const(bias, fx, "the bias").value
    return b.affine(Affine(W.value, bias.reshape(-1)), x, fx, W)


def _addmm(b: Build, fx, where, bias, x, weight_t, beta=1, alpha=1):
    if beta != 1 or alpha != 1 or not isinstance(x, Ref):
        raise UnsupportedModelError(f"addmm with beta={beta}, alpha={alpha} ({where})")
    Wt = _const(weight_t, fx, "the weight")
    bias = _const(bias, fx, "the bias").value
    m = Wt.value.shape[1]
    return b.affine(Affine(Wt.value.T.contiguous(), bias.expand(1, m).reshape(m).clone()),
                    x, fx, Wt)


def _mm(b: Build, fx, where, x, weight_t):
    if isinstance(x, Ref) and isinstance(weight_t, Ref):
        if b.ndim(x) < 3 or b.ndim(weight_t) < 3:
            raise UnsupportedModelError(f"{fx.name}: a product of computed vectors ({where}); "
                                        "supported: matrices per input (attention)")
        return b.node(Product(matmul=True), [x, weight_t], fx)
    if not isinstance(x, Ref):
        raise UnsupportedModelError(f"{fx.name}: a constant times a computed tensor "
                                    f"({where}); certify reads x @ W with W a weight")
    Wt = _const(weight_t, fx, "the right factor")
    if Wt.value.ndim != 2:
        raise UnsupportedModelError(f"{fx.name}: matmul by a {Wt.value.ndim}-d constant ({where})")
    return b.affine(Affine(Wt.value.T.contiguous(), _zeros(Wt.value.shape[1])), x, fx, Wt)


def _tuple(v, n):
    return tuple(v) * (n // len(v)) if isinstance(v, (list, tuple)) else (v,) * n


def _conv(b: Build, fx, where, x, weight, bias=None, stride=1, padding=0, dilation=1,
          groups=1, transposed=False, output_padding=0):
    """A convolution (grouped, depthwise or transposed; 1-d or 2-d) as a certified layer; a
    transposed one holds the kernel of the convolution it equals (``swap_kernel``)."""
    W = _const(weight, fx, "the kernel")
    n = W.value.ndim - 2
    if n not in (1, 2):
        raise UnsupportedModelError(f"{_kind(fx)} with a {n}-d kernel ({where}); supported: "
                                    "1-d and 2-d convolutions (grouped, depthwise, transposed)")
    dilation = _tuple(dilation, n)
    if transposed:
        if isinstance(padding, str):
            raise UnsupportedModelError(f"a transposed convolution with padding={padding!r} "
                                        f"({where}); supported: padding given as numbers")
        bias = _zeros(W.value.shape[1] * groups) if bias is None else \
            _const(bias, fx, "the bias").value
        op = Affine(swap_kernel(W.value, groups), bias, _tuple(stride, n), _tuple(padding, n),
                    dilation, groups, True, _tuple(output_padding, n))
        return b.affine(op, x, fx, W)
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        elif all(d * (k - 1) % 2 == 0 for d, k in zip(dilation, W.value.shape[2:])):
            padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, W.value.shape[2:]))
        else:
            raise UnsupportedModelError(f"padding='same' with an even kernel ({where})")
    bias = _zeros(W.value.shape[0]) if bias is None else _const(bias, fx, "the bias").value
    op = Affine(W.value, bias, _tuple(stride, n), _tuple(padding, n), dilation, groups)
    return b.affine(op, x, fx, W)


def _convolution(b: Build, fx, where, x, weight, bias, stride, padding, dilation, transposed,
                 output_padding, groups):
    return _conv(b, fx, where, x, weight, bias, stride, padding, dilation, groups, transposed,
                 output_padding)


def _conv_transpose(b: Build, fx, where, x, weight, bias=None, stride=1, padding=0,
                    output_padding=0, groups=1, dilation=1):
    return _conv(b, fx, where, x, weight, bias, stride, padding, dilation, groups, True,
                 output_padding)


def _kind(fx) -> str:
    return str(getattr(fx.target, "__name__", fx.target)).split(".")[0]


def _batch_norm(b: Build, fx, where, x, weight, bias, mean, var, training, momentum, eps,
                cudnn=None):
    if training or mean is None:
        raise UnsupportedModelError(f"batch norm in training mode or without running statistics "
                                    f"({where})")
    return b.batch_norm(x, fx, weight, bias, mean, var, eps)


def _batch_norm_no_training(b: Build, fx, where, x, weight, bias, mean, var, momentum, eps):
    return (b.batch_norm(x, fx, weight, bias, mean, var, eps), None, None)
