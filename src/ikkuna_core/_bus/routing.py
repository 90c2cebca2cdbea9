"""The MessageBus: hands each step's payloads to the subscribers that want the step, collects
their results (one message per subscriber, topic and step; :mod:`.results`), makes results
available to later subscribers as topics of their own, and moves them to the backends with
one device-to-host copy per step (:mod:`.transfer`).

Routing and delivery only: the bus never touches torch hooks (the Exporter does) and computes
no metric (subscribers do). It is given a clock (a callable returning the current stamp), not
the Exporter."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import torch

from .. import ops
from ..cost import CostMeter
from ..errors import IkkunaError
from ..messages import ModuleInfo, StepBundle, TopicPayloads
from ..topics import TopicSpec, builtin_topics
from .consumer import Consumer
from .policy import ErrorPolicy
from .results import Results, payloads_of, values_message
from .shards import FailedOnAnotherRank, Merges
from .transfer import Outbox

if TYPE_CHECKING:
    from ..backends.base import Backend

__all__ = ["FINITENESS", "FINITENESS_IF_LOSS", "Handle", "MessageBus", "Stamp", "Subscription",
           "UnknownTopicError"]

#: (global_step, epoch, batch_index) of a step.
Stamp = tuple[int, int, int]
#: Steps a synchronized subscription may stay incomplete before it is reported.
_INCOMPLETE_WARN_AFTER = 3
_NOTHING: frozenset[str] = frozenset()
_T = TypeVar("_T")
_C = TypeVar("_C", bound=Consumer)
#: Per watched module, how a forward topic is captured: -1 not at all, 0 whole, k > 0 a
#: sample of k entries, :data:`FINITENESS` only a finiteness check; None when no module is.
Plan = tuple[int, ...] | None
#: The capture mode of a module's topic whose subscribers all want only a finiteness check
#: of each payload (``Subscriber.finiteness_only``): reduced in the hooks, not kept.
FINITENESS = -4
#: A finiteness check of a forward topic (``activations``, ``inputs``) that every subscriber
#: needs only at a step whose loss is not finite (``Subscriber.finite_loss_clears_forward``):
#: where the loss is seen finite on the host at no cost (a CPU tensor), nothing is read.
FINITENESS_IF_LOSS = -7
_GATED_TOPICS = ("activations", "inputs")
#: The plans of ``activations``, ``layer_gradients`` and ``inputs``.
Plans = tuple[Plan, Plan, Plan]


class UnknownTopicError(ValueError):
    """A subscription named a topic that no one publishes."""


class Handle(Generic[_T]):
    """Removes what a registration added (``.remove()``, or leaving a ``with`` block);
    ``target`` is what was registered."""

    def __init__(self, target: _T, remove: Callable[[], None]) -> None:
        self.target = target
        self._remove: Callable[[], None] | None = remove

    def remove(self) -> None:
        remove, self._remove = self._remove, None
        if remove is not None:
            remove()

    def __enter__(self) -> _T:
        return self.target

    def __exit__(self, *exc: object) -> None:
        self.remove()


@dataclass(eq=False)
class Subscription:
    """One subscriber's subscription: its topics and every how many steps it runs."""

    subscriber: Any
    topics: tuple[str, ...]
    subsample: int = 1
    synchronized: bool = False
    #: steps at which it was due but some topic had no payload (synchronized only)
    incomplete: int = 0
    completed: int = 0

    def wants(self, step: int) -> bool:
        return step % self.subsample == 0 and self.subscriber.enabled


class _BusLike(Protocol):
    def subscribe(self, subscriber: _C) -> Handle[_C]: ...
    def attach_backend(self, backend: Backend) -> Handle[Backend]: ...
    def _unsubscribe(self, subscriber: object, added: Sequence[str] = ()) -> None: ...


