"""Certification on a Ray cluster: the same chunks as the serial path, one Ray task each.

Radii are per input (THEORY.md section 2), so ``certificate.certify_chunk`` on a chunk
computes that chunk's part of the certificate wherever it runs; ``certificate.merge`` joins
the parts in input order and derives what depends on all inputs (thresholds, the smallest
uniform budget) exactly as the serial path does. Chunks are cut by
``certificate.chunk_starts``, so a Ray certificate equals the serial one to rounding: the
same float64 operations on the same batches, possibly split over a different number of
BLAS threads (a worker runs one thread per CPU it holds).

Fault tolerance is Ray's: a task whose worker process dies is run again (``RETRIES``
times), and ``merge`` refuses any set of chunks that does not cover the inputs exactly once.

Ray is an optional extra (``pip install 'certify[ray]'``); without it ``certify_on_ray``
raises ``RayMissingError`` saying so.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from certify.certificate.document import ChunkRadii, Result, certify_chunk, chunk_starts, merge
from certify.graph import devices
from certify.graph.graph import Graph
from certify.graph.inputs import InputError, inputs_for
from certify.radii.methods import check_steps, check_switch

RETRIES = 3  # reruns of a chunk whose worker died (worker crashes, not Python errors)
INSTALL = "pip install 'certify[ray]'"


class RayMissingError(InputError):
    """``--backend ray`` on a machine without Ray."""


def ray_module():
    """The ``ray`` package, or ``RayMissingError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayMissingError(f"--backend ray needs Ray, which is not installed: {INSTALL} "
                              "(or pip install ray), or use the default --backend serial") \
            from None
    return ray


def _chunk_task(network: Graph, x: torch.Tensor, start: int, bias: bool,
                device: str, refine: bool | str, optimise: int) -> ChunkRadii:
    """One chunk on a worker (the Ray task's body)."""
    device = devices.resolve(device)
    return certify_chunk(network.to(device), x.to(device), start, bias, refine=refine,
                         optimise=optimise)


def certify_on_ray(network: Graph, x: torch.Tensor, *, model_sha256: str, bias: bool = False,
                   chunk: int = 64, workers: int = 2, address: str | None = None,
                   device: torch.device | str | None = None,
                   progress: bool = True, refine: bool | str = "auto",
                   optimise: int = 0) -> Result:
    """``certificate.certify_network`` with each chunk certified by a Ray task, at most
    ``workers`` at a time, on the cluster at ``address`` (a local one of ``workers`` CPUs
    when ``None``; a Ray session already running in this process is used as it is).

    On CUDA each task asks for ``1 / workers`` of a GPU, so ``workers`` chunks share one.
    Raises ``RayMissingError`` without Ray, ``InputError`` for bad inputs, ``chunk``,
    ``workers``, ``refine`` or ``optimise`` (before any work starts), and the first chunk's
    error if one fails."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers must be a positive number of Ray workers, got {workers!r}")
    check_switch("refine", refine)
    check_steps(optimise)
    ray = ray_module()
    x = inputs_for(network, x)
    starts = chunk_starts(len(x), chunk)
    device = devices.resolve(device)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else workers,
                 include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        task = ray.remote(num_cpus=1, num_gpus=1 / workers if device.type == "cuda" else 0,
                          max_retries=RETRIES)(_chunk_task)
        graph = ray.put(network)
        bar = tqdm(total=len(starts), desc=f"certifying on Ray ({workers} workers)",
                   unit="chunk", disable=not progress)
        waiting, running, chunks = list(starts), [], []
        while waiting or running:
            while waiting and len(running) < workers:
                i = waiting.pop(0)
                running.append(task.remote(graph, x[i:i + chunk], i, bias, str(device),
                                               refine, optimise))
            ready, running = ray.wait(running, num_returns=1)
            chunks.append(_result(ray, ready[0]))
            bar.update()
        bar.close()
    finally:
        if started:
            ray.shutdown()
    return merge(network, x, chunks, model_sha256=model_sha256, bias=bias, device=device)


def _result(ray, ref) -> ChunkRadii:
    """A finished chunk; a Python error in the task is raised as itself, not wrapped."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        raise err.cause from None
