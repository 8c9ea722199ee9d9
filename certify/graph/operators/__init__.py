"""The operators of a graph (THEORY.md section 8): one class per kind of node, each holding
its forward map, interval rule, linear (CROWN-style) rule, interval Jacobian and Lipschitz
constants (``certify.graph.operators.base``)."""

from certify.graph.operators.activation import Activation
from certify.graph.operators.affine import Affine, FixedAffine, fold_batchnorm
from certify.graph.operators.base import Operator
from certify.graph.operators.linear_maps import (Add, AvgPool, Cat, Expand, LinearMap, Permute,
                                                 Reduce, Reshape, ScaleShift, Slice, ZeroPad)
from certify.graph.operators.max_pool import MaxPool
from certify.graph.operators.normalisation import LayerNorm, Normalize
from certify.graph.operators.prelu import PReLU
from certify.graph.operators.product import Product
from certify.graph.operators.resampling import Interpolate, Pad
from certify.graph.operators.softmax import Softmax

__all__ = ["Activation", "Add", "Affine", "AvgPool", "Cat", "Expand", "FixedAffine",
           "Interpolate", "LayerNorm", "LinearMap", "MaxPool", "Normalize", "Operator", "Pad",
           "Permute", "PReLU", "Product",
           "Reduce", "Reshape", "ScaleShift", "Slice", "Softmax", "ZeroPad", "fold_batchnorm"]
