"""Does the compiled metric path (``compile_metrics = true``, :func:`ikkuna_core.ops.compiled`)
pay on the MLP problem? Everything in one process:

1. the payloads: ``overhead.py``'s MLP ``all`` problem runs a few steps and the inputs of its
   ``ops.histograms`` and ``ops.norms`` calls are kept;
2. those calls alone, eager and compiled, in interleaved blocks (medians of the blocks'
   process and wall time);
3. whole training steps: plain, ``all`` and ``all`` with ``compile_metrics = true``, three
   copies of the model in interleaved blocks (medians, ratios to plain);
4. the aten ops a step dispatches, counted with the profiler (deterministic; a compiled
   region's kernels are not aten ops, so this is also what the compiled path launches
   besides its one fused kernel), for each of the three.

    python benchmarks/compiled_metrics.py                 # ~2 minutes on 2 cores
    python benchmarks/compiled_metrics.py --blocks 40 --out results/x.json
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import overhead
from ikkuna_core import ops


def payloads() -> dict[str, list[tuple[Any, Any]]]:
    """The arguments of the ``ops.histograms`` and ``ops.norms`` calls of one MLP ``all``
    step (after three warm-up steps)."""
    calls: dict[str, list[tuple[Any, Any]]] = collections.defaultdict(list)
    originals = {name: getattr(ops, name) for name in ("histograms", "norms")}

    def spy(name: str) -> Callable[..., Any]:
        def call(tensors: Any, *args: Any, **kwargs: Any) -> Any:
            calls[name].append(([t.clone() for t in tensors], args, kwargs))
            return originals[name](tensors, *args, **kwargs)
        return call

    with tempfile.TemporaryDirectory() as log_dir:
        runner = overhead.Runner(overhead.PROBLEMS["mlp"], "all", torch.device("cpu"),
                                 Path(log_dir))
        for _ in range(3):
            runner.step()
        try:
            for name in originals:
                setattr(ops, name, spy(name))
            runner.step()
        finally:
            for name, fn in originals.items():
                setattr(ops, name, fn)
            runner.close()
    return dict(calls)


def _times(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):
        fn()
    return (time.process_time() - cpu) / n, (time.perf_counter() - wall) / n


def _medians(blocks: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, float]]:
    return {k: {"cpu_us": statistics.median(c for c, _ in v) * 1e6,
                "wall_us": statistics.median(w for _, w in v) * 1e6} for k, v in blocks.items()}


def standalone(calls: dict[str, list[tuple[Any, Any]]], blocks: int, n: int) -> dict[str, Any]:
    """``ops.histograms`` eager and compiled (and ``ops.norms``, which is not compiled: the
    rest of the metric path) on the step's payloads, interleaved blocks of ``n`` calls."""
    tensors, args, kwargs = calls["histograms"][0]
    n_tensors, n_args, n_kwargs = calls["norms"][0]

    def compiled() -> Any:
        with ops.compiled("inductor"):
            return ops.histograms(tensors, *args, **kwargs)

    start = time.perf_counter()
    got, want = compiled(), ops.histograms(tensors, *args, **kwargs)
    compile_s = time.perf_counter() - start
    equal = {f: bool(torch.equal(a, b)) for f, a, b in zip(want._fields, want, got, strict=True)}
    fns = {"histograms eager": lambda: ops.histograms(tensors, *args, **kwargs),
           "histograms compiled": compiled,
           "norms eager": lambda: ops.norms(n_tensors, *n_args, **n_kwargs)}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(blocks):
        for k, fn in fns.items():
            times[k].append(_times(fn, n))
    return {"sizes": [list(t.shape) for t in tensors], "kwargs": kwargs,
            "first_compiled_call_s": compile_s, "fields_equal": equal,
            "medians": _medians(times)}


def _model_pair() -> tuple[nn.Module, Any, Any]:
    torch.manual_seed(0)
    model = overhead.make_model(overhead.PROBLEMS["mlp"], torch.device("cpu"))
    x, y = overhead.make_batches(overhead.PROBLEMS["mlp"], torch.device("cpu"))[0]
    return model, x, y


