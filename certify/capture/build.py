"""A graph under construction from an exported program (``certify.capture.export``).

``Build`` holds the nodes read so far; the values of the exported program's nodes are
``Ref`` (a node of the graph), ``Const`` (a tensor computed from parameters and constants
alone, evaluated at once: constant folding), ``Tail`` (softmax or log-softmax, allowed
only as the output), ``Norm`` (a vector norm on its way to ``F.normalize``), ``Masked``
(``-inf`` added where an attention mask hides a key, on its way to a softmax) or ``Leading``
(a tensor whose first axis is not the batch: an RNN's time-major sequence or final states,
held as its slices). Shapes and axes are converted from the export's per-batch ones to
per-input ones (``shape``, ``dim``), refusing operations along the batch axis.

The batch axis may stand anywhere in the export's tensors: a transpose moves it
(``batch_first=False`` sequences are ``(T, B, E)``). A node's value always holds it first;
``Ref.axis`` says where the export's tensor holds it, and ``Build.at`` is that position for
the operation being read, so that its shapes and axes convert from there.

A weight that a recurrence uses at every step (``recurrent``) is certified only where one
node uses it; with several uses its nodes become ``FixedAffine`` when the graph is finished.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from certify.graph.graph import Graph, Node
from certify.graph.operators import Affine, FixedAffine, ScaleShift, Softmax, fold_batchnorm


class UnsupportedModelError(ValueError):
    """The model contains an operation that certify cannot reason about."""


@dataclass(frozen=True)
class Ref:
    """A node of the graph being built; ``axis``: where the export's tensor holds the batch
    axis (the node's value is that tensor with this axis moved to the front)."""

    index: int
    axis: int = 0


@dataclass(frozen=True, eq=False)
class Const:
    """A tensor computed from parameters and constants alone; ``source``: the parameter or
    buffer it comes from (for the layer's name)."""

    value: torch.Tensor
    source: str | None = None


@dataclass(frozen=True, eq=False)
class Tail:
    """Softmax or log-softmax over the last axis: dropped at the output (it keeps the
    argmax, and log-softmax the margins); a softmax that feeds other operations (attention)
    becomes a ``Softmax`` node when it is first used."""

    ref: Ref
    fx: object
    log: bool
    keep: torch.Tensor | None = None  # a mask the softmax applies (``Masked``)


@dataclass(frozen=True)
class Norm:
    """``max(||x||_2, eps)`` over the last axis of node ``ref`` (keepdim): allowed only as the
    divisor of ``x`` itself (``F.normalize``), which becomes one ``Normalize`` node."""

    ref: Ref
    eps: float = 0.0


@dataclass(frozen=True, eq=False)
class Leading:
    """A tensor ``(K, B, *shape)`` whose first axis is not the batch (the output of an RNN
    with ``batch_first=False``, its final states ``(layers x directions, B, H)``), held as its
    ``K`` slices, nodes ``(B, *shape)``; ``whole``: a node ``(B, K, *shape)`` holding them all
    (the batch-first tensor they were cut from), if there is one
    (``certify.capture.time_major``)."""

    parts: tuple[Ref, ...]
    whole: Ref | None = None


@dataclass(frozen=True, eq=False)
class Masked:
    """Node ``ref`` with ``-inf`` where the constant ``keep`` (broadcast per input) is False:
    an attention mask, allowed only as the input of a softmax, which gives those entries
    the weight 0 exactly (a ``Softmax`` with ``keep``)."""

    ref: Ref
    keep: torch.Tensor


def _walk(value, found):
    if isinstance(value, (list, tuple)):
        return any(_walk(v, found) for v in value)
    return found(value)


class Build:
    """A graph under construction from an exported program."""

    def __init__(self, batch: int):
        self.batch, self.nodes, self.names = batch, [], set()
        self.at = 0  # where the batch axis is in the tensors of the operation being read
        self.weights = set()  # the parameters of the layers so far
        self.uses = {}  # a recurrence's weight -> its nodes (None: a use folded to a constant)
        self.tails = []  # operations dropped at the output, to check the capture against
        self.softmax = {}  # Tail -> its Softmax node, once used inside the network

    # ---------------------------------------------------------------- nodes and constants
    def add(self, node: Node) -> Ref:
        self.nodes.append(node)
        return Ref(len(self.nodes) - 1)

    def constant(self, value: torch.Tensor, source: str | None = None) -> Const:
        return Const(value, source)

    @staticmethod
    def is_output(value) -> bool:
        return isinstance(value, (Ref, Tail))

    def depends(self, args, kwargs) -> bool:
        return _walk(list(args) + list(kwargs.values()),
                     lambda v: isinstance(v, (Ref, Tail, Norm, Masked, Leading)))

    def time_major(self, args, kwargs) -> bool:
        """Does an operation read a tensor whose first axis is not the batch (``Leading``)?"""
        return _walk(list(args) + list(kwargs.values()), lambda v: isinstance(v, Leading))

    def fold(self, target, args, kwargs, fx):
        """Evaluate an operation on constants (constant folding)."""
        sources = []

        def unwrap(v):
            if isinstance(v, Const):
                sources.append(v.source)
                return v.value
            if isinstance(v, (list, tuple)):
                return type(v)(unwrap(u) for u in v)
            return v

        result = target(*unwrap(list(args)), **{k: unwrap(v) for k, v in kwargs.items()})
        source = next((s for s in sources if s), None)
        return self._wrap(result, source)

    def _wrap(self, result, source):
        if isinstance(result, torch.Tensor):
            return Const(result.to(torch.float64) if result.is_floating_point() else result,
                         source)
        if isinstance(result, (list, tuple)):
            return type(result)(self._wrap(r, source) for r in result)
        return result

    def node(self, op, inputs, fx, name: str | None = None, shape=None,
             axis: int | None = None) -> Ref:
        """A node applying ``op`` to ``inputs``; ``shape`` (per input) defaults to that of
        ``fx``'s result (given when one ATen operator becomes several nodes), the batch axis
        of its export tensor ``axis`` to ``at``."""
        axis = self.at if axis is None else axis
        inputs = [self.inside(v) for v in inputs]
        ref = self.add(Node(self._unique(name or fx.name), op, tuple(v.index for v in inputs),
                            self.shape(fx, axis) if shape is None else tuple(shape)))
        return Ref(ref.index, axis)

    def inside(self, value, where: str = ""):
        """A value used by an operation (read at ``where``): a softmax becomes a node; a bare
        vector norm and a mask that no softmax applies are refused."""
        at = f" ({where})" if where else ""
        if isinstance(value, Norm):
            raise UnsupportedModelError(
                f"a vector norm of a computed tensor is used{at}; it is supported only as the "
                "divisor of that tensor (F.normalize(x, dim=-1), x / x.norm(dim=-1, "
                "keepdim=True))")
        if isinstance(value, Masked):
            raise UnsupportedModelError(
                f"-inf added to a computed tensor (an attention mask) is used{at}; it is "
                "supported only right before a softmax over the last axis, which gives those "
                "entries weight 0")
        if not isinstance(value, Tail):
            return value
        if value.log:
            raise UnsupportedModelError("log-softmax is only supported at the output of the "
                                        "model; inside it, use softmax")
        if value not in self.softmax:
            fx, axis = value.fx, value.ref.axis
            node = self.add(Node(self._unique(fx.name), Softmax(value.keep),
                                 (value.ref.index,), self.shape(fx, axis)))
            self.softmax[value] = Ref(node.index, axis)
        return self.softmax[value]

    def _unique(self, name: str) -> str:
        base, n = name, 1
        while name in self.names:
            n += 1
            name = f"{base}@{n}"
        self.names.add(name)
        return name

    def shape(self, fx, axis: int | None = None) -> tuple[int, ...]:
        """The output shape of ``fx`` for one input, its batch axis at ``axis`` (``at``)."""
        axis = self.at if axis is None else axis
        val = fx.meta["val"]
        val = val[0] if isinstance(val, (list, tuple)) else val
        if val.ndim <= axis or val.shape[axis] != self.batch:
            raise UnsupportedModelError(
                f"{fx.name}: its result (shape {tuple(val.shape)} for a batch of {self.batch}) "
                f"does not keep the batch axis (at {axis}); certify needs every operation to "
                "act on each input separately")
        return tuple(val.shape[:axis]) + tuple(val.shape[axis + 1:])

    def dim(self, d: int, ndim: int, fx, what: str = "dim") -> int:
        """Axis ``d`` of a tensor with ``ndim`` axes (batch included, at ``at``) as a
        per-input axis."""
        d = d + ndim if d < 0 else d
        if d == self.at:
            raise UnsupportedModelError(f"{fx.name}: {what} acts along the batch axis; certify "
                                        "needs every operation to act on each input separately")
        return d - (d > self.at)

    def ndim(self, ref: Ref) -> int:
        return len(self.nodes[ref.index].shape) + 1

    # ---------------------------------------------------------------- special nodes
    def affine(self, op: Affine, x: Ref, fx, weight: Const, shape=None) -> Ref:
        """A certified layer, named after its weight parameter (``features.3.weight`` gives
        ``features.3``), else after its module or node. A weight used by two layers is
        refused: perturbing it moves both, and certificates speak of one layer at a time.
        ``shape``: as in ``node``."""
        if weight.source is not None:
            if weight.source in self.weights or weight.source in self.uses:
                raise UnsupportedModelError(
                    f"the weight {weight.source!r} is used by two layers (a module called twice "
                    "or tied weights); certify perturbs one layer at a time: give each use its "
                    "own module")
            self.weights.add(weight.source)
        name = weight.source[:-len(".weight")] if weight.source and \
            weight.source.endswith(".weight") else weight.source
        if not name:
            stack = fx.meta.get("nn_module_stack")
            name = (list(stack.values())[-1][0] if stack else "") or fx.name
        return self.node(op, [x], fx, name, shape)

    def recurrent(self, op: Affine, x: Ref | None, fx, weight: Const, name: str,
                  shape) -> Ref | None:
        """A dense map by a weight that a recurrence uses at every step, applied to ``x``;
        ``x=None``: a use on a constant (a step from a nonzero initial state, or one that adds
        the map's bias), folded by the caller, which makes the weight shared all the same.
        The node is a certified layer if it is the weight's only use when the graph is
        finished, else a ``FixedAffine`` (``finish``): a certificate perturbs one node,
        which is not a change of a weight that several nodes use."""
        source = weight.source or ""  # weights without a name count as one (never certified)
        if source in self.weights:
            raise UnsupportedModelError(
                f"the weight {source!r} is used by a layer and by a recurrence; certify "
                "perturbs one layer at a time: give each use its own module")
        ref = None if x is None else self.node(op, [x], fx, name, shape)
        self.uses.setdefault(source, []).append(ref)
        return ref

    def batch_norm(self, x: Ref, fx, weight, bias, mean, var, eps: float) -> Ref:
        """Folded into the affine layer before it when that layer feeds nothing else;
        otherwise a per-channel ``ScaleShift``."""
        w, b = (None if v is None else v.value for v in (weight, bias))
        source = (weight.source if weight is not None else None) or \
            (mean.source if mean is not None else None) or fx.name
        bn_name = source.rsplit(".", 1)[0] if "." in source else source
        previous = self.nodes[x.index]
        feeds_only_this = len(fx.args[0].users) == 1
        if isinstance(previous.op, Affine) and feeds_only_this and x.index == len(self.nodes) - 1:
            folded = fold_batchnorm(previous.op, w, b, mean.value, var.value, eps)
            self.names.discard(previous.name)
            self.nodes[x.index] = Node(self._unique(f"{previous.name}+{bn_name}"), folded,
                                       previous.inputs, previous.shape)
            return x
        channels = self.nodes[x.index].shape[0]
        scale = (w if w is not None else 1.0) / torch.sqrt(var.value + eps)
        shift = (b if b is not None else 0.0) - mean.value * scale
        shape = (channels,) + (1,) * (self.ndim(x) - 2)
        return self.node(ScaleShift(scale.reshape(shape), shift.reshape(shape)), [x], fx)

    def tail(self, x, fx, log: bool) -> Tail:
        """Softmax (or log-softmax) of ``x``; of a ``Masked`` value, with its mask."""
        if isinstance(x, Masked):
            if log:
                raise UnsupportedModelError("log-softmax of a masked tensor (-inf entries); "
                                            "supported: softmax")
            if not bool(x.keep.any(-1).all()):
                raise UnsupportedModelError(
                    f"{fx.name}: an attention mask hides every key from some query (its "
                    "softmax would be 0 / 0); every row of the mask must keep one entry")
            return Tail(x.ref, fx, log, x.keep)
        return Tail(self.inside(x), fx, log)

    # ---------------------------------------------------------------- the result
    def finish(self, out) -> Graph:
        if isinstance(out, Tail) and out.keep is not None:
            raise UnsupportedModelError("a masked softmax at the output of the model; certify "
                                        "reads the logits before it")
        if isinstance(out, Tail):
            fx = out.fx
            self.tails.append(lambda o: fx.target(o, *fx.args[1:], **fx.kwargs))
            out = out.ref
        if out.axis != 0:
            raise UnsupportedModelError(f"the model returns its batch axis at position "
                                        f"{out.axis}; certify needs logits (batch, classes)")
        keep = {out.index}
        for i in range(out.index, -1, -1):
            if i in keep:
                keep.update(self.nodes[i].inputs)
        keep.add(0)
        for refs in self.uses.values():  # a weight that several kept nodes use is fixed
            if sum(ref is None or ref.index in keep for ref in refs) > 1:
                for ref in refs:
                    if ref is not None:
                        old = self.nodes[ref.index]
                        fixed = FixedAffine(old.op.weight, old.op.bias)
                        self.nodes[ref.index] = Node(old.name, fixed, old.inputs, old.shape)
        order = sorted(keep)
        new = {old: k for k, old in enumerate(order)}
        nodes = tuple(Node(n.name, n.op, tuple(new[j] for j in n.inputs), n.shape)
                      for n in (self.nodes[i] for i in order))
        graph = Graph(nodes)
        if not graph.affine_indices:
            raise UnsupportedModelError("the model has no layer with a weight parameter "
                                        "(Linear, Conv1d/Conv2d, matmul by a weight) to certify")
        if len(nodes[-1].shape) != 1:
            raise UnsupportedModelError(
                f"the model returns a tensor of shape {nodes[-1].shape} per input; certify "
                "needs logits, one vector (classes,) per input")
        return graph
