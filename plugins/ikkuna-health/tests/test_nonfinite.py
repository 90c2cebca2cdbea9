"""``nonfinite`` names where a planted NaN/inf was produced: the module, the topic, the step
and the direction, each expectation being where the test planted it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from health_helpers import Planted, batches, caught, health_warnings, mlp, train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn import functional as F

import ikkuna_core as ik
from ikkuna_health import NonFinite, NonFiniteError


def _only_finding(sub: NonFinite) -> tuple[int, str, str, str | None]:
    assert len(sub.findings) == 1, sub.findings
    step, found = sub.findings[0]
    return step, found.direction, found.topic, found.module


def test_forward_nan_is_named_at_the_module_that_produced_it_not_those_after() -> None:
    sub = NonFinite()
    with caught() as found:
        exporter, memory = train(mlp(Planted(16, 16, "forward", at=4)), [sub], 8)
    assert _only_finding(sub) == (4, "forward", "activations", "2")
    (message,) = health_warnings(found)
    assert "'2'" in message and "'activations'" in message and "step 4" in message
    assert "NaN" in message
    assert memory.scalar("nonfinite/origin/forward/2", 4) == 1.0
    # the step was skipped by the loop (non-finite loss): the next attempt is step 4 again
    assert exporter.global_step == 6


@pytest.mark.parametrize("where", ["forward", "input_grad"])
def test_in_place_relus_leave_the_origin_where_it_was(where: str) -> None:
    """With in-place ReLUs after the Linear and after the planted layer (the forward checks
    of their outputs wait, re-stamped, for the loss; the ReLUs' output gradients borrow the
    layers' tellers), a NaN planted in the forward or in a backward input gradient is still
    named at the planted layer, at its step."""
    torch.manual_seed(0)
    planted = Planted(16, 16, where, at=3)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(inplace=True), planted,
                          nn.ReLU(inplace=True), nn.Linear(16, 3))
    sub = NonFinite()
    with caught():
        train(model, [sub], 6, skip_bad=where == "forward")
    topic = "activations" if where == "forward" else "layer_gradients"
    direction = "forward" if where == "forward" else "backward"
    assert _only_finding(sub) == (3, direction, topic, "2")


def test_inf_in_a_later_module_and_the_execution_order_is_learned() -> None:
    # defined in one order, called in another: the origin is the first in execution order
    class Swapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Linear(16, 3)
            self.planted = Planted(16, 16, "forward", at=5, value=math.inf)
            self.early = nn.Linear(6, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.late(torch.relu(self.planted(torch.relu(self.early(x)))))

    torch.manual_seed(0)
    sub = NonFinite()
    with caught():
        train(Swapped(), [sub], 8)
    assert sub.structure.order == ["early", "planted", "late"]
    assert _only_finding(sub) == (5, "forward", "activations", "planted")
    assert sub.findings[0][1].kind == "inf"


def test_nan_made_by_code_between_two_modules_is_named_at_the_module_it_reaches() -> None:
    """A NaN made by a function in the parent's forward (no module of its own): the module
    that received it, its ``inputs`` non-finite while the module before gave a finite
    output."""

    class Between(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Linear(6, 16), nn.Linear(16, 3)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.first(x)
            if self.training:
                self.calls += 1
                if self.calls == 4:  # step 3
                    h = torch.log(h)  # NaN where h < 0
            return self.second(h)

    torch.manual_seed(0)
    sub = NonFinite()
    with caught() as found:
        train(Between(), [sub], 6)
    assert _only_finding(sub) == (3, "forward", "inputs", "second")
    assert "made by code between" in health_warnings(found)[0]


def test_nan_in_a_modules_backward_input_gradient() -> None:
    sub = NonFinite()
    with caught() as found:
        train(mlp(Planted(16, 16, "input_grad", at=3)), [sub], 6, skip_bad=False)
    assert _only_finding(sub) == (3, "backward", "layer_gradients", "2")
    (message,) = health_warnings(found)
    assert "'2'" in message and "'layer_gradients'" in message and "step 3" in message


def test_nan_in_a_parameter_gradient_while_the_output_gradient_is_finite() -> None:
    sub = NonFinite()
    with caught():
        train(mlp(Planted(16, 16, "weight_grad", at=2)), [sub], 6, skip_bad=False)
    assert _only_finding(sub) == (2, "backward", "weight_gradients", "2")
    assert sub.findings[0][1].key == "2"


def test_backward_nan_of_a_step_whose_optimizer_step_is_skipped_is_seen() -> None:
    """The loop skips the optimizer when a gradient is non-finite: the step's gradients
    still reach the subscriber (the core hands skipped steps to it)."""
    sub = NonFinite()
    model = mlp(Planted(16, 16, "weight_grad", at=2))
    exporter = ik.Exporter()
    exporter.set_model(model)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    exporter.bus.register_subscriber(sub)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    skipped = 0
    with caught():
        for x, y in batches(6):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            if not all(torch.isfinite(p.grad).all() for p in model.parameters()):
                skipped += 1
                continue
            opt.step()
        exporter.close()
    assert skipped == 1
    assert _only_finding(sub) == (2, "backward", "weight_gradients", "2")


def test_nan_in_the_loss() -> None:
    calls = {"n": 0}

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        value = F.cross_entropy(out, y)
        return value * math.nan if calls["n"] == 4 else value  # the 4th call: step 3

    sub = NonFinite()
    with caught():
        train(mlp(Planted(16, 16)), [sub], 6, loss_fn=loss_fn)
    assert _only_finding(sub) == (3, "loss", "loss", None)


def test_inf_in_the_input_data() -> None:
    data = batches(6)
    data[2][0][1, 3] = math.inf
    sub = NonFinite()
    with caught() as found:
        train(mlp(Planted(16, 16)), [sub], 6, data=data)
    assert _only_finding(sub) == (2, "input", "input_data", None)
    assert "step 2" in health_warnings(found)[0] and "'input_data'" in health_warnings(found)[0]


def test_an_optimizer_update_that_turns_finite_weights_non_finite() -> None:
    model = mlp(Planted(16, 16))
    target = model[4].weight

    class Corrupting(torch.optim.Optimizer):
        """Plain SGD whose update of module 4's weight at step 3 is NaN in one entry."""

        def __init__(self, params) -> None:  # type: ignore[no-untyped-def]
            super().__init__(params, {"lr": 0.05})
            self.steps = 0

        @torch.no_grad()
        def step(self, closure=None):  # type: ignore[no-untyped-def,override]
            for group in self.param_groups:
                for p in group["params"]:
                    update = -group["lr"] * p.grad
                    if self.steps == 3 and p is target:
                        update[1, 2] = math.nan
                    p.add_(update)
            self.steps += 1

    sub = NonFinite()
    with caught() as found:
        train(model, [sub], 7, optimizer=Corrupting(model.parameters()))
    assert _only_finding(sub) == (3, "update", "weights", "4")
    assert len(health_warnings(found)) == 1  # the NaN weights' later steps are no new origin


def test_a_second_origin_is_reported_once_more() -> None:
    planted = Planted(16, 16, "forward", at={2, 5})
    sub = NonFinite()
    with caught() as found:
        train(mlp(planted), [sub], 8)
    assert [s for s, _ in sub.findings] == [2]  # the same origin again: not repeated
    assert len(health_warnings(found)) == 1


def test_large_finite_fp16_values_are_no_alarm() -> None:
    class Near65k(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * 0 + 65000.0).half()  # fp16's largest finite value is 65,504

    class ToFloat(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float() / 65000.0

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), Near65k(), ToFloat(), nn.Linear(16, 3))
    sub = NonFinite()
    with caught() as found:
        _, memory = train(model, [sub], 4)
    assert sub.findings == [] and health_warnings(found) == []
    assert not [r for r in memory.scalars if r.tag.startswith("nonfinite")]


