"""Forward topics captured as finiteness checks (``Subscriber.finiteness_only``): the hooks
reduce each payload to a 0-d value, non-finite iff the tensor has a NaN or inf entry (its
L2 norm on the CPU), and keep no tensor; each value is checked against the norm of a copy
an independent hook took of the module's own tensor."""

from __future__ import annotations

import math
import weakref
from typing import Any

import pytest
import torch
from torch import nn

import ikkuna_core as ik

TOPICS = ["activations", "inputs", "layer_gradients"]


@pytest.fixture
def finite_cls(recorder_cls: Any) -> Any:
    """The tests' recorder (tests/conftest.py) asking for finiteness checks only."""

    class Finite(recorder_cls):  # type: ignore[misc,valid-type]
        name = "finite"

        def finiteness_only(self, topic: str) -> bool:
            return True

    return Finite


@pytest.fixture
def read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``read[0]``: the bytes the finiteness checks have read (the tensors given to
    ``ops.finiteness``), counted from now on; a test sets it back to 0 at will."""
    from ikkuna_core import ops

    count = [0]
    finiteness = ops.finiteness

    def counted(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        count[0] += sum(t.numel() * t.element_size() for t in tensors)
        return finiteness(tensors)

    monkeypatch.setattr(ops, "finiteness", counted)
    return count


class _Seen(ik.Subscriber):
    """Records every step's finiteness values: ``seen[step][topic][key]``."""

    name = "finite"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.seen: dict[int, dict[str, dict[str, float]]] = {}

    def finiteness_only(self, topic: str) -> bool:
        return True

    def compute_step(self, step: ik.StepBundle) -> None:
        self.seen[step.global_step] = {
            t: {k: float(v) for k, v in zip(step[t].keys, step[t].data, strict=True)}
            for t in step.topics
        }


class _Gated(_Seen):
    """:class:`_Seen`, whose forward checks matter only at a non-finite loss."""

    name = "gated"
    finite_loss_clears_forward = True


def _model() -> nn.Sequential:
    """0 Linear -> 1 in-place ReLU (changes 0's output after its hook) -> 2 Linear."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(inplace=True), nn.Linear(32, 3))


class _Copies:
    """Copies of every module's output, input and output gradient, and of each bias
    gradient (topic ``bias_gradients``), by (topic, key, step), taken by hooks of the
    test's own (before the next module can change them)."""

    def __init__(self, model: nn.Module, step: list[int]) -> None:
        self.seen: dict[tuple[str, str, int], torch.Tensor] = {}
        self.step = step
        for name, module in model.named_children():
            module.register_forward_hook(self._hook(name))
            if getattr(module, "bias", None) is not None:
                module.bias.register_post_accumulate_grad_hook(self._bias_hook(name))

    def _bias_hook(self, name: str) -> Any:
        def hook(bias: torch.Tensor) -> None:
            assert bias.grad is not None
            self.seen[("bias_gradients", name, self.step[0])] = bias.grad.detach().clone()

        return hook

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            step = self.step[0]
            self.seen[("activations", name, step)] = output.detach().clone()
            self.seen[("inputs", name, step)] = args[0].detach().clone()

            def grad_hook(grad: torch.Tensor) -> None:
                self.seen[("layer_gradients", name, step)] = grad.detach().clone()

            output.register_hook(grad_hook)

        return hook


def _watched(model: nn.Module, sub: ik.Subscriber) -> tuple[
        ik.Exporter, _Copies, list[int], torch.optim.Optimizer]:
    """``model`` watched by ``sub`` (errors raised), the test's copies (by the step in the
    list it returns) and an SGD optimizer."""
    step = [0]
    exporter = ik.Exporter(model, bus=ik.MessageBus(on_error="raise"))
    copies = _Copies(model, step)  # after the Exporter's hooks: they run after its own
    exporter.subscribe(sub)
    return exporter, copies, step, torch.optim.SGD(model.parameters(), lr=0.01)


