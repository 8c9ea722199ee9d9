"""The independent checker of ``certify check``: every claim of a certificate recomputed in
numpy float64 (``claims``, ``compression_claims``) by a second implementation of the graph
(``forward``, ``operators``), its bounds (``bounds``, ``regions``) and the compressions
(``compressions``). It reads the graph's structure and the certificate's format, never the
torch bounds that made the certificate.
"""

from __future__ import annotations

from certify.check.claims import CheckInputError, Report, check

__all__ = ["CheckInputError", "Report", "check"]
