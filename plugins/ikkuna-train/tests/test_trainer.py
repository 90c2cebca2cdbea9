"""Tests for ikkuna_train.trainer: name look-ups, seeding, devices, log directories, and tiny
real training runs whose logged metrics are checked against values computed here,
independently."""

from __future__ import annotations

import json
import random
import types
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ikkuna_core import (
    Backend,
    ConfigError,
    HistogramRecord,
    PluginRegistry,
    ScalarRecord,
    hookimpl,
    load_plugins,
)
from ikkuna_core.plugins import PluginInfo, installed_entry_points
from ikkuna_train.data import make_loaders
from ikkuna_train.models import get_model
from ikkuna_train.trainer import (
    DEFAULT_LR,
    OPTIMIZERS,
    HyperParameters,
    LogDirError,
    Trainer,
    UsageError,
    backend_files,
    check_log_dir,
    default_device,
    make_optimizer,
    resolve_dataset,
    resolve_device,
    resolve_model,
    resolve_optimizer,
    seed_everything,
)

INSTALLED = {ep.name for ep in installed_entry_points()}


pytestmark = pytest.mark.usefixtures("one_thread")


def needs(*plugins: str) -> pytest.MarkDecorator:
    missing = sorted(set(plugins) - INSTALLED)
    return pytest.mark.skipif(
        bool(missing), reason=f"plugin(s) not installed: {', '.join(missing)}"
    )


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run, read back from its event files with EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def own_metrics(model: nn.Module, loader, device: str = "cpu") -> tuple[float, float]:
    """(accuracy, mean cross-entropy) computed here, without any Ikkuna code, on ``device``."""
    model.to(device).eval()
    correct, loss, n = 0, 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            correct += int((out.argmax(1) == y).sum())
            loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            n += len(y)
    return correct / n, loss / n


def reload_model(path: Path) -> nn.Module:
    model = get_model("FullyConnected", input_shape=(1, 28, 28), num_classes=10)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


# ------------------------------------------------------------------------- look-ups


def test_names_resolve_case_insensitively() -> None:
    assert resolve_model("fullyconnected") == "FullyConnected"
    assert resolve_model("RESNET18") == "ResNet18"
    assert resolve_model("ResNet") == "ResNet18"  # the thesis's names, as written
    assert resolve_model("FullyConnectedModel") == "FullyConnected"
    assert resolve_dataset("Digits") == "digits"
    assert resolve_dataset("cifar10") == "CIFAR10"
    assert [resolve_optimizer(n.lower()) for n in OPTIMIZERS] == list(OPTIMIZERS)


@pytest.mark.parametrize(
    ("fn", "name", "expected"),
    [
        (
            resolve_model,
            "FullyConected",
            r"unknown model 'FullyConected' \(did you mean "
            r"'FullyConnected'\?\); choose one of: FullyConnected, AlexNetMini",
        ),
        (resolve_dataset, "mnst", r"unknown dataset 'mnst' .*choose one of: digits, MNIST"),
        (resolve_optimizer, "Adagrad", r"unknown optimizer 'Adagrad'.*SGD, Adam, AdamW, RMSprop"),
    ],
)
def test_unknown_names_say_what_is_valid(fn, name: str, expected: str) -> None:
    with pytest.raises(UsageError, match=expected):
        fn(name)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_make_optimizer(name: str) -> None:
    params = [nn.Parameter(torch.zeros(3))]
    opt = make_optimizer(name.upper(), params)
    assert type(opt) is getattr(torch.optim, name)
    assert opt.param_groups[0]["lr"] == DEFAULT_LR[name]
    assert make_optimizer(name, params, lr=0.123).param_groups[0]["lr"] == 0.123
    with pytest.raises(UsageError, match="learning rate must be > 0"):
        make_optimizer(name, params, lr=0)


def test_seed_everything_seeds_python_numpy_torch() -> None:
    def draw() -> tuple[float, float, list[float]]:
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    seed_everything(7)
    first = draw()
    seed_everything(7)
    assert draw() == first
    seed_everything(8)
    assert draw() != first


