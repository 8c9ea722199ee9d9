"""The model under test, as the strategies and the assertions of ``certify.testing`` both
read it: a module or a ``Graph`` (captured for the given inputs), one of its affine layers
by name, and that layer's input as columns (THEORY.md section 4's ``P``)."""

from __future__ import annotations

import torch
from torch import nn

from certify.capture.export import capture
from certify.graph.graph import Graph
from certify.graph.operators import Affine


def network_of(model, x) -> Graph:
    """``model`` as a graph: a ``Graph`` as it is, a module captured for inputs like ``x``
    and put on their device."""
    if isinstance(model, Graph):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or a certify Graph, got "
                        f"{type(model).__name__}")
    return capture(model, x).to(x.device)


def affine_index(network: Graph, layer) -> int:
    """The node index of an affine layer given by name (or by node index)."""
    for i in network.affine_indices:
        if layer == network.nodes[i].name or layer == i:
            return i
    raise ValueError(f"layer {layer!r} is not an affine layer of the model; the affine "
                     f"layers are: {', '.join(network.layer_names)}")


def layer_columns(layer: Affine, h: torch.Tensor, bias: bool) -> torch.Tensor:
    """The layer input as columns ``(B, n, L)``, with a row of ones when the bias moves."""
    P = layer.patches(h)
    return torch.cat([P, torch.ones_like(P[:, :1])], dim=1) if bias else P
