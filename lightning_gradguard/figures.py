"""The gradient-flow picture: per-layer gradient norms (log scale), layers in forward order."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def gradient_flow_image(
    names: Sequence[str], norms: Sequence[float], title: str = "gradient flow", history: Optional[Sequence[Sequence[float]]] = None
) -> np.ndarray:
    """Render per-layer gradient norms as an ``(H, W, 3)`` uint8 image (matplotlib, Agg backend).

    ``history`` (earlier steps' norms, oldest first) is drawn in light grey behind the current line.

    Example:
        >>> img = gradient_flow_image(["net.1", "net.3"], [1e-6, 0.2])
        >>> img.shape[2]
        3
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.0, 0.35 * len(names) + 2), 3.2), dpi=100)
    canvas = FigureCanvasAgg(fig)  # no pyplot, no global backend change
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    floor = 1e-30
    for old in history or []:
        ax.plot(x, np.maximum(np.asarray(old, dtype=float), floor), color="0.85", linewidth=0.8)
    ax.plot(x, np.maximum(np.asarray(norms, dtype=float), floor), marker="o", color="tab:blue")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("gradient L2 norm")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return rgba[..., :3].copy()
