"""matplotlib backend: PNG figures written headless (Agg), one per metric topic, redrawn as
training goes.

Scalars: ``<topic>.png`` with one line per module (coloured along viridis in model order,
with a colour bar instead of a legend when there are many) or per key (``train`` blue,
``test`` orange); sparse series get markers, so a single point is visible. Histograms:
``<topic>.png`` with one "colorful dimension" panel per module (training step on x, value on
y, colour = log count), so a glance shows how a distribution drifts, saturates or dies over
the run. Modules are labelled with their class, ``layer1.0.conv1 (Conv2d)``, once
:meth:`MatplotlibBackend.describe_modules` has told the backend the classes.

Memory is bounded whatever the run's length: each tag keeps at most ``max_points`` scalar
points and ``max_columns`` histogram columns. When a tag's store is full, neighbours are
merged pairwise (a point becomes the mean, with the min and max, of the values it stands
for; a column the average distribution of its steps), so the figures always show the whole
run, at a resolution that halves each time the run doubles.
"""

from __future__ import annotations

import gc
import math
import re
from array import array
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Protocol

import numpy as np
from pydantic import Field

from .base import Backend, HistogramRecord, ScalarRecord

__all__ = ["MatplotlibBackend", "colorful_dimension", "figure_path", "series_color"]

