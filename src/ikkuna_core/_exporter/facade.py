"""The Exporter: the only code that touches torch hooks. Its hooks only stash references (or,
for forward topics whose subscribers want samples, copy small samples); at the end of each
training step it hands everything the step's subscribers want to the bus in one call. When a
step opens and ends is the :class:`~ikkuna_core._exporter.clock.StepClock`'s to say (the
step model is written there once); what each topic is and when it is read is in
:mod:`ikkuna_core.topics` and the README."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn

from .. import _lifecycle
from .._bus import Consumer, Handle, MessageBus
from .._bus.ddp import DDPShare
from ..backends.base import Backend
from ..messages import ModuleInfo
from .clock import StepClock
from .driver import StepDriver
from .selection import check_depth, select_modules

__all__ = ["Exporter"]

_S = TypeVar("_S", bound=Consumer)


class Exporter:
    """Attaches to a model and publishes its training data on ``self.bus``.

    >>> exporter = Exporter(model, loss_fn, depth=-1)   # or include=(nn.Conv2d, nn.Linear)
    >>> loss_fn = exporter.loss_fn                      # a plain function comes back wrapped
    >>> exporter.subscribe(subscriber)                  # a handle: .remove(), or `with`
    >>> exporter.add_backend(backend)

    ``ik.watch(model, loss_fn, config)`` builds the same from a run configuration.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        *,
        depth: int = -1,
        include: Sequence[type[nn.Module]] | None = None,
        bus: MessageBus | None = None,
        publish_in_eval: bool = False,
        config: Any = None,
        registry: Any = None,
    ) -> None:
        check_depth(depth)
        self.depth = depth
        self.include = tuple(include) if include else None
        self.publish_in_eval = publish_in_eval
        self.bus = bus if bus is not None else MessageBus()
        self.config: Any = config  # the IkkunaConfig of a run started by watch()
        self.registry: Any = registry  # the PluginRegistry of a run started by watch()
        self.model: nn.Module | None = None
        self.modules: dict[str, ModuleInfo] = {}
        self.loss_fn: Callable[..., torch.Tensor] | None = None
        self.clock = StepClock(self._optimizer_exists, self._gradients_reset)
        self._on_close: list[Callable[[], None]] = []
        self._watched: list[tuple[ModuleInfo, nn.Module]] = []
        self._driver: StepDriver | None = None
        self.bus.set_clock(self.clock.now)
        self.bus.add_listener(self._subscriptions_changed)
        self._subscriptions_changed()
        if model is not None:
            try:
                self._attach(model)
                if loss_fn is not None:
                    self._watch_loss(loss_fn)
            except BaseException:
                if self._driver is not None:
                    self._driver.remove()  # all or nothing
                raise
        elif loss_fn is not None:
            raise TypeError("Exporter: loss_fn needs a model: Exporter(model, loss_fn, ...)")
        _lifecycle.opened(self)  # closed at exit and on SIGTERM if close() is never called

    # ----------------------------------------------------------------- state
    @property
    def global_step(self) -> int:
        """Index of the current (or last) training step; -1 before the first."""
        return self.clock.global_step

    @property
    def epoch(self) -> int:
        return self.clock.epoch

    @property
    def batch_index(self) -> int:
        """Index of the current (or last) step in its epoch; -1 before the epoch's first."""
        return self.clock.batch_index

    @property
    def watched_modules(self) -> list[tuple[ModuleInfo, nn.Module]]:
        """The watched modules, in order, with their identities."""
        return list(self._watched)

    @property
    def snapshots(self) -> list[torch.Tensor]:
        """The parameter copies kept for update topics (diagnostics: their memory)."""
        return [] if self._driver is None else list(self._driver.params.snapshot.values())

    @property
    def hook_count(self) -> int:
        """Number of hooks currently installed (diagnostics: pay only for what is used)."""
        return 0 if self._driver is None else self._driver.hooks.count

    # ---------------------------------------------------------- registration
    def subscribe(self, subscriber: _S) -> Handle[_S]:
        """Subscribe ``subscriber`` on this Exporter's bus; the handle unsubscribes it."""
        return self.bus.subscribe(subscriber)

    def add_backend(self, backend: Backend) -> Handle[Backend]:
        """Write results to ``backend`` too; the handle stops that (it does not close it)."""
        return self.bus.attach_backend(backend)

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when the Exporter closes, after the backends (how ``watch``
        tells plugins that the run finished)."""
        self._on_close.append(callback)

    def set_model(self, model: nn.Module) -> None:
        """Deprecated: pass the model to the constructor, ``Exporter(model, ...)``."""
        _deprecated("Exporter.set_model(model)", "Exporter(model, loss_fn, ...)")
        self._attach(model)

    def set_loss(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Deprecated: pass the loss to the constructor and use ``exporter.loss_fn``."""
        _deprecated("Exporter.set_loss(loss_fn)", "Exporter(model, loss_fn) and exporter.loss_fn")
        return self._watch_loss(loss_fn)

    # --------------------------------------------------------------- control
    def epoch_finished(self) -> None:
        """Close the running step, publish ``epoch_finished`` and start a new epoch."""
        self._check_open()
        self._act(self.clock.epoch_finished())
        self.bus.deliver_event(self.clock.now(), "epoch_finished")
        self.bus.flush()
        self.clock.next_epoch()

    @contextmanager
    def silenced(self) -> Iterator[None]:
        """Forwards inside this block publish nothing and count no step (the thesis'
        ``should_train=False``). Used by subscribers that evaluate the model."""
        capture = None if self._driver is None else self._driver.capture
        saved = None if capture is None else capture.plans
        if capture is not None:
            capture.stop()
        try:
            with self.clock.silenced():
                yield
        finally:
            if capture is not None and saved is not None:
                capture.plans = saved

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model in eval mode without autograd and without messages; every module's
        train/eval mode is restored afterwards."""
        model = self._require_model()
        modes = [(m, m.training) for m in model.modules()]  # e.g. a frozen BatchNorm stays
        model.eval()
        try:
            with torch.no_grad(), self.silenced():
                return model(*args, **kwargs)
        finally:
            for module, training in modes:
                module.training = training

    def announce_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A training forward announced by an integration (the Lightning callback, at each
        training batch), for code that never calls the watched model's own forward (a
        LightningModule whose training_step calls ``self.net``): it counts like a forward of
        the model, forward topics are captured from the watched modules, and
        ``args``/``kwargs`` (the batch) give ``input_data``. From the first call on, the
        model's own forward no longer counts."""
        training = self._require_model().training
        self._require_driver().forward(training, args, kwargs, external=True)

    def announce_loss(self, loss: torch.Tensor) -> None:
        """The step's loss, announced by an integration (Lightning's on_before_backward), for
        a loss computed without a watched loss function; the first of the step counts, and
        a watched loss function that already reported wins."""
        if self._driver is not None:
            self._driver.loss.announce(loss)

    def close(self) -> None:
        """Finish the running step, flush and close the backends, and remove every hook."""
        if self.clock.closed:
            return
        try:
            self._act(self.clock.close())
        finally:
            if self._driver is not None:
                self._driver.remove()
            _lifecycle.closed(self)
            try:
                self.bus.close()
            finally:
                for callback in self._on_close:
                    callback()

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ attaching
    def _attach(self, model: nn.Module) -> None:
        """Discover the modules and parameters to watch and attach the hooks subscribed
        topics need. Wrappers (DDP, ``torch.compile``) may be passed: names are those of the
        wrapped model."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"Exporter expects a torch.nn.Module, got {type(model).__name__}")
        if self.model is not None:
            raise RuntimeError("this Exporter already watches a model; create a new Exporter")
        self._check_open()
        selected = select_modules(model, self.depth, self.include)
        if not selected:
            raise ValueError(
                f"no module of {type(model).__name__} matches depth={self.depth}"
                f" include={[c.__name__ for c in self.include or ()]}"
            )
        self.model = model
        self.bus.cost.model = model  # timed on its device's clock
        for name, module in selected:
            info = self.modules[name] = ModuleInfo(name=name, type=type(module).__name__)
            self._watched.append((info, module))
        self.bus.merges.ddp = _ddp_share(model, self.bus, getattr(self.config, "ddp_forward",
                                                                  "rank"))
        self._driver = StepDriver(model, self._watched, self.include is not None, self.clock,
                                  self.bus, self.publish_in_eval)
        if getattr(self.config, "compile_metrics", False):
            self._driver.compile_backend = "inductor"
        self._driver.sync()

    def _watch_loss(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        self._check_open()
        self.loss_fn = self._require_driver().watch_loss(loss_fn)
        return self.loss_fn

    def _subscriptions_changed(self) -> None:
        """Bind the bus's subscribers to this Exporter and install exactly the hooks the
        subscribed topics need."""
        for subscriber in self.bus.subscribers:
            bind = getattr(subscriber, "watched_by", None)
            if bind is not None:
                bind(self)
        if self._driver is not None:
            self._driver.sync()

    def _act(self, act: int) -> None:
        if self._driver is not None:
            self._driver.act(act)

    def _optimizer_exists(self) -> bool:
        return self._driver is not None and self._driver.params.optimizer_exists()

    def _gradients_reset(self) -> bool:
        return self._driver is not None and self._driver.params.gradients_reset()

    def _check_open(self) -> None:
        if self.clock.closed:
            raise RuntimeError("this Exporter is closed")

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("no model: create the Exporter with one, Exporter(model, ...)")
        return self.model

    def _require_driver(self) -> StepDriver:
        if self._driver is None:
            raise RuntimeError("no model: create the Exporter with one, Exporter(model, ...)")
        return self._driver


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"ikkuna: {old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def _ddp_share(model: nn.Module, bus: MessageBus, forward: str) -> DDPShare | None:
    """Under DDP with more than one rank: the parameter topics' work shared between the
    ranks (identical there), one exchange per step; ``forward``: see ``ddp_forward``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return None
    group = model.process_group
    world = dist.get_world_size(group)
    if world < 2:
        return None
    share = DDPShare(dist.get_rank(group), world, group, bus)
    share.forward = "merge" if forward == "merge" else "rank"
    return share
