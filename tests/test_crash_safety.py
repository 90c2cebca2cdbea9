"""Nothing lost when a run ends the way real runs end (issue 16): real subprocesses train the
README's plain-PyTorch loop (``exporter.close()`` after the loop, never reached) and then
crash, call ``sys.exit``, simply end, get SIGTERM (with and without a handler of their own)
or SIGKILL; the event files are read back with TensorBoard's ``EventAccumulator`` and the
matplotlib figures looked for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")
pytest.importorskip("ikkuna_norms")
pytest.importorskip("ikkuna_accuracy")

if sys.platform == "win32":  # pragma: no cover - POSIX signals
    pytest.skip("POSIX signals", allow_module_level=True)

CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch
    from torch import nn
    import ikkuna_core as ik
    from ikkuna_norms import Norm
    from ikkuna_accuracy import Loss
    from ikkuna_core.backends.matplotlib import MatplotlibBackend
    from ikkuna_core.backends.tensorboard import TensorBoardBackend

    log_dir, end, flush_every, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if end == "user-handler":
        def handler(signum, frame):
            print("user handler ran", flush=True)
            sys.exit(7)
        signal.signal(signal.SIGTERM, handler)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    exporter = ik.Exporter(bus=ik.MessageBus(flush_every=flush_every))
    exporter.set_model(model)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    exporter.bus.register_subscriber(Norm(topics=["weight_gradients"]))
    exporter.bus.register_subscriber(Loss())
    exporter.bus.add_backend(TensorBoardBackend(log_dir))
    exporter.bus.add_backend(MatplotlibBackend(log_dir))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for i in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        print(f"step {i}", flush=True)
    if end == "raise":
        raise RuntimeError("user code crashed")
    if end == "exit":
        sys.exit(3)
    if end in ("sigterm", "user-handler", "sigkill"):
        print("waiting", flush=True)
        time.sleep(60)
    if end != "end":  # "end": the interpreter ends without close()
        exporter.close()
    """
)


def _run(tmp_path: Path, end: str, flush_every: int = 1, steps: int = 7) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("IKKUNA_PLUGINS", None)
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "logs"), end, str(flush_every), str(steps)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _wait_for(proc: subprocess.Popen, line: str) -> list[str]:
    """The child's stdout lines up to and including ``line``."""
    seen = []
    assert proc.stdout is not None
    for got in proc.stdout:
        seen.append(got.strip())
        if got.strip() == line:
            return seen
    raise AssertionError(f"child ended before {line!r}: {seen}; stderr: {proc.stderr.read()}")


def _steps(log_dir: Path, tag: str = "loss/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [e.step for e in acc.Scalars(tag)]


def _figures(log_dir: Path) -> set[str]:
    return {p.name for p in (log_dir / "figures").glob("*.png")}


@pytest.mark.parametrize(("end", "returncode"), [("raise", 1), ("exit", 3), ("end", 0)])
def test_every_step_is_on_disk_after_a_crash_an_exit_or_the_end_without_close(
    tmp_path: Path, end: str, returncode: int
) -> None:
    proc = _run(tmp_path, end)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == returncode, err
    logs = tmp_path / "logs"
    assert _steps(logs) == list(range(7))
    assert _steps(logs, "norm/weight_gradients/2") == list(range(7))
    assert {"loss__loss.png", "norm__weight_gradients.png"} <= _figures(logs)
    if end == "raise":
        assert "RuntimeError: user code crashed" in err


def test_sigterm_flushes_closes_then_terminates_as_sigterm_does(tmp_path: Path) -> None:
    proc = _run(tmp_path, "sigterm", flush_every=100)  # nothing flushed before the signal
    _wait_for(proc, "waiting")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM  # the signal's usual effect
    logs = tmp_path / "logs"
    assert _steps(logs) == list(range(7))
    assert "loss__loss.png" in _figures(logs)


def test_sigterm_still_runs_the_users_own_handler(tmp_path: Path) -> None:
    proc = _run(tmp_path, "user-handler", flush_every=100)
    _wait_for(proc, "waiting")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert "user handler ran" in out
    assert proc.returncode == 7  # what the user's handler chose
    assert _steps(tmp_path / "logs") == list(range(7))


@pytest.mark.parametrize("flush_every", [1, 4])
def test_sigkill_loses_at_most_flush_every_steps_and_the_file_stays_readable(
    tmp_path: Path, flush_every: int
) -> None:
    proc = _run(tmp_path, "sigkill", flush_every=flush_every, steps=10)
    _wait_for(proc, "waiting")  # all 10 steps ended; the process then sleeps
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    found = _steps(tmp_path / "logs")
    # flushed at the steps i with (i + 1) % flush_every == 0: 10 steps -> through step 9 or 7
    flushed = 10 - 10 % flush_every
    assert found == list(range(flushed))
    assert 10 - len(found) < flush_every


def test_the_sigterm_handler_is_ours_only_while_an_exporter_is_open() -> None:
    import threading

    import ikkuna_core as ik

    def mine(signum: int, frame: object) -> None:  # pragma: no cover - never signalled
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        exporter = ik.Exporter()
        assert signal.getsignal(signal.SIGTERM) is not mine  # flush first, then chain
        exporter.close()
        assert signal.getsignal(signal.SIGTERM) is mine  # restored on close
        # an Exporter made in another thread installs nothing (Python would refuse)
        made: list[ik.Exporter] = []
        worker = threading.Thread(target=lambda: made.append(ik.Exporter()))
        worker.start()
        worker.join()
        assert signal.getsignal(signal.SIGTERM) is mine
        made[0].close()
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_forked_child_does_not_close_its_parents_exporters(tmp_path: Path) -> None:
    """A DataLoader worker forked from the training process gets SIGTERM at shutdown: the
    Exporter it inherited is the parent's, so the child must not finish its step or write."""
    import ikkuna_core as ik
    from ikkuna_core import _lifecycle

    if not hasattr(os, "fork"):  # pragma: no cover
        pytest.skip("needs fork")
    exporter = ik.Exporter()
    try:
        pid = os.fork()
        if pid == 0:  # the child: closing at exit must leave the parent's Exporter alone
            _lifecycle.close_open_exporters()
            os._exit(0 if not exporter.clock.closed else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not exporter.clock.closed
    finally:
        exporter.close()
