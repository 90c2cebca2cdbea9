"""The compiled metric path (``compile_metrics = true``, ``ops.compiled``): ``ops.histograms``
as one inductor graph gives the eager path's values (counts, edges, extremes and numbers bit
for bit, sums within float32 rounding), compiles once per distinct call and not again in
later steps, falls back to eager with one warning when compilation fails, and is neither on
by default nor loaded by ``import ikkuna_core``."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import ikkuna_core as ik
from ikkuna_core import _compiled, ops
from ikkuna_core.testing import MemoryBackend


@pytest.fixture(autouse=True)
def _fresh() -> None:
    torch._dynamo.reset()
    _compiled.reset()


def _rows() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    spiky = torch.randn(1000, generator=g) * 1e3
    spiky[[3, 10, 500]] = torch.tensor([math.nan, math.inf, -math.inf])
    return [
        torch.randn(300, 7, generator=g), spiky, torch.empty(0), torch.full((64,), 2.5),
        torch.randn(5000, generator=g).half(), torch.full((10,), math.nan),
        torch.randn(130, generator=g) + 1e4, torch.randn(40, 40, generator=g).t(),
    ]


def _assert_same(eager: ops.Histograms, compiled: ops.Histograms) -> None:
    for name, want, got in zip(eager._fields, eager, compiled, strict=True):
        assert got.dtype == want.dtype, name
        if name == "sum":  # 64-entry chunks summed in another order: float32 rounding
            bound = 1e-6 * (eager.sum_squares * eager.num).sqrt()  # >= 1e-6 * sum |x|
            assert ((got - want).abs() <= bound).all(), name
        elif name == "sum_squares":
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0, msg=name)
        else:
            assert torch.equal(got, want), name


@pytest.mark.parametrize(("dtype", "kwargs"), [
    (torch.float32, {"bins": 64, "max_samples": 1000}),
    (torch.float64, {"bins": 10, "range": (-1.0, 2.0)}),
], ids=["float32-sampled", "float64-range"])
def test_compiled_histograms_equal_the_eager_ones(dtype: torch.dtype, kwargs: dict) -> None:
    rows = _rows() + ([torch.randn(50, dtype=torch.float64)] if dtype == torch.float64 else [])
    eager = ops.histograms(rows, **kwargs)
    with ops.compiled("inductor"):
        compiled = ops.histograms(rows, **kwargs)
    assert len(_compiled._signatures["inductor"]) == 1  # it did run compiled
    _assert_same(eager, compiled)
    assert int(compiled.nonfinite[1]) == 3 and int(compiled.counts[2].sum()) == 0


def test_compiled_histograms_with_shards_limits_equal_the_eager_ones() -> None:
    rows = _rows()
    extremes = ops.finite_extremes(rows)
    limits = (-extremes[:, 1] - 1.0, extremes[:, 0] + 1.0)  # wider than each row
    eager = ops.histograms(rows, limits=limits)
    with ops.compiled("inductor"):
        compiled = ops.histograms(rows, limits=limits)
    _assert_same(eager, compiled)
    assert torch.equal(compiled.min, limits[0].masked_fill(~torch.isfinite(limits[0]), 0.0))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4))


def _run(log_dir, compile_metrics: bool, steps: int, after_warmup=None) -> MemoryBackend:  # type: ignore[no-untyped-def]
    model = _mlp()
    config = {"plugins": ["histograms"], "backends": [], "on_error": "raise",
              "log_dir": str(log_dir / str(compile_metrics)),
              "subscribers": [{"name": "histogram", "topics": ["activations",
                                                               "weight_gradients"]}],
              "compile_metrics": compile_metrics}
    exporter = ik.watch(model, nn.CrossEntropyLoss(), config)
    memory = MemoryBackend()
    exporter.add_backend(memory)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 20, generator=g), torch.randint(0, 4, (8,), generator=g)
    for i in range(steps):
        opt.zero_grad()
        exporter.loss_fn(model(x), y).backward()
        opt.step()
        if i == 1 and after_warmup is not None:
            after_warmup()
    exporter.close()
    return memory


def test_watched_steps_compile_once_and_publish_the_eager_histograms(
    installed_plugins: None, tmp_path
) -> None:
    from torch._dynamo.utils import counters

    expected = _run(tmp_path, False, 12)
    counters.clear()
    seen: dict[str, int] = {}
    compiled = _run(tmp_path, True, 12, lambda: seen.update(counters["stats"]))
    assert seen["unique_graphs"] == 1  # compiled in the first step
    assert dict(counters["stats"]) == seen  # and never again in the 10 steps after
    assert not counters["recompiles"]
    # every step: 4 modules' activations, 2 weights' gradients
    assert len(expected.histograms) == len(compiled.histograms) == 12 * 6
    for want, got in zip(expected.histograms, compiled.histograms, strict=True):
        assert (got.tag, got.step) == (want.tag, want.step)
        np.testing.assert_array_equal(got.counts, want.counts)
        np.testing.assert_array_equal(got.edges, want.edges)
        assert (got.min, got.max, got.num, got.nonfinite) == \
            (want.min, want.max, want.num, want.nonfinite)
        assert got.sum_squares == pytest.approx(want.sum_squares, rel=1e-6)
        assert abs(got.sum - want.sum) <= 1e-6 * math.sqrt(want.sum_squares * want.num)


def test_a_failing_compiler_warns_once_and_the_eager_path_takes_over() -> None:
    from torch._dynamo import register_backend

    @register_backend(name="ikkuna_test_broken")  # type: ignore[misc]
    def broken(gm, inputs):  # type: ignore[no-untyped-def]
        raise RuntimeError("no C++ compiler here")

    rows = _rows()
    eager = ops.histograms(rows)
    with ops.compiled("ikkuna_test_broken"):
        with pytest.warns(RuntimeWarning, match="no C.. compiler here.*eagerly from now on"):
            first = ops.histograms(rows)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = ops.histograms(rows)
    for got in (first, again):
        for want_field, got_field in zip(eager, got, strict=True):
            assert torch.equal(want_field, got_field)


def test_off_by_default_and_not_loaded_by_import() -> None:
    assert ik.IkkunaConfig().compile_metrics is False
    with pytest.raises(ik.ConfigError, match="compile_metrics"):
        ik.load_config({"compile_metrics": "yes"})
    code = ("import sys, ikkuna_core, ikkuna_core.ops; "
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', "
            "'ikkuna_core._compiled') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_compilations_are_bounded_and_further_calls_run_eagerly(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._dynamo.utils import counters

    monkeypatch.setattr(_compiled, "MAX_SIGNATURES", 3)  # below dynamo's own limit (8)
    counters.clear()
    rows = _rows()
    with ops.compiled("aot_eager"):  # the bound, not the code: no C++ compiler needed
        for k in range(5):
            got = ops.histograms(rows[: k % 4 + 1], bins=k + 1)
            want = ops.histograms(rows[: k % 4 + 1], bins=k + 1)
            assert all(torch.equal(a, b) for a, b in
                       zip(want[:5], got[:5], strict=True)), k  # counts, edges, min, max, num
    assert counters["stats"]["unique_graphs"] == 3


def test_under_a_dispatch_mode_the_eager_path_runs() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.append(func)
            return func(*args, **(kwargs or {}))

    rows = _rows()
    eager = ops.histograms(rows)
    with ops.compiled("inductor"), Count():
        got = ops.histograms(rows)
    assert torch.ops.aten.bincount.default in seen  # the eager path's own op
    assert not _compiled._signatures
    assert all(torch.equal(a, b) for a, b in zip(eager, got, strict=True))
