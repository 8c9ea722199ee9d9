"""A memory budget for runs over many inputs: chunks of inputs sized to it.

Radii are per input (THEORY.md section 2), so a run over a data set goes in chunks, and the
chunk size decides the peak memory: a CNN's backward refinement holds rows for every unstable
neuron of every input of a chunk at once. ``chunked`` fits the chunks to a budget of resident
memory instead of a fixed count: the first chunk holds one input; the peak resident memory it
adds above what the process held before (Linux's ``VmHWM``, reset before each chunk) is the
cost of one input, and every later chunk holds as many inputs as the budget leaves room for
at the largest cost per input seen so far (at least one: a budget below one input's cost is
reported, not obeyed). Costs grow at most linearly with the chunk (the stages that hold
several inputs at once hold them side by side), so the estimate is safe.

On a system without ``/proc`` (not Linux) the peak cannot be reset: the process's lifetime
peak (``getrusage``) stands in for it, which only overestimates the cost per input after a
larger earlier peak, so the chunks stay within the budget, smaller than they could be.
"""

from __future__ import annotations

import os
import re
import resource
import sys
from collections.abc import Callable
from pathlib import Path

DEFAULT_FRACTION = 0.5  # of the memory available when a run starts
_STATUS = Path("/proc/self/status")
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def available() -> int:
    """Bytes of memory available to new allocations (``MemAvailable``), else the physical
    memory."""
    try:
        text = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemAvailable:\s+(\d+) kB", text).group(1)) * 1024
    except (OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _status(field: str) -> int | None:
    try:
        return int(re.search(rf"{field}:\s+(\d+) kB", _STATUS.read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def resident() -> int:
    """Bytes of this process's resident memory now (``VmRSS``; the peak where unknown)."""
    now = _status("VmRSS")
    return peak() if now is None else now


def peak() -> int:
    """Bytes of this process's peak resident memory since the last ``reset_peak``."""
    high = _status("VmHWM")
    if high is not None:
        return high
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak() -> None:
    """Start a new peak at the current resident memory, where the system allows it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def default_budget() -> int:
    """``DEFAULT_FRACTION`` of the memory available now, plus what the process holds."""
    return resident() + int(DEFAULT_FRACTION * available())


def parse_budget(text: str) -> int:
    """Bytes from ``"8G"``, ``"512M"``, ``"2.5GB"``, ``"1000000"``; ``ValueError`` with the
    accepted forms otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kKmMgGtT]?)[bB]?\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"a memory budget is a positive size such as 8G, 512M or 2.5GB, "
                         f"got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def chunked(n: int, chunk: int, budget: int | None, run: Callable[[int, int], object],
            warn: Callable[[str], None] = lambda message: print(message, file=sys.stderr)
            ) -> list:
    """``run(start, stop)`` on consecutive chunks covering ``range(n)``, at most ``chunk``
    inputs each and, with a ``budget`` (bytes of resident memory), sized to it (module
    docstring); the results in order. ``warn`` is told once when one input alone needs more
    than the budget leaves."""
    results, start, size, cost, warned = [], 0, 1 if budget is not None else chunk, 0.0, False
    while start < n:
        stop = min(n, start + size)
        before = resident()
        reset_peak()
        results.append(run(start, stop))
        count, start = stop - start, stop
        if budget is None:
            continue
        cost = max(cost, max(peak() - before, 1) / count)
        room = budget - resident()
        size = max(1, min(chunk, int(room // cost)))
        if room < cost and not warned:
            warned = True
            warn(f"memory: one input needs about {cost / 2**30:.2f} GiB, more than the budget "
                 f"leaves ({max(room, 0) / 2**30:.2f} GiB); going on one input at a time "
                 "(raise --memory, or free memory)")
    return results
