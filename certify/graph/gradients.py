"""Gradients of many scalar functions of one trace at once: the rows of a Jacobian.

The margins of a classifier, ``m_j`` for every class ``j``, share one forward trace; their
gradients are one backward pass each. ``output_gradients`` runs those passes batched
(autograd's ``is_grads_batched``: one vectorised pass for ``ROWS`` of them at a time), so a
network with a thousand classes costs a few passes of a thousand rows instead of a thousand
passes of one row each, within a bounded memory.
"""

from __future__ import annotations

import torch

ROWS = 64  # rows of one batched backward pass


def output_gradients(outputs: torch.Tensor, inputs: list[torch.Tensor],
                     keep_graph: bool = False) -> list[torch.Tensor]:
    """``d outputs[:, j] / d inputs[k]`` for every column ``j`` of ``outputs`` ``(B, C)``, as
    ``(B, C, *inputs[k].shape[1:])`` per input (zeros where an input is not used); each
    input's batch axis is the outputs' (row ``b`` of ``outputs`` depends on row ``b`` of the
    inputs only). ``keep_graph``: keep the trace for later passes."""
    B, C = outputs.shape
    eye = torch.eye(C, dtype=outputs.dtype, device=outputs.device)
    parts = [[] for _ in inputs]
    for start in range(0, C, ROWS):
        seeds = eye[start:start + ROWS, None, :].expand(-1, B, C)
        last = start + ROWS >= C
        grads = torch.autograd.grad(outputs, inputs, grad_outputs=seeds,
                                    retain_graph=keep_graph or not last, allow_unused=True,
                                    is_grads_batched=True)
        for part, g, x in zip(parts, grads, inputs):
            part.append(x.new_zeros(len(seeds), *x.shape) if g is None else g)
    return [torch.cat(part).transpose(0, 1) for part in parts]
