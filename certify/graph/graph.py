"""A network as a graph of operators: THEORY.md section 8.

``Graph.nodes`` is a tuple in topological order: node 0 is the input, the last node the
output (the logits); every other node applies its operator (``certify.graph.operators``) to the
values of earlier nodes. Nodes whose operator is ``Affine`` are the layers certificates speak
about, under the name the user knows (module path or ONNX node name). ``certify.capture.export``
builds graphs from models.

Perturbing one layer ``k`` changes only the nodes downstream of it; every other value is a
constant of the downstream map from ``Z_k`` to the logits (section 8), so the bounds take the
unperturbed values of all nodes (``values``) and recompute only ``downstream(k)``.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from certify.graph.operators import Affine, Operator


@dataclass(frozen=True, eq=False)
class Node:
    """One node: its ``name`` (the user's module path or ONNX node name), its operator
    ``op`` (``None`` for the input), the indices of the earlier nodes it reads, and the
    ``shape`` of its output per input (the batch axis excluded)."""

    name: str
    op: Operator | None  # None for the input
    inputs: tuple[int, ...]
    shape: tuple[int, ...]  # one output, the batch axis excluded


@dataclass(frozen=True, eq=False)
class Graph:
    """A network: ``nodes`` in topological order, the input first and the logits last
    (module docstring). Calling it runs the forward pass on a batch."""

    nodes: tuple[Node, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.values(x)[-1]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.nodes[0].shape

    @property
    def output(self) -> int:
        return len(self.nodes) - 1

    def values(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The value of every node for the inputs ``x`` (``(B, *input_shape)``)."""
        values = [x]
        for node in self.nodes[1:]:
            values.append(node.op(*(values[i] for i in node.inputs)))
        return values

    def run(self, start: int, z: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
        """The output when node ``start`` takes the value ``z`` and every node that does not
        depend on it keeps its value in ``values``."""
        return self.rerun(start, z, values)[-1]

    def rerun(self, start: int, z: torch.Tensor, values: list[torch.Tensor]) -> list:
        """Every node's value when node ``start`` takes the value ``z`` (``run``)."""
        values = list(values)
        values[start] = z
        for i in self.downstream(start)[1:]:
            node = self.nodes[i]
            values[i] = node.op(*(values[j] for j in node.inputs))
        return values

    def downstream(self, start: int) -> tuple[int, ...]:
        """``start`` and every node that depends on it, in topological order."""
        if start not in self._downstream:
            depends = {start}
            for i in range(start + 1, len(self.nodes)):
                if any(j in depends for j in self.nodes[i].inputs):
                    depends.add(i)
            self._downstream[start] = tuple(sorted(depends))
        return self._downstream[start]

    @functools.cached_property
    def _downstream(self) -> dict[int, tuple[int, ...]]:
        return {}

    @functools.cached_property
    def consumers(self) -> tuple[tuple[int, ...], ...]:
        users = [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes):
            for j in node.inputs:
                users[j].append(i)
        return tuple(tuple(u) for u in users)

    @functools.cached_property
    def affine_indices(self) -> list[int]:
        """The certified layers, in topological order."""
        return [i for i, node in enumerate(self.nodes) if isinstance(node.op, Affine)]

    @property
    def layer_names(self) -> list[str]:
        return [self.nodes[i].name for i in self.affine_indices]

    def layer(self, index: int) -> Affine:
        return self.nodes[index].op

    def input_of(self, index: int) -> int:
        """The node feeding the affine layer ``index``."""
        return self.nodes[index].inputs[0]

    @property
    def device(self) -> torch.device:
        """Where the graph's tensors are: those of its first affine layer (``to`` moves all of
        them; ``certify.graph.inputs.check_network`` checks that the layers agree)."""
        return self.layer(self.affine_indices[0]).weight.device

    def to(self, device: torch.device | str) -> "Graph":
        """The same graph with every operator's tensors (weights, biases, scales) on
        ``device``; the float64 values are copied unchanged."""
        def moved(op: Operator | None) -> Operator | None:
            if op is None:
                return None
            tensors = {f.name: getattr(op, f.name).to(device) for f in dataclasses.fields(op)
                       if isinstance(getattr(op, f.name), torch.Tensor)}
            return dataclasses.replace(op, **tensors) if tensors else op

        return Graph(tuple(Node(n.name, moved(n.op), n.inputs, n.shape) for n in self.nodes))

    def replace(self, index: int, op: Operator) -> "Graph":
        """The same graph with node ``index`` applying ``op``."""
        node = self.nodes[index]
        nodes = list(self.nodes)
        nodes[index] = Node(node.name, op, node.inputs, node.shape)
        return Graph(tuple(nodes))

    def is_dense(self, index: int) -> bool:
        """Is layer ``index`` dense on a plain vector (one column ``h`` per input)? Then its
        Frobenius and spectral radii coincide (section 4); a convolution, or a dense layer
        over a sequence, has several columns and only the Frobenius radius."""
        op = self.nodes[index].op
        return isinstance(op, Affine) and not op.is_conv and \
            len(self.nodes[self.input_of(index)].shape) == 1

    def is_last_dense(self, index: int) -> bool:
        """Is ``index`` the logits layer, dense on a plain vector (the exact case)?"""
        return index == self.output and self.is_dense(index)
