"""The ``certify`` command line, a thin layer over the stages below: ``commands`` parses the
arguments and runs each command (``main``), ``inputs`` checks what it is given before any
long work, ``tables`` and ``plot`` show the results, ``attacks`` and ``demo`` the red-team
commands.
"""

from __future__ import annotations

from certify.cli.commands import main

__all__ = ["main"]
