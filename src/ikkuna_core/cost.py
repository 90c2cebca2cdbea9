"""What watching costs, measured while the run goes, and the budget that keeps it.

The bus times each subscriber's ``compute_step`` at every step it runs — on the CPU with the
process clock (``time.process_time``: this process's CPU time, so other processes on a busy
machine do not count; torch's threads all count, in the plain step too), on CUDA with the
wall clock and a pair of timing events recorded around it on the current stream, read once
the step's work has completed (polled with ``Event.query()``, never waited for, so no host
synchronisation is added), the larger of the two counting — and the Exporter's
own share: collecting the step's payloads, the parameter snapshot of update topics, building
the result messages, the host transfer and the backends (everything at the end of the step
that is not a subscriber's) and what the watched modules' hooks do beyond keeping a
reference (a sample, a copy, a finiteness reduction: timed around it, in the step it
belongs to). The hooks' own calls are not timed (timing them would cost more than they
do); they count towards the plain step.

The plain step time is estimated at every step as the time between two ends of step minus
what was measured in between, and taken as the median of the recent steps at which nothing
ran (no subscriber due: no hook captured anything either) when there are some, else of all
recent steps (then it includes the hooks' time); a median, so an evaluation between epochs
does not move it.

Every :data:`WINDOW` steps each subscriber's share (its measured time over those steps
divided by that many plain steps: the average fraction of the step it took) is written to
the backends as the scalar ``ikkuna/cost/<subscriber>``, the Exporter's as
``ikkuna/cost/exporter``, the plain step as ``ikkuna/step/plain_ms``. :meth:`CostMeter.summary`
sums the run up, one line per subscriber.

With a budget (``budget = 0.02`` in the ``[ikkuna]`` table) the meter re-decides every
subscriber's cadence every :data:`DECIDE_EVERY` steps with :func:`ikkuna_core.budget.decide`
from the measured cost per run (its own time plus its part of the Exporter's share of the
steps it ran at); every change is written as ``ikkuna/cadence/<subscriber>`` and said once,
as a :class:`CadenceChange` warning. The budget is for watching as a whole: the subscribers
share what is left of it after the Exporter's own cost at the steps where none ran (ending
every step; measured, :meth:`CostMeter.fixed_share`), and at least a quarter of it (when the
fixed cost leaves less, that is said once). Measuring adds no tensor operation (no aten op).
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import budget as _budget
from .backends.base import Backend, ScalarRecord

__all__ = [
    "COST_TOPIC",
    "CADENCE_TOPIC",
    "DECIDE_EVERY",
    "WINDOW",
    "CadenceChange",
    "CostMeter",
    "Plan",
    "PlanRow",
    "measure_plan",
]


class Subscription(Protocol):
    """What the meter reads of a bus's subscription (:class:`ikkuna_core.Subscription`)."""

    subscriber: Any
    subsample: int


class MessageBus(Protocol):
    """What the meter uses of its bus (:class:`ikkuna_core.MessageBus`, which creates it)."""

    subscriptions: Any
    clock: Callable[[], tuple[int, int, int]]

    @property
    def backends(self) -> list[Backend]: ...
    def set_cadence(self, sub: Any, cadence: int) -> None: ...
    def log_text(self, tag: str, text: str) -> None: ...
    def warn_once(self, ident: str, message: str) -> None: ...

COST_TOPIC = "ikkuna/cost"
CADENCE_TOPIC = "ikkuna/cadence"
PLAIN_TOPIC = "ikkuna/step"
EXPORTER = "exporter"
#: Steps per published cost value.
WINDOW = 16
#: With a budget: the cadences are decided after this many measured steps, then every
#: DECIDE_EVERY steps.
FIRST_DECISIONS = (4, 8, 16)
DECIDE_EVERY = 32
#: Recent steps whose plain-step estimates give the median.
PLAIN_STEPS = 64
#: Quiet steps (nothing ran) needed before they alone give the plain step time.
QUIET_STEPS = 3
#: Recent runs of a subscriber whose costs give its cost per run (the median).
RUNS_KEPT = 5
#: With a budget, subscribers get what the Exporter's own fixed cost leaves of it, and at
#: least this share of it.
MIN_SUBSCRIBER_SHARE = 0.25


