"""A watched model under ``torch.compile``: the Exporter's module hooks are traced into the
graph (no graph break, no pydantic model inside a hook), names carry no ``_orig_mod.``, and
every published value equals the eager run's."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

import ikkuna_core as ik

TOPICS = ["activations", "weight_gradients", "weight_updates", "loss"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


def _train(model: nn.Module, watched: nn.Module, recorder_cls, steps: int = 3):
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(watched)
    rec = exporter.bus.register_subscriber(recorder_cls(topics=TOPICS))
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(watched(x), y).backward()
        opt.step()
    exporter.close()
    return rec


@pytest.mark.parametrize("watch_compiled", [True, False], ids=["watch-compiled", "compile-watched"])
def test_compiled_model_has_no_graph_break_and_publishes_the_eager_values(
    watch_compiled: bool, recorder_cls
) -> None:
    from torch._dynamo.backends.debugging import aot_eager
    from torch._dynamo.utils import counters

    eager = _model()
    expected = _train(eager, eager, recorder_cls)

    graphs = []

    def backend(gm, inputs):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return aot_eager(gm, inputs)

    torch._dynamo.reset()
    counters.clear()
    model = _model()
    compiled = torch.compile(model, backend=backend)
    got = _train(model, compiled if watch_compiled else model, recorder_cls)

    # compiling the watched model: the step bookkeeping runs in the compiled wrapper's own
    # hooks, outside the graph (see the test below), so neither order breaks the graph
    assert dict(counters["graph_break"]) == {}
    # one graph, compiled again at most once when the first step has taught the capture
    assert len(graphs) <= 2
    assert set(got.seen) == set(expected.seen)
    assert not any("_orig_mod" in str(key) for key in got.seen)
    for ident, value in expected.seen.items():
        torch.testing.assert_close(got.seen[ident], value, msg=str(ident))
    torch._dynamo.reset()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("root", ["sequential", "own-class"])
def test_compiling_the_watched_model_runs_no_break_after_its_first_call(
    root: str, recorder_cls, monkeypatch
) -> None:
    """``torch.compile(watched)``: dynamo traces a ``torch.nn`` container's hooks into its
    graph, and the model's pre-hook must stay out of graphs; the compiled wrapper does the
    bookkeeping in hooks of its own, eagerly (adopted when dynamo starts compiling), so the
    model's disabled hook never runs: no graph break, one graph for every step, and the
    values are the eager run's."""
    from torch._dynamo.utils import counters

    from ikkuna_core._exporter import relay

    ran: list[int] = []  # the steps at which the model's own hook ran (-1: before the first)
    current: dict[str, ik.Exporter] = {}
    eager_hook = relay.Relay._eager

    def counted(self, hook):  # type: ignore[no-untyped-def]
        run = eager_hook(self, hook)

        def wrapped(*args):  # type: ignore[no-untyped-def]
            ran.append(current["exporter"].clock.global_step)
            return run(*args)

        return wrapped

    monkeypatch.setattr(relay.Relay, "_eager", counted)

    def make() -> nn.Module:
        torch.manual_seed(0)
        return (nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
                if root == "sequential" else _Net())

    def train(model: nn.Module, compiled: bool):  # type: ignore[no-untyped-def]
        exporter = ik.Exporter(model, nn.CrossEntropyLoss(), bus=ik.MessageBus(on_error="raise"))
        current["exporter"] = exporter
        rec = exporter.subscribe(recorder_cls(topics=DATA_TOPICS)).target
        call = torch.compile(model, backend=backend) if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            x, y = torch.randn(4, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
            opt.zero_grad()
            exporter.loss_fn(call(x), y).backward()
            opt.step()
        if exporter is not None:
            exporter.close()
        return rec

    graphs = []

    def backend(gm, inputs):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return gm.forward

    expected = train(make(), compiled=False)
    torch._dynamo.reset()
    counters.clear()
    ran.clear()
    got = train(make(), compiled=True)
    assert ran == []  # the model's own (disabled) hook
    assert dict(counters["graph_break"]) == {}
    assert len(graphs) == 1
    assert {s for _, _, s in got.seen} == set(range(6))
    assert set(got.seen) == set(expected.seen)
    for ident, value in expected.seen.items():
        torch.testing.assert_close(got.seen[ident], value, msg=str(ident))
    torch._dynamo.reset()


def test_compiled_wrappers_are_looked_through_for_names() -> None:
    model = _model()
    compiled = torch.compile(copy.deepcopy(model), backend="eager")
    assert [n for n, _ in ik.select_modules(compiled)] == [n for n, _ in ik.select_modules(model)]


#: every topic that carries data (all but the event markers)
DATA_TOPICS = [t for t in (*ik.topics.MODULE_TOPICS, *ik.topics.NETWORK_TOPICS)
               if t not in ik.topics.EVENT_TOPICS]


def _train_all(model: nn.Module, watched: nn.Module, recorder_cls, steps: int):
    exporter = ik.Exporter(watched, nn.CrossEntropyLoss(), bus=ik.MessageBus(on_error="raise"))
    rec = recorder_cls(topics=DATA_TOPICS)
    exporter.subscribe(rec)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
        opt.zero_grad()
        exporter.loss_fn(watched(x), y).backward()
        opt.step()
    exporter.close()
    return rec


def _assert_every_topic_in_one_graph(backend_name: str, recorder_cls, steps: int) -> None:
    """A watched compiled model with every data topic subscribed: one graph, compiled once
    over ``steps`` steps (no graph break, no recompilation), and the eager values."""
    from torch._dynamo.utils import counters

    eager = _model()
    expected = _train_all(eager, eager, recorder_cls, steps)
    compiled_once = []

    def backend(gm, inputs):  # type: ignore[no-untyped-def]
        compiled_once.append(gm)
        return torch._dynamo.lookup_backend(backend_name)(gm, inputs)

    torch._dynamo.reset()
    counters.clear()
    model = _model()
    got = _train_all(model, torch.compile(model, backend=backend), recorder_cls, steps)
    assert dict(counters["graph_break"]) == {}
    assert len(compiled_once) == 1  # one graph, never compiled again
    assert counters["stats"]["unique_graphs"] == 1
    topics = {t for t, _, _ in got.seen}
    assert topics == set(DATA_TOPICS)
    assert set(got.seen) == set(expected.seen)
    assert {s for _, _, s in got.seen} == set(range(steps))
    for ident, value in expected.seen.items():
        torch.testing.assert_close(got.seen[ident], value, msg=str(ident))
    torch._dynamo.reset()


def test_every_data_topic_compiles_into_one_graph_aot_eager(recorder_cls) -> None:
    _assert_every_topic_in_one_graph("aot_eager", recorder_cls, steps=10)


@pytest.mark.slow  # about 50 s with a cold inductor cache on 2 CPU cores
def test_every_data_topic_compiles_into_one_graph_inductor(recorder_cls) -> None:
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("inductor on the CPU compiles C++: no C++ compiler here")
    _assert_every_topic_in_one_graph("inductor", recorder_cls, steps=10)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc, self.act = nn.LayerNorm(16), nn.Linear(16, 16), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(self.norm(x)))


