"""``watch``: everything a run configuration describes, attached in one call."""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError
from torch import nn

from ._bus import MessageBus, UnknownTopicError
from ._exporter import Exporter, modules_of, select_modules
from .backends.base import Backend
from .config import ConfigError, IkkunaConfig, key_path, load_config
from .context import RunContext
from .plugins import PluginError, PluginRegistry, UnknownPluginError, load_plugins
from .subscriber import Subscriber

__all__ = ["watch"]


def watch(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    config: str | Path | Mapping[str, Any] | IkkunaConfig | None = None,
    *,
    registry: PluginRegistry | None = None,
    context: RunContext | None = None,
    overwrite: bool = False,
) -> Exporter:
    """Attach an Exporter to ``model`` with the plugins, subscribers and backends of
    ``config`` (a TOML path, a dict with the keys of the ``[ikkuna]`` table, or an
    :class:`IkkunaConfig`). Use ``exporter.loss_fn`` as the loss when ``loss_fn`` is a plain
    function; an ``nn.Module`` loss is watched in place. ``context`` is what your run
    provides to the subscribers (a :class:`RunContext`: its test loader, say); the plugins
    take from it what their subscribers need.

    A log directory that already holds a run (event files, figures) is refused, as
    ``ikkuna train`` refuses it: two runs in one directory mix their curves.
    ``overwrite=True`` replaces that run: its files are removed once everything is attached.

    In a distributed run (``torch.distributed`` initialised: DDP, FSDP, Lightning), every
    rank watches and computes (subscribers may need every rank, e.g. for sharded
    parameters), and only rank 0 attaches the backends, unless ``ranks = "all"``: then each
    rank writes to ``<log_dir>/rank<r>``.

    All or nothing: the configuration and the log directory are validated before anything
    is attached or written (a :class:`ConfigError` naming the key), and if a later step fails
    (a backend's constructor, a plugin's ``ikkuna_run_started``) every hook attached so far is
    removed and the backends made so far are closed before the error propagates.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"watch expects a torch.nn.Module, got {type(model).__name__}")
    source = str(config) if isinstance(config, (str, Path)) else "the configuration"
    cfg = load_config(config)
    registry = _registry(cfg, registry, source)
    registry.hook.ikkuna_configure(config=cfg)

    # ---- validation: nothing below touches the model or the disk until "attach"
    bus = _bus(cfg, registry)
    include = _include(model, cfg, source)
    _subscribe_all(bus, cfg, registry, context or RunContext(), source)
    backend_classes = _backend_classes(cfg, registry, source)
    _check_log_dir(cfg.log_dir, f"{source}: ikkuna.log_dir")
    previous = _previous_run_checked(cfg, source, overwrite)

    # ---- attach: any failure from here on undoes everything attached so far
    exporter = Exporter(
        model, loss_fn, depth=cfg.depth, include=include, bus=bus,
        publish_in_eval=cfg.publish_in_eval, config=cfg, registry=registry,
    )
    try:
        _attach_backends(exporter, cfg, backend_classes, source)
        exporter.on_close(lambda: registry.hook.ikkuna_run_finished(exporter=exporter))
        registry.hook.ikkuna_run_started(exporter=exporter)
    except BaseException as exc:
        _undo(exporter, exc)
        raise
    for path in previous:  # validated and attached: only now replace the earlier run
        path.unlink(missing_ok=True)
    return exporter


def _registry(cfg: IkkunaConfig, registry: PluginRegistry | None, source: str) -> PluginRegistry:
    """The given registry, or the configured plugins loaded."""
    if registry is not None:
        return registry
    try:
        return load_plugins(cfg.plugins)
    except UnknownPluginError as exc:
        raise UnknownPluginError(f"{source}: ikkuna.plugins: {exc}") from None


def _bus(cfg: IkkunaConfig, registry: PluginRegistry) -> MessageBus:
    """The run's bus: its error policy, flush period, budget and the plugins' topics."""
    bus = MessageBus(on_error=cfg.on_error, flush_every=cfg.flush_every)
    bus.cost.budget = cfg.budget
    for topic in registry.topics:
        bus.register_topic(topic.name, topic.kind, topic.doc)
    return bus


def _include(
    model: nn.Module, cfg: IkkunaConfig, source: str
) -> tuple[type[nn.Module], ...] | None:
    """The ``include`` classes; some module of ``model`` must match them and the depth."""
    try:
        include = modules_of(cfg.include) if cfg.include else None
    except ValueError as exc:
        raise ConfigError(f"{source}: ikkuna.{exc}") from None
    if not select_modules(model, cfg.depth, include):
        key = "include" if include else "depth"
        raise ConfigError(
            f"{source}: ikkuna.{key}: no module of {type(model).__name__} matches "
            f"depth={cfg.depth} include={cfg.include}; use depth = -1 (leaf modules) or "
            "include classes the model has"
        )
    return include


def _subscribe_all(
    bus: MessageBus, cfg: IkkunaConfig, registry: PluginRegistry, context: RunContext,
    source: str,
) -> None:
    """Create and subscribe every configured subscriber; errors name the entry's key."""
    for i, entry in enumerate(cfg.subscribers):
        where = f"{source}: ikkuna.subscribers[{i}]"
        try:
            cls = registry.subscriber(entry.name)
        except PluginError as exc:
            raise ConfigError(f"{where}.name: {exc}") from None
        try:
            options = registry.subscriber_options(entry.name, entry.options, context)
        except PluginError as exc:
            raise ConfigError(f"{where} ({entry.name!r}): {exc}") from None
        subscriber = _make_subscriber(cls, options, source, i)  # it checks topics is not empty
        _check_publish_as(bus, subscriber, where)
        try:
            bus.subscribe(subscriber)
        except UnknownTopicError as exc:
            raise ConfigError(f"{where}.topics: {exc}") from None
        except ValueError as exc:  # e.g. a derived topic clashing with a topic's kind
            raise ConfigError(f"{where} ({entry.name!r}): {exc}") from None


