"""certify: verification of neural networks under weight perturbations.

The closed forms (THEORY.md sections 1 to 3) are derived in ``proofs/`` with SymPy and
generated into ``certify.kernels``; ``certify.perturbation`` is their validated API.
"""

from certify.perturbation import (
    ClassPairRadius,
    MinimalPerturbation,
    batch_target_change,
    class_pair_radius,
    margin_functional,
    target_change,
)

__version__ = "0.1.0"

__all__ = [
    "ClassPairRadius",
    "MinimalPerturbation",
    "batch_target_change",
    "class_pair_radius",
    "margin_functional",
    "target_change",
]
