"""What does DDP work sharing save? Two gloo ranks on 127.0.0.1 (CPU, one thread each) train
the same DDP model three ways in one process pair, in alternating rounds: plain, watched
with every rank computing every metric (sharing off: what one rank does alone), and watched
with the ranks sharing the parameter topics' work (the default under DDP). Reported per rank:
the aten ops the subscribers run in a step and the elements those ops read (counted at one
step after the warm-up, outside the timed steps), and the median step time of each, as a
ratio to plain's.

    python benchmarks/ddp_share.py                    # 4 subscriptions, 2 ranks (a minute)
    python benchmarks/ddp_share.py --rounds 8 --steps 4 --out results.json

The model: ``nn.Sequential`` of 6 blocks ``Linear(512, 512) + ReLU`` and a head (6.3 MB of
float32 parameters), batch 32 per rank. The subscribers: ``norm`` and ``histogram`` (64 bins,
every entry) on ``weights`` and on ``weight_gradients``, four subscriptions (a norm and a
histogram per topic), no backend.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

WORLD = 2
BLOCKS, WIDTH, BATCH = 6, 512, 32
VARIANTS = ("plain", "alone", "shared")


class _Count(TorchDispatchMode):
    """The aten ops run inside it and the elements of their tensor arguments (counted here,
    independently of the Exporter's own count that places the work); ``on``: whether the
    subscribers count at all."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.elements = 0
        self.on = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops += 1
        self.elements += sum(a.numel() for a in tree_leaves((args, kwargs or {}))
                             if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def _model() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(BLOCKS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10))


def _trainer(variant: str) -> tuple[Any, Any, _Count | None]:
    """A DDP model, its optimizer and (watched) the counter its subscribers' ops go to."""
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if variant == "plain":
        return model, opt, None
    import ikkuna_core as ik
    from ikkuna_histograms import Histogram
    from ikkuna_norms import Norm

    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    if variant == "alone":
        exporter.bus.merges.ddp = None
    counter = _Count()
    for topic in ("weights", "weight_gradients"):
        for sub in (Norm(topics=[topic]), Histogram(topics=[topic], bins=64, max_samples=0)):
            compute = sub.compute_step

            def counted(bundle: Any, compute: Any = compute) -> None:
                if counter.on:
                    with counter:
                        compute(bundle)
                else:
                    compute(bundle)

            sub.compute_step = counted  # type: ignore[method-assign]
            exporter.bus.subscribe(sub)
    return model, opt, counter


def _step(model: Any, opt: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    dist.barrier()
    start = time.perf_counter()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - start


def _worker(rank: int, port: int, rounds: int, steps: int, warmup: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=dt.timedelta(seconds=120))
    try:
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(BATCH, WIDTH, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
        trainers = {v: _trainer(v) for v in VARIANTS}
        for model, opt, _ in trainers.values():
            for _ in range(warmup):
                _step(model, opt, x, y)
        counts = {}
        for v, (model, opt, counter) in trainers.items():
            if counter is not None:
                counter.on = True
                _step(model, opt, x, y)
                counter.on = False
                counts[v] = {"ops": counter.ops, "elements": counter.elements}
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(rounds):
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for v in order:
                model, opt, _ = trainers[v]
                times[v] += [_step(model, opt, x, y) for _ in range(steps)]
        Path(out, f"rank{rank}.json").write_text(json.dumps(
            {"counts": counts, "median_ms": {v: statistics.median(t) * 1e3
                                             for v, t in times.items()}}))
        dist.barrier()  # both ranks done before the group goes
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4, help="steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(_free_port(), args.rounds, args.steps, args.warmup, out),
                 nprocs=WORLD, join=True)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]
    print("| rank | ops alone | ops shared | elements alone | elements shared "
          "| alone / plain | shared / plain |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r, res in enumerate(ranks):
        c, t = res["counts"], res["median_ms"]
        print(f"| {r} | {c['alone']['ops']} | {c['shared']['ops']} | "
              f"{c['alone']['elements']:,} | {c['shared']['elements']:,} | "
              f"{t['alone'] / t['plain']:.3f} | {t['shared'] / t['plain']:.3f} |")
    if args.out:
        info = {"machine": platform.machine(), "python": platform.python_version(),
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
                "argv": sys.argv[1:]}
        args.out.write_text(json.dumps({"info": info, "ranks": ranks}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
