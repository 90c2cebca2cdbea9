"""Plugin discovery through real installed distributions and the ``ikkuna`` entry-point group.

The fixture distributions in ``plugin_fixtures/`` are installed with pip into a temporary
folder put on ``sys.path``; ``importlib.metadata`` then finds their entry points exactly as it
finds those of any installed plugin.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import ikkuna_core as ik
from ikkuna_core import hookspecs
from ikkuna_core.cli import main
from ikkuna_core.commands import Command, SubscriberFlag
from ikkuna_core.plugins import PluginInfo, PluginRegistry, PluginWarning, installed_entry_points

FIXTURES = Path(__file__).parent / "plugin_fixtures"


def _pip_install_target(target: Path, sources: Path, dists: tuple[str, ...]) -> Path:
    for dist in dists:  # build a private copy: xdist workers run in parallel
        if not (sources / dist).exists():
            shutil.copytree(FIXTURES / dist, sources / dist,
                            ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--target", str(target),
         *(str(sources / dist) for dist in dists)],
        check=True,
    )
    return target


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test plugin and the broken ones, installed."""
    return _pip_install_target(tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("src"),
                               ("ikkuna-testplugin", "ikkuna-badplugins"))


@pytest.fixture(scope="session")
def good_plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the test plugin installed (the broken 'fixture-clash' would take its subscriber's
    name)."""
    return _pip_install_target(tmp_path_factory.mktemp("good"), tmp_path_factory.mktemp("src"),
                               ("ikkuna-testplugin",))


def _on_path(site: Path, monkeypatch: pytest.MonkeyPatch):
    # (not monkeypatch.syspath_prepend: it imports pkg_resources when another test did)
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    importlib.invalidate_caches()
    monkeypatch.delenv("IKKUNA_PLUGINS", raising=False)
    yield site
    for name in [m for m in sys.modules if m.startswith(("ikkuna_testplugin", "ikkuna_bad"))]:
        del sys.modules[name]


@pytest.fixture
def installed(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    yield from _on_path(plugin_site, monkeypatch)


@pytest.fixture
def installed_good(good_plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    yield from _on_path(good_plugin_site, monkeypatch)


def run_cli(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_entry_points_are_discovered_without_importing(installed):
    names = {ep.name for ep in installed_entry_points()}
    assert {"testplugin", "fixture-broken", "fixture-clash", "fixture-typo"} <= names
    assert "ikkuna_badplugins.broken" not in sys.modules


def test_enable_by_name_and_use_through_watch(installed, tmp_path):
    registry = ik.load_plugins(["testplugin"])
    info = registry.plugins["testplugin"]
    assert info.loaded and info.distribution == "ikkuna-testplugin" and info.version == "1.2.3"
    assert info.subscribers == ["scaled_mean"] and info.backends == ["memory"]
    assert info.commands == ["hello"] and info.flags == ["--scaled-mean"]
    assert set(info.hooks) == set(hookspecs.hook_names())
    assert not registry.plugins["fixture-broken"].enabled  # installed, not enabled, never imported

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
        ik.load_plugins(["fixture-broken"])
    msg = str(err.value)
    assert "'fixture-broken'" in msg and "ikkuna-badplugins" in msg
    assert "ModuleNotFoundError" in msg and "a_module_that_does_not_exist" in msg
    # failures recorded
    registry = ik.load_plugins(["fixture-broken", "testplugin"], strict=False)
    broken = registry.plugins["fixture-broken"]
    assert broken.error and not broken.loaded
    assert registry.plugins["testplugin"].loaded


def test_two_subscribers_claiming_one_name(installed):
    with pytest.raises(ik.PluginError, match="two subscribers claim the name 'scaled_mean'"):
        ik.load_plugins(["testplugin", "fixture-clash"])
    registry = ik.load_plugins(["testplugin", "fixture-clash"], strict=False)
    assert registry.subscribers["scaled_mean"][1] == "fixture-clash"  # loaded first: alphabetical
    assert "two subscribers" in registry.plugins["testplugin"].error
    assert not registry.manager.is_registered(sys.modules["ikkuna_testplugin"])


def test_a_plugin_not_asked_for_by_name_that_fails_is_skipped_with_a_warning(installed):
    with pytest.warns(PluginWarning) as caught:
        registry = ik.load_plugins()  # every installed plugin, none named
    messages = [str(w.message) for w in caught]
    assert any("'fixture-broken'" in m and "a_module_that_does_not_exist" in m for m in messages)
    assert any("'fixture-typo'" in m and "ikkuna_subscriber" in m for m in messages)
    assert any("two subscribers claim the name 'scaled_mean'" in m for m in messages)
    assert all(m.endswith("; skipped") for m in messages)
    assert registry.plugins["fixture-clash"].loaded  # the others load
    broken = registry.plugins["fixture-broken"]
    assert broken.error and not broken.loaded
    with pytest.raises(ik.PluginError, match="'fixture-broken'"):  # asked for by name: an error
        ik.load_plugins(["fixture-broken", "fixture-clash"])


def test_misspelled_hook_is_caught(installed):
    with pytest.raises(ik.PluginError, match="'fixture-typo'.*ikkuna_subscriber"):
        ik.load_plugins(["fixture-typo"])


def test_unknown_plugin_lists_installed_ones(installed):
    with pytest.raises(ik.PluginError, match="unknown plugin.*'nope'.*testplugin") as err:
        ik.load_plugins(["nope"])
    assert "install it with pip (from a clone of Ikkuna: pip install ./plugins/<folder>)" in (
        str(err.value)
    )
    assert "ikkuna-<name>" not in str(err.value)  # no guessed distribution name


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
        "ikkuna_backends", "ikkuna_commands", "ikkuna_configure", "ikkuna_default_subscribers",
        "ikkuna_run_finished", "ikkuna_run_started", "ikkuna_subscriber_flags",
        "ikkuna_subscriber_options", "ikkuna_subscribers", "ikkuna_topics",
    ]
    for name in names:
        assert inspect.getdoc(getattr(hookspecs, name)), f"{name} has no docstring"
    fixture = (FIXTURES / "ikkuna-testplugin/src/ikkuna_testplugin/__init__.py").read_text()
    for name in names:  # the test plugin implements (and these tests exercise) every hook
        assert f"def {name}(" in fixture


# ------------------------------------------------------------------ commands, flags, context


def test_a_third_party_plugin_adds_a_command(installed_good):
    code, out, _ = run_cli("--help")
    assert code == 0
    assert re.search(r"^    hello\s+greet someone \(a test plugin's command\) \[testplugin\]$",
                     out, re.M)
    code, out, err = run_cli("hello", "world", "--times", 2)
    assert (code, out, err) == (0, "hello world\nhello world\n", "")
    code, out, err = run_cli("hello", "world", "--times", 0)
    assert (code, out, err) == (2, "", "ikkuna: error: --times must be >= 1, got 0\n")


def test_a_third_party_plugin_adds_a_flag(installed_good):
    registry = ik.load_plugins(["testplugin"])
    assert [(f.option, f.subscriber, dict(f.options), p) for f, p in registry.flags] == [
        ("--scaled-mean", "scaled_mean", {"topics": ["weights"], "scale": 2.0}, "testplugin")
    ]
    assert registry.default_subscribers == [
        ({"name": "scaled_mean", "topics": ["weights"]}, "testplugin")
    ]
    if importlib.util.find_spec("ikkuna_train") is None:
        pytest.skip("the flag's command line comes with ikkuna-train, which is not installed")
    code, out, _ = run_cli("train", "--help")
    assert code == 0
    assert re.search(r"^  --scaled-mean\s+mean of the weights, times 2 \[testplugin\]$", out, re.M)


def test_the_run_context_reaches_subscribers_through_the_hook(installed_good, tmp_path):
    """scaled_mean without `scale` takes the number of test batches the run provides."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    config = {"plugins": ["testplugin"], "backends": ["memory"], "log_dir": str(tmp_path),
              "subscribers": [{"name": "scaled_mean", "topics": ["weights"]}]}
    context = ik.RunContext(test_loader=[(0, 0), (1, 1), (2, 2)])
    exporter = ik.watch(model, nn.MSELoss(), config=config, context=context)
    (subscriber,) = exporter.bus.subscribers
    assert subscriber.options.scale == 3.0
    memory = exporter.bus.backends[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    exporter.loss_fn(model(torch.randn(5, 3)), torch.randn(5, 2)).backward()
    opt.step()
    exporter.close()
    assert memory.scalar("scaled_mean/weights/0", 0) == pytest.approx(
        model[0].weight.mean().item() * 3.0
    )
    exporter = ik.watch(model, nn.MSELoss(), config=config)  # no context: the class default
    assert exporter.bus.subscribers[0].options.scale == 1.0
    exporter.close()


def _plugin(**hooks: object) -> types.ModuleType:
    module = types.ModuleType("ikkuna_inline_plugin")
    for name, value in hooks.items():
        setattr(module, name, ik.hookimpl(lambda value=value: value, specname=name))
    return module


class _Mean(ik.Subscriber):
    name = "inline_mean"

    def compute(self, bundle: ik.MessageBundle) -> None:
        pass


def _noop(*args: object) -> int:
    return 0


@pytest.mark.parametrize(
    ("hooks", "message"),
    [
        ({"ikkuna_commands": [Command("plugins", "x", _noop, _noop)]},
         "command 'plugins' is the core's own"),
        ({"ikkuna_commands": [Command("Bad Name", "x", _noop, _noop)]},
         "command name 'Bad Name' must be lower-case"),
        ({"ikkuna_commands": ["train"]}, "ikkuna_commands returned 'train', not a Command"),
        ({"ikkuna_subscriber_flags": [SubscriberFlag("--x", "someone_elses")]},
         "flag --x adds 'someone_elses', which is not one of its subscribers (inline_mean)"),
        ({"ikkuna_subscriber_flags": [SubscriberFlag("-x", "inline_mean")]},
         "flag '-x' must look like --lower-case-words"),
        ({"ikkuna_default_subscribers": [{"name": "someone_elses"}]},
         "ikkuna_default_subscribers must return entries"),
    ],
)
def test_what_a_plugin_adds_is_checked_when_it_loads(hooks, message):
    registry = PluginRegistry()
    plugin = _plugin(ikkuna_subscribers=[_Mean], **hooks)
    with pytest.raises(ik.PluginError, match=re.escape(message)):
        registry.register(plugin, PluginInfo("inline", None, None, "inline"))
    assert not registry.manager.is_registered(plugin) and not registry.subscribers


def test_two_plugins_cannot_share_a_command_or_a_flag():
    registry = PluginRegistry()
    first = _plugin(ikkuna_subscribers=[_Mean],
                    ikkuna_commands=[Command("go", "x", _noop, _noop)],
                    ikkuna_subscriber_flags=[SubscriberFlag("--mean", "inline_mean")])
    registry.register(first, PluginInfo("first", None, None, "first"))
    assert list(registry.commands) == ["go"] and registry.commands["go"][1] == "first"
    with pytest.raises(ik.PluginError, match="two plugins provide the command 'go'"):
        registry.register(_plugin(ikkuna_commands=[Command("go", "y", _noop, _noop)]),
                          PluginInfo("second", None, None, "second"))
    with pytest.raises(ik.PluginError, match="two plugins provide the flag --mean"):
        flags = [SubscriberFlag("--mean", "inline_mean")]
        registry.register(_plugin(ikkuna_subscribers=[_Mean], ikkuna_subscriber_flags=flags),
                          PluginInfo("third", None, None, "third"))


@pytest.fixture(scope="session")
def twin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ikkuna-twin-a and ikkuna-twin-b: two distributions that both register 'fixture-twin'."""
    return _pip_install_target(tmp_path_factory.mktemp("twins"), tmp_path_factory.mktemp("src"),
                               ("ikkuna-twin-a", "ikkuna-twin-b"))


def test_a_plugin_name_registered_by_two_distributions_names_both(
    twin_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16: the second silently hid the first (`ikkuna plugins` listed one)."""
    for _ in _on_path(twin_site, monkeypatch):
        both = r"'fixture-twin' is registered by 2 installed distributions: ikkuna-twin-[ab] "
        # asked for by name: an error naming both distributions
        with pytest.raises(ik.PluginError, match=both) as err:
            ik.load_plugins(["fixture-twin"])
        assert "ikkuna-twin-a 0.0.1" in str(err.value) and "ikkuna-twin-b 0.0.1" in str(err.value)
        # every installed plugin enabled: a warning, and neither loads
        with pytest.warns(PluginWarning, match=both):
            registry = ik.load_plugins()
        assert not {"twin_a", "twin_b"} & {t.name for t in registry.topics}
        # the listing shows the conflict, with both names
        code, out, _ = run_cli("plugins", "--json")
        assert code == 0
        (entry,) = [p for p in json.loads(out) if p["name"] == "fixture-twin"]
        assert not entry["loaded"]
        assert "ikkuna-twin-a" in entry["error"] and "ikkuna-twin-b" in entry["error"]
    for name in [m for m in sys.modules if m.startswith("ikkuna_twin")]:
        del sys.modules[name]
