"""The Exporter on real models: published values equal independent references, training is
unchanged in numbers, eval/silent forwards publish nothing, and only used topics cost."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ikkuna_core as ik

ALL_TOPICS = list(ik.MODULE_TOPICS + ik.NETWORK_TOPICS)


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


def data(n: int = 6, shape: tuple[int, ...] = (1, 8, 8), classes: int = 10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def watched(model: nn.Module, topics: list[str], recorder_cls, **kw):
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"), **kw)
    exporter.set_model(model)
    rec = recorder_cls(topics=topics)
    exporter.bus.register_subscriber(rec)
    return exporter, rec


def test_parameter_topics_equal_grads_and_updates(recorder_cls):
    model = small_cnn()
    exporter, rec = watched(
        model,
        ["weights", "biases", "weight_gradients", "bias_gradients", "weight_updates",
         "bias_updates"],
        recorder_cls,
    )
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = data()
    conv, lin = model[0], model[5]
    for step in range(3):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        grads = {n: m.weight.grad.clone() for n, m in (("0", conv), ("5", lin))}
        bias_grads = {n: m.bias.grad.clone() for n, m in (("0", conv), ("5", lin))}
        before = {n: m.weight.detach().clone() for n, m in (("0", conv), ("5", lin))}
        biased = {n: model.get_submodule(n) for n in ("0", "1", "5")}  # conv, batch norm, linear
        bias_before = {n: m.bias.detach().clone() for n, m in biased.items()}
        opt.step()
        for name, module in (("0", conv), ("5", lin)):
            assert torch.equal(rec.seen[("weight_gradients", name, step)], grads[name])
            assert torch.equal(rec.seen[("bias_gradients", name, step)], bias_grads[name])
            torch.testing.assert_close(
                rec.seen[("weight_updates", name, step)], module.weight.detach() - before[name]
            )
            assert torch.equal(rec.seen[("weights", name, step)], module.weight.detach())
        assert torch.equal(rec.seen[("biases", "1", step)], model[1].bias.detach())
        # bias_updates: after minus before of each bias. (The conv bias hardly moves: the
        # batch norm after it cancels its gradient; the two others do, so a wrong sign shows.)
        for name, module in biased.items():
            update = module.bias.detach() - bias_before[name]
            if name != "0":
                assert update.abs().max() > 1e-4, name
            torch.testing.assert_close(rec.seen[("bias_updates", name, step)], update)
    exporter.close()


def test_activations_and_layer_gradients_with_inplace_relu(recorder_cls):
    """layer_gradients is the gradient of the loss w.r.t. the module output, also when an
    in-place ReLU overwrites that output later; reference from an out-of-place copy."""
    model = small_cnn()
    reference = copy.deepcopy(model)
    reference[2].inplace = False
    exporter, rec = watched(model, ["activations", "layer_gradients"], recorder_cls)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    x, y = data()
    loss_fn(model(x), y).backward()
    exporter.close()  # no optimizer: the step ends here

    outputs: dict[str, torch.Tensor] = {}
    for name, module in reference.named_children():
        module.register_forward_hook(lambda m, a, o, name=name: outputs.__setitem__(name, o))
    loss = nn.CrossEntropyLoss()(reference(x), y)
    names = list(outputs)
    grads = torch.autograd.grad(loss, [outputs[n] for n in names])
    for name, grad in zip(names, grads, strict=True):
        torch.testing.assert_close(rec.seen[("activations", name, 0)], outputs[name].detach())
        torch.testing.assert_close(rec.seen[("layer_gradients", name, 0)], grad)


def test_network_topics_and_step_counting(recorder_cls):
    model = small_cnn()
    exporter, rec = watched(model, ik.NETWORK_TOPICS, recorder_cls)
    loss_fn = exporter.set_loss(nn.functional.cross_entropy)  # a plain function is wrapped
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = data()
    for _epoch in range(2):
        for _ in range(3):
            opt.zero_grad()
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            opt.step()
        exporter.epoch_finished()
    assert exporter.global_step == 5
    assert exporter.epoch == 2
    assert rec.topic_count("batch_started") == 6 == rec.topic_count("batch_finished")
    assert [k[2] for k in rec.order if k[0] == "epoch_started"] == [0, 3]
    assert [k[2] for k in rec.order if k[0] == "epoch_finished"] == [2, 5]
    assert torch.equal(rec.seen[("input_data", None, 4)], x)
    assert torch.equal(rec.seen[("input_labels", None, 4)], y)
    assert torch.equal(rec.seen[("network_output", None, 5)], out.detach())
    assert torch.equal(rec.seen[("loss", None, 5)], loss.detach())
    exporter.close()


def test_an_optimizer_of_other_tensors_neither_ends_nor_counts_steps(recorder_cls):
    """A step ends with the optimizer holding the model's parameters. A second optimizer
    over unrelated tensors (a temperature, another model trained beside it) steps before it,
    after it and between the steps: the step count and every published value are those of
    the model's own optimizer."""
    model = small_cnn()
    exporter, rec = watched(
        model, ["weight_gradients", "weight_updates", "weights", "loss", "batch_finished"],
        recorder_cls,
    )
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    temperature = nn.Parameter(torch.ones(()))
    side = nn.Linear(3, 1)  # trained beside the model, never watched
    other = torch.optim.SGD([temperature, *side.parameters()], lr=0.01)
    x, y = data()
    lin = model[5]
    steps = 3
    for step in range(steps):
        opt.zero_grad()
        other.zero_grad()
        loss = loss_fn(model(x) / temperature, y)
        loss.backward()
        other.step()  # before the model's optimizer
        grad = lin.weight.grad.clone()
        before = lin.weight.detach().clone()
        opt.step()
        for _ in range(2):  # after it, alone: no forward of the watched model
            other.zero_grad()
            side(torch.ones(2, 3)).sum().backward()
            other.step()
        assert exporter.global_step == step
        assert torch.equal(rec.seen[("weight_gradients", "5", step)], grad)
        torch.testing.assert_close(rec.seen[("weight_updates", "5", step)],
                                   lin.weight.detach() - before)
        assert torch.equal(rec.seen[("weights", "5", step)], lin.weight.detach())
        assert torch.equal(rec.seen[("loss", None, step)], loss.detach())
    exporter.close()
    assert exporter.global_step == steps - 1
    assert [k[2] for k in rec.order if k[0] == "batch_finished"] == list(range(steps))
    for topic in ("weights", "weight_gradients", "weight_updates"):  # once a step, the model's
        assert sorted(k[1:] for k in rec.order if k[0] == topic) == [
            (key, s) for key in ("0", "1", "5") for s in range(steps)
        ], topic


