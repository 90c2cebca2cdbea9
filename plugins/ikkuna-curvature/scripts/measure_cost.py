"""What does one ``hessian_max_eigenvalue`` evaluation cost, in steps of plain training?

Trains CIFAR ResNet-18 (``ikkuna_train.models``, batch 32 of fixed random 3x32x32 images, SGD
with momentum: the ``resnet18`` problem of benchmarks/overhead.py) with the subscriber
enabled through its entry point every ``--every`` steps, times every step, and reports:

- the plain step: the median of the steps where the subscriber does not run;
- each evaluation's extra time in plain steps, with its Lanczos iterations and residual;
- the first (cold: random start) and the later (warm-started) evaluations' mean cost;
- the steady-state ratio ``1 + warm / every`` and the ratio amortised over ``--horizon``
  steps, the cold evaluation included: ``1 + (cold + (horizon / every - 1) warm) / horizon``.

Each figure is given twice: from wall-clock time, and from the process's CPU time (all
threads), which a busy shared machine disturbs far less. ``--warmup`` plain steps run before
Ikkuna is attached, so the first evaluation's cost is not inflated by torch's own first-step
costs.

    python plugins/ikkuna-curvature/scripts/measure_cost.py --threads 1          # ~10 minutes
    python plugins/ikkuna-curvature/scripts/measure_cost.py --threads 1 --max-iterations 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from torch import nn

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend
from ikkuna_train.models import get_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=151, help="training steps (default 151)")
    parser.add_argument("--every", type=int, default=50, help="subsample (default 50)")
    parser.add_argument("--warmup", type=int, default=2, help="plain steps before watching")
    parser.add_argument("--horizon", type=int, default=1000, help="steps to amortise over")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-iterations", type=int, default=None)
    parser.add_argument("--tolerance", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = get_model("ResNet18", input_shape=(3, 32, 32), num_classes=10).to(device).train()
    gen = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch_size, 3, 32, 32, generator=gen).to(device),
            torch.randint(0, 10, (args.batch_size,), generator=gen).to(device),
        )
        for _ in range(4)
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    plain_loss = nn.CrossEntropyLoss()
    for step in range(args.warmup):
        x, y = batches[step % len(batches)]
        optimizer.zero_grad()
        plain_loss(model(x), y).backward()
        optimizer.step()

    entry: dict[str, Any] = {"name": "hessian_max_eigenvalue", "subsample": args.every}
    if args.max_iterations is not None:
        entry["max_iterations"] = args.max_iterations
    if args.tolerance is not None:
        entry["tolerance"] = args.tolerance
    config = {"plugins": ["curvature"], "backends": [], "on_error": "raise", "subscribers": [entry]}
    exporter = ik.watch(model, plain_loss, config=config)
    backend = exporter.bus.add_backend(MemoryBackend())
    loss_fn = exporter.loss_fn
    assert loss_fn is not None

    wall, cpu = [], []
    for step in range(args.steps):
        x, y = batches[(args.warmup + step) % len(batches)]
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        _sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    exporter.close()

    evaluated = [s for s in range(args.steps) if s % args.every == 0]
    result: dict[str, Any] = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "options": entry,
        "evaluations": [
            {
                "step": s,
                "eigenvalue": backend.scalar("hessian_max_eigenvalue", s),
                "iterations": backend.scalar("hessian_max_eigenvalue/iterations", s),
                "residual": backend.scalar("hessian_max_eigenvalue/residual", s),
            }
            for s in evaluated
        ],
    }
    per_horizon = args.horizon // args.every
    for clock, times in (("wall", wall), ("cpu", cpu)):
        plain = statistics.median(t for s, t in enumerate(times) if s % args.every)
        result[f"plain_step_{clock}_s"] = plain
        for e in result["evaluations"]:
            e[f"extra_steps_{clock}"] = (times[e["step"]] - plain) / plain
        cold = result["evaluations"][0][f"extra_steps_{clock}"]
        warm_list = [e[f"extra_steps_{clock}"] for e in result["evaluations"][1:]]
        warm = statistics.mean(warm_list) if warm_list else cold
        result[f"cold_evaluation_steps_{clock}"] = cold
        result[f"warm_evaluation_steps_{clock}"] = warm
        result[f"steady_ratio_{clock}"] = 1 + warm / args.every
        result[f"amortised_ratio_{args.horizon}_{clock}"] = (
            1 + (cold + (per_horizon - 1) * warm) / args.horizon
        )
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
