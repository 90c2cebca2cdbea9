"""The matplotlib backend keeps a bounded summary per tag (issue 11: memory): at most
``max_points`` scalar points and ``max_columns`` histogram columns, merged pairwise as the run
grows, while the figures still show the whole run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ikkuna_core.backends.base import HistogramRecord, ScalarRecord
from ikkuna_core.backends.matplotlib import MatplotlibBackend, figure_path

pytest.importorskip("matplotlib")


def scalar(step: int, value: float, topic: str = "loss", key: str | None = None) -> ScalarRecord:
    tag = topic if key is None else f"{topic}/{key}"
    return ScalarRecord(topic=topic, key=key, tag=tag, step=step, value=value)


def histogram(step: int, edges: np.ndarray, counts: np.ndarray, key: str = "fc") -> HistogramRecord:
    return HistogramRecord(
        topic="hist/activations",
        key=key,
        tag=f"hist/activations/{key}",
        step=step,
        counts=counts,
        edges=edges,
        min=float(edges[0]),
        max=float(edges[-1]),
        num=float(counts.sum()),
        sum=0.0,
        sum_squares=0.0,
        nonfinite=0.0,
    )


def width_for(n: int, cap: int) -> int:
    """Records per point after ``n`` writes: the smallest power of two that fits ``n``
    records into ``cap`` points."""
    width = 1
    while math.ceil(n / width) > cap:
        width *= 2
    return width


def test_scalar_points_stay_bounded_and_are_means_of_neighbours(tmp_path: Path) -> None:
    backend = MatplotlibBackend(tmp_path, plot_every=10**9, max_points=64)
    n = 10_000
    values = np.sin(np.arange(n) / 300.0) * 10 + np.arange(n) / 1000.0
    for start in range(0, n, 100):  # as the bus flushes: batches of records
        backend.write_scalars([scalar(s, float(values[s])) for s in range(start, start + 100)])
    steps, means, lows, highs = backend.scalar_points("loss")
    assert len(steps) <= 64
    width = width_for(n, 64)
    groups = [np.arange(s, min(s + width, n)) for s in range(0, n, width)]
    assert len(steps) == len(groups)
    assert steps == pytest.approx([g.mean() for g in groups])
    assert means == pytest.approx([values[g].mean() for g in groups])
    assert lows == pytest.approx([values[g].min() for g in groups])
    assert highs == pytest.approx([values[g].max() for g in groups])


def test_sparse_series_are_drawn_with_markers(tmp_path: Path) -> None:
    backend = MatplotlibBackend(tmp_path, plot_every=10**9)
    backend.write_scalars([scalar(s, 1.0 - s / 1000, "test_accuracy") for s in (0, 250, 500)])
    backend.write_scalars([scalar(s, 0.5, "single") for s in (7,)])
    backend.write_scalars([scalar(s, float(s), "dense") for s in range(2000)])
    for topic, marker, points in (("test_accuracy", "o", 3), ("single", "o", 1)):
        fig = backend._scalar_figure(topic)
        (line,) = fig.axes[0].lines
        assert line.get_marker() == marker
        assert list(line.get_xdata()) == [r for r in backend.scalar_points(topic)[0]]
        assert len(line.get_xdata()) == points
        backend._plt.close(fig)
    fig = backend._scalar_figure("dense")
    (line,) = fig.axes[0].lines
    assert line.get_marker() == "None" and len(line.get_xdata()) <= backend.max_points
    assert len(fig.axes[0].collections) == 1  # the min..max band of merged points
    backend._plt.close(fig)
    written = backend.draw()
    assert {p.name for p in written} == {"test_accuracy.png", "single.png", "dense.png"}


def test_histogram_columns_stay_bounded_and_the_image_is_the_mean_distribution(
    tmp_path: Path,
) -> None:
    backend = MatplotlibBackend(tmp_path, plot_every=10**9, max_columns=8)
    edges = np.linspace(0.0, 1.0, 5)  # four bins, the same every step
    n = 32

    def source_bin(step: int) -> int:
        return (step // 2) % 4

    for step in range(n):
        counts = np.zeros(4)
        counts[source_bin(step)] = 10.0 * (step + 1)  # totals differ: each step weighs 1
        backend.write_histograms([histogram(step, edges, counts)])
    image, bounds, lo, hi = backend.histogram_image("hist/activations", "fc")
    width = width_for(n, 8)
    assert image.shape == (64, n // width) and image.shape[1] <= 8
    assert list(bounds) == list(range(0, n + 1, width))
    assert (lo, hi) == (0.0, 1.0)
    expected = np.zeros((64, n // width))
    for column in range(n // width):
        for step in range(column * width, (column + 1) * width):
            rows = slice(16 * source_bin(step), 16 * (source_bin(step) + 1))
            expected[rows, column] += 1.0 / 16 / width  # a source bin covers 16 image rows
    assert image == pytest.approx(expected)


def test_histograms_with_moving_ranges_keep_their_centre(tmp_path: Path) -> None:
    """Step s is a narrow distribution around s / 10: merged columns on a common grid keep
    the mean of their steps' centres (to within a row of the image)."""
    backend = MatplotlibBackend(tmp_path, plot_every=10**9, max_columns=16)
    n = 1000
    for step in range(n):
        centre = step / 10
        edges = np.linspace(centre - 0.2, centre + 0.2, 5)
        backend.write_histograms([histogram(step, edges, np.array([0.0, 3.0, 3.0, 0.0]))])
    image, bounds, lo, hi = backend.histogram_image("hist/activations", "fc")
    assert image.shape[1] <= 16
    assert lo == pytest.approx(-0.2) and hi == pytest.approx((n - 1) / 10 + 0.2)
    rows = np.linspace(lo, hi, 65)
    centres = (rows[:-1] + rows[1:]) / 2
    row_height = (hi - lo) / 64
    assert image.sum(axis=0) == pytest.approx(np.ones(image.shape[1]))
    for column in range(image.shape[1]):
        steps = np.arange(int(bounds[column]), int(bounds[column + 1]))
        mean = (centres * image[:, column]).sum()
        assert mean == pytest.approx((steps / 10).mean(), abs=row_height)


