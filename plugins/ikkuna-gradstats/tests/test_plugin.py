"""The plugin as a run uses it: enabled by name from a configuration, no host
synchronisation in its path, ``subsample`` honoured, and few aten operators per step (the
deterministic stand-in for its cost; the timings are in benchmarks/overhead.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend

ALL = ["norm_test", "inner_test", "ortho_test", "mean_gsnr", "early_stopping", "alpha",
       "distance", "grad_hist_2d"]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture(autouse=True)
def _only_gradstats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IKKUNA_PLUGINS", "gradstats")


def _watched(
    model: nn.Module, subscribers: list[dict], flush_every: int = 1
) -> tuple[ik.Exporter, MemoryBackend]:
    pytest.importorskip("ikkuna_gradstats")
    exporter = ik.watch(model, nn.CrossEntropyLoss(), {
        "plugins": ["gradstats"], "backends": [], "subscribers": subscribers,
        "on_error": "raise", "flush_every": flush_every,
    })
    return exporter, exporter.bus.add_backend(MemoryBackend())


def _train(exporter: ik.Exporter, model: nn.Module, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        exporter.loss_fn(model(x), y).backward()
        opt.step()


def test_every_subscriber_is_enabled_by_name_and_publishes() -> None:
    model = mlp()
    exporter, mem = _watched(model, [{"name": n} for n in ALL])
    _train(exporter, model, 3)
    exporter.close()
    tags = mem.tags()
    for name in ("norm_test", "inner_test", "ortho_test", "mean_gsnr", "early_stopping", "alpha"):
        assert name in tags
    assert {"distance/weights/0", "distance/biases/2"} <= tags
    hists = [r for r in mem.histograms if r.tag.startswith("grad_hist_2d/param[")]
    assert hists and sum(r.num for r in hists if r.step == 0) > 0
    for r in hists:  # each parameter bin's gradients: counts, and min/max inside the edges
        assert r.num == r.counts.sum()
        if r.num:
            lo, hi = r.edges[r.counts.nonzero()[0][0]], r.edges[r.counts.nonzero()[0][-1] + 1]
            assert lo <= r.min <= r.max <= hi
    assert [r.step for r in mem.scalars if r.tag == "alpha"] == [0, 1]  # step 2's: at 3


def test_no_host_synchronisation(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    # no flush until close: the backends' one device-to-host copy per flush is not ours
    exporter, mem = _watched(model, [{"name": n} for n in ALL], flush_every=1000)

    def forbidden(*a, **k):
        raise AssertionError("host synchronisation in gradstats")

    for name in ("item", "cpu", "tolist", "numpy", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    _train(exporter, model, 3)
    monkeypatch.undo()
    exporter.close()
    assert mem.scalar("norm_test", 2) > 0


def test_subsample_applies() -> None:
    model = mlp()
    exporter, mem = _watched(model, [{"name": "norm_test", "subsample": 2},
                                     {"name": "ortho_test", "publish_as": "every"}])
    _train(exporter, model, 5)
    exporter.close()
    assert [r.step for r in mem.scalars if r.tag == "norm_test"] == [0, 2, 4]
    assert [r.step for r in mem.scalars if r.tag == "every"] == [0, 1, 2, 3, 4]


def test_alpha_refuses_subsample() -> None:
    from ikkuna_gradstats import Alpha

    with pytest.raises(ValueError, match=r"consecutive steps .*subsample must be 1"):
        Alpha(subsample=2)


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_few_aten_ops_per_step() -> None:
    """norm_test, inner_test and ortho_test share one pass: a handful of operators per layer,
    whatever the batch size; all eight subscribers stay within a few hundred."""
    counts = {}
    for chosen in (["norm_test"], ["norm_test", "inner_test", "ortho_test"], ALL):
        model = mlp()
        exporter, _ = _watched(model, [{"name": n} for n in chosen])
        _train(exporter, model, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        with _Ops() as ops:
            opt.zero_grad()
            exporter.loss_fn(model(x), y).backward()
            opt.step()
        exporter.close()
        counts[len(chosen)] = ops.count
    plain_model = mlp()
    opt = torch.optim.SGD(plain_model.parameters(), lr=0.1)
    with _Ops() as ops:
        opt.zero_grad()
        nn.CrossEntropyLoss()(plain_model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
        opt.step()
    added = {k: v - ops.count for k, v in counts.items()}
    print("aten ops added per step:", added)
    assert 0 < added[1] <= 80  # two Linear layers: norms, products, formula, publishing
    assert added[3] - added[1] <= 60  # the two other tests reuse the pass: formulas only
    assert added[len(ALL)] <= 620  # measured 72, 123, 572
