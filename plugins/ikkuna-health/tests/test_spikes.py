"""``spikes`` on planted spikes that leave training itself unchanged: one module's update
(taken back after the step), another module's gradient (its update kept the same), then the
watched loss (its backward the same); the reports name the module that spiked first."""

from __future__ import annotations

import torch
from health_helpers import batches, caught, health_warnings
from torch import nn

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend
from ikkuna_health import Spikes

UPDATE_AT, GRAD_AT, LOSS_AT, STEPS = 30, 40, 45, 60


def _run(sub: Spikes) -> tuple[MemoryBackend, list[str]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 3))
    exporter = ik.Exporter()
    exporter.set_model(model)
    loss_fn = exporter.set_loss(
        lambda out, y, spike=1.0: nn.functional.cross_entropy(out, y) * spike
    )
    exporter.bus.register_subscriber(sub)
    memory = MemoryBackend()
    exporter.bus.add_backend(memory)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = batches(4)
    kick = torch.full_like(model[4].weight, 0.5)

    def update_spike(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        if exporter.global_step == UPDATE_AT:  # inside optimizer.step(): part of its update
            with torch.no_grad():
                model[4].weight.add_(kick)

    opt.register_step_post_hook(update_spike)
    with caught() as found:
        for i in range(STEPS):
            x, y = data[i % 4]
            opt.zero_grad()
            loss = loss_fn(model(x), y, spike=1000.0 if i == LOSS_AT else 1.0)
            (loss / 1000.0 if i == LOSS_AT else loss).backward()  # the watched loss spikes
            if i == GRAD_AT:  # one module's gradient spikes (its update does not: lr / 1000)
                model[2].weight.grad.mul_(1000.0)
            for group in opt.param_groups:
                group["lr"] = 1e-5 if i == GRAD_AT else 0.01
            opt.step()
            if i == UPDATE_AT:  # taken back: training goes on as without the spike
                with torch.no_grad():
                    model[4].weight.sub_(kick)
        exporter.close()
    return memory, health_warnings(found)


def test_a_planted_gradient_spike_then_a_loss_spike() -> None:
    sub = Spikes()
    memory, messages = _run(sub)
    steps = sorted({s for s, *_ in sub.spikes})
    assert steps == [UPDATE_AT, GRAD_AT, LOSS_AT], sub.spikes
    at_update = {(t, k) for s, t, k, _ in sub.spikes if s == UPDATE_AT}
    assert at_update == {("weight_updates", "4")}
    at_grad = {(t, k) for s, t, k, _ in sub.spikes if s == GRAD_AT}
    assert at_grad == {("weight_gradients", "2")}
    at_loss = {(t, k) for s, t, k, _ in sub.spikes if s == LOSS_AT}
    assert at_loss == {("loss", None)}
    update, grad, loss = messages
    assert f"step {UPDATE_AT}: spike of '4' (topic 'weight_updates')" in update
    assert f"step {GRAD_AT}: spike of '2' (topic 'weight_gradients')" in grad
    assert f"step {LOSS_AT}: spike of the loss" in loss
    # the later spikes name the module whose update spiked first
    first = f"first to spike in this episode: '4' (topic 'weight_updates') at step {UPDATE_AT}"
    assert all(first in m for m in messages)
    z = memory.scalar("spikes/weight_gradients/2", GRAD_AT)
    assert z >= sub.options.threshold
    assert {r.step for r in memory.scalars if r.tag.startswith("spikes")} == {
        UPDATE_AT, GRAD_AT, LOSS_AT
    }


def test_warmup_and_threshold_options() -> None:
    late = Spikes(warmup=50)  # both spikes fall into the warm-up
    _, messages = _run(late)
    assert late.spikes == [] and messages == []
    high = Spikes(threshold=1e4)
    _run(high)
    assert high.spikes == []


def test_bad_options_are_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="threshold"):
        Spikes(threshold=0)
    with pytest.raises(ValueError, match="smoothing"):
        Spikes(smoothing=1.0)