def steps(blocks: int, n: int, warmup: int) -> dict[str, Any]:
    """Plain, ``all`` and ``all-compiled`` training steps of three copies of the MLP in one
    process, interleaved blocks of ``n`` steps; and each one's aten ops per step."""
    import ikkuna_core as ik

    base, x, y = _model_pair()
    loss_fn = nn.CrossEntropyLoss()
    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer, Any]] = {}
    exporters = []
    for variant in ("plain", "all", "all-compiled"):
        model = copy.deepcopy(base)
        fn: Any = loss_fn
        if variant != "plain":
            config = overhead.ikkuna_config(variant, Path(tempfile.mkdtemp(prefix="ikkuna-cm-")))
            config["backends"] = []  # the write is the same for both; leave it out
            exporter = ik.watch(model, loss_fn, config)
            exporters.append(exporter)
            fn = exporter.loss_fn
        runs[variant] = (model, torch.optim.SGD(model.parameters(), lr=0.01), fn)

    def step(variant: str) -> None:
        model, opt, fn = runs[variant]
        opt.zero_grad()
        fn(model(x), y).backward()
        opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for variant in runs:
            for _ in range(warmup):
                step(variant)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        for _ in range(blocks):
            for variant in runs:
                times[variant].append(_times(lambda v=variant: step(v), n))  # type: ignore[misc]
        ops_per_step = {variant: aten_ops(lambda v=variant: step(v)) for variant in runs}  # type: ignore[misc]
    for exporter in exporters:
        exporter.close()
    medians = _medians(times)
    plain = medians["plain"]
    for m in medians.values():
        m["cpu_ratio"] = m["cpu_us"] / plain["cpu_us"]
        m["wall_ratio"] = m["wall_us"] / plain["wall_us"]
    return {"medians": medians, "aten_ops_per_step": ops_per_step}


def aten_ops(fn: Callable[[], Any]) -> dict[str, int]:
    """aten ops ``fn`` dispatches at the top level (the profiler's ``aten::`` events with no
    ``aten::`` parent: what ``overhead.py --ops`` counts with a dispatch mode, which would
    turn a compiled region back to eager) and the compiled graphs it calls."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    events = prof.events()
    top = 0
    for e in events:
        parent = e.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if e.name.startswith("aten::") and parent is None:
            top += 1
    graphs = sum(1 for e in events if e.name.startswith("## Call CompiledFxGraph"))
    return {"aten_ops": top, "compiled_graph_calls": graphs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=20, help="blocks of each (default 20)")
    parser.add_argument("--calls", type=int, default=20, help="calls per block, part 2")
    parser.add_argument("--steps", type=int, default=20, help="steps per block, part 3")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calls = payloads()
    alone = standalone(calls, args.blocks, args.calls)
    whole = steps(args.blocks, args.steps, args.warmup)
    print("ops alone (us per call, median of blocks):")
    for k, m in alone["medians"].items():
        print(f"  {k:22s} cpu {m['cpu_us']:7.0f}  wall {m['wall_us']:7.0f}")
    print(f"  fields equal: {alone['fields_equal']}")
    print("MLP steps (us per step, median of blocks; ratio to plain):")
    for k, m in whole["medians"].items():
        o = whole["aten_ops_per_step"][k]
        print(f"  {k:14s} cpu {m['cpu_us']:6.0f} ({m['cpu_ratio']:.2f}x)  wall "
              f"{m['wall_us']:6.0f} ({m['wall_ratio']:.2f}x)  aten ops {o['aten_ops']}, "
              f"compiled graphs {o['compiled_graph_calls']}")
    if args.out:
        info = {"machine": platform.machine(), "python": platform.python_version(),
                "torch": torch.__version__, "threads": args.threads,
                "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(args)}
        Path(args.out).write_text(json.dumps({"info": info, "standalone": alone,
                                              "steps": whole}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
