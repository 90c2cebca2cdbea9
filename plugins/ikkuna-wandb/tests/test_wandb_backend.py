"""The ``wandb`` backend in offline mode (no network): the run's ``.wandb`` file is read
back record by record (LevelDB-log framing, CRC-checked, of ``wandb_internal_pb2.Record``
messages) and every scalar and histogram the bus wrote is found at its step."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import ikkuna_core
from ikkuna_core.testing import MemoryBackend
from ikkuna_wandb import WandbBackend

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

STEPS = 3


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    (tmp_path / "wandb-dir").mkdir()


def read_wandb_file(path: Path, timeout: float = 60.0) -> list[Any]:
    """Every ``Record`` of a ``.wandb`` file, once it is complete (its last record the run's
    ``exit``: wandb's service may still be writing it when ``run.finish()`` returns)."""
    deadline = time.monotonic() + timeout
    while True:
        records = _read_records(path)
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} has no exit record after {timeout} s")
        time.sleep(0.2)


def _read_records(path: Path) -> list[Any]:
    """The complete records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic 0xBEE1,
    version 0), then LevelDB-log records in 32 KiB blocks: CRC32 (of the type byte and the
    data), length, type (1 full, 2 first, 3 middle, 4 last), data. A record still being
    written at the end is left out."""
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block, pos, records, partial = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if (crc, length, kind) == (0, 0, 0):
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        if len(chunk) < length:  # still being written
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            records.append(partial + chunk)
    parsed = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def history(path: Path) -> dict[int, dict[tuple[str, ...], Any]]:
    """The logged rows by step: {step: {nested key: value}}."""
    rows: dict[int, dict[tuple[str, ...], Any]] = {}
    for record in read_wandb_file(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = rows.setdefault(record.history.step.num, {})
        for item in record.history.item:
            key = tuple(item.nested_key) if item.nested_key else (item.key,)
            row[key] = json.loads(item.value_json)
    return rows


def run_file(root: Path) -> Path:
    (found,) = root.rglob("run-*.wandb")
    return found


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _config(log_dir: Path, **options: Any) -> dict[str, Any]:
    return {
        "plugins": ["norms", "histograms", "wandb"],
        "backends": ["wandb"],
        "backend_options": {"wandb": options},
        "log_dir": str(log_dir),
        "on_error": "raise",
        "subscribers": [
            {"name": "norm", "topics": ["weight_gradients", "weights"]},
            {"name": "histogram", "topics": ["weights", "weight_gradients", "biases"],
             "bins": 12},
        ],
    }


def _train(model: nn.Module, config: dict[str, Any]) -> tuple[WandbBackend, MemoryBackend]:
    exporter = ikkuna_core.watch(model, nn.CrossEntropyLoss(), config)
    (backend,) = [b for b in exporter.bus.backends if isinstance(b, WandbBackend)]
    memory = MemoryBackend()
    exporter.bus.add_backend(memory)
    assert exporter.loss_fn is not None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    for _ in range(STEPS):
        optimizer.zero_grad()
        exporter.loss_fn(model(x), y).backward()
        optimizer.step()
    exporter.close()
    return backend, memory


def test_offline_run_holds_every_scalar_and_histogram_at_its_step(tmp_path: Path) -> None:
    backend, memory = _train(_model(), _config(tmp_path / "run", mode="offline", project="t"))
    assert not backend.joined and wandb.run is None  # started, then finished at close
    rows = history(run_file(tmp_path / "run" / "wandb"))  # its files are inside log_dir
    assert sorted(rows) == list(range(STEPS))
    assert len(memory.scalars) == 4 * STEPS
    for r in memory.scalars:
        assert rows[r.step][(r.tag,)] == r.value
    assert len(memory.histograms) == 6 * STEPS
    for r in memory.histograms:
        assert rows[r.step][(r.tag, "_type")] == "histogram"
        assert rows[r.step][(r.tag, "values")] == r.counts.tolist()
        assert np.allclose(rows[r.step][(r.tag, "bins")], r.edges, rtol=1e-12, atol=0)
    config = {
        record.config.update[0].key: json.loads(record.config.update[0].value_json)
        for record in read_wandb_file(run_file(tmp_path / "run" / "wandb"))
        if record.WhichOneof("record_type") == "config" and record.config.update
    }
    assert config["ikkuna"]["subscribers"][0] == {
        "name": "norm", "topics": ["weight_gradients", "weights"]
    }


def test_watch_names_are_the_names_wandb_watch_uses(tmp_path: Path) -> None:
    model = _model()
    run = wandb.init(mode="offline", project="t", dir=str(tmp_path / "theirs"))
    # idx=0: the names of a process's first watched model (wandb prefixes later ones with
    # graph_<n>, and another test of the same process may have watched one already)
    wandb.watch(model, log="all", log_freq=1, idx=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    for step in range(2):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        run.log({"loss": loss.item()}, step=step)
    run.finish()
    theirs = {k[0] for row in history(run_file(tmp_path / "theirs")).values() for k in row
              if k[0].startswith(("gradients/", "parameters/"))}
    # wandb.watch's parameter and gradient panels; Ikkuna's biases' gradients are not
    # subscribed here, so they are the one thing missing
    config = _config(tmp_path / "run", mode="offline", project="t", watch_names=True)
    config["subscribers"][1]["topics"].append("bias_gradients")
    _, memory = _train(_model(), config)
    ours = {k[0] for row in history(run_file(tmp_path / "run")).values() for k in row
            if k[0].startswith(("gradients/", "parameters/"))}
    assert theirs == {f"{s}/{m}.{p}" for s in ("gradients", "parameters") for m in ("0", "2")
                      for p in ("weight", "bias")}
    assert ours == theirs
    assert not any(r.tag in {k[0] for row in history(run_file(tmp_path / "run")).values()
                             for k in row} for r in memory.histograms)


def test_joins_the_active_run_and_leaves_it_open(tmp_path: Path) -> None:
    run = wandb.init(mode="offline", project="mine", dir=str(tmp_path / "mine"))
    try:
        backend, memory = _train(_model(), _config(tmp_path / "run"))
        assert backend.run is run and backend.joined
        assert wandb.run is run  # still open for the user's own logging
        run.log({"after": 1.0}, step=STEPS)
    finally:
        run.finish()
    assert not (tmp_path / "run" / "wandb").exists()
    rows = history(run_file(tmp_path / "mine"))
    for r in memory.scalars:
        assert rows[r.step][(r.tag,)] == r.value
    assert rows[STEPS][("after",)] == 1.0


def test_a_bad_mode_is_named_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ikkuna_core.ConfigError, match=r"backend_options\.wandb\.mode"):
        ikkuna_core.watch(_model(), None, _config(tmp_path / "run", mode="offlin"))
    assert not (tmp_path / "run").exists()


def test_no_login_is_a_clear_configuration_error(tmp_path: Path) -> None:
    # a process of its own: wandb keeps the settings of its first run for the process
    script = f"""
import ikkuna_core, torch
config = {{"plugins": ["wandb"], "backends": ["wandb"], "log_dir": {str(tmp_path / "run")!r}}}
try:
    ikkuna_core.watch(torch.nn.Linear(2, 2), None, config)
except ikkuna_core.ConfigError as exc:
    print("ConfigError:", exc)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"), WANDB_SILENT="true",
               WANDB_DIR=str(tmp_path / "wandb-dir"), WANDB_CONFIG_DIR=str(tmp_path / "cfg"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"ConfigError: .*backend_options\.wandb: could not start a W&B run "
                     r".*mode = \"offline\"", done.stdout), done.stdout + done.stderr[-2000:]