def test_bundles_carry_epoch_and_batch_index():
    model = small_cnn()
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    stamps = []

    class Stamps(ik.Subscriber):
        name = "stamps"

        def compute(self, bundle):
            stamps.append((bundle.global_step, bundle.epoch, bundle.batch_index))

    exporter.bus.register_subscriber(Stamps(topics=["loss"]))
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    x, y = data()
    for _ in range(2):
        for _ in range(2):
            loss_fn(model(x), y).backward()
        exporter.epoch_finished()
    assert stamps == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]


def test_eval_no_grad_and_silenced_forwards_publish_nothing(recorder_cls):
    model = small_cnn()
    exporter, rec = watched(model, ALL_TOPICS, recorder_cls)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    x, y = data()
    model.eval()
    loss_fn(model(x), y)
    model.train()
    with torch.no_grad():
        model(x)
    with exporter.silenced():
        loss_fn(model(x), y).backward()
    assert rec.order == []
    assert exporter.global_step == -1

    model.train()
    out = exporter.evaluate(x)  # eval mode, no grad, no messages, mode restored
    assert model.training and not out.requires_grad
    assert rec.order == []
    model.eval()
    exporter.evaluate(x)
    assert not model.training

    # a silent evaluation in the middle of a training step leaves the step intact
    model.train()
    out = model(x)
    exporter.evaluate(x)
    loss_fn(out, y).backward()
    exporter.close()  # ends the step
    assert rec.topic_count("loss") == 1 and rec.topic_count("activations") == len(model)


def test_publish_in_eval_when_asked(recorder_cls):
    model = small_cnn().eval()
    exporter, rec = watched(model, ["activations"], recorder_cls, publish_in_eval=True)
    with torch.no_grad():
        model(data()[0])
    exporter.close()
    assert rec.topic_count("activations") == len(model)


