"""Pytest configuration: hypothesis profiles.

Select a profile with the environment variable ``HYPOTHESIS_PROFILE``:

* ``ci`` (default): 40 examples per property, derandomised (the same examples on every run,
  so a CI failure reproduces locally), no deadline (a cvxpy solve can take 100 ms), no
  example database, and the reproduction blob printed on failure.
* ``thorough``: 500 random examples per property, for a local soak run
  (``HYPOTHESIS_PROFILE=thorough python -m pytest tests``).

Shared strategies live in ``tests/strategies.py`` and the independent cvxpy programs in
``tests/cvx_oracles.py``; this file holds configuration only.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile(
    "ci", deadline=None, max_examples=40, derandomize=True, print_blob=True, database=None
)
settings.register_profile("thorough", deadline=None, max_examples=500, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config):
    import certify

    # Shows which copy of the package is under test (an editable install or PYTHONPATH).
    return [
        f"certify imported from {os.path.dirname(certify.__file__)}",
        f"hypothesis profile: {settings.get_current_profile_name()}",
    ]
