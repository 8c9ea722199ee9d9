"""A network as a chain of steps that certificates can reason about.

``Network.from_module`` traces a ``torch.nn.Module`` with ``torch.fx`` and turns it into a
tuple of small frozen steps, in float64:

* ``Affine``: ``nn.Linear`` or ``nn.Conv2d`` (a following BatchNorm is folded in, so the
  weight certified is the deployed, folded one);
* ``Activation``: ReLU, LeakyReLU, Tanh, Sigmoid, GELU;
* ``Flatten``; ``Pool``: average or max pooling (2-D);
* Dropout and Identity are dropped (eval mode);
* residual additions ``f(x) + g(x)`` (``+``, ``torch.add``, ``Tensor.add``), through three
  stack steps (THEORY.md section 4: the reduction only needs the downstream map from ``z`` to
  ``o``). The chain stays flat, so every affine layer keeps one index: a block forking at
  ``x`` becomes ``... x, Save, [branch f], Swap, [branch g], Add``. The value flowing
  through the chain is ``(current, stack)``; ``Save`` pushes a copy of the current value,
  ``Swap`` exchanges it with the top of the stack, ``Add`` adds the popped top to it. An
  identity shortcut is a branch without steps; nested and sequential blocks nest the same
  way (the fork of an addition is the nearest node every path to both operands passes).

Anything else raises ``UnsupportedModelError`` naming the module and what is supported;
NaN or Inf parameters raise ``certify.inputs.InputError``. The module itself is not changed
(its training flags are restored after tracing, its weights copied).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedModelError(ValueError):
    """The model contains a layer or connection that certify cannot reason about."""


SUPPORTED = (
    "Linear, Conv2d, BatchNorm1d/2d (after an affine layer), ReLU, LeakyReLU, Tanh, "
    "Sigmoid, GELU, Flatten, AvgPool2d, MaxPool2d, Dropout, Identity, and residual "
    "additions of two branches (x + f(x), f(x) + g(x))"
)

# sup |phi'| of each activation (derived in proofs/lipschitz.py; GELU at x = sqrt(2)).
GELU_LIPSCHITZ = (1 + math.erf(1)) / 2 + math.exp(-1) / math.sqrt(math.pi)
# GELU decreases left of its minimiser and increases right of it; its minimum is -0.16997...,
# so GELU_FLOOR is a lower bound of it.
GELU_ARGMIN = -0.7517916
GELU_FLOOR = -0.17
# GELU' = Phi(x) + x phi(x) ranges over [2 - GELU_LIPSCHITZ - 1, GELU_LIPSCHITZ] (extremes at
# -+sqrt(2), by the symmetry Phi(-x) = 1 - Phi(x)); widened for rounding.
GELU_DERIVATIVE = (-(GELU_LIPSCHITZ - 1) * (1 + 1e-12), GELU_LIPSCHITZ * (1 + 1e-12))


@dataclass(frozen=True)
class Affine:
    """``z = W h + b``; for a convolution ``Z = W P + b`` with ``P`` the im2col patches."""

    name: str
    weight: torch.Tensor  # (m, n) or (c_out, c_in, k_h, k_w)
    bias: torch.Tensor  # (m,) or (c_out,)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def is_conv(self) -> bool:
        return self.weight.ndim == 4

    @property
    def matrix(self) -> torch.Tensor:
        """The weight as a matrix ``(m, n)``: a kernel is reshaped to ``c_out x (c_in k k)``."""
        return self.weight.reshape(self.weight.shape[0], -1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return F.linear(x, self.weight, self.bias)

    def interval(self, lo: torch.Tensor, hi: torch.Tensor):
        """Bounds of the output over the box ``[lo, hi]``: centre +- ``|W|`` radius."""
        center, radius = (hi + lo) / 2, (hi - lo) / 2
        c = self(center)
        abs_step = Affine(self.name, self.weight.abs(), torch.zeros_like(self.bias), self.stride,
                          self.padding, self.dilation)
        r = abs_step(radius) * (1 + 1e-12)
        return c - r, c + r

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The layer input as columns ``h``: ``(B, n, 1)`` dense, ``(B, c_in k k, L)`` conv."""
        if not self.is_conv:
            return x[..., None]
        k = self.weight.shape[-2:]
        return F.unfold(x, k, dilation=self.dilation, padding=self.padding, stride=self.stride)


