"""The numpy twin of a network's graph: its forward pass and exact margin gradients.

``NumpyGraph.of(graph)`` reads a ``certify.graph.graph.Graph`` (its structure: nodes in
topological order, their inputs and per-input shapes) and replaces every operator by its
numpy twin (``certify.check.operators``), so that ``certify.check.claims`` recomputes every claim
of a certificate in float64 numpy, not with the torch code that made it. Perturbing one
layer changes only the nodes downstream of it (``downstream``, ``run``); every other value
is a constant of that map (THEORY.md section 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from certify.check.operators import AffineTwin, Twin, twin


@dataclass(frozen=True, eq=False)
class NumpyNode:
    name: str
    twin: Twin | None  # None for the input
    inputs: tuple[int, ...]
    shape: tuple[int, ...]


class NumpyGraph:
    """The twins of a graph's operators, in its topological order: node 0 the input, the
    last node the logits. The structure (which nodes feed which, which depend on a layer)
    is the graph's own; only the arithmetic is recomputed here."""

    def __init__(self, structure, nodes):
        self.structure, self.nodes = structure, tuple(nodes)

    @classmethod
    def of(cls, graph) -> NumpyGraph:
        nodes = []
        for node in graph.nodes:
            shapes = [tuple(graph.nodes[j].shape) for j in node.inputs]
            op = None if node.op is None else twin(node.op, shapes, tuple(node.shape))
            nodes.append(NumpyNode(node.name, op, tuple(node.inputs), tuple(node.shape)))
        return cls(graph, nodes)

    @property
    def output(self) -> int:
        return self.structure.output

    @property
    def affine_indices(self) -> list[int]:
        return self.structure.affine_indices

    @property
    def consumers(self) -> tuple[tuple[int, ...], ...]:
        return self.structure.consumers

    def downstream(self, start: int) -> tuple[int, ...]:
        """``start`` and every node that depends on it, in topological order."""
        return self.structure.downstream(start)

    def input_of(self, index: int) -> int:
        return self.structure.input_of(index)

    def is_dense(self, index: int) -> bool:
        """A dense layer on a plain vector (one column per input)."""
        return self.structure.is_dense(index)

    def is_last_dense(self, index: int) -> bool:
        return self.structure.is_last_dense(index)

    def layer(self, index: int) -> AffineTwin:
        return self.nodes[index].twin

    def with_weight(self, index: int, weight: np.ndarray) -> NumpyGraph:
        """The same graph with layer ``index``'s weight replaced."""
        nodes = list(self.nodes)
        node = nodes[index]
        nodes[index] = NumpyNode(node.name, node.twin.with_weight(weight), node.inputs, node.shape)
        return NumpyGraph(self.structure, nodes)

    def values(self, x: np.ndarray) -> list[np.ndarray]:
        """Every node's value for the inputs ``x`` ``(B, *input_shape)``."""
        values = [np.asarray(x, dtype=np.float64)]
        for node in self.nodes[1:]:
            values.append(node.twin(*(values[j] for j in node.inputs)))
        return values

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.values(x)[-1]

    def run(self, start: int, z: np.ndarray, values) -> np.ndarray:
        """The logits when node ``start`` takes the value ``z`` and every node that does
        not depend on it keeps its value in ``values``."""
        values = list(values)
        values[start] = z
        for i in self.downstream(start)[1:]:
            node = self.nodes[i]
            values[i] = node.twin(*(values[j] for j in node.inputs))
        return values[-1]


def pull_back(graph: NumpyGraph, start: int, seeds: dict, values, at) -> dict:
    """Rows ``seeds`` (node -> ``(B, R, *shape)``, nodes downstream of ``start``) walked back
    towards node ``start`` through the exact Jacobian of every downstream node at its value
    in ``values`` (torch's gradient at kinks): for each node of ``at``, the rows that reach
    it, ``(B, R, *shape)``: the gradients of the seeds' functionals with respect to an
    additive change of that node's output (zeros where none reach)."""
    rows = dict(seeds)
    moving = set(graph.downstream(start))
    lead = next(iter(seeds.values())).shape[:2]
    out = {}
    for i in reversed(graph.downstream(start)):
        if i in at and i in rows:
            out[i] = rows[i]
        if i == start or i not in rows:
            continue
        node = graph.nodes[i]
        for j, R in zip(node.inputs, node.twin.gradient(rows.pop(i),
                                                        [values[j] for j in node.inputs])):
            if j in moving:
                rows[j] = rows[j] + R if j in rows else R
    return {k: out[k] if k in out else np.zeros((*lead, *values[k].shape[1:])) for k in at}


def margin_gradients(graph: NumpyGraph, start: int, values, C: np.ndarray) -> np.ndarray:
    """``C d o / d v``: rows ``C`` ``(B, R, classes)`` on the logits walked back to node
    ``start``'s value ``v`` (``pull_back``), ``(B, R, *v.shape[1:])``."""
    return pull_back(graph, start, {graph.output: C}, values, {start})[start]
