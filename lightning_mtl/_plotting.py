"""Matplotlib figures as pictures for the loggers' image APIs; matplotlib is optional (the plots extra)."""

from __future__ import annotations

from typing import Any


def figure_class() -> Any:
    """matplotlib's ``Figure`` (no pyplot, so no global state or GUI backend), or None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def figure_to_rgb(figure: Any) -> Any:
    """The figure rendered to an ``[H, W, 3]`` uint8 array (what every logger's image API takes; W&B casts
    float pixels to uint8 as they are, so a [0, 1] float picture comes out black)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