def _train(model: nn.Module, subscribers: list[ik.Subscriber], steps: int,
           data: list[torch.Tensor] | None = None) -> _Copies:
    step = [0]
    exporter = ik.Exporter(model, bus=ik.MessageBus(on_error="raise"))
    copies = _Copies(model, step)  # after the Exporter's hooks: they run after its own
    for sub in subscribers:
        exporter.subscribe(sub)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        step[0] = i
        x = data[i] if data is not None else torch.randn(8, 6, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    exporter.close()
    return copies


def test_finiteness_payloads_are_the_norms_of_the_modules_own_tensors(finite_cls) -> None:
    rec = finite_cls(topics=TOPICS)
    # the model's output feeds no module: a hook of the test copies its value before the
    # in-place ReLU (module 1) changes module 0's output. The first step reduces each
    # tensor in its hook (learning what changes in place): the norm of that copy. From the
    # second on, module 0's output is checked as the ReLU left it (non-finite only where it
    # was: the ReLU's output), and a Linear's output gradient is told by its bias gradient
    # (their sum over the batch), the ReLU's by the bias gradient of the Linear before it
    copies = _train(_model(), [rec], 5)
    assert rec.seen
    told = {("layer_gradients", "0"): ("bias_gradients", "0"),
            ("layer_gradients", "1"): ("bias_gradients", "0"),
            ("layer_gradients", "2"): ("bias_gradients", "2"),
            ("activations", "0"): ("activations", "1")}
    for (topic, key, step), got in rec.seen.items():
        assert got is not None and got.dim() == 0 and got.dtype == torch.float32
        assert key is not None
        source = told.get((topic, key), (topic, key)) if step > 0 else (topic, key)
        want = torch.linalg.vector_norm(copies.seen[(*source, step)].double())
        assert float(got) == pytest.approx(float(want), rel=1e-5), (topic, key, step)
    # every step (the first, which learns what changes in place, too), every module
    assert {(t, s) for t, _, s in rec.seen} == {(t, s) for t in TOPICS for s in range(5)}
    assert {k for _, k, _ in rec.seen} == {"0", "1", "2"}


def test_a_non_finite_entry_gives_a_non_finite_value_and_a_large_one_does_not(
    finite_cls,
) -> None:
    rec = finite_cls(topics=["activations"])
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(8, 6, generator=g) for _ in range(4)]
    data[2] = data[2] * 1e15  # large, finite (its squares in float32 too)
    data[3][3, 1] = math.nan  # the last step: the weights after it are not looked at
    _train(_model(), [rec], 4, data)
    assert all(math.isfinite(float(rec.seen[("activations", k, s)]))
               for k in "012" for s in (0, 1, 2))
    assert all(math.isnan(float(rec.seen[("activations", k, 3)])) for k in "012")


def test_a_subscriber_that_wants_whole_tensors_gets_them_and_the_other_one_too(
    recorder_cls, finite_cls,
) -> None:
    finite, whole = finite_cls(topics=["activations"]), recorder_cls(topics=["activations"])
    copies = _train(_model(), [finite, whole], 3)
    for rec in (finite, whole):
        for (topic, key, step), got in rec.seen.items():
            assert got is not None and key is not None
            assert torch.equal(got, copies.seen[(topic, key, step)])


def test_no_tensor_of_the_step_is_held_once_its_backward_ended() -> None:
    """The hooks hold a payload only until the step's next batched reduction: when the
    backward has ended, none of the step's activations, inputs or layer gradients is alive
    (each is a weak reference of the test's own), although the step ends only at
    ``optimizer.step()``; with whole tensors they are all held until then."""

    class Finite(ik.Subscriber):
        name = "finite"

        def finiteness_only(self, topic: str) -> bool:
            return True

        def compute_step(self, step: ik.StepBundle) -> None:
            pass

    class Whole(Finite):  # the same, asking for whole tensors
        def finiteness_only(self, topic: str) -> bool:
            return False

    def alive_bytes(finiteness: bool) -> int:
        model = _model()
        refs: list[weakref.ref[torch.Tensor]] = []

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if module is not model[-1]:  # the model's output is the user's
                refs.append(weakref.ref(output))
            output.register_hook(lambda grad: refs.append(weakref.ref(grad)))

        exporter = ik.Exporter(model, bus=ik.MessageBus(on_error="raise"))
        for module in model:
            module.register_forward_hook(hook)
        exporter.subscribe((Finite if finiteness else Whole)(topics=TOPICS))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        held = []
        for _ in range(4):
            refs.clear()
            opt.zero_grad()
            loss = model(torch.randn(64, 6)).square().mean()
            loss.backward()
            del loss
            held.append(sum(t.numel() * t.element_size() for r in refs
                            if (t := r()) is not None))
            opt.step()
        exporter.close()
        return max(held)

    assert alive_bytes(finiteness=False) > 64 * 32 * 4  # the check can fail
    assert alive_bytes(finiteness=True) == 0


