"""The Hessian's largest eigenvalue and trace from this plugin, from Cockpit (``HessMaxEV``,
``HessTrace``) and from an explicit Hessian, on the same small CNN and batch, with the extra
time each evaluation costs on top of a training step.

    pip install cockpit-for-pytorch          # not a dependency of the plugin or its tests
    python plugins/ikkuna-curvature/scripts/compare_cockpit.py [--threads 1] [--repeats 5]

The model (two conv + ReLU + max-pool blocks and a linear head, 1,898 parameters) is first
trained for 100 SGD steps on scikit-learn's bundled 8x8 digits, so that the comparison is not
at initialisation; the evaluation batch is 128 digits. The explicit Hessian
(``torch.autograd.functional.hessian`` in float64, ``torch.linalg.eigvalsh``) is the
reference. Times are medians over ``--repeats`` evaluations at the same parameters: for
Cockpit, a training step's backward with the quantity minus a plain one (Cockpit computes
from the training backward's graph); for Ikkuna, the function the subscriber calls (it runs
its own forward and backward, the training step is unchanged).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ikkuna_curvature import HessianMaxEigenvalueOptions, HessianTraceOptions, ops


def import_cockpit() -> Any:
    """cockpit-for-pytorch 1.0.2 imports ``pkg_resources`` (gone from setuptools >= 81) for its
    ``__version__`` only: stand in for it when it is missing."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import importlib.metadata as md

        shim = types.ModuleType("pkg_resources")
        shim.DistributionNotFound = md.PackageNotFoundError  # type: ignore[attr-defined]
        shim.get_distribution = md.distribution  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = shim
    import cockpit

    return cockpit


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 10),
    )


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long)


