"""What ``certify demo`` shows: the comparison table, the verdict in sentences, the targets,
the plot and the markdown summary, from the two ``demo.ModelReport`` s (clean and
backdoored), for any attack (``rank``, ``bits``, ``prune``)."""

from __future__ import annotations

from pathlib import Path

WHAT = {"rank": "truncation to rank {}", "bits": "quantisation to {} bits",
        "prune": "pruning of {:.0%} of the weights"}
LEVEL = {"rank": "rank", "bits": "bits", "prune": "pruned"}
AXIS = {"rank": "rank r of {} (truncation keeps r singular values)",
        "bits": "bit width b of {} (symmetric per-tensor quantisation)",
        "prune": "pruning ratio p of {} (smallest weights zeroed)"}
ERROR = {"rank": "sigma_(r+1), the spectral truncation error",
         "bits": "||W - q(W)||_max, the quantisation error", "prune":
         "||W - prune(W)||_max, the largest pruned weight"}


def _level(level, attack: str) -> str:
    if level is None:
        return "full"
    return f"{level:.0%}" if attack == "prune" else str(level)


def _safe(level, threshold, attack: str) -> bool:
    """Is ``level`` at least as mild as the certified threshold (nothing changes there)?"""
    if threshold is None:
        return False
    return level <= threshold if attack == "prune" else level >= threshold


def targets(clean, backdoor, attacked, attack: str) -> dict[str, dict]:
    """Issue 4's and 13's targets: full-precision ASR <= 2 %, compressed ASR >= 95 % at the
    attacked levels, clean accuracy within 1.5 points of the clean model (full precision and
    at the attacked levels, compared level for level)."""
    out = {"full-precision ASR <= 2%": (backdoor.at(None).asr, backdoor.at(None).asr <= 0.02)}
    for r in attacked:
        out[f"{LEVEL[attack]} {_level(r, attack)} ASR >= 95%"] = (
            backdoor.at(r).asr, backdoor.at(r).asr >= 0.95)
    for r in (None, *attacked):
        gap = clean.at(r).accuracy - backdoor.at(r).accuracy
        label = "full precision" if r is None else f"{LEVEL[attack]} {_level(r, attack)}"
        out[f"{label}: accuracy within 1.5 points of clean"] = (gap, abs(gap) <= 0.015)
    return {k: {"value": v, "met": bool(met)} for k, (v, met) in out.items()}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def table(clean, backdoor, inputs: int, attack: str, layer: str) -> str:
    """The comparison table: per level, both models side by side."""
    cols = ("acc", "ASR", "cert.", "changed", "viol")
    head1 = f"{'':6} | {'clean model':^42} | {'backdoored model':^42}"
    head2 = f"{LEVEL[attack]:>6} | " + " ".join(f"{c:>8}" for c in cols) + " | " + \
        " ".join(f"{c:>8}" for c in cols)
    lines = [head1, head2, "-" * len(head2)]
    for a, b in zip(clean.rows, backdoor.rows):
        cells = [f"{_pct(r.accuracy):>8} {_pct(r.asr):>8} {_pct(r.certified):>8} "
                 f"{_pct(r.changed):>8} {'-' if r.violations is None else r.violations:>8}"
                 for r in (a, b)]
        lines.append(f"{_level(a.level, attack):>6} | {cells[0]} | {cells[1]}")
    lines += ["-" * len(head2),
              f"acc, ASR: whole test split. cert.: share of {inputs} triggered test inputs "
              f"certified unchanged by the compression (the exact change of layer '{layer}''s "
              "output lies inside the certified z-region); changed: share whose class really "
              f"changed; viol: certified yet changed (must be 0). Threshold ({LEVEL[attack]}, "
              f"certificate, layer '{layer}'): clean {_level(clean.threshold, attack)}, "
              f"backdoored {_level(backdoor.threshold, attack)} (no milder level is "
              "certified for every input)."]
    return "\n".join(lines)


def verdict(clean, backdoor, attacked, inputs: int, attack: str) -> list[str]:
    """Plain sentences, every claim a measured number."""
    lines = []
    for r in attacked:
        b, c = backdoor.at(r), clean.at(r)
        what = WHAT[attack].format(r)
        threshold = f"threshold {_level(backdoor.threshold, attack)}"
        if _safe(r, backdoor.threshold, attack):
            vouch = f"vouches for every certified input (within the {threshold}"
        elif b.certified == 0:
            vouch = f"does NOT vouch for any triggered input (beyond the {threshold}"
        else:
            vouch = f"vouches for only {b.certified:.1%} of the triggered inputs (beyond the " \
                    f"{threshold}"
        lines.append(
            f"{what[0].upper() + what[1:]}: for the backdoored model the certificate {vouch});"
            f" {b.changed:.1%} of {inputs} triggered inputs changed class, ASR {b.asr:.1%}. "
            f"Clean model at the same level: {c.certified:.1%} certified unchanged, "
            f"{c.changed:.1%} changed, ASR {c.asr:.1%}"
            + ("." if _safe(r, clean.threshold, attack) else
               f"; its own threshold {_level(clean.threshold, attack)} does not cover it for "
               "every input either."))
    violations = sum(row.violations or 0 for m in (clean, backdoor) for row in m.rows)
    lines.append(f"Soundness: {violations} inputs changed class inside their certified radius "
                 f"(must be 0); certify check confirmed {clean.confirmed} + {backdoor.confirmed}"
                 f" claims and refuted {len(clean.refuted) + len(backdoor.refuted)}.")
    lines.append("A missing certificate is a warning, not a proof of a backdoor: it says "
                 "the compression may change these predictions, and the attack makes sure it "
                 "does.")
    return lines


