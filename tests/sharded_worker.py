"""Sharded training watched without gathering, on two real ``gloo`` processes (127.0.0.1,
CPU), started by tests/test_distributed_sharded.py as ``python tests/sharded_worker.py RANK
PORT OUT_DIR all|failing`` (tests/_spawn.py). Each rank runs the scenarios below, counts the
collectives each training step issues (a ``TorchDispatchMode`` over the dispatcher's
``c10d``/``_c10d_functional`` ops) with and without watching, records what was published
(an in-memory backend) and the references computed here, independently, from the full
tensors (``full_tensor()`` gathered by the test itself, outside the counted steps), and
saves it all to ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _spawn import WORLD, process_group
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

STEPS = 3
_NAMESPACES = ("c10d", "_c10d_functional")
_NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd", "barrier")


class Collectives(TorchDispatchMode):
    """Counts the collectives dispatched under it, by name, and their bytes (the largest
    tensor of each call)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = f"{func.namespace}.{func.__name__.split('.')[0]}"
        if func.namespace in _NAMESPACES and not any(n in name for n in _NOT_COLLECTIVES):
            self.calls[name] += 1
            sizes = [t.numel() * t.element_size() for t in _tensors((args, kwargs, out))]
            self.bytes += max(sizes, default=0)
        return out


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _mlp(blocks: int = 3, width: int = 32) -> nn.Sequential:
    torch.manual_seed(0)  # the same initial weights on every rank
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 5))


