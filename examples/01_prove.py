"""Example 1: re-derive the closed forms behind every certificate (THEORY.md sections 1-6).

Each derivation is done symbolically with SymPy and, where it says so, checked against a
cvxpy solution. ``certify prove`` runs them all; ``--match`` picks a subset by name.

    python examples/01_prove.py            # every derivation (about a minute)
    python examples/01_prove.py --quick    # only the last-layer class-pair radius (seconds)
"""

import os
import sys

from certify.cli import main

quick = "--quick" in sys.argv or os.environ.get("CERTIFY_QUICK") == "1"
# The same as the shell command `certify prove --match "class pair"`.
status = main(["prove", "--match", "class pair" if quick else ""])
sys.exit(status)  # 0: every derivation verified