def test_action_raise_stops_the_step_with_the_module_topic_and_step() -> None:
    sub = NonFinite(action="raise")
    model = mlp(Planted(16, 16, "forward", at=3))
    exporter = ik.Exporter()  # on_error="warn": the error still comes out as it is
    exporter.set_model(model)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    exporter.bus.register_subscriber(sub)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    reached = []
    with caught(), pytest.raises(NonFiniteError) as info:
        for i, (x, y) in enumerate(batches(6)):
            reached.append(i)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()  # ends the step: the error comes out of it
    assert reached[-1] == 3  # by the end of that step, not later
    err = info.value
    assert (err.module, err.topic, err.step, err.direction) == ("2", "activations", 3, "forward")
    assert isinstance(err, ik.IkkunaError) and "step 3" in str(err)
    exporter.close()


def test_the_record_is_read_back_by_tensorboard(tmp_path: Path) -> None:
    from ikkuna_core.backends.tensorboard import TensorBoardBackend

    sub = NonFinite()
    with caught():
        train(mlp(Planted(16, 16, "input_grad", at=3)), [sub], 6, skip_bad=False,
              backend=TensorBoardBackend(tmp_path))
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    events = acc.Scalars("nonfinite/origin/backward/2")
    assert [(e.step, e.value) for e in events] == [(3, 1.0)]
    assert all(not t.startswith("nonfinite") or t == "nonfinite/origin/backward/2"
               for t in acc.Tags()["scalars"])


