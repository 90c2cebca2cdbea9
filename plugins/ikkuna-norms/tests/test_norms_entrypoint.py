"""The norms plugin through its installed entry point: discovery by name, a TOML run
configuration through ``ikkuna_core.watch``, TensorBoard event files read back and
matplotlib figures."""

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
from ikkuna_norms import GlobalNorm, Mean, Norm, Ratio, SpectralNorm, Variance

SUBSCRIBERS = {
    "norm": Norm,
    "global_norm": GlobalNorm,
    "spectral_norm": SpectralNorm,
    "ratio": Ratio,
    "mean": Mean,
    "variance": Variance,
}


def test_entry_point_is_installed_and_loads_by_name() -> None:
    eps = [ep for ep in distribution("ikkuna-norms").entry_points if ep.group == "ikkuna"]
    assert [(ep.name, ep.value) for ep in eps] == [("norms", "ikkuna_norms.plugin")]
    registry = ikkuna_core.load_plugins(["norms"])
    info = registry.plugins["norms"]
    assert info.loaded and info.error is None
    assert info.distribution == "ikkuna-norms"
    assert sorted(info.subscribers) == sorted(SUBSCRIBERS)
    for name, cls in SUBSCRIBERS.items():
        assert registry.subscriber(name) is cls


def test_not_enabled_means_not_available() -> None:
    registry = ikkuna_core.load_plugins([])
    assert not registry.plugins["norms"].loaded
    with pytest.raises(ikkuna_core.PluginError, match="unknown subscriber 'norm'"):
        registry.subscriber("norm")


CONFIG = """
[ikkuna]
plugins = ["norms"]
backends = ["tensorboard", "matplotlib"]
log_dir = '{log_dir}'
on_error = "raise"

[[ikkuna.subscribers]]
name = "norm"
topics = ["weight_gradients", "weight_updates", "weights"]
p = "inf"

[[ikkuna.subscribers]]
name = "ratio"
topics = ["norm/weight_updates", "norm/weights"]

[[ikkuna.subscribers]]
name = "spectral_norm"
iterations = 2
warmup_iterations = 20

[[ikkuna.subscribers]]
name = "mean"
topics = ["activations"]

[[ikkuna.subscribers]]
name = "variance"
topics = ["weight_gradients"]
correction = 0
"""


def _scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]
    }


def test_toml_run_writes_tensorboard_and_figures(tmp_path: Path) -> None:
    log_dir = tmp_path / "run"
    config = tmp_path / "ikkuna.toml"
    config.write_text(CONFIG.format(log_dir=log_dir.as_posix()))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)
    )
    outputs: dict[str, np.ndarray] = {}
    model[1].register_forward_hook(
        lambda m, a, out: outputs.__setitem__("1", out.detach().numpy().astype(np.float64))
    )
    exporter = ikkuna_core.watch(model, nn.CrossEntropyLoss(), config=config)
    loss_fn = exporter.loss_fn
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    expected: dict[str, dict[int, float]] = {}

    def expect(tag: str, step: int, value: float) -> None:
        expected.setdefault(tag, {})[step] = float(value)

    steps = 3
    for step in range(steps):
        before = {n: p.detach().clone().double() for n, p in model.named_parameters()}
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        for key in ("0", "3"):
            w = getattr(model, key).weight.detach().double()
            grad = getattr(model, key).weight.grad.double()
            update = w - before[f"{key}.weight"]
            expect(f"norm/weight_gradients/{key}", step, grad.abs().max())
            expect(f"norm/weight_updates/{key}", step, update.abs().max())
            expect(f"norm/weights/{key}", step, w.abs().max())
            expect(
                f"ratio/norm/weight_updates/norm/weights/{key}",
                step,
                update.abs().max() / w.abs().max(),
            )
            expect(
                f"spectral_norm/weights/{key}",
                step,
                np.linalg.norm(w.reshape(w.shape[0], -1).numpy(), ord=2),
            )
            expect(f"variance/weight_gradients/{key}", step, grad.numpy().var())
        expect("mean/activations/1", step, outputs["1"].mean())
    exporter.close()

    written = _scalars(log_dir)
    for tag, by_step in expected.items():
        assert tag in written, f"{tag} missing; written: {sorted(written)}"
        assert sorted(written[tag]) == list(range(steps))
        for step, value in by_step.items():
            rel = 5e-3 if tag.startswith("spectral_norm") else 1e-5
            assert written[tag][step] == pytest.approx(value, rel=rel, abs=1e-9), (tag, step)
    for topic in (
        "norm/weight_gradients",
        "norm/weight_updates",
        "norm/weights",
        "ratio/norm/weight_updates/norm/weights",
        "spectral_norm/weights",
        "mean/activations",
        "variance/weight_gradients",
    ):
        png = figure_path(log_dir, topic)
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", topic
