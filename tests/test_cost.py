"""Measured cost per subscriber and the budget (ikkuna_core.cost), with a controlled clock:
subscribers whose cost is known (they advance the clock by it), plain steps of known length;
then a real run whose published costs add up to the overhead measured around it."""

from __future__ import annotations

import statistics
import time
import warnings
from typing import ClassVar

import pytest
import torch
from torch import nn

import ikkuna_core as ik
from ikkuna_core import cost as cost_module
from ikkuna_core.cost import CadenceChange, measure_plan
from ikkuna_core.messages import TopicPayloads
from ikkuna_core.testing import MemoryBackend


class Clock:
    """A perf_counter the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()

    class FakeTime:
        perf_counter = process_time = staticmethod(fake.perf_counter)

    monkeypatch.setattr(cost_module, "time", FakeTime)
    return fake


class Costly(ik.Subscriber):
    """Takes ``seconds[0]`` of the clock per run (a list: the test changes it)."""

    name = "costly"
    default_topics: ClassVar[tuple[str, ...]] = ("batch_finished",)

    def __init__(self, clock: Clock, seconds: list[float], **options: object) -> None:
        super().__init__(**options)
        self.clock, self.seconds = clock, seconds
        self.ran: list[int] = []

    def compute_step(self, step: ik.StepBundle) -> None:
        self.ran.append(step.global_step)
        self.clock.now += self.seconds[0]


def _run(bus: ik.MessageBus, clock: Clock, steps: range, plain: float = 0.010) -> None:
    for step in steps:
        clock.now += plain  # the training step itself
        bus.deliver((step, 0, step), {"batch_finished": TopicPayloads.event("batch_finished")})


def _bus(budget: float | None) -> tuple[ik.MessageBus, MemoryBackend]:
    bus = ik.MessageBus(on_error="raise")
    bus.cost.budget = budget
    backend = MemoryBackend()
    bus.add_backend(backend)
    return bus, backend


def _series(backend: MemoryBackend, tag: str) -> list[tuple[int, float]]:
    return [(r.step, r.value) for r in backend.scalars if r.tag == tag]


def test_costs_are_published_as_fractions_of_the_plain_step(clock: Clock) -> None:
    bus, backend = _bus(None)
    a = bus.register_subscriber(Costly(clock, [0.001]))
    b = bus.register_subscriber(Costly(clock, [0.0005], subsample=2))
    _run(bus, clock, range(64))
    bus.close()
    # plain step 10 ms, a 1 ms every step: 10 %; b 0.5 ms every 2nd step: 2.5 % on average
    costs_a = _series(backend, "ikkuna/cost/costly")
    costs_b = _series(backend, "ikkuna/cost/costly#2")
    assert len(costs_a) == 64 // cost_module.WINDOW
    assert all(v == pytest.approx(0.10) for _, v in costs_a)
    assert all(v == pytest.approx(0.025) for _, v in costs_b)
    assert all(v == pytest.approx(0.0, abs=1e-9) for _, v in
               _series(backend, "ikkuna/cost/exporter"))  # the fake clock stands still
    assert all(v == pytest.approx(10.0) for _, v in _series(backend, "ikkuna/step/plain_ms"))
    # no budget: today's cadences, nothing changed
    assert a.ran == list(range(64)) and b.ran == list(range(0, 64, 2))
    assert not _series(backend, "ikkuna/cadence/costly")
    lines = bus.cost.summary()
    assert lines[0] == "costly 10.0% of the step, every step; 10.0% per run, 64 runs"
    assert lines[1] == "costly#2 2.5% of the step, every 2nd step; 5.0% per run, 32 runs"
    assert lines[-1].startswith("total 12.5% of a plain step of 10 ms, over 64 steps")


def test_a_subscriber_whose_cost_is_known_gets_the_cadence_the_budget_implies(
    clock: Clock,
) -> None:
    bus, backend = _bus(0.02)
    a = bus.register_subscriber(Costly(clock, [0.001]))  # 10 % per run
    b = bus.register_subscriber(Costly(clock, [0.0001]))  # 1 % per run
    with pytest.warns(CadenceChange, match=r"budget 2\.0% of the step: from step 5 on, costly "
                      r"every 16th step \(was every step; 10\.0% of the step per run\)"):
        _run(bus, clock, range(200))
    bus.close()
    # decided after 4 measured steps (a step is measured when the next one starts): 0.1/16 +
    # 0.01 = 1.6 % fits, 0.1/8 + 0.01 = 2.25 % does not
    subs = {s.subscriber: s for s in bus.subscriptions}
    assert subs[a].subsample == 16 and subs[b].subsample == 1
    assert a.ran == [0, 1, 2, 3, 4, *range(16, 200, 16)]  # evenly spaced from step 5 on
    assert b.ran == list(range(200))
    assert _series(backend, "ikkuna/cadence/costly") == [(4, 16.0)]
    assert a.options.subsample == 1  # the configuration is untouched
    assert "every 16th step (the budget's; it started every step)" in bus.cost.summary()[0]


def test_the_budget_re_decides_when_costs_change(clock: Clock) -> None:
    bus, backend = _bus(0.02)
    seconds = [0.002]  # 20 % per run
    a = bus.register_subscriber(Costly(clock, seconds, subsample=3))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _run(bus, clock, range(100))
        sub = bus.subscriptions[0]
        assert sub.subsample == 12  # 3, 6, 12: 20 % / 12 = 1.67 %
        seconds[0] = 0.0001  # 1 % per run: every 3rd step fits
        _run(bus, clock, range(100, 400))
        assert sub.subsample == 3
        seconds[0] = 0.01  # 100 % per run: 3 * 2**6 = 192 (0.52 %)
        _run(bus, clock, range(400, 1200))
        assert sub.subsample == 96  # 3, 6, ..., 96: 100 % / 96 = 1.04 %
    bus.close()
    changes = [str(w.message) for w in said if w.category is CadenceChange]
    assert len(changes) == 3  # each change said once
    cadences = [v for _, v in _series(backend, "ikkuna/cadence/costly")]
    assert cadences == [12.0, 3.0, 96.0]
    assert all(step % 3 == 0 for step in a.ran)


def test_measuring_dispatches_no_aten_op() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Count.n += 1
            return func(*args, **(kwargs or {}))

    class Nothing(ik.Subscriber):
        name = "nothing"
        default_topics: ClassVar[tuple[str, ...]] = ("batch_finished",)

        def compute_step(self, step: ik.StepBundle) -> None:
            pass

    bus, _ = _bus(0.02)
    bus.register_subscriber(Nothing())
    with Count(), warnings.catch_warnings():
        warnings.simplefilter("ignore", CadenceChange)
        for step in range(40):
            bus.deliver((step, 0, step), {"batch_finished": TopicPayloads.event("batch_finished")})
        bus.close()
    assert Count.n == 0


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128),
                         nn.ReLU(), nn.Linear(128, 10))


@pytest.mark.usefixtures("installed_plugins", "one_thread")
@pytest.mark.timing
def test_a_real_runs_published_costs_add_up_to_its_measured_overhead() -> None:
    """Blocks of plain steps (the Exporter silenced) alternate with blocks of watched steps
    (every subscriber every 2nd step, so the meter sees steps at which nothing ran); the
    published costs (the median of each ikkuna/cost/* series: fractions of the meter's own
    plain-step estimate) must add up to watched / plain - 1 within 30 %. Both timed by the
    process clock (one thread), so other processes on the machine do not count. Parameter
    topics only: the forward hooks' captures of activations are not timed (the meter counts
    them in the plain step)."""
    model = _mlp()
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    config = {
        "plugins": ["norms", "histograms"],
        "backends": [],
        "subscribers": [
            {"name": "norm", "topics": ["weight_gradients", "weights", "weight_updates"],
             "subsample": 2},
            {"name": "histogram", "topics": ["weight_gradients", "weights"], "subsample": 2},
        ],
    }
    exporter = ik.watch(model, nn.CrossEntropyLoss(), config)
    backend = exporter.bus.add_backend(MemoryBackend())
    loss_fn = exporter.loss_fn
    assert loss_fn is not None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> float:  # timed by the process clock, as the meter times on the CPU
        start = time.process_time()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        return time.process_time() - start

    plain: list[float] = []
    watched: list[float] = []
    for _ in range(5):
        step()  # warm-up
    for _ in range(12):
        with exporter.silenced():
            plain += [step() for _ in range(8)]
        watched += [step() for _ in range(8)]
    exporter.close()
    # every 2nd step does the work: the mean over pairs of steps, each pair's median
    pairs = [watched[i] + watched[i + 1] for i in range(0, len(watched), 2)]
    overhead = statistics.median(pairs) / 2 / statistics.median(plain) - 1
    published: dict[str, list[float]] = {}
    for r in backend.scalars:
        if r.topic == "ikkuna/cost":
            published.setdefault(r.tag, []).append(r.value)
    assert set(published) == {"ikkuna/cost/norm", "ikkuna/cost/histogram",
                              "ikkuna/cost/exporter"}
    total = sum(statistics.median(v) for v in published.values())
    assert overhead > 0.1  # histograms of an MLP's parameters are not free
    assert total == pytest.approx(overhead, rel=0.3), (total, overhead, published)


@pytest.mark.usefixtures("installed_plugins")
def test_measure_plan_tables_each_subscribers_cost_ops_and_cadence() -> None:
    model = _mlp()
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    config = {
        "plugins": ["norms", "histograms"],
        "backends": [],
        "budget": 0.05,
        "subscribers": [
            {"name": "norm", "topics": ["weight_gradients"]},
            {"name": "histogram", "topics": ["activations"], "subsample": 2},
        ],
    }
    exporter = ik.watch(model, nn.CrossEntropyLoss(), config)
    backend = exporter.bus.add_backend(MemoryBackend())
    loss_fn = exporter.loss_fn
    assert loss_fn is not None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

    result = measure_plan(exporter, step)
    assert [r.name for r in result.rows] == ["norm", "histogram"]
    assert result.budget == 0.05 and result.plain_seconds > 0
    norm, hist = result.rows
    assert norm.ops > 0 and hist.ops > 0 and norm.seconds > 0 and hist.seconds > 0
    assert hist.subsample == 2 and hist.cadence % 2 == 0
    for r in result.rows:  # the cadence the budget gives, from what was measured
        assert r.cadence >= r.subsample and (r.cadence // r.subsample).bit_count() == 1
    assert sum(r.average for r in result.rows) <= 0.05 or max(
        r.cadence for r in result.rows) >= 2**20
    table = result.table()
    assert "norm" in table and "histogram" in table and "aten ops" in table
    assert not backend.scalars and not backend.histograms  # a plan publishes nothing
    subs = exporter.bus.subscriptions
    assert [s.subsample for s in subs] == [1, 2]  # the cadences are restored
    # the ops counted for norm are those of its computation: count them independently
    from ikkuna_core import ops

    counted = []
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            counted.append(func)
            return func(*args, **(kwargs or {}))

    grads = [p.grad for n, p in model.named_parameters() if n.endswith("weight")]
    with Count():
        ops.norms(grads)
    assert norm.ops >= len(counted)
    exporter.close()


def test_the_budget_leaves_subscribers_what_the_exporters_own_cost_leaves(
    clock: Clock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Exporter takes 1 ms (10 % of the 10 ms step) at the end of every step, a
    subscriber 2 ms per run: with a budget of 20 % it may take only the 10 % left, so it runs
    every 4th step (its 2 ms plus the Exporter's 1 ms at its steps, 30 % a run: 7.5 % on
    average; every 2nd step would be 15 %), and the whole of watching, measured, stays
    within the budget. Without the Exporter's share counted it ran every 2nd step: 25 %."""
    bus, backend = _bus(0.2)
    meter = bus.cost
    end = meter.end

    def exporter_end() -> None:
        clock.now += 0.001  # the Exporter's own work ending the step
        end()

    monkeypatch.setattr(meter, "end", exporter_end)
    a = bus.register_subscriber(Costly(clock, [0.002]))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        _run(bus, clock, range(400))
    bus.close()
    assert bus.subscriptions[0].subsample == 4
    assert meter.fixed_share(meter.plain_seconds or 0) == pytest.approx(0.10)
    changes = [str(w.message) for w in said if w.category is CadenceChange]
    assert changes[-1].endswith("the Exporter's own 10.0% at every step leaves 10.0%")
    assert a.ran[-3:] == [388, 392, 396]
    total = float(bus.cost.summary()[-1].split()[1].rstrip("%")) / 100
    assert total <= 0.2  # watching as a whole, as measured
    assert [v for _, v in _series(backend, "ikkuna/cadence/costly")] == [2.0, 4.0]


def test_a_fixed_cost_above_the_budget_is_said_and_subscribers_keep_a_quarter(
    clock: Clock, monkeypatch: pytest.MonkeyPatch,
) -> None:
    bus, _ = _bus(0.02)
    meter = bus.cost
    end = meter.end

    def exporter_end() -> None:
        clock.now += 0.0003  # 3 % of the step at every step: more than the budget
        end()

    monkeypatch.setattr(meter, "end", exporter_end)
    bus.register_subscriber(Costly(clock, [0.00005]))  # 0.5 % a run, 3.5 % with the Exporter's
    with pytest.warns(RuntimeWarning, match=r"own cost at every step \(its hooks and the end "
                      r"of each step\) is 3\.0% of the step as measured, which leaves "
                      r"less than 25% of the budget of 2\.0%"):
        _run(bus, clock, range(400))
    bus.close()
    assert bus.subscriptions[0].subsample == 8  # 3.5 % / 8 < 0.5 %, a quarter of 2 %
