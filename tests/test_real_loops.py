"""Ikkuna on real training loops (issue 9): every published value is compared with an
independent computation — the scaler-unscaled gradient, the gradient after
``clip_grad_norm_``, the parameter difference across ``optimizer.step()``, the full
accumulated gradient, a recomputed activation — on real models, pinned to the CPU.

Each test is one bullet of the issue: GradScaler, clipping, accumulation, tied weights, two
optimizers, a parameter unfrozen after ``watch()``, parameters of non-leaf modules (a ViT's
class token and position embedding), a module called twice, ``optimizer.step(closure)`` (SGD
and LBFGS), and the one-time warnings for setups that would otherwise publish nothing.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend

CPU = torch.device("cpu")
PARAM_TOPICS = [
    "weights", "biases", "weight_gradients", "bias_gradients", "weight_updates", "bias_updates",
]


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    ).to(CPU)


def _batch(seed: int, n: int = 8, features: int = 6, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, features, generator=g, device=CPU),
            torch.randint(0, classes, (n,), generator=g, device=CPU))


def _watch(model: nn.Module, topics: list[str], recorder_cls, **kw):
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"), **kw)
    exporter.set_model(model)
    rec = exporter.bus.register_subscriber(recorder_cls(topics=topics))
    return exporter, rec


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _param_key(name: str) -> tuple[str, str]:
    """(topic kind, key) of a parameter of an nn.Sequential of leaf modules: '2.weight' ->
    ('weight', '2')."""
    module, _, kind = name.rpartition(".")
    return kind, module


def _topic(kind: str, what: str) -> str:
    return {("weight", "gradients"): "weight_gradients", ("bias", "gradients"): "bias_gradients",
            ("weight", "updates"): "weight_updates", ("bias", "updates"): "bias_updates",
            ("weight", "values"): "weights", ("bias", "values"): "biases"}[(kind, what)]


# ---------------------------------------------------------------------------- GradScaler
def test_grad_scaler_publishes_the_unscaled_gradients_the_optimizer_applies(recorder_cls):
    """Under CPU autocast with a GradScaler (scale 1024) the published gradients equal the
    gradients of an unscaled copy of the model, and the update is -lr times them; a step the
    scaler skips (an inf gradient) is no step: its forward merges into the next one."""
    model = _mlp()
    reference = copy.deepcopy(model)
    exporter, rec = _watch(model, ["weight_gradients", "bias_gradients", "weight_updates",
                                   "bias_updates"],
                           recorder_cls)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    published_step = 0
    for i in range(4):
        x, y = _batch(i)
        reference.load_state_dict(model.state_dict())
        reference.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_out = reference(x)
        nn.functional.cross_entropy(ref_out.float(), y).backward()
        expected = _grads(reference)

        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        scaler.scale(loss_fn(out.float(), y)).backward()
        skip = i == 1
        if skip:  # an overflow: the scaler skips optimizer.step()
            model[0].weight.grad[0, 0] = math.inf
        before = _state(model)
        scaler.step(opt)
        scaler.update()
        if skip:
            assert torch.equal(model[0].weight, before["0.weight"])
            continue
        for name, p in model.named_parameters():
            kind, key = _param_key(name)
            grad = rec.seen[(_topic(kind, "gradients"), key, published_step)]
            torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7)
            update = rec.seen[(_topic(kind, "updates"), key, published_step)]
            torch.testing.assert_close(update, p.detach() - before[name])
            torch.testing.assert_close(update, -lr * grad, rtol=1e-4, atol=1e-7)
        published_step += 1
    assert exporter.global_step == published_step - 1 == 2  # 4 iterations, one skipped
    exporter.close()


class _SkippedRecorder(ik.Subscriber):
    """Keeps a copy of every payload, by (topic, key, step, skipped)."""

    name = "skipped_recorder"
    sees_skipped_steps = True

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.seen: dict[tuple[str, str | None, int, bool], torch.Tensor] = {}

    def compute_step(self, step: ik.StepBundle) -> None:
        for topic in step.topics:
            for key, data in zip(step[topic].keys, step[topic].data, strict=True):
                assert data is not None
                self.seen[(topic, key, step.global_step, step.skipped)] = data.detach().clone()


@pytest.mark.parametrize("how", ["grad_scaler", "user_skip", "user_resets_by_hand"])
def test_a_skipped_step_is_handed_to_subscribers_that_see_skipped_steps(how, recorder_cls):
    """A step whose optimizer step is skipped (GradScaler's overflow; user code that skips a
    bad gradient) keeps today's numbering for everyone, and a subscriber with
    ``sees_skipped_steps`` gets its payloads, marked ``skipped``: the gradients as the
    backward left them (unscaled, for the GradScaler) and that forward's loss."""
    model = _mlp()
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    topics = ["weight_gradients", "loss", "layer_gradients"]
    plain = exporter.bus.register_subscriber(recorder_cls(topics=topics))
    aware = exporter.bus.register_subscriber(_SkippedRecorder(topics=topics))
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    expected_grads = expected_loss = None
    for i in range(4):
        x, y = _batch(i)
        opt.zero_grad(set_to_none=how != "user_resets_by_hand")
        loss = loss_fn(model(x), y)
        skip = i == 1
        if how == "grad_scaler":
            scaler.scale(loss).backward()
            if skip:  # an overflow: the scaler skips optimizer.step()
                model[0].weight.grad[0, 0] = math.inf
                expected_grads = {n: p.grad.detach().clone() / 1024.0
                                  for n, p in model.named_parameters()}
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            if skip:
                expected_grads = _grads(model)
                expected_loss = loss.detach().clone()
                if how == "user_resets_by_hand":
                    model.zero_grad(set_to_none=True)  # reset by hand, no optimizer step
                continue
            opt.step()
    exporter.close()
    assert exporter.global_step == 2  # 4 iterations, one skipped: numbering unchanged
    assert expected_grads is not None
    for name, grad in expected_grads.items():
        kind, key = _param_key(name)
        if kind != "weight":
            continue
        got = aware.seen[("weight_gradients", key, 1, True)]
        torch.testing.assert_close(got, grad, rtol=1e-5, atol=1e-7)
        # the next attempt at step 1 is delivered as step 1 too, to everyone
        assert ("weight_gradients", key, 1, False) in aware.seen
        assert ("weight_gradients", key, 1) in plain.seen
    if expected_loss is not None:
        torch.testing.assert_close(aware.seen[("loss", None, 1, True)], expected_loss)
    assert {k[0] for k in aware.seen if k[3]} == set(topics)
    assert sum(1 for k in aware.seen if k[3] and k[0] == "loss") == 1


