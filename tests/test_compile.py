"""A watched model under ``torch.compile``: the Exporter's module hooks are traced into the
graph (no graph break, no pydantic model inside a hook), names carry no ``_orig_mod.``, and
every published value equals the eager run's."""

from __future__ import annotations

import copy

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

    breaks = dict(counters["graph_break"])
    if watch_compiled:
        assert breaks == {}
    else:
        # the step bookkeeping in the watched module's own pre-hook stays out of the graph:
        # at most one break, before the first operation of the forward
        assert len(breaks) <= 1 and all("_on_forward_start" in b for b in breaks)
    # one graph, compiled again at most once when the first step has taught the capture
    assert len(graphs) <= 2
    assert set(got.seen) == set(expected.seen)
    assert not any("_orig_mod" in str(key) for key in got.seen)
    for ident, value in expected.seen.items():
        torch.testing.assert_close(got.seen[ident], value, msg=str(ident))
    torch._dynamo.reset()


def test_compiled_wrappers_are_looked_through_for_names() -> None:
    model = _model()
    compiled = torch.compile(copy.deepcopy(model), backend="eager")
    assert [n for n, _ in ik.select_modules(compiled)] == [n for n, _ in ik.select_modules(model)]
