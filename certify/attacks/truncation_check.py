"""A truncated layer against its certified radii: THEORY.md section 6, per input.

``truncation_check`` compares, per input, the exact change ``||(W - W_r) P||_F`` of the
layer's output with the certified radius of ``certify.radii.radius.layer_radii``; a class change
inside that radius would refute the theorem. The backdoor experiments (``certify.cli.demo``,
``benchmarks/backdoor_experiment.py``) run it on triggered inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from certify.attacks.compressors import LowRank
from certify.capture.export import capture
from certify.closed_forms.thresholds import singular_values_upper
from certify.graph import devices


@dataclass(frozen=True)
class TruncationCheck:
    """Truncating one layer of a network against its certified radii (section 6), per input.

    ``lower``: certified Frobenius weight radius of the layer (``layer_radii``, norm ``fro``);
    ``z_radius = lower * sigma_max(P~)`` (``||h||_2`` for a dense layer): no change of the
    layer's output with ``||dZ||_F < z_radius`` changes the class (section 4).
    ``change[k]``: the exact ``||(W - W_r) P||_F`` at ``ranks[k]``; ``flipped[k]``: the
    truncated network's class differs from the full-precision one.
    ``threshold_rank``: the smallest ``r`` whose truncation error (``sigma_{r+1}`` for a
    dense layer on a vector, the Frobenius tail for a convolution or a dense layer over a
    sequence) is below the smallest ``lower``: certified safe.
    """

    layer: str
    ranks: tuple[int, ...]
    singular_values: torch.Tensor
    lower: torch.Tensor
    z_radius: torch.Tensor
    change: torch.Tensor
    flipped: torch.Tensor
    threshold_rank: int

    @property
    def violations(self) -> torch.Tensor:
        """Per rank: inputs that changed class although the change was inside the radius
        (a refutation of the certificate; must be zero)."""
        return (self.flipped & (self.change < self.z_radius)).sum(dim=1)

    @property
    def activation_rank(self) -> int | None:
        """The largest rank tried at which truncation changes some input's class."""
        hits = [r for r, f in zip(self.ranks, self.flipped) if f.any()]
        return max(hits) if hits else None


def truncation_check(model: nn.Module, layer: str, x: torch.Tensor, ranks: Sequence[int],
                     device: torch.device | str | None = None) -> TruncationCheck:
    """Certify ``layer`` of ``model`` on inputs ``x`` (float64) and truncate it to each rank,
    computed on ``device`` (default the CPU; the captured graph is moved there); the tensors
    of the result are on the CPU."""
    from certify.closed_forms.thresholds import thresholds
    from certify.radii.radius import layer_radii, region_scale

    device = devices.resolve(device)
    network = capture(model, x).to(device)
    x = x.double().to(device)
    if layer not in network.layer_names:
        raise ValueError(f"layer {layer!r} is not an affine layer of the network; choose from "
                         f"{network.layer_names}")
    index = network.affine_indices[network.layer_names.index(layer)]
    op = network.layer(index)
    radii = layer_radii(network, x, index, "fro")
    with torch.no_grad():
        values = network.values(x)
    h = values[network.input_of(index)]
    P = op.patches(h)
    z_radius = radii.lower * region_scale(P, "fro")
    predicted = values[-1].argmax(-1)
    W = op.matrix
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    changes, flips = [], []
    for r in ranks:
        LowRank(r).check(W, layer)
        tail = (U[:, r:] * S[r:]) @ Vh[r:]  # W - W_r
        change = op.uncolumns(tail @ P, values[index].shape[1:])  # (W - W_r) P~, real blocks
        changes.append(torch.linalg.vector_norm(change.flatten(1), dim=-1))
        truncated = op.with_weight(W - tail)
        with torch.no_grad():
            flips.append(network.run(index, truncated(h), values).argmax(-1) != predicted)
    threshold = thresholds(W, float(radii.lower.min()), "fro",
                           dense=network.is_dense(index)).rank
    return TruncationCheck(layer, tuple(int(r) for r in ranks), singular_values_upper(W).cpu(),
                           radii.lower.cpu(), z_radius.cpu(), torch.stack(changes).cpu(),
                           torch.stack(flips).cpu(), threshold)
