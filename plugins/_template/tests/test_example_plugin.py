"""Tests for the template plugin. Run them after installing it:
``pip install ./ikkuna-example && pytest``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ikkuna_core
from ikkuna_core.testing import MemoryBackend, train_steps
from ikkuna_example import JsonLinesBackend, MaxAbs, MeanAbs


def test_installed_entry_point_provides_the_subscriber() -> None:
    registry = ikkuna_core.load_plugins(["example"])
    assert registry.subscriber("mean_abs") is MeanAbs
    assert registry.subscriber("max_abs") is MaxAbs


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_values_match_numpy_on_real_gradients(power: float) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(10, 1, 4, 4), torch.randint(0, 3, (10,))
    grads: list[dict[str, np.ndarray]] = []

    def record(step: int) -> None:  # runs after each optimizer step: p.grad is this step's
        grads.append({k: model.get_submodule(k).weight.grad.numpy().copy() for k in ("1", "3")})

    backend = MemoryBackend()
    exporter = train_steps(
        model, [MeanAbs(power=power)], steps=3, inputs=x, targets=y, backend=backend,
        on_step=record,
    )
    exporter.close()
    for step, by_module in enumerate(grads):
        for key, grad in by_module.items():
            want = np.mean(np.abs(grad.astype(np.float64)) ** power)
            got = backend.scalar(f"mean_abs/weight_gradients/{key}", step)
            assert got == pytest.approx(want, rel=1e-5)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        MeanAbs(power=0)
    with pytest.raises(ValueError):
        MeanAbs(powr=2)


def test_step_level_max_abs_matches_numpy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(10, 1, 4, 4), torch.randint(0, 3, (10,))
    grads: list[dict[str, np.ndarray]] = []

    def record(step: int) -> None:
        grads.append({k: model.get_submodule(k).weight.grad.numpy().copy() for k in ("1", "3")})

    backend = MemoryBackend()
    exporter = train_steps(
        model, [MaxAbs()], steps=2, inputs=x, targets=y, backend=backend, on_step=record
    )
    exporter.close()
    for step, by_module in enumerate(grads):
        for key, grad in by_module.items():
            got = backend.scalar(f"max_abs/weight_gradients/{key}", step)
            assert got == pytest.approx(np.abs(grad).max(), rel=1e-6)


def test_the_jsonl_backend_writes_what_the_bus_received(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    config = {
        "plugins": ["example"],
        "backends": ["jsonl"],
        "backend_options": {"jsonl": {"sync_every": 1}},
        "log_dir": str(tmp_path / "run"),
        "subscribers": [{"name": "mean_abs"}],
    }
    assert ikkuna_core.load_plugins(["example"]).backend("jsonl") is JsonLinesBackend
    exporter = ikkuna_core.watch(model, nn.CrossEntropyLoss(), config)
    memory = MemoryBackend()
    exporter.bus.add_backend(memory)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(10, 1, 4, 4), torch.randint(0, 3, (10,))
    for _ in range(3):
        optimizer.zero_grad()
        exporter.loss_fn(model(x), y).backward()
        optimizer.step()
    exporter.close()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [(d["tag"], d["step"], d["value"]) for d in lines] == [
        (r.tag, r.step, r.value) for r in memory.scalars
    ]
    assert len(lines) == 2 * 3  # two Linear layers, three steps
    with pytest.raises(ikkuna_core.ConfigError, match=r"backend_options\.jsonl\.sync_every"):
        ikkuna_core.watch(model, None, {**config, "backend_options": {"jsonl": {"sync_every": 0}}})
