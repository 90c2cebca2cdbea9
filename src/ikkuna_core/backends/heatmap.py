"""Depth x step pictures: one per-module metric of a deep model as one heatmap (modules in
forward order down, training steps across, colour = value), which stays readable at
hundreds of modules where one curve per module does not.

:class:`StepGrid` keeps a bounded summary of one topic's per-module values on the host
(at most ``max_columns`` step columns; when full, neighbouring columns merge pairwise into
their mean, so the picture always covers the whole run). :func:`heatmap_figure` draws one,
:func:`heatmap_png` encodes it. Backends (TensorBoard images at close, MLflow artifacts)
and ``ikkuna report`` use them. matplotlib is imported only when a picture is drawn.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["HEATMAP_MODULES", "StepGrid", "heatmap_figure", "heatmap_png", "spans_decades"]

#: Past this many modules a per-module metric is drawn as a heatmap rather than as curves.
HEATMAP_MODULES = 12


class StepGrid:
    """The per-module values of one metric on a bounded grid of step columns: column ``c``
    holds the mean of the values of steps ``c * width`` to ``(c + 1) * width - 1``; the
    width doubles whenever more than ``max_columns`` columns would be needed."""

    __slots__ = ("_cells", "_columns", "max_columns", "width")

    def __init__(self, max_columns: int = 200) -> None:
        if max_columns < 2:
            raise ValueError(f"max_columns must be >= 2, got {max_columns}")
        self.max_columns = max_columns
        self.width = 1
        self._cells: dict[str, dict[int, list[float]]] = {}  # key -> column -> [sum, count]
        self._columns: set[int] = set()

    def add(self, key: str, step: int, value: float) -> None:
        column = step // self.width
        cells = self._cells.get(key)
        if cells is None:
            cells = self._cells[key] = {}
        cell = cells.get(column)
        if cell is None:
            cells[column] = [value, 1.0]
        else:
            cell[0] += value
            cell[1] += 1.0
        if column not in self._columns:
            self._columns.add(column)
            while max(self._columns) - min(self._columns) + 1 > self.max_columns:
                self._halve()

    def _halve(self) -> None:
        self.width *= 2
        self._columns = {c // 2 for c in self._columns}
        for key, cells in self._cells.items():
            merged: dict[int, list[float]] = {}
            for column, (total, count) in cells.items():
                cell = merged.setdefault(column // 2, [0.0, 0.0])
                cell[0] += total
                cell[1] += count
            self._cells[key] = merged

    @property
    def keys(self) -> list[str]:
        """The modules seen, in the order their first value arrived."""
        return list(self._cells)

    def matrix(
        self, order: Sequence[str] | None = None
    ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(modules, step edges, values): ``values[i, j]`` is module ``i``'s mean over the
        steps ``edges[j]`` to ``edges[j + 1]`` (NaN where it has none). Modules follow
        ``order`` (those not in it after, in arrival order)."""
        rank = {key: i for i, key in enumerate(order or ())}
        keys = sorted(self._cells, key=lambda k: rank.get(k, len(rank)))
        if not self._columns:
            return keys, np.zeros(1), np.zeros((len(keys), 0))
        first, last = min(self._columns), max(self._columns)
        edges = np.arange(first, last + 2, dtype=np.float64) * self.width
        values = np.full((len(keys), last - first + 1), np.nan)
        for i, key in enumerate(keys):
            for column, (total, count) in self._cells[key].items():
                values[i, column - first] = total / count
        return keys, edges, values


def spans_decades(values: np.ndarray, decades: float = 2.0) -> bool:
    """Whether the finite values are all positive and span more than ``decades`` powers
    of ten (then a log colour scale shows them; a linear one would show only the largest)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.min() <= 0:
        return False
    return bool(math.log10(finite.max() / finite.min()) > decades)


def heatmap_figure(
    topic: str,
    keys: Sequence[str],
    edges: np.ndarray,
    values: np.ndarray,
    *,
    module_types: Mapping[str, str] | None = None,
    ax: Any = None,
    max_labels: int = 40,
) -> Any:
    """Draw ``values`` (modules x step columns, from :meth:`StepGrid.matrix`) as a heatmap:
    the first module at the top, steps across, a log colour scale when the values span
    decades, NaN/inf cells in grey. Draws into ``ax`` when given (returns its figure),
    otherwise into a new (pyplot-free) Figure sized for the number of modules. At most
    ``max_labels`` modules are named on the y axis (evenly spread)."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure

    n = len(keys)
    if ax is None:
        fig = Figure(figsize=(9, min(3 + 0.06 * n, 14)), dpi=100)
        ax = fig.subplots()
    else:
        fig = ax.figure
    data = np.ma.masked_invalid(values)
    finite = values[np.isfinite(values)]
    if spans_decades(values):
        norm: Any = LogNorm(vmin=float(finite.min()), vmax=float(finite.max()))
        scale = "log scale"
    elif finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)
        scale = "linear scale"
    else:
        norm, scale = Normalize(0.0, 1.0), "no finite value"
    cmap = colormaps["viridis"].with_extremes(bad="0.75")
    mesh = ax.pcolormesh(edges, np.arange(n + 1), data, cmap=cmap, norm=norm, shading="flat")
    ax.set_ylim(n, 0)  # forward order down: the input layer on top
    types = module_types or {}
    every = max(1, math.ceil(n / max_labels))
    ticks = list(range(0, n, every))
    ax.set_yticks([t + 0.5 for t in ticks])
    ax.set_yticklabels(
        [f"{keys[t]} ({types[keys[t]]})" if keys[t] in types else keys[t] for t in ticks],
        fontsize=6 if n > 20 else 8,
    )
    ax.set_xlabel("training step", fontsize=8)
    ax.set_ylabel(f"module, in forward order ({n})", fontsize=8)
    ax.set_title(topic, fontsize=10, fontweight="bold")
    ax.tick_params(axis="x", labelsize=7)
    bar = fig.colorbar(mesh, ax=ax, pad=0.01)
    bar.set_label(f"{topic.split('/')[0]} ({scale})", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return fig


def heatmap_png(
    topic: str,
    grid: StepGrid,
    *,
    module_types: Mapping[str, str] | None = None,
) -> bytes:
    """The heatmap of ``grid`` (modules in the order of ``module_types``, the model's) as
    PNG bytes, drawn off-screen (no pyplot figure, so a live window is left alone)."""
    keys, edges, values = grid.matrix(list(module_types or ()))
    fig = heatmap_figure(topic, keys, edges, values, module_types=module_types)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor="white")
    return buffer.getvalue()
