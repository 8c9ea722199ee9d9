"""The ``certify`` command line: a thin layer over ``proofs`` and ``certify``.

Exit status: 0 every claim confirmed (or the command did its work), 1 a claim refuted (a
derivation failed, a certificate claim is false), 2 a usage or input error (bad
arguments, unreadable or malformed files, data that does not fit the model), 3 an
internal error (a bug: one line saying where to report it; the traceback with --debug).
Arguments and paths are checked before any long work starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from certify.cli.inputs import (CommandError, load, plot_path, positive, steps_option,
                                 writable)
from certify.cli.tables import compression_summary, summary

EXIT_OK, EXIT_REFUTED, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_STATUS = ("exit status: 0 confirmed or done, 1 refuted, 2 usage or input error, "
               "3 internal error (--debug shows the traceback)")
REPORT = ("this is a bug in certify: please report it to the certify issue tracker with the "
          "command and the output of the same command with --debug")
REFINE = {"auto": "auto", "always": True, "never": False}  # --refine: layer_radii's refine


def _input_errors() -> tuple[type[Exception], ...]:
    """The documented exceptions of bad input, each a usage or input error on the CLI."""
    from certify.capture.export import UnsupportedModelError
    from certify.certificate.schema import CertificateFormatError
    from certify.check.claims import CheckInputError
    from certify.formats.loading import ModelLoadError
    from certify.graph.inputs import InputError, InputTypeError

    return (CommandError, CheckInputError, InputError, InputTypeError, ModelLoadError,
            UnsupportedModelError, CertificateFormatError)


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


def _accuracy(document: dict, y) -> str:
    """Add the ``labels`` section (accuracy, misclassified inputs); its summary line."""
    import numpy as np

    from certify.certificate.schema import array_sha256

    wrong = np.nonzero(np.array(document["predictions"]) != y)[0]
    document["labels"] = {"labels_sha256": array_sha256(y), "accuracy": 1 - wrong.size / len(y),
                          "misclassified": wrong.tolist()}
    shown = ", ".join(map(str, wrong[:10].tolist())) + (", ..." if wrong.size > 10 else "")
    return (f"accuracy on y: {1 - wrong.size / len(y):.1%} ({wrong.size} of {len(y)} "
            f"misclassified{': ' + shown if wrong.size else ''}); certificates are about the "
            "predicted class, right or wrong")


def model(args: argparse.Namespace) -> int:
    """Certify every layer of a model on a data set; write the JSON certificate."""
    import numpy as np
    import torch

    from certify.certificate.schema import witness_path, write_certificate

    out = writable(args.out, "--out")
    plot = plot_path(args.plot)
    run = backend(args)
    network, x, y, digest = load(args)
    # Checked before the long certification run, so that a wrong --budgets fails at once.
    budgets = _budgets_certified(args, network, torch.from_numpy(x))
    compressions = _compressions(network, args.compress or [])
    memory = {} if args.backend != "serial" else {"memory": _memory_budget(args.memory)}
    result = run(network, torch.from_numpy(x), model_sha256=digest, bias=args.bias,
                 chunk=args.chunk, device=args.device, refine=REFINE[args.refine],
                 optimise=args.optimise, **memory)
    if compressions:
        result.document["compression_checks"] = compression_checks(
            network, torch.from_numpy(x), compressions, result.document, args.chunk)
    accuracy = None if y is None else _accuracy(result.document, y)
    write_certificate(result.document, out)
    np.savez_compressed(witness_path(out), **result.witnesses)
    print(summary(result.document))
    if accuracy:
        print(accuracy)
    if compressions:
        print(compression_summary(result.document["compression_checks"], len(x)))
    if budgets is not None:
        print(budgets)
    print(f"wrote {out} and {witness_path(out)}")
    if plot:
        from certify.cli.plot import plot_certificate

        plot_certificate(result.document, network, str(plot))
        print(f"wrote {plot}")
    return EXIT_OK


def backend(args: argparse.Namespace):
    """``--backend``: the function that certifies, with its options checked (Ray installed,
    the device present) before the model is loaded."""
    from functools import partial

    from certify.graph import devices

    devices.resolve(args.device)
    if args.backend == "serial":
        for option, value in (("--workers", args.workers), ("--ray-address", args.ray_address)):
            if value is not None:
                raise CommandError(f"{option} applies to --backend ray only; add --backend ray "
                                   f"or drop {option}")
        from certify.certificate.document import certify_network

        return certify_network
    from certify.certificate import ray as ray_backend

    ray_backend.ray_module()
    return partial(ray_backend.certify_on_ray, workers=args.workers or 2,
                   address=args.ray_address)


def _budgets_certified(args: argparse.Namespace, network, x) -> str | None:
    """``--budgets``: how many inputs all affine layers at once cannot flip (section 5)."""
    if args.budgets is None:
        return None
    import torch

    from certify.radii.multilayer import multilayer_bound

    try:
        budgets = [float(v) for v in args.budgets.split(",")]
    except ValueError:
        raise CommandError(f"--budgets must be comma-separated numbers, one per affine "
                         f"layer, got {args.budgets!r}") from None
    try:
        certified = torch.cat([
            multilayer_bound(network, x[i:i + args.chunk], budgets, args.budget_norm,
                             args.bias).certified for i in range(0, len(x), args.chunk)])
    except ValueError as err:
        raise CommandError(f"--budgets: {err}") from None
    return (f"budgets {args.budgets} ({args.budget_norm}, all layers at once): "
            f"{int(certified.sum())} of {len(x)} inputs certified")


def _compressions(network, compressions):
    """The ``--compress`` options, with their layer names checked against the network."""
    from certify.radii.compressed import compressed_indices

    try:
        for c in compressions:
            compressed_indices(network, c)
    except ValueError as err:
        raise CommandError(f"--compress: {err}") from None
    return compressions


def _compression_option(text: str):
    from certify.closed_forms.compressions import parse_compression

    try:
        return parse_compression(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _memory_option(text: str) -> str | int | None:
    """``--memory``: ``auto``, ``none`` or a size in bytes (``certificate.memory.parse_budget``)."""
    if text in ("auto", "none"):
        return text
    from certify.certificate.memory import parse_budget

    try:
        return parse_budget(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{err}, or auto, or none") from None


def _memory_budget(option: str | int) -> int | None:
    """Bytes of the budget ``--memory`` names (``auto``: measured now)."""
    from certify.certificate.memory import default_budget

    return {"auto": default_budget, "none": lambda: None}.get(option, lambda: option)()


def compression_checks(network, x, compressions, document: dict, chunk: int) -> list[dict]:
    """Each compression applied and confronted with the certificate's radii (JSON entries)."""
    import math

    from certify.radii.compressed import compression_check

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
            "jointly": None if result.jointly is None else result.jointly.tolist(),
            "strength": None if result.strength is None else result.strength.tolist(),
            "weight_error": {layer.name: {"fro": layer.error_fro, "spectral": layer.error_spectral,
                                          "max": layer.error_max} for layer in result.layers},
            "note": result.note,
        })
    return entries


