"""``ikkuna train --budget`` and ``ikkuna train --plan``: what watching cost, said at the end
of the run and written to TensorBoard; cadences the budget chose; a plan that writes nothing."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import pytest

from ikkuna_core.cli import main
from ikkuna_core.cost import CadenceChange

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_a_budget_chooses_cadences_and_the_run_says_what_it_cost(tmp_path: Path) -> None:
    log_dir = tmp_path / "run"
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        code, out, err = run_cli(
            "train", "--max-steps", 120, "--plugins", "norms,histograms", "--budget", 0.02,
            "-v", "tb", "--no-report", "--log-dir", log_dir,
        )
    assert code == 0, err
    changes = [str(w.message) for w in said if w.category is CadenceChange]
    assert changes and all("budget 2.0% of the step" in c for c in changes)
    doc = json.loads((log_dir / "run.json").read_text())
    assert doc["ikkuna_config"]["budget"] == 0.02
    names = ["histogram", "dead_fraction", "norm", "spectral_norm", "ratio"]
    lines = doc["costs"]
    assert [line.split()[0] for line in lines[:-2]] == names
    assert lines[-2].startswith("exporter ") and lines[-1].startswith("total ")
    assert "(budget 2.0%)" in lines[-1]
    for line in lines[:-2]:  # printed in the summary too
        assert line in out
    scalars = read_scalars(log_dir)
    for name in names:
        assert scalars[f"ikkuna/cost/{name}"]  # published while the run went
    assert scalars["ikkuna/cost/exporter"] and scalars["ikkuna/step/plain_ms"]
    # every cadence the budget chose is on the ladder (subsample 1: powers of two), and the
    # histogram's curve after its last change has a point exactly at its multiples
    changed = {t.removeprefix("ikkuna/cadence/"): v for t, v in scalars.items()
               if t.startswith("ikkuna/cadence/")}
    assert changed, "a 2 % budget slows the spectral norm and the histograms down"
    for points in changed.values():
        for _, cadence in points:
            assert cadence >= 1 and (int(cadence) & (int(cadence) - 1)) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"histograms": 0})
    acc.Reload()
    steps = [e.step for e in acc.Histograms("histogram/activations/net.1")]
    assert "histogram" in changed
    when, cadence = changed["histogram"][-1]  # decided at step `when`, from the next on
    after = [s for s in steps if s > when]
    assert after == [s for s in range(int(when) + 1, 120) if s % int(cadence) == 0]


def test_plan_prints_costs_and_cadences_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    log_dir = tmp_path / "never"
    code, out, err = run_cli(
        "train", "--plan", "--plugins", "norms,histograms", "--budget", 0.05,
        "--log-dir", log_dir,
    )
    assert code == 0, err
    assert not log_dir.exists() and not list(tmp_path.iterdir())  # nothing written
    assert "plan for FullyConnected on digits, batch 128" in out
    assert "cadences for a budget of 5.0% of the step" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[4:]
            if line and not line.startswith(("-", "subscribers at"))}
    for name in ("histogram", "dead_fraction", "norm", "spectral_norm", "ratio"):
        subsample, ms, share, ops, cadence, _ = rows[name][1:]
        assert int(subsample) == 1 and float(ms) > 0 and share.endswith("%")
        assert int(ops) > 0
        assert int(cadence) >= 1 and (int(cadence) & (int(cadence) - 1)) == 0
    assert "exporter" in rows


def test_a_budget_must_be_positive(tmp_path: Path) -> None:
    code, out, err = run_cli("train", "--budget", "0", "--log-dir", tmp_path / "run")
    assert code == 2 and out == ""
    assert err.splitlines()[-1] == (
        "ikkuna train: error: argument --budget: expected a number > 0, got 0.0"
    )
    assert not (tmp_path / "run").exists()
