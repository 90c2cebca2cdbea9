"""The step model as a pure state machine (no torch): fed by the events of a training loop
(forward began, loss called, optimizer pre/post-step, epoch end, close), it says when a step
opens and ends and what the Exporter does at each event (:class:`Act`). The rules are
described once, in ``docs/step-model.md``; ``tests/test_clock.py`` is their table."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Final, NamedTuple

__all__ = ["Act", "Ended", "StepClock"]

#: (global_step, epoch, batch_index) of a step.
Stamp = tuple[int, int, int]


class Act:
    """What the Exporter does in answer to an event, in this order: bit flags, combined with
    ``|`` and tested with ``&``. Plain ints, not an ``enum.Flag``: a Flag operation costs
    about 1.3 µs in CPython 3.11, and every training step does a few dozen of them."""

    NONE: Final = 0
    END: Final = 1  #: end the open step (deliver its payloads): ``StepClock.last_ended``
    OPEN: Final = 2  #: a new step opened: ask the bus what it wants
    CAPTURE: Final = 4  #: this forward is the step's first: capture its forward topics
    NO_CAPTURE: Final = 8  #: this forward captures nothing (later micro-batch, eval)
    OPTIMIZER_GRADS: Final = 16  #: gradients come from the optimizer from now on
    READ_GRADS: Final = 32  #: read the optimizer's gradients now
    SNAPSHOT: Final = 64  #: copy the optimizer's parameters (for their updates)
    UPDATES: Final = 128  #: take the optimizer's updates (after minus the copy)
    #: the open step's optimizer step was skipped (its gradients were reset without one):
    #: hand the attempt's payloads over and capture afresh, under the same step number
    SKIPPED: Final = 256


class Ended(NamedTuple):
    """A step that ended: its stamp, how many forwards it saw, whether an optimizer stepped
    in it, and whether its first forward's loss was never called (a tuple: one is made
    every step, a frozen dataclass costs several times as much)."""

    stamp: Stamp
    forwards: int
    stepped: bool
    loss_missing: bool


class StepClock:
    """The step model as a state machine. Optimizers are opaque hashable tokens; the
    caller tells the clock when one is gone (:meth:`forget`), so that a step does not wait
    for an optimizer that no longer exists. ``optimizer_exists`` is asked at most once;
    ``gradients_reset`` (whether the open step's gradients were reset or changed without an
    optimizer step) only while :attr:`watch_skips` and only at a forward that would
    otherwise accumulate (see ``docs/step-model.md``)."""

    def __init__(
        self,
        optimizer_exists: Callable[[], bool] = lambda: False,
        gradients_reset: Callable[[], bool] = lambda: False,
    ) -> None:
        self.global_step = -1  # index of the current (or last) training step
        self.epoch = 0
        self.batch_index = -1
        self.open = False
        self.closed = False
        self.silent = False
        self.loss_pending = False  # the step's first forward ran; its loss is still to come
        self.training_forwards = 0  # training forwards seen, ever
        self._optimizer_exists = optimizer_exists
        self._gradients_reset = gradients_reset
        #: some subscriber sees skipped steps: tell a skipped attempt from accumulation
        self.watch_skips = False
        self._has_optimizer: bool | None = None
        self._forwards = 0  # training forwards in the open step
        self._stepped: list[Hashable] = []  # optimizers that stepped in the open step
        self._expected: set[Hashable] = set()  # those that stepped in the last step
        self._inside: Hashable | None = None  # the optimizer whose step() is running
        self._closure = False
        self._seen_optimizer = False
        self._driven = False  # forwards are announced by an integration
        #: the step the last :data:`Act.END` ended
        self.last_ended: Ended | None = None

    # ------------------------------------------------------------------ reading
    @property
    def stamp(self) -> Stamp:
        """The open (or last) step's stamp."""
        return (self.global_step, self.epoch, self.batch_index)

    def now(self) -> Stamp:
        """The stamp of what happens now, never negative (a front end's values, an event)."""
        return (max(self.global_step, 0), self.epoch, max(self.batch_index, 0))

    @property
    def grads_from_optimizer(self) -> bool:
        """Whether an optimizer of the model has stepped: gradients are read at its step;
        until then (and in loops without one) when they are accumulated."""
        return self._seen_optimizer

    # ------------------------------------------------------------------- events
    def forward(
        self, *, training: bool, external: bool = False, recomputed: bool = False
    ) -> int:
        """A forward of the watched model began (``external``: announced by an integration;
        from the first such announcement on, the model's own forwards no longer count).
        ``training``: train mode with autograd on, or ``publish_in_eval``. ``recomputed``: it
        runs inside a backward (activation checkpointing recomputes a checkpointed forward
        there): no call, it counts nothing and changes nothing."""
        if recomputed:
            return Act.NONE
        if external:
            self._driven = True
        elif self._driven:
            return Act.NONE
        if self.silent or self.closed:
            return Act.NONE
        if not training:
            self.loss_pending = False
            return Act.NO_CAPTURE
        self.training_forwards += 1
        act: int = Act.NONE
        if self._inside is not None:  # a closure's forward inside optimizer.step()
            if not self.open:
                act |= self._open()
        elif self.open and (self._stepped or not (self._expected or self._optimizer_held())):
            act |= self._end() | self._open()  # no optimizer, or one that stepped only partly
        elif self.open and self.watch_skips and self._gradients_reset():
            act |= Act.SKIPPED  # the attempt's optimizer step was skipped: the step restarts
            self._forwards = 0
        elif not self.open:
            act |= self._open()
        self._forwards += 1
        first = self._forwards == 1
        self.loss_pending = first
        return act | (Act.CAPTURE if first else Act.NO_CAPTURE)

    def loss(self) -> bool:
        """The loss was called (or announced): whether it is the step's loss."""
        if self.loss_pending and not self.closed:
            self.loss_pending = False
            return True
        return False

    def optimizer_pre(self, optimizer: Hashable, *, closure: bool) -> int:
        """``optimizer.step()`` of an optimizer holding watched parameters is about to run."""
        if self.closed or self.silent:
            return Act.NONE
        act: int = Act.NONE
        if not self._seen_optimizer:
            self._seen_optimizer = True
            act |= Act.OPTIMIZER_GRADS
        if not self.open:
            if not (closure or optimizer in self._expected or self.global_step < 0):
                # it steps after the step it belongs to has ended (the second of two
                # optimizers, on the first step): expected from now on
                self._expected.add(optimizer)
                return act
            act |= self._open()
        self._inside, self._closure = optimizer, closure
        return act | (Act.SNAPSHOT if closure else Act.READ_GRADS | Act.SNAPSHOT)

    def optimizer_failed(self) -> None:
        """The Exporter's own work at the pre-step failed: the post-step is ignored."""
        self._inside = None

    def optimizer_post(self, optimizer: Hashable) -> int:
        """``optimizer.step()`` has run."""
        if self._inside is None or self._inside != optimizer:
            return Act.NONE
        self._inside = None
        act = Act.READ_GRADS | Act.UPDATES if self._closure else Act.UPDATES
        self._stepped.append(optimizer)
        if self._expected.issubset(self._stepped):
            act |= self._end()
        return act

    def epoch_finished(self) -> int:
        """The epoch ended: the open step ends, the next step starts a new epoch."""
        return self._end() if self.open else Act.NONE

    def next_epoch(self) -> None:
        """Count the next epoch (after ``epoch_finished`` is published)."""
        self.epoch += 1
        self.batch_index = -1

    def close(self) -> int:
        """The Exporter closes: the open step ends; later events are ignored."""
        act = self._end() if self.open else Act.NONE
        self.closed = True
        self.loss_pending = False
        return act

    def forget(self, optimizer: Hashable) -> None:
        """``optimizer`` no longer exists: no step waits for it."""
        self._expected.discard(optimizer)

    @contextmanager
    def silenced(self) -> Iterator[None]:
        """Events inside this block count nothing (evaluation forwards of a subscriber)."""
        saved = (self.silent, self.loss_pending)
        self.silent, self.loss_pending = True, False
        try:
            yield
        finally:
            self.silent, self.loss_pending = saved

    # ---------------------------------------------------------------- internals
    def _optimizer_held(self) -> bool:
        if self._has_optimizer is None:
            self._has_optimizer = bool(self._optimizer_exists())
        return self._has_optimizer

    def _open(self) -> int:
        self.global_step += 1
        self.batch_index += 1
        self.open = True
        self._forwards = 0
        self._stepped = []
        return Act.OPEN

    def _end(self) -> int:
        self.open = False
        self._inside = None
        if self._stepped:
            self._expected = set(self._stepped)
        self.last_ended = Ended(
            self.stamp, self._forwards, bool(self._stepped), self.loss_pending
        )
        self.loss_pending = False
        return Act.END
