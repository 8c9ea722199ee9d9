"""The same certification on the CPU and on a CUDA GPU, side by side in one process (issue 14).

Trains the MNIST MLP ``784-1024-1024-1024-10`` and the CNN of ``mnist_certify.py`` (same
split and seed), then certifies every layer, both norms, of the same held-out inputs with
``certify.certificate.document.certify_network`` on ``--device cpu`` and on ``cuda`` (each after a
one-input warm-up on its device), and reports both wall times, their ratio and how the
certificates agree (``certificate.compare``: largest relative difference, fields that differ
otherwise). Both compute in float64, so they agree to rounding; a GPU's reductions sum in
another order, so a radius can move in its last digits and, rarely, a threshold or a
witness's bisection step with it: the report lists every such field.

Without a CUDA device it says so and exits with status 0 (nothing to compare).

Usage::

    python benchmarks/gpu_certify.py                 # 1,000 inputs
    python benchmarks/gpu_certify.py --inputs 100

Writes ``gpu_certify.json`` and ``gpu_certify.md`` to ``--out`` (default ``results/gpu``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmark the checkout this file lives in

import mnist_models  # noqa: E402  (next to this file)
from mnist_certify import FULL, environment  # noqa: E402
from certify.capture.export import capture  # noqa: E402
from certify.certificate.document import certify_network, compare, parameters_sha256  # noqa: E402
from certify.graph import devices  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1000, help="held-out inputs certified")
    parser.add_argument("--chunk", type=int, default=FULL.chunk, help="inputs per chunk")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gpu")
    return parser.parse_args(argv)


def timed(network, x, digest, chunk, device) -> tuple:
    certify_network(network, x[:1], model_sha256=digest, progress=False, device=device)
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = certify_network(network, x, model_sha256=digest, chunk=chunk, device=device)
    return result, time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device on this machine (torch.cuda.is_available() is False): nothing "
              "to compare; run this script where a GPU and a CUDA build of torch are present")
        return 0
    gpu = devices.describe("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    split = mnist_models.mnist_split(FULL.n_train, FULL.n_test, FULL.seed)
    x = split.x_test[:args.inputs].double()
    rows = []
    for name, model, epochs, lr in (
            ("MLP", mnist_models.mlp(FULL.mlp_widths, FULL.seed), FULL.mlp_epochs, FULL.mlp_lr),
            ("CNN", mnist_models.cnn(FULL.cnn_channels, FULL.seed), FULL.cnn_epochs,
             FULL.cnn_lr)):
        mnist_models.train(model, split, epochs, FULL.seed, lr, FULL.batch_size)
        network, digest = capture(model, x[:1]), parameters_sha256(model)
        on_cpu, cpu_s = timed(network, x, digest, args.chunk, "cpu")
        on_gpu, gpu_s = timed(network, x, digest, args.chunk, "cuda")
        agreement = compare(on_cpu, on_gpu)
        rows.append({"model": name, "cpu_seconds": cpu_s, "gpu_seconds": gpu_s,
                     "speedup": cpu_s / gpu_s, "max_relative_difference":
                     agreement.max_relative, "mismatches": list(agreement.mismatches)})
        print(f"{name}: cpu {cpu_s:.1f} s, {gpu} {gpu_s:.1f} s, largest relative difference "
              f"{agreement.max_relative:.2g}, {len(agreement.mismatches)} other fields differ",
              flush=True)
    report = {"inputs": len(x), "chunk": args.chunk, "gpu": gpu, "environment": environment(),
              "models": rows}
    (args.out / "gpu_certify.json").write_text(json.dumps(report, indent=1) + "\n")
    table = "\n".join(
        [f"| model | CPU s | GPU s ({gpu}) | speed-up | largest relative difference | "
         "fields differing |", "|---|---:|---:|---:|---:|---:|"]
        + [f"| {r['model']} | {r['cpu_seconds']:.1f} | {r['gpu_seconds']:.1f} | "
           f"{r['speedup']:.2f} | {r['max_relative_difference']:.2g} | {len(r['mismatches'])} |"
           for r in rows]) + "\n"
    (args.out / "gpu_certify.md").write_text(table)
    print(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
