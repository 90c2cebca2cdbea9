"""Tests for ``ikkuna train`` and ``ikkuna report`` (commands of the installed ikkuna-train
plugin, run through the core's ``ikkuna`` command): every option, in-process through
``main(argv)``, plus one real subprocess through the installed console script."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ikkuna_core import load_config
from ikkuna_core.cli import build_parser, main
from ikkuna_core.plugins import installed_entry_points
from ikkuna_train.data import make_loaders
from ikkuna_train.models import get_model

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
INSTALLED = {ep.name for ep in installed_entry_points()}
ALL_PLUGINS = {"norms", "histograms", "accuracy"}
#: What each plugin declares for a run without --config (its ikkuna_default_subscribers), in
#: the order plugins load (by name).
DEFAULTS = {
    "accuracy": [
        {"name": "loss"},
        {"name": "train_accuracy"},
        {"name": "test_accuracy", "subsample": 10},
    ],
    "histograms": [{"name": "histogram", "topics": ["activations"]}, {"name": "dead_fraction"}],
    "norms": [
        {"name": "norm", "topics": ["weight_gradients"]},
        {"name": "spectral_norm", "topics": ["weights"]},
        {"name": "ratio", "topics": ["weight_updates", "weights"]},
    ],
}
QUICKSTART = [e for plugin in sorted(DEFAULTS) if plugin in INSTALLED for e in DEFAULTS[plugin]]
#: A scalar (or histogram) tag each quickstart subscriber writes for FullyConnected.
QUICKSTART_TAGS = {
    "loss": ("accuracy", "loss/loss"),
    "train_accuracy": ("accuracy", "train_accuracy"),
    "test_accuracy": ("accuracy", "test_accuracy"),
    "norm": ("norms", "norm/weight_gradients/net.1"),
    "spectral_norm": ("norms", "spectral_norm/weights/net.3"),
    "ratio": ("norms", "ratio/weight_updates/weights/net.5"),
    "dead_fraction": ("histograms", "dead_fraction/activations/net.2"),
    "histogram": ("histograms", "histogram/activations/net.1"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def needs(*plugins: str) -> pytest.MarkDecorator:
    missing = sorted(set(plugins) - INSTALLED)
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def read_events(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """Scalars and histogram tags of a run, read back with EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    return scalars, list(tags["histograms"])


def epoch_lines(text: str) -> list[str]:
    return re.findall(r"^epoch\s+\d+/\d+\s+step\s+\d+/\d+\s+loss .*$", text, flags=re.M)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def own_test_accuracy(model_path: Path) -> float:
    model = get_model("FullyConnected", input_shape=(1, 28, 28), num_classes=10)
    model.load_state_dict(torch.load(model_path, weights_only=True))
    model.eval()
    _, test_loader, _ = make_loaders("digits", batch_size=50)
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in test_loader)
    return hits / len(test_loader.dataset)


