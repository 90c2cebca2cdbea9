"""What the bus needs of a subscriber (``ikkuna_core.Subscriber`` is one), so that the bus
names no subscriber class and the subscriber module can name the bus."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..messages import ModuleInfo, StepBundle

__all__ = ["Consumer"]


class _Options(Protocol):
    @property
    def topics(self) -> Sequence[str]: ...

    @property
    def subsample(self) -> int: ...


class Consumer(Protocol):
    """A subscriber as the bus sees it."""

    enabled: bool

    @property
    def name(self) -> str: ...

    @property
    def options(self) -> _Options: ...

    @property
    def synchronized(self) -> bool: ...

    @property
    def output_kind(self) -> str | None: ...

    def output_topics(self) -> list[str]: ...

    def bind(self, bus: Any) -> None: ...

    def compute_step(self, step: StepBundle) -> None: ...

    def sample_size(self, topic: str) -> int | None: ...

    def finiteness_only(self, topic: str) -> bool: ...

    @property
    def finite_loss_clears_forward(self) -> bool: ...

    def wants_module(self, module: ModuleInfo) -> bool: ...
