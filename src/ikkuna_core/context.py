"""``RunContext``: what the program running the training offers subscribers.

A training loop knows things that a run configuration cannot name: its data loaders, for
instance. It passes them to :func:`ikkuna_core.watch` as a ``RunContext``; before each
configured subscriber is created, the ``ikkuna_subscriber_options`` hook lets the plugin that
provides the subscriber take what it needs from the context (a held-out loader, say). Options
written in the configuration always win.

```python
exporter = ik.watch(model, loss_fn, "ikkuna.toml", context=ik.RunContext(test_loader=loader))
```
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["RunContext"]


@dataclass(frozen=True)
class RunContext:
    """Things a run provides to the subscribers of its configuration. Every field is
    optional: ``None`` means the run does not provide it."""

    #: Held-out ``(inputs, labels)`` batches, re-iterable (a DataLoader, a list).
    test_loader: Iterable[Any] | None = None
    #: The training ``(inputs, labels)`` batches, re-iterable.
    train_loader: Iterable[Any] | None = None

    @classmethod
    def complete(cls) -> RunContext:
        """A context that provides every field, each empty: what listings use to show a
        subscriber as a run that provides everything would create it."""
        return cls(test_loader=(), train_loader=())
