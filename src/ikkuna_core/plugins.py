"""Plugin discovery through the ``ikkuna`` entry-point group, and enabling plugins by name.

Each entry point is loaded on its own, only when it is enabled, so a plugin that is not
enabled can never break a run. One that fails is named with its cause: as an error when it
was asked for by name, as a :class:`PluginWarning` (and skipped) when it was only enabled
because every installed plugin is. The environment variable ``IKKUNA_PLUGINS``
(comma-separated entry-point names) narrows which plugins load; ``IKKUNA_PLUGINS=""`` loads
none — the escape hatch when a plugin breaks start-up. ``IKKUNA_TRACE_PLUGINS=1`` prints every
hook call and its result to stderr (pluggy's tracing, as datasette's ``DATASETTE_TRACE_PLUGINS``).

Every hook is called through pluggy's caller, so tracing, ``tryfirst``/``trylast`` and
wrappers apply; what a plugin provides (subscribers, backends, topics, commands, flags,
default subscribers) is collected per plugin with a caller restricted to that plugin
(``subset_hook_caller``), which keeps who provided what.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from . import builtin, hookspecs
from .backends.base import Backend
from .commands import CORE_COMMANDS, Command, SubscriberFlag
from .config import ConfigError
from .context import RunContext
from .messages import TopicSpec
from .subscriber import Subscriber

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_VAR",
    "PluginError",
    "PluginInfo",
    "PluginRegistry",
    "PluginWarning",
    "UnknownPluginError",
    "installed_entry_points",
    "load_plugins",
]

ENTRY_POINT_GROUP = "ikkuna"
ENV_VAR = "IKKUNA_PLUGINS"
TRACE_ENV_VAR = "IKKUNA_TRACE_PLUGINS"
BUILTIN_NAME = "builtin"


class PluginError(RuntimeError):
    """A plugin could not be loaded or conflicts with another, or a name is unknown."""


class UnknownPluginError(ConfigError, PluginError):
    """A plugin asked for by name is not installed: a configuration error that callers
    catching PluginError (as before) still catch."""


class PluginWarning(UserWarning):
    """A plugin nobody asked for by name failed to load and was skipped."""


@dataclass
class PluginInfo:
    """What ``ikkuna plugins`` reports about one installed plugin."""

    name: str
    distribution: str | None
    version: str | None
    value: str
    enabled: bool = False
    loaded: bool = False
    error: str | None = None
    hooks: list[str] = field(default_factory=list)
    subscribers: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def installed_entry_points() -> list[EntryPoint]:
    """Every entry point of the ``ikkuna`` group, sorted by name (nothing is imported)."""
    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _env_selection() -> set[str] | None:
    raw = os.environ.get(ENV_VAR)
    if raw is None:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def _describe(ep: EntryPoint) -> PluginInfo:
    dist = ep.dist
    return PluginInfo(
        name=ep.name,
        distribution=dist.metadata["Name"] if dist is not None else None,
        version=dist.version if dist is not None else None,
        value=ep.value,
    )


class PluginRegistry:
    """The loaded plugins: subscriber and backend classes by name, extra topics, and the
    pluggy manager for the rare run-level hooks."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.manager.add_hookspecs(hookspecs)
        if os.environ.get(TRACE_ENV_VAR):
            self.manager.trace.root.setwriter(lambda text: print(text, end="", file=sys.stderr))
            self.manager.enable_tracing()
        self.plugins: dict[str, PluginInfo] = {}
        self.subscribers: dict[str, tuple[type[Subscriber], str]] = {}
        self.backends: dict[str, tuple[type[Backend], str]] = {}
        self.topics: list[TopicSpec] = []
        self.commands: dict[str, tuple[Command, str]] = {}
        #: (flag, plugin) in load order.
        self.flags: list[tuple[SubscriberFlag, str]] = []
        #: (subscriber entry, plugin) in load order.
        self.default_subscribers: list[tuple[dict[str, Any], str]] = []

    @property
    def hook(self) -> Any:
        return self.manager.hook

    def register(self, plugin: object, info: PluginInfo) -> None:
        """Register a plugin object (usually a module) and collect what it provides. Either
        all of it is registered or, on any error, none of it."""
        name = info.name
        try:
            self.manager.register(plugin, name=name)
        except Exception as exc:  # pluggy's PluginValidationError and friends
            raise PluginError(f"plugin {name!r} is not a valid ikkuna plugin: {exc}") from exc
        try:
            try:
                self.manager.check_pending()
            except Exception as exc:
                raise PluginError(f"plugin {name!r} is not a valid ikkuna plugin: {exc}") from exc
            hooks = {h.name for h in self.manager.get_hookcallers(plugin) or ()}
            subscribers = self._collect(plugin, name, hooks, "ikkuna_subscribers")
            backends = self._collect(plugin, name, hooks, "ikkuna_backends")
            topics = self._collect(plugin, name, hooks, "ikkuna_topics")
            new_subscribers = self._check_names(self.subscribers, subscribers, name, Subscriber)
            new_backends = self._check_names(self.backends, backends, name, Backend)
            if not all(isinstance(t, TopicSpec) for t in topics):
                raise PluginError(f"plugin {name!r}: ikkuna_topics must return TopicSpec objects")
            commands = self._check_commands(
                self._collect(plugin, name, hooks, "ikkuna_commands"), name
            )
            flags = self._check_flags(
                self._collect(plugin, name, hooks, "ikkuna_subscriber_flags"),
                name,
                set(new_subscribers),
            )
            defaults = self._check_defaults(
                self._collect(plugin, name, hooks, "ikkuna_default_subscribers"),
                name,
                set(new_subscribers),
            )
        except PluginError:
            self.manager.unregister(plugin)
            raise
        self.subscribers.update(new_subscribers)
        self.backends.update(new_backends)
        self.topics.extend(topics)
        self.commands.update({c.name: (c, name) for c in commands})
        self.flags.extend((f, name) for f in flags)
        self.default_subscribers.extend((dict(e), name) for e in defaults)
        info.hooks = sorted(h for h in hooks if h.startswith("ikkuna_"))
        info.subscribers = sorted(new_subscribers)
        info.backends = sorted(new_backends)
        info.topics = [t.name for t in topics]
        info.commands = [c.name for c in commands]
        info.flags = [f.option for f in flags]
        info.loaded = True
        self.plugins[name] = info

    def _collect(self, plugin: object, name: str, hooks: set[str], hook: str) -> list[Any]:
        """What ``plugin`` answers to the collection hook ``hook``, through pluggy's caller
        restricted to that plugin."""
        if hook not in hooks:
            return []
        others = [p for p in self.manager.get_plugins() if p is not plugin]
        caller = self.manager.subset_hook_caller(hook, remove_plugins=others)
        try:
            return [item for answer in caller() for item in (answer or [])]
        except Exception as exc:
            raise PluginError(
                f"plugin {name!r}: {hook}() raised {type(exc).__name__}: {exc}"
            ) from exc

    @staticmethod
    def _check_names(
        table: dict[str, Any], classes: list[Any], plugin: str, base: type
    ) -> dict[str, Any]:
        what = base.__name__.lower()
        new: dict[str, Any] = {}
        for cls in classes:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise PluginError(
                    f"plugin {plugin!r} returned {cls!r}, not a {base.__name__} class"
                )
            name: str = getattr(cls, "name", "")
            if not name:
                raise PluginError(f"plugin {plugin!r}: {cls.__name__} has no 'name'")
            taken = table.get(name) or new.get(name)
            if taken is not None and taken[0] is not cls:
                raise PluginError(
                    f"two {what}s claim the name {name!r}: {cls.__qualname__} from plugin "
                    f"{plugin!r} and {taken[0].__qualname__} from plugin {taken[1]!r}"
                )
            new[name] = (cls, plugin)
        return new

    def _check_commands(self, commands: list[Any], plugin: str) -> list[Command]:
        seen: set[str] = set()
        for command in commands:
            if not isinstance(command, Command):
                raise PluginError(
                    f"plugin {plugin!r}: ikkuna_commands returned {command!r}, not a Command"
                )
            name = command.name
            if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
                raise PluginError(
                    f"plugin {plugin!r}: command name {name!r} must be lower-case letters, "
                    "digits and dashes"
                )
            if name in CORE_COMMANDS:
                raise PluginError(f"plugin {plugin!r}: command {name!r} is the core's own")
            owner = self.commands.get(name)
            if owner is not None or name in seen:
                raise PluginError(
                    f"two plugins provide the command {name!r}: {plugin!r} and "
                    f"{owner[1] if owner else plugin!r}"
                )
            seen.add(name)
        return commands

    def _check_flags(
        self, flags: list[Any], plugin: str, own: set[str]
    ) -> list[SubscriberFlag]:
        taken = {f.option: p for f, p in self.flags}
        for flag in flags:
            if not isinstance(flag, SubscriberFlag):
                raise PluginError(
                    f"plugin {plugin!r}: ikkuna_subscriber_flags returned {flag!r}, not a "
                    "SubscriberFlag"
                )
            if not re.fullmatch(r"--[a-z0-9][a-z0-9-]*", flag.option):
                raise PluginError(
                    f"plugin {plugin!r}: flag {flag.option!r} must look like --lower-case-words"
                )
            if flag.subscriber not in own:
                raise PluginError(
                    f"plugin {plugin!r}: flag {flag.option} adds {flag.subscriber!r}, which is "
                    f"not one of its subscribers ({', '.join(sorted(own)) or 'none'})"
                )
            if flag.option in taken:
                raise PluginError(
                    f"two plugins provide the flag {flag.option}: {plugin!r} and "
                    f"{taken[flag.option]!r}"
                )
            taken[flag.option] = plugin
        return flags

    @staticmethod
    def _check_defaults(entries: list[Any], plugin: str, own: set[str]) -> list[dict[str, Any]]:
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("name") not in own:
                raise PluginError(
                    f"plugin {plugin!r}: ikkuna_default_subscribers must return entries "
                    f"{{'name': <one of {sorted(own)}>, **options}}, got {entry!r}"
                )
        return entries

    def subscriber_options(
        self, name: str, options: Mapping[str, Any], context: RunContext
    ) -> dict[str, Any]:
        """``options`` of the configured subscriber ``name`` plus what the plugins take for
        it from ``context`` (the ``ikkuna_subscriber_options`` hook); given options win."""
        merged = dict(options)
        try:
            answers = self.hook.ikkuna_subscriber_options(
                name=name, options=dict(options), context=context
            )
        except Exception as exc:
            raise PluginError(
                f"ikkuna_subscriber_options for {name!r} raised {type(exc).__name__}: {exc}"
            ) from exc
        for extra in answers:
            for key, value in (extra or {}).items():
                merged.setdefault(key, value)
        return merged

    def subscriber(self, name: str) -> type[Subscriber]:
        """The subscriber class called ``name``; unknown names list the available ones."""
        try:
            return self.subscribers[name][0]
        except KeyError:
            raise PluginError(
                f"unknown subscriber {name!r}; available: "
                f"{', '.join(sorted(self.subscribers)) or '(none: is its plugin enabled?)'}"
            ) from None

    def backend(self, name: str) -> type[Backend]:
        """The backend class called ``name``; unknown names list the available ones."""
        try:
            return self.backends[name][0]
        except KeyError:
            raise PluginError(
                f"unknown backend {name!r}; available: {', '.join(sorted(self.backends))}"
            ) from None


