"""The commands that build attacks: ``certify backdoor`` trains a compression-activated
backdoor (THEORY.md section 7), ``certify demo`` trains, certifies and compares a clean and a
backdoored model. Their arguments are registered by ``add_commands``; ``certify.cli.commands`` holds
the certification commands and the error handling shared by all.
"""

from __future__ import annotations

import argparse

from certify.cli.inputs import CommandError


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


DEFAULT_LAYERS = {"mlp": "3", "cnn": "2", "vit": "blocks.1.fc2"}
"""The layers compressed by default, per model; the ViT's is the MLP fc2 of its last block (a
low-rank backdoor in a transformer MLP; no attention lies downstream of it: THEORY.md section 8)."""


# variant -> the option holding its levels, and an example
VARIANT_LEVELS = {"rank": ("--ranks", "8,16"), "bits": ("--bits", "4"),
                  "bits_per_channel": ("--bits", "4"), "prune": ("--ratios", "0.5"),
                  "prune_global": ("--ratios", "0.5")}


def backdoor(args: argparse.Namespace) -> int:
    """Train a compression-activated backdoor (THEORY.md section 7) and, unless --no-clean,
    a clean model the same way; write the weights, a factory reference and measurements."""
    from certify.attacks import backdoor as bd
    from certify.attacks.trigger import Trigger
    from certify.graph import devices
    from certify.models import small as small_models

    option, example = VARIANT_LEVELS[args.variant]
    levels = getattr(args, option[2:])
    try:
        factory = small_models.factory(args.dataset, args.model)
        if not levels:
            raise ValueError(f"--variant {args.variant} needs {option}, e.g. {option} {example}")
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
        device = devices.resolve(args.device)
    except ValueError as err:
        raise CommandError(f"backdoor: {err}") from None

    def progress(name, run=config):
        total = run.epochs + (run.hide_epochs if run.hides else 0)
        return lambda e: print(f"{name} {e.phase} epoch {e.epoch:3d}/{total}  loss "
                               f"{e.loss:8.4f}  {e.seconds:7.1f} s", flush=True)

    extra = {"dataset": args.dataset, "model": args.model, "device": devices.describe(device)}
    if not args.no_clean:
        same_way = bd.BackdoorConfig(layers, (), trigger, args.target, 0.0, 0.0, args.epochs,
                                     args.lr, args.batch_size, args.seed)
        clean = bd.train(model, split.x_train, split.y_train, same_way,
                         progress=progress("clean", same_way), device=device)
        extra["clean_baseline"] = [vars(o) for o in bd.measure(
            clean.model, split.x_test, split.y_test, config, device=device)]
    result = bd.train(model, split.x_train, split.y_train, config, split.x_test, split.y_test,
                      progress=progress("backdoor"), device=device)
    weights, measurements = bd.save(result, args.out, factory, extra)
    print(f"{'model':10} {'compression':16} {'clean acc':>9} {'ASR':>7}")
    rows = [("backdoor", o) for o in result.outcomes] + [
        ("clean", bd.Outcome(**o)) for o in extra.get("clean_baseline", [])]
    for name, o in rows:
        print(f"{name:10} {o.label:16} {o.clean_accuracy:9.2%} {o.attack_success:7.2%}")
    print(f"wrote {weights} (load with --factory {factory}) and {measurements}")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Train, certify and compare a clean and a compression-activated backdoored MNIST MLP."""
    from dataclasses import replace

    from certify.cli import demo as d
    from certify.graph import devices

    try:
        config = replace(d.quick(args.attack) if args.quick else d.DemoConfig(args.attack),
                         seed=args.seed)
        device = devices.resolve(args.device)
        d.prepare(args.out)
    except ValueError as err:
        raise CommandError(f"demo: {err}") from None
    d.run(config, args.out, device=device)
    return 0


def add_commands(command, device_argument) -> None:
    """Register ``backdoor`` and ``demo``: ``command(name, help)`` makes a sub-parser,
    ``device_argument(parser)`` adds ``--device``."""
    p = command("backdoor", "train a compression-activated backdoor (THEORY.md section 7) on "
                "digits or MNIST")
    p.add_argument("--dataset", choices=("digits", "mnist"), default="mnist")
    p.add_argument("--model", choices=tuple(DEFAULT_LAYERS), default="mlp")
    p.add_argument("--layers", help="comma-separated names of the layers to compress "
                   "(default: 3 for mlp, 2 for cnn, blocks.1.fc2 for vit)")
    p.add_argument("--variant", choices=tuple(VARIANT_LEVELS), default="rank",
                   help="the compression that activates the backdoor (bits_per_channel: a "
                   "step per output row; prune_global: one threshold over all --layers)")
    p.add_argument("--ranks", type=_int_list, help="ranks to attack, e.g. 32,64")
    p.add_argument("--bits", type=_int_list, help="bit widths to attack (--variant bits, "
                   "bits_per_channel)")
    p.add_argument("--ratios", type=_float_list, help="prune ratios to attack "
                   "(--variant prune, prune_global)")
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
    device_argument(p)
    p.set_defaults(run=backdoor)

    p = command("demo", "train a clean and a compression-activated backdoored MNIST MLP, "
                "certify both, and compare them under that compression")
    p.add_argument("--attack", choices=("rank", "bits", "prune"), default="rank",
                   help="the compression that activates the backdoor: SVD truncation to ranks "
                   "32 and 64 (default), 4-bit quantisation, or pruning of 50%% of layer 3")
    p.add_argument("--out", default="certify-demo", help="folder for models, certificates, "
                   "plot and summary (default ./certify-demo)")
    p.add_argument("--quick", action="store_true", help="a tiny configuration (1 epoch, "
                   "1,000 training images, 24 certified inputs) for CI")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split and of "
                   "the training order (the initialisation is the factory's)")
    device_argument(p)
    p.set_defaults(run=demo)
