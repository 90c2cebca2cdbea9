"""Helpers for plugin authors' own tests: an in-memory backend and a tiny training loop.

```python
from ikkuna_core.testing import MemoryBackend, train_steps

backend = MemoryBackend()
exporter = train_steps(model, [MySubscriber(topics=["weights"])], steps=3, backend=backend)
assert backend.scalar("my/weights/0", step=2) == pytest.approx(expected)
```
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._bus import MessageBus
from ._exporter import Exporter
from .backends.base import Backend, HistogramRecord, ScalarRecord
from .context import RunContext
from .subscriber import Subscriber

__all__ = ["MemoryBackend", "everything", "train_steps"]


class MemoryBackend(Backend):
    """Keeps every record it is given, in order, for assertions."""

    name = "memory"

    def __init__(self, log_dir: str | Path = ".") -> None:
        super().__init__(log_dir)
        self.scalars: list[ScalarRecord] = []
        self.histograms: list[HistogramRecord] = []
        self.flushes = 0
        self.closed = False

    def write_scalars(self, records: Sequence[ScalarRecord]) -> None:
        self.scalars.extend(records)

    def write_histograms(self, records: Sequence[HistogramRecord]) -> None:
        self.histograms.extend(records)

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True

    def tags(self) -> set[str]:
        return {r.tag for r in self.scalars} | {r.tag for r in self.histograms}

    def scalar(self, tag: str, step: int) -> float:
        """The value written under ``tag`` at ``step`` (the last one, if several)."""
        found = [r.value for r in self.scalars if r.tag == tag and r.step == step]
        if not found:
            raise KeyError(f"no scalar {tag!r} at step {step}; tags: {sorted(self.tags())}")
        return found[-1]

    def histogram(self, tag: str, step: int) -> HistogramRecord:
        found = [r for r in self.histograms if r.tag == tag and r.step == step]
        if not found:
            raise KeyError(f"no histogram {tag!r} at step {step}; tags: {sorted(self.tags())}")
        return found[-1]


def train_steps(
    model: nn.Module,
    subscribers: Iterable[Subscriber],
    *,
    steps: int = 2,
    inputs: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    backend: Backend | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    lr: float = 0.1,
    depth: int = -1,
    on_step: Callable[[int], None] | None = None,
) -> Exporter:
    """Train ``model`` for ``steps`` SGD steps on fixed data with an Exporter feeding
    ``subscribers`` (errors raise). ``on_step(i)`` runs after each step, e.g. to record
    reference values. Returns the (still open) Exporter."""
    if inputs is None or targets is None:
        raise ValueError("train_steps needs inputs and targets")
    exporter = Exporter(
        model, loss_fn or nn.CrossEntropyLoss(), depth=depth, bus=MessageBus(on_error="raise")
    )
    loss = exporter.loss_fn
    assert loss is not None
    for sub in subscribers:
        exporter.subscribe(sub)
    if backend is not None:
        exporter.add_backend(backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for i in range(steps):
        optimizer.zero_grad()
        loss(model(inputs), targets).backward()
        optimizer.step()
        if on_step is not None:
            on_step(i)
    exporter.bus.flush()
    return exporter


def everything(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    registry: Any = None,
    context: RunContext | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
) -> list[dict[str, Any]]:
    """The subscriber entries (``[[ikkuna.subscribers]]`` as dicts) of the *everything*
    configuration for ``model``: every subscriber of every loaded plugin (``registry``, by
    default every installed one), each on every topic it accepts, together in one
    subscriber. A topic is accepted when the subscriber's constructor and the bus take it and
    two training steps of a copy of ``model`` on ``inputs``/``targets`` compute it without an
    error; a ``synchronized`` subscriber gets its default topics (they are one set, not
    alternatives). What memory tests and the benchmark's soak run, so a new plugin is covered
    without anyone adding it."""
    from .plugins import load_plugins

    if registry is None:
        registry = load_plugins()
    context = context or RunContext(test_loader=[(inputs, targets)],
                                    train_loader=[(inputs, targets)])

    topics = sorted(_bus(registry).topics)
    entries: list[dict[str, Any]] = []
    for name, (cls, _) in sorted(registry.subscribers.items()):
        if cls.synchronized:
            entries.append({"name": name})
            continue
        accepted = [t for t in topics
                    if _computes(registry, context, name, [t], model, (inputs, targets), loss_fn)]
        entries.append({"name": name, "topics": accepted} if accepted else {"name": name})
    return entries


def _bus(registry: Any) -> MessageBus:
    """A bus that raises, knowing the topics of ``registry``'s plugins."""
    made = MessageBus(on_error="raise")
    for topic in registry.topics:
        made.register_topic(topic.name, topic.kind, topic.doc)
    return made


def _computes(
    registry: Any, context: RunContext, name: str, topics: list[str], model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor], loss_fn: Callable[..., torch.Tensor] | None,
) -> bool:
    """Whether subscriber ``name`` on ``topics`` computes two training steps of a copy of
    ``model`` without an error."""
    import copy

    cls = registry.subscriber(name)
    options = registry.subscriber_options(name, {"topics": topics}, context)
    try:
        subscriber = cls(**options)
        probe = _bus(registry)
        probe.subscribe(subscriber)
    except (ValueError, TypeError):
        return False
    copied = copy.deepcopy(model)
    exporter = Exporter(copied, loss_fn or nn.CrossEntropyLoss(), bus=probe)
    try:
        loss = exporter.loss_fn
        assert loss is not None
        optimizer = torch.optim.SGD(copied.parameters(), lr=0.01)
        for _ in range(2):
            optimizer.zero_grad()
            loss(copied(batch[0]), batch[1]).backward()
            optimizer.step()
        probe.flush()
    except Exception:  # noqa: BLE001 - the subscriber does not compute on this topic
        return False
    finally:
        exporter.close()
    return True
