"""Results on their way to the backends: pending messages, packed per device into one
float64 buffer and moved with one (on CUDA asynchronous, into pinned memory) copy per
flush, then written to every backend as host-side records."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from ..backends.base import HistogramRecord, ScalarRecord
from ..messages import HistogramsMessage, ScalarsMessage
from ..ops import Histograms, group_by
from .policy import ErrorPolicy

if TYPE_CHECKING:
    from ..backends.base import Backend

__all__ = ["Outbox"]

#: Transfers to the host that may be in flight before the oldest is waited for.
_MAX_IN_FLIGHT = 2


class Outbox:
    """The backends of a bus and what is on its way to them."""

    def __init__(self, policy: ErrorPolicy) -> None:
        self.backends: list[Backend] = []
        self._policy = policy
        self._pending: list[ScalarsMessage | HistogramsMessage] = []
        self._in_flight: deque[_Transfer] = deque()
        self._removed: list[Backend] = []  # disabled after a failure, closed at the end
        self._pinned: dict[tuple[torch.device, int], list[torch.Tensor]] = {}
        #: records made on the host (the cost meter's), written with every flush
        self.host_records: Callable[[], list[ScalarRecord]] = list

    def put(self, message: ScalarsMessage | HistogramsMessage) -> None:
        """Write ``message`` at the next flush."""
        self._pending.append(message)

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
        host = self.host_records()
        if host and self.backends:
            self._write((host, []))

    def _nonfinite(self, tag: str, step: int, what: str) -> None:
        self._policy.warn_once(f"nonfinite:{tag}", f"{tag} at step {step}: {what}")

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
            self._policy.backends_failed(failures, f"writing step {step}")
            for backend, _ in failures:
                if backend in self.backends:
                    self.backends.remove(backend)
                    self._removed.append(backend)  # still closed at the end

    def close(self, before: Callable[[], None] = lambda: None) -> None:
        """Run ``before`` (the last records), write what is pending and close every backend
        (those disabled by a failure too), even when the final write or a backend's close
        fails; the failures are then raised together, as one ExceptionGroup naming each
        backend (a failing backend must not leave the others' queues unwritten)."""
        failures: list[tuple[str, Exception]] = []
        try:
            before()
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
            flat = [t if (t := tensors[i]).dim() == 1 else t.reshape(-1) for i in idx]
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
