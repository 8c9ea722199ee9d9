"""How tight are certify's entrywise-max radii? Against the exact MILP answer, tiny MLPs.

For a fixed seeded sample of tiny ReLU MLPs (input dim 2-4, one or two hidden layers of
width 2-6, 2-3 classes, half of them briefly trained; ``tests/support/milp_oracle.tiny_mlp``) and a
few random inputs each, every affine layer's certificate ``lower`` and verified witness norm
``upper`` (``certify.radii.radius.layer_radii(..., "max")``) are compared with the exact minimal
``||D||_max`` from ``tests/support/milp_oracle.exact_max_radius`` (THEORY.md section 4). Printed per
layer position: the median and minimum of ``lower / exact`` (1 = the certificate is exact)
and ``exact / upper`` (1 = the witness is minimal), over inputs where all three are finite,
the largest ``lower / exact`` (above ``1 + 1e-6`` the certificate is UNSOUND) and how many
inputs had no witness (``upper = inf``). The last layer is exact by section 3
and is listed as a check.

Usage::

    python benchmarks/milp_tightness.py                 # 50 networks x 5 inputs, ~1 minute
    python benchmarks/milp_tightness.py --networks 10 --bias --leaky
    python benchmarks/milp_tightness.py --optimise 20   # the optimised slopes' mode
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from milp_oracle import exact_max_radius, tiny_mlp  # noqa: E402

from certify.capture.export import capture  # noqa: E402
from certify.radii.radius import layer_radii  # noqa: E402


def sample(networks: int, inputs: int, seed: int, leaky: bool):
    """``networks`` (label, graph, x) triples drawn reproducibly from ``seed``."""
    rng = np.random.default_rng(seed)
    for k in range(networks):
        d = int(rng.integers(2, 5))
        widths = [int(w) for w in rng.integers(2, 7, size=int(rng.integers(1, 3)))]
        model = tiny_mlp(d, widths, int(rng.integers(2, 4)), seed * 1000 + k,
                         slope=0.1 if leaky else 0.0, trained=bool(k % 2))
        x = torch.randn(inputs, d, generator=torch.Generator().manual_seed(k),
                        dtype=torch.float64)
        yield f"{len(widths)} hidden", capture(model, x), x


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--networks", type=int, default=50)
    parser.add_argument("--inputs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bias", action="store_true", help="perturb the bias too")
    parser.add_argument("--leaky", action="store_true", help="LeakyReLU(0.1) instead of ReLU")
    parser.add_argument("--optimise", type=int, default=0, metavar="STEPS",
                        help="layer_radii(optimise=STEPS): optimised ReLU slopes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = defaultdict(lambda: {"low": [], "up": [], "no_witness": 0, "seconds": 0.0})
    for label, net, x in sample(args.networks, args.inputs, args.seed, args.leaky):
        affine = net.affine_indices
        for position, index in enumerate(affine):
            key = "last layer" if index == affine[-1] else f"{label}, layer {position + 1}"
            start = time.perf_counter()
            r = layer_radii(net, x, index, "max", args.bias, optimise=args.optimise)
            exact = exact_max_radius(net, x, index, args.bias, cap=r.upper).rho
            row = rows[key]
            row["seconds"] += time.perf_counter() - start
            lower, upper = r.lower.numpy(), r.upper.numpy()
            row["no_witness"] += int(np.sum(~np.isfinite(upper) & np.isfinite(exact)))
            ok = np.isfinite(exact) & np.isfinite(upper) & (exact > 0)
            row["low"] += list(lower[ok] / exact[ok])
            row["up"] += list(exact[ok] / upper[ok])
    print(f"{args.networks} networks x {args.inputs} inputs, seed {args.seed}, "
          f"bias {'perturbed' if args.bias else 'fixed'}, "
          f"{'LeakyReLU(0.1)' if args.leaky else 'ReLU'}; norm: entrywise max"
          + (f"; optimise={args.optimise}" if args.optimise else ""))
    header = ("layer", "n", "lower/exact med", "min", "max (<= 1)", "exact/upper med", "min",
              "no witness", "s (certify+MILP)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key in sorted(rows, key=lambda k: (k == "last layer", k)):
        row = rows[key]
        low, up = np.array(row["low"]), np.array(row["up"])
        print(f"| {key} | {len(low)} | {np.median(low):.4f} | {low.min():.4f} | "
              f"{low.max():.6f} | "
              f"{np.median(up):.4f} | {up.min():.4f} | {row['no_witness']} | "
              f"{row['seconds']:.1f} |")


if __name__ == "__main__":
    main()
