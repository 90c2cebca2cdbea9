"""One obvious way (issue 17): ``Exporter(model, loss_fn, ...)``, ``subscribe`` and
``add_backend`` return handles that remove what they added; a plugin written against the
old names (``set_model``, ``set_loss``, ``bus.register_subscriber``, ``bus.add_backend``, the
``ikkuna_core.exporter``/``ikkuna_core.bus`` import paths) still runs, with a
DeprecationWarning naming the new way, and publishes the same values. Every value is checked
against one computed here from the model."""

from __future__ import annotations

import subprocess
import sys
import types
import warnings

import pytest
import torch
from torch import nn

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend


class GradNorms(ik.Subscriber):
    """The fast path: one norm per module and step, computed with ik.ops."""

    name = "grad_norms"
    default_topics = ("weight_gradients",)

    def compute_step(self, step: ik.StepBundle) -> None:
        payloads = step["weight_gradients"]
        self.publish_scalars(step, ik.ops.norms(payloads.tensors()))


class MaxAbs(ik.Subscriber):
    """The per-module path: publish_scalar and publish_histogram."""

    name = "max_abs"
    default_topics = ("weights",)

    def compute(self, bundle: ik.MessageBundle) -> None:
        weights = bundle.tensor("weights")
        self.publish_scalar(bundle, weights.abs().max())
        self.publish_histogram(bundle, weights, bins=4, suffix="hist")


class MaxAbsPerModule(ik.PerModuleSubscriber):
    """The same per-module path, the new way."""

    name = "max_abs"
    default_topics = ("weights",)

    def compute(self, bundle: ik.MessageBundle) -> None:
        self.publish_scalar(bundle, bundle.tensor("weights").abs().max())


class StackedHists(ik.Subscriber):
    """publish_histograms of ik.ops.histograms."""

    name = "stacked"
    default_topics = ("weights",)

    def compute_step(self, step: ik.StepBundle) -> None:
        self.publish_histograms(step, ik.ops.histograms(step["weights"].tensors(), bins=3))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


def _train(model: nn.Module, loss_fn, steps: int = 3) -> list[dict[str, torch.Tensor]]:
    """SGD steps; per step the gradient norms and weights' max-abs computed here."""
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = []
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        found = {f"grad_norms/weight_gradients/{i}": model[i].weight.grad.norm()
                 for i in (0, 2)}
        opt.step()
        found |= {f"max_abs/weights/{i}": model[i].weight.detach().abs().max() for i in (0, 2)}
        expected.append(found)
    return expected


def _check(backend: MemoryBackend, expected: list[dict[str, torch.Tensor]]) -> None:
    for step, values in enumerate(expected):
        for tag, value in values.items():
            assert backend.scalar(tag, step) == pytest.approx(float(value), rel=1e-5), tag


def test_the_new_way_publishes_and_handles_remove_what_they_added() -> None:
    model = _model()
    exporter = ik.Exporter(model, nn.CrossEntropyLoss(), bus=ik.MessageBus(on_error="raise"))
    backend = MemoryBackend()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        grads = exporter.subscribe(GradNorms())
        values = exporter.subscribe(MaxAbsPerModule())
        writes = exporter.add_backend(backend)
    assert isinstance(grads, ik.Handle) and isinstance(grads.target, GradNorms)
    base = exporter.hook_count
    expected = _train(model, exporter.loss_fn)
    exporter.bus.flush()
    _check(backend, expected)

    grads.remove()
    values.remove()
    grads.remove()  # a second remove does nothing
    assert exporter.bus.subscribers == []
    writes.remove()
    assert exporter.bus.backends == []
    with exporter.subscribe(MaxAbs()) as sub:  # a context manager: subscribed inside only
        assert exporter.bus.subscribers == [sub]
    assert exporter.bus.subscribers == []
    assert exporter.hook_count <= base
    n_records = len(backend.scalars)
    _train(model, exporter.loss_fn, steps=1)
    exporter.close()
    assert len(backend.scalars) == n_records  # detached: nothing more written to it
    assert not backend.closed  # a detached backend is its owner's to close


