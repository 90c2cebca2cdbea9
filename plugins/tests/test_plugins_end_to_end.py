"""The issue's "done means": with ikkuna-norms, ikkuna-histograms and ikkuna-accuracy
installed, one configuration enabling the three by name trains a small conv net on 1x8x8
inputs and produces, read back from the TensorBoard event file, scalars and histograms of
every subscriber they provide, plus the matplotlib figures. Every value written is compared
with one computed here from the model itself (own forward hooks, parameter clones, p.grad)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import ikkuna_core
from ikkuna_core.backends.matplotlib import figure_path

CONFIG = """
[ikkuna]
plugins = ["norms", "histograms", "accuracy"]
backends = ["tensorboard", "matplotlib"]
log_dir = '{log_dir}'
on_error = "raise"

[[ikkuna.subscribers]]
name = "norm"
topics = ["weight_gradients", "weight_updates", "weights"]

[[ikkuna.subscribers]]
name = "ratio"
topics = ["norm/weight_updates", "norm/weights"]

[[ikkuna.subscribers]]
name = "spectral_norm"

[[ikkuna.subscribers]]
name = "mean"
topics = ["activations"]

[[ikkuna.subscribers]]
name = "variance"
topics = ["activations"]

[[ikkuna.subscribers]]
name = "histogram"
topics = ["activations", "weight_gradients", "weight_updates"]
bins = 32

[[ikkuna.subscribers]]
name = "histogram"
topics = ["weights"]
bins = 20
range = [-0.5, 0.5]

[[ikkuna.subscribers]]
name = "dead_fraction"
units = true

[[ikkuna.subscribers]]
name = "train_accuracy"

[[ikkuna.subscribers]]
name = "test_accuracy"
dataset = "digits"
image_size = 8
batch_size = 64
max_batches = 2
subsample = 2

