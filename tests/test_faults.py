"""Faults (issue 11): a failed ``watch()`` attaches nothing, and a backend failing to close
does not stop the others from closing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ikkuna_core as ik
from ikkuna_core.backends.base import Backend
from ikkuna_core.backends.tensorboard import TensorBoardBackend
from ikkuna_core.testing import MemoryBackend

HookState = Callable[..., dict[str, int]]
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


class AbsMax(ik.Subscriber):
    """The largest absolute entry; counts its calls per (step, module)."""

    name = "abs_max"
    calls: list[tuple[int, str | None]]

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.calls = []

    def compute(self, bundle: ik.MessageBundle) -> None:
        self.calls.append((bundle.global_step, bundle.key))
        self.publish_scalar(bundle, bundle[bundle.topics[0]].abs().max())


class ConstructorFails(Backend):
    name = "constructor_fails"

    def __init__(self, log_dir: str | Path) -> None:
        raise OSError("no space left on device")

    def write_scalars(self, records: Any) -> None: ...

    def write_histograms(self, records: Any) -> None: ...


class RunStartedFails:
    """A plugin whose ikkuna_run_started raises; records the run hooks it sees."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @ik.hookimpl
    def ikkuna_run_started(self, exporter: ik.Exporter) -> None:
        self.calls.append("run_started")
        raise RuntimeError("the plugin's server is down")

    @ik.hookimpl
    def ikkuna_run_finished(self, exporter: ik.Exporter) -> None:
        self.calls.append("run_finished")


def _registry(plugin: object | None = None) -> ik.PluginRegistry:
    registry = ik.load_plugins([])
    registry.subscribers["abs_max"] = (AbsMax, "test")
    registry.backends["constructor_fails"] = (ConstructorFails, "test")
    if plugin is not None:
        registry.manager.register(plugin, name="run_started_fails")
    return registry


def _config(log_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "log_dir": str(log_dir),
        "subscribers": [{"name": "abs_max", "topics": ["weight_gradients"]}],
        **extra,
    }


def test_failed_watch_calls_attach_nothing(tmp_path: Path, hook_state: HookState) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    loss_fn = nn.CrossEntropyLoss()
    clean = hook_state(model, loss_fn)

    # 1. the log directory is a file: refused before any hook
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(ik.ConfigError, match=r"ikkuna\.log_dir: '.*taken' exists and is not a"):
        ik.watch(model, loss_fn, _config(tmp_path / "taken"), registry=_registry())
    assert hook_state(model, loss_fn) == clean
    # 2. a backend's constructor raises after the model is hooked and TensorBoard is open
    with pytest.raises(OSError, match="no space left on device"):
        ik.watch(
            model,
            loss_fn,
            _config(tmp_path / "run2", backends=["tensorboard", "constructor_fails"]),
            registry=_registry(),
        )
    assert hook_state(model, loss_fn) == clean
    # 3. a plugin's ikkuna_run_started raises: undone, and told the run finished
    plugin = RunStartedFails()
    with pytest.raises(RuntimeError, match="the plugin's server is down"):
        ik.watch(model, loss_fn, _config(tmp_path / "run3"), registry=_registry(plugin))
    assert hook_state(model, loss_fn) == clean
    assert plugin.calls == ["run_started", "run_finished"]

    # a later watch() runs each metric exactly once per step
    registry = _registry()
    exporter = ik.watch(model, loss_fn, _config(tmp_path / "run"), registry=registry)
    subscriber = exporter.bus.subscribers[0]
    assert isinstance(subscriber, AbsMax)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    expected: dict[tuple[int, str], float] = {}
    for step in range(3):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        for key, module in (("0", model[0]), ("2", model[2])):
            expected[(step, key)] = module.weight.grad.abs().max().item()
        opt.step()
    exporter.close()
    assert sorted(subscriber.calls) == sorted(expected)  # each (step, module) once
    acc = event_accumulator.EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    for key in ("0", "2"):
        events = acc.Scalars(f"abs_max/weight_gradients/{key}")
        assert [e.step for e in events] == [0, 1, 2]
        for e in events:
            assert e.value == pytest.approx(expected[(e.step, key)], rel=1e-6)
    assert hook_state(model, loss_fn) == clean


