"""The networks of the compression tests (``radii/test_compressed*.py``), drawn with the
strategies users get (``certify.testing.networks``) as ``(model, input_shape)``
pairs: ``mlps`` (dense, on 6 features) and ``cnns`` (one convolution on ``1 x 6 x 6``); and
``radii``, the layers' certified lower radii in both norms as ``compression_check`` takes them.
"""

from __future__ import annotations

from certify.graph.graph import Graph
from certify.radii.radius import layer_radii
from certify.testing import networks


def mlps():
    """Dense models on 6 features, from the strategies users get (``certify.testing``)."""
    return networks(layer_types=("linear",), input_shape=(6,), widths=(2, 12), depth=(1, 3),
                    batchnorm=False, trained=False).map(lambda m: (m, (6,)))


def cnns():
    """One convolution (BatchNorm, activation, pooling drawn) on 1 x 6 x 6 inputs."""
    return networks(layer_types=("conv",), input_shape=(1, 6, 6), widths=(1, 3), depth=1,
                    trained=False).map(lambda m: (m, (1, 6, 6)))


def radii(net: Graph, x, indices) -> dict:
    return {net.nodes[i].name: {norm: layer_radii(net, x, i, norm).lower
                                for norm in ("fro", "max")} for i in indices}
