"""SymPy derivations of every closed form in THEORY.md: the source of truth.

Importing this package registers each derivation (one per result and shape) in
``proofs.derivation.REGISTRY``; ``certify prove`` runs them all.
"""

from proofs import (  # noqa: F401  (importing registers the derivations)
    ball_offset,
    batch,
    compression,
    cvxpy_check,
    lipschitz,
    margin,
    target_change,
)
from proofs.derivation import REGISTRY, Derivation, DerivationError, Outcome, run

__all__ = ["REGISTRY", "Derivation", "DerivationError", "Outcome", "run"]
