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

import torch
from torch import nn

from ._bus import MessageBus
from ._exporter import Exporter
from .backends.base import Backend, HistogramRecord, ScalarRecord
from .subscriber import Subscriber

__all__ = ["MemoryBackend", "train_steps"]


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
