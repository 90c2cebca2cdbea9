"""What does watching an FSDP2 model cost across ranks? Runs the problem of the large-model
issue on real ``torch.distributed`` processes (gloo, 127.0.0.1, CPU) and reports, per rank
and per step, the collective calls and bytes that watching adds, the peak memory it adds and
the step-time ratio to plain FSDP2 training measured in the same run.

    python benchmarks/distributed.py                  # 2 ranks, plain and norms (a minute)
    python benchmarks/distributed.py --steps 10 --variants plain,norms,norms-weights

The model: ``nn.Sequential`` of 8 blocks ``Linear(1024, 1024) + ReLU`` and a head
``Linear(1024, 10)`` (33 MB of float32 parameters), every block ``fully_shard``-ed, then the
root. A variant is plain training or training watched by an Exporter with the ``norm``
subscriber on the variant's topics and no backend (the cost of the metrics, not of writing).

Collectives are counted by a ``TorchDispatchMode`` around each step: FSDP2's own
collectives (``c10d::_allgather_base_``, ``c10d::_reduce_scatter_base_``) and DTensor's
functional ones (``_c10d_functional::all_gather_into_tensor``, ``all_reduce``, ...) go through
the dispatcher, so both are seen. A collective's bytes are the size of its largest tensor
(the gathered output of an all-gather, the full input of a reduce-scatter, the buffer of an
all-reduce). Peak memory added by watching: what the Exporter keeps between steps (its update
snapshots, ``exporter.snapshots``) plus the peak of the tensor memory allocated during
``optimizer.step()``, whose hooks are where watching reads the step and computes its metrics
(any gathered parameter is there), read from the CPU allocator's events (``torch.profiler``
with ``profile_memory``, the training thread's), minus plain's: deterministic, unlike a peak
over the whole step, whose frees of FSDP2's buffers happen in gloo's threads at varying
moments. It is reported beside one rank's shard of the watched
parameters (the target is at most 1.25 times that). Each rank's peak RSS (``ru_maxrss``) is
reported too (it also holds the imports, and moves by tens of MB from run to run). Timing:
the variants' process pairs run one after the other, each timing ``--steps`` steps after
``--warmup`` untimed ones and the counted one; the ratio is the median step over plain's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
WORLD = 2
BLOCKS = 8
WIDTH = 1024
#: variant -> the topics its ``norm`` subscriber reads (plain: no Exporter at all; exporter:
#: an Exporter without a subscriber)
VARIANTS: dict[str, tuple[str, ...] | None] = {
    "plain": None,
    "exporter": (),
    "norms": ("weights", "weight_gradients", "weight_updates"),
    "norms-weights": ("weights",),
    "norms-gradients": ("weight_gradients",),
}
#: dispatcher namespaces of collectives; their bookkeeping ops are not collectives
_NAMESPACES = ("c10d", "_c10d_functional")
_NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd", "barrier")


class CollectiveCounter(TorchDispatchMode):
    """Counts the collectives dispatched under it and the bytes of each (its largest tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = f"{func.namespace}.{func.__name__.split('.')[0]}"
        if func.namespace in _NAMESPACES and not any(n in name for n in _NOT_COLLECTIVES):
            sizes = [t.numel() * t.element_size() for t in _tensors((args, kwargs, out))]
            self.calls[name] += 1
            self.bytes[name] += max(sizes, default=0)
        return out


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def build_model() -> nn.Module:
    """The benchmark's model, the same initial weights on every rank, sharded with FSDP2."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(BLOCKS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(WIDTH, 10))
    for block in net[: 2 * BLOCKS : 2]:
        fully_shard(block)
    fully_shard(net)
    return net


def _watch(net: nn.Module, topics: tuple[str, ...]) -> Any:
    """An Exporter with one ``norm`` subscriber on ``topics`` (none if empty), no backend."""
    import ikkuna_core as ik
    from ikkuna_norms.subscribers import Norm

    exporter = ik.Exporter(net, bus=ik.MessageBus(on_error="raise"))
    if topics:
        exporter.subscribe(Norm(topics=list(topics)))
    return exporter


def _worker(rank: int, port: int, variant: str, warmup: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=dt.timedelta(seconds=120),
    )
    try:
        net = build_model()
        topics = VARIANTS[variant]
        exporter = None if topics is None else _watch(net, topics)
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(32, WIDTH, generator=g)
        y = torch.randint(0, 10, (32,), generator=g)

        def step(profile: bool = False) -> int:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            if not profile:
                opt.step()
                return 0
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                        profile_memory=True) as prof:
                opt.step()  # the optimizer's hooks: where watching reads and computes
            return _peak_allocated(prof)

        for _ in range(warmup):
            step()
        counter = CollectiveCounter()
        with counter:
            step()
        held = sum(t.numel() * t.element_size() for t in (exporter.snapshots if exporter else []))
        peak_tensors = step(profile=True) + held
        times = []
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        if exporter is not None:
            exporter.close()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        shard = sum(p.to_local().numel() * p.element_size() for p in net.parameters())
        watched = sum(p.to_local().numel() * p.element_size()
                      for name, p in net.named_parameters() if name.endswith("weight"))
        result = {
            "calls": dict(counter.calls), "bytes": dict(counter.bytes), "times": times,
            "peak_rss": peak, "shard_bytes": shard, "watched_shard_bytes": watched,
            "peak_tensors": peak_tensors,
        }
        Path(out, f"{variant}-rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _peak_allocated(prof: Any) -> int:
    """The peak of the bytes allocated (less those freed) over a profile's memory events of
    the training thread (gloo's own threads allocate at varying moments)."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    if not events:
        return 0
    main = Counter(e.start_thread_id() for e in events).most_common(1)[0][0]
    events = [e for e in events if e.start_thread_id() == main]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_variant(variant: str, warmup: int, steps: int) -> list[dict[str, Any]]:
    """One pair of gloo processes for ``variant``; returns each rank's measurements."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(_free_port(), variant, warmup, steps, tmp), nprocs=WORLD)
        return [json.loads(Path(tmp, f"{variant}-rank{r}.json").read_text()) for r in range(WORLD)]


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant and rank: what it adds over plain (calls, bytes, peak RSS) and its ratio."""
    plain = results["plain"]
    rows: dict[str, Any] = {}
    for variant, ranks in results.items():
        rows[variant] = []
        for r, (mine, base) in enumerate(zip(ranks, plain, strict=True)):
            ratio = statistics.median(mine["times"]) / statistics.median(base["times"])
            rows[variant].append({
                "rank": r,
                "calls": sum(mine["calls"].values()),
                "calls_added": sum(mine["calls"].values()) - sum(base["calls"].values()),
                "bytes_added": sum(mine["bytes"].values()) - sum(base["bytes"].values()),
                "peak_rss_added": mine["peak_rss"] - base["peak_rss"],
                "peak_tensors_added": mine["peak_tensors"] - base["peak_tensors"],
                "shard_bytes": mine["shard_bytes"],
                "watched_shard_bytes": mine["watched_shard_bytes"],
                "ratio": ratio,
                "by_collective": {k: [mine["calls"][k], mine["bytes"][k]] for k in mine["calls"]},
            })
    return rows


def _table(rows: dict[str, Any]) -> str:
    lines = ["| variant | rank | collectives | added | bytes added | peak tensor memory added "
             "(x watched shard) | peak RSS added (MB) | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, ranks in rows.items():
        for row in ranks:
            lines.append(
                f"| {variant} | {row['rank']} | {row['calls']} | {row['calls_added']} | "
                f"{_size(row['bytes_added'])} | {row['peak_tensors_added'] / 2**20:.1f} MiB "
                f"({row['peak_tensors_added'] / row['watched_shard_bytes']:.2f}x) | "
                f"{row['peak_rss_added'] / 1e6:.0f} | {row['ratio']:.2f} |"
            )
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if abs(n) >= 2**20 else f"{n} B"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="plain,norms",
                        help=f"comma-separated, of {', '.join(VARIANTS)} (plain always runs)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default benchmarks/results/<machine>-<date>-"
                        "distributed.json)")
    args = parser.parse_args(argv)
    variants = ["plain", *[v for v in args.variants.split(",") if v and v != "plain"]]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    results = {}
    for v in variants:
        print(f"running {v} on {WORLD} ranks", file=sys.stderr)
        results[v] = run_variant(v, args.warmup, args.steps)
    rows = summarise(results)
    print(_table(rows))
    report = {
        "date": dt.date.today().isoformat(), "torch": torch.__version__,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "world_size": WORLD, "warmup": args.warmup, "steps": args.steps,
        "summary": rows, "raw": results,
    }
    out = args.out or HERE / "results" / (
        f"cpu{os.cpu_count()}-{report['date']}-distributed.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