def test_pay_only_for_what_is_used(recorder_cls):
    model = small_cnn()
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    base = exporter.hook_count  # model pre-hook and the two optimizer-step hooks
    assert base == 3
    assert all(not m._forward_hooks for m in model.modules())
    x, _ = data()

    # Before any optimizer is seen, gradients are taken as they are accumulated (loops that
    # update the weights by hand): one hook per parameter.
    rec = recorder_cls(topics=["weight_gradients"])
    exporter.bus.register_subscriber(rec)
    n_weights = sum(1 for n, _ in model.named_parameters() if not n.endswith("bias"))
    assert exporter.hook_count == base + n_weights
    assert all(not m._forward_hooks for m in model.modules())

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).sum().backward()
    opt.step()
    # an optimizer holds the parameters: its pre-step hook reads them, no hook per parameter
    assert exporter.hook_count == base
    assert exporter.snapshots == []  # no update topic: parameters are never copied

    act = recorder_cls(topics=["activations"], subsample=2)
    exporter.bus.register_subscriber(act)
    assert exporter.hook_count == base + len(model)
    exporter.bus.unregister_subscriber(act)
    exporter.bus.unregister_subscriber(rec)
    assert exporter.hook_count == base
    exporter.close()
    assert exporter.hook_count == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_subsampled_steps_publish_and_copy_nothing(recorder_cls, monkeypatch):
    model = small_cnn()
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    rec = recorder_cls(topics=["weight_updates", "activations"], subsample=3)
    exporter.bus.register_subscriber(rec)
    delivered = []
    original = exporter.bus.deliver
    monkeypatch.setattr(
        exporter.bus, "deliver",
        lambda stamp, payloads: (delivered.append((stamp[0], sorted(payloads))),
                                 original(stamp, payloads))[1],
    )
    copies = []
    negated = torch._foreach_neg  # the snapshot: a negated copy of every weight

    def counted(tensors):
        copies.append(exporter.global_step)
        return negated(tensors)

    monkeypatch.setattr(torch, "_foreach_neg", counted)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, _ = data()
    for _ in range(7):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    assert [s for s, topics in delivered if topics] == [0, 3, 6]
    assert all(topics == ["activations", "weight_updates"] for s, topics in delivered if topics)
    assert copies == [0, 3, 6]
    assert {k[2] for k in rec.order} == {0, 3, 6}
    exporter.close()


def test_no_host_synchronisation_in_the_message_path(recorder_cls, monkeypatch):
    """Publishing never calls .item()/.cpu()/.tolist() (each would stall a GPU)."""
    model = small_cnn()
    exporter, rec = watched(model, ALL_TOPICS, recorder_cls)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()

    def forbidden(*a, **k):
        raise AssertionError("host synchronisation in the message path")

    for name in ("item", "cpu", "tolist", "numpy", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    monkeypatch.undo()
    # everything was published, once: every topic of every module at both steps
    forward = ("activations", "layer_gradients", "inputs")
    parameter_topics = [t for t in ik.MODULE_TOPICS if t not in forward]
    network = ["input_data", "input_labels", "network_output", "loss", "batch_started",
               "batch_finished"]
    expected = {("epoch_started", None, 0)}
    for step in range(2):
        expected |= {(t, k, step) for t in parameter_topics for k in ("0", "1", "5")}
        expected |= {(t, str(k), step) for t in forward for k in range(len(model))}
        expected |= {(t, None, step) for t in network}
    assert sorted(rec.order, key=str) == sorted(expected, key=str)
    exporter.close()


def test_close_restores_plain_model_and_loss(recorder_cls):
    model = small_cnn()
    exporter, rec = watched(model, ALL_TOPICS, recorder_cls)
    loss_module = nn.CrossEntropyLoss()
    with exporter:
        loss_fn = exporter.set_loss(loss_module)
        loss_fn(model(data()[0]), data()[1]).backward()
    n = len(rec.order)
    assert not loss_module._forward_hooks
    loss_module(model(data()[0]), data()[1]).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert len(rec.order) == n
    with pytest.raises(RuntimeError, match="closed"):
        exporter.set_loss(loss_module)


def test_module_selection_by_depth_and_class():
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), nn.Flatten(), nn.Linear(2, 2)
    )
    names = lambda **kw: [n for n, _ in ik.select_modules(model, **kw)]  # noqa: E731
    assert names(depth=-1) == ["0.0", "0.1", "1", "2"]
    assert names(depth=1) == ["0", "1", "2"]
    assert names(depth=-1, include=(nn.Conv2d, nn.Linear)) == ["0.0", "2"]
    assert names(depth=1, include=(nn.Sequential,)) == ["model", "0"]
    with pytest.raises(ValueError, match="depth"):
        ik.Exporter(depth=0)
    exporter = ik.Exporter(include=(nn.LSTM,))
    with pytest.raises(ValueError, match="no module"):
        exporter.set_model(model)


def _train(model, make_loss, x, y, exporter=None, steps=2):
    loss_fn = make_loss()
    if exporter is not None:
        loss_fn = exporter.set_loss(loss_fn)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return model


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class TransformerClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def _tv(name: str):
    tv = pytest.importorskip("torchvision")
    return lambda: getattr(tv.models, name)(num_classes=5)


REAL_MODELS = {
    "resnet18": (_tv("resnet18"), (2, 3, 32, 32), 5),
    "densenet121": (_tv("densenet121"), (2, 3, 32, 32), 5),
    "mobilenet_v3_small": (_tv("mobilenet_v3_small"), (2, 3, 32, 32), 5),
    "lstm": (LSTMClassifier, (3, 5, 6), 3),
    "transformer": (TransformerClassifier, (3, 5, 8), 3),
}