def test_devices() -> None:
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == torch.device(default_device())
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="invalid device 'bogus'"):
        resolve_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available; use 'cpu'"):
            resolve_device("cuda")
    else:
        with pytest.raises(UsageError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 0}, "batch size must be >= 1"),
        ({"epochs": 0}, "number of epochs must be >= 1"),
        ({"max_steps": 0}, "max steps must be >= 1"),
        ({"lr": -1.0}, "learning rate must be > 0"),
        ({"init": "he"}, "unknown init scheme 'he'"),
        ({"model": "nope"}, "unknown model 'nope'"),
    ],
)
def test_hyperparameters_are_validated_before_anything_is_written(
    tmp_path: Path, change: dict, message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        Trainer(HyperParameters(**change), {"log_dir": tmp_path / "run"})
    assert not (tmp_path / "run").exists()


def test_resolved_fills_in_defaults() -> None:
    hp = HyperParameters(model="fullyconnected", optimizer="sgd", lr=None).resolved()
    assert (hp.model, hp.optimizer, hp.lr) == ("FullyConnected", "SGD", DEFAULT_LR["SGD"])
    assert hp.device == default_device()
    assert hp.as_dict()["batch_size"] == 128


def test_bad_configuration_writes_nothing(tmp_path: Path) -> None:
    config = {"log_dir": tmp_path / "run", "subscribers": [{"name": "no_such_subscriber"}]}
    with pytest.raises(ConfigError, match="unknown subscriber 'no_such_subscriber'"):
        Trainer(HyperParameters(max_steps=1), config)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ training


def test_run_logs_what_the_saved_model_really_scores(tmp_path: Path) -> None:
    # digits: 1437 training images; batch 64 -> 23 steps per epoch; 30 steps -> 2 epochs
    hp = HyperParameters(batch_size=64, epochs=5, max_steps=30, seed=2, device="cpu")
    trainer = Trainer(hp, {"log_dir": tmp_path, "backends": ["tensorboard"]})
    calls: list[str] = []
    epoch_finished, close = trainer.exporter.epoch_finished, trainer.exporter.close
    trainer.exporter.epoch_finished = lambda: (calls.append("epoch"), epoch_finished())[1]
    trainer.exporter.close = lambda: (calls.append("close"), close())[1]
    result = trainer.run()

    assert (result.steps, result.epochs) == (30, 2)
    assert calls == ["epoch", "epoch", "close"]
    assert trainer.exporter.hook_count == 0  # closed: every hook removed
    assert [h.steps for h in result.history] == [23, 30]

    # The accuracy of the saved model, computed here on loaders of another batch size.
    model = reload_model(result.model_path)
    train_loader, test_loader, _ = make_loaders("digits", batch_size=100, seed=99)
    test_acc, test_loss = own_metrics(model, test_loader)
    train_acc, train_loss = own_metrics(model, train_loader)
    assert result.test_accuracy == pytest.approx(test_acc, abs=1e-12)
    assert result.train_accuracy == pytest.approx(train_acc, abs=1e-12)
    assert result.test_loss == pytest.approx(test_loss, rel=1e-5)
    assert result.train_loss == pytest.approx(train_loss, rel=1e-5)
    assert 0.5 < test_acc <= 1.0  # it learned something in 30 steps

    logged = read_scalars(tmp_path)
    assert logged["final/accuracy/test"] == [(29, pytest.approx(test_acc, abs=1e-6))]
    assert logged["final/accuracy/train"] == [(29, pytest.approx(train_acc, abs=1e-6))]
    assert logged["final/loss/test"] == [(29, pytest.approx(test_loss, rel=1e-5))]
    assert [s for s, _ in logged["epoch/accuracy/test"]] == [22, 29]
    assert logged["epoch/accuracy/test"][-1][1] == pytest.approx(test_acc, abs=1e-6)
    assert logged["epoch/accuracy/train"][0][1] == pytest.approx(
        result.history[0].train_accuracy, abs=1e-6
    )

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    text = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| optimizer | Adam |" in text and "| seed | 2 |" in text  # TensorBoard's TEXT tab

    doc = json.loads(result.run_file.read_text())
    assert doc["hparams"] == {**hp.resolved().as_dict()}
    assert doc["test_accuracy"] == result.test_accuracy
    assert doc["modules"] == {
        "net.0": "Flatten",
        "net.1": "Linear",
        "net.2": "ReLU",
        "net.3": "Linear",
        "net.4": "ReLU",
        "net.5": "Linear",
    }


@needs("accuracy")
def test_test_accuracy_takes_the_trainers_test_loader_from_the_run_context(
    tmp_path: Path,
) -> None:
    config = {
        "log_dir": tmp_path,
        "backends": ["tensorboard"],
        "subscribers": [{"name": "test_accuracy", "subsample": 3}],
    }
    trainer = Trainer(HyperParameters(batch_size=64, max_steps=7, seed=1, device="cpu"), config)
    (subscriber,) = trainer.exporter.bus.subscribers
    assert subscriber.options.loader is trainer.test_loader
    result = trainer.run()
    logged = read_scalars(tmp_path)["test_accuracy"]
    assert [s for s, _ in logged] == [0, 3, 6]
    # step 6 is the last: the plugin evaluated the final model
    own, _ = own_metrics(reload_model(result.model_path), trainer.test_loader)
    assert logged[-1][1] == pytest.approx(own, abs=1e-6)


def _subscribers() -> list[dict]:
    wanted = [
        ("norms", {"name": "norm"}),
        ("norms", {"name": "ratio"}),
        ("norms", {"name": "spectral_norm"}),
        ("accuracy", {"name": "loss"}),
        ("accuracy", {"name": "train_accuracy"}),
        ("accuracy", {"name": "test_accuracy", "subsample": 2}),
        ("histograms", {"name": "dead_fraction"}),
    ]
    return [entry for plugin, entry in wanted if plugin in INSTALLED]


def test_same_seed_same_logged_metrics(tmp_path: Path) -> None:
    def run(seed: int, name: str) -> dict[str, list[tuple[int, float]]]:
        config = {
            "log_dir": tmp_path / name,
            "backends": ["tensorboard"],
            "subscribers": _subscribers(),
        }
        Trainer(HyperParameters(batch_size=32, max_steps=6, seed=seed, device="cpu"),
                config).run()
        return read_scalars(tmp_path / name)

    first, second, other = run(3, "a"), run(3, "b"), run(4, "c")
    assert first == second  # every tag, every step, every value: bit for bit
    for entry in _subscribers():  # the plugins' metrics are compared too
        assert any(tag.startswith(entry["name"]) for tag in first), entry
    assert first["final/accuracy/test"] != other["final/accuracy/test"] or (
        first["final/loss/test"] != other["final/loss/test"]
    )
    assert first["epoch/loss/train"] != other["epoch/loss/train"]


def test_progress_bar_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = {"log_dir": tmp_path, "backends": ["tensorboard"]}
    Trainer(HyperParameters(batch_size=256, epochs=2, seed=0), config, progress=True).run()
    out, err = capsys.readouterr()
    assert out == ""
    assert "12/12" in err  # 1437 / 256 -> 6 steps per epoch, 2 epochs
    for field in ("epoch=2/2", "loss=", "acc=", "test_acc="):
        assert field in err


def test_on_epoch_callback_and_matplotlib_figures(tmp_path: Path) -> None:
    seen = []
    config = {"log_dir": tmp_path, "backends": ["matplotlib"]}
    result = Trainer(
        HyperParameters(batch_size=512, epochs=2, seed=0), config, on_epoch=seen.append
    ).run()
    assert [s.epoch for s in seen] == [0, 1] and seen == result.history
    assert result.figures == sorted((tmp_path / "figures").glob("*.png"))
    assert {p.name for p in result.figures} >= {"epoch__accuracy.png", "final__accuracy.png"}
    assert not list(tmp_path.glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
        ),
    ],
)
def test_training_is_device_agnostic(tmp_path: Path, device: str) -> None:
    config = {"log_dir": tmp_path, "backends": ["tensorboard"], "subscribers": _subscribers()}
    trainer = Trainer(HyperParameters(batch_size=64, max_steps=3, device=device), config)
    result = trainer.run()
    assert {p.device.type for p in result.model.parameters()} == {device}
    # evaluated here on the run's device: an argmax near a tie may differ between devices
    own, _ = own_metrics(reload_model(result.model_path), trainer.test_loader, device)
    assert result.test_accuracy == pytest.approx(own, abs=1e-6)