# ------------------------------------------------------------------------------ clipping
def test_gradient_clipping_publishes_the_clipped_gradients(recorder_cls):
    """Gradients are read when the optimizer consumes them: after ``clip_grad_norm_``. Their
    global norm is then ``max_norm`` (clip_grad_norm_ returned the larger, unclipped total)."""
    model = _mlp()
    exporter, rec = _watch(model, ["weight_gradients", "bias_gradients"], recorder_cls)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    max_norm = 0.05
    for step in range(3):
        x, y = _batch(step)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        total = nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        clipped = _grads(model)
        opt.step()
        assert total > 2 * max_norm  # clipping did something
        squares = 0.0
        for name in clipped:
            kind, key = _param_key(name)
            grad = rec.seen[(_topic(kind, "gradients"), key, step)]
            assert torch.equal(grad, clipped[name])
            squares += float(grad.double().pow(2).sum())
        assert math.sqrt(squares) == pytest.approx(max_norm, rel=1e-4)
    exporter.close()


# ------------------------------------------------------------------------- accumulation
def test_gradient_accumulation_is_one_step_with_the_full_gradient(recorder_cls):
    """Two forwards per optimizer.step(): one step, whose gradient is the full accumulated one
    (equal to the gradient of the whole batch), whose forward topics come from the first
    micro-batch, and with subsample=10 the update ratio is still published (steps 0, 10)."""
    from ikkuna_norms import Ratio

    model = _mlp()
    reference = copy.deepcopy(model)
    exporter, rec = _watch(
        model, ["weight_gradients", "weight_updates", "activations", "loss"], recorder_cls
    )
    exporter.bus.register_subscriber(Ratio(subsample=10))
    backend = exporter.bus.add_backend(MemoryBackend())
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ratios: dict[int, dict[str, float]] = {}
    for step in range(11):
        x, y = _batch(step, n=8)
        halves = [(x[:4], y[:4]), (x[4:], y[4:])]
        reference.load_state_dict(model.state_dict())
        reference.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        full = _grads(reference)
        with torch.no_grad():
            first_output = reference(halves[0][0])
            first_loss = nn.functional.cross_entropy(first_output, halves[0][1])

        opt.zero_grad()
        for xs, ys in halves:
            (loss_fn(model(xs), ys) / 2).backward()
        before = _state(model)
        opt.step()
        assert exporter.global_step == step  # one step per optimizer step
        for name in full:
            kind, key = _param_key(name)
            if kind != "weight":
                continue
            torch.testing.assert_close(rec.seen[("weight_gradients", key, step)], full[name])
            ratios.setdefault(step, {})[key] = float(
                (model.state_dict()[name] - before[name]).norm() / model.state_dict()[name].norm()
            )
        torch.testing.assert_close(rec.seen[("activations", "4", step)], first_output)
        torch.testing.assert_close(rec.seen[("loss", None, step)], first_loss)
    exporter.close()
    ratio_steps = {r.step for r in backend.scalars if r.topic == "ratio/weight_updates/weights"}
    assert ratio_steps == {0, 10}
    for step in (0, 10):
        for key, value in ratios[step].items():
            assert backend.scalar(f"ratio/weight_updates/weights/{key}", step) == pytest.approx(
                value, rel=1e-5
            )


