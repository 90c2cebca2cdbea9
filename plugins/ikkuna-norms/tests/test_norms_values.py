"""Every value the norms subscribers publish, compared with numpy computations on data read
directly from the model (parameter clones, ``p.grad``, own forward hooks) during real SGD
steps."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from ikkuna_core import MessageBus, UnknownTopicError
from ikkuna_core.testing import MemoryBackend, train_steps
from ikkuna_norms import GlobalNorm, Mean, Norm, Ratio, SpectralNorm, Variance

STEPS = 3


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


def make_data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


class Reference:
    """Independent record of each step: parameters before/after ``optimizer.step()``, the
    gradients, and every module's output (own forward hooks)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.last = self._params()
        self.weights: list[dict[str, np.ndarray]] = []
        self.grads: list[dict[str, np.ndarray]] = []
        self.updates: list[dict[str, np.ndarray]] = []
        self.activations: list[dict[str, np.ndarray]] = []
        self._outputs: dict[str, np.ndarray] = {}
        for name, module in model.named_modules():
            if name:
                module.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
            self._outputs[name] = output.detach().numpy().astype(np.float64)

        return hook

    def _params(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().astype(np.float64) for n, p in self.model.named_parameters()}

    def __call__(self, step: int) -> None:
        after = self._params()
        self.weights.append(after)
        self.grads.append(
            {n: p.grad.numpy().astype(np.float64) for n, p in self.model.named_parameters()}
        )
        self.updates.append({n: after[n] - self.last[n] for n in after})
        self.activations.append(dict(self._outputs))
        self.last = after

    def topic(self, topic: str, step: int) -> dict[str, np.ndarray]:
        """The reference data of ``topic`` at ``step``, keyed by module name."""
        if topic == "activations":
            return self.activations[step]
        source, kind = {
            "weights": (self.weights, "weight"),
            "biases": (self.weights, "bias"),
            "weight_gradients": (self.grads, "weight"),
            "bias_gradients": (self.grads, "bias"),
            "weight_updates": (self.updates, "weight"),
            "bias_updates": (self.updates, "bias"),
        }[topic]
        return {n.rsplit(".", 1)[0]: v for n, v in source[step].items() if n.endswith(kind)}


def run(subscribers, steps: int = STEPS, lr: float = 0.1, model: nn.Module | None = None):
    model = model or make_model()
    ref = Reference(model)
    backend = MemoryBackend()
    x, y = make_data()
    exporter = train_steps(
        model, subscribers, steps=steps, inputs=x, targets=y, backend=backend, on_step=ref, lr=lr
    )
    exporter.close()
    return backend, ref


PARAM_TOPICS = ["weights", "weight_gradients", "weight_updates", "bias_gradients", "biases"]


@pytest.mark.parametrize("p", [2, 1, 3.5, "inf"])
def test_norm_matches_numpy_for_every_topic(p: object) -> None:
    topics = [*PARAM_TOPICS, "activations"]
    backend, ref = run([Norm(topics=topics, p=p)])
    order = math.inf if p == "inf" else float(p)
    checked = 0
    for topic in topics:
        for step in range(STEPS):
            expected = ref.topic(topic, step)
            assert expected
            for key, value in expected.items():
                want = np.linalg.norm(value.ravel(), ord=order)
                got = backend.scalar(f"norm/{topic}/{key}", step)
                assert got == pytest.approx(want, rel=1e-5), (topic, key, step)
                checked += 1
    # 3 parameterised modules x 5 parameter topics + 6 modules' activations, per step
    assert checked == STEPS * (3 * 5 + 6)


def test_norm_option_validation() -> None:
    assert Norm(p="inf").options.p == math.inf
    assert Norm(p=" Inf ").options.p == math.inf
    assert Norm(p="1.5").options.p == 1.5
    assert Norm().options.p == 2.0
    assert Norm().options.topics == ["weight_gradients"]
    for bad in ["euclid", 0, -1, "-inf", float("nan")]:
        with pytest.raises(ValueError, match="p must be"):
            Norm(p=bad)
    with pytest.raises(ValueError, match="no tensor payload"):
        Norm(topics=["batch_finished"])
    with pytest.raises(ValueError, match="(?i)extra inputs"):
        Norm(q=2)


