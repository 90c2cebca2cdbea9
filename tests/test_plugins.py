"""Plugin discovery through real installed distributions and the ``ikkuna`` entry-point group.

The fixture distributions in ``plugin_fixtures/`` are installed with pip into a temporary
folder put on ``sys.path``; ``importlib.metadata`` then finds their entry points exactly as it
finds those of any installed plugin.
"""

from __future__ import annotations

import importlib
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ikkuna_core as ik
from ikkuna_core import hookspecs
from ikkuna_core.plugins import installed_entry_points

FIXTURES = Path(__file__).parent / "plugin_fixtures"


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    sources = tmp_path_factory.mktemp("src")  # build a private copy: xdist workers run in parallel
    for dist in ("ikkuna-testplugin", "ikkuna-badplugins"):
        shutil.copytree(FIXTURES / dist, sources / dist,
                        ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--target", str(target),
         str(sources / "ikkuna-testplugin"), str(sources / "ikkuna-badplugins")],
        check=True,
    )
    return target


@pytest.fixture
def installed(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # (not monkeypatch.syspath_prepend: it imports pkg_resources when another test did)
    monkeypatch.setattr(sys, "path", [str(plugin_site), *sys.path])
    importlib.invalidate_caches()
    monkeypatch.delenv("IKKUNA_PLUGINS", raising=False)
    yield plugin_site
    for name in [m for m in sys.modules if m.startswith(("ikkuna_testplugin", "ikkuna_bad"))]:
        del sys.modules[name]


def test_entry_points_are_discovered_without_importing(installed):
    names = {ep.name for ep in installed_entry_points()}
    assert {"testplugin", "broken", "clash", "typo"} <= names
    assert "ikkuna_badplugins.broken" not in sys.modules


def test_enable_by_name_and_use_through_watch(installed, tmp_path):
    registry = ik.load_plugins(["testplugin"])
    info = registry.plugins["testplugin"]
    assert info.loaded and info.distribution == "ikkuna-testplugin" and info.version == "1.2.3"
    assert info.subscribers == ["scaled_mean"] and info.backends == ["memory"]
    assert set(info.hooks) == set(hookspecs.hook_names())
    assert not registry.plugins["broken"].enabled  # installed, not enabled, never imported

    from ikkuna_testplugin import CALLS

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    config = {
        "plugins": ["testplugin"],
        "backends": ["memory", "tensorboard"],
        "log_dir": str(tmp_path / "run"),
        "on_error": "raise",
        "subscribers": [{"name": "scaled_mean", "topics": ["weights"], "scale": 10.0}],
    }
    exporter = ik.watch(model, nn.MSELoss(), config=config)
    assert "curvature" in exporter.bus.topics  # the plugin's topic is registered
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    exporter.loss_fn(model(torch.randn(5, 3)), torch.randn(5, 2)).backward()
    opt.step()
    memory = exporter.bus.backends[0]
    exporter.close()
    assert memory.scalar("scaled_mean/weights/1", 0) == pytest.approx(
        model[1].weight.mean().item() * 10.0
    )
    assert CALLS == ["configure:run", "run_started", "run_finished"]
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))


def test_broken_plugin_is_named_with_its_cause(installed):
    with pytest.raises(ik.PluginError) as err:
        ik.load_plugins(["broken"])
    msg = str(err.value)
    assert "'broken'" in msg and "ikkuna-badplugins" in msg
    assert "ModuleNotFoundError" in msg and "a_module_that_does_not_exist" in msg
    registry = ik.load_plugins(["broken", "testplugin"], strict=False)  # failures recorded
    assert registry.plugins["broken"].error and not registry.plugins["broken"].loaded
    assert registry.plugins["testplugin"].loaded


def test_two_subscribers_claiming_one_name(installed):
    with pytest.raises(ik.PluginError, match="two subscribers claim the name 'scaled_mean'"):
        ik.load_plugins(["testplugin", "clash"])
    registry = ik.load_plugins(["testplugin", "clash"], strict=False)
    assert registry.subscribers["scaled_mean"][1] == "clash"  # loaded first: alphabetical
    assert "two subscribers" in registry.plugins["testplugin"].error
    assert not registry.manager.is_registered(sys.modules["ikkuna_testplugin"])


def test_misspelled_hook_is_caught(installed):
    with pytest.raises(ik.PluginError, match="'typo'.*ikkuna_subscriber"):
        ik.load_plugins(["typo"])


def test_unknown_plugin_lists_installed_ones(installed):
    with pytest.raises(ik.PluginError, match="unknown plugin.*'nope'.*testplugin"):
        ik.load_plugins(["nope"])


def test_environment_variable_narrows_loading(installed, monkeypatch):
    monkeypatch.setenv("IKKUNA_PLUGINS", "")
    registry = ik.load_plugins()
    assert [n for n, i in registry.plugins.items() if i.loaded] == ["builtin"]
    monkeypatch.setenv("IKKUNA_PLUGINS", "testplugin")
    registry = ik.load_plugins()  # the broken ones are not even imported
    assert sorted(n for n, i in registry.plugins.items() if i.loaded) == ["builtin", "testplugin"]


def test_unknown_subscriber_lists_available(installed):
    registry = ik.load_plugins(["testplugin"])
    with pytest.raises(ik.PluginError, match="unknown subscriber 'scaled_men'.*scaled_mean"):
        registry.subscriber("scaled_men")


def test_every_hookspec_is_documented_and_called_with_keywords():
    names = hookspecs.hook_names()
    assert names == [
        "ikkuna_backends", "ikkuna_configure", "ikkuna_run_finished", "ikkuna_run_started",
        "ikkuna_subscribers", "ikkuna_topics",
    ]
    for name in names:
        assert inspect.getdoc(getattr(hookspecs, name)), f"{name} has no docstring"
    fixture = (FIXTURES / "ikkuna-testplugin/src/ikkuna_testplugin/__init__.py").read_text()
    for name in names:  # the test plugin implements (and these tests exercise) every hook
        assert f"def {name}(" in fixture
