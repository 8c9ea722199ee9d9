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
    result = certify_network(network, torch.from_numpy(x), model_sha256=digest, bias=args.bias,
                             chunk=args.chunk)
    out = Path(args.out)
    out.write_text(json.dumps(result.document, indent=1))
    np.savez_compressed(witness_path(out), **result.witnesses)
    print(summary(result.document))
    print(f"wrote {out} and {witness_path(out)}")
    if args.plot:
        from certify.plot import plot_certificate

        plot_certificate(result.document, network, args.plot)
        print(f"wrote {args.plot}")
    return 0


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
    p.set_defaults(run=model)

    p = commands.add_parser("check", help="recompute a certificate independently (numpy)")
    p.add_argument("certificate")
    model_arguments(p)
    p.set_defaults(run=check)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