def test_failed_undo_is_added_to_the_original_error(
    tmp_path: Path, hook_state: HookState
) -> None:
    """If detaching after a failure fails too, the caller still gets the first error."""

    class CannotClose(MemoryBackend):
        name = "close_fails"

        def close(self) -> None:
            raise OSError("the disk went away")

    registry = _registry(RunStartedFails())
    registry.backends["close_fails"] = (CannotClose, "test")
    model = nn.Linear(2, 2)
    clean = hook_state(model, nn.MSELoss())
    with pytest.raises(RuntimeError, match="the plugin's server is down") as err:
        ik.watch(model, config=_config(tmp_path / "run", backends=["close_fails"]),
                 registry=registry)
    notes = "\n".join(getattr(err.value, "__notes__", []))
    assert "while detaching after this error, close() raised ExceptionGroup" in notes
    assert "backends[0] 'close_fails' raised OSError: the disk went away" in notes
    assert hook_state(model, nn.MSELoss()) == clean


class CloseFails(MemoryBackend):
    name = "close_fails"

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def close(self) -> None:
        super().close()
        raise self.error


def test_bus_close_closes_every_backend_and_reports_all_failures(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    bus = ik.MessageBus(flush_every=1000)  # everything stays pending until close()
    exporter = ik.Exporter(bus=bus)
    exporter.set_model(model)
    bus.register_subscriber(AbsMax(topics=["weight_gradients"]))
    first = bus.add_backend(CloseFails(OSError("disk full")))
    bus.add_backend(TensorBoardBackend(tmp_path, flush_secs=3600))
    last = bus.add_backend(CloseFails(ValueError("bad state")))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    expected = []
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        expected.append(model[2].weight.grad.abs().max().item())
        opt.step()

    with pytest.raises(ExceptionGroup) as err:
        exporter.close()
    message = str(err.value)
    assert "backends[0] 'close_fails' raised OSError: disk full" in message
    assert "backends[2] 'close_fails' raised ValueError: bad state" in message
    assert [type(e) for e in err.value.exceptions] == [OSError, ValueError]
    assert first.closed and last.closed
    assert [r.step for r in first.scalars if r.key == "2"] == [0, 1, 2]  # flushed before
    # TensorBoard, closed after a failing backend, wrote its whole queue
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    events = acc.Scalars("abs_max/weight_gradients/2")
    assert [e.step for e in events] == [0, 1, 2]
    assert [e.value for e in events] == pytest.approx(expected, rel=1e-6)


def test_bus_close_closes_every_backend_when_the_final_flush_fails(tmp_path: Path) -> None:
    class WriteFails(MemoryBackend):
        name = "write_fails"

        def write_scalars(self, records: Any) -> None:
            raise OSError("directory removed")

    # on_error = "warn": the failing backend is named in a warning, the others write
    bus = ik.MessageBus()
    bus.add_backend(TensorBoardBackend(tmp_path / "warn", flush_secs=3600))
    broken = bus.add_backend(WriteFails())
    bus.log_scalars("metric", {None: 2.5})
    with pytest.warns(RuntimeWarning, match=r"backend 'write_fails' \(OSError: directory removed"):
        bus.close()
    assert broken.closed
    acc = event_accumulator.EventAccumulator(str(tmp_path / "warn"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("metric")] == [2.5]

    # on_error = "raise": every backend is still closed, then the failure is raised
    bus = ik.MessageBus(on_error="raise")
    bus.add_backend(TensorBoardBackend(tmp_path / "raise", flush_secs=3600))
    broken = bus.add_backend(WriteFails())
    bus.log_scalars("metric", {None: 2.5})
    with pytest.raises(ExceptionGroup, match=r"the final flush raised BackendError"):
        bus.close()
    assert broken.closed
    acc = event_accumulator.EventAccumulator(str(tmp_path / "raise"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("metric")] == [2.5]
