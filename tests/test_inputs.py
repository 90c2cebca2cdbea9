"""The ``inputs`` topic: each watched module's input (first tensor argument), read in the same
forward hook as ``activations``. Values are checked against an independent forward hook of
the test's own; the topic costs no extra hook and, unsubscribed, no aten operator."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import ikkuna_core as ik


class Twice(nn.Module):
    """Calls its Linear twice in one forward (keys ``lin`` and ``lin#1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.relu = nn.ReLU(inplace=True)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.relu(self.lin(self.lin(x))))


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )


def _record_inputs(model: nn.Module) -> tuple[dict[str, list[torch.Tensor]], list]:
    """An independent forward hook on every leaf: a clone of ``args[0]`` per call, taken when
    the hook runs (so after an in-place module changed it, as the Exporter's own hook)."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if next(module.children(), None) is None:
            handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: seen.setdefault(name, []).append(a[0].detach().clone())
            ))
    return seen, handles


def test_inputs_equal_the_module_inputs_at_every_step(recorder_cls):
    model = small_cnn()
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    rec = recorder_cls(topics=["inputs", "activations"])
    exporter.bus.register_subscriber(rec)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    names = [str(i) for i in range(len(model))]
    for step in range(3):
        x, y = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
        seen, handles = _record_inputs(model)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        for h in handles:
            h.remove()
        assert torch.equal(rec.seen[("inputs", "0", step)], x)
        for name in names:
            assert torch.equal(rec.seen[("inputs", name, step)], seen[name][0]), (name, step)
        # a module's input is its predecessor's output; the in-place ReLU's input, read
        # after its forward as every forward hook reads it, is its output
        for before, after in (("0", "1"), ("2", "3"), ("3", "4"), ("4", "5")):
            assert torch.equal(rec.seen[("inputs", after, step)],
                               rec.seen[("activations", before, step)])
        assert torch.equal(rec.seen[("inputs", "2", step)], rec.seen[("activations", "2", step)])
    exporter.close()


def test_a_module_called_twice_has_one_input_per_call(recorder_cls):
    torch.manual_seed(0)
    model = Twice()
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    rec = recorder_cls(topics=["inputs"])
    exporter.bus.register_subscriber(rec)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 5)
    seen, handles = _record_inputs(model)
    model(x).sum().backward()
    opt.step()
    exporter.close()
    for h in handles:
        h.remove()
    assert torch.equal(rec.seen[("inputs", "lin", 0)], x)
    assert torch.equal(rec.seen[("inputs", "lin#1", 0)], seen["lin"][1])
    assert torch.equal(rec.seen[("inputs", "out", 0)], seen["out"][0])
    assert {k for _, k, _ in rec.order} == {"lin", "lin#1", "relu", "out"}


class Sampled(ik.Subscriber):
    name = "sampled"
    default_topics = ("inputs",)

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.sizes: dict[str, int] = {}

    def sample_size(self, topic: str) -> int | None:
        return 7

    def compute(self, bundle: ik.MessageBundle) -> None:
        self.sizes[bundle.key or ""] = bundle["inputs"].numel()


def test_inputs_follow_the_sampling_and_subsample_rules(recorder_cls):
    model = small_cnn()
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    sampled = Sampled()
    exporter.bus.register_subscriber(sampled)
    rec = recorder_cls(topics=["inputs"], subsample=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(6, 1, 8, 8)
    model(x).sum().backward()
    opt.step()
    assert sampled.sizes == {str(i): 7 for i in range(len(model))}  # a 7-entry sample each
    exporter.bus.register_subscriber(rec)
    for _ in range(4):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    assert sorted({s for _, _, s in rec.order}) == [2, 4]  # steps 1..4, every second
    assert rec.seen[("inputs", "0", 2)].shape == x.shape  # whole for the one who wants it
    exporter.close()


class Nothing(ik.Subscriber):
    """Subscribes and computes nothing: what the capture itself costs."""

    name = "nothing"

    def compute_step(self, step: ik.StepBundle) -> None:
        pass


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _step_ops(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> int:
    with _Ops() as ops:
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    return ops.count


def test_inputs_cost_no_hook_and_unsubscribed_no_operator():
    torch.manual_seed(0)  # nothing in place here: every capture a reference after the probe
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(6, 1, 8, 8)
    for _ in range(2):
        _step_ops(model, opt, x)
    plain = _step_ops(model, opt, x)
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    base = exporter.hook_count
    acts = Nothing(topics=["activations"])
    exporter.bus.register_subscriber(acts)
    with_acts = exporter.hook_count
    assert with_acts == base + len(model)
    for _ in range(2):  # the first capture probes (copies); then references only
        _step_ops(model, opt, x)
    assert _step_ops(model, opt, x) == plain  # activations referenced, inputs not read
    inputs = Nothing(topics=["inputs"])
    exporter.bus.register_subscriber(inputs)
    assert exporter.hook_count == with_acts  # the same forward hook reads both
    exporter.bus.unregister_subscriber(acts)
    assert exporter.hook_count == with_acts
    for _ in range(2):
        _step_ops(model, opt, x)
    assert _step_ops(model, opt, x) == plain  # inputs kept by reference: no operator
    exporter.bus.unregister_subscriber(inputs)
    assert exporter.hook_count == base
    exporter.close()