@dataclass(frozen=True)
class Activation:
    name: str
    kind: str  # relu, leaky_relu, tanh, sigmoid, gelu
    slope: float = 0.0  # negative slope of leaky_relu

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "relu":
            return torch.relu(x)
        if self.kind == "leaky_relu":
            return F.leaky_relu(x, self.slope)
        if self.kind == "gelu":
            return F.gelu(x)
        return torch.tanh(x) if self.kind == "tanh" else torch.sigmoid(x)

    def interval(self, lo: torch.Tensor, hi: torch.Tensor):
        """Bounds of the output over ``[lo, hi]``: monotone maps take the end points."""
        f_lo, f_hi = self(lo), self(hi)
        if self.kind != "gelu":
            return f_lo, f_hi
        low = torch.minimum(f_lo, f_hi)
        inside = (lo <= GELU_ARGMIN) & (hi >= GELU_ARGMIN)
        return torch.where(inside, torch.full_like(low, GELU_FLOOR), low), torch.maximum(f_lo, f_hi)

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """``phi'`` of the smooth monotone activations: ``1 - tanh^2`` and ``s (1 - s)``."""
        if self.kind == "tanh":
            return 1 - torch.tanh(x) ** 2
        s = torch.sigmoid(x)
        return s * (1 - s)

    @property
    def lipschitz(self) -> float:
        """``sup |phi'|``: the constant in every norm, as phi acts entrywise."""
        return {"relu": 1.0, "tanh": 1.0, "sigmoid": 0.25, "gelu": GELU_LIPSCHITZ,
                "leaky_relu": max(1.0, abs(self.slope))}[self.kind]


@dataclass(frozen=True)
class Flatten:
    name: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def interval(self, lo: torch.Tensor, hi: torch.Tensor):
        return self(lo), self(hi)

    lipschitz_l2 = lipschitz_linf = 1.0


@dataclass(frozen=True)
class Pool:
    """2-D average or max pooling with a square window."""

    name: str
    kind: str  # avg or max
    kernel: int
    stride: int
    padding: int = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "avg":
            return F.avg_pool2d(x, self.kernel, self.stride, self.padding)
        return F.max_pool2d(x, self.kernel, self.stride, self.padding)

    def interval(self, lo: torch.Tensor, hi: torch.Tensor):
        """Both poolings are monotone (average pooling has nonnegative weights)."""
        return self(lo), self(hi)

    @property
    def overlap(self) -> int:
        """Most windows one input entry lies in, along one axis."""
        return math.ceil(self.kernel / self.stride)

    @property
    def lipschitz_l2(self) -> float:
        """Average: ``sqrt(||A||_1 ||A||_inf) = overlap / k``; max: ``overlap``."""
        return self.overlap / self.kernel if self.kind == "avg" else float(self.overlap)

    lipschitz_linf = 1.0


def _top_rows(saved: tuple) -> tuple:
    """Top of a stack of coefficient rows walked backwards; ``None`` stands for zero rows
    (also for an empty stack: rows of values saved before the walk's start)."""
    return (saved[-1], saved[:-1]) if saved else (None, ())


def _top(step, stack: tuple) -> tuple:
    if not stack:
        raise ValueError(f"{step.name}: the stack is empty; a network run from inside a residual "
                         "block needs the values saved before it: pass "
                         "stack=network.trace_states(x)[start][1]")
    return stack[-1], stack[:-1]


@dataclass(frozen=True)
class Save:
    """A residual block's fork: push a copy of the current value."""

    name: str

    def move(self, x, stack: tuple, add: Callable = operator.add):
        return x, stack + (x,)

    def move_back(self, rows, saved: tuple, add: Callable = operator.add):
        """Adjoint of ``move``: the copy's rows join the current ones."""
        top, rest = _top_rows(saved)
        return (rows if top is None else top if rows is None else add(rows, top)), rest