class _OldNames:
    """The names before the handles, kept for one release."""

    def register_subscriber(self: _BusLike, subscriber: _C) -> _C:
        """Deprecated: ``exporter.subscribe(subscriber)`` (or ``bus.subscribe``)."""
        _deprecated("bus.register_subscriber(s)", "exporter.subscribe(s), which returns a handle")
        return self.subscribe(subscriber).target

    def unregister_subscriber(self: _BusLike, subscriber: object) -> None:
        """Deprecated: ``handle.remove()`` on the handle ``subscribe`` returned."""
        _deprecated("bus.unregister_subscriber(s)", "handle.remove() (subscribe returns it)")
        self._unsubscribe(subscriber)

    def add_backend(self: _BusLike, backend: Backend) -> Backend:
        """Deprecated: ``exporter.add_backend(backend)`` (or ``bus.attach_backend``)."""
        _deprecated("bus.add_backend(b)", "exporter.add_backend(b), which returns a handle")
        return self.attach_backend(backend).target


class MessageBus(_OldNames):
    """Delivers steps to subscriptions and metric results to backends.

    Each bus has its own topic table, so registering a topic on one bus never changes another.
    ``on_error``: ``"warn"`` disables a failing subscriber (or backend) with a warning and
    training goes on; ``"raise"`` stops with a :class:`~ikkuna_core.SubscriberError` (or
    :class:`~ikkuna_core.BackendError`). ``flush_every``: steps between backend writes.
    ``clock``: the current (step, epoch, batch) for values written between steps.
    """

    def __init__(
        self, *, on_error: str = "warn", flush_every: int = 1,
        clock: Callable[[], Stamp] | None = None,
    ) -> None:
        self.policy = ErrorPolicy(on_error)
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.flush_every = flush_every
        self.clock: Callable[[], Stamp] = clock or (lambda: (0, 0, 0))
        self.results = Results()
        self.subscriptions: list[Subscription] = []
        self._topics: dict[str, TopicSpec] = {t.name: t for t in builtin_topics()}
        self._outbox = Outbox(self.policy)
        self._listeners: list[Callable[[], None]] = []
        self._active_cache: dict[int, tuple[Subscription, ...]] = {}
        self._plans: dict[tuple[tuple[Subscription, ...], int], Plans] = {}
        self._period = 1  # the subscriptions' subsample periods repeat after this many steps
        self._consumed: frozenset[str] = frozenset()
        self.cost = CostMeter(self)  # measured cost per subscriber; the budget
        self.merges = Merges()  # sharded payloads: shards, merges, gathers
        self._outbox.host_records = self.cost.records  # written with every flush

    on_error = property(lambda self: self.policy.on_error, doc="``'warn'`` or ``'raise'``")

    @property
    def backends(self) -> list[Backend]:
        """The backends results are written to."""
        return self._outbox.backends

    def set_clock(self, clock: Callable[[], Stamp]) -> None:
        """Stamp values written between steps (:meth:`log_scalars`) with ``clock()``."""
        self.clock = clock

    # ---------------------------------------------------------------- topics
    @property
    def topics(self) -> dict[str, TopicSpec]:
        """All topics this bus knows, by name."""
        return dict(self._topics)

    def register_topic(self, name: str, kind: str = "module", doc: str = "") -> TopicSpec:
        """Make a topic known (plugins' extra topics, subscribers' derived metrics)."""
        spec = self._topics.get(name)
        if spec is not None:
            if spec.kind != kind:
                raise ValueError(f"topic {name!r} is already registered as a {spec.kind} topic")
            return spec
        spec = self._topics[name] = TopicSpec(name=name, kind=kind, doc=doc)  # type: ignore[arg-type]
        return spec

    def check_topic(self, name: str) -> TopicSpec:
        if name not in self._topics:
            known = ", ".join(sorted(self._topics))
            raise UnknownTopicError(f"unknown topic {name!r}; known topics: {known}")
        return self._topics[name]

    # ----------------------------------------------------------- subscribers
    @property
    def subscribers(self) -> list[Any]:
        return [s.subscriber for s in self.subscriptions]

    def subscribe(self, subscriber: _C) -> Handle[_C]:
        """Subscribe ``subscriber`` to its topics and register the topics it publishes. A
        subscriber runs after every subscriber registered before it, so it can consume their
        results in the same step. The handle unsubscribes it."""
        topics = list(subscriber.options.topics)
        if not topics:
            raise ValueError(f"subscriber {subscriber.name!r} has no topics to subscribe to")
        kinds = {self.check_topic(t).kind for t in topics}
        outputs = subscriber.output_topics()
        for out in outputs:
            if out in topics:
                raise ValueError(
                    f"subscriber {subscriber.name!r} would publish its results under its own "
                    f"input topic {out!r}; choose another publish_as"
                )
            if out in self._topics and not _derived_by_other(self.subscriptions, out, subscriber):
                raise ValueError(
                    f"subscriber {subscriber.name!r} would publish under {out!r}, which is "
                    "already a topic of this bus; choose another publish_as"
                )
        subscriber.bind(self)
        out_kind = subscriber.output_kind or ("module" if "module" in kinds else "network")
        added = [out for out in outputs if out not in self._topics]
        for out in outputs:
            self.register_topic(out, out_kind, doc=f"published by subscriber {subscriber.name!r}")
        self.subscriptions.append(Subscription(
            subscriber, tuple(topics), subscriber.options.subsample, subscriber.synchronized
        ))
        self._changed()
        return Handle(subscriber, lambda: self._unsubscribe(subscriber, added))

    def _unsubscribe(self, subscriber: object, added: Sequence[str] = ()) -> None:
        """Remove ``subscriber`` and the topics it ``added`` that no one else publishes."""
        self.subscriptions = [s for s in self.subscriptions if s.subscriber is not subscriber]
        published = {t for s in self.subscriptions for t in s.subscriber.output_topics()}
        for topic in set(added) - published:
            self._topics.pop(topic, None)
        self._changed()

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever the set of subscriptions changes (the Exporter uses
        this to install exactly the hooks that subscribed topics need)."""
        self._listeners.append(callback)

    def _changed(self) -> None:
        self._active_cache.clear()
        self._plans.clear()
        self._consumed = frozenset(t for s in self.subscriptions for t in s.topics)
        self._period = math.lcm(1, *(s.subsample for s in self.subscriptions))
        for cb in self._listeners:
            cb()

    def subscribed_topics(self) -> frozenset[str]:
        """Topics at least one subscription listens to."""
        return self._consumed

    def active(self, step: int) -> tuple[Subscription, ...]:
        """The subscriptions due at ``step`` (after subsampling), in registration order."""
        subs, period = self.subscriptions, self._period
        phase = step % period if period <= 10_000 else step
        cached = self._active_cache.get(phase)
        if cached is None or any(not s.subscriber.enabled for s in cached):
            cached = tuple(s for s in subs if s.wants(step))
            if period <= 10_000:
                self._active_cache[phase] = cached
        return cached

    def set_cadence(self, sub: Subscription, cadence: int) -> None:
        """Run ``sub`` every ``cadence`` steps from the next step on (the budget's choice;
        its configured ``subsample`` stays in ``sub.subscriber.options``)."""
        if cadence < 1:
            raise ValueError(f"cadence must be >= 1, got {cadence}")
        sub.subsample = cadence
        self._changed()  # which subscriptions are due when, and their capture plans

    def wanted_topics(self, step: int) -> frozenset[str]:
        """Topics some subscription wants at ``step`` (after subsampling)."""
        active = self.active(step)
        return frozenset(t for s in active for t in s.topics) if active else _NOTHING

    def capture_plans(self, step: int, modules: Sequence[ModuleInfo]) -> Plans:
        """Per watched module, how ``activations``, ``layer_gradients`` and ``inputs`` are
        captured at ``step``: skipped, whole, or a sample of k entries, from what the
        subscriptions due ask for (``sample_size``, ``finiteness_only``, ``wants_module``)."""
        active = self.active(step)
        key = (active, id(modules))
        plans = self._plans.get(key)
        if plans is None:
            plans = self._plans[key] = (_plan(active, modules, "activations"),
                                        _plan(active, modules, "layer_gradients"),
                                        _plan(active, modules, "inputs"))
        return plans

    # ------------------------------------------------------------- delivery
    def deliver(self, stamp: Stamp, payloads: dict[str, TopicPayloads]) -> None:
        """Hand one step's payloads to every subscription due at the step, in registration
        order (each one sees the results of those before it), then write to the backends
        every ``flush_every`` steps. Subscribers run under ``torch.no_grad()``."""
        step = stamp[0]
        self.cost.begin(step)
        active = self.active(step)
        if active:
            with torch.no_grad(), ops.shared_norms():
                self._run(stamp, payloads, active)
        if (step + 1) % self.flush_every == 0:
            self.flush(wait=False)
        self.cost.end()

    def deliver_skipped(self, stamp: Stamp, payloads: dict[str, TopicPayloads]) -> None:
        """Hand the payloads of an attempt whose optimizer step was skipped to the
        subscriptions due at ``stamp``'s step whose subscriber sees skipped steps (the step
        keeps its number: the next attempt is delivered under it too). Results are written
        with the next flush."""
        due = tuple(s for s in self.active(stamp[0]) if s.subscriber.sees_skipped_steps)
        if due:
            with torch.no_grad(), ops.shared_norms():
                self._run(stamp, payloads, due, skipped=True)

    def deliver_event(self, stamp: Stamp, topic: str) -> None:
        """Hand an event that happens between steps (``epoch_finished``) to the subscriptions
        of that topic due at ``stamp``'s step."""
        due = tuple(s for s in self.active(stamp[0]) if topic in s.topics)
        if due:
            with torch.no_grad(), ops.shared_norms():
                self._run(stamp, {topic: TopicPayloads.event(topic)}, due)

    def _run(
        self, stamp: Stamp, payloads: dict[str, TopicPayloads],
        active: Sequence[Subscription], skipped: bool = False,
    ) -> None:
        merges = self.merges
        available = merges.begin(payloads, active, stamp[0], self.subscriptions)  # .shards, .ddp
        held: dict[Subscription, object] = {}  # subscribers waiting for a merge of shards

        def finish(sub: Subscription, exc: Exception | None) -> None:
            _finished(self, sub, exc, stamp, payloads, available)
        running = {id(s) for s in active}
        for sub in merges.settle_points(active, self.subscriptions, stamp[0]):
            merges.settle(held, self.results, finish, before=sub)  # if it reads their results
            if id(sub) not in running or not sub.subscriber.enabled:
                continue
            parts = _parts(sub, merges.source(sub, available), stamp, self.policy)
            if not parts:
                continue
            bundle = StepBundle(
                global_step=stamp[0], epoch=stamp[1], batch_index=stamp[2], payloads=parts,
                skipped=skipped,
            )
            self.results.open(sub.subscriber)
            token = self.cost.started()
            try:
                if merges.ddp is None:
                    sub.subscriber.compute_step(bundle)
                else:  # under DDP its work is counted at its first step (its placement)
                    with merges.ddp.measured(sub):
                        sub.subscriber.compute_step(bundle)
            except IkkunaError:
                # a subscriber raising an IkkunaError itself stops the run on purpose
                # (ikkuna-health's action = "raise"): it goes through, whatever on_error
                self.results.close(stamp)
                raise
            except Exception as exc:  # noqa: BLE001 - the error policy decides
                self.cost.stopped(sub, token)
                self.results.close(stamp)
                merges.fail(sub)  # told to the other ranks where it merges shards
                self._subscriber_failed(sub, exc, stamp, list(parts))
                continue
            self.cost.stopped(sub, token)
            if merges.waiting(sub.subscriber):
                held[sub] = self.results.hold()
            else:
                _published(self, sub, stamp, payloads, available)
        merges.settle(held, self.results, finish)
        merges.end(payloads, self._outbox.put)

    # ----------------------------------------------------------------- errors
    def _subscriber_failed(
        self, sub: Subscription, exc: BaseException, stamp: Stamp, topics: list[str]
    ) -> None:
        self.policy.subscriber_failed(sub.subscriber.name, exc, stamp[0], topics)
        sub.subscriber.enabled = False
        self._active_cache.clear()

    def internal_error(self, where: str, exc: BaseException, step: int) -> None:
        """An error inside Ikkuna's own hooks: raised as :class:`IkkunaError` with
        ``on_error = "raise"``; otherwise a warning (once per place) and training goes on."""
        self.policy.internal_error(where, exc, step)

    def warn_once(self, ident: str, message: str) -> None:
        """Warn ``message`` once per ``ident`` for this bus's run."""
        self.policy.warn_once(ident, message)

    # ------------------------------------------------------ front-end values
    def log_scalars(self, topic: str, values: Mapping[Any, float | torch.Tensor]) -> None:
        """Write scalars that no subscriber computed (a front end's epoch summaries) to the
        backends at the next flush, stamped with the clock's current step. The tag is
        ``<topic>/<key>`` (``<topic>`` for the key None)."""
        if values:
            self._outbox.put(values_message(self.clock(), topic, values))

    def log_text(self, tag: str, text: str) -> None:
        """Write a piece of text (Markdown in TensorBoard's TEXT tab) to every backend that
        shows text, stamped with the clock's current step."""
        step = self.clock()[0]
        for backend in self.backends:
            backend.write_text(tag, text, step)

    # -------------------------------------------------------------- backends
    def attach_backend(self, backend: Backend) -> Handle[Backend]:
        """Write results to ``backend`` from now on; the handle writes what is pending and
        detaches it (closing it stays its owner's business)."""
        self.backends.append(backend)
        return Handle(backend, lambda: self._detach_backend(backend))

    def _detach_backend(self, backend: Backend) -> None:
        if backend in self.backends:
            self.flush(wait=True)
            self.backends.remove(backend)

    def flush(self, wait: bool = True) -> None:
        """Start moving pending results to the host (one copy per device, asynchronous on
        CUDA) and write every transfer that has arrived to the backends; with ``wait``,
        everything pending is written before this returns."""
        self._outbox.flush(wait)

    def close(self) -> None:
        """Write what is pending and close every backend (those disabled by a failure too),
        even when the final write or a backend's close fails; the failures are then raised
        together, as one ExceptionGroup naming each backend."""
        self._outbox.close(before=self.cost.close)


