"""Two real ``gloo`` ranks on 127.0.0.1 for the distributed tests: the test side starts a
worker script once per rank (:func:`run_ranks`), the worker side joins the process group
(:func:`process_group`). A rank left waiting (a collective the other rank never issues)
fails the test after the timeout instead of blocking the suite."""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

WORLD = 2


def run_ranks(worker: Path, out: Path, *args: str, timeout: float = 240) -> list[Any]:
    """``python WORKER RANK PORT OUT ARGS...`` for each rank, at once, with this process's
    ``PYTHONPATH`` (a worktree's sources first); what each saved to ``OUT/rank<r>.pt``."""
    import pytest
    import torch

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, str(worker), str(rank), port, str(out), *args],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in range(WORLD)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks of {worker.name} hung (over {timeout} s)")
    finally:
        for proc in procs:  # a rank that failed leaves the other waiting: bounded
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank}:\n" + "\n".join(logs)[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@contextmanager
def process_group(rank: int, port: int | str, timeout: float = 60) -> Iterator[None]:
    """This worker in the two ranks' ``gloo`` group (one CPU thread) until the block ends;
    a collective the other rank never joins raises after ``timeout`` seconds."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=timeout))
    try:
        yield
    finally:
        dist.destroy_process_group()
