"""Test your own model with certify: pytest assertions (``assert_robust``,
``assert_compression_safe``), hypothesis strategies (``networks``, ``inputs``,
``perturbations``, ``compressions``) and the pytest plugin (``--certify-model``).
"""

from __future__ import annotations

from certify.testing.assertions import Claim, assert_compression_safe, assert_robust
from certify.testing.strategies import Perturbation, compressions, inputs, networks, perturbations

__all__ = ["Claim", "Perturbation", "assert_compression_safe", "assert_robust", "compressions",
           "inputs", "networks", "perturbations"]