def check(args: argparse.Namespace) -> int:
    """Recompute a certificate in numpy; exit status 0 only if every claim is confirmed."""
    import zipfile

    import numpy as np

    from certify.certificate.schema import array_sha256
    from certify.certificate.compression_document import FORMAT as COMPRESSION_FORMAT
    from certify.certificate.schema import read_certificate, read_json, witness_path
    from certify.check.claims import check as run_check
    from certify.graph import devices

    devices.resolve(args.device)
    raw = read_json(args.certificate)
    if isinstance(raw, dict) and raw.get("format") == COMPRESSION_FORMAT:
        return _check_compressed(args)
    document = read_certificate(args.certificate)
    witnesses_file = witness_path(Path(args.certificate))
    if not witnesses_file.is_file():
        raise CommandError(f"{witnesses_file}: no such file; certify model writes the "
                           "witnesses beside the certificate, keep the two together")
    try:
        with np.load(witnesses_file, allow_pickle=False) as stored:
            witnesses = dict(stored)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CommandError(f"cannot read the witnesses {witnesses_file}: {err}") from None
    network, x, y, digest = load(args)
    problems = []
    if digest != document["model_sha256"]:
        problems.append("the model file's sha256 differs from the certificate's")
    if array_sha256(x) != document["inputs_sha256"]:
        problems.append("the inputs' sha256 differs from the certificate's")
    report = run_check(document, witnesses, network, x, y)
    problems += report.refuted
    for p in problems:
        print(f"REFUTED: {p}")
    print(f"{report.confirmed} claims confirmed, {len(problems)} refuted (numpy on the CPU; "
          f"the certificate was computed on {document.get('device', 'an unrecorded device')})")
    return EXIT_REFUTED if problems else EXIT_OK


