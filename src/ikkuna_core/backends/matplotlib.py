"""matplotlib backend: PNG figures written headless (Agg), one per metric topic, redrawn as
training goes.

Scalars: ``<topic>.png`` with one line per module (coloured along viridis in model order,
with a colour bar instead of a legend when there are many) or per key (``train`` blue,
``test`` orange); sparse series get markers, so a single point is visible. Histograms:
``<topic>.png`` with one "colorful dimension" panel per module (training step on x, value on
y, colour = log count), so a glance shows how a distribution drifts, saturates or dies over
the run. Modules are labelled with their class, ``layer1.0.conv1 (Conv2d)``, once
:meth:`MatplotlibBackend.describe_modules` has told the backend the classes.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .base import Backend, HistogramRecord, ScalarRecord

__all__ = ["MatplotlibBackend", "colorful_dimension", "figure_path", "series_color"]

_MAX_LEGEND = 12
_IMAGE_BINS = 64
#: A series with at most this many points is drawn with markers.
_SPARSE = 30


def series_color(key: str, index: int, count: int, per_module: bool) -> Any:
    """The colour of line ``index`` of ``count`` in one plot: modules along viridis in
    model order; otherwise ``train`` blue, ``test`` orange, the rest from tab10. Shared by
    the figures and dashboards, so a metric looks the same everywhere."""
    from matplotlib import colormaps

    if per_module:
        return colormaps["viridis"](0.9 * index / max(count - 1, 1)) if count > 1 else "tab:blue"
    last = key.rsplit("/", 1)[-1].lower()
    if "train" in last:
        return "tab:blue"
    if "test" in last:
        return "tab:orange"
    return ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink")[index % 5]


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
        self._module_types: dict[str, str] = {}

    def describe_modules(self, modules: Mapping[str, str]) -> None:
        self._module_types = dict(modules)

    def _in_model_order(self, keys: Mapping[str, object]) -> list[str]:
        """Modules in the model's order (results arrive in backward order), others after."""
        order = {key: i for i, key in enumerate(self._module_types)}
        return sorted(keys, key=lambda k: order.get(k, len(order)))

    def _label(self, key: str) -> str:
        kind = self._module_types.get(key)
        return f"{key} ({kind})" if kind else key

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
            written.append(self._save(self.figure(topic), topic))
        self._dirty.clear()
        self._last_draw = self._last_step
        return written

    def figure(self, topic: str) -> Any:
        """The matplotlib Figure of ``topic`` as :meth:`draw` saves it (close it with
        ``matplotlib.pyplot.close`` when done)."""
        if topic in self._scalars:
            return self._scalar_figure(topic)
        if topic in self._hists:
            return self._histogram_figure(topic)
        raise KeyError(f"nothing recorded for topic {topic!r}")

    def _scalar_figure(self, topic: str) -> Any:
        plt = self._plt
        series = self._scalars[topic]
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        n = len(series)
        per_module = any(key in self._module_types for key in series)
        for i, key in enumerate(self._in_model_order(series)):
            steps, values = zip(*series[key], strict=True)
            ax.plot(
                steps,
                values,
                label=self._label(key),
                color=series_color(key, i, n, per_module),
                linewidth=1.2,
                marker="o" if len(steps) <= _SPARSE else None,
                markersize=4,
            )
        ax.set_title(topic)
        ax.set_xlabel("training step")
        # per module: the metric's name (``max_abs`` of ``max_abs/weights``); per key: the last
        # part (``error`` of ``epoch/error``)
        ax.set_ylabel(topic.split("/")[0] if per_module else topic.rsplit("/", 1)[-1])
        ax.grid(alpha=0.3)
        if n > _MAX_LEGEND and per_module:
            bar = fig.colorbar(
                plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, (n - 1) / 0.9)),
                ax=ax,
                pad=0.01,
            )
            bar.set_label(f"module, in model order ({n})")
        elif n > 1 or next(iter(series)) != topic:
            ax.legend(fontsize="small", loc="best", ncols=1 if n <= _MAX_LEGEND else 2)
        return fig

    def _histogram_figure(self, topic: str) -> Any:
        plt = self._plt
        series = self._hists[topic]
        n = len(series)
        cols = min(n, 4)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), dpi=90, squeeze=False)
        for ax, key in zip(axes.flat, self._in_model_order(series), strict=False):
            hists = series[key]
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
            ax.set_title(self._label(key), fontsize="small")
            ax.set_xlabel("training step", fontsize="small")
            ax.set_ylabel("value", fontsize="small")
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(topic)
        return fig

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