def load_plugins(
    names: Iterable[str] | None = None, *, strict: bool = True, environment: bool = True
) -> PluginRegistry:
    """Load the built-in plugin and the enabled installed ones.

    ``names`` are entry-point names; ``None`` enables every installed plugin. The
    ``IKKUNA_PLUGINS`` environment variable narrows the selection further (unless
    ``environment=False``). A plugin that fails to load raises :class:`PluginError` when it
    was asked for by name (in ``names`` or ``IKKUNA_PLUGINS``); otherwise it is skipped with
    a :class:`PluginWarning` naming the cause. With ``strict=False`` every failure is only
    recorded in ``registry.plugins`` (with its error), which is what ``ikkuna plugins`` shows.
    """
    registry = PluginRegistry()
    core = PluginInfo(BUILTIN_NAME, "ikkuna-core", _core_version(), "ikkuna_core.builtin")
    core.enabled = True
    registry.register(builtin, core)
    eps = installed_entry_points()
    available = {ep.name for ep in eps}
    requested = None if names is None else list(names)
    if requested is not None:
        _check_requested(requested, available)
    env = _env_selection() if environment else None
    if env:
        _warn_unknown_env(env - available, available)
    by_name: dict[str, list[EntryPoint]] = {}
    for ep in eps:
        by_name.setdefault(ep.name, []).append(ep)
    for group in by_name.values():
        ep = group[0]
        info = _describe(ep)
        enabled = (requested is None or ep.name in requested) and (env is None or ep.name in env)
        info.enabled = enabled
        if not enabled:
            registry.plugins.setdefault(ep.name, info)
            continue
        try:
            _load(registry, group, info)
        except PluginError as exc:
            named = (requested is not None and ep.name in requested) or env is not None
            if strict and named:
                raise
            info.error = str(exc)
            if not (ep.name in registry.plugins and registry.plugins[ep.name].loaded):
                registry.plugins[ep.name] = info
            if strict:
                warnings.warn(f"{exc}; skipped", PluginWarning, stacklevel=2)
    return registry