@pytest.mark.parametrize("correction", [1, 0])
def test_mean_and_variance_match_numpy(correction: int) -> None:
    topics = ["activations", "weight_gradients", "weight_updates"]
    backend, ref = run([Mean(topics=topics), Variance(topics=topics, correction=correction)])
    for topic in topics:
        for step in range(STEPS):
            for key, value in ref.topic(topic, step).items():
                assert backend.scalar(f"mean/{topic}/{key}", step) == pytest.approx(
                    value.mean(), rel=1e-4, abs=1e-7
                )
                assert backend.scalar(f"variance/{topic}/{key}", step) == pytest.approx(
                    value.var(ddof=correction), rel=1e-4, abs=1e-12
                )


def test_ratio_of_updates_to_weights() -> None:
    backend, ref = run([Ratio()])
    assert Ratio().options.topics == ["weight_updates", "weights"]
    for step in range(STEPS):
        updates, weights = ref.topic("weight_updates", step), ref.topic("weights", step)
        assert set(updates) == {"0", "3", "5"}
        for key in updates:
            want = np.linalg.norm(updates[key]) / np.linalg.norm(weights[key])
            got = backend.scalar(f"ratio/weight_updates/weights/{key}", step)
            assert got == pytest.approx(want, rel=1e-5)


def test_ratio_consumes_the_norms_published_by_norm() -> None:
    """``norm`` publishes its results as bus topics; ``ratio`` subscribes to them."""
    norm = Norm(topics=["weight_updates", "weights"])
    ratio = Ratio(topics=["norm/weight_updates", "norm/weights"])
    direct = Ratio(topics=["weight_updates", "weights"])
    backend, ref = run([norm, ratio, direct])
    assert norm.output_topics() == ["norm/weight_updates", "norm/weights"]
    for step in range(STEPS):
        updates, weights = ref.topic("weight_updates", step), ref.topic("weights", step)
        for key in updates:
            want = np.linalg.norm(updates[key]) / np.linalg.norm(weights[key])
            derived = backend.scalar(f"ratio/norm/weight_updates/norm/weights/{key}", step)
            assert derived == pytest.approx(want, rel=1e-5)
            assert derived == pytest.approx(
                backend.scalar(f"ratio/weight_updates/weights/{key}", step), rel=1e-6
            )


def test_ratio_of_derived_topics_needs_their_producer_first() -> None:
    bus = MessageBus()
    with pytest.raises(UnknownTopicError, match="norm/weight_updates"):
        bus.register_subscriber(Ratio(topics=["norm/weight_updates", "norm/weights"]))
    bus.register_subscriber(Norm(topics=["weight_updates", "weights"]))
    bus.register_subscriber(Ratio(topics=["norm/weight_updates", "norm/weights"]))
    assert "ratio/norm/weight_updates/norm/weights" in bus.topics


def test_ratio_eps_and_validation() -> None:
    backend, ref = run([Ratio(eps=0.5)], steps=1)
    for key, update in ref.topic("weight_updates", 0).items():
        want = np.linalg.norm(update) / (np.linalg.norm(ref.topic("weights", 0)[key]) + 0.5)
        assert backend.scalar(f"ratio/weight_updates/weights/{key}", 0) == pytest.approx(
            want, rel=1e-5
        )
    for topics in (["weights"], ["weights", "weight_updates", "biases"]):
        with pytest.raises(ValueError, match="exactly two topics"):
            Ratio(topics=topics)
    with pytest.raises(ValueError, match="two different topics"):
        Ratio(topics=["weights", "weights"])
    with pytest.raises(ValueError):
        Ratio(eps=-1.0)


def _matrix(value: np.ndarray) -> np.ndarray:
    return value.reshape(value.shape[0], -1)


def test_spectral_norm_tracks_the_largest_singular_value() -> None:
    steps = 6
    # A wide Linear (32 x 256) has a tightly clustered spectrum at initialisation: the hard
    # case for power iteration.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 32), nn.ReLU(),
        nn.Linear(32, 10),
    )
    sub = SpectralNorm()
    assert sub.options.topics == ["weights"]
    backend, ref = run([sub], steps=steps, model=model)
    for step in range(steps):
        weights = ref.topic("weights", step)
        assert set(weights) == {"0", "3", "5"}
        for key, w in weights.items():
            want = np.linalg.norm(_matrix(w), ord=2)  # numpy's SVD, conv kernel as (out, -1)
            got = backend.scalar(f"spectral_norm/weights/{key}", step)
            assert got == pytest.approx(want, rel=5e-3), (key, step)
            assert got <= want * (1 + 1e-5)  # a Rayleigh-Ritz value never overshoots