def _published(
    bus: MessageBus, sub: Subscription, stamp: Stamp, payloads: dict[str, TopicPayloads],
    available: dict[str, TopicPayloads],
) -> None:
    """Close the open subscriber's results: to the backends, and as derived topics (under
    DDP, a subscription that shares its work hands them to the step's exchange)."""
    messages = bus.results.close(stamp)
    if bus.merges.hold(sub, messages):
        return
    for message in messages:
        bus._outbox.put(message)
        if message.topic in bus._consumed:
            available[message.topic] = payloads_of(message, _modules(payloads))


def _finished(
    bus: MessageBus, sub: Subscription, exc: Exception | None, stamp: Stamp,
    payloads: dict[str, TopicPayloads], available: dict[str, TopicPayloads],
) -> None:
    """A subscription that waited for a merge of shards is done (``exc``: it failed)."""
    if exc is None:
        return _published(bus, sub, stamp, payloads, available)
    bus.results.close(stamp)
    if isinstance(exc, FailedOnAnotherRank):
        if sub.subscriber.enabled:
            sub.subscriber.enabled = False
            bus.warn_once(f"merge-failed:{id(sub)}", (
                f"ikkuna: subscriber {sub.subscriber.name!r} failed on another rank and is "
                "disabled on this one too (its shards' ranks merge its statistics together)"))
        return None
    if isinstance(exc, IkkunaError):
        raise exc
    bus._subscriber_failed(sub, exc, stamp, list(sub.topics))


