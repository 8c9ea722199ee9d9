"""The memory budget (``certify.certificate.memory``): chunks of inputs fitted to it.

Oracles: the resident memory the process really holds while a chunk runs (``/proc``), and
the certificate of fixed chunks (each input's radii depend on that input alone). The teeth:
the same work without a budget goes above it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.datasets import load_digits
from torch import nn

from certify.capture.export import capture
from certify.certificate import memory
from certify.certificate.document import certify_network, compare
from certify.cli import main

MB = 2**20
linux = pytest.mark.skipif(not memory._STATUS.exists(), reason="needs /proc (Linux)")


@given(st.integers(1, 40), st.integers(1, 9), st.sampled_from([None, 1, 2**40]))
def test_chunks_cover_the_inputs_once_in_order(n, chunk, budget):
    seen = memory.chunked(n, chunk, budget, lambda start, stop: (start, stop))
    assert [start for start, _ in seen] == [0] + [stop for _, stop in seen[:-1]]
    assert seen[-1][1] == n
    assert all(0 < stop - start <= chunk for start, stop in seen)
    if budget is not None:
        assert seen[0] == (0, 1)  # the first chunk measures one input


def _allocating(per_input: int, peaks: list):
    """A chunk's work that holds ``per_input`` bytes per input at once (touched pages), and
    records the resident memory while it holds them."""
    def run(start, stop):
        held = np.ones((stop - start) * per_input // 8)
        peaks.append(memory.resident())
        del held
        return stop - start
    return run


@linux
@pytest.mark.parametrize("budgeted", [True, False])
def test_the_budget_bounds_the_resident_memory(budgeted):
    """Thirty inputs of 40 MB each under a budget of 300 MB above what the process holds:
    with the budget every chunk stays inside it; without it (chunks of 64) one chunk holds
    all thirty, 1.2 GB, far above (the teeth)."""
    budget = memory.resident() + 300 * MB
    peaks = []
    sizes = memory.chunked(30, 64, budget if budgeted else None, _allocating(40 * MB, peaks))
    assert sum(sizes) == 30
    if budgeted:
        assert max(peaks) <= budget, (max(peaks) - budget) / MB
        assert max(sizes) > 1  # it did fit several inputs per chunk
    else:
        assert max(peaks) > budget + 500 * MB


@linux
def test_an_input_above_the_budget_is_reported_and_the_run_goes_on():
    said = []
    sizes = memory.chunked(3, 64, memory.resident() + 10 * MB, _allocating(80 * MB, []),
                           warn=said.append)
    assert sizes == [1, 1, 1]
    assert len(said) == 1 and "one input needs about" in said[0] and "--memory" in said[0]


@pytest.mark.parametrize("text, expected", [("8G", 8 * 2**30), ("512M", 512 * MB),
                                            ("2.5GB", int(2.5 * 2**30)), ("1000", 1000),
                                            ("64k", 64 * 1024)])
def test_sizes_parse(text, expected):
    assert memory.parse_budget(text) == expected


@pytest.mark.parametrize("text", ["0", "-1G", "lots", "8X", ""])
def test_bad_sizes_say_what_is_accepted(text):
    with pytest.raises(ValueError, match="such as 8G, 512M or 2.5GB"):
        memory.parse_budget(text)


def test_cli_refuses_a_bad_memory_option(tmp_path, capsys):
    assert main(["model", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "x.npz"),
                 "--out", str(tmp_path / "c.json"), "--memory", "lots"]) == 2
    assert "such as 8G" in capsys.readouterr().err


@linux
def test_a_certificate_under_a_budget_equals_the_one_of_fixed_chunks():
    """A small CNN on twelve real digits: chunks fitted to a tight budget (the first of one
    input, then several) give the certificate of one chunk of all twelve."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 10)).double().eval()
    x = torch.from_numpy(load_digits().images[:12].reshape(-1, 1, 8, 8) / 16.0)
    network = capture(model, x)
    whole = certify_network(network, x, model_sha256="0" * 64, chunk=64, progress=False)
    fitted = certify_network(network, x, model_sha256="0" * 64, chunk=64, progress=False,
                             memory=memory.resident() + 64 * MB)
    agreement = compare(whole, fitted)
    assert agreement.within(1e-9), agreement