def test_spectral_norm_keeps_its_vectors_between_steps() -> None:
    """With frozen weights (lr=0) and one classic power iteration per step, the estimate
    improves from step to step, which it only can if the vector is kept."""
    steps = 8
    sub = SpectralNorm(block=1, iterations=1, warmup_iterations=1)
    backend, ref = run([sub], steps=steps, lr=0.0)
    want = np.linalg.norm(_matrix(ref.topic("weights", 0)["3"]), ord=2)
    got = [backend.scalar("spectral_norm/weights/3", s) for s in range(steps)]
    errors = [want - g for g in got]
    assert all(e >= -1e-5 * want for e in errors)
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(errors))
    assert errors[-1] < 0.5 * errors[0]
    sub.reset()
    assert not sub._blocks


def test_spectral_norm_dispatches_one_op_per_batched_product() -> None:
    """Two matrices of one shape and one of another, after the warm-up: each power
    iteration of a shape group is two ``bmm`` and two QRs (no ``expand`` or reshaping views,
    which ``@`` on batches dispatches around its ``bmm``), and the values match numpy's
    SVD."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    mats = [torch.randn(8, 24), torch.randn(8, 24), torch.randn(16, 5)]
    bus = MessageBus(on_error="raise")
    backend = bus.add_backend(MemoryBackend())
    sub = SpectralNorm()
    bus.register_subscriber(sub)
    payloads = {"weights": _weights_payloads(mats)}
    bus.deliver((0, 0, 0), payloads)  # the warm-up
    with Count() as count:
        bus.deliver((1, 0, 1), payloads)
    bus.flush()
    from ikkuna_norms.subscribers import _SQUARINGS

    iterations, groups, block_sizes = sub.options.iterations, 2, 2  # blocks of 8 and of 5
    assert count.ops.count("aten.linalg_qr.default") == 2 * iterations * groups
    # the power iterations' products, then per block size G = R^T R and its squarings
    assert count.ops.count("aten.bmm.default") == (
        2 * iterations * groups + block_sizes * (1 + _SQUARINGS))
    assert "aten.expand.default" not in count.ops
    assert "aten._unsafe_view.default" not in count.ops
    for i, m in enumerate(mats):
        want = np.linalg.norm(m.numpy(), ord=2)
        assert backend.scalar(f"spectral_norm/weights/m{i}", 1) == pytest.approx(want, rel=1e-3)


def _weights_payloads(mats: list[torch.Tensor]) -> object:
    from ikkuna_core import ModuleInfo, TopicPayloads

    keys = [f"m{i}" for i in range(len(mats))]
    return TopicPayloads(topic="weights", keys=keys,
                         modules=[ModuleInfo(name=k, type="Linear") for k in keys], data=mats)


def test_spectral_norm_skips_vectors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.BatchNorm1d(10))
    backend, ref = run([SpectralNorm(topics=["weights", "biases"])], steps=2, model=model)
    assert backend.tags() == {"spectral_norm/weights/1"}
    want = np.linalg.norm(ref.topic("weights", 1)["1"], ord=2)
    assert backend.scalar("spectral_norm/weights/1", 1) == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("p", [2, "inf", 1])
def test_global_norm_equals_clip_grad_norm_total(p: object) -> None:
    """``global_norm`` is the total norm ``clip_grad_norm_`` computes over every gradient;
    computed independently from ``p.grad`` with torch's own function."""
    model = make_model()
    totals: list[float] = []

    def record(step: int) -> None:
        grads = [q.grad for q in model.parameters()]
        order = math.inf if p == "inf" else float(p)
        totals.append(float(torch.nn.utils.get_total_norm(grads, norm_type=order)))

    backend = MemoryBackend()
    x, y = make_data()
    sub = GlobalNorm(p=p)
    exporter = train_steps(model, [sub], steps=STEPS, inputs=x, targets=y, backend=backend,
                           on_step=record)
    exporter.close()
    assert sub.output_topics() == ["global_norm/weight_gradients/bias_gradients"]
    assert exporter.bus.topics["global_norm/weight_gradients/bias_gradients"].kind == "network"
    assert [r.tag for r in backend.scalars] == ["global_norm/weight_gradients/bias_gradients"] * 3
    for step in range(STEPS):
        got = backend.scalar("global_norm/weight_gradients/bias_gradients", step)
        assert got == pytest.approx(totals[step], rel=1e-5)


