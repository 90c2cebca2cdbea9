"""``watch``: everything a run configuration describes, attached in one call."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from .bus import MessageBus, UnknownTopicError
from .config import ConfigError, IkkunaConfig, describe_validation_error, load_config
from .context import RunContext
from .exporter import Exporter, modules_of
from .plugins import PluginError, PluginRegistry, load_plugins
from .subscriber import Subscriber

__all__ = ["watch"]


def watch(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    config: str | Path | Mapping[str, Any] | IkkunaConfig | None = None,
    *,
    registry: PluginRegistry | None = None,
    context: RunContext | None = None,
) -> Exporter:
    """Attach an Exporter to ``model`` with the plugins, subscribers and backends of
    ``config`` (a TOML path, a dict with the keys of the ``[ikkuna]`` table, or an
    :class:`IkkunaConfig`). Use ``exporter.loss_fn`` as the loss when ``loss_fn`` is a plain
    function; an ``nn.Module`` loss is watched in place. ``context`` is what your run
    provides to the subscribers (a :class:`RunContext`: its test loader, say); the plugins
    take from it what their subscribers need.

    Everything is validated before anything is written, so a bad configuration leaves no
    half-made run behind.
    """
    source = str(config) if isinstance(config, (str, Path)) else "the configuration"
    cfg = load_config(config)
    if registry is None:
        registry = load_plugins(cfg.plugins)
    registry.hook.ikkuna_configure(config=cfg)

    bus = MessageBus(
        on_error=cfg.on_error, flush_every=cfg.flush_every, background=cfg.background
    )
    for topic in registry.topics:
        bus.register_topic(topic.name, topic.kind, topic.doc)
    try:
        include = modules_of(cfg.include) if cfg.include else None
    except ValueError as exc:
        raise ConfigError(f"{source}: ikkuna.{exc}") from None
    exporter = Exporter(
        cfg.depth,
        include,
        bus=bus,
        publish_in_eval=cfg.publish_in_eval,
        config=cfg,
        registry=registry,
    )
    run_context = context if context is not None else RunContext()

    for i, entry in enumerate(cfg.subscribers):
        where = f"{source}: ikkuna.subscribers[{i}]"
        try:
            cls = registry.subscriber(entry.name)
        except PluginError as exc:
            raise ConfigError(f"{where}.name: {exc}") from None
        try:
            options = registry.subscriber_options(entry.name, entry.options, run_context)
        except PluginError as exc:
            raise ConfigError(f"{where} ({entry.name!r}): {exc}") from None
        try:
            subscriber = cls(**options)
        except ValueError as exc:
            raise ConfigError(f"{where} ({entry.name!r}): {_explain(cls, options, exc)}") from None
        try:
            bus.register_subscriber(subscriber)
        except UnknownTopicError as exc:
            raise ConfigError(f"{where}.topics: {exc}") from None
    backend_classes = []
    for i, name in enumerate(cfg.backends):
        try:
            backend_cls = registry.backend(name)
            inspect.signature(backend_cls).bind(
                log_dir=cfg.log_dir, **cfg.backend_options.get(name, {})
            )
        except PluginError as exc:
            raise ConfigError(f"{source}: ikkuna.backends[{i}]: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{source}: ikkuna.backend_options.{name}: {exc}") from None
        backend_classes.append(backend_cls)
    unused = sorted(set(cfg.backend_options) - set(cfg.backends))
    if unused:
        raise ConfigError(
            f"{source}: ikkuna.backend_options: {unused} are not in ikkuna.backends {cfg.backends}"
        )

    exporter.set_model(model)
    if loss_fn is not None:
        exporter.set_loss(loss_fn)
    module_types = {key: info.type for key, info in exporter.modules.items()}
    for name, backend_cls in zip(cfg.backends, backend_classes, strict=True):
        backend = backend_cls(log_dir=cfg.log_dir, **cfg.backend_options.get(name, {}))
        backend.describe_modules(module_types)
        bus.add_backend(backend)
    exporter.on_close(lambda: registry.hook.ikkuna_run_finished(exporter=exporter))
    registry.hook.ikkuna_run_started(exporter=exporter)
    return exporter


def _explain(cls: type[Subscriber], options: Mapping[str, Any], exc: ValueError) -> str:
    """Why ``cls(**options)`` failed: each invalid option once, unknown ones with the valid
    keys (the subscriber's own message when its options are not the cause)."""
    data = dict(options)
    if not data.get("topics"):
        data["topics"] = list(cls.default_topics)
    try:
        cls.Options(**data)
    except ValidationError as err:
        details = "; ".join(describe_validation_error(err, cls.Options))
        return f"invalid options for subscriber {cls.name!r}: {details}"
    return str(exc)
