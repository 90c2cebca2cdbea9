"""The MessageBus: hands each step's payloads to the subscribers that want the step, collects
their results (one message per subscriber, topic and step), makes results available to later
subscribers as topics of their own, and moves them to the backends with one device-to-host
copy per step.

Routing and delivery only: the bus never touches torch hooks (the Exporter does) and computes
no metric (subscribers do)."""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .backends.base import HistogramRecord, ScalarRecord
from .cost import CostMeter
from .errors import BackendError, IkkunaError, SubscriberError
from .messages import HistogramsMessage, ModuleInfo, ScalarsMessage, StepBundle, TopicPayloads
from .ops import Histograms, group_by
from .topics import TopicSpec, builtin_topics

if TYPE_CHECKING:
    from .backends.base import Backend
    from .exporter import Exporter
    from .ops import Histograms
    from .subscriber import Subscriber

__all__ = ["MessageBus", "Stamp", "Subscription", "UnknownTopicError"]

#: (global_step, epoch, batch_index) of a step.
Stamp = tuple[int, int, int]
#: Steps a synchronized subscription may stay incomplete before it is reported.
_INCOMPLETE_WARN_AFTER = 3
#: Transfers to the host that may be in flight before the oldest is waited for.
_MAX_IN_FLIGHT = 2


class UnknownTopicError(ValueError):
    """A subscription named a topic that no one publishes."""


@dataclass(eq=False)
class Subscription:
    """One subscriber's subscription: its topics and every how many steps it runs."""

    subscriber: Subscriber
    topics: tuple[str, ...]
    subsample: int = 1
    synchronized: bool = False
    #: steps at which it was due but some topic had no payload (synchronized only)
    incomplete: int = 0
    completed: int = 0

    def wants(self, step: int) -> bool:
        return step % self.subsample == 0 and self.subscriber.enabled


@dataclass
class _Collected:
    """Results one subscriber published for one topic during its step."""

    keys: list[str | None] = field(default_factory=list)
    scalars: list[torch.Tensor] = field(default_factory=list)
    hists: list[Histograms] = field(default_factory=list)
    stamp: Stamp | None = None  # an earlier step's, for a value known one step late


