"""``certify model --backend ray``: chunks certified by Ray workers, merged into one
certificate equal to the serial one (issue 14).

Tolerance: the backends run the same float64 operations on the same chunks, but a Ray worker
computes with one BLAS thread where the serial run may use several, which can reorder sums;
radii, estimates and budgets agree to ``RTOL`` relative, and everything discrete (predictions,
methods, thresholds, which inputs have a witness) is equal. On this machine they are equal
bit for bit; the tolerance states what is guaranteed.

A local cluster of two CPUs is started once for the module. The killed-worker test sends
SIGKILL to a worker process while it certifies a chunk: Ray runs the chunk again and the
merged certificate must still equal the serial one, every input once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import matrix_models
from certify.capture.export import capture
from certify.certificate.document import Result, certify_chunk, certify_network, compare, merge
from certify.cli import main

if os.environ.get("CI") is None:
    ray = pytest.importorskip("ray", reason="the Ray extra is not installed: pip install "
                              "'certify[ray]' (CI installs it and runs these tests)")
else:
    import ray  # CI must run these tests, never skip them

from certify.certificate.ray import certify_on_ray  # noqa: E402

RTOL = 1e-9
INPUTS, CHUNK = 14, 4  # four chunks, the last one short


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def residual():
    """A residual CNN with batch norm and a projection shortcut on real digits."""
    x = torch.from_numpy(load_digits().images[:INPUTS].reshape(-1, 1, 8, 8) / 16.0)
    return capture(matrix_models.residual_bn(), x), x


def assert_same_certificate(a, b):
    """Two certificates agree: discrete fields equal, numbers to ``RTOL``."""
    agreement = compare(a, b)
    assert agreement.within(RTOL), agreement


def test_ray_certificate_equals_the_serial_one(cluster, residual):
    network, x = residual
    serial = certify_network(network, x, model_sha256="0" * 64, chunk=CHUNK, progress=False)
    on_ray = certify_on_ray(network, x, model_sha256="0" * 64, chunk=CHUNK, workers=2,
                            progress=False)
    assert len(on_ray.document["predictions"]) == INPUTS
    assert_same_certificate(serial, on_ray)


def _chunk_workers() -> list[int]:
    """Ray worker processes certifying a chunk now (Ray titles a busy worker ray::<task>)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and title.startswith(b"ray::_chunk_task"):
            pids.append(int(entry.name))
    return pids


def test_a_killed_worker_has_its_chunk_retried(cluster, residual):
    network, x = residual
    killed, stop = [], threading.Event()

    def kill_one():
        while not stop.is_set() and not killed:
            for pid in _chunk_workers():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.002)

    killer = threading.Thread(target=kill_one)
    killer.start()
    try:
        on_ray = certify_on_ray(network, x, model_sha256="0" * 64, chunk=CHUNK, workers=2,
                                progress=False)
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was caught certifying a chunk: the test did not test anything"
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)  # really dead
    serial = certify_network(network, x, model_sha256="0" * 64, chunk=CHUNK, progress=False)
    assert_same_certificate(serial, on_ray)


def test_compare_sees_a_rounding_difference_and_a_changed_class(residual):
    """``compare`` has teeth: the equality tests above rest on it."""
    import copy

    network, x = residual
    a = certify_network(network, x[:4], model_sha256="0" * 64, progress=False)
    b = copy.deepcopy(a)
    assert compare(a, b).within(0.0)
    lower = b.document["layers"][0]["fro"]["lower"]
    lower[1] *= 1 + 1e-6
    assert 0.9e-6 < compare(a, b).max_relative < 1.1e-6 and not compare(a, b).within(RTOL)
    b.document["predictions"][2] += 1
    b.witnesses[next(iter(b.witnesses))] *= 1 + 1e-3
    assert compare(a, b).mismatches == ("/predictions[2]",)
    assert compare(a, b).max_relative > 0.9e-3


def test_compare_reads_the_slopes_bytes_as_numbers():
    """Bytes 3 and 5 differ by 2 / 5, not by the 254 their unsigned difference wraps to."""
    a = Result({}, {"fc/fro/slopes/relu": np.array([3, 7], dtype=np.uint8)})
    b = Result({}, {"fc/fro/slopes/relu": np.array([5, 7], dtype=np.uint8)})
    assert compare(a, b).max_relative == pytest.approx(0.4)


def test_merge_refuses_chunks_lost_or_counted_twice(residual):
    network, x = residual
    chunks = [certify_chunk(network, x[i:i + CHUNK], i) for i in range(0, 8, CHUNK)]
    for wrong in ([chunks[0]], [chunks[0], chunks[0]], [chunks[1]], [chunks[0], chunks[1],
                                                                     chunks[1]]):
        with pytest.raises(ValueError, match="exactly once"):
            merge(network, x[:8], wrong, model_sha256="0" * 64, bias=False, device="cpu")
    assert merge(network, x[:8], chunks[::-1], model_sha256="0" * 64, bias=False,
                 device="cpu").document["predictions"] == network(x[:8]).argmax(-1).tolist()


@pytest.fixture(scope="module")
def files(tmp_path_factory, residual):
    tmp = tmp_path_factory.mktemp("ray_cli")
    _, x = residual
    torch.save(matrix_models.residual_bn().state_dict(), tmp / "model.pt")
    np.savez(tmp / "data.npz", x=x.numpy())
    return tmp, [str(tmp / "model.pt"), "--factory", "matrix_models:residual_bn",
                 "--data", str(tmp / "data.npz")]


def test_the_command_line_certificate_from_ray_passes_certify_check(cluster, files, capsys):
    tmp, model = files
    out = str(tmp / "ray.json")
    assert main(["model", *model, "--out", out, "--chunk", str(CHUNK), "--backend", "ray",
                 "--workers", "2"]) == 0
    assert main(["check", out, *model]) == 0
    assert "0 refuted" in capsys.readouterr().out


def test_ray_options_without_ray_backend_are_refused(files, capsys):
    tmp, model = files
    for option in (["--workers", "2"], ["--ray-address", "auto"]):
        assert main(["model", *model, "--out", str(tmp / "x.json"), *option]) == 2
        assert "--backend ray" in capsys.readouterr().err


def test_without_ray_the_option_says_how_to_install_it(files):
    """Ray made unimportable in a fresh interpreter (``sys.modules['ray'] = None`` is how
    Python spells 'not installed' to ``import``); refused before the model is loaded."""
    tmp, model = files
    code = ("import sys; sys.modules['ray'] = None; from certify.cli.commands import main; "
            f"sys.exit(main({['model', *model, '--out', str(tmp / 'x.json'), '--backend', 'ray']!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1] / "support")  # matrix_models
    assert done.returncode == 2, done.stderr
    assert "pip install 'certify[ray]'" in done.stderr and "Traceback" not in done.stderr