@dataclass(frozen=True)
class Swap:
    """Between a block's branches: exchange the current value with the top of the stack."""

    name: str

    def move(self, x, stack: tuple, add: Callable = operator.add):
        top, rest = _top(self, stack)
        return top, rest + (x,)

    def move_back(self, rows, saved: tuple, add: Callable = operator.add):
        """Adjoint of ``move``: exchange the rows with the top of the row stack."""
        top, rest = _top_rows(saved)
        return top, rest + (rows,)


@dataclass(frozen=True)
class Add:
    """A residual addition: ``current + pop()``. ``add`` lets bounds carry their own sums."""

    name: str

    def move(self, x, stack: tuple, add: Callable = operator.add):
        top, rest = _top(self, stack)
        return add(x, top), rest

    def move_back(self, rows, saved: tuple, add: Callable = operator.add):
        """Adjoint of ``move``: the popped operand gets the same rows."""
        return rows, saved + (rows,)


Step = Affine | Activation | Flatten | Pool | Save | Swap | Add
STACK_STEPS = (Save, Swap, Add)


def advance(step: Step, x: torch.Tensor, stack: tuple) -> tuple[torch.Tensor, tuple]:
    """One step on the state ``(current, stack)``."""
    if isinstance(step, STACK_STEPS):
        return step.move(x, stack)
    return step(x), stack


@dataclass(frozen=True)
class Network:
    steps: tuple[Step, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)

    def run(self, x: torch.Tensor, start: int = 0, stack: tuple = ()) -> torch.Tensor:
        """Apply steps ``start, start + 1, ...`` to ``x``; ``stack``: the values saved on the
        stack at ``start`` (``trace_states(x)[start][1]``; empty outside residual blocks)."""
        for step in self.steps[start:]:
            x, stack = advance(step, x, stack)
        return x

    def trace_states(self, x: torch.Tensor, stack: tuple = ()) -> list[tuple[torch.Tensor, tuple]]:
        """The state ``(current, stack)`` before every step, then after the last one."""
        states = [(x, tuple(stack))]
        for step in self.steps:
            states.append(advance(step, *states[-1]))
        return states

    def trace(self, x: torch.Tensor, stack: tuple = ()) -> list[torch.Tensor]:
        """The (current) input of every step, then the output: ``len(steps) + 1`` tensors."""
        return [value for value, _ in self.trace_states(x, stack)]

    @property
    def affine_indices(self) -> list[int]:
        return [i for i, s in enumerate(self.steps) if isinstance(s, Affine)]

    @classmethod
    def from_module(cls, module: nn.Module) -> "Network":
        """The steps of ``module`` (traced in eval mode), with float64 copies of its weights.

        The module is left as it was: its training flags are restored after tracing, its
        parameters are copied (later changes to the module do not reach the network).
        Raises ``certify.inputs.InputTypeError`` (a ``TypeError``) for a non-module,
        ``UnsupportedModelError`` for layers certify cannot reason about and
        ``certify.inputs.InputError`` (a ``ValueError``) for NaN or Inf parameters or buffers.
        """
        # Imported here: certify.inputs builds on this module.
        from certify.inputs import InputTypeError, require_finite

        if not isinstance(module, nn.Module):
            raise InputTypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
        require_finite(list(module.named_parameters()) + list(module.named_buffers()),
                       f"the model ({type(module).__name__})")
        modes = [(m, m.training) for m in module.modules()]
        try:
            # fx evaluates Python control flow on ``self.training`` while tracing; setting the
            # flags directly also works for modules whose eval() is refused (torch.export).
            for m, _ in modes:
                m.training = False
            return cls(tuple(_steps(module)))
        finally:
            for m, training in modes:
                m.training = training