# --------------------------------------------------------------------------- tied weights
class TinyGPT(nn.Module):
    """A GPT-2-like language model: token and position embeddings, one pre-norm causal
    transformer block, and an output layer whose weight IS the token embedding."""

    def __init__(self, vocab: int = 50, dim: int = 16, context: int = 8) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.block = nn.TransformerEncoderLayer(
            dim, 2, 32, dropout=0.0, batch_first=True, norm_first=True
        )
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        h = self.block(h, src_mask=mask, is_causal=True)
        return self.lm_head(self.ln_f(h))


def test_tied_weights_are_one_parameter_with_one_update(recorder_cls):
    """The embedding shared with the output layer is one tensor: published once (under its
    first owner, ``wte``), its update is after - before of that one tensor, and the update
    ratio is its true (small) value, not ~1."""
    from ikkuna_norms import Ratio

    torch.manual_seed(0)
    model = TinyGPT().to(CPU)
    exporter, rec = _watch(model, ["weights", "biases", "weight_gradients", "weight_updates"],
                           recorder_cls)
    exporter.bus.register_subscriber(Ratio())
    backend = exporter.bus.add_backend(MemoryBackend())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(3)
    tied = model.wte.weight
    n_params = len({id(p) for p in model.parameters()})
    for step in range(3):
        idx = torch.randint(0, 50, (4, 8), generator=g, device=CPU)
        opt.zero_grad()
        logits = model(idx[:, :-1])
        nn.functional.cross_entropy(logits.reshape(-1, 50), idx[:, 1:].reshape(-1)).backward()
        grad = tied.grad.clone()
        before = tied.detach().clone()
        opt.step()
        update = tied.detach() - before
        torch.testing.assert_close(rec.seen[("weight_updates", "wte", step)], update)
        assert torch.equal(rec.seen[("weights", "wte", step)], tied.detach())
        assert torch.equal(rec.seen[("weight_gradients", "wte", step)], grad)
        true_ratio = float(update.norm() / tied.detach().norm())
        published = backend.scalar("ratio/weight_updates/weights/wte", step) if step < 2 else None
        if published is not None:
            assert published == pytest.approx(true_ratio, rel=1e-5)
            assert published < 0.05
    exporter.bus.flush()
    assert backend.scalar("ratio/weight_updates/weights/wte", 2) == pytest.approx(
        true_ratio, rel=1e-5
    )
    keys = {key for topic, key, step in rec.seen if topic == "weights" and step == 0}
    assert not any(k.startswith("lm_head") for k in keys)
    # every parameter tensor published once: whole-network sums count the shared one once
    weights = [k for k in keys]
    biases = {key for topic, key, step in rec.seen if topic == "biases" and step == 0}
    assert len(weights) + len(biases) == n_params
    exporter.close()


