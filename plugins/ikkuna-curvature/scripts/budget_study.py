"""Can ``hessian_max_eigenvalue`` spend only a few Hessian-vector products per evaluation?

Trains CIFAR ResNet-18 (SGD, lr 0.01, momentum 0.9, batch 32) and every ``--every`` steps, at
the parameters after the step's update and on the step's batch (where the subscriber
evaluates), computes:

- a reference: Lanczos to a relative residual of 1e-6 (up to ``--reference-iterations``);
- what the subscriber publishes with a budget of ``k`` products per evaluation
  (``max_iterations = k``, each evaluation warm-started from the previous one's vector, as
  the subscriber does), for each ``k`` of ``--budgets``, as a fraction of the reference, with
  its residual;
- the top eigenvalue of the Hessian of the first half of the batch (what a ``max_samples``
  option would compute), as a fraction of the full batch's;
- at the first evaluation, finite-difference Hessian-vector products
  ``(∇L(θ + εv) - ∇L(θ)) / ε`` (and central ones) against the exact double-backward product,
  for the reference eigenvector, at several ε;
- with ``--timing``: the plain step, the gradient with ``create_graph=True`` and one product,
  in plain steps (median of 20, device synchronised).

Two data sets: ``random4`` (the benchmark's four fixed random batches with random labels,
which the network memorises) and ``digits`` (scikit-learn's 8x8 digits upsampled to 3x32x32,
a new batch every step). On a GPU this takes about a minute per data set.

    python plugins/ikkuna-curvature/scripts/budget_study.py --data digits --steps 301
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ikkuna_curvature import ops
from ikkuna_train.models import get_model


def batches_of(name: str, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    if name == "random4":
        out = [
            (torch.randn(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen))
            for _ in range(4)
        ]
    else:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8 - 1
        x = nn.functional.interpolate(x, size=32, mode="bilinear").expand(-1, 3, -1, -1)
        y = torch.tensor(data.target)
        perm = torch.randperm(len(y), generator=gen)
        x, y = x[perm].contiguous(), y[perm]
        out = [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(y) - 31, 32)]
    return [(a.to(device), b.to(device)) for a, b in out]


def finite_differences(
    model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor,
    exact: torch.Tensor,
) -> list[dict[str, float]]:
    """Relative error of forward and central finite-difference products against ``exact``."""
    names = [n for n, p in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    buffers = dict(model.named_buffers())

    def gradient(delta: torch.Tensor | None) -> torch.Tensor:
        chunks = torch.split(delta, [p.numel() for p in params]) if delta is not None else None
        point = {
            n: (p + chunks[i].view_as(p) if chunks is not None else p.clone()).requires_grad_()
            for i, (n, p) in enumerate(zip(names, params, strict=True))
        }
        copies = {n: b.clone() for n, b in buffers.items()}
        with ops.preserved_rng({x.device}):
            loss = loss_fn(functional_call(model, (point, copies), (x,)), y)
        grads = torch.autograd.grad(loss, list(point.values()))
        return torch.cat([g.reshape(-1) for g in grads])

    base = gradient(None)
    rows = []
    for eps in (1e-1, 1e-2, 1e-3, 1e-4):
        plus, minus = gradient(eps * v), gradient(-eps * v)
        forward = (plus - base) / eps
        central = (plus - minus) / (2 * eps)
        scale = float(torch.linalg.vector_norm(exact))
        rows.append({
            "eps": eps,
            "forward_relative_error": float(torch.linalg.vector_norm(forward - exact)) / scale,
            "central_relative_error": float(torch.linalg.vector_norm(central - exact)) / scale,
        })
    return rows


def timing(
    model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
) -> dict[str, float]:
    device = x.device

    def median_s(fn: Callable[[], object]) -> float:
        fn()
        fn()
        times = []
        for _ in range(20):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    def plain() -> None:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

    plain_s = median_s(plain)
    operator = ops.hessian_operator(model, loss_fn, x, y)
    v = torch.randn(operator.numel, device=device)
    return {
        "plain_step_ms": plain_s * 1e3,
        "create_graph_gradient_steps": median_s(
            lambda: ops.hessian_operator(model, loss_fn, x, y)
        ) / plain_s,
        "product_steps": median_s(lambda: operator(v)) / plain_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", choices=["random4", "digits"], default="random4")
    parser.add_argument("--steps", type=int, default=301)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--budgets", default="2,3,5")
    parser.add_argument("--reference-iterations", type=int, default=60)
    parser.add_argument("--timing", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    budgets = [int(k) for k in args.budgets.split(",")]

    torch.manual_seed(0)
    model = get_model("ResNet18", input_shape=(3, 32, 32), num_classes=10).to(device).train()
    batches = batches_of(args.data, device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator(device=device).manual_seed(5)
    vectors: dict[Any, torch.Tensor | None] = {k: None for k in budgets}
    vectors["reference"] = vectors["half"] = None

    def evaluate(key: Any, xs: torch.Tensor, ys: torch.Tensor, k: int, tol: float) -> Any:
        result = ops.hessian_max_eigenvalue(
            model, loss_fn, xs, ys, start=vectors[key], max_iterations=k, tolerance=tol,
            generator=gen,
        )
        vectors[key] = result.eigenvector
        return result

    for step in range(args.steps):
        x, y = batches[step % len(batches)]
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        if step % args.every:
            continue
        ref = evaluate("reference", x, y, args.reference_iterations, 1e-6)
        top = float(ref.eigenvalue)
        record: dict[str, Any] = {
            "step": step, "reference": top, "reference_iterations": ref.iterations,
            "reference_residual": float(ref.residual),
        }
        for k in budgets:  # as the subscriber with max_iterations = k: every evaluation
            got = evaluate(k, x, y, k, 1e-2)
            record[f"budget_{k}"] = {
                "fraction_of_reference": float(got.eigenvalue) / top,
                "residual": float(got.residual),
                "iterations": got.iterations,
            }
        half = evaluate("half", x[:16], y[:16], args.reference_iterations, 1e-5)
        record["half_batch_fraction_of_full"] = float(half.eigenvalue) / top
        if step == 0:
            operator = ops.hessian_operator(model, loss_fn, x, y)
            v = ref.eigenvector
            record["finite_differences"] = finite_differences(
                model, loss_fn, x, y, v, operator(v)
            )
            del operator
        print(json.dumps(record), flush=True)
    if args.timing:
        x, y = batches[0]
        print(json.dumps({"device": str(device), **timing(model, loss_fn, x, y, optimizer)}))


if __name__ == "__main__":
    main()