def _fold_batchnorm(affine: Affine, bn: nn.Module, name: str) -> Affine:
    """``gamma (W h + b - mu) / sqrt(var + eps) + beta`` as one affine layer."""
    if bn.running_mean is None:
        raise UnsupportedModelError(f"{name}: BatchNorm without running statistics")
    scale = bn.weight.detach().double() if bn.weight is not None else 1.0
    scale = scale / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.detach().double() if bn.bias is not None else 0.0
    shape = (-1,) + (1,) * (affine.weight.ndim - 1)
    weight = affine.weight * scale.reshape(shape)
    bias = (affine.bias - bn.running_mean.double()) * scale + shift
    return Affine(f"{affine.name}+{name}", weight, bias, affine.stride, affine.padding,
                  affine.dilation)


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy: ``.double()`` of a float64 parameter would share its storage."""
    return t.detach().to(torch.float64, copy=True)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _from_module(name: str, m: nn.Module) -> Step | None:
    if isinstance(m, nn.Linear):
        bias = m.bias if m.bias is not None else torch.zeros(m.out_features)
        return Affine(name, _copy(m.weight), _copy(bias))
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise UnsupportedModelError(
                f"{name}: Conv2d with groups={m.groups}, padding={m.padding!r}, "
                f"padding_mode={m.padding_mode!r}; supported: groups=1, numeric zero padding"
            )
        bias = m.bias if m.bias is not None else torch.zeros(m.out_channels)
        return Affine(name, _copy(m.weight), _copy(bias), _pair(m.stride), _pair(m.padding),
                      _pair(m.dilation))
    kinds = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
    if type(m) in kinds:
        return Activation(name, kinds[type(m)])
    if isinstance(m, nn.LeakyReLU):
        return Activation(name, "leaky_relu", float(m.negative_slope))
    if isinstance(m, nn.GELU):
        if m.approximate != "none":
            raise UnsupportedModelError(f"{name}: GELU(approximate={m.approximate!r})")
        return Activation(name, "gelu")
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise UnsupportedModelError(f"{name}: Flatten must flatten all but the batch axis")
        return Flatten(name)
    if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
        kernel, stride, padding = (_pair(v) for v in (m.kernel_size, m.stride or m.kernel_size,
                                                       m.padding))
        if len({kernel[0], kernel[1]}) != 1 or len(set(stride)) != 1 or len(set(padding)) != 1 \
                or getattr(m, "ceil_mode", False) or getattr(m, "dilation", 1) not in (1, (1, 1)):
            raise UnsupportedModelError(f"{name}: only square pooling windows without dilation "
                                        "or ceil_mode are supported")
        kind = "avg" if isinstance(m, nn.AvgPool2d) else "max"
        if kind == "avg" and padding[0] and not m.count_include_pad:
            raise UnsupportedModelError(f"{name}: AvgPool2d(count_include_pad=False)")
        return Pool(name, kind, kernel[0], stride[0], padding[0])
    if isinstance(m, (nn.Dropout, nn.Identity)):
        return None
    raise UnsupportedModelError(
        f"{name}: {type(m).__name__} is not supported; supported layers: {SUPPORTED}"
    )


_FUNCTIONS = {torch.relu: "relu", F.relu: "relu", torch.tanh: "tanh", torch.sigmoid: "sigmoid"}


_ADDS = (operator.add, torch.add)


def _is_add(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or \
        (node.op == "call_method" and node.target == "add")


def _operands(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The one input of a layer, or the two operands of a residual addition."""
    if _is_add(node):
        if node.kwargs or len(node.args) != 2 or not all(
                isinstance(a, torch.fx.Node) for a in node.args):
            raise UnsupportedModelError(
                f"{node.name}: only additions of two tensors computed from the input are "
                f"supported (x + f(x)); got arguments {node.args} {node.kwargs or ''}")
        return list(node.args)
    inputs = node.all_input_nodes
    if len(inputs) != 1:
        raise UnsupportedModelError(
            f"{node.name}: {getattr(node.target, '__name__', node.target)} takes "
            f"{len(inputs)} tensors; of the operations on several tensors only residual "
            f"additions are supported; supported layers: {SUPPORTED}")
    return inputs


