"""SymPy derivations of every closed form in THEORY.md: the source of truth.

Importing this package registers each derivation (one per result and shape) in
``proofs.derivation.REGISTRY``; ``certify prove`` runs them all.
"""

from proofs import batch, compression, lipschitz, margin, target_change  # noqa: F401  (register)
from proofs.derivation import REGISTRY, Derivation, DerivationError, Outcome, run

__all__ = ["REGISTRY", "Derivation", "DerivationError", "Outcome", "run"]
