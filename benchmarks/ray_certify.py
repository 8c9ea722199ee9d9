"""The same certification serially and on Ray, side by side in one process (issue 14).

Trains the MNIST CNN of ``mnist_certify.py`` (``Conv(1,8,3,s2)-ReLU-Conv(8,16,3,s2)-ReLU-
Flatten-Linear(10)``, same split and seed), then certifies every layer, both norms, of the
same held-out inputs twice: ``certify.certificate.document.certify_network`` (this process, every
thread torch has, after a one-input warm-up) and ``certify.certificate.ray.certify_on_ray`` (a local Ray cluster of
``--workers`` CPUs, one thread per worker; the cluster's start-up is timed apart). It
reports both wall times, their ratio, how the certificates agree (``certificate.compare``:
largest relative difference, fields that differ) and whether the independent numpy checker
confirms the merged one.

Usage::

    python benchmarks/ray_certify.py                   # 1,000 inputs, 2 workers
    python benchmarks/ray_certify.py --inputs 40       # a smoke test

Writes ``ray_certify.json``, ``ray_certify.md`` and ``ray_certify.png`` (wall time per
backend) to ``--out`` (default ``results/ray``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmark the checkout this file lives in

import mnist_models  # noqa: E402  (next to this file)
from mnist_certify import FULL, environment  # noqa: E402
from certify.capture.export import capture  # noqa: E402
from certify.certificate.document import certify_network, compare, parameters_sha256  # noqa: E402
from certify.certificate.ray import certify_on_ray, ray_module  # noqa: E402
from certify.check.claims import check  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

RTOL = 1e-9  # the agreement tests/test_ray_backend.py requires


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1000, help="held-out inputs certified")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (local CPUs)")
    parser.add_argument("--chunk", type=int, default=FULL.chunk, help="inputs per chunk")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "ray")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    ray = ray_module()
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    split = mnist_models.mnist_split(FULL.n_train, FULL.n_test, FULL.seed)
    model = mnist_models.cnn(FULL.cnn_channels, FULL.seed)
    training = mnist_models.train(model, split, FULL.cnn_epochs, FULL.seed, FULL.cnn_lr,
                                  FULL.batch_size)
    x = split.x_test[:args.inputs].double()
    network = capture(model, x[:1])
    digest = parameters_sha256(model)
    print(f"CNN trained in {training.seconds:.1f} s (test accuracy "
          f"{training.test_accuracy:.3f}); certifying {len(x)} inputs", flush=True)
    # This process's one-time costs (lazy library loading) are not the serial backend's;
    # each Ray worker pays its own, which is part of what Ray costs.
    certify_network(network, x[:1], model_sha256=digest, progress=False)

    start = time.perf_counter()
    serial = certify_network(network, x, model_sha256=digest, chunk=args.chunk)
    serial_s = time.perf_counter() - start

    start = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    startup_s = time.perf_counter() - start
    start = time.perf_counter()
    on_ray = certify_on_ray(network, x, model_sha256=digest, chunk=args.chunk,
                            workers=args.workers)
    ray_s = time.perf_counter() - start
    ray.shutdown()

    agreement = compare(serial, on_ray)
    report = check(on_ray.document, on_ray.witnesses, network, x.numpy())
    result = {"inputs": len(x), "chunk": args.chunk, "workers": args.workers,
              "environment": env, "test_accuracy": training.test_accuracy,
              "serial_seconds": serial_s, "ray_startup_seconds": startup_s,
              "ray_seconds": ray_s, "speedup": serial_s / ray_s,
              "speedup_with_startup": serial_s / (ray_s + startup_s),
              "max_relative_difference": agreement.max_relative,
              "mismatches": list(agreement.mismatches), "within_rtol": agreement.within(RTOL),
              "check_confirmed": report.confirmed, "check_refuted": len(report.refuted)}
    (args.out / "ray_certify.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (args.out / "ray_certify.md").write_text(table)
    plot(result, args.out / "ray_certify.png")
    print(table)
    print(f"wrote {args.out}")


def markdown(r: dict) -> str:
    return "\n".join([
        f"| backend | wall s ({r['inputs']:,} inputs, chunks of {r['chunk']}) | speed-up |",
        "|---|---:|---:|",
        f"| serial (1 process, {r['environment']['threads']} threads) | "
        f"{r['serial_seconds']:.1f} | 1 |",
        f"| Ray, {r['workers']} workers | {r['ray_seconds']:.1f} "
        f"(+ {r['ray_startup_seconds']:.1f} cluster start) | {r['speedup']:.2f} "
        f"({r['speedup_with_startup']:.2f} with the start) |",
        "",
        f"Agreement: largest relative difference {r['max_relative_difference']:.2g}, "
        f"{len(r['mismatches'])} fields differ otherwise; `certify check` on the Ray "
        f"certificate: {r['check_confirmed']:,} claims confirmed, {r['check_refuted']} "
        f"refuted. Machine: {r['environment']['cpus']} CPUs, load "
        f"{r['environment']['load_average'][0]:.2f} at the start.",
        ""])


def plot(r: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3))
    labels = ["serial", f"Ray ({r['workers']} workers)"]
    ax.bar(labels, [r["serial_seconds"], r["ray_seconds"]], color=["tab:gray", "tab:blue"])
    ax.bar(labels[1:], [r["ray_startup_seconds"]], bottom=[r["ray_seconds"]],
           color="tab:orange", label="cluster start")
    ax.set_ylabel("wall time (s)")
    ax.set_xlabel(f"backend ({r['inputs']:,} MNIST inputs, every layer, both norms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
