"""The operators of a graph (THEORY.md section 8): one class per kind of node, each holding
its forward map, interval rule, linear (CROWN-style) rule, interval Jacobian and Lipschitz
constants (``certify.operators.base``)."""

from certify.operators.activation import Activation
from certify.operators.affine import Affine, fold_batchnorm
from certify.operators.base import Operator
from certify.operators.linear_maps import (Add, AvgPool, Cat, Expand, LinearMap, Permute,
                                           Reduce, Reshape, ScaleShift, Slice, ZeroPad)
from certify.operators.max_pool import MaxPool

__all__ = ["Activation", "Add", "Affine", "AvgPool", "Cat", "Expand", "LinearMap", "MaxPool",
           "Operator", "Permute", "Reduce", "Reshape", "ScaleShift", "Slice", "ZeroPad",
           "fold_batchnorm"]