# -------------------------------------------------------------------------- two optimizers
def test_two_optimizers_on_disjoint_groups(recorder_cls):
    """``o1.step(); o2.step()`` is one step. From the second step on, both groups publish
    their gradients, updates (after - before) and post-update weights. At step 0 the
    Exporter cannot know a second optimizer will follow: the step ends after the first, so
    the second group publishes no update at step 0 and its weights from before its own
    update (its gradients are right: read as they were accumulated)."""
    model = _mlp()
    exporter, rec = _watch(model, PARAM_TOPICS, recorder_cls)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    o1 = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    o2 = torch.optim.Adam([*model[2].parameters(), *model[4].parameters()], lr=1e-2)
    for step in range(3):
        x, y = _batch(step)
        o1.zero_grad()
        o2.zero_grad()
        loss_fn(model(x), y).backward()
        grads = _grads(model)
        before = _state(model)
        o1.step()
        between = _state(model)
        o2.step()
        assert exporter.global_step == step
        for name, p in model.named_parameters():
            kind, key = _param_key(name)
            second = key != "0"
            if step == 0 and second:
                # gradients are read when accumulated until an optimizer has been seen
                assert torch.equal(rec.seen[(_topic(kind, "gradients"), key, 0)], grads[name])
                assert (_topic(kind, "updates"), key, 0) not in rec.seen
                assert torch.equal(rec.seen[(_topic(kind, "values"), key, 0)], between[name])
                continue
            assert torch.equal(rec.seen[(_topic(kind, "gradients"), key, step)], grads[name])
            torch.testing.assert_close(rec.seen[(_topic(kind, "updates"), key, step)],
                                       p.detach() - before[name])
            assert torch.equal(rec.seen[(_topic(kind, "values"), key, step)], p.detach())
    exporter.close()


# ------------------------------------------------------------------ unfrozen after watch()
@pytest.mark.parametrize("how", ["in-optimizer", "add_param_group"])
def test_parameter_unfrozen_after_watch_publishes_gradients(how, recorder_cls):
    model = _mlp()
    model[0].requires_grad_(False)
    exporter, rec = _watch(model, ["weight_gradients", "weight_updates"], recorder_cls)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    params = model.parameters() if how == "in-optimizer" else model[2:].parameters()
    opt = torch.optim.SGD(params, lr=0.1)
    for step in range(4):
        if step == 2:
            model[0].requires_grad_(True)
            if how == "add_param_group":
                opt.add_param_group({"params": list(model[0].parameters())})
        x, y = _batch(step)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        grad = None if model[0].weight.grad is None else model[0].weight.grad.clone()
        before = model[0].weight.detach().clone()
        opt.step()
        if step < 2:
            assert ("weight_gradients", "0", step) not in rec.seen
            continue
        assert torch.equal(rec.seen[("weight_gradients", "0", step)], grad)
        torch.testing.assert_close(rec.seen[("weight_updates", "0", step)],
                                   model[0].weight.detach() - before)
    exporter.close()


