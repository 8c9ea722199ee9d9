"""The architecture matrix (issue 28): every classifier of ``torchvision.models``, with random
weights and batch norms calibrated on random inputs, at the smallest square input it accepts
(``tests/support/torchvision_models.py``), is captured; the captured graph is compared with
the module on two inputs, or the refusal is printed. ``--certify NAME ...`` then certifies
every layer of those networks, both norms, on ``--inputs`` random inputs, with the seconds per
layer and the median lower/upper (upper: a verified witness, so the ratio is at most 1).

    python benchmarks/architectures.py                       # the capture matrix
    python benchmarks/architectures.py --only resnet18 vit_b_32
    python benchmarks/architectures.py --certify mobilenet_v2 resnet18 --inputs 4 --last 8
    python benchmarks/architectures.py --docs                # the matrix into docs/models.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))  # building torchvision's architectures
sys.path.insert(0, str(ROOT / "benchmarks"))

from docs_blocks import invoked, replace_block  # noqa: E402
from torchvision_models import architectures, build, expected_refusal  # noqa: E402

from certify.capture import UnsupportedModelError, capture  # noqa: E402
from certify.radii import layer_radii  # noqa: E402


def capture_row(name: str, max_params: float) -> dict:
    """Build, capture and compare one architecture; one with more than ``max_params``
    parameters is skipped (capture holds float64 copies: ViT-H/14 at 224 x 224 needs more than
    24 GB)."""
    start = time.perf_counter()
    model, side = build(name)
    params = sum(p.numel() for p in model.parameters())
    row = {"name": name, "side": side, "params": params}
    if params > max_params:
        row.update(outcome="skipped", detail=f"more than --max-params {max_params / 1e6:.0f}M "
                   "parameters", expected=True, seconds=time.perf_counter() - start)
        return row
    x = torch.randn(2, 3, side, side, dtype=torch.float64)
    try:
        network = capture(model, x)
    except UnsupportedModelError as err:
        row.update(outcome="refused", detail=str(err).split("\n")[0][:160],
                   expected=expected_refusal(name) is not None)
    else:
        with torch.no_grad():
            expected = model(x)
        # relative to the logits' size (absolute below 1: torchvision's ViTs start with a
        # zero head, so their logits are 0)
        error = float((network(x) - expected).abs().max()) / max(
            float(expected.abs().max()), 1.0)
        row.update(outcome="captured", detail=f"{len(network.affine_indices)} layers",
                   error=error, expected=expected_refusal(name) is None and error < 1e-9)
    row["seconds"] = time.perf_counter() - start
    return row


def matrix_table(rows: list[dict]) -> str:
    lines = ["| architecture | input | parameters | capture | relative difference | seconds |",
             "|---|---:|---:|---|---:|---:|"]
    for r in rows:
        difference = f"{r['error']:.0e}" if "error" in r else "-"
        what = r["detail"] if r["outcome"] == "captured" else f"{r['outcome']}: {r['detail']}"
        lines.append(f"| {r['name']} | {r['side']} | {r['params'] / 1e6:.1f}M | {what} | "
                     f"{difference} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def certify_rows(name: str, inputs: int, last: int | None = None) -> list[dict]:
    """Every layer of ``name`` (or the ``last`` ones, nearest the head first), both norms:
    seconds and median lower/upper."""
    model, side = build(name)
    torch.manual_seed(1)
    x = torch.randn(inputs, 3, side, side, dtype=torch.float64)
    network = capture(model, x)
    rows = []
    for i in reversed(network.affine_indices[-last:] if last else network.affine_indices):
        row = {"model": name, "layer": network.nodes[i].name,
               "weight": "x".join(map(str, network.layer(i).weight.shape)),
               "groups": network.layer(i).groups}
        for norm in ("fro", "max"):
            start = time.perf_counter()
            r = layer_radii(network, x, i, norm)
            row[f"{norm}_seconds"] = time.perf_counter() - start
            found = torch.isfinite(r.upper)
            ratios = (r.lower[found] / r.upper[found]).tolist()
            row[norm] = statistics.median(ratios) if ratios else float("nan")
        print(f"{name} {row['layer']} ({row['weight']}, groups {row['groups']}): lower/upper "
              f"{row['fro']:.2g} fro, {row['max']:.2g} max; {row['fro_seconds']:.1f} s + "
              f"{row['max_seconds']:.1f} s", flush=True)
        rows.append(row)
    return rows


def certify_table(rows: list[dict], inputs: int) -> str:
    lines = [f"| model | layer | weight (groups) | median lower/upper fro | max | "
             f"seconds for {inputs} inputs (fro / max) |", "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layer']} | {r['weight']} ({r['groups']}) | "
                     f"{r['fro']:.2g} | {r['max']:.2g} | {r['fro_seconds']:.0f} / "
                     f"{r['max_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", help="these architectures (default: all)")
    parser.add_argument("--certify", nargs="+", help="certify every layer of these")
    parser.add_argument("--inputs", type=int, default=4)
    parser.add_argument("--last", type=int, help="--certify: only the last N layers (the "
                        "early layers of a deep network take minutes each on a CPU)")
    parser.add_argument("--docs", action="store_true", help="write the tables into docs/")
    parser.add_argument("--max-params", type=float, default=400.0, metavar="MILLIONS",
                        help="skip architectures with more parameters (default 400: the two "
                        "of more than 600M need more memory than 24 GB in float64)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.certify:
        rows = [row for name in args.certify
                for row in certify_rows(name, args.inputs, args.last)]
        table = certify_table(rows, args.inputs)
        print(table)
        if args.docs:
            replace_block("benchmarks.md", "architectures-certify", table, invoked())
        return 0
    names = args.only or sorted(architectures())
    rows = []
    for name in names:
        row = capture_row(name, args.max_params * 1e6)
        print(f"{name}: {row['outcome']} ({row['detail']}) in {row['seconds']:.0f} s", flush=True)
        rows.append(row)
    table = matrix_table(rows)
    print(table)
    if args.docs:
        replace_block("models.md", "architectures", table, invoked())
    unexpected = [r["name"] for r in rows if not r["expected"]]
    if unexpected:
        print(f"not as expected (tests/support/torchvision_models.py): {unexpected}")
    return 1 if unexpected else 0


if __name__ == "__main__":
    raise SystemExit(main())