def test_a_tensor_is_reduced_once_in_a_step_whatever_topics_and_modules_it_is(
    monkeypatch: pytest.MonkeyPatch, read: list[int],
) -> None:
    """A module's input is the previous module's output: with a reduction after every
    payload (the budget at one byte), each tensor is still read once per step — the bytes
    the finiteness checks read equal those of the step's distinct tensors, counted by the
    test's own hooks (the model's input, each module's output, each output gradient)."""
    from ikkuna_core._exporter import capture

    monkeypatch.setattr(capture, "_MIN_UNREDUCED_BYTES", 1)
    monkeypatch.setattr(capture, "_REDUCTION_SHARE", 10**9)

    class Finite(ik.Subscriber):
        name = "finite"

        def finiteness_only(self, topic: str) -> bool:
            return True

        def compute_step(self, step: ik.StepBundle) -> None:
            self.keys = {t: len(step[t].keys) for t in step.topics}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh())
    distinct = [0]

    step = [0]

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        distinct[0] += output.numel() * output.element_size()
        # its gradient; a Linear's is told by its bias gradient (read instead), from the
        # second step on (the first reduces each tensor in its hook, learning)
        told = isinstance(module, nn.Linear) and step[0] > 0
        grad = module.bias if told else output
        distinct[0] += grad.numel() * grad.element_size()

    exporter = ik.Exporter(model, bus=ik.MessageBus(on_error="raise"))
    for module in model:
        module.register_forward_hook(hook)
    sub = Finite(topics=TOPICS)
    exporter.subscribe(sub)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for i in range(3):
        step[0] = i
        read[0] = distinct[0] = 0
        x = torch.randn(8, 6)
        distinct[0] += x.numel() * x.element_size()
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        assert read[0] == distinct[0]
    exporter.close()
    assert sub.keys == {t: 4 for t in TOPICS}  # every module's payload of each topic