# ---------------------------------------------------------------------- GradScaler
def _amp_loop(model: nn.Module, sub: NonFinite, steps: int, init_scale: float
              ) -> tuple[ik.Exporter, int, list[int]]:
    exporter = ik.Exporter()
    exporter.set_model(model)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    exporter.bus.register_subscriber(sub)
    from ikkuna_core.testing import MemoryBackend

    memory = MemoryBackend()
    exporter.bus.add_backend(memory)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    skips, runs, run = 0, [], 0
    for x, y in batches(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        scaler.scale(loss_fn(out.float(), y)).backward()
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)):
            skips, run = skips + 1, run + 1  # the scaler skipped this optimizer step
        else:
            runs.append(run)
            run = 0
    runs.append(run)
    exporter.close()
    exporter.memory = memory  # type: ignore[attr-defined]
    return exporter, skips, runs


def test_grad_scaler_overflow_skips_are_counted_and_quiet() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 3))
    sub = NonFinite()
    with caught() as found:
        exporter, skips, runs = _amp_loop(model, sub, 12, init_scale=2.0**24)
    # float16 gradients overflow at this scale until the scaler has halved it enough
    assert skips >= 3 and max(runs) < sub.options.collapse_after
    assert sub.overflow_skips == skips
    assert health_warnings(found) == [] and sub.findings == []
    counts = [r.value for r in exporter.memory.scalars if r.tag == "nonfinite/overflow_skips"]
    assert counts == [float(i) for i in range(1, skips + 1)]


def test_a_collapsing_grad_scaler_scale_is_reported() -> None:
    planted = Planted(16, 16, "weight_grad", at=set(range(100)), value=math.inf)
    sub = NonFinite(collapse_after=4)
    with caught() as found:
        _, skips, runs = _amp_loop(mlp(planted), sub, 6, init_scale=1024.0)
    assert skips == 6 and runs == [6]
    (message,) = health_warnings(found)
    assert "skipped 4 optimizer steps in a row" in message
    assert "'2'" in message and "'weight_gradients'" in message and "step 0" in message
    assert sub.findings[0][1].direction == "collapse"


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="action"):
        NonFinite(action="explode")
    with pytest.raises(ValueError, match="collapse_after"):
        NonFinite(collapse_after=0)