def _backend_classes(
    cfg: IkkunaConfig, registry: PluginRegistry, source: str
) -> list[type[Backend]]:
    """The configured backend classes, their options checked against their constructors."""
    classes = []
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
        _check_backend_options(backend_cls, cfg.backend_options.get(name, {}), source, name)
        classes.append(backend_cls)
    unused = sorted(set(cfg.backend_options) - set(cfg.backends))
    if unused:
        raise ConfigError(
            f"{source}: ikkuna.backend_options: {unused} are not in ikkuna.backends {cfg.backends}"
        )
    return classes


#: What the core's backends leave in a log directory; any of them there means it holds a run.
RUN_FILES: tuple[str, ...] = ("events.out.tfevents.*", "figures/*.png")


def previous_run(log_dir: Path) -> list[Path]:
    """The files of an earlier run in ``log_dir`` (see :data:`RUN_FILES`); empty if none."""
    if not log_dir.is_dir():
        return []
    return sorted(p for pattern in RUN_FILES for p in log_dir.glob(pattern) if p.is_file())


def _previous_run_checked(cfg: IkkunaConfig, source: str, overwrite: bool) -> list[Path]:
    """The files of an earlier run in this rank's log directory, refused unless
    ``overwrite`` (then they are replaced once everything is attached)."""
    rank, _ = distributed_rank()
    log_dir = _rank_log_dir(cfg)
    writes = rank == 0 or cfg.ranks == "all"
    previous = previous_run(log_dir) if writes and cfg.backends else []
    if previous and not overwrite:
        shown = ", ".join(str(p.relative_to(log_dir)) for p in previous[:3])
        more = f" and {len(previous) - 3} more" if len(previous) > 3 else ""
        raise ConfigError(
            f"{source}: ikkuna.log_dir: {str(log_dir)!r} already holds a run ({shown}{more}); "
            "a second run there would mix with it in TensorBoard and the figures. Give "
            "another log_dir, or watch(..., overwrite=True) to replace that run"
        )
    return previous


def _rank_log_dir(cfg: IkkunaConfig) -> Path:
    """This rank's log directory: ``<log_dir>/rank<r>`` with ``ranks = "all"`` in a
    distributed run."""
    rank, world = distributed_rank()
    return cfg.log_dir / f"rank{rank}" if world > 1 and cfg.ranks == "all" else cfg.log_dir


