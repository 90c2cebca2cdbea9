"""The fixed cost of watching a small step, measured in one process.

``overhead.py`` times each variant in its own worker process, which is right for the
memory and for large steps; on a 3 ms step (the MLP) its ratios are dominated by the
machine's noise between processes (its ``plain-again`` reads 1.0-1.2 on the shared 2-core
CPU). Here two copies of the same model train in the same process, one plain and one
watched, in alternating blocks of steps, and the ratio is of the medians of their blocks'
CPU times: what watching adds to one step, in microseconds, within a few percent.

    python benchmarks/fixed_cost.py                       # MLP, the budget variants
    python benchmarks/fixed_cost.py --variants exporter,all,all-budget --blocks 40
    python benchmarks/fixed_cost.py --problem resnet18 --batch-size 32 --warmup 100 \
        --blocks 10 --steps 4                             # overhead.py's other problems
    python benchmarks/fixed_cost.py --problem resnet18 --batch-size 32 --variants health \
        --threads 2 --clock wall --warmup 10 --blocks 60 --steps 1   # one step at a time
    python benchmarks/fixed_cost.py ... --malloc retain   # the allocator keeps freed memory

Each block also counts the minor page faults it took (``getrusage``). On the CPU, glibc's
allocator hands large freed blocks back to the system and faults them in again on the next
allocation (4 KiB at a time, zeroed by the kernel); how often depends on the order and sizes
of all the process's allocations, not on the work of either copy. On CIFAR ResNet-18,
batch 32 (2026-12-04): plain training alone, in a process of its own, took 10,000-25,000
faults a step from run to run (40-100 MB); here, with `health`, 3,000-6,000 a plain step
and 16,000 a watched one, and `health` read 1.10x; with ``--malloc retain`` no step
faulted and it read 1.06x. ``--malloc retain`` sets glibc's trim and mmap thresholds
(``mallopt``) so that freed memory stays in the process: the ratio is then of the work
alone, which is what Ikkuna can change.

The variants are those of ``overhead.py`` (the same subscribers and configuration keys).
Writes a JSON file with every block's time (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import overhead

DEFAULT_VARIANTS = "exporter,all-sub10,all-budget,quickstart-budget"


#: glibc's mallopt parameters: M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def retain_freed_memory() -> None:
    """glibc keeps freed memory in the process: no trimming of the heap's top (the largest
    threshold an ``int`` holds) and blocks of up to 32 MiB (glibc's largest mmap threshold)
    from the heap, so none is handed back and faulted in again."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        done = (libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)
                and libc.mallopt(_M_MMAP_THRESHOLD, 1 << 25))
    except (OSError, AttributeError) as exc:
        raise SystemExit(f"--malloc retain needs glibc's mallopt: {exc}") from exc
    if not done:
        raise SystemExit("--malloc retain: glibc's mallopt refused the thresholds")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def mlp() -> nn.Module:
    """overhead.py's MLP problem: 784-256-128-10."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )


def python_calls(model: nn.Module, opt: Any, fn: Any, x: Any, y: Any, n: int) -> float:
    """Python function calls per training step (C functions included), counted with
    ``sys.setprofile`` over ``n`` steps: a deterministic proxy for the host time Ikkuna's
    hooks take, which the timings above can only estimate on a shared machine."""
    count = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profile)
    try:
        for _ in range(n):
            opt.zero_grad()
            fn(model(x), y).backward()
            opt.step()
    finally:
        sys.setprofile(None)
    return count / n


def measure(variant: str, *, blocks: int, steps: int, warmup: int, batch: int,
            problem: str = "mlp", clock: str = "cpu") -> dict[str, Any]:
    """Plain and watched block times (seconds per step: of CPU, or of the wall clock) of one
    variant on ``problem`` (the MLP, or another of overhead.py's problems on random
    inputs)."""
    import ikkuna_core as ik

    torch.manual_seed(0)
    shape: tuple[int, ...] = (1, 28, 28)
    if problem == "mlp":
        plain_model = mlp()
    else:
        spec = overhead.PROBLEMS[problem]
        plain_model, shape = overhead.make_model(spec, torch.device("cpu")), spec.input_shape
    watched_model = copy.deepcopy(plain_model)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.01)
    watched_opt = torch.optim.SGD(watched_model.parameters(), lr=0.01)
    loss_fn = nn.CrossEntropyLoss()
    plugins, subscribers, extra = overhead.IKKUNA_VARIANTS[variant]
    config = {"plugins": plugins, "subscribers": subscribers, "backends": [],
              "log_dir": tempfile.mkdtemp(prefix="ikkuna-fixed-"), **extra}
    context = ik.RunContext(test_loader=[(x, y)], train_loader=[(x, y)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the budget's cadence changes are said as warnings
        exporter = ik.watch(watched_model, loss_fn, config, context=context)
        watched_loss = exporter.loss_fn

        timer = time.process_time if clock == "cpu" else time.perf_counter

        faults: dict[str, list[float]] = {"plain": [], "watched": []}

        def block(model: nn.Module, opt: torch.optim.Optimizer, fn: Any, n: int,
                  which: str = "") -> float:
            taken, start = _faults(), timer()
            for _ in range(n):
                opt.zero_grad()
                fn(model(x), y).backward()
                opt.step()
            elapsed = timer() - start
            if which:
                faults[which].append((_faults() - taken) / n)
            return elapsed / n

        block(plain_model, plain_opt, loss_fn, warmup)
        block(watched_model, watched_opt, watched_loss, warmup)
        plain, watched = [], []
        for _ in range(blocks):
            plain.append(block(plain_model, plain_opt, loss_fn, steps, "plain"))
            watched.append(block(watched_model, watched_opt, watched_loss, steps, "watched"))
        calls = python_calls(plain_model, plain_opt, loss_fn, x, y, steps)
        calls_watched = python_calls(watched_model, watched_opt, watched_loss, x, y, steps)
        cadences = {s.subscriber.name: s.subsample for s in exporter.bus.subscriptions}
        summary = exporter.bus.cost.summary()
        exporter.close()
    p, w = statistics.median(plain), statistics.median(watched)
    return {"variant": variant, "problem": problem, "clock": clock, "plain_ms": p * 1e3,
            "watched_ms": w * 1e3, "ratio": w / p, "added_us": (w - p) * 1e6,
            "python_calls_added": calls_watched - calls,
            "plain_faults_per_step": statistics.mean(faults["plain"]),
            "watched_faults_per_step": statistics.mean(faults["watched"]),
            "cadences": cadences, "cost_summary": summary,
            "plain_blocks": plain, "watched_blocks": watched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--problem", default="mlp", choices=["mlp", "3c3d", "resnet18"])
    parser.add_argument("--blocks", type=int, default=30, help="blocks of each (default 30)")
    parser.add_argument("--steps", type=int, default=40, help="steps per block (default 40)")
    parser.add_argument("--warmup", type=int, default=300,
                        help="untimed steps first: the budget settles (default 300)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", default="cpu", choices=["cpu", "wall"],
                        help="the process's CPU time (default; with several threads it "
                        "counts their spinning too) or the wall clock")
    parser.add_argument("--malloc", default="default", choices=["default", "retain"],
                        help="glibc as it is, or keeping freed memory in the process "
                        "(no page faults of reallocation in either copy)")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    if args.malloc == "retain":
        retain_freed_memory()
    torch.set_num_threads(args.threads)
    rows = []
    print("| variant | plain ms | watched ms | ratio | added per step | Python calls added "
          "| page faults per step, plain / watched |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant in args.variants.split(","):
        row = measure(variant, blocks=args.blocks, steps=args.steps, warmup=args.warmup,
                      batch=args.batch_size, problem=args.problem, clock=args.clock)
        rows.append(row)
        print(f"| {variant} | {row['plain_ms']:.3f} | {row['watched_ms']:.3f} | "
              f"{row['ratio']:.3f} | {row['added_us']:+.0f} us | "
              f"{row['python_calls_added']:.0f} | {row['plain_faults_per_step']:.0f} / "
              f"{row['watched_faults_per_step']:.0f} |", flush=True)
    if args.out:
        info = {"machine": platform.machine(), "processor": platform.processor(),
                "python": platform.python_version(), "torch": torch.__version__,
                "threads": args.threads, "malloc": args.malloc,
                "date": time.strftime("%Y-%m-%d %H:%M")}
        Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
