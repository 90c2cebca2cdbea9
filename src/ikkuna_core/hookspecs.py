"""pluggy hook specifications: every extension point of Ikkuna, documented here.

Hooks are called with keyword arguments, so a spec can gain arguments without breaking
plugins, and an implementation may accept only the arguments it uses. They run rarely (at
start-up and at the start and end of a run); per-step traffic goes through the MessageBus,
never through pluggy.

What a plugin provides: subscribers, backends, topics (``ikkuna_subscribers``,
``ikkuna_backends``, ``ikkuna_topics``); commands of the ``ikkuna`` console script and
flags that add its subscribers to a run (``ikkuna_commands``, ``ikkuna_subscriber_flags``);
its part of the subscribers a run uses when it names none (``ikkuna_default_subscribers``).
What it is told: the run configuration, what the run provides (``ikkuna_configure``,
``ikkuna_subscriber_options``) and when the run starts and ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from ._exporter import Exporter
    from .backends.base import Backend
    from .commands import Command, SubscriberFlag
    from .config import IkkunaConfig
    from .context import RunContext
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
def ikkuna_commands() -> list[Command]:  # type: ignore[empty-body]
    """Return the :class:`~ikkuna_core.commands.Command` s this plugin adds to the ``ikkuna``
    console script (like llm's ``register_commands``). Asked once at start-up, for every
    installed plugin (``IKKUNA_PLUGINS`` does not hide commands); a name already taken by
    the core or another plugin makes the plugin fail to load."""


@hookspec
def ikkuna_subscriber_flags() -> list[SubscriberFlag]:  # type: ignore[empty-body]
    """Return :class:`~ikkuna_core.commands.SubscriberFlag` s: switches such as
    ``--my-metric`` that add one of *this plugin's* subscribers to a run. Commands that start
    a run put every installed plugin's flags on their command line, so uninstalling the
    plugin removes its flags."""


@hookspec
def ikkuna_default_subscribers() -> list[dict[str, Any]]:  # type: ignore[empty-body]
    """Return this plugin's part of the subscribers a run uses when its configuration names
    none (a front end's quickstart): entries of the form ``{"name": <one of this plugin's
    subscribers>, **options}``, as in ``[[ikkuna.subscribers]]``."""


@hookspec
def ikkuna_subscriber_options(
    name: str, options: dict[str, Any], context: RunContext
) -> dict[str, Any] | None:  # type: ignore[empty-body]
    """Return options to add to the subscriber called ``name`` before ``ikkuna_core.watch``
    creates it from a configuration entry holding ``options``, taken from what the run
    provides in ``context`` (a :class:`~ikkuna_core.RunContext`: its test loader, say);
    None adds nothing. Answer only for your own subscribers; options written in the
    configuration are never replaced. Called once per configured subscriber at start-up."""


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
