"""The tables ``certify model`` prints: radii and thresholds per layer, compression checks."""

from __future__ import annotations


def compression_summary(entries: list[dict], total: int) -> str:
    """The ``--compress`` table: inputs changed, certified harmless (the compression made),
    certified against every compression of that strength, violations."""
    head = (f"{'compression':28} {'layers':24} {'changed':>9} {'harmless':>9} "
            f"{'strength':>9} {'violations':>10}")
    lines = [head, "-" * len(head)]
    for e in entries:
        harmless = "-" if e["harmless"] is None else f"{sum(e['harmless'])}/{total}"
        strength = "-" if e.get("strength") is None else f"{sum(e['strength'])}/{total}"
        violations = "-" if e["violations"] is None else str(e["violations"])
        lines.append(
            f"{e['compression'][:28]:28} {','.join(e['layers'])[:24]:24} "
            f"{len(e['changed']):>4d}/{total:<4d} {harmless:>9} {strength:>9} {violations:>10}")
    lines.append("harmless: the class provably cannot change under the compression made (the "
                 "joint bound of THEORY.md section 10; one layer: or its radii; several: or the "
                 "section-5 bound); strength: nor under any compression of that strength (the "
                 "quantiser's cells, the pruning box, the truncation's Frobenius ball)")
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
    whole = document.get("whole_model")
    if whole is not None:
        lines.append(whole_model_summary(whole))
    return "\n".join(lines)


def whole_model_summary(whole: dict) -> str:
    """The mildest compression of every layer at once that every compression of that
    strength keeps the class at: per input median, and the threshold over the inputs."""
    import numpy as np

    def median(kind):
        values = [v for v in whole[kind] if v is not None]
        return np.median(values) if values else None

    def show(kind, value):
        if value is None:
            return "none"
        return {"bits": f"{value:g} bits", "bits_per_channel": f"{value:g} bits",
                "prune_global": f"{value:.1%}", "relative": f"t {value:.3g}"}[kind]

    names = {"bits": "int per tensor", "bits_per_channel": "int per channel",
             "prune_global": "global pruning", "relative": "||E_k||_F <= t ||W_k||_F"}
    parts = [f"{names[k]} {show(k, median(k))} (all: {show(k, whole['threshold'][k])})"
             for k in names]
    return ("every layer compressed at once, any compression of that strength (THEORY.md "
            "section 10), per-input median (threshold over the inputs): " + "; ".join(parts))
