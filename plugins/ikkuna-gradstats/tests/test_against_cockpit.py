"""Every gradstats quantity equals Cockpit's own (cockpit-for-pytorch, with BackPACK) at every
step, within 1e-4 relative, on twin models: same seed, same batches, same SGD."""

from __future__ import annotations

import copy
import importlib.metadata as md
import sys
import types
from typing import Any

import pytest
import torch
from torch import nn

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend
from ikkuna_gradstats import (
    Alpha,
    Distance,
    EarlyStopping,
    GradHist2d,
    InnerTest,
    MeanGSNR,
    NormTest,
    OrthoTest,
)


def _import_cockpit() -> Any:
    """cockpit-for-pytorch 1.0.2 imports ``pkg_resources`` (gone from setuptools >= 81) for
    its ``__version__`` only: stand in for it when missing."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.DistributionNotFound = md.PackageNotFoundError  # type: ignore[attr-defined]
        shim.get_distribution = md.distribution  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    return pytest.importorskip("cockpit")


SCALARS = {
    "norm_test": "NormTest", "inner_test": "InnerTest", "ortho_test": "OrthoTest",
    "mean_gsnr": "MeanGSNR", "early_stopping": "EarlyStopping",
}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.Sigmoid(),
                         nn.Linear(12, 4))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    # 81 output positions: a grouped convolution; 16: unfold (GROUPED_MIN_POSITIONS = 64)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def sequence() -> nn.Module:
    torch.manual_seed(0)
    # a Linear on (B, T, D) inputs, as in transformers: the sequence path of the statistics
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Flatten(), nn.Linear(5 * 8, 4))


def batches(shape: tuple[int, ...], n: int = 5, b: int = 8) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(b, *shape, generator=g), torch.randint(0, 4, (b,), generator=g))
            for _ in range(n)]


def run_cockpit(model: nn.Module, data, lr: float) -> tuple[dict, list[nn.Parameter]]:
    cockpit = _import_cockpit()
    from backpack import extend
    from cockpit import quantities as q
    from cockpit.utils.schedules import linear

    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    per_sample = nn.CrossEntropyLoss(reduction="none")
    every = linear(1)
    params = list(model.parameters())
    cp = cockpit.Cockpit(params, quantities=[
        q.NormTest(every), q.InnerTest(every), q.OrthoTest(every), q.MeanGSNR(every),
        q.EarlyStopping(every), q.Alpha(every), q.Distance(every),
        q.GradHist2d(every),
    ])
    opt = torch.optim.SGD(params, lr=lr)
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        out = model(x)
        loss = loss_fn(out, y)
        info = {"batch_size": x.shape[0], "individual_losses": per_sample(out, y),
                "loss": loss, "optimizer": opt}
        with cp(step, info=info):
            loss.backward(create_graph=cp.create_graph(step))
        opt.step()
    return cp.get_output(), params


def run_ikkuna(model: nn.Module, data, lr: float, alpha_first: bool) -> tuple[dict, GradHist2d]:
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    subs = [NormTest(), InnerTest(), OrthoTest(), MeanGSNR(), EarlyStopping(), Distance()]
    # first: alpha's projections share the others' pass; last: its own pass
    subs.insert(0 if alpha_first else len(subs), Alpha())
    hist = GradHist2d()
    for sub in [*subs, hist]:
        exporter.bus.register_subscriber(sub)
    mem = exporter.bus.add_backend(MemoryBackend())
    hists = {}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        assert hist.last is not None and exporter.global_step == step
        hists[step] = hist.last[0].clone()
    exporter.close()
    seen = {(r.tag, None, r.step): r.value for r in mem.scalars}
    return {"scalars": seen, "hists": hists}, hist


def _close(a: float, b: float, what: str) -> None:
    assert a == pytest.approx(b, rel=1e-4, abs=1e-7), what


@pytest.mark.parametrize("alpha_first", [False, True], ids=["alpha-last", "alpha-first"])
@pytest.mark.parametrize("make, shape", [(mlp, (10,)), (cnn, (2, 9, 9)), (sequence, (5, 6))],
                         ids=["mlp", "cnn", "sequence"])
def test_every_quantity_equals_cockpits_at_every_step(make, shape, alpha_first) -> None:
    data = batches(shape)
    lr = 0.5
    model = make()
    twin = copy.deepcopy(model)
    ours, _ = run_ikkuna(model, data, lr, alpha_first)
    theirs, _ = run_cockpit(twin, data, lr)
    scalars = ours["scalars"]
    names = [n for n, _ in model.named_parameters()]
    for step in range(len(data)):
        for mine, cls in SCALARS.items():
            _close(scalars[(mine, None, step)], theirs[step][cls], f"{mine} step {step}")
        if step < len(data) - 1:
            _close(scalars[("alpha", None, step)], theirs[step]["Alpha"], f"alpha step {step}")
        else:
            assert ("alpha", None, step) not in scalars  # known only at the next step
        for name, dist in zip(names, theirs[step]["Distance"], strict=True):
            module, _, kind = name.rpartition(".")
            tag = f"distance/{'weights' if kind == 'weight' else 'biases'}/{module}"
            _close(scalars[(tag, None, step)], dist, f"{tag} step {step}")
        hist = theirs[step]["GradHist2d"]["hist"]
        assert torch.equal(ours["hists"][step], torch.as_tensor(hist).to(torch.int64)), step