def explicit_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    model64 = copy.deepcopy(model).double()

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = theta[i : i + shape.numel()].view(shape)
            i += shape.numel()
        return nn.functional.cross_entropy(functional_call(model64, params, (x.double(),)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    return torch.autograd.functional.hessian(loss, flat, vectorize=True)


def timed(fn: Callable[[], float], repeats: int) -> tuple[float, list[float]]:
    """Median seconds of ``repeats`` calls and every call's value."""
    times, values = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        values.append(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), values


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.6g}"
    return f"{statistics.mean(values):.6g} ± {statistics.stdev(values):.2g}"


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    images, labels = digits()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, len(labels), (64,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images[idx]), labels[idx]).backward()
        optimizer.step()
    idx = torch.randperm(len(labels), generator=g)[:128]
    x, y = images[idx], labels[idx]
    loss_fn = nn.CrossEntropyLoss()
    n_params = sum(p.numel() for p in model.parameters())

    h = explicit_hessian(model, x, y)
    eigenvalues = torch.linalg.eigvalsh(h)
    # Hutchinson's standard deviation for one Rademacher probe: sqrt(2 (|H|_F^2 - sum H_ii^2))
    per_probe = math.sqrt(2 * float((h**2).sum() - (h.diagonal() ** 2).sum()))
    reference = {"max_eigenvalue": float(eigenvalues[-1]), "min_eigenvalue": float(eigenvalues[0]),
                 "trace": float(h.trace()), "hutchinson_std_one_probe": per_probe}

    # ---------------------------------------------------------------- a plain step's backward
    def plain_step() -> float:
        model.zero_grad()
        loss_fn(model(x), y).backward()
        return 0.0

    plain_s, _ = timed(plain_step, args.repeats)

    # ------------------------------------------------------------------------------- Ikkuna
    eig_options, trace_options = HessianMaxEigenvalueOptions(), HessianTraceOptions()
    gen = torch.Generator().manual_seed(0)
    rng_before = torch.get_rng_state()
    grads_before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    iterations: list[int] = []

    def ikkuna_max_ev() -> float:
        result = ops.hessian_max_eigenvalue(
            model, loss_fn, x, y, max_iterations=eig_options.max_iterations,
            tolerance=eig_options.tolerance, generator=gen,
        )
        iterations.append(result.iterations)
        return float(result.eigenvalue)

    def ikkuna_trace(probes: int) -> Callable[[], float]:
        def run() -> float:
            operator = ops.hessian_operator(model, loss_fn, x, y)
            return float(ops.hutchinson_trace(operator, operator.numel, probes=probes,
                                              generator=gen).trace)

        return run

    ik_ev_s, ik_ev = timed(ikkuna_max_ev, args.repeats)
    ik_tr_s, ik_tr = timed(ikkuna_trace(trace_options.probes), args.repeats)
    ik_tr100_s, ik_tr100 = timed(ikkuna_trace(100), args.repeats)
    ik_rng_untouched = torch.equal(rng_before, torch.get_rng_state())
    grads_untouched = all(
        torch.equal(a, p.grad) for a, p in zip(grads_before, model.parameters(), strict=True)
    )

    # ------------------------------------------------------------------------------ Cockpit
    cockpit = import_cockpit()
    from backpack import extend
    from cockpit import quantities
    from cockpit.utils.schedules import linear

    cp_model = extend(copy.deepcopy(model))
    cp_loss = extend(nn.CrossEntropyLoss())
    cp_optimizer = torch.optim.SGD(cp_model.parameters(), lr=0.0)

    def cockpit_step(quantity: Any) -> Callable[[], float]:
        cp = cockpit.Cockpit(list(cp_model.parameters()), quantities=[quantity])
        counter = iter(range(10**6))

        def step() -> float:
            global_step = next(counter)
            cp_model.zero_grad()
            loss = cp_loss(cp_model(x), y)
            info = {"batch_size": x.shape[0], "loss": loss, "optimizer": cp_optimizer}
            with cp(global_step, info=info):
                loss.backward(create_graph=cp.create_graph(global_step))
            value = cp.get_output()[global_step][type(quantity).__name__]
            return float(sum(value)) if isinstance(value, list) else float(value)

        return step

    rng_before = torch.get_rng_state()
    cp_ev_s, cp_ev = timed(cockpit_step(quantities.HessMaxEV(linear(1))), args.repeats)
    cp_rng_untouched = torch.equal(rng_before, torch.get_rng_state())
    cp_tr_s, cp_tr = timed(cockpit_step(quantities.HessTrace(linear(1))), args.repeats)

    ms = 1e3
    result = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "parameters": n_params,
        "batch": x.shape[0],
        "repeats": args.repeats,
        "plain_forward_backward_ms": plain_s * ms,
        "reference": reference,
        "ikkuna": {
            "max_eigenvalue": ik_ev,
            "max_eigenvalue_iterations": iterations,
            "max_eigenvalue_ms": ik_ev_s * ms,
            f"trace_{trace_options.probes}_probes": ik_tr,
            f"trace_{trace_options.probes}_probes_ms": ik_tr_s * ms,
            "trace_100_probes": ik_tr100,
            "trace_100_probes_ms": ik_tr100_s * ms,
            "rng_untouched": ik_rng_untouched,
            "grads_untouched": grads_untouched,
        },
        "cockpit": {
            "HessMaxEV": cp_ev,
            "HessMaxEV_extra_ms": (cp_ev_s - plain_s) * ms,
            "HessTrace": cp_tr,
            "HessTrace_extra_ms": (cp_tr_s - plain_s) * ms,
            "rng_untouched_by_HessMaxEV": cp_rng_untouched,
        },
    }
    print(json.dumps(result, indent=2))
    ref = reference
    print(
        f"\n| {n_params} parameters, batch {x.shape[0]}, {args.repeats} evaluations | value "
        "(mean ± std over the evaluations) | extra ms per evaluation |\n|---|---:|---:|\n"
        f"| largest eigenvalue, explicit Hessian | {ref['max_eigenvalue']:.6g} | |\n"
        f"| Ikkuna `hessian_max_eigenvalue` (defaults, cold start) | {spread(ik_ev)} "
        f"| {ik_ev_s * ms:.1f} |\n"
        f"| Cockpit `HessMaxEV` | {spread(cp_ev)} | {(cp_ev_s - plain_s) * ms:.1f} |\n"
        f"| trace, explicit Hessian | {ref['trace']:.6g} | |\n"
        f"| Ikkuna `hessian_trace`, {trace_options.probes} probes (default; expected std "
        f"{per_probe / math.sqrt(trace_options.probes):.2g}) | {spread(ik_tr)} "
        f"| {ik_tr_s * ms:.1f} |\n"
        f"| Ikkuna `hessian_trace`, 100 probes (expected std {per_probe / 10:.2g}) "
        f"| {spread(ik_tr100)} | {ik_tr100_s * ms:.1f} |\n"
        f"| Cockpit `HessTrace` | {spread(cp_tr)} | {(cp_tr_s - plain_s) * ms:.1f} |\n"
        f"\nplain forward + backward: {plain_s * ms:.1f} ms; training's RNG untouched: Ikkuna "
        f"{ik_rng_untouched}, Cockpit HessMaxEV {cp_rng_untouched}"
    )
    return result


if __name__ == "__main__":
    main()
