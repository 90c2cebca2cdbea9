"""The MessageBus: routes typed messages from the Exporter (and from subscribers that publish
derived metrics) to subscriptions, and metric results to the backends."""

from __future__ import annotations

import math
import queue
import threading
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .backends.base import HistogramRecord, ScalarRecord
from .messages import (
    MODULE_TOPICS,
    NETWORK_TOPICS,
    HistogramMessage,
    MessageBundle,
    ModuleMessage,
    NetworkMessage,
    ScalarMessage,
    TopicSpec,
)

if TYPE_CHECKING:
    from .backends.base import Backend
    from .exporter import Exporter
    from .subscriber import Subscriber

__all__ = ["MessageBus", "Subscription", "SynchronizedSubscription", "UnknownTopicError"]


AnyMessage = ModuleMessage | NetworkMessage | ScalarMessage | HistogramMessage

_DEFAULT_DOCS = {
    "weights": "the module's weight parameters after the step's optimizer update",
    "biases": "the module's bias parameters after the step's optimizer update",
    "weight_gradients": "gradient of the loss w.r.t. the weights, after backward",
    "bias_gradients": "gradient of the loss w.r.t. the biases, after backward",
    "weight_updates": "change of the weights across the step's optimizer.step()",
    "bias_updates": "change of the biases across the step's optimizer.step()",
    "activations": "the module's output (first tensor of a tuple output)",
    "layer_gradients": "gradient of the loss w.r.t. the module's output",
    "batch_started": "a training step begins (no payload)",
    "batch_finished": "a training step ends (no payload)",
    "epoch_started": "an epoch begins (no payload)",
    "epoch_finished": "an epoch ends (no payload)",
    "input_data": "the first tensor argument of the model's forward",
    "input_labels": "the target passed to the loss",
    "network_output": "the model output passed to the loss",
    "loss": "the loss value (0-d tensor)",
}


def default_topics() -> list[TopicSpec]:
    """The topics the Exporter publishes."""
    return [TopicSpec(name=t, kind="module", doc=_DEFAULT_DOCS[t]) for t in MODULE_TOPICS] + [
        TopicSpec(name=t, kind="network", doc=_DEFAULT_DOCS[t]) for t in NETWORK_TOPICS
    ]


class UnknownTopicError(ValueError):
    """A subscription named a topic that no one publishes."""


class Subscription:
    """Delivers each message of one topic to a subscriber as a one-topic bundle."""

    def __init__(self, subscriber: Subscriber, topics: Iterable[str], subsample: int = 1) -> None:
        self.subscriber = subscriber
        self.topics: tuple[str, ...] = tuple(topics)
        self.subsample = int(subsample)
        if self.subsample < 1:
            raise ValueError(f"subsample must be >= 1, got {subsample}")

    def wants(self, step: int) -> bool:
        return step % self.subsample == 0

    def handle(self, message: AnyMessage) -> None:
        self._deliver(message.key, message.global_step, {message.topic: message}, message)

    def step_finished(self, step: int) -> None:
        """Called after every step; single-topic subscriptions hold nothing."""

    def _deliver(self, key: str | None, step: int, messages: dict[str, Any], any_msg: Any) -> None:
        module = any_msg.module if isinstance(any_msg, ModuleMessage) else None
        bundle = MessageBundle(
            key=key,
            module=module,
            global_step=step,
            epoch=any_msg.epoch,
            batch_index=any_msg.batch_index,
            messages=messages,
        )
        self.subscriber._receive(bundle)


class SynchronizedSubscription(Subscription):
    """Collects one message per topic for each (module, step) and delivers the bundle once
    all topics are present. Incomplete bundles are dropped when their step ends, so they never
    leak into the next step. Payloads that wait are cloned, since training may change the
    tensor in place (an in-place ReLU after a conv, gradient clipping) before the bundle is
    complete."""

    def __init__(self, subscriber: Subscriber, topics: Iterable[str], subsample: int = 1) -> None:
        super().__init__(subscriber, topics, subsample)
        if len(set(self.topics)) != len(self.topics):
            raise ValueError(f"duplicate topics in a synchronized subscription: {self.topics}")
        self._pending: dict[tuple[str | None, int], dict[str, AnyMessage]] = {}

    def handle(self, message: AnyMessage) -> None:
        ident = (message.key, message.global_step)
        got = self._pending.get(ident)
        if got is None:
            got = self._pending[ident] = {}
        got[message.topic] = message
        if len(got) == len(self.topics):
            del self._pending[ident]
            ordered = {t: got[t] for t in self.topics}
            any_msg = next((m for m in ordered.values() if isinstance(m, ModuleMessage)), message)
            self._deliver(message.key, message.global_step, ordered, any_msg)
        elif isinstance(message.data, torch.Tensor):
            got[message.topic] = message.model_copy(update={"data": message.data.clone()})

    def step_finished(self, step: int) -> None:
        if self._pending:
            stale = [k for k in self._pending if k[1] <= step]
            for k in stale:
                del self._pending[k]

    @property
    def pending(self) -> int:
        """Number of incomplete bundles waiting (for tests and diagnostics)."""
        return len(self._pending)