def test_a_plugin_written_the_old_way_still_runs_and_says_what_replaces_it() -> None:
    from ikkuna_core.bus import MessageBus  # the old import paths
    from ikkuna_core.exporter import Exporter

    model = _model()
    backend = MemoryBackend()
    with pytest.warns(DeprecationWarning) as caught:
        exporter = Exporter(bus=MessageBus(on_error="raise"))
        exporter.set_model(model)
        loss_fn = exporter.set_loss(lambda out, y: nn.functional.cross_entropy(out, y))
        sub = exporter.bus.register_subscriber(GradNorms())
        exporter.bus.register_subscriber(MaxAbs())
        exporter.bus.register_subscriber(StackedHists())
        exporter.bus.add_backend(backend)
    said = " ".join(str(w.message) for w in caught)
    for new in ("Exporter(model", "exporter.subscribe", "exporter.add_backend"):
        assert new in said
    assert isinstance(sub, GradNorms)
    expected = _train(model, loss_fn)
    exporter.bus.flush()
    _check(backend, expected)
    hist = backend.histogram("stacked/weights/2", step=2)
    assert sum(hist.counts) == model[2].weight.numel()
    with pytest.warns(DeprecationWarning, match="handle.remove"):
        exporter.bus.unregister_subscriber(sub)
    assert sub not in exporter.bus.subscribers
    exporter.close()


def test_testing_helpers_and_hooks_of_an_old_style_plugin_still_work() -> None:
    """``ikkuna_core.testing.train_steps`` and a plugin module with ``@ik.hookimpl``."""
    from ikkuna_core.testing import train_steps

    plugin = types.ModuleType("old_style_plugin")
    plugin.ikkuna_subscribers = ik.hookimpl(lambda: [GradNorms])  # type: ignore[attr-defined]
    registry = ik.load_plugins([])
    registry.register(plugin, ik.plugins.PluginInfo("old", None, None, "old_style_plugin"))
    assert registry.subscriber("grad_norms") is GradNorms

    model = _model()
    x, y = _data()
    reference = _model()
    norms = []

    def record(step: int) -> None:
        ref_opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        norms.append(reference[2].weight.grad.norm().item())
        ref_opt.step()

    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    backend = MemoryBackend()
    exporter = train_steps(model, [GradNorms()], steps=2, inputs=x, targets=y,
                           backend=backend, on_step=record)
    exporter.close()
    assert [backend.scalar("grad_norms/weight_gradients/2", s) for s in (0, 1)] == (
        pytest.approx(norms, rel=1e-5)
    )


def test_epoch_started_in_a_loop_without_an_optimizer() -> None:
    """Each forward is a step; the first step of each epoch publishes epoch_started."""

    class Events(ik.Subscriber):
        name = "events"
        default_topics = ("epoch_started",)

        def __init__(self, **options: object) -> None:
            super().__init__(**options)
            self.steps: list[tuple[int, int]] = []

        def compute_step(self, step: ik.StepBundle) -> None:
            self.steps.append((step.global_step, step.epoch))

    model = _model()
    exporter = ik.Exporter(model, bus=ik.MessageBus(on_error="raise"))
    events = exporter.subscribe(Events()).target
    x, _ = _data()
    for _ in range(2):
        for _ in range(3):
            model(x).sum().backward()
        exporter.epoch_finished()
    exporter.close()
    assert events.steps == [(0, 0), (3, 1)]


def test_ikkuna_trace_plugins_prints_every_hook_call() -> None:
    code = "import ikkuna_core as ik; ik.load_plugins([])"
    env = {"IKKUNA_TRACE_PLUGINS": "1", "IKKUNA_PLUGINS": "", "PATH": ""}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True)
    assert "ikkuna_backends" in done.stderr and "finish ikkuna_backends" in done.stderr
    quiet = subprocess.run([sys.executable, "-c", code], env={"IKKUNA_PLUGINS": ""},
                           capture_output=True, text=True, check=True)
    assert "ikkuna_backends" not in quiet.stderr


def test_a_hookwrapper_sees_what_its_plugin_provides() -> None:
    """Collection hooks go through pluggy's caller: a plugin's own wrapper applies."""

    class Wrapping:
        @ik.hookimpl
        def ikkuna_subscribers(self) -> list[type[ik.Subscriber]]:
            return [GradNorms]

        @ik.hookimpl(wrapper=True)
        def ikkuna_backends(self):  # a pluggy wrapper around this plugin's answers
            answers = yield  # one list per implementation
            return [*answers, [MemoryBackend]]

        @ik.hookimpl
        def ikkuna_topics(self) -> list[ik.TopicSpec]:
            return []

    registry = ik.load_plugins([])
    registry.register(Wrapping(), ik.plugins.PluginInfo("wrapping", None, None, "x"))
    assert registry.backend("memory") is MemoryBackend