def _check_requested(requested: list[str], available: set[str]) -> None:
    unknown = [n for n in requested if n not in available]
    if unknown:
        raise UnknownPluginError(
            f"unknown plugin(s) {', '.join(map(repr, unknown))}; installed plugins: "
            f"{', '.join(sorted(available)) or '(none)'}; a plugin is a distribution "
            "that registers an 'ikkuna' entry point: install it with pip (from a clone of "
            "Ikkuna: pip install ./plugins/<folder>), then see `ikkuna plugins`"
        )


def _load(registry: PluginRegistry, group: list[EntryPoint], info: PluginInfo) -> None:
    """Import the one entry point of a plugin name and register it; any failure (several
    distributions registering the name too) is a PluginError naming it."""
    if len(group) > 1:
        raise PluginError(_twins(group))
    ep = group[0]
    try:
        plugin = ep.load()
    except Exception as exc:
        raise PluginError(
            f"plugin {ep.name!r} (distribution {info.distribution} {info.version}, "
            f"{ep.value}) failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    registry.register(plugin, info)


def _twins(group: list[EntryPoint]) -> str:
    """The error for a plugin name that several installed distributions register: which one
    would load depends on the order of ``sys.path``, so neither does."""
    who = " and ".join(
        f"{i.distribution} {i.version} ({i.value})" for i in map(_describe, group)
    )
    dists = sorted({str(i.distribution) for i in map(_describe, group)})
    return (
        f"the plugin name {group[0].name!r} is registered by {len(group)} installed "
        f"distributions: {who}; neither is loaded. Uninstall all but one "
        f"(pip uninstall {' or '.join(dists)})"
    )


#: Names from IKKUNA_PLUGINS already reported as not installed (said once per process).
_UNKNOWN_ENV_REPORTED: set[str] = set()


def _warn_unknown_env(unknown: set[str], available: set[str]) -> None:
    """``IKKUNA_PLUGINS`` names plugins that are not installed (a typo, a missing pip
    install): nothing of theirs loads. Said once per process and name."""
    new = sorted(unknown - _UNKNOWN_ENV_REPORTED)
    if not new:
        return
    _UNKNOWN_ENV_REPORTED.update(new)
    warnings.warn(
        f"{ENV_VAR} names plugin(s) {', '.join(map(repr, new))} that are not installed, so "
        f"nothing of them is loaded; installed plugins: "
        f"{', '.join(sorted(available)) or '(none)'}. Fix the name, or install the plugin "
        "with pip (from a clone of Ikkuna: pip install ./plugins/<folder>)",
        PluginWarning,
        stacklevel=3,
    )


def _core_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ikkuna-core")
    except PackageNotFoundError:
        return None