def _check_compressed(args: argparse.Namespace) -> int:
    """``certify check`` of a ``certify compress`` certificate: the model, the compressed
    copy beside the certificate, the inputs (``certify.check.compressed_model``)."""
    from certify.capture.export import capture
    from certify.certificate.schema import array_sha256, read_json
    from certify.check.compressed_model import check_compressed_model
    from certify.formats.loading import file_sha256, load_model

    document = read_json(args.certificate)
    copy = Path(args.certificate).parent / str(document.get("compressed_model", ""))
    if not copy.is_file():
        raise CommandError(f"{copy}: the compressed model is not beside the certificate; keep "
                           "the folder certify compress wrote together")
    network, x, _, digest = load(args)
    problems = []
    if digest != document.get("model_sha256"):
        problems.append("the model file's sha256 differs from the certificate's")
    if file_sha256(copy) != document.get("compressed_sha256"):
        problems.append("the compressed model's sha256 differs from the certificate's")
    if array_sha256(x) != document.get("inputs_sha256"):
        problems.append("the inputs' sha256 differs from the certificate's")
    small = capture(load_model(copy, factory=args.factory), x[:1])
    report = check_compressed_model(document, network, small, x)
    problems += report.refuted
    for p in problems:
        print(f"REFUTED: {p}")
    print(f"{report.confirmed} claims confirmed, {len(problems)} refuted (numpy on the CPU)")
    return EXIT_REFUTED if problems else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the ``certify`` command line on ``argv`` (default ``sys.argv[1:]``) and return
    its exit status (module docstring); ``certify --help`` lists the commands."""
    from certify.cli import attacks as cli_attacks
    from certify.cli import compress as cli_compress
    from certify.cli import operators as cli_operators
    from certify.version import __version__

    parser = argparse.ArgumentParser(
        prog="certify",
        description="Verification of neural networks under weight perturbations.",
        epilog=EXIT_STATUS,
    )
    parser.add_argument("--version", action="version", version=f"certify {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an internal error")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an internal error")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, **kwargs):
        return commands.add_parser(name, help=help, description=help, epilog=EXIT_STATUS,
                                   parents=[debug], **kwargs)

    p = command("prove", "re-derive every closed form with SymPy")
    p.add_argument("--match", default="", help="only derivations whose name contains this text")
    p.set_defaults(run=prove)

    def device_argument(p):
        p.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]",
                       help="where torch computes, always in float64 (default cpu)")

    def model_arguments(p):
        p.add_argument("model", help="ONNX (.onnx), torch.export (.pt2) or a state dict "
                       "(.safetensors, .pt) with --factory")
        p.add_argument("--data", required=True, help=".npz with an array x (and optionally "
                       "labels y: accuracy is reported) or a .npy array of inputs")
        p.add_argument("--factory", help="package.module:callable that builds the model "
                       "for a state dict")
        p.add_argument("--limit", type=positive("--limit"), metavar="N",
                       help="only the first N inputs (check: the same N as certify model)")

    p = command("model", "certify every layer of a model on a data set")
    model_arguments(p)
    p.add_argument("--out", required=True, help="the JSON certificate to write")
    p.add_argument("--bias", action="store_true", help="the bias is perturbed too")
    p.add_argument("--plot", help="write a plot of radii and singular values per layer (PNG "
                   "unless the name asks for another format)")
    p.add_argument("--chunk", type=positive("--chunk"), default=64, metavar="N",
                   help="inputs per batch, at most (default 64; --memory may make them fewer)")
    p.add_argument("--memory", type=_memory_option, default="auto", metavar="SIZE",
                   help="resident memory the certification keeps within, by fitting its "
                   "chunks of inputs (8G, 512M, ...; auto, the default: half the memory "
                   "available at the start; none: chunks of --chunk); serial backend on the "
                   "CPU")
    p.add_argument("--refine", choices=tuple(REFINE), default="auto",
                   help="backward refinement of the local bound: auto (default: where it "
                   "pays at a bounded cost), always (every input of every layer: usually "
                   "tighter on wide and deep layers, and several times slower there) or never "
                   "(fastest)")
    p.add_argument("--optimise", type=steps_option, default=0, metavar="STEPS",
                   help="a second, refined search for the inputs below 0.95 of their witness, "
                   "with the margins' ReLU slopes optimised (alpha-CROWN) by STEPS gradient "
                   "steps per evaluation (default 0: none); tighter on ReLU networks and 2 to "
                   "30 times slower there; the slopes go into the witnesses file for certify "
                   "check")
    p.add_argument("--compress", action="append", type=_compression_option,
                   metavar="KIND=LEVEL[@LAYER,...]",
                   help="also apply a compression (rank=8, bits=4, bits_per_channel=4, "
                   "prune=0.5, prune_global=0.5; optionally @layer,layer) and report which "
                   "inputs change class against the certificate (several layers: against the "
                   "all-layers bound); repeatable")
    p.add_argument("--budgets", help="comma-separated budgets ||D_k||, one per affine layer: "
                   "print how many inputs are certified with all layers perturbed at once")
    p.add_argument("--budget-norm", choices=("fro", "max"), default="fro",
                   help="norm of --budgets: Frobenius or entrywise max (default fro)")
    p.add_argument("--backend", choices=("serial", "ray"), default="serial",
                   help="serial (default: this process) or ray: chunks of --chunk inputs "
                   "certified by Ray workers and merged into one certificate (pip install "
                   "'certify[ray]')")
    p.add_argument("--workers", type=positive("--workers"), metavar="N",
                   help="--backend ray: chunks certified at once (and the CPUs of the local "
                   "cluster started when there is no --ray-address; default 2)")
    p.add_argument("--ray-address", metavar="ADDR", help="--backend ray: the cluster to join "
                   "(e.g. ray://head:10001 or auto); default a local cluster for this run")
    device_argument(p)
    p.set_defaults(run=model)

    p = command("check", "recompute every claim of a certificate independently (numpy); "
                "exit status 1 if any is refuted")
    p.add_argument("certificate")
    model_arguments(p)
    p.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]",
                   help="accepted as on certify model, and checked to exist; the checker is "
                   "an independent numpy implementation and always runs on the CPU")
    p.set_defaults(run=check)

    cli_compress.add_command(command, model_arguments)
    cli_attacks.add_commands(command, device_argument)
    cli_operators.add_command(command)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:  # --help and --version: 0; a usage error: 2
        return exit.code if isinstance(exit.code, int) else EXIT_INPUT
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    """The command, with its errors turned into one line and an exit status."""
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("certify: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if isinstance(err, _input_errors()):
            print(f"certify: {err}", file=sys.stderr)
            return EXIT_INPUT
        if args.debug:
            import traceback

            traceback.print_exc()
        first = str(err).splitlines()[0] if str(err) else ""
        print(f"certify: internal error ({type(err).__name__}: {first}); {REPORT}",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
