"""``certify check`` of a compression certificate (``certify/compression/1``, written by
``certify compress``), in numpy, on the original model and the compressed copy beside it.

* the copy differs from the model only in the compressed layers' weights (every other
  weight and bias equal bit for bit), and those are the compression's output up to the
  file's dtype (``DTYPE_SLACK`` of the largest weight, float32's rounding);
* ``predictions``, ``compressed_predictions`` and ``changed``: both models run again (inputs
  whose two best logits tie within ``TIE`` may differ);
* ``harmless`` (the joint bound of section 10 on the weights written): every such input keeps
  its class in the copy, which is the claim itself, confirmed on the copy;
* ``strength`` (every compression of this strength): the numpy twin of the joint bound
  (``certify.check.joint``) on the sets of ``certify.check.compressions.strength_sets``;
* ``not_vouched`` and ``violations`` agree with ``harmless`` and ``changed``.
"""

from __future__ import annotations

import numpy as np

from certify.certificate.compression_document import validate
from certify.check.claims import Report, twin_and_inputs
from certify.check.compression_claims import TIE, check_strength, first_indices
from certify.check.compressions import compress_matrices
from certify.closed_forms.compressions import parse_compression

DTYPE_SLACK = 2.0**-20  # relative to the layer's largest weight: float32 (or finer) files


def _clear(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0] > TIE * (np.abs(logits).max(axis=1) + 1)


def check_compressed_model(document: dict, network, compressed, x: np.ndarray) -> Report:
    """Recompute every claim of the compression certificate ``document`` on the graphs of
    the original ``network`` and of the ``compressed`` copy, and the inputs ``x``."""
    validate(document)
    graph, x = twin_and_inputs(network, x, len(document["predictions"]), "certify compress")
    small = twin_and_inputs(compressed, x, len(x), "certify compress")[0]
    n = len(x)
    report = Report()
    compression = parse_compression(document["compression"])
    names = [graph.nodes[i].name for i in graph.affine_indices]
    if [small.nodes[i].name for i in small.affine_indices] != names:
        report.claim(False, "the compressed copy's layers are not the model's")
        return report
    indices = [i for i in graph.affine_indices
               if compression.layers is None or graph.nodes[i].name in compression.layers]
    report.claim(document["layers"] == [graph.nodes[i].name for i in indices],
                 f"layers {document['layers']} are not the layers {compression} compresses")
    matrices = [graph.layer(i).matrix for i in indices]
    nominal = compress_matrices(matrices, compression.kind, compression.level)
    for i in graph.affine_indices:
        ours, theirs = graph.layer(i), small.layer(i)
        name = graph.nodes[i].name
        report.claim(np.array_equal(ours.bias, theirs.bias), f"{name}: the copy's bias differs")
        if i in indices:
            G = nominal[indices.index(i)]
            slack = DTYPE_SLACK * max(float(np.abs(ours.matrix).max()), 1e-300)
            report.claim(np.abs(theirs.matrix - G).max() <= slack,
                         f"{name}: the copy's weights are not {compression} of the model's")
        else:
            report.claim(np.array_equal(ours.matrix, theirs.matrix),
                         f"{name}: a layer the compression leaves alone differs in the copy")
    values = graph.values(x)
    logits, after = values[-1], small(x)
    predicted, moved = logits.argmax(axis=1), after.argmax(axis=1)
    clear = _clear(logits) & _clear(after)
    for key, ours in (("predictions", predicted), ("compressed_predictions", moved)):
        bad = np.nonzero((np.array(document[key]) != ours) & clear)[0]
        report.claim(bad.size == 0, f"{key} of inputs {first_indices(bad)} differ from a "
                     "numpy forward pass")
    changed = moved != predicted
    claimed_changed = np.zeros(n, dtype=bool)
    claimed_changed[document["changed"]] = True
    bad = np.nonzero((claimed_changed != changed) & clear)[0]
    report.claim(bad.size == 0, f"inputs {first_indices(bad)} are claimed changed (or not), "
                 "but the compressed copy says otherwise")
    harmless = np.array(document["harmless"], dtype=bool)
    bad = np.nonzero(harmless & changed & clear)[0]
    report.claim(bad.size == 0, f"inputs {first_indices(bad)} are claimed harmless but the "
                 "compressed copy changes their class")
    report.claim(document["not_vouched"] == np.nonzero(~harmless)[0].tolist(),
                 "not_vouched is not the list of inputs without harmless")
    report.claim(document["violations"] == int((harmless & claimed_changed).sum()),
                 "violations is not the number of harmless inputs claimed changed")
    if document["strength"] is not None:
        check_strength(report, "", np.array(document["strength"], dtype=bool), graph, values,
                       predicted, indices, nominal, compression)
    return report
