"""Where inputs land in the network's representation: a 2-D UMAP map of penultimate activations.

The penultimate representation is the input of the last linear layer (what the classifier head separates).
Clean test inputs, their perturbed versions and the path of a few inputs as a perturbation grows are embedded
together in one UMAP fit (umap-learn, seeded, one thread), so that every point is placed by the same map.
The picture is drawn with matplotlib, coloured by class, correctness, ODD decision and perturbation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from trustcase.errors import Unsupported
from trustcase.explain.network import Network


def penultimate(net: Network) -> nn.Module:
    """The last linear layer, whose input is the penultimate representation."""
    linear = [m for m in net.layers().values() if isinstance(m, nn.Linear)]
    if not linear:
        raise Unsupported(f"the representation map needs a final Linear layer; layers: {net.describe()}")
    return linear[-1]


def features(net: Network, x: torch.Tensor) -> np.ndarray:
    """Penultimate activations (B, F) of normalised inputs."""
    seen = []
    h = penultimate(net).register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().flatten(1)))
    try:
        with torch.no_grad():
            net.forward(x)
    finally:
        h.remove()
    return seen[-1].numpy()


MIN_POINTS = 4  # UMAP's neighbour graph needs a few points


def embed(feats: np.ndarray, seed: int, neighbours: int = 15) -> np.ndarray:
    """(N, F) -> (N, 2) UMAP coordinates (deterministic for a seed); N >= MIN_POINTS."""
    import umap  # numba compiles on first use: imported only when a map is drawn

    n = len(feats)
    if n < MIN_POINTS:
        raise ValueError(f"a representation map needs at least {MIN_POINTS} points, got {n}")
    reducer = umap.UMAP(n_components=2, n_neighbors=min(neighbours, n - 1), random_state=seed, n_jobs=1,
                        init="spectral" if n > neighbours + 1 else "random")
    return reducer.fit_transform(feats)


def draw(path, xy: np.ndarray, panels: dict[str, tuple[list[str], dict[str, str]]], paths: list[np.ndarray],
         title: str) -> None:
    """Panels of the same points (labels per point, colour per label) and the paths drawn on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (name, (labels, colours)) in zip(axes[0], panels.items()):
        labels = np.asarray(labels)
        for lab, col in colours.items():
            sel = labels == lab
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=9, c=col, label=f"{lab} ({int(sel.sum())})", alpha=0.75,
                           linewidths=0)
        for p in paths:
            ax.plot(p[:, 0], p[:, 1], "-", color="black", lw=0.8, alpha=0.7)
            ax.plot(p[0, 0], p[0, 1], "o", color="black", ms=3)
            ax.plot(p[-1, 0], p[-1, 1], ">", color="black", ms=4)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, loc="best", frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
