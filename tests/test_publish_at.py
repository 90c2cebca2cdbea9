"""A subscriber may publish a value under an earlier step it saw (a quantity known one step
late, as Cockpit's Alpha): the backends get it with that step's stamp."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend


class Late(ik.Subscriber):
    """Publishes at each step the sum of the previous step's and this step's losses, under
    the previous step."""

    name = "late"
    default_topics = ("loss",)
    output_kind = "network"

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.previous: tuple[ik.StepBundle, torch.Tensor] | None = None

    def compute_step(self, step: ik.StepBundle) -> None:
        loss = step["loss"].tensors()[0].detach().clone()
        if self.previous is not None:
            before, old = self.previous
            self.publish_scalars(step, (old + loss).reshape(1), keys=[None], at=before)
        self.previous = (step, loss)


class Mixed(Late):
    name = "mixed"

    def compute_step(self, step: ik.StepBundle) -> None:
        loss = step["loss"].tensors()[0].reshape(1)
        self.publish_scalars(step, loss, keys=[None])
        if self.previous is not None:
            self.publish_scalars(step, loss, keys=[None], at=self.previous[0])
        self.previous = (step, loss)


def test_values_published_under_an_earlier_step() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    loss_fn = exporter.set_loss(nn.MSELoss())
    exporter.bus.register_subscriber(Late())
    mem = exporter.bus.add_backend(MemoryBackend())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = loss_fn(model(torch.ones(2, 3)), torch.zeros(2, 1))
        losses.append(loss.item())
        loss.backward()
        opt.step()
    exporter.close()
    steps = [r.step for r in mem.scalars if r.tag == "late/loss"]
    assert steps == [0, 1, 2]  # step 3's value would come at step 4
    for s in steps:
        assert mem.scalar("late/loss", s) == pytest.approx(losses[s] + losses[s + 1])


def test_one_topic_cannot_mix_two_steps() -> None:
    model = nn.Linear(3, 1)
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    loss_fn = exporter.set_loss(nn.MSELoss())
    exporter.bus.register_subscriber(Mixed())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ik.SubscriberError, match="values of two steps"):
        for _ in range(2):
            opt.zero_grad()
            loss_fn(model(torch.ones(2, 3)), torch.zeros(2, 1)).backward()
            opt.step()
