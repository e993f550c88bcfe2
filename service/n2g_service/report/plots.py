"""The index page's plots, drawn with matplotlib (Agg) as SVG files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

METHOD_STYLE = {
    "n2g_all_paths_max": ("N2G (all paths, max)", "#c0392b", "o-"),
    "n2g_greedy_deepest": ("N2G (greedy, deepest)", "#e67e22", "s--"),
    "token_lookup": ("token lookup", "#2874a6", "^-"),
    "ngram_lookup": ("5-gram lookup", "#27ae60", "v-"),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 10, "svg.hashsalt": "n2g-report"})
    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="svg", metadata={"Date": None})
    import matplotlib.pyplot as plt

    plt.close(fig)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_f1_per_layer(layer_table: dict[int, dict[str, dict[str, float]]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    layers = sorted(layer_table)
    drawn = False
    for method, (name, color, style) in METHOD_STYLE.items():
        xs = [l for l in layers if method in layer_table[l]]
        if xs:
            ax.plot(xs, [layer_table[l][method]["f1"] for l in xs], style, color=color, label=name)
            drawn = True
    if drawn:
        ax.set_xlabel("layer")
        ax.set_ylabel("mean F1 per neuron")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(layers)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    else:
        _empty(ax, "no evaluated neurons")
    ax.set_title("F1 per layer")
    _save(fig, path)


def plot_f1_distribution(f1s: dict[str, list[float]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    bins = np.linspace(0, 1, 21)
    drawn = False
    for method, (name, color, _) in METHOD_STYLE.items():
        vals = f1s.get(method) or []
        if vals:
            ax.hist(vals, bins=bins, histtype="step", linewidth=1.6, color=color, label=f"{name} (n={len(vals)})")
            drawn = True
    if drawn:
        ax.set_xlabel("F1 of a neuron")
        ax.set_ylabel("neurons")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    else:
        _empty(ax, "no evaluated neurons")
    ax.set_title("Distribution of per-neuron F1")
    _save(fig, path)


def plot_trajectories(curves: dict[int, tuple[np.ndarray, np.ndarray, int]], path: Path) -> None:
    """curves: layer -> (context lengths, mean normalised pivot activation, number of examples)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    if curves:
        cmap = plt.get_cmap("viridis")
        layers = sorted(curves)
        for i, layer in enumerate(layers):
            xs, ys, n = curves[layer]
            ax.plot(xs, ys, "-", marker="." if len(xs) < 40 else None,
                    color=cmap(i / max(len(layers) - 1, 1)), label=f"layer {layer} ({n} ex.)")
        ax.set_xlabel("context tokens kept before the pivot")
        ax.set_ylabel("mean normalised pivot activation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", ncol=2 if len(curves) > 6 else 1)
    else:
        _empty(ax, "no activation trajectories stored in this workspace")
    ax.set_title("Activation trajectory per layer")
    _save(fig, path)


# -- trajectories -------------------------------------------------------------------------------
TRAJECTORY_KEYS = ("trajectories", "activation_trajectories", "trajectory", "activation_trajectory")


def _one(t: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Accepts {"context_tokens": [...], "activations": [...]}, [[k, a], ...] or a dense [a0, a1, ...]
    (index = context tokens kept)."""
    try:
        if isinstance(t, dict):
            xs = t.get("context_tokens", t.get("lengths", t.get("context_lengths")))
            ys = t.get("activations", t.get("activation"))
            if xs is None:
                xs = list(range(len(ys)))
        elif t and isinstance(t[0], (list, tuple)):
            xs, ys = [p[0] for p in t], [p[1] for p in t]
        else:
            xs, ys = list(range(len(t))), t
        x = np.asarray(xs, dtype=np.float64)
        y = np.asarray(ys, dtype=np.float64)
        if x.size == 0 or x.shape != y.shape:
            return None
        order = np.argsort(x)
        return x[order], y[order]
    except (TypeError, ValueError, IndexError, KeyError, AttributeError):
        return None


def neuron_trajectories(stats: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    for key in TRAJECTORY_KEYS:
        if key in stats and stats[key]:
            raw = stats[key]
            if isinstance(raw, dict) or (raw and not isinstance(raw[0], (list, tuple, dict))):
                raw = [raw]  # a single trajectory
            return [c for c in (_one(t) for t in raw) if c is not None]
    return []


def mean_trajectory(trajs: list[tuple[np.ndarray, np.ndarray]], min_cover: float = 0.2):
    """Each trajectory interpolated onto integer context lengths within its own range; the mean at
    each length over the trajectories that cover it, kept while at least `min_cover` of them do."""
    if not trajs:
        return None
    top = int(max(x[-1] for x, _ in trajs))
    grid = np.arange(0, top + 1)
    total = np.zeros(grid.size)
    count = np.zeros(grid.size)
    for x, y in trajs:
        inside = (grid >= x[0]) & (grid <= x[-1])
        total[inside] += np.interp(grid[inside], x, y)
        count[inside] += 1
    keep = count >= max(1, min_cover * len(trajs))
    if not keep.any():
        return None
    return grid[keep], total[keep] / count[keep], len(trajs)