def _modules(payloads: dict[str, TopicPayloads]) -> dict[str | None, ModuleInfo | None]:
    """Every payload's key and module."""
    return {k: m for p in payloads.values() for k, m in zip(p.keys, p.modules, strict=True)}


def _parts(
    sub: Subscription, available: dict[str, TopicPayloads], stamp: Stamp, policy: ErrorPolicy
) -> dict[str, TopicPayloads] | None:
    """What ``sub`` receives of the available payloads (for a synchronized one: the keys
    all its topics have, or None; one that never had a complete set is reported)."""
    found = {t: available[t] for t in sub.topics if t in available and len(available[t])}
    if not sub.synchronized:
        return found
    aligned = _aligned(found, sub.topics)
    if aligned is None:
        sub.incomplete += 1
        if not sub.completed and sub.incomplete == _INCOMPLETE_WARN_AFTER:
            policy.warn_once(f"incomplete:{id(sub)}", _incomplete(sub, available, stamp))
        return None
    sub.completed += 1
    return aligned


def _plan(active: Sequence[Subscription], modules: Sequence[ModuleInfo], topic: str) -> Plan:
    subs = [s.subscriber for s in active if topic in s.topics]
    asks = [_ask(s, topic) for s in subs]
    plan = [_mode([a for s, a in zip(subs, asks, strict=True) if s.wants_module(info)])
            for info in modules] if subs else []
    return tuple(plan) if any(m != -1 for m in plan) else None


