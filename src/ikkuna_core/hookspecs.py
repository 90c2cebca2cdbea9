"""pluggy hook specifications: every extension point of Ikkuna, documented here.

Hooks are called with keyword arguments, so a spec can gain arguments without breaking
plugins. They run rarely (at start-up and at the start and end of a run); per-step traffic
goes through the MessageBus, never through pluggy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .backends.base import Backend
    from .config import IkkunaConfig
    from .exporter import Exporter
    from .messages import TopicSpec
    from .subscriber import Subscriber

PROJECT_NAME = "ikkuna"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
#: Decorate a plugin's hook implementations with this marker.
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def ikkuna_subscribers() -> list[type[Subscriber]]:  # type: ignore[empty-body]
    """Return the Subscriber classes this plugin provides. Each class's ``name`` is how a
    run configuration refers to it; two plugins must not use the same name."""


@hookspec
def ikkuna_backends() -> list[type[Backend]]:  # type: ignore[empty-body]
    """Return the Backend classes this plugin provides, looked up by their ``name`` in the
    configuration's ``backends`` list. A backend is constructed as ``cls(log_dir=...)``."""


@hookspec
def ikkuna_topics() -> list[TopicSpec]:  # type: ignore[empty-body]
    """Return extra topics this plugin publishes or consumes, registered on every bus that
    a run configuration creates (``TopicSpec(name=..., kind='module'|'network', doc=...)``)."""


@hookspec
def ikkuna_configure(config: IkkunaConfig) -> None:
    """Called once with the validated run configuration, before the run starts."""


@hookspec
def ikkuna_run_started(exporter: Exporter) -> None:
    """Called when ``ikkuna_core.watch`` has attached the Exporter, subscribers and backends."""


@hookspec
def ikkuna_run_finished(exporter: Exporter) -> None:
    """Called when the Exporter of a run configured by ``watch`` is closed."""


def hook_names() -> list[str]:
    """Names of every hook specification."""
    return sorted(n for n, v in globals().items() if n.startswith("ikkuna_") and callable(v))