class _Graph:
    """The steps of an fx graph: a chain, with residual blocks laid out by their forks."""

    def __init__(self, module: nn.Module, graph: torch.fx.Graph):
        self.module, self.forks, self.emitted = module, {}, set()
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise UnsupportedModelError("the model must take exactly one input tensor")
        self.input = inputs[0]
        output = next(n for n in graph.nodes if n.op == "output")
        if not isinstance(output.args[0], torch.fx.Node):
            raise UnsupportedModelError("the model must return exactly one tensor (the logits)")
        self.output = output.args[0]

    def fork(self, node: torch.fx.Node) -> torch.fx.Node:
        """The immediate dominator: a layer's input, or for an addition the nearest node
        that every path from the input to both operands passes."""
        if node not in self.forks:
            if node.op not in ("call_module", "call_function", "call_method"):
                raise UnsupportedModelError(
                    f"{node.name}: a {node.op} node (a constant or an attribute) feeds the "
                    "network; every tensor must be computed from the one input")
            a, *b = _operands(node)
            if b:
                above = set(self.path(b[0]))
                a = next(n for n in self.path(a) if n in above)
            self.forks[node] = a
        return self.forks[node]

    def path(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        """``node`` and its forks up to the input."""
        nodes = [node]
        while nodes[-1] is not self.input:
            nodes.append(self.fork(nodes[-1]))
        return nodes

    def sequence(self, node: torch.fx.Node, stop: torch.fx.Node) -> list[Step]:
        """The steps computing ``node`` from the value of ``stop`` (a fork of ``node``)."""
        path = []
        while node is not stop:
            path.append(node)
            node = self.fork(node)
        steps: list[Step] = []
        for node in reversed(path):
            if node in self.emitted:
                raise UnsupportedModelError(
                    f"{node.name}: its value is used both inside and after a residual block; "
                    "certify needs every layer to run once (blocks must nest)")
            self.emitted.add(node)
            if _is_add(node):
                a, b = _operands(node)
                fork = self.fork(node)
                steps += [Save(f"{node.name}/save"), *self.sequence(a, fork),
                          Swap(f"{node.name}/swap"), *self.sequence(b, fork), Add(node.name)]
                continue
            step = _node_step(self.module, node)
            if step is None:
                continue
            if isinstance(step, nn.Module):  # BatchNorm: fold into the affine layer before it
                if not steps or not isinstance(steps[-1], Affine):
                    raise UnsupportedModelError(
                        f"{node.target}: BatchNorm must follow a Linear or Conv2d layer (in "
                        "the same branch) so that it can be folded into it")
                steps[-1] = _fold_batchnorm(steps[-1], step, str(node.target))
                continue
            steps.append(step)
        return steps


def _steps(module: nn.Module) -> list[Step]:
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception as err:  # fx raises many types for untraceable Python control flow
        raise UnsupportedModelError(
            f"cannot trace {type(module).__name__} with torch.fx ({type(err).__name__}: {err}); "
            "certify needs a model without data-dependent control flow"
        ) from None
    parsed = _Graph(module, graph)
    steps = parsed.sequence(parsed.output, parsed.input)
    if not any(isinstance(s, Affine) for s in steps):
        raise UnsupportedModelError("the model has no Linear or Conv2d layer to certify")
    if isinstance(steps[-1], Add):
        raise UnsupportedModelError(
            f"{steps[-1].name}: the logits come out of a residual addition; certify needs the "
            "last layer to be a Linear layer after every residual block")
    return steps


def _node_step(module: nn.Module, node: torch.fx.Node):
    if node.op == "call_module":
        sub = module.get_submodule(node.target)
        if isinstance(sub, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return sub
        return _from_module(str(node.target), sub)
    if node.op == "call_function" and node.target in _FUNCTIONS:
        return Activation(node.name, _FUNCTIONS[node.target])
    if node.op == "call_function" and node.target is torch.flatten and node.args[1:] == (1,):
        return Flatten(node.name)
    if node.op == "call_method" and node.target in ("relu", "tanh", "sigmoid"):
        return Activation(node.name, node.target)
    if node.op == "call_method" and node.target == "flatten" and tuple(node.args[1:]) == (1,):
        return Flatten(node.name)
    raise UnsupportedModelError(
        f"{node.name}: operation {node.op} {getattr(node.target, '__name__', node.target)} "
        f"is not supported; supported layers: {SUPPORTED}"
    )
