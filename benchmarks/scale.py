"""Speed at the scale of deployed models (issue 29): seconds per input and per layer, today's
code beside a baseline revision, in one run.

Each (model, code) pair runs in a subprocess of its own (``--worker``), so the peak resident
memory it reports is that row's; the baseline is the tree of ``--baseline`` (a git revision,
extracted to a temporary folder with ``git archive``). Models: the MNIST CNN of the
benchmarks (``certify.models.small.mnist_cnn``, random weights, uniform random inputs) and
torchvision architectures with random weights and calibrated batch norms
(``tests/support/torchvision_models.py``) at 32 x 32 with 10 or 1,000 classes on random
inputs. Per layer both norms are certified with
the defaults (``layer_radii``) and timed; the ratio divides by one float64 forward+backward
pass of the captured graph on the same inputs; ``lower`` is the median lower radius,
new over baseline.

    python benchmarks/scale.py                                   # the default rows
    python benchmarks/scale.py --rows resnet18:1000:16,19 --inputs 2
    python benchmarks/scale.py --docs                            # the table into docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import io
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from docs_blocks import invoked, replace_block  # noqa: E402

BASELINE = "2f7169b"  # main before issue 29's work
ROWS = ("mnist_cnn:10:0,1,2", "resnet18:10:0,10,19", "resnet18:1000:16,19")


def worker(model_name: str, classes: int, layers: list[int], inputs: int) -> dict:
    """Certify the chosen layers (both norms) with the code on ``sys.path``; seconds each."""
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    import torch  # noqa: PLC0415
    from torchvision_models import build  # noqa: PLC0415

    from certify.capture import capture  # noqa: PLC0415
    from certify.radii import layer_radii  # noqa: PLC0415

    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(1)
    if model_name == "mnist_cnn":  # the small MNIST CNN of the benchmarks, random weights
        from certify.models.small import mnist_cnn  # noqa: PLC0415

        torch.manual_seed(0)
        model = mnist_cnn().double().eval()
        x = torch.rand(inputs, 1, 28, 28, dtype=torch.float64, generator=generator)
    else:
        model, side = build(model_name, classes=classes)
        x = torch.randn(inputs, 3, side, side, dtype=torch.float64, generator=generator)
    network = capture(model, x)
    start = time.perf_counter()
    for _ in range(3):
        xg = x.clone().requires_grad_(True)
        network(xg).sum().backward()
    pass_seconds = (time.perf_counter() - start) / 3
    rows = []
    for k in layers:
        index = network.affine_indices[k]
        for norm in ("fro", "max"):
            start = time.perf_counter()
            r = layer_radii(network, x, index, norm)
            rows.append({"layer": network.nodes[index].name, "norm": norm,
                         "seconds": time.perf_counter() - start,
                         "lower": r.lower.tolist()})
    return {"pass_seconds": pass_seconds, "layers": len(network.affine_indices), "rows": rows,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run(code: Path, spec: str, inputs: int) -> dict:
    model, classes, layers = spec.split(":")
    env = dict(os.environ, PYTHONPATH=str(code))
    out = subprocess.run([sys.executable, __file__, "--worker", model, classes, layers,
                          str(inputs)], env=env, cwd=code, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(report: dict) -> str:
    lines = ["| model | classes | layer | norm | s/input baseline | s/input now | speed-up | "
             "now / (fwd+bwd) | lower now / baseline | peak GB baseline / now |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for spec, pair in report["rows"].items():
        model, classes, _ = spec.split(":")
        old, new = pair["baseline"], pair["now"]
        n = report["inputs"]
        for a, b in zip(old["rows"], new["rows"]):
            ratio = statistics.median(x / y if y > 0 else float("nan")
                                      for x, y in zip(b["lower"], a["lower"]))
            lines.append(f"| {model} | {classes} | {b['layer']} | {b['norm']} | "
                         f"{a['seconds'] / n:.1f} | {b['seconds'] / n:.1f} | "
                         f"{a['seconds'] / b['seconds']:.1f} | "
                         f"{b['seconds'] / new['pass_seconds']:.0f} | {ratio:.3f} | "
                         f"{old['peak_gb']:.1f} / {new['peak_gb']:.1f} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Seconds per input of every timed layer and norm, baseline beside now (log scale)."""
    import matplotlib  # noqa: PLC0415 (only when plotting)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    labels, old, new = [], [], []
    for spec, pair in report["rows"].items():
        model, classes, _ = spec.split(":")
        for a, b in zip(pair["baseline"]["rows"], pair["now"]["rows"]):
            labels.append(f"{model}/{classes}\n{b['layer'].split('+')[0]} {b['norm']}")
            old.append(a["seconds"] / report["inputs"])
            new.append(b["seconds"] / report["inputs"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(labels)), 4))
    at = range(len(labels))
    ax.bar([i - 0.2 for i in at], old, 0.4, label=f"baseline {report['baseline']}")
    ax.bar([i + 0.2 for i in at], new, 0.4, label="now")
    ax.set_xticks(list(at), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("model / classes, layer and norm")
    ax.set_ylabel("seconds per input (2 CPU threads)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--rows", nargs="+", default=list(ROWS),
                        help="model:classes:layer indices (default: %(default)s)")
    parser.add_argument("--inputs", type=int, default=2)
    parser.add_argument("--baseline", default=BASELINE, help="git revision (default %(default)s)")
    parser.add_argument("--out", default="scale.json")
    parser.add_argument("--plot", default="scale.png", help="the plot to write")
    parser.add_argument("--docs", action="store_true",
                        help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.worker:
        model, classes, layers, inputs = args.worker
        print(json.dumps(worker(model, int(classes), [int(k) for k in layers.split(",")],
                                int(inputs))))
        return 0
    report = {"baseline": args.baseline, "inputs": args.inputs, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", args.baseline], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        for spec in args.rows:
            pair = {}
            for label, code in (("baseline", Path(tmp)), ("now", ROOT)):
                print(f"{spec} {label} ...", file=sys.stderr, flush=True)
                pair[label] = run(code, spec, args.inputs)
            report["rows"][spec] = pair
            print("\n".join(table({**report, "rows": {spec: pair}}).splitlines()[2:]),
                  flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    plot(report, Path(args.plot))
    text = table(report)
    print(text)
    if args.docs:
        replace_block("benchmarks.md", "scale", text, invoked())
    return 0


if __name__ == "__main__":
    sys.exit(main())
