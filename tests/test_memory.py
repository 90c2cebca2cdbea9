"""Memory stays flat whatever is switched on (issue 16): the *everything* configuration —
every subscriber of every installed plugin, each on every topic it accepts
(:func:`ikkuna_core.testing.everything`), both backends — trains a tiny model for 300 steps;
live tensors must not grow and RSS must stay within allocator noise after the warm-up."""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ikkuna_core as ik
from ikkuna_core.testing import everything

pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

#: Steps in all; samples are taken every SAMPLE_EVERY steps from WARMUP on (after the first
#: matplotlib drawing, at step 100, whose fonts and caches are one-off; the window holds the
#: drawings at 200 and 300).
STEPS, WARMUP, SAMPLE_EVERY = 300, 120, 20
#: RSS slope allowed after the warm-up, in MiB per 1,000 steps. Measured: +0.7 alone, +11.4
#: beside the rest of the suite (one 1.5 MiB allocator step in the 180-step window); the
#: leak this test was written for grew ~800 on this configuration (issue 16 measured +83 on
#: a smaller one), so 30 leaves room for two allocator steps and still catches it.
RSS_SLOPE_MIB = 30.0


def _live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() wakes deprecated lazy attributes
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def test_the_everything_configuration_is_built_from_the_installed_plugins(
    installed_plugins: None, project_plugins: dict[str, str]
) -> None:
    """Every subscriber the installed plugins register is in it, on more than one topic when
    it takes more than one; a synchronized one on its default topics."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    registry = ik.load_plugins()
    assert set(project_plugins) <= set(registry.plugins)  # every plugins/ikkuna-* installed
    entries = everything(_model(), x, y, registry=registry)
    assert [e["name"] for e in entries] == sorted(registry.subscribers)
    assert len(entries) >= 10  # the project's plugins alone register 15
    by_name = {e["name"]: e for e in entries}
    for name, (cls, _) in registry.subscribers.items():
        assert ("topics" in by_name[name]) != cls.synchronized, by_name[name]
    if "norm" in by_name:  # ikkuna-norms installed: norm takes every tensor topic
        assert {"activations", "layer_gradients", "weight_gradients", "weights", "loss"} <= set(
            by_name["norm"]["topics"]
        )
        assert "batch_finished" not in by_name["norm"]["topics"]  # no tensor: refused


@pytest.mark.skipif(not hasattr(os, "sysconf") or not Path("/proc/self/statm").exists(),
                    reason="RSS read from /proc")
def test_memory_is_flat_with_everything_switched_on(
    tmp_path: Path, installed_plugins: None
) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    model = _model()
    context = ik.RunContext(test_loader=[(x, y)], train_loader=[(x, y)])
    subscribers = everything(model, x, y, context=context)
    assert len(subscribers) >= 10  # the project's plugins (installed_plugins) are loaded
    config = {
        "backends": ["tensorboard", "matplotlib"],
        "log_dir": str(tmp_path / "run"),
        "subscribers": subscribers,
        "on_error": "raise",
        # small caps, so the bounded summaries are full before the warm-up ends
        "backend_options": {"matplotlib": {"plot_every": 100, "max_points": 40,
                                           "max_columns": 20}},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN variances of one value
        exporter = ik.watch(model, nn.CrossEntropyLoss(), config, context=context)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        samples = []
        for step in range(STEPS):
            optimizer.zero_grad()
            exporter.loss_fn(model(x), y).backward()
            optimizer.step()
            if step + 1 >= WARMUP and (step + 1) % SAMPLE_EVERY == 0:
                samples.append((step + 1, _live_tensors(), _rss_bytes()))
        exporter.close()
    steps, tensors, rss = (np.array(c, dtype=float) for c in zip(*samples, strict=True))
    assert tensors.max() - tensors.min() <= 2, f"live tensors grew: {tensors.tolist()}"
    slope = np.polyfit(steps, rss / 2**20, 1)[0] * 1000
    print(f"everything: live tensors {tensors.tolist()}, RSS slope {slope:+.2f} MiB/1000 steps")
    assert slope < RSS_SLOPE_MIB, (
        f"RSS grows {slope:.1f} MiB per 1,000 steps after step {WARMUP}: "
        f"{(rss / 2**20).round(1).tolist()}"
    )
    figures = list((tmp_path / "run" / "figures").glob("*.png"))
    assert len(figures) >= len(subscribers)  # the figures were really drawn
