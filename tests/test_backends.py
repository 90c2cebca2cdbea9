"""Backends write real files: TensorBoard event files read back with TensorBoard's own reader,
and PNG figures written headless."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from torch import nn

import ikkuna_core as ik
from ikkuna_core.backends.matplotlib import MatplotlibBackend, figure_path
from ikkuna_core.backends.tensorboard import TensorBoardBackend

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_events(log_dir):
    acc = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "histograms": 0}
    )
    acc.Reload()
    return acc


class WeightNorm(ik.Subscriber):
    name = "wnorm"

    def compute(self, bundle):
        self.publish_scalar(bundle, bundle["weights"].norm())


class WeightHist(ik.Subscriber):
    name = "whist"

    def compute(self, bundle):
        self.publish_histogram(bundle, bundle["weights"], bins=10)


def train_with_backends(log_dir, steps=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    bus = ik.MessageBus(on_error="raise")
    exporter = ik.Exporter(bus=bus)
    exporter.set_model(model)
    bus.register_subscriber(WeightNorm(topics=["weights"]))
    bus.register_subscriber(WeightHist(topics=["weights"]))
    bus.add_backend(TensorBoardBackend(log_dir))
    bus.add_backend(MatplotlibBackend(log_dir, plot_every=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    expected = {}
    for step in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        expected[step] = (model[0].weight.detach().clone(), model[2].weight.detach().clone())
    exporter.close()
    return expected


def test_tensorboard_scalars_and_histograms_round_trip(tmp_path):
    expected = train_with_backends(tmp_path)
    acc = read_events(tmp_path)
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"wnorm/weights/0", "wnorm/weights/2"}
    assert set(tags["histograms"]) == {"whist/weights/0", "whist/weights/2"}
    events = acc.Scalars("wnorm/weights/2")
    assert [e.step for e in events] == [0, 1, 2]
    for e in events:
        assert e.value == pytest.approx(expected[e.step][1].norm().item(), rel=1e-6)
    hist = acc.Histograms("whist/weights/0")[-1]
    w = expected[2][0].numpy().astype(np.float64)
    counts, _ = np.histogram(w, bins=10, range=(w.min(), w.max()))
    assert hist.step == 2
    assert hist.histogram_value.num == w.size
    assert hist.histogram_value.min == pytest.approx(w.min(), rel=1e-6)
    assert hist.histogram_value.sum == pytest.approx(w.sum(), rel=1e-5, abs=1e-6)
    assert hist.histogram_value.sum_squares == pytest.approx((w * w).sum(), rel=1e-5)
    assert list(hist.histogram_value.bucket) == counts.tolist()


def test_matplotlib_writes_one_png_per_metric(tmp_path):
    train_with_backends(tmp_path)
    for topic in ("wnorm/weights", "whist/weights"):
        path = figure_path(tmp_path, topic)
        assert path.exists(), path
        header = path.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", header[16:24])
        assert width >= 300 and height >= 200
    assert not list(tmp_path.glob("figures/*.tmp.png"))


def test_matplotlib_redraws_as_training_goes(tmp_path):
    backend = MatplotlibBackend(tmp_path, plot_every=10)
    rec = lambda step: ik.backends.ScalarRecord(  # noqa: E731
        topic="loss", key=None, tag="loss", step=step, value=1.0 / (step + 1)
    )
    path = figure_path(tmp_path, "loss")
    backend.write_scalars([rec(0), rec(5)])
    backend.flush()  # fewer than plot_every steps: not drawn yet
    assert not path.exists()
    backend.write_scalars([rec(10)])
    backend.flush()
    assert path.exists() and backend._last_draw == 10
    first = path.stat().st_mtime_ns
    backend.write_scalars([rec(11)])
    backend.flush()
    assert path.stat().st_mtime_ns == first
    backend.close()  # close always draws what is new
    assert backend._last_draw == 11


def _scalars(topic: str, series: dict[str | None, list[tuple[int, float]]]) -> list:
    return [
        ik.backends.ScalarRecord(topic=topic, key=key, tag=topic if key is None else
                                 f"{topic}/{key}", step=step, value=value)
        for key, points in series.items() for step, value in points
    ]


def test_matplotlib_figures_are_labelled_and_sparse_series_visible(tmp_path):
    import matplotlib.pyplot as plt

    backend = MatplotlibBackend(tmp_path)
    backend.describe_modules({"net.1": "Linear", "net.3": "Conv2d", "net.5": "Linear"})
    # a single point per key (a final evaluation) and per-module lines arriving last-first
    backend.write_scalars(_scalars("final/accuracy", {"train": [(9, 0.9)], "test": [(9, 0.8)]}))
    dense = [(s, float(s)) for s in range(40)]
    backend.write_scalars(_scalars("max_abs/weights", {"net.5": dense, "net.1": dense}))

    fig = backend.figure("final/accuracy")
    (ax,) = fig.axes
    assert [line.get_marker() for line in ax.lines] == ["o", "o"]  # one point: a marker
    assert [line.get_color() for line in ax.lines] == ["tab:blue", "tab:orange"]  # train, test
    assert ax.get_ylabel() == "accuracy" and ax.get_xlabel() == "training step"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "test"]
    plt.close(fig)

    fig = backend.figure("max_abs/weights")
    (ax,) = fig.axes
    assert [line.get_label() for line in ax.lines] == ["net.1 (Linear)", "net.5 (Linear)"]
    assert [line.get_marker() for line in ax.lines] == ["None", "None"]  # 40 points: a line
    assert ax.get_ylabel() == "max_abs" and ax.get_title() == "max_abs/weights"
    plt.close(fig)


def test_matplotlib_many_modules_get_a_colour_bar_and_histograms_class_names(tmp_path):
    import matplotlib.pyplot as plt

    backend = MatplotlibBackend(tmp_path)
    keys = [f"layer{i}" for i in range(20)]
    backend.describe_modules(dict.fromkeys(keys, "Conv2d"))
    backend.write_scalars(_scalars("max_abs/weights", {k: [(0, 1.0), (1, 2.0)] for k in keys}))
    fig = backend.figure("max_abs/weights")
    ax, bar = fig.axes  # the plot and its colour bar: 20 lines are too many for a legend
    assert ax.get_legend() is None and "module, in model order (20)" in bar.get_ylabel()
    colors = [line.get_color() for line in ax.lines]
    assert len(set(map(str, colors))) == 20  # one colour per module, along the model
    plt.close(fig)

    counts, edges = np.array([1.0, 2.0]), np.array([0.0, 0.5, 1.0])
    record = ik.backends.HistogramRecord(
        topic="spread/activations", key="layer3", tag="spread/activations/layer3", step=0,
        counts=counts, edges=edges, min=0.0, max=1.0, num=3.0, sum=1.5, sum_squares=1.0,
        nonfinite=0.0)
    backend.write_histograms([record])
    fig = backend.figure("spread/activations")
    assert fig.axes[0].get_title() == "layer3 (Conv2d)"
    assert fig.axes[0].get_ylabel() == "value"
    plt.close(fig)


def test_a_removed_tensorboard_log_dir_is_reported_once_and_re_created(tmp_path):
    """Issue 16: the directory removed mid-run used to swallow every later event silently
    (written into the removed file)."""
    import shutil
    import warnings

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ikkuna_core.backends.base import ScalarRecord

    log_dir = tmp_path / "run"
    backend = TensorBoardBackend(log_dir)

    def write(step):
        backend.write_scalars([ScalarRecord("m", None, "m", step, float(step))])
        backend.flush()

    write(0)
    shutil.rmtree(log_dir)
    with pytest.warns(RuntimeWarning, match=r"was removed during the run \(noticed at step 1\)"):
        write(1)
    write(2)

    def steps():
        acc = EventAccumulator(str(log_dir))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars("m")]

    assert steps() == [(1, 1.0), (2, 2.0)]  # on disk again, in the re-created directory
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: a second removal is not reported again
        shutil.rmtree(log_dir)
        write(3)
    backend.close()
    assert steps() == [(3, 3.0)]
