"""matplotlib backend: PNG figures written headless (Agg), one per metric topic, redrawn as
training goes.

Scalars: ``<topic>.png`` with one line per module. Histograms: ``<topic>.png`` with one
"colorful dimension" panel per module (training step on x, value on y, colour = log count),
so a glance shows how a distribution drifts, saturates or dies over the run.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from .base import Backend, HistogramRecord, ScalarRecord

__all__ = ["MatplotlibBackend", "colorful_dimension", "figure_path"]

_MAX_LEGEND = 12
_IMAGE_BINS = 64


def figure_path(log_dir: str | Path, topic: str) -> Path:
    """Where the figure of ``topic`` is written: ``<log_dir>/figures/<topic with / as __>.png``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "__", topic)
    return Path(log_dir) / "figures" / f"{safe}.png"


class MatplotlibBackend(Backend):
    """Keeps each metric's history on the host and redraws its PNGs once ``plot_every``
    training steps have passed since the last drawing, and on close. Drawing costs tens of
    milliseconds per figure, so it is kept off most steps."""

    name = "matplotlib"

    def __init__(self, log_dir: str | Path, plot_every: int = 500) -> None:
        super().__init__(log_dir)
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        self._plt = plt
        self.plot_every = plot_every
        self._scalars: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(
            lambda: defaultdict(list)
        )
        self._hists: dict[str, dict[str, list[HistogramRecord]]] = defaultdict(
            lambda: defaultdict(list)
        )
        self._dirty: set[str] = set()
        self._last_draw = 0
        self._last_step = 0

    def write_scalars(self, records: Sequence[ScalarRecord]) -> None:
        for r in records:
            self._scalars[r.topic][r.key or r.topic].append((r.step, r.value))
            self._dirty.add(r.topic)
            self._last_step = max(self._last_step, r.step)

    def write_histograms(self, records: Sequence[HistogramRecord]) -> None:
        for r in records:
            self._hists[r.topic][r.key or r.topic].append(r)
            self._dirty.add(r.topic)
            self._last_step = max(self._last_step, r.step)

    def flush(self) -> None:
        if self._last_step - self._last_draw >= self.plot_every:
            self.draw()

    def close(self) -> None:
        self.draw()

    def draw(self) -> list[Path]:
        """Redraw every figure whose data changed; returns the paths written."""
        written = []
        for topic in sorted(self._dirty):
            if topic in self._scalars:
                written.append(self._draw_scalars(topic))
            if topic in self._hists:
                written.append(self._draw_histograms(topic))
        self._dirty.clear()
        self._last_draw = self._last_step
        return written

    def _draw_scalars(self, topic: str) -> Path:
        plt = self._plt
        series = self._scalars[topic]
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        cmap = plt.get_cmap("viridis")
        n = len(series)
        for i, (key, points) in enumerate(series.items()):
            steps, values = zip(*points, strict=True)
            color = cmap(i / max(n - 1, 1)) if n > 1 else "tab:blue"
            ax.plot(steps, values, label=key, color=color, linewidth=1.2)
        ax.set_title(topic)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if 1 < n <= _MAX_LEGEND:
            ax.legend(fontsize="small", loc="best")
        return self._save(fig, topic)

    def _draw_histograms(self, topic: str) -> Path:
        plt = self._plt
        series = self._hists[topic]
        n = len(series)
        cols = min(n, 4)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), dpi=90, squeeze=False)
        for ax, (key, hists) in zip(axes.flat, series.items(), strict=False):
            image, lo, hi = colorful_dimension(hists)
            steps = [h.step for h in hists]
            ax.imshow(
                np.log1p(image * 1000.0),
                aspect="auto",
                origin="lower",
                extent=(min(steps), max(steps) + 1, lo, hi),
                cmap="magma",
                interpolation="nearest",
            )
            ax.set_title(key, fontsize="small")
            ax.set_xlabel("step", fontsize="small")
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(topic)
        return self._save(fig, topic)

    def _save(self, fig: object, topic: str) -> Path:
        path = figure_path(self.log_dir, topic)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()  # type: ignore[attr-defined]
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp)  # type: ignore[attr-defined]
        tmp.replace(path)  # readers never see a half-written figure
        self._plt.close(fig)  # type: ignore[arg-type]
        return path


class _Bins(Protocol):
    @property
    def edges(self) -> np.ndarray: ...
    @property
    def counts(self) -> np.ndarray: ...


def colorful_dimension(hists: Sequence[_Bins]) -> tuple[np.ndarray, float, float]:
    """The "colorful dimension" image of a histogram series: every step's histogram re-binned
    onto one common value grid (rows are values, columns steps), each column normalised to
    fractions. Returns the image and the grid's value range."""
    lo = min(float(h.edges[0]) for h in hists)
    hi = max(float(h.edges[-1]) for h in hists)
    if not hi > lo:
        hi = lo + 1.0
    grid = np.linspace(lo, hi, _IMAGE_BINS + 1)
    image = np.zeros((_IMAGE_BINS, len(hists)))
    for j, h in enumerate(hists):
        # Each bin's mass spread evenly over its width: interpolate the cumulative counts
        # at the common grid's edges, so no grid row is left empty between source bins.
        # Zero-width bins (a constant tensor: zero biases, a dead layer) go in as points.
        point = np.diff(h.edges) <= 0
        cumulative = np.concatenate([[0.0], np.cumsum(np.where(point, 0.0, h.counts))])
        column = np.diff(np.interp(grid, h.edges, cumulative))
        if point.any():
            column += np.histogram(h.edges[:-1][point], bins=grid, weights=h.counts[point])[0]
        total = column.sum()
        image[:, j] = column / total if total > 0 else column
    return image, lo, hi
