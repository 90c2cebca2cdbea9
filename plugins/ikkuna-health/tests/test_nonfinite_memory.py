"""``nonfinite`` is cheap enough to leave on: it holds none of a step's activations, inputs or
layer gradients (the Exporter reduces each to a 0-d finiteness check in its hooks), so the
backward frees them as it goes, as in plain training; and at a step's end what it keeps is a
few values per watched module, not per element."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import torch
from health_helpers import batches, caught, train
from torch import nn

import ikkuna_core as ik
from ikkuna_health import NonFinite


class _Net(nn.Module):
    """Conv -> BatchNorm -> in-place ReLU (changes the BatchNorm's output after its hook) ->
    Conv -> ReLU -> Linear, on 6 inputs reshaped to a 1 x 6 x 1 image."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv1d(1, 64, 3, padding=1)
        self.bn = nn.BatchNorm1d(64)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv1d(64, 64, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(64 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu(self.bn(self.conv1(x.unsqueeze(1))))))
        return self.fc(x.flatten(1))


def _tensor_bytes(root: object) -> int:
    """Bytes of the tensors reachable from ``root``'s own state (not through the model, the
    Exporter or the bus it is attached to)."""
    seen: set[int] = set()
    total = 0
    todo: list[Any] = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (nn.Module, ik.Exporter, ik.MessageBus, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
            continue
        todo.extend(gc.get_referents(obj))
    return total


def test_no_payload_is_held_after_the_backward_and_a_few_bytes_per_module_at_the_end() -> None:
    model = _Net()
    alive: list[weakref.ref[torch.Tensor]] = []

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if module is not model.fc:  # the model's output, the loss's input: the user's
            alive.append(weakref.ref(output))
        output.register_hook(lambda grad: alive.append(weakref.ref(grad)))

    for module in model.children():
        module.register_forward_hook(hook)
    sub = NonFinite()
    after_backward: list[int] = []
    at_end: list[int] = []

    def before_step(step: int) -> None:  # the backward has ended, the step has not
        gc.collect()
        after_backward.append(sum(t.numel() * t.element_size() for r in alive
                                  if (t := r()) is not None))
        alive.clear()
        if step:
            at_end.append(_tensor_bytes(sub))  # the previous step's end

    data = [(x.repeat(16, 1), y.repeat(16)) for x, y in batches(6)]  # batch 128
    with caught():
        exporter, _ = train(model, [sub], 6, data=data, before_step=before_step)
    watched = len(exporter.modules)
    # what plain training would free is freed: one 128 x 64 x 6 activation is 196,608 bytes
    assert after_backward == [0] * 6
    # at a step's end: the previous step's per-payload values (one float each, for the
    # parameters' update check), not the payloads
    assert at_end and max(at_end) <= 64 * watched * len(sub.options.topics)
    assert sub.findings == []  # nothing non-finite: the check saw finite values