class CadenceChange(UserWarning):
    """The budget changed how often some subscribers run (said once per change)."""


class _Account:
    """One subscription's measured cost."""

    __slots__ = ("label", "loaded", "ops", "runs", "total", "window")

    def __init__(self, label: str) -> None:
        self.label = label
        self.runs = 0
        self.total = 0.0  # seconds, its own time, over the run
        self.window = 0.0  # seconds, its own time, in the current window
        self.loaded: deque[float] = deque(maxlen=RUNS_KEPT)  # seconds per run, with overhead
        self.ops = 0  # aten ops of its last run (only while counting ops)


@dataclass
class _Step:
    """What one step's end cost: per subscription (host seconds, CUDA events)."""

    step: int
    start: float
    snapshot: float
    subs: list[tuple[Subscription, float, Any, Any]] = field(default_factory=list)
    end: float = 0.0
    events: tuple[Any, Any] | None = None  # around the whole end of step (CUDA)
    interval: float | None = None  # to the next step's start


class CostMeter:
    """Times subscribers and the Exporter on one bus; keeps a budget when one is set.
    Created by the bus (``bus.cost``); :func:`ikkuna_core.watch` sets the configured
    ``budget``."""

    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        self.budget: float | None = None
        self._accounts: dict[Subscription, _Account] = {}
        self._steps: deque[_Step] = deque()
        self._current: _Step | None = None
        self._snapshot = 0.0  # Ikkuna's own time spent before the end of the step
        self._plain: deque[float] = deque(maxlen=PLAIN_STEPS)
        self._plain_quiet: deque[float] = deque(maxlen=PLAIN_STEPS)  # nothing ran at them
        self._exporter_window = 0.0
        self._exporter_total = 0.0
        self._exporter_quiet: deque[float] = deque(maxlen=PLAIN_STEPS)  # at quiet steps
        self._exporter_ops = 0
        self._finished = 0  # steps whose costs are known
        self._window_steps = 0
        self._records: list[ScalarRecord] = []
        self._device: Any = False  # False: not looked up yet; None: CPU; else a CUDA device
        self.model: Any = None  # the watched model (told by the Exporter): its device
        self._pool: list[Any] = []
        self._counting: Any = None  # an op-counting dispatch mode (plans only)
        self._initial: dict[Subscription, int] = {}
        self._delivering = 0  # the step whose end is being delivered
        self.changes: list[str] = []

    # ------------------------------------------------------------ the bus's calls
    def clock(self) -> float:
        """Seconds on the meter's clock: the process's CPU time, or the wall clock when the
        watched model is on a CUDA device."""
        if self._device is False:  # looked up at the first step: a model may move first
            self._device = None if self.model is None else cuda_device(self.model)
        return time.perf_counter() if self._device is not None else time.process_time()

    def step_ending(self) -> None:
        """The Exporter starts ending a step (collecting its payloads)."""
        if self._current is None:
            self._current = self._open(self.clock())

    def own(self, seconds: float) -> None:
        """Ikkuna's own time spent during the step, before its end (the snapshot)."""
        self._snapshot += seconds

    def begin(self, step: int) -> None:
        """The bus starts delivering ``step``."""
        if self._current is None:
            self._current = self._open(self.clock())
        self._current.step = step
        if self._device is not None:
            self._current.events = (self._event(), None)

    def started(self) -> Any:
        """A subscriber starts its ``compute_step``: a token for :meth:`stopped`."""
        event = self._event() if self._device else None
        if self._counting is not None:
            self._counting.count = 0
            self._counting.mode.__enter__()
        return (self.clock(), event)

    def stopped(self, sub: Subscription, token: Any) -> None:
        """The subscriber's ``compute_step`` returned (or raised)."""
        seconds = self.clock() - token[0]
        if self._counting is not None:
            self._counting.mode.__exit__(None, None, None)
        end = self._event() if token[1] is not None else None
        current = self._current
        if current is not None:
            current.subs.append((sub, seconds, token[1], end))
        if self._counting is not None:
            self.account(sub).ops = self._counting.count

    def end(self) -> None:
        """The step's delivery (and flush) is over."""
        current, self._current = self._current, None
        if current is None:
            return
        current.end = self.clock()
        if current.events is not None:
            current.events = (current.events[0], self._event())
        previous = self._steps[-1] if self._steps else None
        if previous is not None and previous.interval is None:
            previous.interval = current.start - previous.start
        self._steps.append(current)
        self._delivering = current.step
        self._settle()

    def records(self) -> list[ScalarRecord]:
        """Cost and cadence scalars waiting for the backends (taken by the bus's flush)."""
        out, self._records = self._records, []
        return out

    def settle(self) -> None:
        """Read every outstanding measurement now (on CUDA this waits for the steps' work);
        a window of fewer than :data:`WINDOW` steps is not published."""
        self._settle(final=True)

    def close(self) -> None:
        """The run is over: read what is outstanding, write the summary to the backends
        that show text and to the ``ikkuna`` logger (INFO)."""
        self.settle()
        lines = self.summary()
        if lines:
            self.bus.log_text("ikkuna/cost", "\n\n".join(lines))
            logging.getLogger("ikkuna").info("ikkuna: what watching cost: %s", "; ".join(lines))

    # ------------------------------------------------------------ measurement
    def account(self, sub: Subscription) -> _Account:
        found = self._accounts.get(sub)
        if found is None:
            name = sub.subscriber.name
            taken = {a.label for a in self._accounts.values()}
            label, n = name, 1
            while label in taken or label == EXPORTER:
                n += 1
                label = f"{name}#{n}"
            found = self._accounts[sub] = _Account(label)
            self._initial[sub] = sub.subsample
        return found

    def _open(self, now: float) -> _Step:
        snapshot, self._snapshot = self._snapshot, 0.0
        return _Step(step=-1, start=now, snapshot=snapshot)

    def _event(self) -> Any:
        import torch

        event = self._pool.pop() if self._pool else torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self._device))
        return event

    def _settle(self, final: bool = False) -> None:
        """Account for every step whose measurements are complete, oldest first."""
        while self._steps:
            head = self._steps[0]
            if head.interval is None and not final:
                return
            if not final and head.events is not None and not head.events[1].query():
                return
            self._steps.popleft()
            self._account_step(head)

    def _account_step(self, s: _Step) -> None:
        costs: list[tuple[Subscription, float]] = []
        for sub, host, start, end in s.subs:
            seconds = host
            if start is not None:
                end.synchronize()  # complete already (queried), or the run is over
                seconds = max(host, start.elapsed_time(end) / 1000)
                self._pool += [start, end]
            costs.append((sub, seconds))
        subs_total = sum(c for _, c in costs)
        span = s.end - s.start
        if s.events is not None:
            first, last = s.events
            last.synchronize()
            span = max(span, first.elapsed_time(last) / 1000)
            self._pool += [first, last]
        exporter = max(0.0, span - subs_total) + s.snapshot
        if s.interval is not None and self._steps:
            # the interval holds this end of step and the next step's training, snapshot
            # and forward (whose hooks are not timed)
            nxt = self._steps[0]
            plain = s.interval - (span if span > subs_total else subs_total) - nxt.snapshot
            if plain > 0:
                self._plain.append(plain)
                if not nxt.subs:  # nothing ran at the next step: no hook captured either
                    self._plain_quiet.append(plain)
        for sub, seconds in costs:
            acc = self.account(sub)
            acc.runs += 1
            acc.total += seconds
            acc.window += seconds
            share = exporter * (seconds / subs_total if subs_total > 0 else 1 / len(costs))
            acc.loaded.append(seconds + share)
        self._exporter_total += exporter
        self._exporter_window += exporter
        if not s.subs:
            self._exporter_quiet.append(exporter)
        self._finished += 1
        self._window_steps += 1
        if self._window_steps >= WINDOW:
            self._publish_window()
        n = self._finished
        if self.budget is not None and (n in FIRST_DECISIONS or n % DECIDE_EVERY == 0):
            self._decide(self._delivering)

    @property
    def plain_seconds(self) -> float | None:
        """The plain step time: the median of the recent steps at which nothing ran, when
        there were a few, else of every recent step; None before two steps."""
        if len(self._plain_quiet) >= QUIET_STEPS:
            return statistics.median(self._plain_quiet)
        return statistics.median(self._plain) if self._plain else None

    def fixed_share(self, plain: float) -> float:
        """The Exporter's own cost at a step where no subscriber ran (ending the step), a
        fraction of the plain step: the median of the recent quiet steps; 0 before a few.
        What watching costs whatever the cadences, so a budget leaves subscribers the rest."""
        if len(self._exporter_quiet) < QUIET_STEPS or plain <= 0:
            return 0.0
        return statistics.median(self._exporter_quiet) / plain

    def _publish_window(self) -> None:
        plain, step = self.plain_seconds, self._last_step()
        n, self._window_steps = self._window_steps, 0
        if plain is not None and plain > 0:
            for acc in self._accounts.values():
                self._records.append(_record(COST_TOPIC, acc.label, step, acc.window / (n * plain)))
            self._records.append(
                _record(COST_TOPIC, EXPORTER, step, self._exporter_window / (n * plain))
            )
            self._records.append(_record(PLAIN_TOPIC, "plain_ms", step, plain * 1000))
        for acc in self._accounts.values():
            acc.window = 0.0
        self._exporter_window = 0.0

    def _last_step(self) -> int:
        return self.bus.clock()[0]

    # ------------------------------------------------------------ the budget
    def cost_per_run(self, sub: Subscription) -> float | None:
        """Seconds a run of ``sub`` costs (its time and its share of the Exporter's at the
        steps it ran): the median of its recent runs; None before its first."""
        acc = self._accounts.get(sub)
        if acc is None or not acc.loaded:
            return None
        return statistics.median(acc.loaded)

    def _decide(self, step: int) -> None:
        plain = self.plain_seconds
        if plain is None or plain <= 0 or self.budget is None:
            return
        if _distributed(self.bus):  # said once
            return
        subs = [s for s in self.bus.subscriptions if s.subscriber.enabled]
        costs = {}
        for sub in subs:
            seconds = self.cost_per_run(sub)
            if seconds is not None:
                costs[sub] = seconds / plain
        floors = {s: s.subscriber.options.subsample for s in subs}
        current = {s: s.subsample for s in subs}
        fixed = self.fixed_share(plain)
        left = self.budget - fixed
        if left < self.budget * MIN_SUBSCRIBER_SHARE:
            left = self.budget * MIN_SUBSCRIBER_SHARE
            self.bus.warn_once("budget-fixed-cost", _FIXED_COST.format(
                fixed=fixed, budget=self.budget, share=MIN_SUBSCRIBER_SHARE))
        chosen = _budget.decide(costs, left, floors, current)
        changed = [(s, current[s], k) for s, k in chosen.items() if k != current[s]]
        if not changed:
            return
        for sub, _, cadence in changed:
            self.bus.set_cadence(sub, cadence)
            self._records.append(_record(CADENCE_TOPIC, self.account(sub).label, step, cadence))
        parts = ", ".join(
            f"{self.account(s).label} {_every(k)} (was {_every(old)}; "
            f"{costs.get(s, 0.0):.1%} of the step per run)"
            for s, old, k in changed
        )
        own = f"; the Exporter's own {fixed:.1%} at every step leaves {left:.1%}" if fixed else ""
        message = (
            f"ikkuna: budget {self.budget:.1%} of the step: from step {step + 1} on, {parts}; "
            f"plain step {plain * 1000:.3g} ms as measured{own}"
        )
        self.changes.append(message)
        warnings.warn(message, CadenceChange, stacklevel=2)

    # ------------------------------------------------------------ the summary
    def summary(self) -> list[str]:
        """One line per subscriber (and the Exporter): the share of the plain step it took
        on average over the run, its cost per run and how often it ran."""
        return _summary(self)

    # ------------------------------------------------------------ op counting (plans)
    def count_ops(self, on: bool) -> None:
        """While on, count the aten ops of each subscriber's run (:func:`measure_plan`)."""
        if on and self._counting is None:
            self._counting = _OpCount()
        elif not on:
            self._counting = None

    @property
    def counting(self) -> Any:
        return self._counting


