"""The benchmark's ``--soak`` covers both backends (issue 11: memory) and reports MiB per
1,000 steps for each."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


def _load_benchmark():  # the same module object as tests/test_benchmark.py's
    name = "ikkuna_benchmark_overhead"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()
pytestmark = pytest.mark.usefixtures("installed_plugins")


def test_soak_runs_once_per_backend_and_reports_mib(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "soak.json"
    try:
        result = bench.main(
            ["--soak", "--soak-steps", "12", "--soak-every", "4", "--out", str(out)]
        )
    except bench.SkipVariant as exc:
        pytest.skip(str(exc))
    assert list(result["soak"]) == ["tensorboard", "matplotlib"]
    saved = json.loads(out.read_text())
    for backend, one in saved["soak"].items():
        assert one["backend"] == backend
        assert [s["step"] for s in one["samples"]] == [0, 4, 8, 12]
        mib = one["slope_rss_mib_per_1000_steps"]
        assert math.isfinite(mib)
        assert mib == pytest.approx(one["slope_rss_bytes_per_1000_steps"] / 2**20)
    printed = capsys.readouterr().out
    for backend in ("tensorboard", "matplotlib"):
        assert f"{backend}: RSS " in printed and "MiB per 1,000 steps" in printed


def test_unknown_soak_backend_is_refused() -> None:
    with pytest.raises(SystemExit, match="--soak-backends: choose from tensorboard, matplotlib"):
        bench.main(["--soak", "--soak-backends", "wandb"])
