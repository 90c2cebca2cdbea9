"""One of two real ``gloo`` processes on 127.0.0.1, started by tests/test_distributed.py as
``python tests/distributed_worker.py RANK PORT OUT_DIR``: a DDP run through ``ik.watch`` (with
``ranks = "rank0"``, then ``ranks = "all"``) and an FSDP2 (``fully_shard``) run. Each rank
saves what it published and the independent references next to it to ``OUT_DIR/rank<r>.pt``;
the test compares them. Everything on the CPU.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _spawn import WORLD, process_group
from torch import nn

CPU = torch.device("cpu")


class Recorder:
    """Built lazily (ikkuna_core is imported in the workers): a subscriber keeping clones."""

    @staticmethod
    def make(topics: list[str]) -> Any:
        import ikkuna_core as ik

        class _Recorder(ik.Subscriber):
            name = "recorder"

            def __init__(self, **options: object) -> None:
                super().__init__(**options)
                self.seen: dict[tuple[str, str | None, int], torch.Tensor] = {}

            def compute(self, bundle: ik.MessageBundle) -> None:
                for topic in bundle.topics:
                    data = bundle[topic]
                    assert data is not None
                    self.seen[(topic, bundle.key, bundle.global_step)] = data.detach().clone()

        return _Recorder(topics=topics)


def _mlp() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.ReLU(),
                         nn.Linear(8, 4)).to(CPU)


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)  # different data on each rank
    return torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


def _averaged(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean over the ranks of each rank's gradient, reduced by hand (the reference)."""
    out = {}
    for name, grad in grads.items():
        total = grad.clone()
        dist.all_reduce(total)
        out[name] = total / WORLD
    return out


def _local_grads(reference: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    reference.zero_grad()
    nn.functional.cross_entropy(reference(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in reference.named_parameters()}


def ddp(rank: int, out: Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel

    import ikkuna_core as ik

    net = _mlp()
    reference = copy.deepcopy(net)
    model = DistributedDataParallel(net)
    results: dict[str, Any] = {}
    for ranks in ("rank0", "all"):
        config = {
            "plugins": ["norms"], "backends": ["tensorboard"], "log_dir": str(out / ranks),
            "ranks": ranks, "subscribers": [{"name": "norm", "topics": ["weight_gradients"]}],
        }
        exporter = ik.watch(model, nn.CrossEntropyLoss(), config)
        recorder = exporter.bus.register_subscriber(Recorder.make(["weight_gradients"]))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        steps = []
        for step in range(2):
            x, y = _batch(step, rank)
            reference.load_state_dict(net.state_dict())
            local = _local_grads(reference, x, y)
            opt.zero_grad()
            exporter.loss_fn(model(x), y).backward()
            grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
            opt.step()
            steps.append({"local": local, "averaged": _averaged(local), "grads": grads})
        exporter.close()
        results[ranks] = {
            "steps": steps,
            "seen": recorder.seen,
            "backends": [type(b).__name__ for b in exporter.bus.backends],
        }
    return results


def fsdp(rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    import ikkuna_core as ik
    from ikkuna_core.testing import MemoryBackend
    from ikkuna_norms import Norm

    net = _mlp()
    reference = copy.deepcopy(net)
    for layer in (net[0], net[2], net[4]):
        fully_shard(layer)
    fully_shard(net)
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(net)
    recorder = exporter.bus.register_subscriber(
        Recorder.make(["weights", "weight_gradients", "weight_updates"])
    )
    exporter.bus.register_subscriber(Norm(topics=["weight_gradients"]))
    backend = exporter.bus.add_backend(MemoryBackend())
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    steps = []
    for step in range(2):
        x, y = _batch(step, rank)
        before = {n: p.full_tensor().detach().clone() for n, p in net.named_parameters()}
        reference.load_state_dict(before)
        local = _local_grads(reference, x, y)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        grads = {n: p.grad.full_tensor().clone() for n, p in net.named_parameters()}
        shard = {n: p.grad.to_local().clone() for n, p in net.named_parameters()}
        opt.step()
        after = {n: p.full_tensor().detach().clone() for n, p in net.named_parameters()}
        steps.append({"averaged": _averaged(local), "grads": grads, "shard": shard,
                      "before": before, "after": after})
    exporter.close()
    norms = {(r.tag, r.step): r.value for r in backend.scalars}
    return {"steps": steps, "seen": recorder.seen, "norms": norms}


if __name__ == "__main__":
    rank, port, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    os.environ["IKKUNA_PLUGINS"] = "norms"
    with process_group(rank, port):
        torch.save({"ddp": ddp(rank, out), "fsdp": fsdp(rank)}, out / f"rank{rank}.pt")
