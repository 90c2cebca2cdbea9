"""The three plugins on a CUDA model (skipped without a GPU): every result the subscribers
publish stays on the GPU until the bus flushes, test batches from a CPU loader are moved to
the model's device, and the values agree with the same run on the CPU."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from ikkuna_accuracy import Loss, TestAccuracy, TrainAccuracy
from ikkuna_core import Exporter, MessageBundle, MessageBus, Subscriber
from ikkuna_core.testing import MemoryBackend
from ikkuna_histograms import DeadFraction, Histogram
from ikkuna_norms import Mean, Norm, Ratio, SpectralNorm, Variance

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RESULT_TOPICS = [
    "norm/weight_gradients",
    "ratio/weight_updates/weights",
    "spectral_norm/weights",
    "mean/activations",
    "variance/activations",
    "histogram/activations",
    "dead_fraction/activations",
    "train_accuracy",
    "test_accuracy",
    "loss/loss",
]


class Devices(Subscriber):
    """Records the device of every result message it receives (results are bus topics)."""

    name = "devices"

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.seen: collections.Counter[tuple[str, str]] = collections.Counter()

    def compute(self, bundle: MessageBundle) -> None:
        for topic, message in bundle.messages.items():
            self.seen[(topic, message.data.device.type)] += 1


def _run(device: str) -> tuple[MemoryBackend, Devices]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)
    ).to(device)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    x_test, y_test = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    loader = [(x_test[:32], y_test[:32]), (x_test[32:], y_test[32:])]  # stays on the CPU
    exporter = Exporter(bus=MessageBus(on_error="raise"))
    exporter.set_model(model)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    subscribers = [
        Norm(),
        Ratio(),
        SpectralNorm(),
        Mean(),
        Variance(),
        Histogram(bins=16),
        DeadFraction(),
        TrainAccuracy(),
        TestAccuracy(loader=loader, subsample=1),
        Loss(),
    ]
    for sub in subscribers:
        exporter.bus.register_subscriber(sub)
    devices = Devices(topics=RESULT_TOPICS)
    exporter.bus.register_subscriber(devices)
    backend = exporter.bus.add_backend(MemoryBackend())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = x.to(device), y.to(device)
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    exporter.close()
    return backend, devices


def test_results_stay_on_the_gpu_and_match_the_cpu() -> None:
    gpu, devices = _run("cuda")
    cpu, _ = _run("cpu")
    assert {topic for topic, _ in devices.seen} == set(RESULT_TOPICS)
    assert {device for _, device in devices.seen} == {"cuda"}
    assert {r.tag for r in gpu.scalars} == {r.tag for r in cpu.scalars}
    cpu_values = {(r.tag, r.step): r.value for r in cpu.scalars}
    for r in gpu.scalars:
        want = cpu_values[(r.tag, r.step)]
        if r.tag.endswith("accuracy") or r.tag.startswith("dead_fraction"):
            assert r.value == pytest.approx(want, abs=2 / 64), r.tag  # argmax/sign near ties
        else:
            assert r.value == pytest.approx(want, rel=1e-3, abs=1e-6), r.tag
    cpu_hists = {(h.tag, h.step): h for h in cpu.histograms}
    for h in gpu.histograms:
        ref = cpu_hists[(h.tag, h.step)]
        assert h.num == ref.num and h.nonfinite == ref.nonfinite == 0
        assert abs(h.counts - ref.counts).sum() <= 0.01 * ref.num


def test_a_watched_step_never_waits_for_the_gpu() -> None:
    """With every plugin on (but the held-out evaluation, which copies batches to the
    device), no operation of a training step synchronises the host with the GPU:
    ``torch.cuda.set_sync_debug_mode("error")`` turns any such operation into an error."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Flatten(),
        nn.Linear(512, 10),
    ).cuda()
    exporter = Exporter(bus=MessageBus(on_error="raise"))
    exporter.set_model(model)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    for sub in (Norm(topics=["weight_gradients", "weights", "weight_updates"]), Ratio(),
                SpectralNorm(), Mean(), Variance(), Histogram(topics=["activations",
                "weight_gradients"]), DeadFraction(), TrainAccuracy(), Loss()):
        exporter.bus.register_subscriber(sub)
    backend = exporter.bus.add_backend(MemoryBackend())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 1, 8, 8, device="cuda"), torch.randint(0, 10, (32,), device="cuda")

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

    for _ in range(2):  # the first steps fill caches (sample indices, layouts) once
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    exporter.close()
    assert {r.step for r in backend.scalars} == set(range(5))