# ----------------------------------------------------------------- non-leaf parameters (ViT)
def test_vit_class_token_and_position_embedding_are_published(recorder_cls):
    """torchvision's VisionTransformer keeps ``class_token`` on the model itself and
    ``pos_embedding`` on its (non-leaf) encoder: both published under their dotted names."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5,
    ).to(CPU)
    exporter, rec = _watch(model, ["weights", "weight_gradients", "weight_updates"],
                           recorder_cls)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    owned = {"class_token": model.class_token, "encoder.pos_embedding": model.encoder.pos_embedding}
    for step in range(2):
        x = torch.randn(2, 3, 16, 16, generator=g, device=CPU)
        y = torch.randint(0, 5, (2,), generator=g, device=CPU)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        grads = {k: p.grad.clone() for k, p in owned.items()}
        before = {k: p.detach().clone() for k, p in owned.items()}
        opt.step()
        for key, p in owned.items():
            assert torch.equal(rec.seen[("weight_gradients", key, step)], grads[key])
            torch.testing.assert_close(rec.seen[("weight_updates", key, step)],
                                       p.detach() - before[key])
            assert torch.equal(rec.seen[("weights", key, step)], p.detach())
    exporter.close()


# ------------------------------------------------------------------- a module called twice
class SharedActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


def test_a_module_called_twice_publishes_each_call_under_its_own_key(recorder_cls):
    torch.manual_seed(0)
    model = SharedActivation().to(CPU)
    exporter, rec = _watch(model, ["activations", "layer_gradients"], recorder_cls)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        x, y = _batch(step)
        # the reference: the same computation, written out, with autograd.grad for the
        # gradients of the loss w.r.t. each call's output
        h1 = torch.tanh(nn.functional.linear(x, model.fc1.weight, model.fc1.bias))
        h2 = torch.tanh(nn.functional.linear(h1, model.fc2.weight, model.fc2.bias))
        ref_loss = nn.functional.cross_entropy(model.head(h2), y)
        g1, g2 = torch.autograd.grad(ref_loss, [h1, h2])
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        torch.testing.assert_close(rec.seen[("activations", "act", step)], h1.detach())
        torch.testing.assert_close(rec.seen[("activations", "act#1", step)], h2.detach())
        torch.testing.assert_close(rec.seen[("layer_gradients", "act", step)], g1)
        torch.testing.assert_close(rec.seen[("layer_gradients", "act#1", step)], g2)
        assert rec.order.count(("activations", "act", step)) == 1
    exporter.close()


# ----------------------------------------------------------------- optimizer.step(closure)
@pytest.mark.parametrize("optimizer", ["SGD", "LBFGS"])
def test_step_with_a_closure(optimizer, recorder_cls):
    """``optimizer.step(closure)`` (Lightning's way, LBFGS's): one step per call whatever the
    number of closure evaluations; gradients as the step left them, updates after - before,
    forward topics and loss from the step's first forward, and the update ratio of the
    quickstart (``on_error = "raise"``: anything wrong would raise)."""
    from ikkuna_norms import Ratio

    model = _mlp()
    reference = copy.deepcopy(model)
    exporter, rec = _watch(model, ["weight_gradients", "weight_updates", "activations", "loss"],
                           recorder_cls)
    exporter.bus.register_subscriber(Ratio())
    backend = exporter.bus.add_backend(MemoryBackend())
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    if optimizer == "SGD":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    calls = 0
    for step in range(3):
        x, y = _batch(step)

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            nonlocal calls
            calls += 1
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        reference.load_state_dict(model.state_dict())
        with torch.no_grad():
            first_output = reference(x)
        before = _state(model)
        returned = opt.step(closure)
        grads = _grads(model)
        assert exporter.global_step == step
        for name, p in model.named_parameters():
            kind, key = _param_key(name)
            if kind != "weight":
                continue
            assert torch.equal(rec.seen[("weight_gradients", key, step)], grads[name])
            update = p.detach() - before[name]
            torch.testing.assert_close(rec.seen[("weight_updates", key, step)], update)
            if optimizer == "SGD":
                torch.testing.assert_close(update, -0.1 * grads[name])
            backend_ratio = float(update.norm() / p.detach().norm())
            exporter.bus.flush()
            assert backend.scalar(f"ratio/weight_updates/weights/{key}", step) == pytest.approx(
                backend_ratio, rel=1e-5
            )
        torch.testing.assert_close(rec.seen[("activations", "4", step)], first_output)
        torch.testing.assert_close(rec.seen[("loss", None, step)], returned.detach())
    assert calls > 3 if optimizer == "LBFGS" else calls == 3
    exporter.close()


def test_step_with_a_closure_never_stops_training_with_on_error_warn():
    """The crash of issue 9: ``step(closure)`` with an ``*_updates`` topic, through watch()
    with the default error policy: training goes on and the ratio is published."""
    model = _mlp()
    reference = copy.deepcopy(model)
    from ikkuna_norms import Ratio

    exporter = ik.watch(model, nn.CrossEntropyLoss(), {"backends": []})

    exporter.bus.register_subscriber(Ratio())
    backend = exporter.bus.add_backend(MemoryBackend())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = _batch(0)
    for net, o, loss_fn in ((model, opt, exporter.loss_fn), (reference, ref_opt, None)):
        loss_fn = loss_fn or nn.CrossEntropyLoss()
        for _ in range(2):
            def closure(net=net, o=o, loss_fn=loss_fn) -> torch.Tensor:
                o.zero_grad()
                loss = loss_fn(net(x), y)
                loss.backward()
                return loss

            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no warning either
                o.step(closure)
    exporter.close()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    assert {r.step for r in backend.scalars} == {0, 1}


# ------------------------------------------------------------------------ model(**batch)
class KeywordModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.head(h.mean(1))


def test_keyword_only_inputs_reach_input_data(recorder_cls):
    torch.manual_seed(0)
    model = KeywordModel().to(CPU)
    exporter, rec = _watch(model, ["input_data"], recorder_cls)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        batch = {"input_ids": torch.randint(0, 20, (4, 5), generator=g, device=CPU),
                 "attention_mask": torch.ones(4, 5, device=CPU)}
        opt.zero_grad()
        loss_fn(model(**batch), torch.tensor([0, 1, 2, 0])).backward()
        opt.step()
        assert torch.equal(rec.seen[("input_data", None, step)], batch["input_ids"])
    exporter.close()


# ------------------------------------------------------------------------ silent setups
def _count(caught: list[warnings.WarningMessage], text: str) -> int:
    return sum(text in str(w.message) for w in caught)


def test_loss_topics_without_a_loss_function_warn_once(recorder_cls):
    """A ``loss`` subscriber, a model returning plain logits, no loss function set: the
    loss can never be published. One warning names set_loss and the Hugging Face route."""
    from ikkuna_accuracy import Loss, TrainAccuracy

    model = _mlp()
    exporter = ik.Exporter()
    exporter.set_model(model)
    exporter.bus.register_subscriber(Loss())
    exporter.bus.register_subscriber(TrainAccuracy())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(5):
            x, y = _batch(step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    exporter.close()
    assert _count(caught, "set_loss") >= 1
    about_loss = [w for w in caught if "no loss function" in str(w.message)]
    assert len(about_loss) == 1, [str(w.message) for w in caught]
    message = str(about_loss[0].message)
    assert "exporter.set_loss" in message and "'loss'" in message and "logits" in message
    # and the synchronized train_accuracy says once that it never completed
    assert _count(caught, "'train_accuracy' (synchronized") == 1


def test_a_loss_function_that_is_never_called_warns_once():
    """set_loss(fn) but the loop calls another function: said once, naming the fix."""
    from ikkuna_accuracy import Loss

    model = _mlp()
    exporter = ik.Exporter()
    exporter.set_model(model)
    exporter.set_loss(lambda out, y: nn.functional.cross_entropy(out, y))  # result ignored
    exporter.bus.register_subscriber(Loss())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            x, y = _batch(step)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    exporter.close()
    about = [str(w.message) for w in caught if "was not called" in str(w.message)]
    assert len(about) == 1 and "returned" in about[0], [str(w.message) for w in caught]


def test_a_loss_is_found_without_warning_when_set():
    from ikkuna_accuracy import Loss

    model = _mlp()
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    exporter.bus.register_subscriber(Loss())
    backend = exporter.bus.add_backend(MemoryBackend())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(4):
            x, y = _batch(step)
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            exporter.bus.flush()
            assert backend.scalar("loss/loss", step) == pytest.approx(loss.item())
    exporter.close()


class Wrapper(nn.Module):
    """Like a LightningModule whose training_step calls ``self.net(x)``, not ``self(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_optimizer_steps_without_a_watched_forward_warn_once(recorder_cls):
    model = Wrapper()
    exporter, rec = _watch(model, ["activations", "weight_gradients"], recorder_cls)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(6):
            x, y = _batch(step)
            opt.zero_grad()
            loss_fn(model.net(x), y).backward()
            opt.step()
    exporter.close()
    about = [str(w.message) for w in caught if "never ran a training forward" in str(w.message)]
    assert len(about) == 1
    assert "Lightning" in about[0]
    # the parameter topics are right all the same
    assert rec.topic_count("weight_gradients") == 6 * 3
    assert rec.topic_count("activations") == 0


def test_ikkuna_plugins_naming_an_uninstalled_plugin_warns_once(monkeypatch):
    monkeypatch.setenv("IKKUNA_PLUGINS", "norms,no-such-plugin-xyz")
    from ikkuna_core.plugins import PluginWarning

    with pytest.warns(PluginWarning, match="no-such-plugin-xyz") as caught:
        registry = ik.load_plugins()
    assert "norms" in registry.plugins and registry.plugins["norms"].loaded
    message = str(caught[0].message)
    assert "IKKUNA_PLUGINS" in message and "installed plugins" in message and "norms" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ik.load_plugins()  # said once per process
