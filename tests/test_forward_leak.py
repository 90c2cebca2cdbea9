"""A step's forward tensors are freed once the step has ended, also when the hooks for
layer_gradients sit on tensors the stash holds (activations, inputs): a reference cycle
through a tensor's hook is never collected, and leaked a step's activations every step."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import ikkuna_core as ik


class Nothing(ik.Subscriber):
    name = "nothing"

    def compute_step(self, step: ik.StepBundle) -> None:
        pass


@pytest.mark.parametrize("topics", [["activations", "layer_gradients"],
                                    ["inputs", "layer_gradients"]])
def test_forward_tensors_of_ended_steps_are_freed(topics: list[str]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    exporter.bus.register_subscriber(Nothing(topics=topics))
    outputs: list[weakref.ref[torch.Tensor]] = []
    model[0].register_forward_hook(lambda m, a, o: outputs.append(weakref.ref(o)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    gc.collect()
    assert [r() is None for r in outputs] == [True] * 4  # every step's first-layer output
    exporter.close()
