"""Whole-model compression on MNIST: every affine layer compressed at once, the joint
certificate of THEORY.md section 10 beside the all-layers bound of section 5 (today's), in
one run on the same inputs.

Per model (the MLP, CNN and ResNet of the MNIST benchmarks, the ViT of ``vit_certify.py``)
and compression of every layer (int8 per channel and per tensor, int4 per channel, global
magnitude pruning of 10% and 30%), on held-out test images:

* ``unchanged``: inputs whose class the compressed model keeps (run, not certified);
* ``section 5``: inputs the all-layers bound vouches for (budgets the layers' weight
  errors, either norm): today's certificate;
* ``joint``: inputs ``harmless`` now vouches for (section 10 on the change made, or section
  5): never fewer than today's by construction;
* ``strength``: inputs safe against every compression of that strength (the quantiser's
  cells, the pruning box), not only the one computed;
* ``violations``: vouched for (either certificate) yet changed; must be 0.

Then the per-input mildest level of ``certify.radii.whole_model.mildest`` (every
compression of that strength certified) against the mildest level at which the computed
compression really changes the input (searched over levels), as medians and their ratio.

    python benchmarks/whole_model_compression.py --inputs 500 --docs
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import matplotlib
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

import mnist_models  # noqa: E402  (next to this file)
from docs_blocks import invoked, replace_block  # noqa: E402
from tightness import trained  # noqa: E402
from certify.capture.export import capture  # noqa: E402
from certify.closed_forms.compressions import Compression  # noqa: E402
from certify.radii.compressed import compress, compression_check  # noqa: E402
from certify.radii.whole_model import MAX_SEARCH_BITS, mildest  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

# name -> (builder, its argument, epochs, learning rate), as benchmarks/tightness.py
MODELS = {
    "MLP 200-100": (mnist_models.mlp, (200, 100), 5, 1e-3),
    "CNN": (mnist_models.cnn, (8, 16), 10, 3e-3),
    "ResNet": (mnist_models.resnet, (8, 16), 5, 3e-3),
}
COMPRESSIONS = [Compression("bits_per_channel", 8), Compression("bits", 8),
                Compression("bits_per_channel", 4), Compression("prune_global", 0.1),
                Compression("prune_global", 0.3)]
PRUNE_GRID = [k / 100 for k in range(1, 100)]


def models(n_inputs: int, seed: int, vit: bool):
    """``(name, graph, held-out inputs)``: the MNIST models trained as in the tightness
    benchmark, then the ViT."""
    for name, network, x, _ in trained(MODELS, n_inputs, seed):
        yield name, network, x
    if vit:
        from vit_certify import train

        result, vit_split = train(epochs=3)
        x = vit_split.x_test[:n_inputs].double()
        yield "ViT", capture(result.model.double().eval(), x), x


def row(network, x, compression: Compression) -> dict:
    start = time.perf_counter()
    result = compression_check(network, x, compression, chunk=16)
    n = len(x)
    unchanged = ~result.changed
    section5 = result.all_layers
    joint = result.harmless
    strength = result.strength if result.strength is not None else torch.zeros_like(joint)
    return {"compression": str(compression), "inputs": n,
            "unchanged": int(unchanged.sum()), "section5": int(section5.sum()),
            "joint": int(joint.sum()), "strength": int(strength.sum()),
            "violations": int(((section5 | joint | strength) & result.changed).sum()),
            "below_today": int((section5 & ~joint).sum()),
            "seconds": time.perf_counter() - start}


def real_bits(network, x, per_channel: bool) -> torch.Tensor:
    """Per input, the most bits at which the computed quantisation changes its class (the
    mildest level that really changes it; ``nan`` if none up to ``MAX_SEARCH_BITS``)."""
    y = network(x).argmax(-1)
    out = torch.full((len(x),), math.nan, dtype=torch.float64)
    kind = "bits_per_channel" if per_channel else "bits"
    for bits in range(2, MAX_SEARCH_BITS + 1):
        changed = compress(network, Compression(kind, bits))(x).argmax(-1) != y
        out = torch.where(changed, float(bits), out)
    return out


def real_prune(network, x) -> torch.Tensor:
    """Per input, the smallest global pruning ratio of ``PRUNE_GRID`` that changes its class."""
    y = network(x).argmax(-1)
    out = torch.full((len(x),), math.nan, dtype=torch.float64)
    for ratio in reversed(PRUNE_GRID):
        changed = compress(network, Compression("prune_global", ratio))(x).argmax(-1) != y
        out = torch.where(changed, ratio, out)
    return out


def median(t: torch.Tensor) -> float:
    t = t[~torch.isnan(t)]
    return float(t.median()) if len(t) else math.nan


def levels(network, x) -> dict:
    """Medians of the certified mildest level and of the real one, per kind."""
    out = {}
    for kind in ("bits_per_channel", "prune_global"):
        certified = mildest(network, x, kind, chunk=16)
        real = real_bits(network, x, True) if kind.startswith("bits") else real_prune(network, x)
        out[kind] = {"certified": median(certified), "real": median(real),
                     "ratio": median(real) / median(certified) if kind == "bits_per_channel"
                     else median(certified) / median(real)}
    return out


def markdown(report: dict) -> str:
    lines = ["| model | compression of every layer | really unchanged | vouched, section 5 "
             "(today) | vouched, joint (new) | every compression of that strength | "
             "violations | seconds |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, model in report["models"].items():
        for r in model["rows"]:
            n = r["inputs"]
            lines.append(f"| {name} | {r['compression']} | {r['unchanged']}/{n} | "
                         f"{r['section5']}/{n} | {r['joint']}/{n} | {r['strength']}/{n} | "
                         f"{r['violations']} | {r['seconds']:.1f} |")
    lines += ["", "| model | fewest bits per channel, certified (median) | most bits that "
              "really change (median) | ratio | largest global pruning certified (median) | "
              "smallest that really changes (median) | ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, model in report["models"].items():
        b, p = model["levels"]["bits_per_channel"], model["levels"]["prune_global"]
        lines.append(f"| {name} | {b['certified']:g} | {b['real']:g} | {b['ratio']:.2f} | "
                     f"{p['certified']:.1%} | {p['real']:.0%} | {p['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    names = list(report["models"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = report["models"][name]["rows"]
        labels = [r["compression"].replace("bits_per_channel", "int/ch").replace(
            "prune_global", "prune").replace("bits", "int") for r in rows]
        at = range(len(rows))
        for offset, key, label in ((-0.3, "unchanged", "really unchanged"),
                                   (-0.1, "section5", "vouched, section 5"),
                                   (0.1, "joint", "vouched, joint"),
                                   (0.3, "strength", "any compression of that strength")):
            ax.bar([i + offset for i in at], [r[key] / r["inputs"] for r in rows], 0.2,
                   label=label)
        ax.set_xticks(list(at), labels, rotation=30)
        ax.set_ylim(0, 1.05)
        ax.set_title(name)
        ax.set_xlabel("compression of every layer")
        ax.set_ylabel("share of the inputs")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-vit", action="store_true", help="skip the ViT")
    parser.add_argument("--out", default="whole_model_compression.json")
    parser.add_argument("--plot", default="whole_model_compression.png")
    parser.add_argument("--docs", action="store_true",
                        help="write the tables into docs/benchmarks.md")
    args = parser.parse_args()
    report = {"inputs": args.inputs, "models": {}}
    for name, network, x in models(args.inputs, args.seed, not args.no_vit):
        rows = []
        for c in COMPRESSIONS:
            rows.append(row(network, x, c))
            print(json.dumps({"model": name, **rows[-1]}), flush=True)
        report["models"][name] = {"rows": rows, "levels": levels(network, x)}
        print(json.dumps({"model": name, "levels": report["models"][name]["levels"]}),
              flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    plot(report, Path(args.plot))
    table = markdown(report)
    print(table)
    if args.docs:
        replace_block("benchmarks.md", "whole-model", table, invoked())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
