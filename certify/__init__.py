"""certify: verification of neural networks under weight perturbations.

The package follows the pipeline, one subpackage per stage: model files
(``certify.formats``) -> capture (``certify.capture``) -> graph of operators
(``certify.graph``) -> bounds (``certify.bounds``) -> radii and thresholds
(``certify.radii``) -> certificate (``certify.certificate``), checked by the independent
numpy checker (``certify.check``); the closed forms of one weight matrix
(``certify.closed_forms``) underneath, attacks, models, the testing kit and the CLI on top.

The names below are the ones most users need; each stage's package lists its own:

* the closed forms of THEORY.md sections 1 to 3 (derived in ``proofs/`` with SymPy and
  generated into ``certify.closed_forms.kernels``): ``target_change``,
  ``margin_functional``, ``class_pair_radius``, ``batch_target_change``;
* a model file as a module (``load_model``), as a ``Graph`` (``certify.capture.capture``),
  its per-input, per-layer radii (``layer_radii``) and the certificate of a data set
  (``certify_network``);
* compressions (``Compression``, ``parse_compression``) and what one does on given inputs
  (``compression_check``).
"""

from certify.certificate.document import certify_network
from certify.closed_forms.compressions import Compression, parse_compression
from certify.closed_forms.perturbation import (ClassPairRadius, MinimalPerturbation,
                                               batch_target_change, class_pair_radius,
                                               margin_functional, target_change)
from certify.formats.loading import load_model
from certify.graph.graph import Graph
from certify.radii.compressed import compression_check
from certify.radii.radius import layer_radii
from certify.version import __version__

__all__ = [
    "ClassPairRadius",
    "Compression",
    "Graph",
    "MinimalPerturbation",
    "__version__",
    "batch_target_change",
    "certify_network",
    "class_pair_radius",
    "compression_check",
    "layer_radii",
    "load_model",
    "margin_functional",
    "parse_compression",
    "target_change",
]