def config_file(tmp_path: Path, body: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text("[ikkuna]\n" + body)
    return path


class OwnRecord:
    """What a run trained in this process did, seen through torch's global hooks, no Ikkuna
    code involved: for each optimizer step, every parameter (by dotted name) before and after
    the step and its gradient, every module's output in the step's training forward, and the
    loss module's output, labels and value."""

    def __init__(self) -> None:
        from torch.nn.modules.module import register_module_forward_hook
        from torch.optim.optimizer import (
            register_optimizer_step_post_hook,
            register_optimizer_step_pre_hook,
        )

        self.steps: list[dict[str, Any]] = []
        self._current: dict[str, Any] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # id(module) -> output, this forward
        self._names: dict[int, str] = {}  # id(parameter) -> dotted name
        self.handles = [
            register_module_forward_hook(self._forward),
            register_optimizer_step_pre_hook(self._pre),
            register_optimizer_step_post_hook(self._post),
        ]

    def _forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation
        if isinstance(module, torch.nn.CrossEntropyLoss):
            if "loss" not in self._current:  # the step's first loss
                self._current["loss"] = tuple(t.detach().clone() for t in (*args[:2], output))
            return
        if "outputs" in self._current:
            return  # a later forward of the step
        if isinstance(output, torch.Tensor):
            self._outputs[id(module)] = output.detach().clone()
        if type(module).__name__ == "FullyConnected":  # the model: its hook runs last
            names = {id(m): n for n, m in module.named_modules()}
            self._current["outputs"] = {names[i]: t for i, t in self._outputs.items()}
            self._names = {id(p): n for n, p in module.named_parameters()}
            self._outputs = {}

    def _params(self, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        return {self._names[id(p)]: p for g in optimizer.param_groups for p in g["params"]}

    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        params = self._params(optimizer)
        self._current["before"] = {n: p.detach().clone() for n, p in params.items()}
        self._current["grads"] = {n: p.grad.clone() for n, p in params.items()}

    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._current["after"] = {n: p.detach().clone() for n, p in self._params(optimizer).items()}
        self.steps.append(self._current)
        self._current = {}

    def value(self, tag: str, step: int) -> float:
        """The value ``tag`` of the quickstart's subscribers should have at ``step``."""
        s = self.steps[step]
        out, labels, loss = s["loss"]
        if tag == "loss/loss":
            return float(loss)
        if tag == "loss/loss/running_mean":  # window = 50
            return float(np.mean([float(t["loss"][2]) for t in self.steps[: step + 1][-50:]]))
        if tag == "train_accuracy":
            return float((out.argmax(1) == labels).double().mean())
        metric, _, key = tag.rpartition("/")
        if metric == "dead_fraction/activations":
            return float((s["outputs"][key] == 0).double().mean())
        w = s["after"][f"{key}.weight"].double()
        if metric == "norm/weight_gradients":
            return float(s["grads"][f"{key}.weight"].double().norm())
        if metric == "spectral_norm/weights":
            return float(torch.linalg.matrix_norm(w, ord=2))
        if metric == "ratio/weight_updates/weights":
            return float((w - s["before"][f"{key}.weight"].double()).norm() / w.norm())
        raise KeyError(tag)


def assert_quickstart_values(log_dir: Path, record: OwnRecord, steps: int) -> None:
    """Each quickstart subscriber whose plugin is installed wrote, at every step, the value
    the run's own tensors give (test accuracy aside: the trained model's is checked on its
    own)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, histograms = read_events(log_dir)
    assert len(record.steps) == steps
    for name, (plugin, tag) in QUICKSTART_TAGS.items():
        if plugin not in INSTALLED:
            continue
        assert tag in scalars or tag in histograms, f"{name}: {tag} missing"
        if name in ("test_accuracy", "histogram"):
            continue
        assert scalars[tag] == [
            (step, pytest.approx(record.value(tag, step), rel=rel_tolerance(tag), abs=1e-7))
            for step in range(steps)
        ], tag
    if "accuracy" in INSTALLED:
        assert scalars["loss/loss/running_mean"] == [
            (step, pytest.approx(record.value("loss/loss/running_mean", step), rel=1e-5))
            for step in range(steps)
        ]
    if "histograms" in INSTALLED:
        acc = EventAccumulator(str(log_dir), size_guidance={"histograms": 0})
        acc.Reload()
        events = acc.Histograms("histogram/activations/net.1")
        assert [e.step for e in events] == list(range(steps))
        for e in events:
            act = record.steps[e.step]["outputs"]["net.1"].double()
            h = e.histogram_value
            assert h.num == act.numel()  # 64 x 256: not above max_samples, all binned
            assert (h.min, h.max) == pytest.approx((float(act.min()), float(act.max())))
            assert h.sum == pytest.approx(float(act.sum()), rel=1e-4, abs=1e-3)


def rel_tolerance(tag: str) -> float:
    """How close a logged value must be to :meth:`OwnRecord.value`: the spectral norm is a
    few power iterations a step; a norm of float32 values is summed in float32 (over net.1's
    200,704 weights, Adam's first update of nearly equal entries is off by ~7e-5 relative
    from the float64 value computed here)."""
    return 5e-3 if tag.startswith("spectral_norm") else 2e-4 if tag.startswith("ratio") else 1e-5


@pytest.fixture
def own_record() -> Iterator[OwnRecord]:
    record = OwnRecord()
    yield record
    for handle in record.handles:
        handle.remove()


# ------------------------------------------------------------------ the quickstart run


def test_quickstart_run(tmp_path: Path, own_record: OwnRecord) -> None:
    """`ikkuna train` with every default, cut short (12 steps of 64 images): one run, checked
    from every side (one test, so that parallel test workers do not each train it)."""
    log_dir = tmp_path / "run"
    code, out, err = run_cli(
        "train", "--max-steps", 12, "-b", 64, "--seed", 1, "--log-dir", log_dir, "--progress",
        "--device", "cpu",
    )
    assert code == 0, err

    # what it writes
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert (log_dir / "model.pt").is_file()
    figures = sorted(p.name for p in (log_dir / "figures").glob("*.png"))
    assert "epoch__accuracy.png" in figures
    width, height = png_size(log_dir / "dashboard.png")
    assert width == 1620 and 800 <= height <= 2400
    doc = json.loads((log_dir / "run.json").read_text())
    assert doc["subscribers"] == [e["name"] for e in QUICKSTART]
    assert doc["ikkuna_config"]["subscribers"] == QUICKSTART
    assert doc["hparams"]["model"] == "FullyConnected" and doc["hparams"]["dataset"] == "digits"
    assert doc["hparams"]["optimizer"] == "Adam" and doc["hparams"]["batch_size"] == 64
    assert doc["backends"] == ["tensorboard", "matplotlib"]
    assert doc["steps"] == 12

    # the one-screen summary and the progress bar
    assert f"tensorboard --logdir {log_dir}" in out
    assert str(log_dir / "dashboard.png") in out
    assert f"{len(figures)} PNGs in {log_dir / 'figures'}" in out
    assert re.search(r"accuracy\s+train 0\.\d{4}\s+test 0\.\d{4}", out)
    assert "FullyConnected on digits: 12 steps, 1 epoch, Adam" in out  # not "1 epochs"
    assert len(out.splitlines()) <= 25
    assert "12/12" in err and "loss=" in err and "test_acc=" in err
    # stdout is not a terminal here: a line when training starts and one per epoch
    first = f"training FullyConnected on digits: 12 steps in 1 epoch, logs in {log_dir}\n"
    assert out.startswith(first)
    assert len(epoch_lines(out)) == 1 and "step     12/12" in out

    # every plugin's metrics are in the TensorBoard logs, with the values the run's own
    # tensors give (seen through torch's hooks)
    scalars, _ = read_events(log_dir)
    assert_quickstart_values(log_dir, own_record, 12)
    if "accuracy" in INSTALLED:
        assert [s for s, _ in scalars["test_accuracy"]] == [0, 10]  # subsample = 10

    # the logged final test accuracy is the saved model's, computed here
    own = own_test_accuracy(log_dir / "model.pt")
    assert scalars["final/accuracy/test"] == [(11, pytest.approx(own, abs=1e-6))]
    assert f"test {own:.4f}" in out
    assert doc["test_accuracy"] == pytest.approx(own)

    # `ikkuna report` redraws the same dashboard elsewhere
    out_png = tmp_path / "dash.png"
    code, out, err = run_cli("report", log_dir, "-o", out_png)
    assert code == 0, err
    size = png_size(out_png)
    assert size == (width, height)
    assert f"dashboard written to {out_png} ({size[0]} x {size[1]} px)" in out


def test_report_command_errors(tmp_path: Path) -> None:
    code, out, err = run_cli("report", tmp_path / "missing")
    assert (code, out) == (2, "")
    assert err == f"ikkuna: error: log directory {tmp_path / 'missing'} does not exist\n"
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("report", tmp_path / "empty")
    assert code == 2 and "no TensorBoard event files" in err


# -------------------------------------------------------------------- train options


@needs(*ALL_PLUGINS)
def test_flags_add_subscribers_to_the_config_file(tmp_path: Path, own_record: OwnRecord) -> None:
    cfg = config_file(tmp_path, 'backends = ["tensorboard"]\n')
    log_dir = tmp_path / "run"
    code, _, err = run_cli(
        "train",
        "--config",
        cfg,
        "--log-dir",
        log_dir,
        "--max-steps",
        5,
        "-b",
        32,
        "-s",
        2,
        "--spectral-norm",
        "--histogram",
        "--ratio",
        "--test-accuracy",
        "--train-accuracy",
        "--no-report",
        "--device",
        "cpu",
    )
    assert code == 0, err
    doc = json.loads((log_dir / "run.json").read_text())
    assert doc["subscribers"] == [  # in the order of the plugins' flags
        "train_accuracy",
        "test_accuracy",
        "histogram",
        "spectral_norm",
        "ratio",
    ]
    assert doc["backends"] == ["tensorboard"]  # from the file: no figures
    assert not (log_dir / "figures").exists()
    scalars, histograms = read_events(log_dir)
    for tag in (
        "spectral_norm/weights/net.1",
        "ratio/weight_updates/weights/net.1",
        "train_accuracy",
        "test_accuracy",
    ):
        assert [s for s, _ in scalars[tag]] == [0, 2, 4], tag  # -s 2
        if tag != "test_accuracy":
            assert [v for _, v in scalars[tag]] == [
                pytest.approx(own_record.value(tag, s), rel=rel_tolerance(tag), abs=1e-7)
                for s in (0, 2, 4)
            ], tag
    assert "histogram/activations/net.1" in histograms


@needs("norms", "histograms")
def test_flag_does_not_duplicate_and_file_subsample_wins(tmp_path: Path) -> None:
    cfg = config_file(
        tmp_path,
        'backends = ["tensorboard"]\n[[ikkuna.subscribers]]\nname = "spectral_norm"\n'
        "subsample = 3\n",
    )
    log_dir = tmp_path / "run"
    code, _, err = run_cli(
        "train",
        "--config",
        cfg,
        "--log-dir",
        log_dir,
        "--max-steps",
        7,
        "-b",
        32,
        "--spectral-norm",
        "--histogram",
        "-s",
        2,
        "--depth",
        1,
        "--no-report",
    )
    assert code == 0, err
    doc = json.loads((log_dir / "run.json").read_text())
    assert doc["subscribers"] == ["spectral_norm", "histogram"]
    assert doc["ikkuna_config"]["depth"] == 1
    scalars, histograms = read_events(log_dir)
    # --depth 1 watches FullyConnected's one child, the Sequential `net`: its parameters are
    # reported under it (net.1.weight, ...), the spectral norms once per step, every third
    # step as the file says (not every second, as -s 2 would), one activation histogram.
    spectral = sorted(t for t in scalars if t.startswith("spectral_norm"))
    assert spectral and all(t.startswith("spectral_norm/weights/net.") for t in spectral)
    for tag in spectral:
        assert [s for s, _ in scalars[tag]] == [0, 3, 6], tag
    assert histograms == ["histogram/activations/net"]


def test_visualisation_and_log_dir_choices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = ("train", "--max-steps", 1, "-b", 256, "--plugins", "", "--no-report")

    code, out, _ = run_cli(*base, "-v", "mpl", "--log-dir", "mpl")
    assert code == 0
    assert list((tmp_path / "mpl" / "figures").glob("*.png"))
    assert not list((tmp_path / "mpl").glob("events.out.tfevents.*"))
    assert "tensorboard --logdir" not in out

    code, out, _ = run_cli(*base, "-v", "tb", "--log-dir", "tb")
    assert code == 0 and not (tmp_path / "tb" / "figures").exists()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

    # default log dir: runs/<model>-<dataset>-<time>, relative to the working directory
    code, out, _ = run_cli(*base, "-v", "tb")
    (made,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"FullyConnected-digits-\d{8}-\d{6}", made.name)
    assert f"tensorboard --logdir {Path('runs') / made.name}" in out

    # a configuration file's log_dir and backends are used unless the flags say otherwise
    cfg = config_file(tmp_path, 'log_dir = "from_file"\nbackends = ["matplotlib"]\n')
    assert run_cli(*base, "--config", cfg)[0] == 0
    assert list((tmp_path / "from_file" / "figures").glob("*.png"))
    assert run_cli(*base, "--config", cfg, "-v", "tb", "--overwrite")[0] == 0
    assert list((tmp_path / "from_file").glob("events.out.tfevents.*"))
    assert not list((tmp_path / "from_file" / "figures").glob("*.png"))  # the first run's


def test_v_takes_any_installed_backend_and_overwrite_replaces_its_files(
    tmp_path: Path,
) -> None:
    if "mlflow" not in INSTALLED:
        pytest.skip("not installed: mlflow")
    from mlflow.tracking import MlflowClient

    log_dir = tmp_path / "run"
    base = ("train", "--max-steps", 2, "-b", 512, "--plugins", "norms,mlflow", "--no-report",
            "--log-dir", log_dir)
    code, _, err = run_cli(*base, "-v", "tb,mlflow,tb")
    assert code == 0, err
    assert list(log_dir.glob("events.out.tfevents.*")) and (log_dir / "mlflow.db").is_file()
    for name in ("run.json", "model.pt"):
        (log_dir / name).unlink()
    for events in log_dir.glob("events.out.tfevents.*"):
        events.unlink()
    code, _, err = run_cli(*base, "-v", "mlflow")  # only the MLflow store is left
    assert code == 2 and "already holds a run (mlartifacts, mlflow.db)" in err
    code, _, err = run_cli(*base, "-v", "mlflow", "--overwrite")
    assert code == 0, err
    client = MlflowClient(tracking_uri=f"sqlite:///{log_dir / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "ikkuna"]
    (run,) = client.search_runs([experiment.experiment_id])  # the new run alone
    assert run.data.params["ikkuna.backends"] == '["mlflow"]'
    code, out, err = run_cli(*base, "-v", "tb,nope", "--overwrite")
    assert (code, out) == (2, "")
    assert "argument -v/--visualisation: invalid choice: 'nope' (choose from both, mpl, tb, " \
        "matplotlib, mlflow, tensorboard" in err


def test_hyperparameter_options_reach_the_run(tmp_path: Path) -> None:
    log_dir = tmp_path / "run"
    code, out, err = run_cli(
        "train",
        "-m",
        "fullyconnected",
        "-d",
        "DIGITS",
        "-b",
        100,
        "-e",
        2,
        "-o",
        "sgd",
        "--lr",
        0.2,
        "--seed",
        5,
        "--device",
        "cpu",
        "--data-dir",
        tmp_path / "data",
        "--init",
        "xavier",
        "--plugins",
        "",
        "-v",
        "tb",
        "--log-dir",
        log_dir,
        "--no-report",
        "-V",
        "--threads",
        2,
    )
    assert code == 0, err
    hp = json.loads((log_dir / "run.json").read_text())["hparams"]
    assert hp == {
        "model": "FullyConnected",
        "dataset": "digits",
        "batch_size": 100,
        "epochs": 2,
        "optimizer": "SGD",
        "lr": 0.2,
        "seed": 5,
        "device": "cpu",
        "init": "xavier",
        "max_steps": None,
        "data_dir": str(tmp_path / "data"),
        "download": False,
        "num_workers": 0,
        "threads": 2,
    }
    assert json.loads((log_dir / "run.json").read_text())["steps"] == 2 * 15  # 1437 / 100
    assert torch.get_num_threads() == 2
    # -V: the plan and one line per epoch
    assert "hyper-parameters: model=FullyConnected" in out
    assert len(epoch_lines(out)) == 2
    assert not (tmp_path / "data").exists()  # digits needs no data directory


def test_train_defaults_and_help() -> None:
    args = build_parser().parse_args(["train"])
    assert (args.model, args.dataset, args.batch_size, args.optimizer) == (
        "FullyConnected",
        "digits",
        128,
        "Adam",
    )
    assert args.epochs is None  # 10, or as many as --max-steps needs
    assert (args.lr, args.subsample, args.depth, args.visualisation, args.seed) == (
        None,
        None,
        None,
        None,
        0,
    )
    assert (args.download, args.overwrite, args.threads) == (False, False, None)
    code, out, _ = run_cli("train", "--help")
    assert code == 0
    for option in (
        "-m",
        "--model",
        "-d",
        "--dataset",
        "-b",
        "--batch-size",
        "-e",
        "--epochs",
        "-o",
        "--optimizer",
        "--lr",
        "-s",
        "--subsample",
        "-v",
        "--visualisation",
        "-V",
        "--verbose",
        "--spectral-norm",
        "--histogram",
        "--ratio",
        "--test-accuracy",
        "--train-accuracy",
        "--depth",
        "--config",
        "--plugins",
        "--seed",
        "--log-dir",
        "--device",
        "--data-dir",
        "--max-steps",
        "--threads",
        "--download",
        "--overwrite",
        "--init",
        "--no-report",
        "--progress",
    ):
        assert re.search(rf"(^|[\s,\[]){re.escape(option)}\b", out), option
    code, out, _ = run_cli("--help")
    assert code == 0
    assert re.search(r"^    train\s+train a model with Ikkuna watching", out, re.M)
    assert re.search(r"^    report\s+write a dashboard image", out, re.M)
    assert out.count("[train]") == 2  # both from the plugin called train


# ------------------------------------------------------------------------ bad input

def only_the_train_plugin() -> list[EntryPoint]:
    return [ep for ep in installed_entry_points() if ep.name == "train"]


@pytest.mark.parametrize(
    "flag", ["--spectral-norm", "--ratio", "--histogram", "--train-accuracy", "--test-accuracy"]
)
def test_a_flag_comes_only_with_its_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str
) -> None:
    """With no metric plugin installed, the flags are not there (the real uninstall is in
    test_installed_plugins.py)."""
    monkeypatch.setattr("ikkuna_core.plugins.installed_entry_points", only_the_train_plugin)
    monkeypatch.delenv("IKKUNA_PLUGINS")  # every installed plugin: that one
    code, out, _ = run_cli("train", "--help")
    assert code == 0 and not re.search(rf"^\s+{flag}\b", out, re.M)  # no such option
    code, out, err = run_cli("train", flag, "--log-dir", tmp_path / "run")
    assert (code, out) == (2, "")
    assert err.splitlines()[-1] == (
        f"ikkuna: error: unrecognized arguments: {flag} (`ikkuna train --help` lists the "
        "options, those of the installed plugins included)"
    )
    assert not (tmp_path / "run").exists()


def test_without_metric_plugins_the_run_has_no_subscribers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ikkuna_core.plugins.installed_entry_points", only_the_train_plugin)
    monkeypatch.delenv("IKKUNA_PLUGINS")  # every installed plugin: that one
    code, out, err = run_cli("train", "--max-steps", 2, "-v", "tb", "--log-dir", tmp_path / "r",
                             "--no-report")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "run.json").read_text())["subscribers"] == []
    assert re.search(r"subscribers\s+\(none\)", out)


def test_report_goes_on_when_an_unnamed_plugin_fails_to_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken plugin the user did not ask for: a warning with its cause; ikkuna train and
    ikkuna report run."""
    broken = EntryPoint(name="broken", value="ikkuna_no_such_module_xyz", group="ikkuna")
    monkeypatch.setattr(
        "ikkuna_core.plugins.installed_entry_points",
        lambda: sorted([*only_the_train_plugin(), broken], key=lambda ep: ep.name),
    )
    monkeypatch.delenv("IKKUNA_PLUGINS")  # every installed plugin: these two
    warning = (
        "ikkuna: warning: plugin 'broken' (distribution None None, ikkuna_no_such_module_xyz) "
        "failed to import: ModuleNotFoundError: No module named 'ikkuna_no_such_module_xyz'; "
        "skipped"
    )
    code, _, err = run_cli("train", "--max-steps", 2, "-v", "tb", "--log-dir", tmp_path / "r")
    assert code == 0 and err.splitlines().count(warning) == 1, err  # said once
    code, _, err = run_cli("report", tmp_path / "r", "-o", tmp_path / "d.png")
    assert code == 0 and warning in err.splitlines()
    assert png_size(tmp_path / "d.png")[0] > 0
    code, _, err = run_cli("train", "--plugins", "broken", "--log-dir", tmp_path / "s")
    assert code == 2  # asked for by name: an error, as before
    assert "ikkuna: error: plugin 'broken'" in err and "ModuleNotFoundError" in err
    assert not (tmp_path / "s").exists()


@needs("norms", "histograms")
def test_flag_whose_plugin_is_not_enabled(tmp_path: Path) -> None:
    code, _, err = run_cli("train", "--plugins", "histograms", "--ratio", "--log-dir", tmp_path)
    assert code == 2
    assert "--ratio needs the 'norms' plugin, which --plugins does not enable" in err
    assert "--plugins histograms,norms" in err
    assert not list(tmp_path.iterdir())


@needs("norms")
def test_flag_whose_plugin_the_environment_disables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IKKUNA_PLUGINS", "")
    code, _, err = run_cli("train", "--spectral-norm", "--log-dir", tmp_path / "run")
    assert code == 2
    assert err == (
        "ikkuna: error: --spectral-norm needs the 'norms' plugin, which is installed but not "
        "enabled (IKKUNA_PLUGINS=''); add it to IKKUNA_PLUGINS or unset it\n"
    )
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("IKKUNA_PLUGINS", "norms")
    code, _, err = run_cli("train", "--max-steps", 1, "-v", "tb", "--no-report", "--log-dir",
                           tmp_path / "run")
    assert code == 0, err
    left_out = sorted(INSTALLED & {"accuracy", "histograms"})
    if left_out:
        assert err == (
            f"ikkuna: note: the default subscribers of plugin(s) {', '.join(left_out)} are left "
            "out: installed but not enabled by IKKUNA_PLUGINS; see `ikkuna plugins`\n"
        )
    doc = json.loads((tmp_path / "run" / "run.json").read_text())
    assert doc["subscribers"] == ["norm", "spectral_norm", "ratio"]


def test_unavailable_dataset_is_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ikkuna_train.data import DatasetUnavailableError

    def offline(name: str, **kwargs: object) -> None:
        raise DatasetUnavailableError(f"Dataset {name} is not available: download failed")

    monkeypatch.setattr("ikkuna_train.data.make_loaders", offline)
    code, out, err = run_cli("train", "-d", "mnist", "--log-dir", tmp_path / "run")
    assert (code, out) == (1, "")
    assert err == "ikkuna: error: Dataset MNIST is not available: download failed\n"
    assert not (tmp_path / "run").exists()


BAD_CONFIGS = {
    "syntax": ('[ikkuna\nbackends = "x"\n', r"is not valid TOML"),
    "no_table": ("[run]\nx = 1\n", r"has no \[ikkuna\] table; tables found: \['run'\]"),
    "unknown_key": (
        '[ikkuna]\ncolour = "red"\n',
        r"ikkuna\.colour: Extra inputs are not permitted; valid keys: backend_options, backends, "
        r"budget, compile_metrics, ddp_forward, depth",
    ),
    "bad_option": (
        '[ikkuna]\n[[ikkuna.subscribers]]\nname = "norm"\np = "two"\n',
        r"ikkuna\.subscribers\[0\]\.p: p must be a number > 0 or 'inf', got 'two' "
        r"\(subscriber 'norm'\)$",
    ),
    "wrong_type": ('[ikkuna]\ndepth = "deep"\n', r"ikkuna\.depth: Input should be a valid"),
    "unknown_subscriber": (
        '[ikkuna]\n[[ikkuna.subscribers]]\nname = "nrom"\n',
        r"ikkuna\.subscribers\[0\]\.name: unknown subscriber 'nrom'; available: ",
    ),
    "unknown_backend": (
        '[ikkuna]\nbackends = ["nope"]\n',
        r"unknown backend 'nope'; available: matplotlib, (mlflow, )?tensorboard",
    ),
}


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["-m", "ResNet50"], id="model"),
        pytest.param(["-d", "mnst"], id="dataset"),
        pytest.param(["-o", "adamm"], id="optimizer"),
        pytest.param(["--init", "he"], id="init"),
        pytest.param(["--device", "bogus"], id="device"),
        pytest.param(["--plugins", "nosuch"], id="plugins"),
        pytest.param(["--config", "{tmp}/missing.toml"], id="missing_config"),
        *[pytest.param(["--config", f"{{tmp}}/{k}.toml"], id=f"config_{k}") for k in BAD_CONFIGS],
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path: Path, argv: list[str]) -> None:
    if "bad_option" in argv[-1] and "norms" not in INSTALLED:
        pytest.skip("the option error is the norms plugin's")
    for name, (body, _) in BAD_CONFIGS.items():
        (tmp_path / f"{name}.toml").write_text(body)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    log_dir = tmp_path / "run"
    code, out, err = run_cli("train", *argv, "--log-dir", log_dir, "--max-steps", 1)
    assert (code, out) == (2, "")
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ikkuna: error: "), err
    expected = {
        "-m": r"unknown model 'ResNet50'.*choose one of: FullyConnected, AlexNetMini.*; also "
        r"accepted: ResNet \(= ResNet18\)",
        "-d": r"unknown dataset 'mnst' \(did you mean 'MNIST'\?\)",
        "-o": r"unknown optimizer 'adamm' \(did you mean 'Adam'\?\); choose one of: SGD",
        "--init": r"unknown init scheme 'he'; choose one of: kaiming, xavier, default",
        "--device": r"invalid device 'bogus'",
        "--plugins": r"unknown plugin\(s\) 'nosuch'; installed plugins: ",
    }.get(argv[0])
    if expected is None:
        name = Path(argv[1]).stem
        expected = BAD_CONFIGS[name][1] if name in BAD_CONFIGS else r"missing\.toml does not exist"
        assert argv[1] in err  # names the file
    assert re.search(expected, err), err
    assert not log_dir.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "-1"], "argument --lr: expected a number > 0, got -1.0"),
        (["-b", "0"], "argument -b/--batch-size: expected a number >= 1, got 0"),
        (["-v", "png"], "argument -v/--visualisation: invalid choice: 'png'"),
        (["--depth", "0"], "argument --depth: expected -1 (leaf modules) or >= 1, got 0"),
        (["--epochs", "many"], "argument -e/--epochs: expected a whole number, got 'many'"),
    ],
)
def test_bad_option_values_are_reported_by_the_parser(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    code, out, err = run_cli("train", *argv, "--log-dir", tmp_path / "run")
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith("ikkuna train: error: ") and message in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ examples


def test_example_config_is_the_quickstart_set() -> None:
    cfg = load_config(EXAMPLES / "ikkuna.toml")
    entries = [{"name": e.name, **e.options} for e in cfg.subscribers]
    assert sorted(entries, key=str) == sorted(
        [e for plugin in DEFAULTS for e in DEFAULTS[plugin]], key=str
    )
    assert cfg.backends == ["tensorboard", "matplotlib"]


@needs(*ALL_PLUGINS)
def test_example_config_runs(tmp_path: Path, own_record: OwnRecord) -> None:
    log_dir = tmp_path / "run"
    code, _, err = run_cli(
        "train",
        "--config",
        EXAMPLES / "ikkuna.toml",
        "--log-dir",
        log_dir,
        "--max-steps",
        3,
        "-b",
        64,
        "-v",
        "tb",
        "--no-report",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert_quickstart_values(log_dir, own_record, 3)


@needs(*ALL_PLUGINS)
def test_plain_pytorch_example(tmp_path: Path) -> None:
    namespace = runpy.run_path(str(EXAMPLES / "plain_pytorch.py"), run_name="example")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        accuracy = namespace["main"](
            ["--epochs", "2", "--max-steps", "4", "--log-dir", str(tmp_path)]
        )
    # the example's loop, unwatched, here: the same seed, data, model, optimizer and steps
    # train the same weights, whose test accuracy the example reports
    torch.manual_seed(0)
    train_loader, test_loader, info = make_loaders("digits", batch_size=64, seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 128),
                                torch.nn.ReLU(), torch.nn.Linear(128, info.num_classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _, (x, y) in zip(range(4), train_loader, strict=False):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in test_loader)
    assert accuracy == hits / len(test_loader.dataset)
    assert f"test accuracy {accuracy:.4f}" in out.getvalue()
    scalars, histograms = read_events(tmp_path)
    assert scalars["loss/loss"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in enumerate(losses)]
    assert "histogram/activations/1" in histograms  # nn.Sequential: modules named 0, 1, ...
    assert list((tmp_path / "figures").glob("*.png"))
    source = (EXAMPLES / "plain_pytorch.py").read_text()
    assert [f"ikkuna ({i}/5)" in source for i in range(1, 6)] == [True] * 5


# ---------------------------------------------------------------------- subprocesses


def _env() -> dict[str, str]:
    env = dict(os.environ)  # IKKUNA_PLUGINS: the project's plugins (conftest.py)
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_installed_console_script(tmp_path: Path) -> None:
    script = shutil.which("ikkuna", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the ikkuna console script is not installed next to this Python")
    log_dir = tmp_path / "run"
    proc = subprocess.run(
        [script, "train", "--max-steps", "3", "-b", "64", "-v", "tb", "--log-dir", str(log_dir),
         "--device", "cpu"],  # its accuracy is compared with one computed on the CPU
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"tensorboard --logdir {log_dir}" in proc.stdout
    assert png_size(log_dir / "dashboard.png")[0] == 1620
    assert "Traceback" not in proc.stderr
    own = own_test_accuracy(log_dir / "model.pt")
    assert f"test {own:.4f}" in proc.stdout


# ----------------------------------------------------------------- rough edges, one each


def event_files(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob("events.out.tfevents.*"))


def test_a_log_dir_holding_a_run_is_refused_or_replaced_on_purpose(tmp_path: Path) -> None:
    log_dir = tmp_path / "quickstart"
    base = ("train", "--max-steps", 2, "-b", 256, "--log-dir", log_dir)
    assert run_cli(*base)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in log_dir.rglob("*") if p.is_file()}
    (first_events,) = event_files(log_dir)

    code, out, err = run_cli(*base)  # the README's command, run again
    assert (code, out) == (2, "")
    assert err.startswith(f"ikkuna: error: log directory {log_dir} already holds a run (")
    assert "Choose another --log-dir, or pass --overwrite to replace that run" in err
    after = {p: p.stat().st_mtime_ns for p in log_dir.rglob("*") if p.is_file()}
    assert after == before  # not a byte changed

    code, _, err = run_cli(*base, "--overwrite", "--seed", 3)
    assert code == 0, err
    (events,) = event_files(log_dir)  # one run's events: nothing mixed
    assert events != first_events
    assert json.loads((log_dir / "run.json").read_text())["hparams"]["seed"] == 3
    scalars, _ = read_events(log_dir)
    assert [s for s, _ in scalars["final/accuracy/test"]] == [1]


NROM = '[[ikkuna.subscribers]]\nname = "nrom"\n'


def test_a_failed_overwrite_keeps_the_earlier_run(tmp_path: Path) -> None:
    log_dir = tmp_path / "run"
    assert run_cli("train", "--max-steps", 1, "-b", 256, "-v", "tb", "--log-dir", log_dir)[0] == 0
    kept = sorted(p.name for p in log_dir.iterdir())
    for bad in (("-o", "adamm"), ("--config", config_file(tmp_path, NROM))):
        # a bad name, or a subscriber only watch() finds unknown, after the data is loaded
        code, _, err = run_cli("train", "--overwrite", *bad, "--log-dir", log_dir)
        assert code == 2 and ("'adamm'" in err or "unknown subscriber 'nrom'" in err), err
        assert sorted(p.name for p in log_dir.iterdir()) == kept


@pytest.mark.parametrize("where", ["file", "proc"])
def test_a_log_dir_that_cannot_be_written_is_refused_before_training(
    tmp_path: Path, where: str
) -> None:
    if where == "file":
        log_dir = tmp_path / "notes.txt"
        log_dir.write_text("mine")
        expected = f"ikkuna: error: log directory {log_dir} is a file, not a directory; "
    else:
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc here")
        log_dir = Path("/proc/ikkuna-cannot-write-here")
        expected = f"ikkuna: error: cannot write to log directory {log_dir} ("
    code, out, err = run_cli("train", "--log-dir", log_dir)
    assert (code, out) == (2, "")
    assert err.startswith(expected) and len(err.splitlines()) == 1, err
    if where == "file":
        assert log_dir.read_text() == "mine"
    else:
        assert not log_dir.exists()


def test_report_output_paths_and_formats(tmp_path: Path) -> None:
    from PIL import Image

    log_dir = tmp_path / "run"
    assert run_cli("train", "--max-steps", 2, "-b", 256, "--plugins", "", "--log-dir", log_dir,
                   "-v", "tb", "--no-report")[0] == 0

    code, out, err = run_cli("report", log_dir, "-o", tmp_path / "d.jpg")
    assert code == 0, err
    with Image.open(tmp_path / "d.jpg") as image:  # real JPEG bytes, not a renamed PNG
        assert image.format == "JPEG"
        size = image.size
    assert (tmp_path / "d.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    assert out == f"dashboard written to {tmp_path / 'd.jpg'} ({size[0]} x {size[1]} px)\n"
    assert run_cli("report", log_dir, "-o", tmp_path / "d.svg")[0] == 0
    assert b"<svg" in (tmp_path / "d.svg").read_bytes()[:500]

    code, out, err = run_cli("report", log_dir, "-o", tmp_path / "d.bmp")
    assert (code, out) == (2, "")
    assert err == (
        f"ikkuna: error: cannot write a dashboard to {tmp_path / 'd.bmp'}: unknown image type "
        "'.bmp'; end the name in one of .png, .jpg, .jpeg, .pdf, .svg\n"
    )
    if Path("/proc/self").is_dir():
        code, out, err = run_cli("report", log_dir, "-o", "/proc/ikkuna-x.png")
        assert (code, out) == (2, "") and err.startswith("ikkuna: error: cannot write ")
        assert len(err.splitlines()) == 1
    assert not (tmp_path / "d.bmp").exists() and not list(tmp_path.glob("*.tmp"))


def test_thesis_model_names_and_a_depth_deeper_than_the_model(tmp_path: Path) -> None:
    code, out, err = run_cli("train", "-m", "ResNet", "--depth", 99, "--log-dir", tmp_path / "r")
    assert (code, out) == (2, "")
    # -m ResNet is the thesis's ResNet-18; its modules go 4 levels down (layer1.0.conv1.?)
    from ikkuna_train.models import get_model as build

    deepest = max(n.count(".") + 1 for n, _ in build("ResNet18").named_modules() if n)
    assert err == (
        f"ikkuna: error: depth 99 is deeper than ResNet18, whose modules go {deepest} levels "
        f"down; use -1 (the leaf modules) or 1 to {deepest}\n"
    )
    assert not (tmp_path / "r").exists()


def test_max_steps_decides_the_run_length(tmp_path: Path) -> None:
    # digits: 1437 training images, batch 128 -> 12 steps per epoch
    code, _, err = run_cli("train", "--max-steps", 30, "--plugins", "", "-v", "tb",
                           "--no-report", "--log-dir", tmp_path / "a")
    assert code == 0, err
    doc = json.loads((tmp_path / "a" / "run.json").read_text())
    assert (doc["steps"], doc["epochs"], doc["hparams"]["epochs"]) == (30, 3, 3)
    assert [h["steps"] for h in doc["history"]] == [12, 24, 30]
    assert "--max-steps" not in err

    code, _, err = run_cli("train", "--max-steps", 30, "-e", 1, "--plugins", "", "-v", "tb",
                             "--no-report", "--log-dir", tmp_path / "b")
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "run.json").read_text())["steps"] == 12
    assert err == (
        "ikkuna: note: --max-steps 30 is not reached: 1 epoch of 12 steps end the run after "
        "12; leave out -e to train every step\n"
    )


def test_a_missing_dataset_is_downloaded_only_when_asked_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.request

    data = tmp_path / "data"
    code, out, err = run_cli("train", "-d", "mnist", "--data-dir", data, "--log-dir",
                             tmp_path / "run")
    assert (code, out) == (1, "")
    assert "Dataset MNIST is not available: its files are missing" in err
    assert "(ikkuna train --download" in err
    assert not data.exists() and not (tmp_path / "run").exists()

    def offline(*args: object, **kwargs: object) -> None:  # what an offline machine answers
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    data.mkdir()
    (data / "mine.txt").write_text("kept")
    code, out, err = run_cli("train", "-d", "mnist", "--download", "--data-dir", data,
                             "--log-dir", tmp_path / "run")
    assert (code, out) == (1, "")
    assert "download failed" in err and "Temporary failure in name resolution" in err
    assert sorted(p.name for p in data.rglob("*")) == ["mine.txt"]  # no empty MNIST/raw
    assert not (tmp_path / "run").exists()


def test_default_threads_are_half_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from ikkuna_train.trainer import HyperParameters, default_threads

    for cpus, threads in ((1, 1), (2, 1), (3, 1), (4, 2), (16, 8), (64, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)),
                            raising=False)
        assert default_threads() == threads, cpus
        assert HyperParameters().resolved().threads == threads
    assert HyperParameters(threads=3).resolved().threads == 3
