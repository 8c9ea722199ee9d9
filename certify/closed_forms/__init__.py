"""Closed forms for one weight matrix: the exact minimal perturbations of THEORY.md sections
1 to 3 (derived in ``proofs/`` with SymPy, generated into ``kernels``), the compressions a
user can ask for and the error bounds and thresholds of section 6.

The bottom of the pipeline: it imports nothing else of certify.
"""

from __future__ import annotations

from certify.closed_forms.compressions import (KINDS, Compression, compress_matrices,
                                               parse_compression, prune, quantise, truncate)
from certify.closed_forms.perturbation import (ClassPairRadius, MinimalPerturbation,
                                               batch_target_change, class_pair_radius,
                                               margin_functional, target_change)
from certify.closed_forms.thresholds import (Thresholds, pruning_error, quantisation_error,
                                             singular_values_upper, threshold_bits,
                                             threshold_prune_ratio, threshold_rank,
                                             truncation_error)

__all__ = ["ClassPairRadius", "Compression", "KINDS", "MinimalPerturbation", "Thresholds",
           "batch_target_change", "class_pair_radius", "compress_matrices",
           "margin_functional", "parse_compression", "prune", "pruning_error",
           "quantisation_error", "quantise", "singular_values_upper", "target_change",
           "threshold_bits", "threshold_prune_ratio", "threshold_rank",
           "truncate", "truncation_error"]
