"""Depth x step heatmaps: StepGrid's bounded summary against values computed here, and the
TensorBoard backend's image at close, read back with EventAccumulator's Images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ikkuna_core
from ikkuna_core.backends.heatmap import HEATMAP_MODULES, StepGrid, spans_decades

pytest.importorskip("matplotlib")


def test_step_grid_keeps_means_over_ever_wider_columns() -> None:
    grid = StepGrid(max_columns=4)
    rng = np.random.default_rng(0)
    values = {key: rng.random(10) for key in ("b", "a")}
    for step in range(10):
        for key in ("b", "a"):
            grid.add(key, step, float(values[key][step]))
    keys, edges, matrix = grid.matrix(["a", "b"])
    assert keys == ["a", "b"]
    assert grid.width == 4  # 10 steps in at most 4 columns
    assert edges.tolist() == [0, 4, 8, 12]
    for i, key in enumerate(keys):
        want = [values[key][0:4].mean(), values[key][4:8].mean(), values[key][8:10].mean()]
        assert matrix[i] == pytest.approx(want, rel=1e-12)
    grid.add("c", 9, 1.0)  # a module seen late: NaN where it has no value
    keys, _, matrix = grid.matrix(["a", "b"])
    assert keys[-1] == "c" and np.isnan(matrix[2, :2]).all() and matrix[2, 2] == 1.0
    assert spans_decades(np.array([1e-5, 1.0])) and not spans_decades(np.array([-1.0, 1e3]))


class Deep(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(8, 8) for _ in range(depth)])
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x))


@pytest.mark.usefixtures("installed_plugins")
def test_tensorboard_writes_a_heatmap_image_of_a_deep_models_metric(tmp_path: Path) -> None:
    from matplotlib.image import imread
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = Deep(HEATMAP_MODULES + 3)  # 16 Linear modules: past the curves' limit
    config = {
        "plugins": ["norms"],
        "backends": ["tensorboard"],
        "log_dir": str(tmp_path),
        "on_error": "raise",
        "subscribers": [{"name": "norm", "topics": ["weight_gradients"]}],
    }
    exporter = ikkuna_core.watch(model, nn.CrossEntropyLoss(), config)
    assert exporter.loss_fn is not None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for _ in range(6):
        optimizer.zero_grad()
        exporter.loss_fn(model(x), y).backward()
        optimizer.step()
    exporter.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert acc.Tags()["images"] == ["heatmap/norm/weight_gradients"]
    (event,) = acc.Images("heatmap/norm/weight_gradients")
    assert event.step == 5
    image = imread(io.BytesIO(event.encoded_image_string), format="png")
    assert image.shape[:2] == (event.height, event.width)
    assert event.height > 300 and event.width > 600
    assert image[..., :3].std() > 0.1  # a picture, not a blank canvas
    # the scalars it summarises are written as ever
    assert len([t for t in acc.Tags()["scalars"] if t.startswith("norm/")]) == 16


@pytest.mark.usefixtures("installed_plugins")
def test_a_shallow_models_metrics_get_no_heatmap(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    config = {"plugins": ["norms"], "backends": ["tensorboard"], "log_dir": str(tmp_path),
              "subscribers": [{"name": "norm", "topics": ["weights"]}]}
    exporter = ikkuna_core.watch(model, nn.CrossEntropyLoss(), config)
    assert exporter.loss_fn is not None
    exporter.loss_fn(model(torch.randn(3, 4)), torch.tensor([0, 1, 0])).backward()
    exporter.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert acc.Tags()["images"] == []
