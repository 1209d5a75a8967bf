"""Pictures of gradient flow (matplotlib, Agg canvas, no pyplot): the layer × step heatmap and the per-step
flow line. Both return ``(H, W, 3)`` uint8 arrays for TensorBoard; :func:`gradient_heatmap_figure` returns
the matplotlib ``Figure`` itself (``gradguard report --png`` saves it, tests read its tick labels).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

#: below this the heatmap's colour scale stops (a gradient of exactly 0 is drawn at the floor)
LOG10_FLOOR = -30.0


def _log10(values: Sequence[Sequence[Optional[float]]]) -> np.ma.MaskedArray:
    """log10 of a (layers, steps) table; None/NaN/Inf are masked (drawn in the 'bad' colour), 0 goes to the floor."""
    a = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    bad = ~np.isfinite(a)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log10(np.abs(np.where(bad, 1.0, a)))
    out = np.maximum(out, LOG10_FLOOR)
    return np.ma.masked_array(out, mask=bad)


def _layer_font(n: int) -> float:
    return 8.0 if n <= 30 else (6.0 if n <= 80 else 4.5)


def gradient_heatmap_figure(
    names: Sequence[str],
    steps: Sequence[int],
    grad_norms: Sequence[Sequence[Optional[float]]],
    update_ratios: Optional[Sequence[Sequence[Optional[float]]]] = None,
    title: str = "gradient flow",
) -> Any:
    """A layer × step heatmap of log10 gradient L2 norm (and, when given, of log10 update ratio ‖Δw‖/‖w‖).

    Rows are layers in forward order (the first layer on top), one labelled row each; columns are the
    logged steps. Non-finite values are drawn in red. The figure grows with the number of layers so that
    200 layer names stay readable (about 9 px a row).

    Args:
        names: layer names, forward order.
        steps: the logged steps (columns).
        grad_norms: ``grad_norms[i][j]`` is layer ``i``'s gradient norm at ``steps[j]`` (None: not logged).
        update_ratios: same shape, optional second panel.
        title: figure title.

    Example:
        >>> fig = gradient_heatmap_figure(["net.1", "net.3"], [0, 10], [[1e-6, 1e-7], [0.2, 0.1]])
        >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]
        ['net.1', 'net.3']
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, m = len(names), max(1, len(steps))
    panels = [("gradient L2 norm", grad_norms)]
    if update_ratios is not None:
        panels.append(("update ratio ‖Δw‖/‖w‖", update_ratios))
    row_in = 0.2 if n <= 30 else (0.12 if n <= 80 else 0.09)
    longest = max((len(s) for s in names), default=4)
    height = max(3.2, row_in * n + 1.6)
    width = 1.5 + 0.065 * longest * _layer_font(n) / 8 + 4.5 * len(panels)  # room for the names
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    # NaN/Inf red; exactly 0 (e.g. an update below float precision) black, outside the colour scale
    cmap = colormaps["viridis"].with_extremes(bad="red", under="black")
    for k, (ax, (label, table)) in enumerate(zip(axes, panels)):
        data = _log10(table) if n else np.ma.masked_array(np.zeros((0, m)))
        values = data.compressed()
        nonzero = values[values > LOG10_FLOOR]
        zeros = bool((values <= LOG10_FLOOR).any())
        vmin, vmax = (float(nonzero.min()), float(nonzero.max())) if nonzero.size else (-1.0, 0.0)
        if vmax - vmin < 1e-9:
            vmin, vmax = vmin - 0.5, vmax + 0.5
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax,
                       extent=(-0.5, m - 0.5, n - 0.5, -0.5))
        cbar = fig.colorbar(im, ax=ax, fraction=0.08 if n <= 30 else 0.04, pad=0.02, extend="min" if zeros else "neither")
        cbar.set_label(f"log10 {label}" + (" (black: 0)" if zeros else ""), fontsize=8)
        cbar.ax.tick_params(labelsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ticks = np.unique(np.linspace(0, m - 1, num=min(m, 8)).round().astype(int)) if steps else []
        ax.set_xticks(list(ticks))
        ax.set_xticklabels([str(steps[t]) for t in ticks], fontsize=7)
        if k == 0:
            ax.set_yticks(range(n))
            ax.set_yticklabels(list(names), fontsize=_layer_font(n))
            ax.set_ylabel("layer (forward order)")
    import textwrap

    fig.suptitle(textwrap.fill(title, width=int(width * 13)), fontsize=9)
    fig.tight_layout()
    return fig


def figure_to_image(fig: Any) -> np.ndarray:
    """Render a matplotlib ``Figure`` (with an Agg canvas) to an ``(H, W, 3)`` uint8 array."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def gradient_heatmap_image(
    names: Sequence[str],
    steps: Sequence[int],
    grad_norms: Sequence[Sequence[Optional[float]]],
    update_ratios: Optional[Sequence[Sequence[Optional[float]]]] = None,
    title: str = "gradient flow",
) -> np.ndarray:
    """:func:`gradient_heatmap_figure` rendered to an ``(H, W, 3)`` uint8 image (for TensorBoard's Images tab).

    Example:
        >>> img = gradient_heatmap_image(["net.1", "net.3"], [0, 10], [[1e-6, 1e-7], [0.2, 0.1]])
        >>> img.shape[2]
        3
    """
    return figure_to_image(gradient_heatmap_figure(names, steps, grad_norms, update_ratios, title))


def gradient_flow_image(
    names: Sequence[str], norms: Sequence[float], title: str = "gradient flow",
    history: Optional[Sequence[Sequence[float]]] = None,
) -> np.ndarray:
    """Per-layer gradient norms of one step (log scale, forward order) as an ``(H, W, 3)`` uint8 image.

    ``history`` (earlier steps' norms, oldest first) is drawn behind the current line, from light to dark
    grey so the trend shows.

    Example:
        >>> img = gradient_flow_image(["net.1", "net.3"], [1e-6, 0.2])
        >>> img.shape[2]
        3
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(names)
    fig = Figure(figsize=(min(24.0, max(6.0, 0.18 * n + 2.5)), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(n)
    floor = 10.0 ** LOG10_FLOOR
    old = list(history or [])
    for i, h in enumerate(old):
        shade = 0.85 - 0.45 * (i + 1) / len(old)
        ax.plot(x, np.maximum(np.asarray(h, dtype=float), floor), color=str(round(shade, 2)), linewidth=0.9)
    ax.plot(x, np.maximum(np.asarray(norms, dtype=float), floor), marker="o", markersize=3, color="tab:blue")
    ax.set_yscale("log")
    step = max(1, math.ceil(n / 60))  # at most ~60 labels; every layer up to 60
    ax.set_xticks(x[::step])
    ax.set_xticklabels(list(names)[::step], rotation=90, fontsize=7)
    ax.set_ylabel("gradient L2 norm")
    ax.set_xlabel("layer (forward order)" + (f", every {step}th labelled" if step > 1 else ""))
    ax.set_title(title + (" (grey: earlier logging steps, darker = more recent)" if old else ""), fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    return figure_to_image(fig)