def _fsdp(mixed: bool = False) -> nn.Sequential:
    """The issue's FSDP2 problem, small: every block ``fully_shard``-ed, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    net = _mlp()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if mixed else MixedPrecisionPolicy()
    for block in net[:6:2]:
        fully_shard(block, mp_policy=policy)
    fully_shard(net, mp_policy=policy)
    return net


def _tensor_parallel() -> nn.Module:
    """A two-layer MLP split over the ranks: ``ColwiseParallel`` then ``RowwiseParallel``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 6))
    mesh = init_device_mesh("cpu", (WORLD,))
    return parallelize_module(net, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


def _batch(step: int, rank: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, width, generator=g), torch.randint(0, 5, (8,), generator=g)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _train(
    net: nn.Module, subscribers: list[Any], width: int, same_batch: bool = False,
    steps_: int = STEPS, on_error: str = "raise",
) -> dict[str, Any]:
    """STEPS steps of SGD; per step the collectives, and (watched) the full weights before and
    after the step and the full gradients, gathered here outside the counted step."""
    import ikkuna_core as ik
    from ikkuna_core.testing import MemoryBackend

    rank = dist.get_rank()
    backend = MemoryBackend()
    exporter = None
    if subscribers:
        exporter = ik.Exporter(net, bus=ik.MessageBus(on_error=on_error))
        exporter.add_backend(backend)
        for s in subscribers:
            exporter.subscribe(s)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    steps: list[dict[str, Any]] = []
    for step in range(steps_):
        x, y = _batch(step, 0 if same_batch else rank, width)
        before = {n: _full(p) for n, p in net.named_parameters()}
        counter = Collectives()
        with counter:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        steps.append({
            "calls": dict(counter.calls), "bytes": counter.bytes, "before": before,
            "after": {n: _full(p) for n, p in net.named_parameters()},
            "grads": {n: _full(p.grad) for n, p in net.named_parameters() if p.grad is not None},
            "dtypes": {n: (p.dtype, None if p.grad is None else p.grad.dtype)
                       for n, p in net.named_parameters()},
        })
    if exporter is not None:
        exporter.close()
    return {
        "steps": steps,
        "scalars": {(r.tag, r.step): r.value for r in backend.scalars},
        "histograms": {(r.tag, r.step): r for r in backend.histograms},
        "seen": {k: v for s in subscribers for k, v in getattr(s, "seen", {}).items()},
    }


def _recorder(topics: list[str], merge: bool) -> Any:
    """A subscriber keeping clones of what it receives: local shards (``sharded = "merge"``)
    or full tensors (the default)."""
    import ikkuna_core as ik

    class Recorder(ik.Subscriber):
        name = "merge_recorder" if merge else "recorder"
        sharded = "merge" if merge else "gather"

        def __init__(self, **options: object) -> None:
            super().__init__(**options)
            self.seen: dict[tuple[str, str, str | None, int], torch.Tensor] = {}

        def compute_step(self, step: ik.StepBundle) -> None:
            for topic in step.topics:
                for key, t in zip(step[topic].keys, step[topic].tensors(), strict=True):
                    self.seen[(self.name, topic, key, step.global_step)] = t.detach().clone()

    return Recorder(topics=topics)


def _scenarios() -> dict[str, Callable[[], dict[str, Any]]]:
    from ikkuna_histograms.subscribers import DeadFraction, Histogram
    from ikkuna_norms.subscribers import GlobalNorm, Mean, Norm, Ratio, SpectralNorm, Variance

    three = ["weights", "weight_gradients", "weight_updates"]
    return {
        "fsdp_plain": lambda: _train(_fsdp(), [], 32),
        "fsdp_norms": lambda: _train(_fsdp(), [Norm(topics=three)], 32),
        "fsdp_stats": lambda: _train(_fsdp(), [
            Histogram(topics=["weights", "weight_gradients"], bins=16, max_samples=0),
            Mean(topics=["weights"]), Variance(topics=["weight_gradients"]),
            GlobalNorm(), Norm(topics=["weight_updates"], p="inf"),
            DeadFraction(topics=["weight_gradients"], module_types=[]),
            Ratio(topics=["norm/weight_updates", "mean/weights"]),  # reads merged results
        ], 32),
        "fsdp_spectral": lambda: _train(_fsdp(), [
            Norm(topics=["weights"]), SpectralNorm(topics=["weights"], subsample=2),
        ], 32),
        "fsdp_mixed_plain": lambda: _train(_fsdp(mixed=True), [], 32),
        "fsdp_mixed": lambda: _train(_fsdp(mixed=True), [
            Norm(topics=three), _recorder(three, merge=True),
        ], 32),
        "fsdp_mixed_gathered": lambda: _train(_fsdp(mixed=True), [_recorder(three, merge=False)],
                                              32),
        "tp_plain": lambda: _train(_tensor_parallel(), [], 12, same_batch=True),
        "tp_norms": lambda: _train(_tensor_parallel(), [
            Norm(topics=[*three, "bias_gradients"]),
            Histogram(topics=["weights"], bins=8, max_samples=0),
        ], 12, same_batch=True),
    }


def _warned(subscribers: list[Any], steps: int) -> dict[str, Any]:
    """The FSDP2 model trained ``steps`` steps with ``subscribers`` and ``on_error = "warn"``:
    what ``_train`` returns, and what was warned."""
    import warnings

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = _train(_fsdp(), subscribers, 32, steps_=steps, on_error="warn")
    return {**result, "warnings": [str(w.message) for w in said]}


def _failing() -> dict[str, Any]:
    """Merging subscribers that fail on rank 1 only (``on_error = "warn"``): one in its
    ``compute_step`` at step 1, before its partial; one in its merge callback (publishing) at
    step 2; beside them a norm and a histogram that must go on, merged, on both ranks."""
    from ikkuna_histograms.subscribers import Histogram
    from ikkuna_norms.subscribers import Norm

    rank = dist.get_rank()

    class FailsInCompute(Norm):
        name = "fails_in_compute"

        def compute_step(self, step: Any) -> None:
            if rank == 1 and step.global_step == 1:
                raise RuntimeError("planted failure in compute_step on rank 1")
            super().compute_step(step)

    class FailsInMerge(Norm):
        name = "fails_in_merge"

        def publish_scalars(self, step: Any, *args: Any, **kwargs: Any) -> None:
            if rank == 1 and step.global_step == 2:
                raise RuntimeError("planted failure in the merge callback on rank 1")
            super().publish_scalars(step, *args, **kwargs)

    return _warned([
        FailsInCompute(topics=["weights"]), Norm(topics=["weight_gradients"]),
        FailsInMerge(topics=["weight_updates"]),
        Histogram(topics=["weights"], bins=8, max_samples=0),
    ], steps=4)


def _failing_merges(final_at: int, edges_at: int, steps: int) -> dict[str, Any]:
    """Merge callbacks failing on rank 1 only where rank 1 has nothing else to merge: the
    last one of step ``final_at`` and a histogram's edges at step ``edges_at``, after which
    rank 0 merges again (its counts)."""
    from ikkuna_histograms.subscribers import Histogram
    from ikkuna_norms.subscribers import Norm

    rank = dist.get_rank()

    class FailsInFinal(Norm):
        name = "fails_in_final"

        def publish_scalars(self, step: Any, *args: Any, **kwargs: Any) -> None:
            if rank == 1 and step.global_step == final_at:
                raise RuntimeError("planted failure in the last merge callback on rank 1")
            super().publish_scalars(step, *args, **kwargs)

    class FailsInEdges(Histogram):
        name = "fails_in_edges"

        def merge_shards(self, step: Any, partial: Any, then: Any, **kwargs: Any) -> None:
            if kwargs.get("op") == "max" and rank == 1 and step.global_step == edges_at:
                def then(merged: Any) -> None:
                    raise RuntimeError("planted failure in the edges' merge callback on rank 1")
            super().merge_shards(step, partial, then, **kwargs)

    return _warned([
        Norm(topics=["weight_gradients"]), FailsInFinal(topics=["weights"]),
        FailsInEdges(topics=["weights"], bins=8, max_samples=0),
    ], steps=steps)


def _failing_late() -> dict[str, Any]:
    """Step 1's last callback (told in the next step's round) and step 4's edges (the
    step's rounds known from step 3)."""
    return _failing_merges(final_at=1, edges_at=4, steps=5)


def _failing_first() -> dict[str, Any]:
    """Both at the very first step, where the rounds of these subscriptions are not known
    yet."""
    return _failing_merges(final_at=0, edges_at=0, steps=3)


def _failing_reader() -> dict[str, Any]:
    """A subscriber that reads a merging one's results (``norm/weights``, not itself
    merging) fails on rank 1 only at step 0 and is disabled there alone. Step 1 is the
    first of the merging subscriptions without the mean (due every 2nd step): rank 0 settles
    before the reader, which rank 1 no longer runs; both must take part in as many rounds."""
    import ikkuna_core as ik
    from ikkuna_norms.subscribers import Mean, Norm

    rank = dist.get_rank()

    class FailsReading(ik.Subscriber):
        name = "fails_reading"

        def compute_step(self, step: Any) -> None:
            if rank == 1 and step.global_step == 0:
                raise RuntimeError("planted failure in a reader on rank 1")

    return _warned([
        Norm(topics=["weights"]), Mean(topics=["weights"], subsample=2),
        FailsReading(topics=["norm/weights"]),
    ], steps=4)


def main() -> None:
    rank, port, out, which = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    # a collective one rank never issues fails the other after 20 s (the failing scenario)
    with process_group(rank, port, timeout=120 if which == "all" else 20):
        scenarios = _scenarios() if which == "all" else {
            "failing": _failing, "failing_late": _failing_late, "failing_first": _failing_first,
            "failing_reader": _failing_reader}
        results = {name: run() for name, run in scenarios.items()}
        torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