_BUDGET_DISTRIBUTED = (
    "ikkuna: the budget keeps the configured cadences in a distributed run: each rank "
    "measures its own costs, and subscribers that merge across ranks (FSDP2 shards, DDP's "
    "shared work) must run at the same steps on every rank; the costs are still published"
)
_FIXED_COST = (
    "the Exporter's own cost at every step (its hooks and the end of each step) is "
    "{fixed:.1%} of the step as measured, which leaves less than {share:.0%} of the budget of "
    "{budget:.1%}: subscribers get {share:.0%} of it, and watching costs more than the budget. "
    "A larger budget, or fewer watched modules, would be kept"
)


def _summary(meter: CostMeter) -> list[str]:
    """:meth:`CostMeter.summary`."""
    plain = meter.plain_seconds
    if not meter._finished or not plain:
        return []
    steps = meter._finished
    lines = []
    for sub, acc in meter._accounts.items():
        if not acc.runs:
            continue
        share = acc.total / (steps * plain)
        per_run = acc.total / acc.runs / plain
        every = _every(sub.subsample)
        was = meter._initial.get(sub, sub.subsample)
        if was != sub.subsample:
            every += f" (the budget's; it started {_every(was)})"
        lines.append(
            f"{acc.label} {share:.1%} of the step, {every}; {per_run:.1%} per run, "
            f"{acc.runs} run{'s' if acc.runs != 1 else ''}"
        )
    lines.append(
        f"{EXPORTER} (payloads, snapshot, transfer, backends) "
        f"{meter._exporter_total / (steps * plain):.1%} of the step"
    )
    total = (sum(a.total for a in meter._accounts.values()) + meter._exporter_total) / (
        steps * plain
    )
    budget = f" (budget {meter.budget:.1%})" if meter.budget is not None else ""
    lines.append(
        f"total {total:.1%} of a plain step of {plain * 1000:.3g} ms{budget}, over "
        f"{steps} step{'s' if steps != 1 else ''}, as measured on this machine"
    )
    return lines


