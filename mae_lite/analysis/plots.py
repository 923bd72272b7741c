"""Figures of the analysis tools (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import numpy as np

COLOUR = "#1f77b4"  # the original's box colour (drawn half transparent)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def safe_name(name: str) -> str:
    """A name usable in file names, as the original makes them: spaces -> '_', parentheses dropped; also
    path separators -> '_'."""
    return re.sub(r"[\\/]", "_", name.replace(" ", "_").replace("(", "").replace(")", ""))


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def box_per_layer(values: np.ndarray, ylabel: str, path: str | Path, title: str = "",
                  reference: Optional[float] = None, reference_label: str = "", ylim: Optional[tuple] = None,
                  dpi: int = 150) -> Path:
    """Box plot of `values` [depth, heads]: one box per layer (1-based) over its heads; an optional dashed
    horizontal reference line (e.g. the value uniform attention would give)."""
    plt = pyplot()
    depth = values.shape[0]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * depth + 1.5), 3.6))
    style = {"facecolor": COLOUR + "80", "edgecolor": COLOUR}
    ax.boxplot(values.T, patch_artist=True, boxprops=style,  # boxes at x = 1..depth, labelled so
               flierprops={"marker": "o", "markerfacecolor": COLOUR + "80", "markeredgecolor": COLOUR},
               medianprops={"color": COLOUR}, whiskerprops={"color": COLOUR}, capprops={"color": COLOUR})
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label=reference_label or None)
        if reference_label:
            ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("Depth")
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    else:
        top = max(float(np.nanmax(values)), reference or 0.0)
        ax.set_ylim(0, top * 1.1 if top > 0 else 1.0)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path, dpi)


def cka_heatmap(matrix: np.ndarray, name1: str, name2: str, path: str | Path, dpi: int = 150) -> Path:
    """The original's heatmap: layers of model 1 on y, of model 2 on x, origin lower, magma, 0..1, colour bar."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    im = ax.imshow(matrix, origin="lower", cmap="magma", vmin=0.0, vmax=1.0)
    ax.set_ylabel(f"Layers {name1}")
    ax.set_xlabel(f"Layers {name2}")
    step = 3 if max(matrix.shape) > 6 else 1
    ax.set_xticks(range(0, matrix.shape[1], step))
    ax.set_yticks(range(0, matrix.shape[0], step))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, path, dpi)


def line_per_layer(values, ylabel: str, path: str | Path, title: str = "", dpi: int = 150) -> Path:
    """One value per layer (0 = the embeddings), as a line with markers."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(len(values)), values, marker="o", color=COLOUR)
    ax.set_xticks(range(len(values)))
    ax.set_xlabel("Layer (0: embeddings)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path, dpi)