def test_forward_checks_wait_for_a_cpu_loss_and_are_read_only_when_it_is_not_finite(
    read: list[int],
) -> None:
    """A subscriber whose forward checks matter only at a non-finite loss
    (``finite_loss_clears_forward``): at a step whose loss is finite nothing of the forward
    is read (the bytes the finiteness checks read are the layer gradients' alone, counted by
    the test's own hooks) and no forward payload is delivered; at the step whose loss is
    NaN every module's activation and input is, each non-finite iff the test's copy of it
    is. A subscriber without the flag gets its checks at every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
    grads = [0]

    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        # a Linear's output gradient is told by its bias gradient, read instead; so is the
        # Tanh's after it (its input gradient is part of that Linear's output gradient): the
        # same bias, read once
        if isinstance(module, nn.Tanh):
            return
        told = module.bias if isinstance(module, nn.Linear) else None
        output.register_hook(lambda g: grads.__setitem__(
            0, grads[0] + (g if told is None else told).numel() * 4))

    for module in model:
        module.register_forward_hook(hook)
    step = [0]
    copies = _Copies(model, step)
    exporter = ik.Exporter(model, nn.MSELoss(), bus=ik.MessageBus(on_error="raise"))
    gated = _Gated(topics=TOPICS)
    exporter.subscribe(gated)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    bad = 5  # the last step
    for i in range(6):
        step[0] = i
        x = torch.randn(8, 6, generator=g)
        if i == bad:
            x[2, 3] = float("nan")
        read[0] = grads[0] = 0
        opt.zero_grad()
        loss = exporter.loss_fn(model(x), torch.zeros(8, 3))
        loss.backward()
        opt.step()
        if 0 < i < bad:  # step 0 learns that the loss call comes before the backward
            assert read[0] == grads[0], i  # the backward's only
            assert set(gated.seen[i]) == {"layer_gradients"}, i
    exporter.close()
    forward = gated.seen[bad]
    assert set(forward) == set(TOPICS)
    for topic in ("activations", "inputs"):
        assert set(forward[topic]) == {"0", "1", "2"}
        for key, value in forward[topic].items():
            copy = copies.seen[(topic, key, bad)]
            assert math.isfinite(value) == bool(torch.isfinite(copy).all()), (topic, key)
    assert not math.isfinite(forward["activations"]["0"])

    # without the flag: the checks at every step, as before
    torch.manual_seed(0)
    plain_model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
    exporter = ik.Exporter(plain_model, nn.MSELoss(), bus=ik.MessageBus(on_error="raise"))
    plain = _Seen(topics=TOPICS)
    exporter.subscribe(plain)
    exporter.subscribe(_Gated(topics=TOPICS))  # one without the flag is enough
    opt = torch.optim.SGD(plain_model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        exporter.loss_fn(plain_model(torch.randn(8, 6)), torch.zeros(8, 3)).backward()
        opt.step()
    exporter.close()
    assert all(set(seen) == set(TOPICS) for seen in plain.seen.values())


def test_an_output_gradient_told_by_its_bias_is_read_where_that_bias_gradient_is_not(
    finite_cls,
) -> None:
    """A Linear's output gradient is told by its bias gradient while that is finite; at the
    step whose loss weights an inf and a -inf into one column of the last Linear's output
    gradient (its bias gradient: their sum, NaN), the output gradient is read itself: its
    value is its own norm, inf, not the bias gradient's NaN. Only exact types with a bias
    that requires grad are told that way."""
    from ikkuna_core._exporter.implied import summed_bias

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
    rec = finite_cls(topics=["layer_gradients"])
    exporter, copies, step, opt = _watched(model, rec)
    for i in range(4):
        step[0] = i
        weight = torch.ones(8, 3)
        if i == 3:
            weight[5, 1], weight[6, 1] = math.inf, -math.inf
        opt.zero_grad()
        (model(torch.randn(8, 6)) * weight).sum().backward()
        opt.step()
    exporter.close()
    assert float(rec.seen[("layer_gradients", "2", 3)]) == math.inf
    assert math.isnan(float(model[2].bias.grad[1]))
    for key in ("0", "1"):
        assert not math.isfinite(float(rec.seen[("layer_gradients", key, 3)])), key
        assert not bool(torch.isfinite(copies.seen[("layer_gradients", key, 3)]).all())
    for i in (1, 2):  # finite steps: a Linear's value is its bias gradient's norm
        for key in ("0", "2"):
            want = torch.linalg.vector_norm(copies.seen[("bias_gradients", key, i)])
            assert float(rec.seen[("layer_gradients", key, i)]) == pytest.approx(
                float(want), rel=1e-6)

    class MyLinear(nn.Linear):
        pass

    assert summed_bias(nn.Linear(2, 2)) is not None
    assert summed_bias(nn.BatchNorm2d(3)) is not None
    assert summed_bias(nn.Linear(2, 2, bias=False)) is None
    assert summed_bias(nn.Linear(2, 2).requires_grad_(False)) is None
    assert summed_bias(MyLinear(2, 2)) is None  # a subclass may compute otherwise
    assert summed_bias(nn.Tanh()) is None


def test_a_convolution_without_bias_has_its_output_gradient_told_by_its_weight_gradient(
    finite_cls,
) -> None:
    """A bias-free convolution (as before a BatchNorm) whose weight gradient is at most half
    the size of its output gradient: while that weight gradient is finite its value tells
    the output gradient's (its norm is published for it); at the step whose loss puts an
    inf into one output-gradient entry (an inf times the inputs, NaN or inf, in every entry
    of the weight gradient it meets), the output gradient itself is read: inf. A weight
    larger than that and a transposed convolution are not used."""
    from ikkuna_core._exporter.implied import TellingGradients, telling_weight

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False))
    weights: dict[int, torch.Tensor] = {}
    step = [0]
    model[0].weight.register_post_accumulate_grad_hook(
        lambda w: weights.__setitem__(step[0], w.grad.detach().clone()))
    rec = finite_cls(topics=["layer_gradients"])
    exporter = ik.Exporter(model, bus=ik.MessageBus(on_error="raise"))
    exporter.subscribe(rec)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for i in range(4):
        step[0] = i
        scale = torch.ones(2, 4, 8, 8)
        if i == 3:
            scale[1, 2, 5, 5] = math.inf
        opt.zero_grad()
        (model(torch.randn(2, 3, 8, 8)) * scale).sum().backward()
        opt.step()
    exporter.close()
    assert 2 * model[0].weight.numel() <= 2 * 4 * 8 * 8
    assert not bool(torch.isfinite(weights[3]).all())
    assert float(rec.seen[("layer_gradients", "0", 3)]) == math.inf
    for i in (1, 2):  # finite steps: the weight gradient's norm stands for the output's
        assert float(rec.seen[("layer_gradients", "0", i)]) == pytest.approx(
            float(torch.linalg.vector_norm(weights[i])), rel=1e-6)
    tellers = TellingGradients([nn.Conv2d(64, 64, 3, bias=False)], lambda i: None)
    assert tellers.of(0, 64 * 64 * 9) is None  # its weight would be read as much
    assert telling_weight(nn.ConvTranspose2d(3, 4, 2, stride=3, bias=False)) is None
    assert telling_weight(nn.Linear(4, 4, bias=False)) is not None


def test_output_gradients_waiting_for_a_late_telling_gradient_are_bounded(finite_cls) -> None:
    """A Linear called 40 times in a step (an RNN's cell; a tied weight is alike): its bias
    gradient is accumulated once, at the end of the backward. The output gradients told by
    it are held until then, but no more of them than the bytes that make a reduction due
    (1 MiB here): the others are read themselves, in the batched reductions. Before, all 40
    (2.5 MiB) stayed alive to the end of the backward."""
    torch.manual_seed(0)
    cell = nn.Linear(64, 64)
    grads: list[weakref.ref[torch.Tensor]] = []
    alive: list[int] = []
    cell.bias.register_post_accumulate_grad_hook(
        lambda b: alive.append(sum(r() is not None for r in grads)))

    def keep(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        out.register_hook(lambda g: grads.append(weakref.ref(g)))

    cell.register_forward_hook(keep)

    class Unrolled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cell = cell

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            for _ in range(40):
                h = torch.tanh(self.cell(h))
            return h

    model = Unrolled()
    rec = finite_cls(topics=["layer_gradients"])
    exporter = ik.Exporter(model, bus=ik.MessageBus(on_error="raise"))
    exporter.subscribe(rec)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):  # the first step learns how each payload is captured
        grads.clear()
        opt.zero_grad()
        model(torch.randn(256, 64)).sum().backward()
        opt.step()
    exporter.close()
    assert len(grads) == 40
    # at most 1 MiB (16 of 64 KiB) waiting for the bias, and at most 1 MiB for the next
    # batched reduction: the rest already read
    assert all(n <= 2 * 16 for n in alive[1:]), alive
    assert all(math.isfinite(float(v)) for (topic, _, _), v in rec.seen.items()
               if topic == "layer_gradients")


def test_an_in_place_relu_after_a_batchnorm_leaves_both_unread_at_a_finite_step(
    read: list[int],
) -> None:
    """Conv (no bias) -> BatchNorm -> in-place ReLU -> Flatten -> Linear, checked for
    finiteness by a subscriber whose forward checks matter only at a non-finite loss. At a
    finite step the checks read only the telling parameter gradients (the convolution's
    weight, the BatchNorm's bias, which the ReLU and the Flatten after it borrow, the
    Linear's bias): not the BatchNorm's output, which the ReLU changes in place, nor the
    ReLU's and the Flatten's output gradients. At the step whose input holds a NaN, every
    module's activation is delivered non-finite, as the test's copies are."""

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8 * 8 * 8, 3))
    step = [0]
    copies = _Copies(model, step)
    exporter = ik.Exporter(model, nn.MSELoss(), bus=ik.MessageBus(on_error="raise"))
    gated = _Gated(topics=["activations", "layer_gradients"])
    exporter.subscribe(gated)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    tellers = (model[0].weight.numel() + model[1].bias.numel() + model[4].bias.numel()) * 4
    bad = 4
    for i in range(bad + 1):
        step[0] = i
        x = torch.randn(4, 3, 8, 8, generator=g)
        if i == bad:
            x[1, 2, 3, 4] = float("nan")
        read[0] = 0
        opt.zero_grad()
        exporter.loss_fn(model(x), torch.zeros(4, 3)).backward()
        opt.step()
        if 1 < i < bad:  # steps 0 and 1 learn (the loss call; what changes in place)
            assert read[0] == tellers, i
            assert set(gated.seen[i]) == {"layer_gradients"}, i
    exporter.close()
    forward = gated.seen[bad]["activations"]
    assert set(forward) == {"0", "1", "2", "3", "4"}
    for key, value in forward.items():
        assert not math.isfinite(value), key
        assert not bool(torch.isfinite(copies.seen[("activations", key, bad)]).all()), key


def test_an_activation_borrows_no_teller_from_an_output_changed_before_it(finite_cls) -> None:
    """Between a Linear and the ReLU that takes its output, the parent's forward changes
    that output in place (``mul_``): the ReLU's output gradient is then not told by the
    Linear's bias gradient but read itself (its value its own norm), while without the
    change it is told by it."""

    class Parent(nn.Module):
        def __init__(self, change: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin, self.act, self.out = nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3)
            self.change = change

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            if self.change:
                h.mul_(2.0)
            return self.out(self.act(h))

    for change in (True, False):
        model = Parent(change)
        rec = finite_cls(topics=["layer_gradients"])
        exporter, copies, step, opt = _watched(model, rec)
        g = torch.Generator().manual_seed(1)
        for i in range(3):
            step[0] = i
            opt.zero_grad()
            model(torch.randn(8, 6, generator=g)).square().mean().backward()
            opt.step()
        exporter.close()
        source = ("layer_gradients", "act") if change else ("bias_gradients", "lin")
        for i in (1, 2):
            want = torch.linalg.vector_norm(copies.seen[(*source, i)].double())
            got = float(rec.seen[("layer_gradients", "act", i)])
            assert got == pytest.approx(float(want), rel=1e-5), (change, i)


def _inf_at_step_3(model: nn.Module, finite_cls: Any) -> tuple[Any, _Copies]:
    """Four steps of ``model`` (6 inputs, 3 outputs) watched by a ``finite_cls`` recorder
    of the layer gradients; the loss of step 3 puts an inf into the output gradient."""
    rec = finite_cls(topics=["layer_gradients"])
    exporter, copies, step, opt = _watched(model, rec)
    g = torch.Generator().manual_seed(1)
    for i in range(4):
        step[0] = i
        weight = torch.ones(8, 3)
        if i == 3:
            weight[5, 1] = math.inf
        opt.zero_grad()
        (model(torch.randn(8, 6, generator=g)) * weight).sum().backward()
        opt.step()
    exporter.close()
    return rec, copies


@pytest.mark.parametrize("in_place", [False, True])
def test_an_activation_after_a_residual_sum_borrows_the_teller_of_its_term(
    finite_cls, in_place: bool,
) -> None:
    """``act(lin(x) + x)``: the sum's gradient is the gradient of its term ``lin(x)``, so
    the ReLU's output gradient is told by the Linear's bias gradient (its value that
    gradient's norm) at finite steps, the ReLU in place or not, and read itself where the
    term was changed in place before the sum. At the step whose loss puts an inf into the
    last Linear's output gradient, the ReLU's output gradient is non-finite, and so is its
    value."""

    class Residual(nn.Module):
        def __init__(self, change: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin, self.act = nn.Linear(6, 6), nn.ReLU(inplace=in_place)
            self.out = nn.Linear(6, 3)
            self.change = change

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            if self.change:
                h.mul_(2.0)
            return self.out(self.act(h + x))

    for change in (False, True):
        model = Residual(change)
        rec, copies = _inf_at_step_3(model, finite_cls)
        source = ("layer_gradients", "act") if change else ("bias_gradients", "lin")
        for i in (1, 2):
            want = torch.linalg.vector_norm(copies.seen[(*source, i)].double())
            got = float(rec.seen[("layer_gradients", "act", i)])
            assert got == pytest.approx(float(want), rel=1e-5), (change, i)
        if not change:  # told, not read: it differs from the ReLU's own
            own = torch.linalg.vector_norm(copies.seen[("layer_gradients", "act", 2)])
            assert float(rec.seen[("layer_gradients", "act", 2)]) != pytest.approx(float(own))
        assert not bool(torch.isfinite(copies.seen[("layer_gradients", "act", 3)]).all())
        assert not math.isfinite(float(rec.seen[("layer_gradients", "act", 3)])), change


def test_an_identity_shortcut_borrows_the_teller_of_the_output_it_passes_on(
    finite_cls,
) -> None:
    """A ResNet block's ``Identity`` shortcut returns the block's input, the output of a
    ReLU five watched modules before it, which borrows the Linear's bias before that: the
    shortcut's output gradient (the input's whole gradient) is told by that bias gradient
    at finite steps, and is non-finite where the test's copy of it is."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin0, self.act0 = nn.Linear(6, 6), nn.ReLU()
            self.a, self.b, self.c, self.d = (nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6),
                                              nn.Tanh())
            self.short, self.act, self.out = nn.Identity(), nn.ReLU(), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act0(self.lin0(x))
            return self.out(self.act(self.d(self.c(self.b(self.a(h)))) + self.short(h)))

    model = Block()
    rec, copies = _inf_at_step_3(model, finite_cls)
    for i in (1, 2):
        want = torch.linalg.vector_norm(copies.seen[("bias_gradients", "lin0", i)].double())
        own = torch.linalg.vector_norm(copies.seen[("layer_gradients", "short", i)])
        got = float(rec.seen[("layer_gradients", "short", i)])
        assert got == pytest.approx(float(want), rel=1e-5), i
        assert got != pytest.approx(float(own)), i
    assert not bool(torch.isfinite(copies.seen[("layer_gradients", "short", 3)]).all())
    assert not math.isfinite(float(rec.seen[("layer_gradients", "short", 3)]))


def test_a_shortcut_borrows_nothing_through_an_in_place_change_made_before_it(
    finite_cls,
) -> None:
    """``h = lin(x) + x; h.copy_(other(x))``, then an ``Identity`` takes ``h``: its output
    gradient flows to ``other`` only (``copy_`` hands the old value none), so it is not
    told by ``lin``'s bias gradient (zero) but read itself: its own norm at finite steps,
    non-finite at the step whose loss puts an inf into it."""

    class Copied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin, self.other = nn.Linear(6, 6), nn.Linear(6, 6)
            self.short, self.out = nn.Identity(), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x) + x
            h.copy_(self.other(x))
            return self.out(self.short(h))

    rec, copies = _inf_at_step_3(Copied(), finite_cls)
    assert float(copies.seen[("bias_gradients", "lin", 2)].abs().sum()) == 0.0
    for i in (1, 2):
        own = torch.linalg.vector_norm(copies.seen[("layer_gradients", "short", i)].double())
        got = float(rec.seen[("layer_gradients", "short", i)])
        assert got == pytest.approx(float(own), rel=1e-5), i
    assert not math.isfinite(float(rec.seen[("layer_gradients", "short", 3)]))
