"""Histograms and dead fractions compared with numpy on data read directly from the model
(parameter clones, ``p.grad``, own forward hooks) during real SGD steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ikkuna_core.testing import MemoryBackend, train_steps
from ikkuna_histograms import DEAD_MODULE_TYPES, DeadFraction, Histogram


class Recorder:
    """Own record of every step: each module's output (forward hooks, cloned at once),
    gradients, weights after the step and the update."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.last = self._weights()
        self.steps: list[dict[str, dict[str, np.ndarray]]] = []
        self._outputs: dict[str, np.ndarray] = {}
        for name, module in model.named_modules():
            if name:
                module.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
            self._outputs[name] = output.detach().numpy().astype(np.float64)

        return hook

    def _weights(self) -> dict[str, np.ndarray]:
        return {
            n.rsplit(".", 1)[0]: p.detach().numpy().astype(np.float64)
            for n, p in self.model.named_parameters()
            if n.endswith("weight")
        }

    def __call__(self, step: int) -> None:
        after = self._weights()
        grads = {
            n.rsplit(".", 1)[0]: p.grad.numpy().astype(np.float64)
            for n, p in self.model.named_parameters()
            if n.endswith("weight")
        }
        self.steps.append(
            {
                "activations": dict(self._outputs),
                "weights": after,
                "weight_gradients": grads,
                "weight_updates": {k: after[k] - self.last[k] for k in after},
            }
        )
        self.last = after


def run(model: nn.Module, subscribers, x: torch.Tensor, steps: int = 2, lr: float = 0.1):
    rec = Recorder(model)
    backend = MemoryBackend()
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(2))
    exporter = train_steps(
        model, subscribers, steps=steps, inputs=x, targets=y, backend=backend, on_step=rec, lr=lr
    )
    exporter.close()
    return backend, rec


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(256, 16),
        nn.Tanh(),
        nn.Linear(16, 10),
    )


