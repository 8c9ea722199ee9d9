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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="certify",
        description="Verification of neural networks under weight perturbations.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prove", help="re-derive every closed form with SymPy")
    p.add_argument("--match", default="", help="only derivations whose name contains this text")
    p.set_defaults(run=prove)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
