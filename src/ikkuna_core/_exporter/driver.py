"""The step driver: torch's hooks feed the :class:`StepClock`, and what it decides is done
here: capture at a step's first forward, read the optimizer's gradients and updates, and
hand each ended step's payloads to the bus in one call."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .. import ops
from .._bus import MessageBus
from ..messages import ModuleInfo, TopicPayloads
from .capture import Capture, Stash
from .clock import Act, Ended, Stamp, StepClock
from .diagnostics import Diagnostics
from .hooks import Callbacks, Hooks, guard, in_backward
from .loss import LossWatch
from .params import Parameters, Versioned
from .selection import unwrap_model

__all__ = ["StepDriver"]


class StepDriver:
    """Everything attached to one watched model: its parameters, hooks, capture and loss
    watch, driven by ``clock`` and delivering to ``bus``."""

    def __init__(
        self, model: nn.Module, watched: Sequence[tuple[ModuleInfo, nn.Module]],
        restricted: bool, clock: StepClock, bus: MessageBus, publish_in_eval: bool,
    ) -> None:
        self.clock, self.bus, self.publish_in_eval = clock, bus, publish_in_eval
        self._model_name = type(model).__name__
        #: the torch.compile backend of the step's metric path (None: eager; ops.compiled)
        self.compile_backend: str | None = None
        infos = [info for info, _ in watched]
        self.params = Parameters(unwrap_model(model), infos, restricted, clock.forget)
        self.capture = Capture(infos, self.report, [module for _, module in watched])
        self.capture.meter = bus.cost
        self.loss = LossWatch(clock, self.capture)
        self._diagnostics = Diagnostics(bus.warn_once)
        self._on_optimizer_grads: Callable[[], None] = self.sync
        callbacks = Callbacks(
            forward_start=self._on_forward_start, forward_end=self.loss.on_forward_end,
            module_forward=self.capture.on_module_forward,
            module_traced=self.capture,
            grad_accumulated=self._on_grad_accumulated,
            optimizer_pre=self._on_optimizer_pre, optimizer_post=self._on_optimizer_post,
        )
        self.hooks = Hooks(model, [m for _, m in watched],
                           [(p.kind, p.tensor) for p in self.params.params], callbacks)

    def sync(self) -> None:
        """Install exactly the hooks the subscribed topics need."""
        if self.clock.closed:
            return
        clock = self.clock
        clock.watch_skips = any(getattr(s.subscriber, "sees_skipped_steps", False)
                                for s in self.bus.subscriptions)
        # a subscriber that sees skipped steps keeps the gradient-accumulated hooks: a
        # skipped step's gradients are only seen there
        self.hooks.sync(self.bus.subscribed_topics(),
                        clock.grads_from_optimizer and not clock.watch_skips)

    def watch_loss(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Watch a loss called as ``loss_fn(output, target)``: an ``nn.Module`` loss is
        hooked in place and returned, a plain function returned wrapped."""
        if isinstance(loss_fn, nn.Module):
            self.hooks.watch_loss(loss_fn, self.loss.on_loss_module)
            self.loss.watched = True
            return loss_fn
        return self.loss.wrap(loss_fn)

    def remove(self) -> None:
        """Remove every hook and forget the parameter copies."""
        self.hooks.remove()
        self.capture.tellers.remove()
        self.params.snapshot.clear()
        self.capture.stop()

    def report(self, where: str, exc: BaseException) -> None:
        self.bus.internal_error(where, exc, self.clock.global_step)

    # ----------------------------------------------------------------- hooks
    def _on_forward_start(self, module: nn.Module, args: tuple[Any, ...], kwargs: Any) -> None:
        self.forward(module.training, args, kwargs, external=False)

    def forward(
        self, training: bool, args: tuple[Any, ...], kwargs: Any, *, external: bool
    ) -> None:
        """A forward began (``external``: announced by an integration; one inside a backward
        is activation checkpointing's recomputation)."""
        capture = self.capture
        with guard(self.report, "the model's forward pre-hook", capture.stop):
            training = (training and torch.is_grad_enabled()) or self.publish_in_eval
            act = self.clock.forward(training=training, external=external,
                                     recomputed=in_backward())
            self.act(act)
            if act & Act.CAPTURE and capture.wanted:
                plans = self.bus.capture_plans(self.clock.global_step, capture.modules)
                capture.begin(plans, args, kwargs)
            elif act & (Act.CAPTURE | Act.NO_CAPTURE):
                capture.stop()

    def _on_grad_accumulated(self, index: int, tensor: torch.Tensor) -> None:
        if self.clock.open:
            self.params.accumulated(index, tensor)

    def _on_optimizer_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.clock.closed or self.clock.silent:
            return
        params, cost = self.params, self.bus.cost
        started = cost.clock()
        with guard(self.report, "the optimizer pre-step hook", self.clock.optimizer_failed):
            indices, token = params.of_optimizer(optimizer)
            if not indices:
                return  # not an optimizer of this model
            # torch hands the hook the step's arguments with the optimizer itself first
            closure = (args[1] if len(args) > 1 else kwargs.get("closure")) is not None
            act = self.clock.optimizer_pre(token, closure=closure)
            if act & Act.OPTIMIZER_GRADS:
                self.sync()  # gradients now come from here
            self.act(act)
            if act & Act.READ_GRADS:
                params.read_grads(indices, self.capture.wanted)
            if act & Act.SNAPSHOT:
                params.take_snapshot(indices, self.capture.wanted)
            cost.own(cost.clock() - started)

    def _on_optimizer_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        params = self.params
        seen = params.seen(optimizer)
        if seen is None:
            return
        cost = self.bus.cost
        started = cost.clock()
        with guard(self.report, "the optimizer post-step hook"):
            indices, token = seen
            act = self.clock.optimizer_post(token)
            if act & Act.READ_GRADS:
                params.read_grads(indices, self.capture.wanted)
            if act & Act.UPDATES:
                params.take_updates(indices)
            cost.own(cost.clock() - started)
            self.act(act)

    # ------------------------------------------------------------- the step
    def act(self, act: int) -> None:
        """Do what the clock decided: end the open step, open the next, or hand a skipped
        attempt over."""
        if act & Act.SKIPPED:
            self._deliver_skipped()
        if act & Act.END:
            assert self.clock.last_ended is not None
            self._finish_step(self.clock.last_ended)
        if act & Act.OPEN:
            wanted = self.capture.wanted = self.bus.wanted_topics(self.clock.global_step)
            self.hooks.sync_step(wanted)

    def _finish_step(self, ended: Ended) -> None:
        """Hand the step's payloads to the bus and forget them."""
        self.bus.cost.step_ending()
        capture = self.capture
        capture.stop()
        stamp, wanted = ended.stamp, capture.wanted
        self._diagnostics.step_ended(
            ended, wanted, model=self._model_name,
            training_forwards=self.clock.training_forwards, loss_watched=self.loss.watched,
        )
        stash = capture.take()
        grads, updates = self.params.take_step()
        payloads = self._payloads(stamp, wanted, stash, grads, updates)
        with self._compiled():
            self.bus.deliver(stamp, payloads)

    def _deliver_skipped(self) -> None:
        """Hand an attempt whose optimizer step was skipped to the subscribers that see
        skipped steps: its forward, its layer gradients and its gradients as the backward
        left them (unscaled in place by a GradScaler; a gradient zeroed in place,
        ``set_to_none=False``, is left out). The step's capture then starts afresh."""
        stash = self.capture.take()
        grads, _ = self.params.take_step()
        params = self.params.params
        kept = {i: (grad, grad._version) for i, (grad, _) in grads.items()
                if params[i].tensor.grad is not grad}
        stamp = self.clock.stamp
        payloads = self._payloads(stamp, self.capture.wanted, stash, kept, {})
        with self._compiled():
            self.bus.deliver_skipped(stamp, payloads)

    def _compiled(self) -> contextlib.AbstractContextManager[None]:
        """The metric path's context: compiled with ``compile_backend`` when set."""
        if self.compile_backend is None:
            return contextlib.nullcontext()
        return ops.compiled(self.compile_backend)

    def _payloads(
        self, stamp: Stamp, wanted: frozenset[str], stash: Stash,
        grads: dict[int, Versioned], updates: dict[int, torch.Tensor],
    ) -> dict[str, TopicPayloads]:
        """The payloads of a step: parameters, forward, events (DTensors as they are: the
        bus gives each subscriber shards or full tensors, :mod:`.._bus.shards`)."""
        payloads: dict[str, TopicPayloads] = {}
        if not wanted:
            return payloads

        def report(where: str, exc: BaseException) -> None:
            self.bus.internal_error(where, exc, stamp[0])

        with guard(report, "collecting the step's payloads"):
            payloads = self.params.payloads(wanted, grads, updates, self.capture.valid)
            payloads.update(self.capture.payloads(stash, wanted))
            payloads.update(_events(wanted, stamp[2]))
        return payloads


def _events(wanted: frozenset[str], batch_index: int) -> dict[str, TopicPayloads]:
    """The event topics of a step (``epoch_started`` at an epoch's first)."""
    out: dict[str, TopicPayloads] = {
        t: TopicPayloads.event(t) for t in ("batch_started", "batch_finished") if t in wanted
    }
    if batch_index == 0 and "epoch_started" in wanted:
        out["epoch_started"] = TopicPayloads.event("epoch_started")
    return out
