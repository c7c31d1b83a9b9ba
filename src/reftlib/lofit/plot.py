"""The layer x head heatmap of LoFiT head scores, selected heads marked (matplotlib, imported lazily).

matplotlib is an optional dependency (``pip install "reftlib[plot]"``); nothing in reftlib imports it
until a plot is asked for. The figure is drawn with matplotlib's object API and the Agg canvas, so
it never touches pyplot's global state or the interactive backend of a notebook.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from ..errors import MissingDependencyError, ReftError

__all__ = ["MissingDependencyError", "plot_head_scores"]


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError(
            'plotting head scores needs matplotlib: pip install "reftlib[plot]" (or pip install matplotlib)'
        ) from exc
    return Figure, FigureCanvasAgg


def plot_head_scores(
    scores: torch.Tensor | Sequence[Sequence[float]],
    path: str | os.PathLike,
    selected: Iterable[Sequence[int]] | None = None,
    title: str | None = None,
    dpi: int = 150,
) -> Path:
    """Save a heatmap of ``scores`` (``[num_layers, num_heads]``) to ``path`` (PNG, or any format by suffix).

    Layers run upwards on the y axis, heads along x; each ``(layer, head)`` in ``selected`` is
    outlined. Returns the path written.
    """
    figure_cls, canvas_cls = _matplotlib()
    values = torch.as_tensor(scores, dtype=torch.float32).detach().cpu()
    if values.dim() != 2:
        raise ReftError(f"scores must be [num_layers, num_heads], got shape {tuple(values.shape)}")
    layers, heads = values.shape
    fig = figure_cls(figsize=(min(2.5 + 0.45 * heads, 14), min(1.8 + 0.2 * layers, 14)))
    canvas_cls(fig)
    ax = fig.subplots()
    image = ax.imshow(values.numpy(), aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="score ‖A‖₂")
    chosen = [tuple(h) for h in (selected or [])]
    for layer, head in chosen:
        ax.add_patch(_rectangle(head - 0.5, layer - 0.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    step = max(1, layers // 15)
    ax.set_yticks(range(0, layers, step))
    ax.set_title(title or (f"LoFiT head scores ({len(chosen)} of {layers * heads} heads selected)" if chosen
                           else "LoFiT head scores"))
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=dpi)
    return target


def _rectangle(x: float, y: float):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), 1, 1, fill=False, edgecolor="red", linewidth=1.6)