def _attach_backends(
    exporter: Exporter, cfg: IkkunaConfig, classes: list[type[Backend]], source: str
) -> None:
    """Create the backends on the ranks that write (``ranks``), each told the modules."""
    rank, _ = distributed_rank()
    if not (rank == 0 or cfg.ranks == "all"):
        return  # ranks = "rank0": this rank's subscribers compute, nothing is written
    log_dir = _rank_log_dir(cfg)
    module_types = {key: info.type for key, info in exporter.modules.items()}
    for name, backend_cls in zip(cfg.backends, classes, strict=True):
        options = cfg.backend_options.get(name, {})
        try:
            backend = backend_cls(log_dir=log_dir, **options)
        except ValueError as exc:  # an option of the right name with a wrong value
            raise ConfigError(f"{source}: ikkuna.backend_options.{name}: {exc}") from None
        backend.describe_modules(module_types)
        exporter.add_backend(backend)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process in torch.distributed's default process group
    (DDP, FSDP, Lightning's strategies); (0, 1) when it is not initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _make_subscriber(
    cls: type[Subscriber], options: dict[str, Any], source: str, index: int
) -> Subscriber:
    """Create a subscriber; invalid options are reported by key path
    (``ikkuna.subscribers[0].subsample``)."""
    try:
        return cls(**options)
    except ValueError as exc:
        error = exc
    # Name each invalid option: validate with the subscriber's Options model, as its
    # constructor does (an omitted ``topics`` means the defaults).
    candidate = {**options, "topics": options.get("topics") or list(cls.default_topics)}
    try:
        cls.Options.model_validate(candidate)
    except ValidationError as invalid:
        lines = []
        for err in invalid.errors():
            path = key_path(("subscribers", index, *err["loc"]))
            if err["type"] == "extra_forbidden":
                valid = ", ".join(sorted(cls.Options.model_fields))
                lines.append(
                    f"{path}: unknown option of subscriber {cls.name!r}; valid options: {valid}"
                )
            else:
                msg = err["msg"].removeprefix("Value error, ")
                got = "" if err["type"] == "value_error" else f"got {err['input']!r}; "
                lines.append(f"{path}: {msg} ({got}subscriber {cls.name!r})")
        raise ConfigError(f"{source}: " + f"\n{source}: ".join(lines)) from None
    raise ConfigError(f"{source}: ikkuna.subscribers[{index}] ({cls.name!r}): {error}") from None


def _check_backend_options(
    backend_cls: type[Any], options: Mapping[str, Any], source: str, name: str
) -> None:
    """Each backend option against the type hint of the constructor's parameter (e.g.
    ``plot_every: Annotated[int, Field(ge=1)]``), before any backend writes a file."""
    try:
        hints = typing.get_type_hints(backend_cls.__init__, include_extras=True)
    except Exception:  # noqa: BLE001 - unresolvable hints: the constructor will judge
        return
    for option, value in options.items():
        if option not in hints:
            continue
        try:
            TypeAdapter(hints[option]).validate_python(value)
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(
                f"{source}: ikkuna.backend_options.{name}.{option}: {msg} (got {value!r})"
            ) from None
        except Exception:  # noqa: BLE001 - a hint pydantic cannot check
            continue


def _check_publish_as(bus: MessageBus, subscriber: Subscriber, where: str) -> None:
    """``publish_as`` must name a new topic: not one of the subscriber's inputs (its results
    would feed back into it forever), not a topic someone else publishes."""
    publish_as = getattr(subscriber.options, "publish_as", None)
    if publish_as is None:
        return
    if not publish_as:
        raise ConfigError(f"{where}.publish_as: must not be empty; name a new topic or omit it")
    inputs = set(subscriber.options.topics)
    known = bus.topics
    for out in subscriber.output_topics():
        if out in inputs:
            raise ConfigError(
                f"{where}.publish_as: {out!r} is one of the subscriber's own input topics "
                f"{sorted(inputs)}, so its results would feed back into it forever; "
                f"choose a new name such as '{subscriber.name}/{out}'"
            )
        if out in known:
            doc = known[out].doc
            raise ConfigError(
                f"{where}.publish_as: {out!r} is already a topic"
                + (f" ({doc})" if doc else "")
                + f"; choose a name no one publishes, such as '{subscriber.name}/{out}'"
            )


def _check_log_dir(log_dir: Path, where: str) -> None:
    """The backends can create and write ``log_dir``: it is a directory or can be made one,
    under a writable directory. Checked without writing anything."""
    if log_dir.exists() and not log_dir.is_dir():
        raise ConfigError(
            f"{where}: {str(log_dir)!r} exists and is not a directory; give a directory "
            "(it is created when missing)"
        )
    existing = log_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{where}: {str(log_dir)!r} cannot be created: {str(existing)!r} is a file; "
            "give a directory path"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{where}: {str(existing)!r} is not writable, so {str(log_dir)!r} cannot be "
            "written; give a directory you can write to"
        )


def _undo(exporter: Exporter, error: BaseException) -> None:
    """Detach a half-attached Exporter: every hook removed, the backends made so far closed,
    ``ikkuna_run_finished`` called if the run had started. A failure while undoing is added
    to ``error`` as a note; ``error`` itself propagates."""
    try:
        exporter.close()
    except Exception as exc:  # noqa: BLE001 - the original error is what the caller needs
        error.add_note(
            f"ikkuna: while detaching after this error, close() raised "
            f"{type(exc).__name__}: {exc}"
        )