def test_global_norm_counts_a_tied_parameter_once() -> None:
    """An embedding tied to the output layer: one tensor, one gradient, counted once."""
    torch.manual_seed(0)
    embed = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(embed, nn.Flatten(), nn.Unflatten(1, (3, 6)), head, nn.Flatten(1))
    x = torch.randint(0, 10, (4, 3))
    y = torch.randint(0, 10, (4, 30)).float().softmax(1)
    backend = MemoryBackend()
    expected: list[float] = []
    exporter = train_steps(
        model, [GlobalNorm()], steps=2, inputs=x, targets=y, backend=backend,
        on_step=lambda s: expected.append(float(torch.linalg.vector_norm(embed.weight.grad))),
    )
    exporter.close()
    for step in range(2):
        got = backend.scalar("global_norm/weight_gradients/bias_gradients", step)
        assert got == pytest.approx(expected[step], rel=1e-5)


def test_global_norm_of_tied_weights_counts_the_shared_tensor_once() -> None:
    """``global_norm`` on ``weights`` of a model with a tied embedding/output weight: the
    norm of the distinct parameter tensors (as ``clip_grad_norm_(model.parameters())`` sees
    them), computed here from the model's parameters after each update."""
    torch.manual_seed(0)
    embed = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = embed.weight
    extra = nn.Linear(30, 30)
    model = nn.Sequential(embed, nn.Flatten(), nn.Unflatten(1, (3, 6)), head, nn.Flatten(1),
                          extra)
    x = torch.randint(0, 10, (4, 3))
    y = torch.randint(0, 30, (4, 30)).float().softmax(1)
    backend = MemoryBackend()
    expected: list[float] = []

    def record(step: int) -> None:
        distinct = [p for n, p in model.named_parameters() if n.endswith("weight")]
        assert len(distinct) == 2  # named_parameters() yields the tied tensor once
        expected.append(float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.detach().double()) for p in distinct]))))

    exporter = train_steps(model, [GlobalNorm(topics=["weights"])], steps=2, inputs=x,
                           targets=y, backend=backend, on_step=record)
    exporter.close()
    twice = math.sqrt(2 * float(embed.weight.detach().double().norm()) ** 2
                      + float(extra.weight.detach().double().norm()) ** 2)
    assert abs(twice - expected[-1]) > 1e-3 * expected[-1]  # counting it twice would show
    for step in range(2):
        got = backend.scalar("global_norm/weights", step)
        assert got == pytest.approx(expected[step], rel=1e-6)


def test_spectral_norm_warm_up_runs_exactly_warmup_iterations() -> None:
    """The first step's estimate equals an independent block power iteration of exactly
    ``warmup_iterations`` passes from the same start vectors, read with ``svdvals`` (float64),
    on a matrix whose spectrum decays so slowly that one pass fewer or more is visible."""
    torch.manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    sigma = torch.tensor([1.0, 0.97, 0.94, 0.9] + [0.5] * 8, dtype=torch.float64)
    w = (q1 @ torch.diag(sigma) @ q2[:12]).float()  # (12, 20), sigma_2 / sigma_1 = 0.97
    model = nn.Sequential(nn.Linear(20, 12, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    warmup, block, seed = 3, 1, 0

    def reference(passes: int) -> float:
        m = w.double()
        generator = torch.Generator().manual_seed(seed)
        start = torch.randn(12, block, generator=generator, dtype=torch.float32).double()
        u = torch.linalg.qr(start).Q
        r = None
        for _ in range(passes):
            v = torch.linalg.qr(m.T @ u).Q
            u, r = torch.linalg.qr(m @ v)
        return float(torch.linalg.svdvals(r)[0])

    assert abs(reference(warmup) - reference(warmup - 1)) > 1e-3  # the count matters
    backend = MemoryBackend()
    x, y = torch.randn(4, 20), torch.randint(0, 12, (4,))
    sub = SpectralNorm(block=block, iterations=1, warmup_iterations=warmup, seed=seed)
    exporter = train_steps(model, [sub], steps=1, inputs=x, targets=y, backend=backend, lr=0.0)
    exporter.close()
    got = backend.scalar("spectral_norm/weights/0", 0)
    assert got == pytest.approx(reference(warmup), rel=1e-5)
