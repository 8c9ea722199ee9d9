"""``certify compress``: compress every chosen layer of a model at once, write the compressed
copy in the model's own format, and certify, per input, that it keeps the class (THEORY.md
section 10, on the weights actually written), beside whether every compression of that
strength would, and whether the class really changes.

Nothing is claimed for an input the certificate does not vouch for: those are listed
(``not_vouched``), and so are the inputs whose class really changes (``changed``).
``certify check DIR/compression.json MODEL --data X`` confirms every claim in numpy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from certify.cli.inputs import CommandError, load

CERTIFICATE = "compression.json"


def _copy_name(model: Path, compression) -> str:
    level = str(compression.level).replace(".", "p")
    return f"{model.stem}.{compression.kind}-{level}{model.suffix}"


def compress(args: argparse.Namespace) -> int:
    """Write the compressed model and its certificate into ``--out``."""
    import torch

    from certify.bounds.deviations import unsupported
    from certify.capture.export import capture
    from certify.certificate.compression_document import FORMAT, write
    from certify.certificate.schema import array_sha256
    from certify.closed_forms.compressions import compress_matrices, parse_compression
    from certify.formats.loading import file_sha256, load_model
    from certify.formats.writing import write_weights
    from certify.radii.compressed import JOINT_CHUNK, compressed_indices
    from certify.radii.whole_model import point_sets, strength_sets
    from certify.bounds.joint import joint_certified, joint_trace
    from certify.version import __version__

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} is a file; give a folder (it is created if missing)")
    network, x, _, digest = load(args)
    try:
        compression = parse_compression(args.to, network.layer_names)
    except ValueError as err:
        raise CommandError(f"--to: {err}") from None
    indices = compressed_indices(network, compression)
    out.mkdir(parents=True, exist_ok=True)
    copy = out / _copy_name(Path(args.model), compression)
    nominal = compress_matrices([network.layer(i).matrix for i in indices], compression)
    small = write_weights(
        args.model, network, {network.nodes[i].name: G for i, G in zip(indices, nominal)}, copy,
        reload=lambda path: capture(load_model(path, factory=args.factory), x[:1]))
    written = [small.layer(i).matrix for i in indices]
    why = next(filter(None, (unsupported(network, i) for i in indices)), None)
    inputs = torch.from_numpy(x)
    harmless, strength = [], []
    for start in range(0, len(x), JOINT_CHUNK):
        values = network.values(inputs[start:start + JOINT_CHUNK])
        if why is not None:
            harmless.append(torch.zeros(len(values[0]), dtype=torch.bool))
            continue
        t = joint_trace(network, indices, values, values[-1].argmax(-1), supports=True)
        harmless.append(joint_certified(network, t, point_sets(network, indices, written)))
        strength.append(joint_certified(network, t, strength_sets(network, indices,
                                                                  compression, nominal)))
        print(f"\rcertified {min(start + JOINT_CHUNK, len(x))}/{len(x)} inputs", end="",
              file=sys.stderr, flush=True)
    print(file=sys.stderr)
    before, after = network(inputs).argmax(-1), small(inputs).argmax(-1)
    harmless = torch.cat(harmless)
    changed = (before != after).nonzero()[:, 0].tolist()
    document = {
        "format": FORMAT, "tool_version": __version__, "model_sha256": digest,
        "inputs_sha256": array_sha256(x), "compressed_model": copy.name,
        "compressed_sha256": file_sha256(copy), "compression": str(compression),
        "layers": [network.nodes[i].name for i in indices],
        "predictions": before.tolist(), "compressed_predictions": after.tolist(),
        "changed": changed, "harmless": harmless.tolist(),
        "strength": torch.cat(strength).tolist() if strength else None,
        "not_vouched": (~harmless).nonzero()[:, 0].tolist(),
        "violations": int(harmless[changed].sum()) if changed else 0,
        "note": ("harmless: the joint bound of THEORY.md section 10 on the weights written; "
                 "strength: every compression of this strength (the quantiser's cells, the "
                 "pruning box, the truncation's Frobenius ball)" if why is None else
                 f"nothing is certified: {why} has no remainder rule (THEORY.md section 9)"),
    }
    write(document, out / CERTIFICATE)
    print(summary(document))
    print(f"wrote {copy} and {out / CERTIFICATE}")
    return 0


def summary(document: dict) -> str:
    """What a compression engineer reads first: how many inputs are vouched for, against how
    many really keep their class, and which are not vouched for."""
    n = len(document["predictions"])
    kept = n - len(document["changed"])
    lines = [f"{document['compression']} on {len(document['layers'])} layer(s): "
             f"{sum(document['harmless'])}/{n} inputs certified to keep their class, "
             f"{kept}/{n} really keep it, {document['violations']} violations"]
    if document["strength"] is not None:
        lines.append(f"every compression of this strength: {sum(document['strength'])}/{n} "
                     "inputs certified")
    shown = lambda items: ", ".join(map(str, items[:20])) + (" ..." if len(items) > 20 else "")  # noqa: E731
    if document["changed"]:
        lines.append(f"really changed: {shown(document['changed'])}")
    if document["not_vouched"]:
        lines.append(f"not vouched for (no claim made): {shown(document['not_vouched'])}")
    return "\n".join(lines)


def add_command(command, model_arguments) -> None:
    p = command("compress", "compress every chosen layer of a model at once, write the "
                "compressed model in the same format, and certify which inputs keep their "
                "class")
    model_arguments(p)
    p.add_argument("--to", required=True, metavar="KIND=LEVEL[@LAYER,...]",
                   help="the compression: bits=8, bits_per_channel=8, prune_global=0.1, "
                   "prune=0.3, rank=16; optionally @layer,layer (default every layer)")
    p.add_argument("--out", required=True, help="the folder to write the compressed model "
                   f"and {CERTIFICATE} into (created if missing)")
    p.set_defaults(run=compress)
