"""Per-input, per-layer weight radii and what they say about compression (THEORY.md sections 2
to 6): sound lower bounds and verified witnesses (``radius``, ``witness``), all layers at
once (``multilayer``), and concrete compressions confronted with the radii (``compressed``).
"""

from __future__ import annotations

from certify.radii.compressed import CompressionCheck, LayerCompression, compress, compression_check
from certify.radii.multilayer import MultilayerBound, multilayer_bound
from certify.radii.radius import NORMS, LayerRadii, layer_radii, predictions
from certify.radii.witness import Witness

__all__ = ["CompressionCheck", "LayerCompression", "LayerRadii", "MultilayerBound", "NORMS",
           "Witness", "compress", "compression_check", "layer_radii", "multilayer_bound",
           "predictions"]
