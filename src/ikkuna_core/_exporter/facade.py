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

from .._bus import Handle, MessageBus
from ..backends.base import Backend
from ..messages import ModuleInfo, TopicPayloads
from .capture import Capture
from .clock import Act, Ended, StepClock
from .diagnostics import Diagnostics
from .hooks import Callbacks, Hooks, guard
from .loss import LossWatch
from .params import Parameters, gathered
from .selection import check_depth, select_modules, unwrap_model

__all__ = ["Exporter"]

_S = TypeVar("_S")


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
        self.clock = StepClock(self._optimizer_exists)
        self._on_close: list[Callable[[], None]] = []
        self._watched: list[tuple[ModuleInfo, nn.Module]] = []
        self._params: Parameters | None = None
        self._hooks: Hooks | None = None
        self._capture = Capture([], self._report)
        self._loss = LossWatch(self.clock, self._capture)
        self._diagnostics = Diagnostics(self.bus.warn_once)
        self.bus.set_clock(self.clock.now)
        self.bus.add_listener(self._subscriptions_changed)
        self._subscriptions_changed()
        if model is not None:
            try:
                self._attach(model)
                if loss_fn is not None:
                    self._watch_loss(loss_fn)
            except BaseException:
                if self._hooks is not None:
                    self._hooks.remove()  # all or nothing
                raise
        elif loss_fn is not None:
            raise TypeError("Exporter: loss_fn needs a model: Exporter(model, loss_fn, ...)")

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
        return [] if self._params is None else list(self._params.snapshot.values())

    @property
    def hook_count(self) -> int:
        """Number of hooks currently installed (diagnostics: pay only for what is used)."""
        return 0 if self._hooks is None else self._hooks.count

    # ---------------------------------------------------------- registration
    def subscribe(self, subscriber: _S) -> Handle[_S]:
        """Subscribe ``subscriber`` on this Exporter's bus; the handle unsubscribes it."""
        return self.bus.subscribe(subscriber)  # type: ignore[type-var]

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
        capture = self._capture
        saved = (capture.act_plan, capture.lgrad_plan)
        capture.stop()
        try:
            with self.clock.silenced():
                yield
        finally:
            capture.act_plan, capture.lgrad_plan = saved

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
        self._forward(self._require_model().training, args, kwargs, external=True)

    def announce_loss(self, loss: torch.Tensor) -> None:
        """The step's loss, announced by an integration (Lightning's on_before_backward), for
        a loss computed without a watched loss function; the first of the step counts, and
        a watched loss function that already reported wins."""
        self._loss.announce(loss)

    def close(self) -> None:
        """Finish the running step, flush and close the backends, and remove every hook."""
        if self.clock.closed:
            return
        try:
            self._act(self.clock.close())
        finally:
            if self._hooks is not None:
                self._hooks.remove()
            if self._params is not None:
                self._params.snapshot.clear()
            self._capture.stop()
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
        for name, module in selected:
            info = self.modules[name] = ModuleInfo(name=name, type=type(module).__name__)
            self._watched.append((info, module))
        infos = [info for info, _ in self._watched]
        self._params = Parameters(unwrap_model(model), infos, self.include is not None,
                                  self.clock.forget)
        self._capture = Capture(infos, self._report)
        self._loss = LossWatch(self.clock, self._capture)
        callbacks = Callbacks(
            forward_start=self._on_forward_start, forward_end=self._loss.on_forward_end,
            module_forward=self._capture.on_module_forward,
            grad_accumulated=self._on_grad_accumulated,
            optimizer_pre=self._on_optimizer_pre, optimizer_post=self._on_optimizer_post,
        )
        self._hooks = Hooks(model, [m for _, m in self._watched],
                            [(p.kind, p.tensor) for p in self._params.params], callbacks)
        self._subscriptions_changed()

    def _watch_loss(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Watch a loss called as ``loss_fn(output, target)``: an ``nn.Module`` loss is
        hooked in place, a plain function wrapped; ``self.loss_fn`` is what to call."""
        self._check_open()
        if self._hooks is None:
            raise RuntimeError("no model: Exporter(model, loss_fn) watches a loss")
        if isinstance(loss_fn, nn.Module):
            self._hooks.watch_loss(loss_fn, self._loss.on_loss_module)
            self._loss.watched = True
            self.loss_fn = loss_fn
        else:
            self.loss_fn = self._loss.wrap(loss_fn)
        return self.loss_fn

    def _subscriptions_changed(self) -> None:
        """Bind the bus's subscribers to this Exporter and install exactly the hooks the
        subscribed topics need."""
        for subscriber in self.bus.subscribers:
            bind = getattr(subscriber, "watched_by", None)
            if bind is not None:
                bind(self)
        if self._hooks is not None and not self.clock.closed:
            self._hooks.sync(self.bus.subscribed_topics(), self.clock.grads_from_optimizer)

    # ----------------------------------------------------------------- hooks
    def _on_forward_start(self, module: nn.Module, args: tuple[Any, ...], kwargs: Any) -> None:
        self._forward(module.training, args, kwargs, external=False)

    def _forward(
        self, training: bool, args: tuple[Any, ...], kwargs: Any, *, external: bool
    ) -> None:
        capture = self._capture
        with guard(self._report, "the model's forward pre-hook", capture.stop):
            training = (training and torch.is_grad_enabled()) or self.publish_in_eval
            act = self.clock.forward(training=training, external=external)
            self._act(act)
            if act & Act.CAPTURE and capture.wanted:
                capture.begin(self.bus.capture_plans(self.global_step, capture.modules),
                              args, kwargs)
            elif act & (Act.CAPTURE | Act.NO_CAPTURE):
                capture.stop()

    def _on_grad_accumulated(self, index: int, tensor: torch.Tensor) -> None:
        if self.clock.open and self._params is not None:
            self._params.accumulated(index, tensor)

    def _on_optimizer_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        params = self._params
        if self.clock.closed or self.clock.silent or params is None:
            return
        with guard(self._report, "the optimizer pre-step hook", self.clock.optimizer_failed):
            indices, token = params.of_optimizer(optimizer)
            if not indices:
                return  # not an optimizer of this model
            # torch hands the hook the step's arguments with the optimizer itself first
            closure = (args[1] if len(args) > 1 else kwargs.get("closure")) is not None
            act = self.clock.optimizer_pre(token, closure=closure)
            if act & Act.OPTIMIZER_GRADS:
                self._subscriptions_changed()  # gradients now come from here
            self._act(act)
            if act & Act.READ_GRADS:
                params.read_grads(indices, self._capture.wanted)
            if act & Act.SNAPSHOT:
                params.take_snapshot(indices, self._capture.wanted)

    def _on_optimizer_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        params = self._params
        seen = None if params is None else params.seen(optimizer)
        if params is None or seen is None:
            return
        with guard(self._report, "the optimizer post-step hook"):
            indices, token = seen
            act = self.clock.optimizer_post(token)
            if act & Act.READ_GRADS:
                params.read_grads(indices, self._capture.wanted)
            if act & Act.UPDATES:
                params.take_updates(indices)
            self._act(act)

    # ------------------------------------------------------------- the step
    def _act(self, act: Act) -> None:
        """Do what the clock decided: end the open step, open the next."""
        if act & Act.END:
            assert self.clock.last_ended is not None
            self._finish_step(self.clock.last_ended)
        if act & Act.OPEN:
            self._capture.wanted = self.bus.wanted_topics(self.global_step)

    def _finish_step(self, ended: Ended) -> None:
        """Hand the step's payloads to the bus and forget them."""
        capture = self._capture
        capture.stop()
        stamp, wanted = ended.stamp, self._capture.wanted
        self._diagnostics.step_ended(
            ended, wanted, model=type(self.model).__name__,
            training_forwards=self.clock.training_forwards, loss_watched=self.loss_fn is not None,
        )
        stash = capture.take()
        grads, updates = ({}, {}) if self._params is None else self._params.take_step()
        payloads: dict[str, TopicPayloads] = {}
        if wanted:
            def report(where: str, exc: BaseException) -> None:
                self.bus.internal_error(where, exc, stamp[0])

            with guard(report, "collecting the step's payloads"):
                payloads = _payloads(wanted, self._capture.payloads(stash, wanted), self._params,
                                     grads, updates, self._capture.valid, self.batch_index)
        self.bus.deliver(stamp, payloads)

    # ------------------------------------------------------------ internals
    def _report(self, where: str, exc: BaseException) -> None:
        self.bus.internal_error(where, exc, self.global_step)

    def _optimizer_exists(self) -> bool:
        return self._params is not None and self._params.optimizer_exists()

    def _check_open(self) -> None:
        if self.clock.closed:
            raise RuntimeError("this Exporter is closed")

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("no model: create the Exporter with one, Exporter(model, ...)")
        return self.model


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"ikkuna: {old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def _payloads(
    wanted: frozenset[str], forward: dict[str, TopicPayloads], params: Parameters | None,
    grads: Any, updates: Any, valid: Any, batch_index: int,
) -> dict[str, TopicPayloads]:
    """A step's payloads: the parameter topics, the ``forward`` ones, the events."""
    out = {} if params is None else params.payloads(wanted, grads, updates, valid)
    out.update(forward)
    for topic in ("batch_started", "batch_finished"):
        if topic in wanted:
            out[topic] = TopicPayloads.event(topic)
    if batch_index == 0 and "epoch_started" in wanted:
        out["epoch_started"] = TopicPayloads.event("epoch_started")
    if params is not None and params.sharded:
        out = gathered(out)
    return out