def test_histogram_summary_copies_and_ignores_empty_histograms(tmp_path: Path) -> None:
    backend = MatplotlibBackend(tmp_path, plot_every=10**9, max_columns=4)
    host = np.concatenate([np.linspace(5.0, 6.0, 3), [1.0, 1.0]])  # one flush's host buffer
    backend.write_histograms([histogram(0, host[:3], host[3:])])
    empty = np.zeros(2)  # all values non-finite: no counts, edges at 0
    for step in range(1, 10):
        if step == 4:
            backend.write_histograms([histogram(step, np.array([0.0, 0.0, 1e-12]), empty)])
        else:
            backend.write_histograms([histogram(step, np.linspace(5.0, 6.0, 3), np.ones(2))])
    series = backend._hists["hist/activations"]["fc"]
    assert len(series.columns) <= 4
    assert all(c.edges.base is None and c.counts.base is None for c in series.columns)
    _, bounds, lo, hi = backend.histogram_image("hist/activations", "fc")
    assert (lo, hi) == (5.0, 6.0)  # the empty histogram does not stretch the range
    assert bounds[0] == 0 and bounds[-1] == 10


def test_drawing_a_long_run_writes_each_figure(tmp_path: Path) -> None:
    backend = MatplotlibBackend(tmp_path, plot_every=600, max_columns=16, max_points=32)
    rng = np.random.default_rng(0)
    for step in range(1200):
        values = rng.normal(step / 1000, 1.0, size=200)
        counts, edges = np.histogram(values, bins=16)
        backend.write_histograms(
            [histogram(step, edges.astype(float), counts.astype(float), key=k) for k in "ab"]
        )
        backend.write_scalars([scalar(step, float(values.mean()), "mean", k) for k in "ab"])
        backend.flush()
    backend.close()
    for topic in ("hist/activations", "mean"):
        path = figure_path(tmp_path, topic)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(len(s.columns) <= 16 for s in backend._hists["hist/activations"].values())
    assert all(len(s.steps) <= 32 for s in backend._scalars["mean"].values())


@pytest.mark.parametrize(
    ("option", "value"), [("plot_every", 0), ("max_points", 1), ("max_columns", "8")]
)
def test_bad_options_are_named(tmp_path: Path, option: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{option} must be a whole number"):
        MatplotlibBackend(tmp_path, **{option: value})  # type: ignore[arg-type]
