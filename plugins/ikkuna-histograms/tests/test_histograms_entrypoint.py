"""The histograms plugin through its installed entry point: discovery by name, a run
configured through ``ikkuna_core.watch``, TensorBoard histograms read back from the event
file and the matplotlib "colorful dimension" figure."""

from __future__ import annotations

from importlib.metadata import distribution
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import ikkuna_core
from ikkuna_core.backends.matplotlib import figure_path
from ikkuna_histograms import DeadFraction, Histogram


def test_entry_point_is_installed_and_loads_by_name() -> None:
    eps = [ep for ep in distribution("ikkuna-histograms").entry_points if ep.group == "ikkuna"]
    assert [(ep.name, ep.value) for ep in eps] == [("histograms", "ikkuna_histograms.plugin")]
    registry = ikkuna_core.load_plugins(["histograms"])
    info = registry.plugins["histograms"]
    assert info.loaded and info.distribution == "ikkuna-histograms"
    assert sorted(info.subscribers) == ["dead_fraction", "histogram"]
    assert registry.subscriber("histogram") is Histogram
    assert registry.subscriber("dead_fraction") is DeadFraction


class Log(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x.abs())


class Probe(nn.Module):
    """A model with a side branch: ``probe`` computes log|x| (-inf where the input is 0),
    which is watched like every module but does not feed the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.log = Log()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log(x)
        return self.fc(self.relu(self.conv(x)).flatten(1))


def test_watched_run_writes_histograms_and_figures(tmp_path: Path) -> None:
    log_dir = tmp_path / "run"
    config = {
        "plugins": ["histograms"],
        "backends": ["tensorboard", "matplotlib"],
        "log_dir": str(log_dir),
        "on_error": "raise",
        "subscribers": [
            {"name": "histogram", "topics": ["activations", "weight_gradients"], "bins": 32},
            {"name": "dead_fraction"},
        ],
    }
    torch.manual_seed(0)
    model = Probe()
    seen: dict[str, np.ndarray] = {}
    for key in ("log", "relu"):
        model.get_submodule(key).register_forward_hook(
            lambda m, a, out, key=key: seen.__setitem__(key, out.detach().numpy().copy())
        )
    exporter = ikkuna_core.watch(model, nn.CrossEntropyLoss(), config=config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    x[0, 0, 0, :5] = 0.0  # five -inf values in log's output at every step
    expected_log, expected_grad, expected_dead = [], [], []
    steps = 4
    for _ in range(steps):
        optimizer.zero_grad()
        exporter.loss_fn(model(x), y).backward()
        optimizer.step()
        expected_log.append(seen["log"])
        expected_grad.append(model.fc.weight.grad.numpy().copy())
        expected_dead.append(float(np.mean(seen["relu"] == 0)))
    exporter.close()

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {
        "histogram/activations/log",
        "histogram/activations/conv",
        "histogram/activations/relu",
        "histogram/activations/fc",
        "histogram/weight_gradients/conv",
        "histogram/weight_gradients/fc",
    } == set(tags["histograms"])
    for tag, expected, nonfinite in (
        ("histogram/activations/log", expected_log, 5),
        ("histogram/weight_gradients/fc", expected_grad, 0),
    ):
        events = acc.Histograms(tag)
        assert [e.step for e in events] == list(range(steps))
        for event, values in zip(events, expected, strict=True):
            flat = values.ravel().astype(np.float64)
            finite = flat[np.isfinite(flat)]
            h = event.histogram_value
            counts, edges = np.histogram(finite, bins=32, range=(finite.min(), finite.max()))
            assert list(h.bucket) == counts.tolist()
            np.testing.assert_allclose(h.bucket_limit, edges[1:], rtol=1e-9)
            assert h.num == finite.size == flat.size - nonfinite
            assert h.min == pytest.approx(finite.min()) and h.max == pytest.approx(finite.max())
            assert h.sum == pytest.approx(finite.sum(), rel=1e-4, abs=1e-6 * np.abs(finite).sum())
    # a histogram with non-finite values is flagged by a scalar beside it
    assert set(tags["scalars"]) == {
        "dead_fraction/activations/relu", "histogram/activations/log/nonfinite"
    }
    assert [e.value for e in acc.Scalars("histogram/activations/log/nonfinite")] == [5] * steps
    dead = [e.value for e in acc.Scalars("dead_fraction/activations/relu")]
    assert dead == pytest.approx(expected_dead, abs=1e-6)

    for topic in ("histogram/activations", "histogram/weight_gradients"):
        png = figure_path(log_dir, topic)
        assert png.is_file(), topic
        import matplotlib.image

        image = matplotlib.image.imread(png)
        # one panel per module, coloured by log-count: far more than a blank figure's colours
        assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 50
    assert figure_path(log_dir, "dead_fraction/activations").is_file()