def data(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def assert_binned_like_numpy(counts: np.ndarray, values: np.ndarray, lo, hi, bins: int) -> int:
    """``counts`` are numpy's histogram of ``values`` over [lo, hi]. The core bins in the
    values' own precision (float32), numpy in float64: a value within float32 rounding of a
    bin edge may land in the neighbouring bin (or, at a range end, in or out), so each such
    value may move one count; every other value must be binned exactly as numpy does.
    Returns the number of values that close to an edge."""
    want, edges = np.histogram(values, bins=bins, range=(lo, hi))
    tol = 1e-6 * ((hi - lo) + abs(lo) + abs(hi))
    near_edge = np.min(np.abs(values[:, None] - edges[None, :]), axis=1) <= tol
    ambiguous = int(np.count_nonzero(near_edge))
    assert np.abs(counts - want).sum() <= 2 * ambiguous, (counts, want)
    return ambiguous


def check_histogram(record, values: np.ndarray, bins: int, value_range=None) -> None:
    """``record`` is numpy's histogram of the finite ``values``, with their statistics."""
    flat = values.ravel()
    finite = flat[np.isfinite(flat)]
    assert record.nonfinite == flat.size - finite.size
    assert record.num == finite.size
    assert record.min == finite.min() and record.max == finite.max()
    assert record.sum == pytest.approx(finite.sum(), rel=1e-5, abs=1e-6)
    assert record.sum_squares == pytest.approx((finite**2).sum(), rel=1e-5)
    lo, hi = value_range if value_range is not None else (finite.min(), finite.max())
    edges = np.linspace(lo, hi, bins + 1)
    np.testing.assert_allclose(record.edges, edges, rtol=1e-9, atol=1e-12)
    assert record.counts.sum() == finite.size
    assert_binned_like_numpy(record.counts, finite, lo, hi, bins)


@pytest.mark.parametrize("bins", [64, 7])
def test_histograms_of_every_kind_of_topic_match_numpy(bins: int) -> None:
    topics = ["activations", "weights", "weight_gradients", "weight_updates"]
    sub = Histogram(topics=topics, bins=bins)
    backend, rec = run(conv_net(), [sub], data())
    assert sub.output_topics() == [f"histogram/{t}" for t in topics]
    checked = 0
    for step, reference in enumerate(rec.steps):
        for topic in topics:
            for key, values in reference[topic].items():
                record = backend.histogram(f"histogram/{topic}/{key}", step)
                assert record.topic == f"histogram/{topic}" and record.key == key
                check_histogram(record, values, bins)
                checked += 1
    assert checked == 2 * (6 + 3 * 3)  # steps x (6 modules' outputs + 3 weights x 3 topics)
    assert not backend.scalars


def test_histogram_with_a_fixed_range() -> None:
    backend, rec = run(conv_net(), [Histogram(topics=["weight_gradients"], bins=10,
                                              range=[-0.01, 0.01])], data())
    for step, reference in enumerate(rec.steps):
        for key, values in reference["weight_gradients"].items():
            record = backend.histogram(f"histogram/weight_gradients/{key}", step)
            flat = values.ravel()
            assert record.edges[0] == -0.01 and record.edges[-1] == pytest.approx(0.01)
            ambiguous = assert_binned_like_numpy(record.counts, flat, -0.01, 0.01, 10)
            inside = np.count_nonzero((flat >= -0.01) & (flat <= 0.01))
            assert inside < flat.size  # the range really cuts values off
            assert abs(record.counts.sum() - inside) <= ambiguous
            assert record.num == flat.size  # num counts every finite value


def test_histogram_of_a_sample_of_a_large_tensor() -> None:
    backend, rec = run(conv_net(), [Histogram(max_samples=200, bins=8)], data(), steps=1)
    sampled = 0
    for key, values in rec.steps[0]["activations"].items():
        record = backend.histogram(f"histogram/activations/{key}", 0)
        flat = values.ravel()
        if flat.size <= 200:  # the last Linear layer: 16 x 10 outputs, all binned
            check_histogram(record, values, 8)
            continue
        sampled += 1
        assert record.num == record.counts.sum() == 200
        assert flat.min() <= record.min <= record.max <= flat.max()
        # every sampled value is one of the tensor's values: the extremes are two of them, the
        # sum lies within 200 times the extremes
        assert record.min in flat and record.max in flat
        assert 200 * flat.min() <= record.sum <= 200 * flat.max()
    assert sampled == 5


def test_sampling_leaves_the_global_rng_and_training_untouched() -> None:
    """The sample comes from a generator of its own: with the histogram subscriber sampling
    every tensor (max_samples below each one's size), torch's global RNG state and the trained
    parameters end bit for bit as in an unwatched run, on a model whose dropout draws from
    that global RNG at every step. (The tensor sizes appear in no other test: a sample's
    positions are drawn once per size, so a size seen before would draw nothing here.)"""
    from ikkuna_core import Exporter, MessageBus

    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(19, 23, generator=g), torch.randint(0, 10, (19,), generator=g)
    topics = ["activations", "layer_gradients", "weights", "weight_gradients", "weight_updates"]

    def train(watch: bool) -> tuple[nn.Module, torch.Tensor, MemoryBackend | None]:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(23, 37), nn.ReLU(), nn.Dropout(0.3), nn.Linear(37, 10)
        ).to("cpu")
        backend = None
        if watch:
            exporter = Exporter(bus=MessageBus(on_error="raise"))
            exporter.set_model(model)
            exporter.bus.register_subscriber(Histogram(topics=topics, bins=8, max_samples=11))
            backend = exporter.bus.add_backend(MemoryBackend())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1)
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        state = torch.get_rng_state()
        if watch:
            exporter.close()
        return model, state, backend

    plain, plain_state, _ = train(watch=False)
    watched, watched_state, backend = train(watch=True)
    assert backend is not None
    # every histogram really is of an 11-entry sample (each tensor has more entries)
    assert len(backend.histograms) == 3 * (4 + 4 + 2 + 2 + 2)
    assert {r.num for r in backend.histograms} == {11}
    assert torch.equal(watched_state, plain_state)
    for (name, p), q in zip(plain.named_parameters(), watched.parameters(), strict=True):
        assert torch.equal(p, q), name