# ------------------------------------------------------------------------ log directory


def test_check_log_dir(tmp_path: Path) -> None:
    fresh = tmp_path / "a" / "b"
    assert check_log_dir(fresh) == [] and not (tmp_path / "a").exists()  # probe left nothing
    (tmp_path / "file").write_text("x")
    with pytest.raises(LogDirError, match="is a file, not a directory"):
        check_log_dir(tmp_path / "file")
    run = tmp_path / "run"
    (run / "figures").mkdir(parents=True)
    (run / "notes.md").write_text("mine")  # not a run's file
    assert check_log_dir(run) == []
    (run / "figures" / "x.png").write_bytes(b"png")
    (run / "events.out.tfevents.1.host").write_bytes(b"")
    with pytest.raises(LogDirError, match=r"already holds a run \(events.out.tfevents.1.host, "
                                          r"figures/x.png\)"):
        check_log_dir(run)
    assert check_log_dir(run, overwrite=True) == [
        run / "events.out.tfevents.1.host", run / "figures" / "x.png"
    ]


def test_overwrite_replaces_only_the_earlier_runs_files(tmp_path: Path) -> None:
    config = {"log_dir": tmp_path, "backends": ["tensorboard", "matplotlib"]}
    Trainer(HyperParameters(batch_size=512, max_steps=2), config).run()
    (tmp_path / "notes.md").write_text("mine")
    old = {p.name for p in tmp_path.glob("events.out.tfevents.*")}
    with pytest.raises(LogDirError, match="already holds a run"):
        Trainer(HyperParameters(batch_size=512, max_steps=2), config)
    config["backends"] = ["tensorboard"]
    Trainer(HyperParameters(batch_size=512, max_steps=1), config, overwrite=True).run()
    new = {p.name for p in tmp_path.glob("events.out.tfevents.*")}
    assert len(new) == 1 and not new & old
    assert not list((tmp_path / "figures").glob("*.png"))  # the first run's figures are gone
    assert (tmp_path / "notes.md").read_text() == "mine"
    assert json.loads((tmp_path / "run.json").read_text())["steps"] == 1


