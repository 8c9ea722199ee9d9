"""Numpy twins of the graph operators (``certify.graph.operators``), for ``certify check``.

``twin(op, in_shapes, out_shape)`` builds the twin of a torch operator, keyed on its class:
it reads the operator's parameters (weights as float64 numpy arrays, strides, kinds,
shapes) and recomputes every rule in numpy, never calling the torch rules
(``certify.check.operators.base`` lists them).
"""

from __future__ import annotations

from certify.check.operators.activation import ActivationTwin
from certify.check.operators.affine import AffineTwin, FixedAffineTwin
from certify.check.operators.base import ROUND, LinearTwin, Twin
from certify.check.operators.linear_maps import (AddTwin, CatTwin, ExpandTwin, PermuteTwin,
                                                 ReduceTwin, ReshapeTwin, ScaleShiftTwin,
                                                 SliceTwin, ZeroPadTwin)
from certify.check.operators.pooling import AvgPoolTwin, MaxPoolTwin
from certify.check.operators.prelu import PReLUTwin
from certify.check.operators.resampling import InterpolateTwin, PadTwin
from certify.check.operators.transformer import (LayerNormTwin, NormalizeTwin, ProductTwin,
                                                 SoftmaxTwin)
from certify.graph import operators as torch_ops

TWINS = {
    torch_ops.Affine: AffineTwin, torch_ops.FixedAffine: FixedAffineTwin,
    torch_ops.Activation: ActivationTwin,
    torch_ops.MaxPool: MaxPoolTwin, torch_ops.AvgPool: AvgPoolTwin,
    torch_ops.Reshape: ReshapeTwin, torch_ops.Permute: PermuteTwin,
    torch_ops.Expand: ExpandTwin, torch_ops.Slice: SliceTwin, torch_ops.Cat: CatTwin,
    torch_ops.Add: AddTwin, torch_ops.Reduce: ReduceTwin, torch_ops.ZeroPad: ZeroPadTwin,
    torch_ops.ScaleShift: ScaleShiftTwin, torch_ops.Product: ProductTwin,
    torch_ops.Softmax: SoftmaxTwin, torch_ops.LayerNorm: LayerNormTwin,
    torch_ops.Normalize: NormalizeTwin, torch_ops.PReLU: PReLUTwin,
    torch_ops.Pad: PadTwin, torch_ops.Interpolate: InterpolateTwin,
}


class NoTwinError(ValueError):
    """An operator that the numpy checker has no twin of."""


def twin(op, in_shapes, out_shape) -> Twin:
    """The numpy twin of the torch operator ``op`` (inputs ``in_shapes``, output
    ``out_shape``, per input)."""
    maker = TWINS.get(type(op))
    if maker is None:
        raise NoTwinError(f"certify check has no numpy twin of the operator "
                          f"{type(op).__name__}; it cannot check certificates of this model")
    return maker(op, in_shapes, out_shape)


__all__ = ["ROUND", "TWINS", "ActivationTwin", "AffineTwin", "LinearTwin", "MaxPoolTwin",
           "NoTwinError", "Twin", "twin"]
