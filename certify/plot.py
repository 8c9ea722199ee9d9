"""PNG of a certificate: radii per layer, and singular values against the rank threshold."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from certify.network import Network  # noqa: E402


def _values(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def plot_certificate(document: dict, network: Network, path: str) -> None:
    layers = document["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [layer["name"] for layer in layers]
    x = np.arange(len(layers))
    for norm, marker in (("fro", "o"), ("max", "s")):
        for key, style in (("lower", "-"), ("upper", "--"), ("estimate", ":")):
            medians = [np.nanmedian(_values(layer[norm][key])) for layer in layers]
            axes[0].plot(x, medians, style, marker=marker, label=f"{norm} {key} (median)")
    axes[0].set(xticks=x, xticklabels=names, yscale="log", xlabel="layer",
                ylabel="weight radius", title="Per-layer radii (median over inputs)")
    axes[0].legend(fontsize=7)
    matrices = [network.steps[i].matrix.numpy() for i in network.affine_indices]
    for layer, W in zip(layers, matrices):
        s = np.linalg.svd(W, compute_uv=False)
        line, = axes[1].semilogy(np.arange(len(s)), s, label=f"{layer['name']}: sigma_(r+1)")
        radius = np.nanmin(_values(layer["fro"]["lower"]))
        axes[1].axhline(radius, color=line.get_color(), linestyle="--", linewidth=0.8)
        axes[1].axvline(layer["fro"]["threshold"]["rank"], color=line.get_color(), linestyle=":")
    axes[1].set(xlabel="rank r", ylabel="sigma_(r+1)",
                title="sigma_(r+1); smallest radius (dashed); threshold (dotted)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
