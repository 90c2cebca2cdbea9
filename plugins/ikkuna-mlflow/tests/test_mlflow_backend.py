"""The ``mlflow`` backend against real MLflow stores: what MlflowClient (and, once, a real
``mlflow server``'s REST API) reads back equals what an in-memory backend on the same bus
received."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import ikkuna_core
from ikkuna_core.backends import HistogramRecord
from ikkuna_core.testing import MemoryBackend
from ikkuna_mlflow import MlflowBackend, histogram_quantiles

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

STEPS = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def _config(log_dir: Path, **mlflow_options: Any) -> dict[str, Any]:
    return {
        "plugins": ["norms", "histograms", "mlflow"],
        "backends": ["mlflow"],
        "backend_options": {"mlflow": mlflow_options} if mlflow_options else {},
        "log_dir": str(log_dir),
        "on_error": "raise",
        "subscribers": [
            {"name": "norm", "topics": ["weight_gradients"]},
            {"name": "histogram", "topics": ["weights"], "bins": 16},
        ],
    }


def _train(config: dict[str, Any]) -> tuple[MlflowBackend, MemoryBackend]:
    model = _model()
    exporter = ikkuna_core.watch(model, nn.CrossEntropyLoss(), config)
    (backend,) = [b for b in exporter.bus.backends if isinstance(b, MlflowBackend)]
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


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_local_store_reads_back_what_the_bus_wrote(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    backend, memory = _train(_config(tmp_path / "run"))
    assert (tmp_path / "run" / "mlflow.db").is_file()  # nothing to set up: inside log_dir
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    run = client.get_run(backend.run_id)
    assert run.info.status == "FINISHED"

    by_tag: dict[str, list[tuple[int, float]]] = {}
    for r in memory.scalars:
        by_tag.setdefault(r.tag, []).append((r.step, r.value))
    assert sorted(by_tag) == [f"norm/weight_gradients/{k}" for k in ("0", "2", "4")]
    for tag, points in by_tag.items():
        assert _history(client, backend.run_id, tag) == sorted(points)
        assert [s for s, _ in sorted(points)] == list(range(STEPS))

    assert len(memory.histograms) == 3 * STEPS
    for r in memory.histograms:
        mean = r.sum / r.num
        want = {"min": r.min, "max": r.max, "mean": mean, "nonfinite": r.nonfinite}
        want["std"] = float(np.sqrt(r.sum_squares / r.num - mean * mean))
        for q, value in zip((5, 25, 50, 75, 95), histogram_quantiles(r, backend.quantiles),
                                   strict=True):
            want[f"p{q:02d}"] = float(value)
        for suffix, value in want.items():
            stored = dict(_history(client, backend.run_id, f"{r.tag}/{suffix}"))
            assert stored[r.step] == pytest.approx(value, rel=1e-12, abs=1e-15), suffix

    params, tags = run.data.params, run.data.tags
    assert params["ikkuna.depth"] == "-1"
    assert params["ikkuna.backends"] == '["mlflow"]'
    assert json.loads(params["ikkuna.subscribers"])[1] == {
        "name": "histogram", "topics": ["weights"], "bins": 16
    }
    assert tags["ikkuna.model.modules"] == "5"
    assert json.loads(tags["ikkuna.model.module_types"]) == {"Linear": 3, "ReLU": 2}

    names = {a.path for a in client.list_artifacts(backend.run_id, "heatmaps")}
    assert names == {"heatmaps/norm__weight_gradients.png"}
    local = client.download_artifacts(backend.run_id, "heatmaps/norm__weight_gradients.png",
                                      str(tmp_path / "dl"))
    from matplotlib.image import imread

    image = imread(local)
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert image[..., :3].std() > 0.05  # a picture, not a blank canvas
    modules = client.download_artifacts(backend.run_id, "ikkuna/modules.json", str(tmp_path))
    assert json.loads(Path(modules).read_text()) == {
        "0": "Linear", "1": "ReLU", "2": "Linear", "3": "ReLU", "4": "Linear"
    }


def test_joins_the_active_run_and_leaves_it_open(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'own.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment(
            "own", artifact_location=(tmp_path / "artifacts").as_uri()
        )
        with mlflow.start_run(experiment_id=experiment) as active:
            backend, memory = _train(_config(tmp_path / "run", synchronous=True))
            assert backend.run_id == active.info.run_id
            assert mlflow.active_run() is not None
            still = MlflowClient(tracking_uri=uri).get_run(active.info.run_id)
            assert still.info.status == "RUNNING"
    finally:
        mlflow.set_tracking_uri(None)
    assert not (tmp_path / "run" / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=uri)
    tag = memory.scalars[0].tag
    want = sorted((r.step, r.value) for r in memory.scalars if r.tag == tag)
    assert _history(client, active.info.run_id, tag) == want


def test_quantiles_from_bins_are_within_a_bin_of_numpy() -> None:
    values = np.random.default_rng(0).standard_normal(5000)
    counts, edges = np.histogram(values, bins=40)
    r = HistogramRecord("t", None, "t", 0, counts.astype(float), edges, values.min(),
                        values.max(), float(values.size), values.sum(), (values**2).sum(), 0.0)
    qs = [0.01, 0.25, 0.5, 0.9, 0.99]
    got = histogram_quantiles(r, qs)
    assert np.all(np.abs(got - np.quantile(values, qs)) <= edges[1] - edges[0])
    constant = HistogramRecord("t", None, "t", 0, np.array([7.0]), np.array([2.0, 2.0]), 2.0,
                               2.0, 7.0, 14.0, 28.0, 0.0)
    assert histogram_quantiles(constant, qs).tolist() == [2.0] * 5


def test_bad_options_are_named_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ikkuna_core.ConfigError, match=r"backend_options\.mlflow\.quantiles"):
        ikkuna_core.watch(_model(), None, _config(tmp_path / "run", quantiles=[0.5, 1.5]))
    assert not (tmp_path / "run").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read() or b"null")


def test_a_real_mlflow_server_serves_the_metric_history(tmp_path: Path) -> None:
    port = _free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_cli)] if mlflow_cli.exists() else [sys.executable, "-m", "mlflow"]
    server = subprocess.Popen(
        [*command, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "wb"),  # noqa: SIM115
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log = (tmp_path / "server.log").read_text()[-3000:]
                    pytest.fail(f"mlflow server did not come up on {base}:\n{log}")
                time.sleep(0.5)
        backend, memory = _train(_config(tmp_path / "run", tracking_uri=base))
        assert not (tmp_path / "run" / "mlflow.db").exists()
        tags = sorted({r.tag for r in memory.scalars})
        assert tags
        for tag in tags:
            query = urllib.parse.urlencode({"run_id": backend.run_id, "metric_key": tag})
            answer = _get(f"{base}/api/2.0/mlflow/metrics/get-history?{query}")
            got = sorted((int(m["step"]), float(m["value"])) for m in answer["metrics"])
            assert got == sorted((r.step, r.value) for r in memory.scalars if r.tag == tag)
        run = _get(f"{base}/api/2.0/mlflow/runs/get?run_id={backend.run_id}")["run"]
        assert run["info"]["status"] == "FINISHED"
        listed = _get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={backend.run_id}"
                      "&path=heatmaps")
        assert [f["path"] for f in listed["files"]] == ["heatmaps/norm__weight_gradients.png"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
