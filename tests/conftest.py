"""Pytest configuration: hypothesis profiles.

Select a profile with the environment variable ``HYPOTHESIS_PROFILE``; without it, ``ci``
when the variable ``CI`` is set (``.ci/run`` sets both) and ``dev`` otherwise:

* ``ci``: 40 examples per property, derandomised (the same examples on every run, so CI
  never fails by chance and a CI failure reproduces locally), no deadline (a cvxpy solve
  can take 100 ms), no example database, and the reproduction blob printed on failure.
* ``dev`` (local runs): the same budget with random examples and the example database, so
  every local run explores new cases and replays the failures it found before. A failure
  it finds is a bug to fix in the code.
* ``thorough``: 500 random examples per property, for a local soak run
  (``HYPOTHESIS_PROFILE=thorough python -m pytest tests``).

hypothesis itself is pinned in ``pyproject.toml``: a new release draws other examples.

Under pytest-xdist (``-n auto``, as ``.ci/run`` runs) each worker takes its share of torch's
threads, so that the workers do not oversubscribe the cores.

The tests mirror the package (``tests/<stage>/``); everything they share (strategies,
models, attacks, the independent cvxpy and MILP oracles) lives in ``tests/support/``, on
the import path through ``pythonpath`` in ``pyproject.toml``. This file holds configuration
only.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile(
    "ci", deadline=None, max_examples=40, derandomize=True, print_blob=True, database=None
)
settings.register_profile("dev", deadline=None, max_examples=40, print_blob=True)
settings.register_profile("thorough", deadline=None, max_examples=500, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    import torch

    # pytest-xdist workers share the cores: each takes its share of torch's threads.
    workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, torch.get_num_threads() // workers))


def pytest_report_header(config):
    import certify

    # Shows which copy of the package is under test (an editable install or PYTHONPATH).
    return [
        f"certify imported from {os.path.dirname(certify.__file__)}",
        f"hypothesis profile: {settings.get_current_profile_name()}",
    ]
