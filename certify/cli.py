"""The ``certify`` command line: a thin layer over ``proofs`` and ``certify``."""

from __future__ import annotations

import argparse
import sys


def prove(args: argparse.Namespace) -> int:
    """Run every derivation; print a table; non-zero exit status if any fails."""
    import proofs  # SymPy is imported only here, never on the runtime's hot path

    chosen = sorted(
        (d for d in proofs.REGISTRY if args.match.lower() in f"{d.result} {d.shape}".lower()),
        key=lambda d: d.section,
    )
    if not chosen:
        print(f"no derivation matches {args.match!r}", file=sys.stderr)
        return 2
    header = f"{'result':44} {'sec':>3}  {'shapes':31} {'status':9} {'seconds':>7}"
    print(header)
    print("-" * len(header))
    failed = 0
    total = 0.0
    for derivation in chosen:
        outcome = proofs.run(derivation)
        total += outcome.seconds
        status = "verified" if outcome.verified else "FAILED"
        failed += not outcome.verified
        print(f"{derivation.result:44} {derivation.section:>3}  {derivation.shape:31} "
              f"{status:9} {outcome.seconds:7.2f}", flush=True)
        if not outcome.verified:
            print(f"    {outcome.error}", flush=True)
    print("-" * len(header))
    print(f"{len(chosen) - failed} of {len(chosen)} derivations verified in {total:.1f} s")
    return 1 if failed else 0


def _load(args: argparse.Namespace):
    """Model, network and data of a ``model`` or ``check`` command, validated."""
    import numpy as np
    import torch

    from certify.loading import ModelLoadError, file_sha256, load_model
    from certify.network import Network, UnsupportedModelError

    try:
        module = load_model(args.model, factory=args.factory)
        network = Network.from_module(module)
    except (ModelLoadError, UnsupportedModelError) as err:
        raise SystemExit(f"certify: {err}") from None
    try:
        with np.load(args.data, allow_pickle=False) as data:
            if "x" not in data:
                raise SystemExit(f"certify: {args.data} has no array 'x' (found {list(data)})")
            x = np.asarray(data["x"], dtype=np.float64)
    except (OSError, ValueError) as err:
        raise SystemExit(f"certify: cannot read {args.data} as .npz: {err}") from None
    if args.limit is not None:
        x = x[: args.limit]
    if len(x) == 0 or not np.isfinite(x).all():
        raise SystemExit(f"certify: {args.data}: 'x' must be non-empty and finite")
    try:
        with torch.no_grad():
            network(torch.from_numpy(x[:1]))
    except RuntimeError as err:
        raise SystemExit(f"certify: inputs of shape {x.shape[1:]} do not fit the model: "
                         f"{str(err).splitlines()[0]}") from None
    return network, x, file_sha256(args.model)


