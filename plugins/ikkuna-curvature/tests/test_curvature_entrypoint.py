"""The curvature plugin through its installed entry point: discovery by name, ``ikkuna
plugins`` listing it, and a TOML run configuration through ``ikkuna_core.watch`` whose
TensorBoard event file, read back, holds values checked against an explicit Hessian,
``torch.linalg.cond`` and a per-example gradient loop."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import distribution
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import ikkuna_core
from ikkuna_curvature import ConditionNumber, GradientNoiseScale, HessianMaxEigenvalue, HessianTrace

SUBSCRIBERS = {
    "condition_number": ConditionNumber,
    "hessian_max_eigenvalue": HessianMaxEigenvalue,
    "hessian_trace": HessianTrace,
    "gradient_noise_scale": GradientNoiseScale,
}

#: the conftest fixture's reference: explicit_hessian(model, x, y, parameters=None)
HessianFn = Callable[..., torch.Tensor]


def test_entry_point_is_installed_and_loads_by_name() -> None:
    eps = [ep for ep in distribution("ikkuna-curvature").entry_points if ep.group == "ikkuna"]
    assert [(ep.name, ep.value) for ep in eps] == [("curvature", "ikkuna_curvature.plugin")]
    registry = ikkuna_core.load_plugins(["curvature"])
    info = registry.plugins["curvature"]
    assert info.loaded and info.error is None
    assert info.distribution == "ikkuna-curvature"
    assert sorted(info.subscribers) == sorted(SUBSCRIBERS)
    for name, cls in SUBSCRIBERS.items():
        assert registry.subscriber(name) is cls


def test_ikkuna_plugins_lists_it() -> None:
    env = {k: v for k, v in os.environ.items() if k != "IKKUNA_PLUGINS"}
    out = subprocess.run(
        [sys.executable, "-m", "ikkuna_core", "plugins", "--json"],
        capture_output=True, text=True, check=True, env=env, timeout=120,
    ).stdout
    (entry,) = [p for p in json.loads(out) if p["name"] == "curvature"]
    assert entry["distribution"] == "ikkuna-curvature" and entry["loaded"]
    assert entry["version"] == distribution("ikkuna-curvature").version
    assert set(entry["subscribers"]) == set(SUBSCRIBERS)


CONFIG = """
[ikkuna]
plugins = ["curvature"]
backends = ["tensorboard"]
log_dir = '{log_dir}'
on_error = "raise"

[[ikkuna.subscribers]]
name = "condition_number"
subsample = 2

[[ikkuna.subscribers]]
name = "hessian_max_eigenvalue"
subsample = 2
max_iterations = 60
tolerance = 1e-4

[[ikkuna.subscribers]]
name = "hessian_trace"
subsample = 2
probes = 16
seed = 3

[[ikkuna.subscribers]]
name = "gradient_noise_scale"
subsample = 2
"""


def _scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _noise_scale(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    per = []
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        per.append(torch.cat([g.reshape(-1) for g in grads]).double())
    g = torch.stack(per)
    b, mean = g.shape[0], g.mean(0)
    trace_cov = float(((g - mean) ** 2).sum()) / (b - 1)
    return trace_cov / (float(mean @ mean) - trace_cov / b)


def test_toml_run_writes_checked_values_to_tensorboard(
    tmp_path: Path, explicit_hessian: HessianFn
) -> None:
    log_dir = tmp_path / "run"
    config = tmp_path / "ikkuna.toml"
    config.write_text(CONFIG.format(log_dir=log_dir.as_posix()))
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 10), nn.ReLU(),
        nn.Linear(10, 3),
    )
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        x = torch.randn(20, 1, 6, 6, generator=g)
        batches.append((x, (x[:, 0, 2:4, 2:4].sum((1, 2)) > 0).long() + (x[:, 0, 0, 0] > 1)))
    reference = copy.deepcopy(model)
    exporter = ikkuna_core.watch(model, nn.CrossEntropyLoss(), config=config)
    loss_fn = exporter.loss_fn
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    after = []  # subscribers run at the end of the step: at the parameters after its update
    for x, y in batches:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        after.append({k: v.clone() for k, v in model.state_dict().items()})
    exporter.close()

    written = _scalars(log_dir)
    for step in (0, 2):
        x, y = batches[step]
        reference.load_state_dict(after[step])
        h = explicit_hessian(reference, x, y)
        top = float(torch.linalg.eigvalsh(h)[-1])
        assert written["hessian_max_eigenvalue"][step] == pytest.approx(top, rel=1e-2)
        assert written["hessian_max_eigenvalue/residual"][step] <= 1e-4
        assert 1 <= written["hessian_max_eigenvalue/iterations"][step] <= 60
        sigma = math.sqrt(2 * float((h**2).sum() - (h.diagonal() ** 2).sum()) / 16)
        assert abs(written["hessian_trace"][step] - float(h.trace())) <= 3 * sigma
        assert 0 < written["hessian_trace/stderr"][step] < 3 * sigma
        assert written["gradient_noise_scale"][step] == pytest.approx(
            _noise_scale(reference, x, y), rel=1e-3
        )
        for key in ("0", "3", "5"):
            w = after[step][f"{key}.weight"].double()
            assert written[f"condition_number/weights/{key}"][step] == pytest.approx(
                float(torch.linalg.cond(w.reshape(w.shape[0], -1))), rel=1e-6
            )
    assert all(sorted(v) == [0, 2] for v in written.values()), written