class JsonLinesBackend(Backend):
    """A plugin author's backend: one JSON line per scalar, appended to metrics.jsonl."""

    name = "jsonl"
    files = ("metrics.jsonl",)

    def __init__(self, log_dir: str | Path) -> None:
        super().__init__(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.log_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close

    def write_scalars(self, records: Sequence[ScalarRecord]) -> None:
        for r in records:
            self._file.write(json.dumps({"tag": r.tag, "step": r.step, "value": r.value}) + "\n")

    def write_histograms(self, records: Sequence[HistogramRecord]) -> None:
        pass

    def close(self) -> None:
        self._file.close()


def _jsonl_registry() -> PluginRegistry:
    plugin = types.ModuleType("jsonl_plugin")
    plugin.ikkuna_backends = hookimpl(lambda: [JsonLinesBackend])  # type: ignore[attr-defined]
    registry = load_plugins([])
    registry.register(plugin, PluginInfo("jsonl", None, None, "tests"))
    return registry


def test_a_backends_declared_files_count_as_a_run_and_are_replaced(tmp_path: Path) -> None:
    config = {"log_dir": tmp_path, "backends": ["jsonl"]}
    hp = HyperParameters(batch_size=512, max_steps=2)
    Trainer(hp, config, registry=_jsonl_registry(), save_model=False).run()
    (tmp_path / "run.json").unlink()  # only the backend's own file is left
    first = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["tag"] == "final/accuracy/test" for line in first) == 1
    with pytest.raises(LogDirError, match=r"already holds a run \(metrics.jsonl\)"):
        Trainer(hp, config, registry=_jsonl_registry())
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == first  # untouched
    Trainer(hp, config, registry=_jsonl_registry(), overwrite=True, save_model=False).run()
    second = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(second) == len(first)  # replaced, not appended to
    assert sum(line["tag"] == "final/accuracy/test" for line in second) == 1


def test_declared_folders_count_as_a_run(tmp_path: Path) -> None:
    (tmp_path / "wandb" / "offline-run-1").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text("")
    patterns = ("metrics.jsonl", "wandb")
    with pytest.raises(LogDirError, match=r"already holds a run \(metrics.jsonl, wandb\)"):
        check_log_dir(tmp_path, patterns=patterns)
    assert check_log_dir(tmp_path, overwrite=True, patterns=patterns) == [
        tmp_path / "metrics.jsonl", tmp_path / "wandb"
    ]
    assert backend_files(_jsonl_registry(), ["tensorboard", "jsonl", "nope"]) == (
        "events.out.tfevents.*", "metrics.jsonl"
    )


def test_epochs_follow_max_steps(tmp_path: Path) -> None:
    # digits: 1437 training images; batch 500 -> 3 steps per epoch
    config = {"backends": [], "log_dir": tmp_path}
    trainer = Trainer(HyperParameters(batch_size=500, max_steps=7), config)
    assert (trainer.hparams.epochs, trainer.total_steps) == (3, 7)
    trainer.exporter.close()
    trainer = Trainer(HyperParameters(batch_size=500), config)
    assert (trainer.hparams.epochs, trainer.total_steps) == (10, 30)
    trainer.exporter.close()
    trainer = Trainer(HyperParameters(batch_size=500, epochs=1, max_steps=7), config)
    assert (trainer.hparams.epochs, trainer.total_steps) == (1, 3)
    trainer.exporter.close()