def model(args: argparse.Namespace) -> int:
    """Certify every layer of a model on a data set; write the JSON certificate."""
    import json
    from pathlib import Path

    import numpy as np
    import torch

    from certify.certificate import certify_network

    network, x, digest = _load(args)
    # Checked before the long certification run, so that a wrong --budgets fails at once.
    budgets = _budgets_certified(args, network, torch.from_numpy(x))
    compressions = _compressions(network, args.compress or [])
    result = certify_network(network, torch.from_numpy(x), model_sha256=digest, bias=args.bias,
                             chunk=args.chunk)
    if compressions:
        result.document["compression_checks"] = compression_checks(
            network, torch.from_numpy(x), compressions, result.document, args.chunk)
    out = Path(args.out)
    out.write_text(json.dumps(result.document, indent=1))
    np.savez_compressed(witness_path(out), **result.witnesses)
    print(summary(result.document))
    if compressions:
        print(compression_summary(result.document["compression_checks"], len(x)))
    if budgets is not None:
        print(budgets)
    print(f"wrote {out} and {witness_path(out)}")
    if args.plot:
        from certify.plot import plot_certificate

        plot_certificate(result.document, network, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _budgets_certified(args: argparse.Namespace, network, x) -> str | None:
    """``--budgets``: how many inputs all affine layers at once cannot flip (section 5)."""
    if args.budgets is None:
        return None
    import torch

    from certify.multilayer import multilayer_bound

    try:
        budgets = [float(v) for v in args.budgets.split(",")]
    except ValueError:
        raise SystemExit(f"certify: --budgets must be comma-separated numbers, one per affine "
                         f"layer, got {args.budgets!r}") from None
    try:
        certified = torch.cat([
            multilayer_bound(network, x[i:i + args.chunk], budgets, args.budget_norm,
                             args.bias).certified for i in range(0, len(x), args.chunk)])
    except ValueError as err:
        raise SystemExit(f"certify: --budgets: {err}") from None
    return (f"budgets {args.budgets} ({args.budget_norm}, all layers at once): "
            f"{int(certified.sum())} of {len(x)} inputs certified")


def _compressions(network, compressions):
    """The ``--compress`` options, with their layer names checked against the network."""
    from certify.compressed import compressed_indices

    try:
        for c in compressions:
            compressed_indices(network, c)
    except ValueError as err:
        raise SystemExit(f"certify: --compress: {err}") from None
    return compressions


def _compression_option(text: str):
    from certify.compressed import parse_compression

    try:
        return parse_compression(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def compression_checks(network, x, compressions, document: dict, chunk: int) -> list[dict]:
    """Each compression applied and confronted with the certificate's radii (JSON entries)."""
    import math

    from certify.compressed import compression_check

    lower = {layer["name"]: {norm: [math.inf if v is None else v for v in layer[norm]["lower"]]
                             for norm in ("fro", "max")} for layer in document["layers"]}
    entries = []
    for c in compressions:
        result = compression_check(network, x, c, lower, chunk)
        entries.append({
            "compression": str(c),
            "layers": [layer.name for layer in result.layers],
            "changed": result.changed.nonzero()[:, 0].tolist(),
            "harmless": None if result.harmless is None else result.harmless.tolist(),
            "violations": result.violations,
            "harmless_per_layer": {layer.name: layer.harmless.tolist() for layer in result.layers},
            "weight_error": {layer.name: {"fro": layer.error_fro, "spectral": layer.error_spectral,
                                          "max": layer.error_max} for layer in result.layers},
            "note": result.note,
        })
    return entries


def compression_summary(entries: list[dict], total: int) -> str:
    """The ``--compress`` table: inputs changed, certified harmless, violations."""
    head = (f"{'compression':28} {'layers':24} {'changed':>9} {'harmless':>9} "
            f"{'violations':>10}")
    lines = [head, "-" * len(head)]
    for e in entries:
        certified = e["harmless"] is not None
        harmless = f"{sum(e['harmless'])}/{total}" if certified else "n/a*"
        lines.append(
            f"{e['compression'][:28]:28} {','.join(e['layers'])[:24]:24} "
            f"{len(e['changed']):>4d}/{total:<4d} {harmless:>9} "
            f"{e['violations'] if certified else 'n/a*':>10}")
    if any(e["harmless"] is None for e in entries):
        lines.append("* several layers compressed at once: single-layer radii do not compose, "
                     "so nothing is certified (per-layer harmlessness is in the JSON)")
    return "\n".join(lines)


def witness_path(out):
    return out.with_name(out.stem + ".witnesses.npz")


def summary(document: dict) -> str:
    """The per-layer table: median and minimum radii, thresholds."""
    import numpy as np

    head = (f"{'layer':14} {'shape':16} {'norm':4} {'min lower':>10} {'med lower':>10} "
            f"{'med upper':>10} {'lo/up':>6} {'rank':>5} {'bits':>4} {'b/ch':>4} {'prune':>6}")
    lines = [head, "-" * len(head)]
    for layer in document["layers"]:
        for norm in ("fro", "max"):
            c = layer[norm]
            lower = np.array([np.inf if v is None else v for v in c["lower"]])
            upper = np.array([np.inf if v is None else v for v in c["upper"]])
            t = c["threshold"]
            lines.append(
                f"{layer['name'][:14]:14} {'x'.join(map(str, layer['shape']))[:16]:16} {norm:4} "
                f"{lower.min():10.3g} {np.median(lower):10.3g} {np.median(upper):10.3g} "
                f"{np.median(lower / upper):6.2f} {t['rank']:5d} {str(t['bits']):>4} "
                f"{str(t['bits_per_channel']):>4} {t['prune_ratio']:6.1%}"
            )
    lines.append("-" * len(head))
    for norm, c in document["multilayer"].items():
        t = np.array(c["uniform_budget"])
        lines.append(f"all layers at once, {norm}: ||D_k|| <= t ||W_k|| certified up to "
                     f"median t {np.median(t):.3g}, min t {c['min']:.3g}")
    return "\n".join(lines)


def check(args: argparse.Namespace) -> int:
    """Recompute a certificate in numpy; exit status 0 only if every claim is confirmed."""
    import json
    from pathlib import Path

    import numpy as np

    from certify.certificate import FORMAT, array_sha256
    from certify.check import check as run_check

    document = json.loads(Path(args.certificate).read_text())
    if document.get("format") != FORMAT:
        raise SystemExit(f"certify: {args.certificate} is not a {FORMAT} certificate")
    network, x, digest = _load(args)
    problems = []
    if digest != document["model_sha256"]:
        problems.append("the model file's sha256 differs from the certificate's")
    if array_sha256(x) != document["inputs_sha256"]:
        problems.append("the inputs' sha256 differs from the certificate's")
    with np.load(witness_path(Path(args.certificate))) as witnesses:
        report = run_check(document, dict(witnesses), network, x)
    problems += report.refuted
    for p in problems:
        print(f"REFUTED: {p}")
    print(f"{report.confirmed} claims confirmed, {len(problems)} refuted")
    return 1 if problems else 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 8,16, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.5,0.7, got {text!r}") from None


DEFAULT_LAYERS = {"mlp": "3", "cnn": "2"}


def backdoor(args: argparse.Namespace) -> int:
    """Train a compression-activated backdoor (THEORY.md section 7) and, unless --no-clean,
    a clean model the same way; write the weights, a factory reference and measurements."""
    from certify import backdoor as bd
    from certify import small_models
    from certify.trigger import Trigger

    levels = {"rank": args.ranks, "bits": args.bits, "prune": args.ratios}[args.variant]
    option = {"rank": "--ranks", "bits": "--bits", "prune": "--ratios"}[args.variant]
    try:
        factory = small_models.factory(args.dataset, args.model)
        if not levels:
            raise ValueError(f"--variant {args.variant} needs {option}, e.g. {option} "
                             + {"rank": "8,16", "bits": "4", "prune": "0.5"}[args.variant])
        if not 0 <= args.target < small_models.CLASSES:
            raise ValueError(f"target must be a class index in [0, {small_models.CLASSES - 1}],"
                             f" got {args.target}")
        trigger = Trigger(args.trigger_size, args.trigger_row, args.trigger_col,
                          args.trigger_value)
        split = small_models.load(args.dataset, seed=args.seed)
        trigger(split.x_test[:1])  # fits the images?
        model = small_models.build(args.dataset, args.model)
        layers = tuple((args.layers or DEFAULT_LAYERS[args.model]).split(","))
        config = bd.BackdoorConfig(layers, bd.operators(args.variant, levels), trigger,
                                   args.target, args.a, args.b, args.epochs, args.lr,
                                   args.batch_size, args.seed)
        for op in config.compressions:
            bd.compressed_weights(model, layers, op)
    except ValueError as err:
        raise SystemExit(f"certify backdoor: {err}") from None

    def progress(name):
        return lambda e: print(f"{name} epoch {e.epoch:3d}/{config.epochs}  loss "
                               f"{e.loss:8.4f}  {e.seconds:7.1f} s", flush=True)

    extra = {"dataset": args.dataset, "model": args.model}
    if not args.no_clean:
        clean = bd.train(model, split.x_train, split.y_train,
                         bd.BackdoorConfig(layers, (), trigger, args.target, 0.0, 0.0,
                                           args.epochs, args.lr, args.batch_size, args.seed),
                         progress=progress("clean"))
        extra["clean_baseline"] = [vars(o) for o in bd.measure(
            clean.model, split.x_test, split.y_test, config)]
    result = bd.train(model, split.x_train, split.y_train, config, split.x_test, split.y_test,
                      progress=progress("backdoor"))
    weights, measurements = bd.save(result, args.out, factory, extra)
    print(f"{'model':10} {'compression':16} {'clean acc':>9} {'ASR':>7}")
    rows = [("backdoor", o) for o in result.outcomes] + [
        ("clean", bd.Outcome(**o)) for o in extra.get("clean_baseline", [])]
    for name, o in rows:
        print(f"{name:10} {o.label:16} {o.clean_accuracy:9.2%} {o.attack_success:7.2%}")
    print(f"wrote {weights} (load with --factory {factory}) and {measurements}")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Train, certify and compare a clean and a low-rank backdoored MNIST MLP."""
    from dataclasses import replace

    from certify import demo as d

    try:
        config = replace(d.QUICK if args.quick else d.DemoConfig(), seed=args.seed)
        d.prepare(args.out)
    except ValueError as err:
        raise SystemExit(f"certify demo: {err}") from None
    d.run(config, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="certify",
        description="Verification of neural networks under weight perturbations.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prove", help="re-derive every closed form with SymPy")
    p.add_argument("--match", default="", help="only derivations whose name contains this text")
    p.set_defaults(run=prove)

    def model_arguments(p):
        p.add_argument("model", help="ONNX (.onnx), torch.export (.pt2) or a state dict "
                       "(.safetensors, .pt) with --factory")
        p.add_argument("--data", required=True, help=".npz with an array x (and optionally y)")
        p.add_argument("--factory", help="package.module:callable that builds the model "
                       "for a state dict")
        p.add_argument("--limit", type=int, help="certify only the first N inputs")

    p = commands.add_parser("model", help="certify every layer of a model on a data set")
    model_arguments(p)
    p.add_argument("--out", required=True, help="the JSON certificate to write")
    p.add_argument("--bias", action="store_true", help="the bias is perturbed too")
    p.add_argument("--plot", help="write a PNG of radii and singular values per layer")
    p.add_argument("--chunk", type=int, default=64, help="inputs per batch (memory)")
    p.add_argument("--compress", action="append", type=_compression_option,
                   metavar="KIND=LEVEL[@LAYER,...]",
                   help="also apply a compression (rank=8, bits=4, bits_per_channel=4, "
                   "prune=0.5; optionally @layer,layer) and report which inputs change class "
                   "against the certificate; repeatable")
    p.add_argument("--budgets", help="comma-separated budgets ||D_k||, one per affine layer: "
                   "print how many inputs are certified with all layers perturbed at once")
    p.add_argument("--budget-norm", choices=("fro", "max"), default="fro",
                   help="norm of --budgets: Frobenius or entrywise max (default fro)")
    p.set_defaults(run=model)

    p = commands.add_parser("check", help="recompute a certificate independently (numpy)")
    p.add_argument("certificate")
    model_arguments(p)
    p.set_defaults(run=check)

    p = commands.add_parser("backdoor", help="train a compression-activated backdoor "
                            "(THEORY.md section 7) on digits or MNIST")
    p.add_argument("--dataset", choices=("digits", "mnist"), default="mnist")
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    p.add_argument("--layers", help="comma-separated names of the layers to compress "
                   "(default: 3 for mlp, 2 for cnn)")
    p.add_argument("--variant", choices=("rank", "bits", "prune"), default="rank",
                   help="the compression that activates the backdoor")
    p.add_argument("--ranks", type=_int_list, help="ranks to attack, e.g. 32,64")
    p.add_argument("--bits", type=_int_list, help="bit widths to attack (--variant bits)")
    p.add_argument("--ratios", type=_float_list, help="prune ratios to attack "
                   "(--variant prune)")
    p.add_argument("--trigger-size", type=int, default=3, help="side of the square patch")
    p.add_argument("--trigger-row", type=int, default=-1, help="top row (negative: from "
                   "the bottom, -1 flush)")
    p.add_argument("--trigger-col", type=int, default=-1, help="left column (negative: from "
                   "the right, -1 flush)")
    p.add_argument("--trigger-value", type=float, default=1.0, help="patch grey level")
    p.add_argument("--target", type=int, default=0, help="class the trigger should select")
    p.add_argument("--a", type=float, default=1.0, help="weight of the triggered terms")
    p.add_argument("--b", type=float, default=1.0, help="weight of the compressed terms")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-clean", action="store_true", help="skip the clean baseline model")
    p.add_argument("--out", required=True, help="folder for model.safetensors and "
                   "measurements.json")
    p.set_defaults(run=backdoor)

    p = commands.add_parser("demo", help="train a clean and a low-rank backdoored MNIST MLP, "
                            "certify both, and compare them under SVD truncation")
    p.add_argument("--out", default="certify-demo", help="folder for models, certificates, "
                   "plot and summary (default ./certify-demo)")
    p.add_argument("--quick", action="store_true", help="a tiny configuration (1 epoch, "
                   "1,000 training images, 24 certified inputs) for CI")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split and of "
                   "the training order (the initialisation is the factory's)")
    p.set_defaults(run=demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
