"""PNG of a certificate: radii per layer, and singular values against the rank threshold.

Layers are named as in the user's model (``layers[].name`` of the certificate, the module
name: ``fc2``, ``features.3``, or a ``Sequential`` index such as ``2``).
"""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from certify.graph.graph import Graph  # noqa: E402

NORM_NAMES = {"fro": "Frobenius", "max": "entrywise max"}
KEY_NAMES = {"lower": "lower: certified radius", "upper": "upper: verified witness norm",
             "estimate": "estimate: first order"}


def _values(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _median(values) -> float:
    """Median over inputs, ignoring ``null`` (no witness found); NaN when all are ``null``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: nothing to plot
        return float(np.nanmedian(_values(values)))


def plot_certificate(document: dict, network: Graph, path: str) -> None:
    """Left: median ``lower``, ``upper`` and ``estimate`` per layer, both norms. Right: per
    layer, the error of truncation to rank ``r`` that the certificate's threshold compares
    (``sigma_(r+1)`` for a dense layer on a vector, the Frobenius tail for a convolution or
    a dense layer over a sequence), the smallest certified Frobenius radius and the
    threshold rank."""
    layers = document["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    names = [layer["name"] for layer in layers]
    x = np.arange(len(layers))
    for norm, marker in (("fro", "o"), ("max", "s")):
        for key, style in (("lower", "-"), ("upper", "--"), ("estimate", ":")):
            medians = [_median(layer[norm][key]) for layer in layers]
            axes[0].plot(x, medians, style, marker=marker,
                         label=f"{NORM_NAMES[norm]} norm, {KEY_NAMES[key]}")
    axes[0].set(xticks=x, xticklabels=names, yscale="log",
                xlabel="layer (its name in the model: module or ONNX node)",
                ylabel="weight radius ||D|| (median over the inputs)",
                title="Per-layer weight radii (median over inputs)")
    axes[0].legend(fontsize=7)
    for layer, index in zip(layers, network.affine_indices):
        s = np.linalg.svd(network.layer(index).matrix.numpy(), compute_uv=False)
        name = layer["name"]
        if not network.is_dense(index):  # the certificate compares the Frobenius tail
            error = np.sqrt(np.cumsum((s ** 2)[::-1])[::-1])
            what = "truncation error ||W - W_r||_F (Frobenius tail)"
        else:  # one input of a dense layer: the spectral error sigma_(r+1)
            error = s
            what = "singular values sigma_(r+1) = ||W - W_r||_2"
        line, = axes[1].semilogy(np.arange(len(s)), error, label=f"layer {name}: {what}")
        radius = np.nanmin(_values(layer["fro"]["lower"]))
        axes[1].axhline(radius, color=line.get_color(), linestyle="--", linewidth=0.8,
                        label=f"layer {name}: smallest certified radius (Frobenius lower)")
        rank = layer["fro"]["threshold"]["rank"]
        axes[1].axvline(rank, color=line.get_color(), linestyle=":",
                        label=f"layer {name}: threshold rank {rank} (truncation to rank "
                              f">= {rank} certified)")
    axes[1].set(xlabel="rank r (singular values kept by truncation)",
                ylabel="truncation error at rank r, and radius (weight norm)",
                title="Truncation error against the smallest certified radius")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
