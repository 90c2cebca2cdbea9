"""One of two gloo ranks for tests/test_ddp_share.py. A DDP model watched

- with ``norm`` and ``histogram`` on parameter topics, once sharing the work (the default
  under DDP) and once with sharing off (what one rank does alone): the aten ops and the
  elements they read inside the subscribers' ``compute_step`` at each step, the exchange's
  collectives, the published scalars and histograms, and the norms of ``p``/``p.grad``
  computed here (for three sets of subscribers: unequal, equal, a spectral norm alone);
- with ``ddp_forward = "merge"`` and ``norm``/``mean``/``histogram`` on activations, beside
  a plain twin model trained on the global batch (both ranks' batches, concatenated);
- with a shareable subscriber that fails on rank 1 only (``on_error = "warn"``): the run
  must go on on both ranks (no rank left waiting in the exchange).
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from _spawn import process_group
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend


class _Count(TorchDispatchMode):
    """Per step: the aten ops run and the input elements they read (the work, as ops batch
    over keys)."""

    def __init__(self) -> None:
        super().__init__()
        self.step = 0
        self.ops: dict[int, int] = {}
        self.elements: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[self.step] = self.ops.get(self.step, 0) + 1
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        read = sum(a.numel() for a in flat if isinstance(a, torch.Tensor))
        self.elements[self.step] = self.elements.get(self.step, 0) + read
        return func(*args, **(kwargs or {}))


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(16, 16) for _ in range(6)])


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(10 * step + rank))


def _records(backend: MemoryBackend) -> dict[str, Any]:
    return {"scalars": {(r.tag, r.step): r.value for r in backend.scalars},
            "hists": {(h.tag, h.step): (h.counts.tolist(), h.edges.tolist(), h.num, h.sum)
                      for h in backend.histograms}}


def _trained(
    watched: nn.Module, config: dict[str, Any], batch: Any, steps: int
) -> tuple[ik.Exporter, MemoryBackend, list[str]]:
    """``watched`` watched with ``config``, trained ``steps`` steps on ``batch(step)``: its
    exporter, what an in-memory backend received, and what was warned."""
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        exporter = ik.watch(watched, config=config)
        backend = MemoryBackend()
        exporter.bus.attach_backend(backend)
        opt = torch.optim.SGD(watched.parameters(), lr=0.1)
        for step in range(steps):
            opt.zero_grad()
            watched(batch(step)).pow(2).mean().backward()
            opt.step()
        exporter.close()
    return exporter, backend, [str(w.message) for w in said]


def _one_each() -> list[Any]:
    """Two subscriptions of unequal size: norms on two topics, a histogram on one."""
    from ikkuna_histograms import Histogram
    from ikkuna_norms import Norm

    return [Norm(topics=["weights", "weight_gradients"]), Histogram(topics=["weight_gradients"])]


def _per_topic() -> list[Any]:
    """Four subscriptions of equal size: a norm and a histogram per topic."""
    from ikkuna_histograms import Histogram
    from ikkuna_norms import Norm

    return [cls(topics=[topic]) for cls in (Norm, Histogram)
            for topic in ("weights", "weight_gradients")]


def _spectral() -> list[Any]:
    """One subscription, split by keys after its first step (a rank's share of the keys
    goes on from the vectors iterated at that step)."""
    from ikkuna_norms import SpectralNorm

    return [SpectralNorm(topics=["weights"], block=1, iterations=1, warmup_iterations=4)]


def parameters(rank: int, share: bool, subscribers: Any = _one_each) -> dict[str, Any]:
    net = _net()
    model = DistributedDataParallel(net)
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    if not share:
        exporter.bus.merges.ddp = None
    counter = _Count()
    for sub in subscribers():
        compute = sub.compute_step

        def counted(bundle: Any, compute: Any = compute) -> None:
            counter.step = bundle.global_step
            with counter:
                compute(bundle)

        sub.compute_step = counted  # type: ignore[method-assign]
        exporter.bus.subscribe(sub)
    backend = MemoryBackend()
    exporter.bus.attach_backend(backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    refs = {}
    for step in range(3):
        opt.zero_grad()
        model(_batch(step, rank)).pow(2).mean().backward()
        for i, layer in enumerate(net):
            refs[(f"norm/weight_gradients/{i}", step)] = float(layer.weight.grad.norm())
        opt.step()
        for i, layer in enumerate(net):  # the weights a step publishes: after its update
            refs[(f"norm/weights/{i}", step)] = float(layer.weight.detach().norm())
    exporter.close()
    share_ = exporter.bus.merges.ddp
    # step 0: every rank computes and counts every sharing subscription; then its share (step
    # 1 is a histogram's first call on its share of the keys: new buffers, more ops)
    return {"ops": counter.ops.get(2, 0), "elements": counter.elements.get(2, 0),
            "first": (counter.ops.get(0, 0), counter.elements.get(0, 0)), "refs": refs,
            "collectives": share_.collectives if share_ is not None else 0,
            **_records(backend)}


def forward(rank: int, out: Path) -> dict[str, Any]:
    """Activation statistics merged across the ranks, and those of a plain twin trained on
    the global batch (DDP averages the ranks' gradients: the twin's mean loss over both
    batches has the same gradient, so the two models stay equal)."""
    net = _net()
    twin = copy.deepcopy(net)
    model = DistributedDataParallel(net)
    subscribers = [{"name": name, "topics": ["activations"]}
                   for name in ("norm", "mean", "histogram")]
    results = {}
    for which, watched in (("merged", model), ("twin", twin)):
        config = {"plugins": ["norms", "histograms"], "log_dir": str(out / f"{which}{rank}"),
                  "ddp_forward": "merge", "on_error": "raise", "subscribers": subscribers}

        def batch(step: int, which: str = which) -> torch.Tensor:
            return (_batch(step, rank) if which == "merged"
                    else torch.cat([_batch(step, 0), _batch(step, 1)]))

        _, backend, said = _trained(watched, config, batch, steps=3)
        results[which] = {**_records(backend), "warnings": said}
    return results


def failing(rank: int) -> dict[str, Any]:
    from ikkuna_norms import Norm

    class FailsOnRank1(Norm):
        name = "fails_on_rank1"

        def compute_step(self, step: Any) -> None:
            if rank == 1 and step.global_step == 0:  # both ranks compute it at its first
                raise RuntimeError("planted failure on rank 1")
            super().compute_step(step)

    model = DistributedDataParallel(_net())
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="warn"))
    exporter.set_model(model)
    exporter.bus.subscribe(FailsOnRank1(topics=["weights"]))
    exporter.bus.subscribe(Norm(topics=["weight_gradients"]))
    backend = MemoryBackend()
    exporter.bus.attach_backend(backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for step in range(4):
            opt.zero_grad()
            model(_batch(step, rank)).pow(2).mean().backward()
            opt.step()
        exporter.close()
    return {**_records(backend), "warnings": [str(w.message) for w in said]}


def budgeted(rank: int, out: Path) -> dict[str, Any]:
    """A budget far below what ``norm`` costs: in one process it would slow the norm down
    (tests/test_budget.py); here the cadence stays the configured one on both ranks."""
    model = DistributedDataParallel(_net())
    config = {"plugins": ["norms"], "log_dir": str(out / f"budget{rank}"), "budget": 1e-6,
              "subscribers": [{"name": "norm", "topics": ["weights", "weight_gradients"]}]}
    exporter, backend, said = _trained(model, config, lambda step: _batch(step, rank), steps=20)
    steps = sorted({r.step for r in backend.scalars if r.tag.startswith("norm/")})
    return {"steps": steps, "cadences": [s.subsample for s in exporter.bus.subscriptions],
            "warnings": said}


if __name__ == "__main__":
    rank, port, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    with process_group(rank, port):
        torch.save({"shared": parameters(rank, True), "alone": parameters(rank, False),
                    "per_topic": {"shared": parameters(rank, True, _per_topic),
                                  "alone": parameters(rank, False, _per_topic)},
                    "spectral": {"shared": parameters(rank, True, _spectral),
                                 "alone": parameters(rank, False, _spectral)},
                    "forward": forward(rank, out), "failing": failing(rank),
                    "budgeted": budgeted(rank, out)},
                   out / f"rank{rank}.pt")