class MessageBus:
    """Delivers steps to subscriptions and metric results to backends.

    Each bus has its own topic table, so registering a topic on one bus never changes another.
    ``on_error``: ``"warn"`` disables a failing subscriber (or backend) with a warning and
    training goes on; ``"raise"`` stops with a :class:`~ikkuna_core.SubscriberError` (or
    :class:`~ikkuna_core.BackendError`). ``flush_every``: steps between backend writes.
    """

    def __init__(self, *, on_error: str = "warn", flush_every: int = 1) -> None:
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.on_error = on_error
        self.flush_every = flush_every
        self._topics: dict[str, TopicSpec] = {t.name: t for t in builtin_topics()}
        self.subscriptions: list[Subscription] = []
        self.backends: list[Backend] = []
        self.exporter: Exporter | None = None
        self._listeners: list[Callable[[], None]] = []
        self._active_cache: dict[int, tuple[Subscription, ...]] = {}
        self._period = 1  # the subscriptions' subsample periods repeat after this many steps
        self._consumed: frozenset[str] = frozenset()
        self._collecting: tuple[Subscriber, dict[str, _Collected]] | None = None
        self._pending: list[ScalarsMessage | HistogramsMessage] = []
        self._in_flight: deque[_Transfer] = deque()
        self._removed: list[Backend] = []  # disabled after a failure, closed at the end
        self._pinned: dict[tuple[torch.device, int], list[torch.Tensor]] = {}
        self._warned: set[str] = set()
        self.cost = CostMeter(self)  # measured cost per subscriber; the budget

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
        try:
            return self._topics[name]
        except KeyError:
            raise UnknownTopicError(
                f"unknown topic {name!r}; known topics: {', '.join(sorted(self._topics))}"
            ) from None

    # ----------------------------------------------------------- subscribers
    @property
    def subscribers(self) -> list[Subscriber]:
        return [s.subscriber for s in self.subscriptions]

    def register_subscriber(self, subscriber: Subscriber) -> Subscriber:
        """Subscribe ``subscriber`` to its topics and register the topics it publishes. A
        subscriber runs after every subscriber registered before it, so it can consume their
        results in the same step."""
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
            if out in self._topics and not self._derived_by_other(out, subscriber):
                raise ValueError(
                    f"subscriber {subscriber.name!r} would publish under {out!r}, which is "
                    "already a topic of this bus; choose another publish_as"
                )
        subscriber._bind(self)
        out_kind = subscriber.output_kind or ("module" if "module" in kinds else "network")
        for out in outputs:
            self.register_topic(out, out_kind, doc=f"published by subscriber {subscriber.name!r}")
        self.subscriptions.append(
            Subscription(
                subscriber,
                tuple(topics),
                subscriber.options.subsample,
                subscriber.synchronized,
            )
        )
        self._changed()
        return subscriber

    def _derived_by_other(self, topic: str, subscriber: Subscriber) -> bool:
        """Two subscribers of the same class may publish into one derived topic (e.g. two
        ``norm`` subscribers with different subsample on different topics)."""
        return any(
            type(s.subscriber) is type(subscriber) and topic in s.subscriber.output_topics()
            for s in self.subscriptions
        )

    def unregister_subscriber(self, subscriber: Subscriber) -> None:
        self.subscriptions = [s for s in self.subscriptions if s.subscriber is not subscriber]
        self._changed()

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever the set of subscriptions changes (the Exporter uses
        this to install exactly the hooks that subscribed topics need)."""
        self._listeners.append(callback)

    def _changed(self) -> None:
        self._active_cache.clear()
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
        self._active_cache.clear()
        self._period = math.lcm(1, *(s.subsample for s in self.subscriptions))

    def wanted_topics(self, step: int) -> frozenset[str]:
        """Topics some subscription wants at ``step`` (after subsampling)."""
        return frozenset(t for s in self.active(step) for t in s.topics)

    # ------------------------------------------------------------- delivery
    def deliver(self, stamp: Stamp, payloads: dict[str, TopicPayloads]) -> None:
        """Hand one step's payloads to every subscription due at the step, in registration
        order (each one sees the results of those before it), then write to the backends
        every ``flush_every`` steps. Subscribers run under ``torch.no_grad()``."""
        step = stamp[0]
        self.cost.begin(step)
        active = self.active(step)
        if active:
            with torch.no_grad():
                self._run(stamp, payloads, active)
        if (step + 1) % self.flush_every == 0:
            self.flush(wait=False)
        self.cost.end()

    def deliver_skipped(self, stamp: Stamp, payloads: dict[str, TopicPayloads]) -> None:
        """Hand the payloads of a step whose optimizer step was skipped to the subscriptions
        due at ``stamp``'s step whose subscriber sees skipped steps (the step keeps its
        number: the next attempt is delivered under it too). Results are written with the
        next flush."""
        due = tuple(s for s in self.active(stamp[0]) if s.subscriber.sees_skipped_steps)
        if due:
            with torch.no_grad():
                self._run(stamp, payloads, due, skipped=True)

    def deliver_event(self, stamp: Stamp, topic: str) -> None:
        """Hand an event that happens between steps (``epoch_finished``) to the subscriptions
        of that topic due at ``stamp``'s step."""
        due = tuple(s for s in self.active(stamp[0]) if topic in s.topics)
        if due:
            with torch.no_grad():
                self._run(stamp, {topic: TopicPayloads.event(topic)}, due)

    def _run(
        self,
        stamp: Stamp,
        payloads: dict[str, TopicPayloads],
        active: Sequence[Subscription],
        skipped: bool = False,
    ) -> None:
        available = dict(payloads)
        modules: dict[str | None, ModuleInfo | None] | None = None
        for sub in active:
            if not sub.subscriber.enabled:
                continue
            found = {t: available[t] for t in sub.topics if t in available and len(available[t])}
            if sub.synchronized:
                aligned = _aligned(found, sub.topics)
                if aligned is None:
                    self._incomplete(sub, available, stamp)
                    continue
                sub.completed += 1
                parts = aligned
            else:
                parts = found
            if not parts:
                continue
            bundle = StepBundle(
                global_step=stamp[0], epoch=stamp[1], batch_index=stamp[2], payloads=parts,
                skipped=skipped,
            )
            collected: dict[str, _Collected] = {}
            self._collecting = (sub.subscriber, collected)
            token = self.cost.started()
            try:
                sub.subscriber.compute_step(bundle)
            except IkkunaError:
                # a subscriber that raises an IkkunaError itself stops the run on purpose
                # (ikkuna-health's action = "raise"): it propagates as is, whatever on_error
                self._collecting = None
                raise
            except Exception as exc:  # noqa: BLE001 - the error policy decides
                self.cost.stopped(sub, token)
                self._collecting = None
                self._subscriber_failed(sub, exc, stamp, list(parts))
                continue
            self.cost.stopped(sub, token)
            self._collecting = None
            for topic, got in collected.items():
                message = self._message(sub.subscriber, topic, got, stamp)
                self._pending.append(message)
                if topic in self._consumed:
                    if modules is None:
                        modules = {k: m for p in payloads.values()
                                   for k, m in zip(p.keys, p.modules, strict=True)}
                    available[topic] = _payloads_of(message, modules)

    def _collector(self, subscriber: Subscriber, topic: str) -> _Collected:
        current = self._collecting
        if current is None or current[0] is not subscriber:
            raise RuntimeError(
                f"subscriber {subscriber.name!r} published outside its compute/compute_step; "
                "front ends write their own values with bus.log_scalars"
            )
        got = current[1].get(topic)
        if got is None:
            got = current[1][topic] = _Collected()
        return got

    def _collect_scalars(
        self, subscriber: Subscriber, topic: str, keys: list[str | None], values: torch.Tensor,
        stamp: Stamp | None = None,
    ) -> None:
        got = self._collector(subscriber, topic)
        if got.hists:
            raise ValueError(f"topic {topic!r} mixes scalars and histograms")
        if got.scalars and got.stamp != stamp:
            raise ValueError(f"topic {topic!r}: values of two steps in one step's results")
        got.stamp = stamp
        got.keys.extend(keys)
        got.scalars.append(values)

    def _collect_histograms(
        self, subscriber: Subscriber, topic: str, keys: list[str | None], hists: Histograms
    ) -> None:
        got = self._collector(subscriber, topic)
        if got.scalars:
            raise ValueError(f"topic {topic!r} mixes scalars and histograms")
        if got.hists and got.hists[0].counts.shape[1] != hists.counts.shape[1]:
            raise ValueError(
                f"subscriber {subscriber.name!r}: histograms of topic {topic!r} with "
                f"{got.hists[0].counts.shape[1]} and {hists.counts.shape[1]} bins in one step"
            )
        got.keys.extend(keys)
        got.hists.append(hists)

    def _message(
        self, subscriber: Subscriber, topic: str, got: _Collected, stamp: Stamp
    ) -> ScalarsMessage | HistogramsMessage:
        tags = _tags(topic, got.keys)
        step, epoch, batch = got.stamp or stamp
        if got.scalars:
            values = got.scalars
            if len(values) > 1:
                device = values[0].device
                values = [v if v.device == device else v.to(device) for v in values]
            data = values[0] if len(values) == 1 else torch.cat(values)
            return ScalarsMessage(topic=topic, global_step=step, epoch=epoch, batch_index=batch,
                                  keys=got.keys, tags=tags, data=data)
        hists = got.hists[0]
        if len(got.hists) > 1:
            hists = type(hists)(*(torch.cat(parts) for parts in zip(*got.hists, strict=True)))
        return HistogramsMessage(topic=topic, global_step=step, epoch=epoch, batch_index=batch,
                                 keys=got.keys, tags=tags, **hists._asdict())

    def _incomplete(
        self, sub: Subscription, available: dict[str, TopicPayloads], stamp: Stamp
    ) -> None:
        sub.incomplete += 1
        if sub.completed or sub.incomplete != _INCOMPLETE_WARN_AFTER:
            return
        missing = [t for t in sub.topics if t not in available or not len(available[t])]
        why = (
            f"{missing} had no payload" if missing
            else "its topics never had a key in common"
        )
        self._warn_once(
            f"incomplete:{id(sub)}",
            f"subscriber {sub.subscriber.name!r} (synchronized over {list(sub.topics)}) has not "
            f"received one complete set in {sub.incomplete} steps up to step {stamp[0]}: {why}. "
            "Check that the model's own forward runs (not a submodule's), that the loss goes "
            "through exporter.set_loss, and that every topic is published at the same steps",
        )

    # ----------------------------------------------------------------- errors
    def _subscriber_failed(
        self, sub: Subscription, exc: BaseException, stamp: Stamp, topics: list[str]
    ) -> None:
        name = sub.subscriber.name
        what = (
            f"subscriber {name!r} failed at step {stamp[0]} on topic"
            f"{'s' if len(topics) > 1 else ''} {', '.join(map(repr, topics))}: "
            f"{type(exc).__name__}: {exc}"
        )
        if self.on_error == "raise":
            raise SubscriberError(what) from exc
        sub.subscriber.enabled = False
        self._active_cache.clear()
        warnings.warn(
            f"ikkuna: {what}; it is disabled for the rest of the run "
            "(set on_error='raise' to stop instead)",
            RuntimeWarning,
            stacklevel=2,
        )

    def internal_error(self, where: str, exc: BaseException, step: int) -> None:
        """An error inside Ikkuna's own hooks: raised as :class:`IkkunaError` with
        ``on_error = "raise"``; otherwise a warning (once per place) and training goes on."""
        what = f"internal error in {where} at step {step}: {type(exc).__name__}: {exc}"
        if self.on_error == "raise":
            raise IkkunaError(f"ikkuna: {what}") from exc
        self._warn_once(f"internal:{where}", f"{what}; this step's data may be incomplete")

    def _warn_once(self, ident: str, message: str) -> None:
        if ident in self._warned:
            return
        self._warned.add(ident)
        warnings.warn(f"ikkuna: {message}", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------ front-end values
    def log_scalars(self, topic: str, values: Mapping[Any, float | torch.Tensor]) -> None:
        """Write scalars that no subscriber computed (a front end's epoch summaries) to the
        backends at the next flush, stamped with the exporter's current step. The tag is
        ``<topic>/<key>`` (``<topic>`` for the key None)."""
        if not values:
            return
        step, epoch, batch = self._stamp()
        keys = list(values)
        data = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
        self._pending.append(
            ScalarsMessage(
                topic=topic, global_step=step, epoch=epoch, batch_index=batch, keys=keys,
                tags=_tags(topic, keys), data=data,
            )
        )

    def log_text(self, tag: str, text: str) -> None:
        """Write a piece of text (Markdown in TensorBoard's TEXT tab) to every backend that
        shows text, stamped with the exporter's current step."""
        step = self._stamp()[0]
        for backend in self.backends:
            backend.write_text(tag, text, step)

    def _stamp(self) -> Stamp:
        ex = self.exporter
        if ex is None:
            return (0, 0, 0)
        return (max(ex.global_step, 0), ex.epoch, max(ex.batch_index, 0))

    # -------------------------------------------------------------- backends
    def add_backend(self, backend: Backend) -> Backend:
        self.backends.append(backend)
        return backend

    def flush(self, wait: bool = True) -> None:
        """Start moving pending results to the host (one copy per device, asynchronous on
        CUDA) and write every transfer that has arrived to the backends; with ``wait``,
        everything pending is written before this returns."""
        pending, self._pending = self._pending, []
        if pending and self.backends:
            self._in_flight.append(_Transfer(pending, self._pinned))
        while self._in_flight:
            head = self._in_flight[0]
            if not (wait or head.ready() or len(self._in_flight) > _MAX_IN_FLIGHT):
                break
            self._in_flight.popleft()
            self._write(head.records(self._nonfinite))
        costs = self.cost.records()
        if costs and self.backends:
            self._write((costs, []))

    def _nonfinite(self, tag: str, step: int, what: str) -> None:
        self._warn_once(f"nonfinite:{tag}", f"{tag} at step {step}: {what}")

    def _write(self, records: tuple[list[ScalarRecord], list[HistogramRecord]]) -> None:
        scalars, hists = records
        failures: list[tuple[Backend, BaseException]] = []
        for backend in list(self.backends):
            try:
                if scalars:
                    backend.write_scalars(scalars)
                if hists:
                    backend.write_histograms(hists)
                backend.flush()
            except Exception as exc:  # noqa: BLE001 - every backend gets its records first
                failures.append((backend, exc))
        if failures:
            step = (scalars or hists)[0].step  # type: ignore[index]
            self._backends_failed(failures, f"writing step {step}")

    def _backends_failed(self, failures: list[tuple[Backend, BaseException]], what: str) -> None:
        detail = "; ".join(
            f"backend {b.name or type(b).__name__!r} ({type(e).__name__}: {e})" for b, e in failures
        )
        if self.on_error == "raise":
            raise BackendError(f"ikkuna: {what} failed: {detail}") from failures[0][1]
        for backend, _ in failures:
            if backend in self.backends:
                self.backends.remove(backend)
                self._removed.append(backend)  # still closed at the end
        warnings.warn(
            f"ikkuna: {what} failed: {detail}; the other backends have their records, the "
            "failing ones are removed for the rest of the run (on_error='raise' stops instead)",
            RuntimeWarning,
            stacklevel=3,
        )

    def close(self) -> None:
        """Write what is pending and close every backend (those disabled by a failure too),
        even when the final write or a backend's close fails; the failures are then raised
        together, as one ExceptionGroup naming each backend (a failing backend must not leave
        the others' queues unwritten)."""
        failures: list[tuple[str, Exception]] = []
        try:
            self.cost.close()
            self.flush(wait=True)
        except Exception as exc:  # noqa: BLE001 - reported below, after every close
            failures.append(("the final flush", exc))
        backends, self._removed = self.backends + self._removed, []
        failures += _close_each(backends)
        if failures:
            raise _close_failures(failures)


def _close_each(backends: Iterable[Backend]) -> list[tuple[str, Exception]]:
    """Close every backend; a raising one does not stop the others. Returns the failures
    as (backend description, error)."""
    failures = []
    for i, backend in enumerate(backends):
        try:
            backend.close()
        except Exception as exc:  # noqa: BLE001 - collected, raised by the caller
            name = getattr(backend, "name", "") or type(backend).__name__
            failures.append((f"backends[{i}] {name!r}", exc))
    return failures


def _close_failures(failures: list[tuple[str, Exception]]) -> ExceptionGroup:
    """One error for all failures of a close: its message names each backend and its
    error; each original error (with its traceback) is in ``.exceptions``."""
    summary = "; ".join(f"{who} raised {type(exc).__name__}: {exc}" for who, exc in failures)
    for who, exc in failures:
        exc.add_note(f"ikkuna: raised by {who} while the bus was closing")
    return ExceptionGroup(
        f"ikkuna: closing the backends failed ({summary}); every backend's close() was called",
        [exc for _, exc in failures],
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


def _tags(topic: str, keys: Sequence[str | None]) -> list[str]:
    """Backend tags: ``<topic>/<key>``, ``<topic>`` for the key None (a network value)."""
    return [topic if k is None else f"{topic}/{k}" for k in keys]


def _payloads_of(
    message: ScalarsMessage | HistogramsMessage, modules: dict[str | None, ModuleInfo | None]
) -> TopicPayloads:
    """A result as the payloads of a derived topic, for the subscribers that consume it."""
    values = message.data if isinstance(message, ScalarsMessage) else message.counts
    return TopicPayloads(
        topic=message.topic,
        keys=message.keys,
        modules=[modules.get(k) for k in message.keys],
        data=list(values.unbind(0)),
    )


_HIST_FIELDS = Histograms._fields  # a HistogramsMessage carries these, from ops.histograms


class _Transfer:
    """One step's results on their way to the host: per device, everything flattened into one
    float64 buffer and copied with one (on CUDA: asynchronous, into pinned memory) copy."""

    def __init__(
        self,
        messages: list[ScalarsMessage | HistogramsMessage],
        pinned: dict[tuple[torch.device, int], list[torch.Tensor]],
    ) -> None:
        self.messages = messages
        self._pool = pinned
        tensors: list[torch.Tensor] = []
        for m in messages:
            if isinstance(m, ScalarsMessage):
                tensors.append(m.data)
            else:
                tensors.extend(getattr(m, f) for f in _HIST_FIELDS)
        self._parts: list[tuple[torch.Tensor, Any, torch.device]] = []
        self._packed: list[torch.Tensor] = []
        # (part, offset, numel) per tensor; one part per device
        self._where: list[tuple[int, int, int]] = [(0, 0, 0)] * len(tensors)
        by_device = group_by(tensors, lambda t: t.device)
        for part, (device, idx) in enumerate(by_device.items()):
            flat = [tensors[i].reshape(-1) for i in idx]
            offset = 0
            for i, t in zip(idx, flat, strict=True):
                self._where[i] = (part, offset, t.numel())
                offset += t.numel()
            packed = torch.cat(flat).to(torch.float64) if len(flat) > 1 else flat[0].double()
            if device.type == "cuda":
                host = self._buffer(device, packed.numel())
                host.copy_(packed, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                self._packed.append(packed)  # alive until the copy has ended
                self._parts.append((host, event, device))
            else:
                self._parts.append((packed.cpu(), None, device))

    def _buffer(self, device: torch.device, numel: int) -> torch.Tensor:
        free = self._pool.get((device, numel))
        if free:
            return free.pop()
        return torch.empty(numel, dtype=torch.float64, pin_memory=True)

    def ready(self) -> bool:
        return all(event is None or event.query() for _, event, _ in self._parts)

    def records(
        self, on_nonfinite: Callable[[str, int, str], None]
    ) -> tuple[list[ScalarRecord], list[HistogramRecord]]:
        """Wait for the copies, then turn the messages into host-side records (a
        ``<tag>/nonfinite`` scalar beside every histogram that had non-finite values)."""
        arrays = []
        for host, event, _ in self._parts:
            if event is None:
                arrays.append(host.numpy())
            else:  # a pinned buffer, reused by a later step: records get their own copy
                event.synchronize()
                arrays.append(host.numpy().copy())
        values = iter(
            arrays[part][offset : offset + numel] for part, offset, numel in self._where
        )
        scalars: list[ScalarRecord] = []
        hists: list[HistogramRecord] = []
        for m in self.messages:
            step = m.global_step
            if isinstance(m, ScalarsMessage):
                data = next(values)
                for key, tag, value in zip(m.keys, m.tags, data.tolist(), strict=True):
                    scalars.append(ScalarRecord(m.topic, key, tag, step, value))
                    if not math.isfinite(value):
                        on_nonfinite(tag, step, f"the value is {value} (written as it is)")
                continue
            fields = {f: next(values) for f in _HIST_FIELDS}
            n = len(m.keys)
            counts = fields["counts"].reshape(n, -1)
            edges = fields["edges"].reshape(n, -1)
            stats = {f: fields[f].tolist() for f in _HIST_FIELDS[2:]}
            for i, (key, tag) in enumerate(zip(m.keys, m.tags, strict=True)):
                nonfinite = stats["nonfinite"][i]
                hists.append(
                    HistogramRecord(
                        m.topic, key, tag, step, counts[i], edges[i], stats["min"][i],
                        stats["max"][i], stats["num"][i], stats["sum"][i],
                        stats["sum_squares"][i], nonfinite,
                    )
                )
                if nonfinite:
                    scalars.append(
                        ScalarRecord(f"{m.topic}/nonfinite", key, f"{tag}/nonfinite", step,
                                     nonfinite)
                    )
                    on_nonfinite(
                        tag, step,
                        f"{nonfinite:g} non-finite value(s) (NaN/inf) among "
                        f"{nonfinite + stats['num'][i]:g}; they are counted in "
                        f"'{tag}/nonfinite', not in the bins",
                    )
        for host, event, device in self._parts:
            if event is not None:
                self._pool.setdefault((device, host.numel()), []).append(host)
        self._parts, self._packed = [], []
        return scalars, hists
