"""The curvature subscribers leave training exactly as it would be without them: after 20
SGD steps of a model with batch norm and dropout, with every subscriber running every step,
the parameters, gradients, batch-norm running statistics, every module's train/eval mode and
the random state (CPU, and CUDA's on a GPU) are bit-for-bit those of the same training
without Ikkuna. On the CPU always; on CUDA too where there is a GPU."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend

STEPS = 20


def with_batch_norm() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(16, 3),
    )
    model.train()
    model[6].eval()  # a frozen batch norm inside a training model must stay frozen
    return model


def dropout_only() -> nn.Module:
    """No batch norm: gradient_noise_scale runs too (vmap with per-example dropout masks)."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Dropout(0.3), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3),
    )


SUBSCRIBERS = [
    {"name": "condition_number", "subsample": 1},
    {"name": "hessian_max_eigenvalue", "subsample": 1, "max_iterations": 8},
    {"name": "hessian_trace", "subsample": 2, "probes": 3},
    {"name": "gradient_noise_scale", "subsample": 3},
]


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


@pytest.fixture
def deterministic() -> object:
    """cuDNN may pick non-deterministic kernels; bit-for-bit comparisons need the others."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def train(make: Callable[[], nn.Module], watched: bool, device: str) -> dict[str, object]:
    torch.manual_seed(0)
    model = make().to(device)
    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(16, 1, 6, 6, generator=g).to(device),
            torch.randint(0, 3, (16,), generator=g).to(device),
        )
        for _ in range(4)
    ]
    loss_fn: Callable[..., torch.Tensor] = nn.CrossEntropyLoss()
    backend = MemoryBackend()
    exporter = None
    if watched:
        config = {
            "plugins": ["curvature"], "backends": [], "on_error": "raise",
            "subscribers": SUBSCRIBERS,
        }
        exporter = ik.watch(model, loss_fn, config=config)
        exporter.bus.add_backend(backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(STEPS):
        x, y = batches[step % len(batches)]
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    if exporter is not None:
        exporter.close()
    return {
        "parameters": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if device == "cuda" else torch.empty(0),
        "losses": torch.stack(losses),
        "backend": backend,
    }


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [with_batch_norm, dropout_only], ids=["batchnorm", "dropout"])
def test_twenty_steps_are_bit_identical_with_and_without_the_subscribers(
    make: Callable[[], nn.Module], device: str
) -> None:
    plain = train(make, watched=False, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = train(make, watched=True, device=device)
    for key in ("parameters", "grads", "buffers"):
        a, b = plain[key], watched[key]
        assert isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (key, name)
    assert plain["modes"] == watched["modes"]
    assert torch.equal(plain["rng"], watched["rng"])  # type: ignore[arg-type]
    assert torch.equal(plain["cuda_rng"], watched["cuda_rng"])  # type: ignore[arg-type]
    assert torch.equal(plain["losses"], watched["losses"])  # type: ignore[arg-type]

    backend = watched["backend"]
    assert isinstance(backend, MemoryBackend)
    steps = {tag: sorted({r.step for r in backend.scalars if r.tag == tag})
             for tag in backend.tags()}
    assert steps["hessian_max_eigenvalue"] == list(range(STEPS))
    assert steps["hessian_trace"] == list(range(0, STEPS, 2))
    assert steps["condition_number/weights/0"] == list(range(STEPS))
    noise_warnings = [w for w in caught if "gradient_noise_scale" in str(w.message)]
    if make is with_batch_norm:  # train-mode batch norm: it said why and stepped aside
        assert len(noise_warnings) == 1 and "BatchNorm2d" in str(noise_warnings[0].message)
        assert not any(t.startswith("gradient_noise_scale") for t in steps)
    else:
        assert not noise_warnings
        assert steps["gradient_noise_scale"] == list(range(0, STEPS, 3))