def _distributed(bus: MessageBus) -> bool:
    """Whether this process is one of several ranks of ``torch.distributed`` (then the
    budget keeps the configured cadences, and ``bus`` says so once)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        bus.warn_once("budget-distributed", _BUDGET_DISTRIBUTED)
        return True
    return False


def _record(topic: str, key: str, step: int, value: float) -> ScalarRecord:
    return ScalarRecord(topic, key, f"{topic}/{key}", step, float(value))


def _every(n: int) -> str:
    """``every step``, ``every 2nd step``, ``every 8th step``."""
    if n == 1:
        return "every step"
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"every {n}{suffix} step"


def cuda_device(model: Any) -> Any:
    """The CUDA device of ``model``'s first parameter, or None (timed by the host clock)."""
    for p in model.parameters():
        return p.device if p.device.type == "cuda" else None
    return None


class _OpCount:
    """Counts aten ops while entered (a ``TorchDispatchMode``), for plans only."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                counter.count += 1
                return func(*args, **(kwargs or {}))

        self.count = 0
        self.mode = Mode()


# ------------------------------------------------------------------------ plans
@dataclass(frozen=True)
class PlanRow:
    """One subscriber in a plan: what one run cost, and the cadence a budget gives it."""

    name: str
    subsample: int
    seconds: float
    fraction: float
    ops: int
    cadence: int

    @property
    def average(self) -> float:
        return self.fraction / self.cadence


@dataclass(frozen=True)
class Plan:
    """What :func:`measure_plan` measured: the plain step, each subscriber, the Exporter."""

    plain_seconds: float
    rows: list[PlanRow]
    exporter_seconds: float
    exporter_ops: int
    budget: float
    device: str

    def table(self) -> str:
        """The plan as a text table."""
        p = self.plain_seconds
        head = (f"{'subscriber':<24} {'subsample':>9} {'ms/run':>9} {'% of step':>9} "
                f"{'aten ops':>8} {'cadence':>8} {'average':>8}")
        lines = [
            f"plain step {p * 1000:.3g} ms on {self.device} (measured here); cadences for "
            f"a budget of {self.budget:.1%} of the step",
            head,
            "-" * len(head),
        ]
        for r in self.rows:
            lines.append(
                f"{r.name:<24} {r.subsample:>9} {r.seconds * 1000:>9.3f} {r.fraction:>9.1%} "
                f"{r.ops:>8} {r.cadence:>8} {r.average:>8.2%}"
            )
        total = sum(r.average for r in self.rows)
        lines.append(
            f"{EXPORTER:<24} {'':>9} {self.exporter_seconds * 1000:>9.3f} "
            f"{self.exporter_seconds / p:>9.1%} {self.exporter_ops:>8}"
        )
        lines.append(f"subscribers at these cadences: {total:.2%} of the step on average")
        return "\n".join(lines)


def _plain_step(exporter: Any, step: Callable[[], Any], meter: CostMeter) -> tuple[float, int]:
    """The plain step's seconds (the median of three silenced steps, after a warm-up and
    one counting its aten ops) and aten ops."""
    with exporter.silenced():
        step()
    counter = _OpCount()
    with exporter.silenced(), counter.mode:
        step()
    times = []
    with exporter.silenced():
        for _ in range(3):
            start = meter.clock()
            step()
            times.append(meter.clock() - start)
    return statistics.median(times), counter.count


def _watched_step(
    step: Callable[[], Any], meter: CostMeter, subs: list[Any], steps: int
) -> tuple[list[tuple[Any, str, float, int]], float, int]:
    """``steps`` steps with every subscriber running, the last one measured: per
    subscription (label, seconds, aten ops), the Exporter's seconds, the step's aten ops."""
    for _ in range(max(0, steps - 1)):
        step()
    meter.settle()
    before = {s: (meter.account(s).total, meter.account(s).runs) for s in subs}
    exporter_before = meter._exporter_total
    meter.count_ops(True)
    total = _OpCount()
    with total.mode:
        step()
    meter.count_ops(False)
    meter.settle()  # the measured step has ended: account for it now
    rows = []
    for s in subs:
        acc = meter.account(s)
        seconds = acc.total - before[s][0] if acc.runs > before[s][1] else 0.0
        rows.append((s, acc.label, seconds, acc.ops))
    return rows, meter._exporter_total - exporter_before, total.count


def measure_plan(
    exporter: Any,
    step: Callable[[], Any],
    *,
    budget: float | None = None,
    steps: int = 3,
) -> Plan:
    """Measure a plan on the watched model: silenced steps (nothing published: a warm-up,
    one counting the plain step's aten ops, three timing it, the median counts), then
    ``steps`` steps with every subscriber running (the last one is measured; the first ones
    warm up). ``step()``
    runs one training step of the user's loop on a real batch: these are real optimizer
    steps, so plan on a model you are about to train or throw away. The cadences are those
    ``budget`` (default: the run's, else 0.02) would give. Nothing reaches the backends
    while it runs; every subscriber's cadence is restored afterwards."""
    bus = exporter.bus
    meter: CostMeter = bus.cost
    chosen_budget = budget if budget is not None else meter.budget or 0.02
    saved_backends = list(bus.backends)
    bus.backends.clear()
    saved_budget, meter.budget = meter.budget, None
    subs = [s for s in bus.subscriptions if s.subscriber.enabled]
    cadences = {s: s.subsample for s in subs}
    try:
        plain, plain_ops = _plain_step(exporter, step, meter)
        for s in subs:
            bus.set_cadence(s, 1)
        rows, exporter_seconds, total_ops = _watched_step(step, meter, subs, steps)
    finally:
        meter.count_ops(False)
        for s, k in cadences.items():
            bus.set_cadence(s, k)
        bus.backends[:] = saved_backends
        meter.budget = saved_budget
        meter.records()  # the plan's values are not the run's
    plain = max(plain, 1e-9)
    costs = {s: seconds / plain for s, _, seconds, _ in rows}
    floors = {s: s.subscriber.options.subsample for s, *_ in rows}
    chosen = _budget.plan(costs, chosen_budget, floors)
    device = next((str(p.device) for p in exporter.model.parameters()), "cpu")
    sub_ops = sum(ops for *_, ops in rows)
    return Plan(
        plain_seconds=plain,
        rows=[
            PlanRow(label, s.subscriber.options.subsample, seconds, seconds / plain, ops,
                    chosen[s])
            for s, label, seconds, ops in rows
        ],
        exporter_seconds=exporter_seconds,
        exporter_ops=max(0, total_ops - plain_ops - sub_ops),
        budget=chosen_budget,
        device=device,
    )