class _Blocks(nn.Module):
    """Identical blocks (each checkpointed, outside its compiled forward, with
    ``checkpointed``) and a head."""

    def __init__(self, n: int, checkpointed: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.checkpointed = checkpointed
        self.blocks = nn.ModuleList(_Block() for _ in range(n))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = (torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
                 if self.checkpointed else block(x))
        return self.head(x)


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpoint-outside"])
def test_blocks_compiled_one_by_one_share_their_graph_watched_as_unwatched(
    checkpointed: bool, recorder_cls
) -> None:
    """torchtitan's way: each of 6 identical blocks compiled in place. Unwatched they share
    their graphs (compiled for the first block, and once more for the second, whose input
    requires grad); watched with every data topic, the hooks traced into them must not make
    each block's graph its own (dynamo guarding on which module a hook watches): as many
    graphs over 10 steps as unwatched, no break, and the eager values. With the checkpoint
    around the compiled block, its recomputation reruns the compiled forward: it publishes
    nothing (no ``#1`` call) and compiles nothing more."""
    from torch._dynamo.utils import counters

    def run(watched: bool, compiled: bool):  # type: ignore[no-untyped-def]
        model = _Blocks(6, checkpointed)
        if compiled:
            for block in model.blocks:
                block.compile(backend=backend)
        loss_fn, exporter, rec = nn.CrossEntropyLoss(), None, None
        if watched:
            exporter = ik.Exporter(model, loss_fn, bus=ik.MessageBus(on_error="raise"))
            rec = exporter.subscribe(recorder_cls(topics=DATA_TOPICS)).target
            loss_fn = exporter.loss_fn
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        for _ in range(10):
            x, y = torch.randn(4, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        if exporter is not None:
            exporter.close()
        return rec

    graphs = []

    def backend(gm, inputs):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

    def compiled(watched: bool):  # type: ignore[no-untyped-def]
        torch._dynamo.reset()
        counters.clear()
        graphs.clear()
        rec = run(watched, compiled=True)
        assert dict(counters["graph_break"]) == {}
        return rec, (len(graphs), counters["stats"]["unique_graphs"])

    expected = run(watched=True, compiled=False)
    _, unwatched = compiled(watched=False)
    got, watched = compiled(watched=True)
    assert unwatched == (2, 2)  # the blocks share their graphs
    assert watched == unwatched
    assert {t for t, _, _ in got.seen} == set(DATA_TOPICS)
    assert not any("#" in str(key) for _, key, _ in got.seen)
    assert set(got.seen) == set(expected.seen)
    for ident, value in expected.seen.items():
        torch.testing.assert_close(got.seen[ident], value, msg=str(ident))
    torch._dynamo.reset()


def test_a_capture_plan_changing_with_the_same_topics_does_not_recompile(recorder_cls) -> None:
    """A finiteness check of the activations at every step and a recorder of them at every
    other step: the plan alternates (reduced in the hooks, kept whole) over the same topic.
    The traced hook reads only which forward topics are captured, so one graph serves every
    step (a hook reading the plan made dynamo guard on it: two graphs), and the recorder
    sees the eager values."""

    class Finite(ik.Subscriber):
        name = "finite"

        def finiteness_only(self, topic: str) -> bool:
            return True

        def compute(self, bundle: ik.MessageBundle) -> None:
            pass

    graphs = []

    def backend(gm, inputs):  # type: ignore[no-untyped-def]
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)

    def run(compiled: bool):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        exporter = ik.Exporter(model, nn.CrossEntropyLoss(), bus=ik.MessageBus(on_error="raise"))
        exporter.subscribe(Finite(topics=["activations"]))
        rec = exporter.subscribe(recorder_cls(topics=["activations"], subsample=2)).target
        call = torch.compile(model, backend=backend) if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            x, y = torch.randn(4, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
            opt.zero_grad()
            exporter.loss_fn(call(x), y).backward()
            opt.step()
        exporter.close()
        return rec

    from torch._dynamo.utils import counters

    expected = run(compiled=False)
    torch._dynamo.reset()
    counters.clear()
    got = run(compiled=True)
    assert dict(counters["graph_break"]) == {}
    assert len(graphs) == 1
    assert {s for _, _, s in got.seen} == {0, 2, 4}
    assert set(got.seen) == set(expected.seen)
    for ident, value in expected.seen.items():
        torch.testing.assert_close(got.seen[ident], value, msg=str(ident))
    torch._dynamo.reset()