[[ikkuna.subscribers]]
name = "loss"
window = 3
"""

STEPS = 4
MODULES = ["0", "1", "2", "3", "4", "5"]
WEIGHTED = ["0", "3", "5"]
RELUS = ["1", "4"]


def test_three_plugins_enabled_by_name(tmp_path: Path) -> None:
    from ikkuna_train.data import load_dataset

    log_dir = tmp_path / "run"
    config = tmp_path / "ikkuna.toml"
    config.write_text(CONFIG.format(log_dir=log_dir.as_posix()))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    ).to("cpu")
    outputs: dict[str, np.ndarray] = {}  # each module's output in the training forward
    for key in MODULES:
        model.get_submodule(key).register_forward_hook(
            lambda m, a, out, key=key: outputs.__setitem__(
                key, out.detach().numpy().astype(np.float64)
            ) if m.training and torch.is_grad_enabled() else None
        )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    digits = load_dataset("digits", train=False, image_size=8)
    x_test = torch.stack([digits[i][0] for i in range(128)])
    y_test = torch.tensor([int(digits[i][1]) for i in range(128)])

    exporter = ikkuna_core.watch(model, nn.CrossEntropyLoss(), config=config)
    assert sorted(exporter.registry.plugins[n].distribution for n in
                  ("norms", "histograms", "accuracy")) == [
        "ikkuna-accuracy", "ikkuna-histograms", "ikkuna-norms"
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected: dict[str, dict[int, float]] = {}
    spectral: dict[str, dict[int, float]] = {}
    histograms: dict[str, list[np.ndarray]] = {}  # the values each histogram bins, by step
    losses: list[float] = []

    def expect(tag: str, step: int, value: float) -> None:
        expected.setdefault(tag, {})[step] = float(value)

    for step in range(STEPS):
        before = {k: model.get_submodule(k).weight.detach().clone() for k in WEIGHTED}
        optimizer.zero_grad()
        out = model(x)
        loss = exporter.loss_fn(out, y)
        loss.backward()
        optimizer.step()
        expect("train_accuracy", step, (out.argmax(1) == y).float().mean())
        expect("loss/loss", step, loss.detach())
        losses.append(float(loss.detach()))
        expect("loss/loss/running_mean", step, np.mean(losses[-3:]))  # window = 3
        for key in WEIGHTED:
            module = model.get_submodule(key)
            w = module.weight.detach().double()
            update = w - before[key].double()
            grad = module.weight.grad.double()
            expect(f"norm/weight_gradients/{key}", step, grad.norm())
            expect(f"norm/weight_updates/{key}", step, update.norm())
            expect(f"norm/weights/{key}", step, w.norm())
            expect(f"ratio/norm/weight_updates/norm/weights/{key}", step, update.norm() / w.norm())
            matrix = w.reshape(w.shape[0], -1).numpy()
            spectral.setdefault(f"spectral_norm/weights/{key}", {})[step] = float(
                np.linalg.norm(matrix, ord=2)
            )
            for topic, values in (("weight_gradients", grad), ("weight_updates", update),
                                  ("weights", w)):
                histograms.setdefault(f"histogram/{topic}/{key}", []).append(values.numpy())
        for key in MODULES:
            act = outputs[key]
            expect(f"mean/activations/{key}", step, act.mean())
            expect(f"variance/activations/{key}", step, act.var(ddof=1))
            histograms.setdefault(f"histogram/activations/{key}", []).append(act)
        for key in RELUS:
            act = outputs[key]
            expect(f"dead_fraction/activations/{key}", step, np.mean(act == 0))
            per_unit = np.moveaxis(act, 1, 0).reshape(act.shape[1], -1)
            expect(f"dead_fraction/activations/units/{key}", step,
                   np.mean(np.all(per_unit == 0, axis=1)))
        if step % 2 == 0:
            model.eval()
            with torch.no_grad():
                expect("test_accuracy", step, (model(x_test).argmax(1) == y_test).float().mean())
            model.train()
    exporter.close()

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalar_tags = set(acc.Tags()["scalars"])
    histogram_tags = set(acc.Tags()["histograms"])

    want_scalars = {"train_accuracy", "test_accuracy", "loss/loss", "loss/loss/running_mean"}
    for key in WEIGHTED:
        want_scalars |= {
            f"norm/weight_gradients/{key}",
            f"norm/weight_updates/{key}",
            f"norm/weights/{key}",
            f"ratio/norm/weight_updates/norm/weights/{key}",
            f"spectral_norm/weights/{key}",
        }
    for key in MODULES:
        want_scalars |= {f"mean/activations/{key}", f"variance/activations/{key}"}
    for key in RELUS:
        want_scalars |= {
            f"dead_fraction/activations/{key}",
            f"dead_fraction/activations/units/{key}",
        }
    assert scalar_tags == want_scalars

    want_histograms = {f"histogram/activations/{k}" for k in MODULES}
    for topic in ("weight_gradients", "weight_updates", "weights"):
        want_histograms |= {f"histogram/{topic}/{k}" for k in WEIGHTED}
    assert histogram_tags == want_histograms

    for tag in scalar_tags:
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == ([0, 2] if tag == "test_accuracy" else list(range(STEPS))), tag
    for tag in histogram_tags:
        assert [e.step for e in acc.Histograms(tag)] == list(range(STEPS)), tag

    assert set(expected) | set(spectral) == scalar_tags  # every scalar has its own value
    for tag, by_step in expected.items():
        written = {e.step: e.value for e in acc.Scalars(tag)}
        assert written == pytest.approx(by_step, rel=1e-5, abs=1e-7), tag
    for tag, by_step in spectral.items():  # power iteration: close, and never above
        for e in acc.Scalars(tag):
            assert e.value == pytest.approx(by_step[e.step], rel=5e-3), (tag, e.step)
            assert e.value <= by_step[e.step] * (1 + 1e-5), (tag, e.step)

    assert set(histograms) == histogram_tags
    for tag, by_step in histograms.items():
        fixed = tag.startswith("histogram/weights/")  # bins = 20, range = [-0.5, 0.5]
        for step, array in enumerate(by_step):
            h = acc.Histograms(tag)[step].histogram_value
            values = array.ravel()
            lo, hi = (-0.5, 0.5) if fixed else (values.min(), values.max())
            counts, edges = np.histogram(values, bins=20 if fixed else 32, range=(lo, hi))
            # binned in float32: only a value within rounding of an edge may change bins
            tol = 1e-6 * (hi - lo + abs(lo) + abs(hi))
            near = np.min(np.abs(values[:, None] - edges[None, :]), axis=1) <= tol
            assert np.abs(np.array(h.bucket) - counts).sum() <= 2 * np.count_nonzero(near), tag
            assert h.num == values.size, tag
            np.testing.assert_allclose(h.bucket_limit, edges[1:], rtol=1e-9, atol=1e-12)
            if not fixed:
                assert (h.min, h.max) == pytest.approx((lo, hi), rel=1e-6), tag
                assert h.sum == pytest.approx(values.sum(), rel=1e-4,
                                              abs=1e-6 * np.abs(values).sum()), tag

    network = {"train_accuracy", "test_accuracy", "loss/loss", "loss/loss/running_mean"}
    per_module = (scalar_tags | histogram_tags) - network
    topics = network | {tag.rsplit("/", 1)[0] for tag in per_module}  # tag = topic/module
    assert len(topics) == 17
    for topic in topics:
        png = figure_path(log_dir, topic)
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG", topic