def _ask(sub: Consumer, topic: str) -> int | None:
    if not sub.finiteness_only(topic):
        return sub.sample_size(topic)
    if topic in _GATED_TOPICS and sub.finite_loss_clears_forward:
        return FINITENESS_IF_LOSS
    return FINITENESS


def _mode(asks: list[int | None]) -> int:
    """One module's capture mode from what its subscribers ask for: whole tensors if one
    wants them, or if finiteness checks and samples are both asked for; a check skipped
    at a finite loss only if every one of them allows it."""
    if not asks:
        return -1
    if all(a == FINITENESS_IF_LOSS for a in asks):
        return FINITENESS_IF_LOSS
    if all(a in (FINITENESS, FINITENESS_IF_LOSS) for a in asks):
        return FINITENESS
    if None in asks or FINITENESS in asks or FINITENESS_IF_LOSS in asks:
        return 0
    return max(k for k in asks if k is not None)


def _incomplete(sub: Subscription, available: dict[str, TopicPayloads], stamp: Stamp) -> str:
    """Why a synchronized subscription never received one complete set."""
    missing = [t for t in sub.topics if t not in available or not len(available[t])]
    why = f"{missing} had no payload" if missing else "its topics never had a key in common"
    return (
        f"subscriber {sub.subscriber.name!r} (synchronized over {list(sub.topics)}) has not "
        f"received one complete set in {sub.incomplete} steps up to step {stamp[0]}: {why}. "
        "Check that the model's own forward runs (not a submodule's), that the loss goes "
        "through the watched loss function (exporter.loss_fn, formerly exporter.set_loss), "
        "and that every topic is published at the same steps"
    )