class MessageBus:
    """Routes messages by topic to subscriptions and metric results to backends.

    Each bus has its own topic table, so registering a topic on one bus never changes another.
    """

    def __init__(
        self, *, on_error: str = "warn", flush_every: int = 1, background: bool = False
    ) -> None:
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.on_error = on_error
        self.flush_every = flush_every
        self._topics: dict[str, TopicSpec] = {t.name: t for t in default_topics()}
        self._routes: dict[str, list[Subscription]] = {}
        self.subscriptions: list[Subscription] = []
        self.subscribers: list[Subscriber] = []
        self.backends: list[Backend] = []
        self.exporter: Exporter | None = None
        self._listeners: list[Callable[[], None]] = []
        self._pending_scalars: list[ScalarMessage] = []
        self._pending_histograms: list[HistogramMessage] = []
        self._wanted_cache: dict[int, frozenset[str]] = {}
        #: Opt-in: subscribers compute on a background thread, overlapping with training;
        #: each step waits for its metrics before it ends. See benchmarks/README.md for
        #: whether it pays on your machine.
        self.background = background
        self._worker: _Worker | None = None

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
    def register_subscriber(self, subscriber: Subscriber) -> Subscriber:
        """Subscribe ``subscriber`` to its topics and register the topics it publishes."""
        topics = list(subscriber.options.topics)
        if not topics:
            raise ValueError(f"subscriber {subscriber.name!r} has no topics to subscribe to")
        kinds = {self.check_topic(t).kind for t in topics}
        subsample = subscriber.options.subsample
        if subscriber.synchronized:
            subs: list[Subscription] = [SynchronizedSubscription(subscriber, topics, subsample)]
        else:
            subs = [Subscription(subscriber, [t], subsample) for t in topics]
        subscriber._bind(self)
        out_kind = "module" if "module" in kinds else "network"
        for out in subscriber.output_topics():
            self.register_topic(out, out_kind, doc=f"published by subscriber {subscriber.name!r}")
        for sub in subs:
            self.subscriptions.append(sub)
            for t in sub.topics:
                self._routes.setdefault(t, []).append(sub)
        self.subscribers.append(subscriber)
        self._changed()
        return subscriber

    def unregister_subscriber(self, subscriber: Subscriber) -> None:
        self.subscriptions = [s for s in self.subscriptions if s.subscriber is not subscriber]
        self._routes = {
            t: [s for s in subs if s.subscriber is not subscriber]
            for t, subs in self._routes.items()
        }
        self.subscribers = [s for s in self.subscribers if s is not subscriber]
        self._changed()

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever the set of subscriptions changes (the Exporter uses
        this to install exactly the hooks that subscribed topics need)."""
        self._listeners.append(callback)

    def _changed(self) -> None:
        self._wanted_cache.clear()
        for cb in self._listeners:
            cb()

    def subscribed_topics(self) -> frozenset[str]:
        """Topics at least one subscription listens to."""
        return frozenset(t for t, subs in self._routes.items() if subs)

    def wanted_topics(self, step: int) -> frozenset[str]:
        """Topics some subscription wants at ``step`` (after subsampling)."""
        subs = self.subscriptions
        period = math.lcm(1, *(s.subsample for s in subs))
        phase = step % period if period <= 10_000 else step
        cached = self._wanted_cache.get(phase)
        if cached is None:
            cached = frozenset(t for s in subs if s.wants(step) for t in s.topics)
            if period <= 10_000:
                self._wanted_cache[phase] = cached
        return cached

    # -------------------------------------------------------------- messages
    def publish(self, message: AnyMessage) -> None:
        """Hand ``message`` to every subscription of its topic that wants its step."""
        subs = self._routes.get(message.topic)
        if not subs:
            return
        if self.background:
            worker = self._worker
            if worker is None:
                worker = self._worker = _Worker()
            if not worker.is_current():
                if message.topic == "activations" and isinstance(message, ModuleMessage):
                    # an in-place op (ReLU) may follow the module before the worker runs
                    message = message.model_copy(update={"data": message.data.clone()})
                worker.submit(self._dispatch, message, subs)
                return
        self._dispatch(message, subs)

    def _dispatch(self, message: AnyMessage, subs: list[Subscription]) -> None:
        step = message.global_step
        for sub in subs:
            if step % sub.subsample == 0 and sub.subscriber.enabled:
                sub.handle(message)

    def wait(self) -> None:
        """Block until the background worker (if any) has handled everything published."""
        if self._worker is not None:
            self._worker.join()

    def publish_result(self, message: ScalarMessage | HistogramMessage) -> None:
        """A subscriber's result: queued for the backends, and published as a topic."""
        if isinstance(message, ScalarMessage):
            self._pending_scalars.append(message)
        else:
            self._pending_histograms.append(message)
        self.publish(message)

    def log_scalars(
        self, topic: str, values: dict[str | None, float | torch.Tensor]
    ) -> None:
        """Write scalars that no subscriber computed (a front end's epoch summaries) to the
        backends at the next flush, stamped with the exporter's current step. The tag is
        ``<topic>/<key>`` (``<topic>`` for the key None)."""
        step, epoch, batch = self._stamp()
        for key, value in values.items():
            data = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            self._pending_scalars.append(
                ScalarMessage(
                    topic=topic,
                    global_step=step,
                    epoch=epoch,
                    batch_index=batch,
                    key=key,
                    tag=topic if key is None else f"{topic}/{key}",
                    data=data.detach().to(torch.float64),
                )
            )

    def log_text(self, tag: str, text: str) -> None:
        """Write a piece of text (Markdown in TensorBoard's TEXT tab) to every backend that
        shows text, stamped with the exporter's current step."""
        step = self._stamp()[0]
        for backend in self.backends:
            backend.write_text(tag, text, step)

    def _stamp(self) -> tuple[int, int, int]:
        ex = self.exporter
        if ex is None:
            return (0, 0, 0)
        return (max(ex.global_step, 0), ex.epoch, max(ex.batch_index, 0))

    def subscriber_failed(self, subscriber: Subscriber, exc: BaseException) -> None:
        if self.on_error == "raise":
            raise exc
        subscriber.enabled = False
        warnings.warn(
            f"ikkuna: subscriber {subscriber.name!r} raised {type(exc).__name__}: {exc}; "
            "it is disabled for the rest of the run (set on_error='raise' to stop instead)",
            RuntimeWarning,
            stacklevel=3,
        )

    def step_finished(self, step: int) -> None:
        """End of a training step: drop incomplete bundles, flush backends periodically."""
        self.wait()
        for sub in self.subscriptions:
            sub.step_finished(step)
        if (step + 1) % self.flush_every == 0:
            self.flush()

    # -------------------------------------------------------------- backends
    def add_backend(self, backend: Backend) -> Backend:
        self.backends.append(backend)
        return backend

    def flush(self) -> None:
        """Move pending metric values to the host in one transfer per device and write them
        to every backend."""
        self.wait()
        scalars, self._pending_scalars = self._pending_scalars, []
        histograms, self._pending_histograms = self._pending_histograms, []
        if not self.backends or (not scalars and not histograms):
            return

        # One device-to-host copy per device for everything pending.
        hist_fields = ("data", "edges", "min", "max", "num", "sum", "sum_squares", "nonfinite")
        tensors = [m.data for m in scalars]
        for m in histograms:
            tensors.extend(getattr(m, f) for f in hist_fields)
        arrays = iter(_to_host(tensors))
        scalar_records = [
            ScalarRecord(
                topic=m.topic,
                key=m.key,
                tag=m.tag,
                step=m.global_step,
                value=float(next(arrays)[0]),
            )
            for m in scalars
        ]
        hist_records = []
        for m in histograms:
            counts, edges, lo, hi, num, total, squares, nonfinite = (
                next(arrays) for _ in hist_fields
            )
            hist_records.append(
                HistogramRecord(
                    topic=m.topic,
                    key=m.key,
                    tag=m.tag,
                    step=m.global_step,
                    counts=counts,
                    edges=edges,
                    min=float(lo[0]),
                    max=float(hi[0]),
                    num=float(num[0]),
                    sum=float(total[0]),
                    sum_squares=float(squares[0]),
                    nonfinite=float(nonfinite[0]),
                )
            )
        for backend in self.backends:
            if scalar_records:
                backend.write_scalars(scalar_records)
            if hist_records:
                backend.write_histograms(hist_records)
            backend.flush()

    def close(self) -> None:
        """Flush what is pending and close every backend, even when the flush or a backend
        fails; the failures are then raised together, as one ExceptionGroup naming each
        backend (a failing backend must not leave the others' queues unwritten)."""
        failures: list[tuple[str, Exception]] = []
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - reported below, after every close
            failures.append(("the final flush", exc))
        failures += _close_each(self.backends)
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
        if failures:
            raise _close_failures(failures)


class _Worker:
    """One daemon thread running submitted calls in order; errors are re-raised by join()."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]] | None] = (
            queue.Queue()
        )
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ikkuna-bus", daemon=True)
        self._thread.start()

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._queue.put((fn, args))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    item[0](*item[1])
            except BaseException as exc:  # noqa: BLE001 - handed to the training thread
                self._error = exc
            finally:
                self._queue.task_done()

    def join(self) -> None:
        self._queue.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)


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


def _to_host(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """Tensors to float64 numpy arrays (flattened) with one device-to-host copy per device."""
    out: list[np.ndarray] = [np.empty(0)] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        flat = [tensors[i].detach().reshape(-1).to(torch.float64) for i in idx]
        host = torch.cat(flat).cpu().numpy()
        start = 0
        for i, t in zip(idx, flat, strict=True):
            out[i] = host[start : start + t.numel()]
            start += t.numel()
    return out
