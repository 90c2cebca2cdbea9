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