class Log(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


def test_nonfinite_values_are_counted_not_binned() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Log(), nn.Flatten(), nn.Linear(64, 10))
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(3)) + 0.1
    x[0, 0, 0, :4] = 0.0  # log -> -inf
    x[1, 0, 0, :3] = -1.0  # log -> nan
    x[2, 0, 1, 0] = float("inf")  # log -> inf
    backend, rec = run(model, [Histogram(bins=16)], x, steps=1)
    log_out = rec.steps[0]["activations"]["0"]
    assert (~np.isfinite(log_out)).sum() == 8
    record = backend.histogram("histogram/activations/0", 0)
    assert record.nonfinite == 8
    assert record.counts.sum() == log_out.size - 8
    check_histogram(record, log_out, 16)
    # the rows with a non-finite input are non-finite after the Linear layer
    linear_out = rec.steps[0]["activations"]["2"]
    record = backend.histogram("histogram/activations/2", 0)
    assert record.nonfinite == (~np.isfinite(linear_out)).sum() == 30
    check_histogram(record, linear_out, 16)


def test_histogram_option_validation() -> None:
    assert Histogram().options.bins == 64
    assert Histogram().options.range is None
    assert Histogram().options.topics == ["activations"]
    assert Histogram(range=[-1, 2]).options.range == (-1.0, 2.0)
    for bad in ([1, 1], [2, 1], [0, float("inf")], [1, 2, 3]):
        with pytest.raises(ValueError):
            Histogram(range=bad)
    with pytest.raises(ValueError):
        Histogram(bins=0)
    with pytest.raises(ValueError, match="no tensor payload"):
        Histogram(topics=["epoch_started"])


def dead_net() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(256, 16),
        nn.ReLU6(),
        nn.Linear(16, 16),
        nn.LeakyReLU(),
        nn.Linear(16, 10),
    )
    with torch.no_grad():  # kill conv channel 0 and 4 units of the first Linear layer
        model[0].bias[0] = -100.0
        model[3].bias[:4] = -100.0
    return model


def test_dead_fraction_of_relus_matches_numpy() -> None:
    sub = DeadFraction(units=True)
    assert sub.options.module_types == list(DEAD_MODULE_TYPES)
    assert sub.output_topics() == ["dead_fraction/activations", "dead_fraction/activations/units"]
    backend, rec = run(dead_net(), [sub], data())
    assert backend.tags() == {
        f"dead_fraction/activations{suffix}/{key}" for suffix in ("", "/units") for key in "14"
    }
    for step, reference in enumerate(rec.steps):
        for key in "14":
            out = reference["activations"][key]
            fraction = backend.scalar(f"dead_fraction/activations/{key}", step)
            assert fraction == pytest.approx(np.mean(out == 0), abs=1e-7)
            per_unit = np.moveaxis(out, 1, 0).reshape(out.shape[1], -1)
            dead_units = np.mean(np.all(per_unit == 0, axis=1))
            assert backend.scalar(f"dead_fraction/activations/units/{key}", step) == (
                pytest.approx(dead_units)
            )
        assert backend.scalar("dead_fraction/activations/units/1", step) >= 1 / 4
        assert backend.scalar("dead_fraction/activations/units/4", step) >= 4 / 16


@pytest.mark.parametrize(
    ("types", "keys"), [([], set("01234567")), (["LeakyReLU", "Conv2d"], {"0", "6"})]
)
def test_dead_fraction_module_types(types: list[str], keys: set[str]) -> None:
    backend, rec = run(dead_net(), [DeadFraction(module_types=types)], data(), steps=1)
    assert backend.tags() == {f"dead_fraction/activations/{k}" for k in keys}
    for key in keys:
        out = rec.steps[0]["activations"][key]
        want = np.mean(out == 0)
        assert backend.scalar(f"dead_fraction/activations/{key}", 0) == pytest.approx(want)


def test_dead_fraction_of_gradients() -> None:
    """Any topic works: the fraction of exactly-zero weight gradients of every module."""
    backend, rec = run(
        dead_net(), [DeadFraction(topics=["weight_gradients"], module_types=[])], data()
    )
    for step, reference in enumerate(rec.steps):
        for key, grad in reference["weight_gradients"].items():
            assert backend.scalar(f"dead_fraction/weight_gradients/{key}", step) == (
                pytest.approx(np.mean(grad == 0))
            )
    # the dead conv channel gets no gradient at all
    assert backend.scalar("dead_fraction/weight_gradients/0", 0) >= 1 / 4