@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_real_models_train_unchanged_and_publish_true_values(name, recorder_cls):
    make, shape, classes = REAL_MODELS[name]
    torch.manual_seed(0)
    plain = make()
    watched_model = copy.deepcopy(plain)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    y = torch.randint(0, classes, (shape[0],), generator=g)

    exporter, rec = watched(watched_model, ALL_TOPICS, recorder_cls)
    activations: dict[tuple[str, int], torch.Tensor] = {}
    for info, module in exporter.watched_modules:
        def capture(m, a, out, name=info.name):
            out = out[0] if isinstance(out, tuple) else out
            activations[(name, exporter.global_step)] = out.detach().clone()
        module.register_forward_hook(capture)
    torch.manual_seed(1)
    _train(plain, nn.CrossEntropyLoss, x, y)
    torch.manual_seed(1)
    _train(watched_model, nn.CrossEntropyLoss, x, y, exporter)
    for (pn, p), (_, q) in zip(plain.named_parameters(), watched_model.named_parameters(),
                               strict=True):
        assert torch.equal(p, q), f"{name}: parameter {pn} differs when watched"

    # every watched parameter's last published value is the parameter itself
    last = exporter.global_step
    assert last == 1
    checked = 0
    for info, module in exporter.watched_modules:
        for pname, p in module.named_parameters(recurse=False):
            topic = "biases" if "bias" in pname else "weights"
            key = info.name if pname in ("weight", "bias") else f"{info.name}.{pname}"
            assert torch.equal(rec.seen[(topic, key, last)], p.detach()), (name, key)
            grad_topic = "bias_gradients" if "bias" in pname else "weight_gradients"
            assert torch.equal(rec.seen[(grad_topic, key, last)], p.grad), (name, key)
            checked += 1
        ran = (info.name, last) in activations  # MultiheadAttention.out_proj is never called
        if ran and type(module).__name__ != "ReLU":
            # (ReLU modules are called twice per block in torchvision's ResNet)
            assert torch.equal(rec.seen[("activations", info.name, last)],
                               activations[(info.name, last)]), (name, info.name)
    assert checked > 0
    assert rec.topic_count("activations") > 0 and rec.topic_count("layer_gradients") > 0
    exporter.close()


def test_evaluate_restores_each_modules_mode():
    model = small_cnn()
    exporter = ik.Exporter()
    exporter.set_model(model)
    model[1].eval()  # a frozen BatchNorm inside a training model
    exporter.evaluate(data()[0])
    assert model.training and not model[1].training and model[0].training
    exporter.close()


def test_a_failing_subscriber_stops_training_with_its_own_error():
    """on_error="raise": the SubscriberError comes out of optimizer.step() as it is (naming
    subscriber, topic and step), not wrapped as an internal error of the Exporter."""

    class Broken(ik.Subscriber):
        name = "broken"

        def compute(self, bundle):
            raise ZeroDivisionError("division by zero")

    model = small_cnn()
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    exporter.bus.register_subscriber(Broken(topics=["weights"]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, _ = data()
    model(x).sum().backward()
    with pytest.raises(ik.SubscriberError) as err:
        opt.step()
    assert str(err.value) == (
        "subscriber 'broken' failed at step 0 on topic 'weights': ZeroDivisionError: "
        "division by zero"
    )
    exporter.close()


def test_a_sampled_activation_is_spread_over_the_whole_tensor(recorder_cls):
    """A subscriber that asks for a sample of a large activation gets entries from all of
    it, not its first ones (issue 16: a sample of the first k entries passed every test). The
    activation's values are their own positions in [0, 1), so the sample's values are where
    it was drawn: they must be uniform over [0, 1) (chi-square over 16 cells, and no cell
    far from its expected count)."""

    class Sampled(recorder_cls):
        name = "sampled"

        def sample_size(self, topic):
            return 4096 if topic == "activations" else None

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return x * self.w

    numel = 64 * 1024  # 16 x the sample
    positions = torch.arange(numel, dtype=torch.float32).reshape(64, 1024) / numel
    model = nn.Sequential(Scale())
    rec = Sampled(topics=["activations"])
    bus = ik.MessageBus(on_error="raise")
    exporter = ik.Exporter(bus=bus)
    exporter.set_model(model)
    bus.register_subscriber(rec)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    opt.zero_grad()
    model(positions).sum().backward()
    opt.step()
    exporter.close()
    got = rec.seen[("activations", "0", 0)]
    assert got.numel() == 4096
    counts = torch.histc(got, bins=16, min=0.0, max=1.0)
    expected = 4096 / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.7, counts.tolist()  # the 0.001 quantile of chi-square with 15 d.o.f.
    assert float(got.max()) > 0.99 and float(got.min()) < 0.01
