"""The tables ``certify model`` prints: radii and thresholds per layer, compression checks."""

from __future__ import annotations


def compression_summary(entries: list[dict], total: int) -> str:
    """The ``--compress`` table: inputs changed, certified harmless, violations; a ``*``
    marks a compression of several layers, certified by the all-layers bound."""
    head = (f"{'compression':28} {'layers':24} {'changed':>9} {'harmless':>9} "
            f"{'violations':>10}")
    lines = [head, "-" * len(head)]
    for e in entries:
        harmless = f"{sum(e['harmless'])}/{total}" + ("*" if len(e["layers"]) > 1 else "")
        lines.append(
            f"{e['compression'][:28]:28} {','.join(e['layers'])[:24]:24} "
            f"{len(e['changed']):>4d}/{total:<4d} {harmless:>9} {e['violations']:>10}")
    if any(len(e["layers"]) > 1 for e in entries):
        lines.append("* several layers compressed at once: certified by the all-layers bound "
                     "(THEORY.md section 5) with budgets the layers' weight errors; "
                     "harmless_per_layer in the JSON certifies nothing on its own")
    return "\n".join(lines)


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
