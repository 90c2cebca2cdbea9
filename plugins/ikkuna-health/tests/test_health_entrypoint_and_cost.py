"""The plugin through its entry point and a TOML-style configuration, and its cost: aten
ops added per CIFAR ResNet-18 step, counted by the project's benchmark."""

from __future__ import annotations

import importlib.util
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest
import torch
from health_helpers import Planted, batches, caught, health_warnings, mlp

import ikkuna_core as ik
from ikkuna_health import NonFinite, Spikes

BENCHMARK = Path(__file__).resolve().parents[3] / "benchmarks" / "overhead.py"


def test_entry_point_loads_both_subscribers_by_name() -> None:
    eps = [ep for ep in distribution("ikkuna-health").entry_points if ep.group == "ikkuna"]
    assert [(ep.name, ep.value) for ep in eps] == [("health", "ikkuna_health.plugin")]
    registry = ik.load_plugins(["health"])
    assert registry.subscriber("nonfinite") is NonFinite
    assert registry.subscriber("spikes") is Spikes


def test_watch_with_a_configuration(tmp_path: Path) -> None:
    model = mlp(Planted(16, 16, "forward", at=2))
    config = {
        "plugins": ["health"],
        "backends": ["tensorboard"],
        "log_dir": str(tmp_path),
        "subscribers": [{"name": "nonfinite", "action": "warn"}, {"name": "spikes"}],
    }
    exporter = ik.watch(model, torch.nn.CrossEntropyLoss(), config)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with caught() as found:
        for x, y in batches(4):
            opt.zero_grad()
            loss = exporter.loss_fn(model(x), y)  # type: ignore[misc]
            loss.backward()
            if torch.isfinite(loss):
                opt.step()
        exporter.close()
    (message,) = health_warnings(found)
    assert "step 2" in message and "'2'" in message


def _benchmark():  # type: ignore[no-untyped-def]
    if not BENCHMARK.exists():
        pytest.skip("the benchmark is not in this checkout")
    pytest.importorskip("ikkuna_train", reason="the benchmark's models are ikkuna-train's")
    name = "ikkuna_benchmark_overhead"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_on_all_the_time_costs_at_most_40_aten_ops_per_resnet18_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """nonfinite + spikes (past its warm-up) on CIFAR ResNet-18, batch 8: the operators they
    and the captures they need dispatch, against plain training (deterministic)."""
    monkeypatch.setenv("IKKUNA_PLUGINS", "health")
    result = _benchmark().count_ops("resnet18", ["health"], batch_size=8)
    assert result["plain"] > 300
    assert 0 < result["added"]["health"] <= 40