def _derived_by_other(
    subscriptions: list[Subscription], topic: str, subscriber: Consumer
) -> bool:
    """Two subscribers of the same class may publish into one derived topic (e.g. two
    ``norm`` subscribers with different subsample on different topics)."""
    return any(
        type(s.subscriber) is type(subscriber) and topic in s.subscriber.output_topics()
        for s in subscriptions
    )


def _aligned(
    parts: dict[str, TopicPayloads], topics: Sequence[str]
) -> dict[str, TopicPayloads] | None:
    """The payloads of ``topics`` restricted to the keys present in all of them, in the
    first topic's order; None when a topic is missing or no key is common."""
    if len(parts) < len(topics):
        return None
    ordered = [parts[t] for t in topics]
    first = ordered[0].keys
    if all(p.keys == first for p in ordered[1:]):
        return {t: parts[t] for t in topics}
    positions = [{k: i for i, k in enumerate(p.keys)} for p in ordered]
    common = [k for k in first if all(k in pos for pos in positions[1:])]
    if not common:
        return None
    return {
        t: p.select([pos[k] for k in common])
        for t, p, pos in zip(topics, ordered, positions, strict=True)
    }


def _deprecated(old: str, new: str) -> None:
    import warnings

    warnings.warn(f"ikkuna: {old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)
