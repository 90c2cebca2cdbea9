"""The accuracy plugin through its installed entry point: discovery by name and a TOML run
configuration through ``ikkuna_core.watch`` with TensorBoard and matplotlib output."""

from __future__ import annotations

from importlib.metadata import distribution
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import ikkuna_core
from ikkuna_accuracy import Loss, TestAccuracy, TrainAccuracy
from ikkuna_core.backends.matplotlib import figure_path


def test_entry_point_is_installed_and_loads_by_name() -> None:
    eps = [ep for ep in distribution("ikkuna-accuracy").entry_points if ep.group == "ikkuna"]
    assert [(ep.name, ep.value) for ep in eps] == [("accuracy", "ikkuna_accuracy.plugin")]
    registry = ikkuna_core.load_plugins(["accuracy"])
    info = registry.plugins["accuracy"]
    assert info.loaded and info.distribution == "ikkuna-accuracy"
    assert sorted(info.subscribers) == ["loss", "test_accuracy", "train_accuracy"]
    assert registry.subscriber("train_accuracy") is TrainAccuracy
    assert registry.subscriber("test_accuracy") is TestAccuracy
    assert registry.subscriber("loss") is Loss


def test_hooks_give_flags_defaults_and_the_runs_test_loader() -> None:
    registry = ikkuna_core.load_plugins(["accuracy"])
    assert [(f.option, f.subscriber, p) for f, p in registry.flags] == [
        ("--train-accuracy", "train_accuracy", "accuracy"),
        ("--test-accuracy", "test_accuracy", "accuracy"),
    ]
    assert [e for e, _ in registry.default_subscribers] == [
        {"name": "loss"}, {"name": "train_accuracy"}, {"name": "test_accuracy", "subsample": 10}
    ]
    loader = [(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))]
    context = ikkuna_core.RunContext(test_loader=loader)
    assert registry.subscriber_options("test_accuracy", {}, context) == {"loader": loader}
    own = [(torch.ones(1, 2), torch.ones(1, dtype=torch.long))]
    assert registry.subscriber_options("test_accuracy", {"loader": own}, context) == {
        "loader": own
    }  # what the configuration says wins
    assert registry.subscriber_options("test_accuracy", {"dataset": "digits"}, context) == {
        "dataset": "digits"
    }
    assert registry.subscriber_options("loss", {}, context) == {}


def test_test_accuracy_evaluates_the_runs_test_loader(tmp_path: Path) -> None:
    """No `loader`, no `dataset`: the loader comes from the run, through watch()'s context."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    x_test, y_test = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    loader = [(x_test[i : i + 10], y_test[i : i + 10]) for i in range(0, 40, 10)]
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    config = {
        "plugins": ["accuracy"],
        "backends": [],
        "on_error": "raise",
        "subscribers": [{"name": "test_accuracy", "subsample": 2}],
    }
    with pytest.raises(ikkuna_core.ConfigError, match="needs held-out data"):
        ikkuna_core.watch(model, nn.CrossEntropyLoss(), config=config)  # no context

    exporter = ikkuna_core.watch(
        model, nn.CrossEntropyLoss(), config=config,
        context=ikkuna_core.RunContext(test_loader=loader),
    )
    (subscriber,) = exporter.bus.subscribers
    assert subscriber.options.loader is loader
    from ikkuna_core.testing import MemoryBackend

    backend = exporter.bus.add_backend(MemoryBackend())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = {}
    for step in range(4):
        optimizer.zero_grad()
        exporter.loss_fn(model(x), y).backward()
        optimizer.step()
        if step % 2 == 0:
            with torch.no_grad():
                expected[step] = float((model(x_test).argmax(1) == y_test).float().mean())
    exporter.close()
    written = {r.step: r.value for r in backend.scalars if r.tag == "test_accuracy"}
    assert written == pytest.approx(expected)


def test_a_loader_cannot_come_from_a_configuration_file(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        '[ikkuna]\nplugins = ["accuracy"]\nbackends = []\n'
        '[[ikkuna.subscribers]]\nname = "test_accuracy"\nloader = "data/test"\n'
    )
    with pytest.raises(ikkuna_core.ConfigError, match="use `dataset`"):
        ikkuna_core.watch(nn.Linear(2, 2), config=config)


CONFIG = """
[ikkuna]
plugins = ["accuracy"]
backends = ["tensorboard", "matplotlib"]
log_dir = '{log_dir}'
on_error = "raise"

[[ikkuna.subscribers]]
name = "train_accuracy"
top_k = 1

[[ikkuna.subscribers]]
name = "loss"
window = 2

[[ikkuna.subscribers]]
name = "test_accuracy"
dataset = "digits"
image_size = 8
batch_size = 100
max_batches = 2
subsample = 2
"""


def test_toml_run_writes_accuracies_and_losses(tmp_path: Path) -> None:
    from ikkuna_train.data import load_dataset

    log_dir = tmp_path / "run"
    config = tmp_path / "ikkuna.toml"
    config.write_text(CONFIG.format(log_dir=log_dir.as_posix()))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    digits = load_dataset("digits", train=False, image_size=8)
    x_test = torch.stack([digits[i][0] for i in range(200)])
    y_test = torch.tensor([int(digits[i][1]) for i in range(200)])
    train = load_dataset("digits", train=True, image_size=8)
    x = torch.stack([train[i][0] for i in range(64)])
    y = torch.tensor([int(train[i][1]) for i in range(64)])

    exporter = ikkuna_core.watch(model, nn.CrossEntropyLoss(), config=config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train_acc, losses, test_acc = [], [], {}
    steps = 5
    for step in range(steps):
        optimizer.zero_grad()
        out = model(x)
        loss = exporter.loss_fn(out, y)
        loss.backward()
        train_acc.append(float((out.argmax(1) == y).float().mean()))
        losses.append(float(loss.detach()))
        optimizer.step()
        if step % 2 == 0:
            with torch.no_grad():
                test_acc[step] = float((model(x_test).argmax(1) == y_test).float().mean())
    exporter.close()

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {
        "train_accuracy", "test_accuracy", "loss/loss", "loss/loss/running_mean"
    }
    values = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    assert values["train_accuracy"] == pytest.approx(dict(enumerate(train_acc)))
    assert values["loss/loss"] == pytest.approx(dict(enumerate(losses)), rel=1e-6)
    running = {s: float(np.mean(losses[max(0, s - 1) : s + 1])) for s in range(steps)}
    assert values["loss/loss/running_mean"] == pytest.approx(running, rel=1e-6)
    assert values["test_accuracy"] == pytest.approx(test_acc)
    assert test_acc[4] > 0.3  # learning digits: a real accuracy, far above chance
    for topic in ("train_accuracy", "test_accuracy", "loss/loss", "loss/loss/running_mean"):
        assert figure_path(log_dir, topic).is_file(), topic