_MAX_LEGEND = 12
_IMAGE_BINS = 64
#: A scalar series with at most this many points is drawn with markers, so that a sparse
#: series (a test accuracy every few hundred steps, a single point) is visible.
_MARKER_POINTS = 30


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
    """Keeps a bounded summary of each metric on the host and redraws its PNGs once
    ``plot_every`` training steps have passed since the last drawing, and on close. Drawing
    costs tens of milliseconds per figure, so it is kept off most steps."""

    name = "matplotlib"
    files = ("figures/*.png",)

    def __init__(
        self,
        log_dir: str | Path,
        plot_every: Annotated[int, Field(ge=1)] = 500,
        max_points: Annotated[int, Field(ge=2)] = 1000,
        max_columns: Annotated[int, Field(ge=2)] = 200,
        show: bool = False,
    ) -> None:
        super().__init__(log_dir)
        for option, value, least in (
            ("plot_every", plot_every, 1),
            ("max_points", max_points, 2),
            ("max_columns", max_columns, 2),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{option} must be a whole number >= {least}, got {value!r}")
        import matplotlib

        self._window: Any = None
        if show:  # a live window (backends/live.py); files are written all the same
            from .live import open_window

            self._window = open_window()
        else:
            matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        self._plt = plt
        self.plot_every = plot_every
        self.max_points = max_points
        self.max_columns = max_columns
        self._scalars: dict[str, dict[str, _ScalarSeries]] = defaultdict(dict)
        self._hists: dict[str, dict[str, _HistogramSeries]] = defaultdict(dict)
        self._dirty: set[str] = set()
        self._last_draw = 0
        self._last_step = 0
        self._module_types: dict[str, str] = {}

    def write_scalars(self, records: Sequence[ScalarRecord]) -> None:
        for r in records:
            series = self._scalars[r.topic]
            key = r.key or r.topic
            line = series.get(key)
            if line is None:
                line = series[key] = _ScalarSeries(self.max_points)
            line.add(r.step, r.value)
            self._dirty.add(r.topic)
            self._last_step = max(self._last_step, r.step)

    def write_histograms(self, records: Sequence[HistogramRecord]) -> None:
        for r in records:
            series = self._hists[r.topic]
            key = r.key or r.topic
            image = series.get(key)
            if image is None:
                image = series[key] = _HistogramSeries(self.max_columns)
            image.add(r.step, r.edges, r.counts)
            self._dirty.add(r.topic)
            self._last_step = max(self._last_step, r.step)

    def flush(self) -> None:
        if self._last_step - self._last_draw >= self.plot_every:
            self.draw()

    def close(self) -> None:
        self.draw()
        if self._window is not None:
            self._window.close()

    # ------------------------------------------------------------- the summaries
    def scalar_points(
        self, topic: str, key: str | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What the figure of ``topic`` draws for ``key`` (None: a network-level metric):
        the points' steps, mean values, minima and maxima (each point stands for one or
        more consecutive values)."""
        s = self._scalars[topic][key or topic]
        return (np.array(s.steps), np.array(s.means), np.array(s.lows), np.array(s.highs))

    def histogram_image(
        self, topic: str, key: str | None = None
    ) -> tuple[np.ndarray, np.ndarray, float, float]:
        """What the figure of ``topic`` draws for ``key``: the colorful-dimension image (rows
        are values from ``lo`` to ``hi``, columns fractions per stored column), the step
        boundaries of the columns (one more than columns), ``lo`` and ``hi``."""
        columns = self._hists[topic][key or topic].columns
        image, lo, hi = colorful_dimension(columns)
        bounds = np.array([c.first for c in columns] + [columns[-1].last + 1], dtype=float)
        return image, bounds, lo, hi

    # ------------------------------------------------------------------ drawing
    def draw(self) -> list[Path]:
        """Redraw every figure whose data changed; returns the paths written.

        A closed figure is a web of reference cycles (figure, axes, artists, transforms,
        canvas and its pixel buffer) that only the cyclic collector frees, and its objects
        reach the oldest generation while it is drawn: without help, the garbage of dozens
        of figures piles up before a full collection, and the process keeps that high-water
        mark (+66 MiB RSS at the first drawing of the 117 figures of the ``everything``
        configuration on a small MLP; +7 MiB with this). So the objects that exist before
        the drawing are frozen (``gc.freeze``), and each figure is collected as soon as it
        is saved: a collection that scans only the objects made since, cheap. Skipped when
        the collector is off, or when the program froze objects itself."""
        written = []
        collect = gc.isenabled() and gc.get_freeze_count() == 0
        if collect:
            gc.freeze()
        try:
            for topic in sorted(self._dirty):
                if topic in self._scalars:
                    written.append(self._save(self._scalar_figure(topic), topic))
                    if collect:
                        gc.collect()
                if topic in self._hists:
                    written.append(self._save(self._histogram_figure(topic), topic))
                    if collect:
                        gc.collect()
            self._dirty.clear()
            self._last_draw = self._last_step
            if self._window is not None:
                self._window.update(sorted(self._scalars), self._live_panel, self._last_step)
                if collect:
                    gc.collect()
        finally:
            if collect:
                gc.unfreeze()
        return written

    def _live_panel(self, ax: Any, topic: str) -> None:
        from .live import draw_lines

        series = self._scalars[topic]
        keys = self._in_model_order(series)
        per_module = any(key in self._module_types for key in series)
        lines = []
        for i, key in enumerate(keys):
            steps, means, _, _ = self.scalar_points(topic, key)
            lines.append((key, steps, means, series_color(key, i, len(keys), per_module)))
        draw_lines(ax, topic, lines)

    def describe_modules(self, modules: Mapping[str, str]) -> None:
        self._module_types = dict(modules)

    def _in_model_order(self, keys: Mapping[str, object]) -> list[str]:
        """Modules in the model's order (results arrive in backward order), others after."""
        order = {key: i for i, key in enumerate(self._module_types)}
        return sorted(keys, key=lambda k: order.get(k, len(order)))

    def _label(self, key: str) -> str:
        kind = self._module_types.get(key)
        return f"{key} ({kind})" if kind else key

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
            steps, means, lows, highs = self.scalar_points(topic, key)
            color = series_color(key, i, n, per_module)
            sparse = series[key].width == 1 and len(steps) <= _MARKER_POINTS
            marker = "o" if sparse else None
            ax.plot(steps, means, label=self._label(key), color=color, linewidth=1.2,
                    marker=marker, ms=4)
            if series[key].width > 1:  # merged points: show the range they stand for
                ax.fill_between(steps, lows, highs, color=color, alpha=0.2, linewidth=0)
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
            image, bounds, lo, hi = self.histogram_image(topic, key)
            ax.pcolormesh(
                bounds,
                np.linspace(lo, hi, image.shape[0] + 1),
                np.log1p(image * 1000.0),
                cmap="magma",
                shading="flat",
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


class _ScalarSeries:
    """At most ``cap`` points; every point but the newest stands for ``width`` consecutive
    values (the newest for at most ``width``): its mean step, mean value, min and max.

    The columns are ``array.array`` of unboxed 8-byte numbers: 40 bytes a point, where lists
    of Python floats took 68 (boxed floats and five list slots; more once points merge)."""

    __slots__ = ("cap", "counts", "highs", "lows", "means", "steps", "width")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.width = 1
        self.steps = array("d")
        self.means = array("d")
        self.lows = array("d")
        self.highs = array("d")
        self.counts = array("q")

    def add(self, step: int, value: float) -> None:
        if self.counts and self.counts[-1] < self.width:
            self._merge_into(-1, float(step), value, value, value, 1)
            return
        self.steps.append(float(step))
        self.means.append(value)
        self.lows.append(value)
        self.highs.append(value)
        self.counts.append(1)
        if len(self.counts) > self.cap:
            self._halve()

    def _merge_into(self, i: int, step: float, mean: float, lo: float, hi: float, n: int) -> None:
        m = self.counts[i]
        total = m + n
        self.steps[i] = (self.steps[i] * m + step * n) / total
        self.means[i] = (self.means[i] * m + mean * n) / total  # NaN stays visible as a gap
        self.lows[i] = _fmin(self.lows[i], lo)
        self.highs[i] = -_fmin(-self.highs[i], -hi)
        self.counts[i] = total

    def _halve(self) -> None:
        """Merge neighbours pairwise: half the points, each for twice the values."""
        keep = 0
        for i in range(0, len(self.counts), 2):
            self.steps[keep] = self.steps[i]
            self.means[keep] = self.means[i]
            self.lows[keep] = self.lows[i]
            self.highs[keep] = self.highs[i]
            self.counts[keep] = self.counts[i]
            if i + 1 < len(self.counts):
                j = i + 1
                self._merge_into(
                    keep, self.steps[j], self.means[j], self.lows[j], self.highs[j],
                    self.counts[j],
                )
            keep += 1
        for values in (self.steps, self.means, self.lows, self.highs, self.counts):
            del values[keep:]
        self.width *= 2


def _fmin(a: float, b: float) -> float:
    """The smaller of ``a`` and ``b``, ignoring a NaN (as ``numpy.fmin``)."""
    if b != b:
        return a
    return b if a != a or b < a else a


class _Column:
    """One column of a colorful-dimension image: the summed per-step distributions (each
    normalised to 1) of ``n`` consecutive histograms, on ``edges`` (``grid``: edges are a
    uniform grid of ``_IMAGE_BINS`` bins made by merging, rather than a record's own)."""

    __slots__ = ("counts", "edges", "first", "grid", "last", "n")

    def __init__(
        self,
        first: int,
        last: int,
        n: int,
        edges: np.ndarray,
        counts: np.ndarray,
        grid: bool = False,
    ) -> None:
        self.first = first
        self.last = last
        self.n = n
        self.edges = edges
        self.counts = counts
        self.grid = grid


class _HistogramSeries:
    """At most ``cap`` columns; every column but the newest holds ``width`` consecutive
    histograms (the newest at most ``width``)."""

    __slots__ = ("cap", "columns", "width")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.width = 1
        self.columns: list[_Column] = []

    def add(self, step: int, edges: np.ndarray, counts: np.ndarray) -> None:
        # Copies: a record's arrays are views into the flush's one host buffer, which must
        # not be kept alive.
        counts = np.array(counts, dtype=np.float64)
        total = counts.sum()
        fractions = counts / total if total > 0 else np.zeros_like(counts)
        column = _Column(step, step, 1, np.array(edges, dtype=np.float64), fractions)
        if self.columns and self.columns[-1].n < self.width:
            self.columns[-1] = _merge_columns(self.columns[-1], column)
            return
        self.columns.append(column)
        if len(self.columns) > self.cap:
            cols = self.columns
            self.columns = [
                _merge_columns(cols[i], cols[i + 1]) if i + 1 < len(cols) else cols[i]
                for i in range(0, len(cols), 2)
            ]
            self.width *= 2


def _merge_columns(a: _Column, b: _Column) -> _Column:
    """Two neighbouring columns as one: on their common edges when they share them (exact),
    on ``a``'s grid when that spans ``b`` (the usual case while a column fills), otherwise
    both re-binned onto ``_IMAGE_BINS`` bins spanning both ranges."""
    grid = a.grid
    if not b.counts.any():  # an empty histogram (all values non-finite) has no range
        edges, counts = a.edges, a.counts
    elif not a.counts.any():
        edges, counts, grid = b.edges, b.counts, b.grid
    elif a.grid and a.edges[0] <= b.edges[0] and b.edges[-1] <= a.edges[-1]:
        edges, counts = a.edges, a.counts + _spread(b.edges, b.counts, a.edges)
    elif np.array_equal(a.edges, b.edges):  # False for different shapes too
        edges, counts = a.edges, a.counts + b.counts
    else:
        lo = min(a.edges[0], b.edges[0])
        hi = max(a.edges[-1], b.edges[-1])
        if hi > lo:
            edges, grid = np.linspace(lo, hi, _IMAGE_BINS + 1), True
            counts = _spread(a.edges, a.counts, edges) + _spread(b.edges, b.counts, edges)
        else:  # both constant at the same value: one point
            edges, counts = np.array([lo, lo]), np.array([a.counts.sum() + b.counts.sum()])
    return _Column(a.first, b.last, a.n + b.n, edges, counts, grid)


class _Bins(Protocol):
    @property
    def edges(self) -> np.ndarray: ...
    @property
    def counts(self) -> np.ndarray: ...


def _spread(edges: np.ndarray, counts: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``counts`` on ``edges`` re-binned onto ``grid`` (which spans them): each bin's mass
    spread evenly over its width, by interpolating the cumulative counts at the grid's
    edges, so no grid row is left empty between source bins. Zero-width bins (a constant
    tensor: zero biases, a dead layer) go in as points."""
    point = np.diff(edges) <= 0
    cumulative = np.empty(len(edges))
    cumulative[0] = 0.0
    has_points = point.any()
    np.cumsum(np.where(point, 0.0, counts) if has_points else counts, out=cumulative[1:])
    column = np.diff(np.interp(grid, edges, cumulative))
    if has_points:
        column += np.histogram(edges[:-1][point], bins=grid, weights=counts[point])[0]
    return column


def colorful_dimension(hists: Sequence[_Bins]) -> tuple[np.ndarray, float, float]:
    """The "colorful dimension" image of a histogram series: every step's histogram re-binned
    onto one common value grid (rows are values, columns steps), each column normalised to
    fractions. Returns the image and the grid's value range, which spans the histograms
    that hold any count (an empty one, of only non-finite values, has no range)."""
    ranged = [h for h in hists if np.any(h.counts)] or list(hists)
    lo = min(float(h.edges[0]) for h in ranged)
    hi = max(float(h.edges[-1]) for h in ranged)
    if not hi > lo:
        hi = lo + 1.0
    grid = np.linspace(lo, hi, _IMAGE_BINS + 1)
    image = np.zeros((_IMAGE_BINS, len(hists)))
    for j, h in enumerate(hists):
        column = _spread(h.edges, h.counts, grid)
        total = column.sum()
        image[:, j] = column / total if total > 0 else column
    return image, lo, hi