def plot(clean, backdoor, attacked, attack: str, layer: str, path: Path) -> None:
    """Accuracy and ASR vs level (thresholds marked); the weight error vs the certified
    weight radius; the exact output change vs the certified z-radius; share certified /
    changed. Every axis is labelled and every line named in a legend; the layer is named as
    in the model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    (acc, weight), (change, share) = axes
    levels = clean.levels
    name = f"layer '{layer}'"
    radius = "Frobenius" if clean.norm == "fro" else "entrywise max"
    for m, style in ((backdoor, "-"), (clean, ":")):
        rows = m.rows[1:]
        for ax in (acc, weight):
            if m.threshold is not None:
                ax.axvline(m.threshold, color="m", ls=style, lw=1, label=f"{m.name}: "
                           f"certified threshold {_level(m.threshold, attack)}")
        acc.plot(levels, [r.accuracy for r in rows], "b" + style + "o", ms=3,
                 label=f"{m.name}: test accuracy")
        acc.plot(levels, [r.asr for r in rows], "r" + style + "o", ms=3,
                 label=f"{m.name}: ASR (triggered inputs sent to the target class)")
        # A zero error (full rank, many bits) has no place on a log scale: left out.
        kept = [(v, e) for v, e in zip(levels, m.error) if e > 0]
        if kept:
            weight.semilogy(*zip(*kept), "k" + style + "o", ms=3,
                            label=f"{m.name}: {ERROR[attack]}")
        weight.axhline(m.lower_min, color="g", ls=style,
                       label=f"{m.name}: smallest certified radius ({radius} lower)")
        weight.axhline(m.lower_median, color="c", ls=style,
                       label=f"{m.name}: median certified radius ({radius} lower)")
        kept = [(v, c) for v, c in zip(levels, m.change_median) if c > 0]
        if kept:
            change.semilogy(*zip(*kept), "k" + style + "o", ms=3,
                            label=f"{m.name}: median exact change ||(W - g(W)) h||_2")
        change.axhline(m.z_radius_median, color="g", ls=style,
                       label=f"{m.name}: median certified z-radius (lower_fro * ||h||_2)")
        share.plot(levels, [r.certified for r in rows], "g" + style + "o", ms=3,
                   label=f"{m.name}: certified unchanged by the compression")
        share.plot(levels, [r.changed for r in rows], "r" + style + "o", ms=3,
                   label=f"{m.name}: class really changed")
    for ax in axes.flat:
        for k, r in enumerate(attacked):
            ax.axvline(r, color="0.6", lw=0.6, label=None if k else
                       "attacked: " + ", ".join(_level(v, attack) for v in attacked))
        ax.set_xlabel(AXIS[attack].format(name))
        ax.legend(fontsize=7)
    acc.set_ylabel("share of the test split")
    weight.set_ylabel(f"weight norm ({'spectral' if clean.norm == 'fro' else 'entrywise max'})")
    change.set_ylabel(f"l2 norm of the change of the output z of {name}")
    share.set_ylabel("share of the certified triggered inputs")
    acc.set_title("test accuracy and ASR (solid: backdoored, dotted: clean)")
    weight.set_title(f"weight space: the error of {name} vs its certified radius")
    change.set_title(f"output z of {name}: exact change vs certified z-radius (medians)")
    share.set_title("triggered inputs: certified unchanged vs class changed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(summary: dict, table_text: str) -> str:
    lines = ["# certify demo", "",
             f"{summary['data']}; attack {summary['config']['attack']}; "
             f"{summary['config']['epochs']} epochs; {summary['seconds']:.0f} s.", "", "```",
             table_text, "```", "",
             "![accuracy, ASR and certificates against the compression level](demo.png)", ""]
    lines += [f"- {line}" for line in summary["verdict"]] + ["", "## Targets (issues 4, 13)",
                                                              ""]
    lines += [f"- {name}: {100 * t['value']:.1f}{' points' if 'accuracy' in name else '%'} "
              f"({'met' if t['met'] else 'NOT met'})" for name, t in summary["targets"].items()]
    lines += ["", "## Check the certificates yourself", "", "```"]
    lines += summary["check_commands"] + ["```", ""]
    return "\n".join(lines)
