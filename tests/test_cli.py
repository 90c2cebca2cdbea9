"""Tests for the core's ``ikkuna`` command: ``plugins``, ``topics``, ``schema``, the
commands plugins add, and warnings for plugins that fail to load; run in-process through
``main(argv)``, plus one real subprocess. (``ikkuna train`` and ``ikkuna report`` are tested
with the ikkuna-train plugin that provides them.)"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from importlib.metadata import EntryPoint, version

import pytest

from ikkuna_core import MODULE_TOPICS, NETWORK_TOPICS, message_json_schema
from ikkuna_core.cli import main
from ikkuna_core.plugins import installed_entry_points

INSTALLED = {ep.name for ep in installed_entry_points()}

pytestmark = pytest.mark.usefixtures("installed_plugins")


def run_cli(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_help_version_and_no_command() -> None:
    code, out, _ = run_cli("--help")
    assert code == 0 and all(c in out for c in ("plugins", "topics", "schema"))
    code, out, _ = run_cli()
    assert code == 2 and "usage: ikkuna" in out
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"ikkuna-core {version('ikkuna-core')}"
    code, _, err = run_cli("no-such-command")
    assert code == 2 and "invalid choice: 'no-such-command'" in err


def test_a_plugin_that_fails_to_import_is_a_warning_and_the_command_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nobody asked for it by name: `ikkuna schema` works and says what is broken."""
    broken = EntryPoint(name="broken", value="ikkuna_no_such_module_xyz", group="ikkuna")
    monkeypatch.setattr("ikkuna_core.plugins.installed_entry_points", lambda: [broken])
    monkeypatch.delenv("IKKUNA_PLUGINS")  # every installed plugin: this one
    code, out, err = run_cli("schema")
    assert code == 0 and json.loads(out)["title"] == "Ikkuna message contract"
    assert err.splitlines() == [
        "ikkuna: warning: plugin 'broken' (distribution None None, ikkuna_no_such_module_xyz) "
        "failed to import: ModuleNotFoundError: No module named 'ikkuna_no_such_module_xyz'; "
        "skipped"
    ]


# --------------------------------------------------------- plugins, topics, schema


def test_plugins_json_lists_installed_distributions_with_real_versions(
    project_plugins: dict[str, str],
) -> None:
    """Every installed plugin is listed; the project's (named in IKKUNA_PLUGINS by the
    fixture) are loaded, any other installed beside them is listed but never imported."""
    code, out, _ = run_cli("plugins", "--json")
    assert code == 0
    listed = {p["name"]: p for p in json.loads(out)}
    assert listed["builtin"]["distribution"] == "ikkuna-core"
    assert listed["builtin"]["version"] == version("ikkuna-core")
    assert set(listed["builtin"]["backends"]) == {"tensorboard", "matplotlib"}
    eps = installed_entry_points()
    assert set(listed) == {"builtin"} | {ep.name for ep in eps}
    for ep in eps:
        entry = listed[ep.name]
        dist = ep.dist.metadata["Name"]
        assert entry["distribution"] == dist
        assert entry["version"] == version(dist)
        assert entry["value"] == ep.value
        if ep.name not in project_plugins:
            assert (entry["enabled"], entry["loaded"], entry["error"]) == (False, False, None)
            continue
        assert dist == project_plugins[ep.name]
        assert entry["loaded"] and entry["error"] is None, entry
        assert entry["hooks"] and all(h.startswith("ikkuna_") for h in entry["hooks"])
    provided = {
        "norms": ({"norm", "spectral_norm", "ratio", "variance", "mean"}, ["--spectral-norm",
                                                                          "--ratio"]),
        "histograms": ({"histogram", "dead_fraction"}, ["--histogram"]),
        "accuracy": ({"train_accuracy", "test_accuracy", "loss"}, ["--train-accuracy",
                                                                   "--test-accuracy"]),
    }
    for plugin, (subscribers, flags) in provided.items():
        if plugin in listed:
            assert set(listed[plugin]["subscribers"]) >= subscribers
            assert listed[plugin]["flags"] == flags
    if "train" in listed:
        assert listed["train"]["commands"] == ["train", "report"]

    code, text, _ = run_cli("plugins")
    assert code == 0
    for ep in eps:
        status = "loaded" if ep.name in project_plugins else "not enabled"
        assert f"{ep.name}  [{status}]  {ep.dist.metadata['Name']} {ep.dist.version}" in text


def test_plugins_shows_a_plugin_that_fails_to_load(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = EntryPoint(name="broken", value="ikkuna_no_such_module_xyz", group="ikkuna")
    monkeypatch.setattr("ikkuna_core.plugins.installed_entry_points", lambda: [broken])
    monkeypatch.delenv("IKKUNA_PLUGINS")  # every installed plugin: this one
    code, out, _ = run_cli("plugins", "--json")
    assert code == 0
    (entry,) = [p for p in json.loads(out) if p["name"] == "broken"]
    assert not entry["loaded"] and "failed to import" in entry["error"]
    code, text, _ = run_cli("plugins")
    assert "broken  [FAILED]" in text and "ModuleNotFoundError" in text


def test_topics() -> None:
    code, out, _ = run_cli("topics", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    for topic in MODULE_TOPICS:
        assert rows[topic]["kind"] == "module" and rows[topic]["source"] == "core"
    for topic in NETWORK_TOPICS:
        assert rows[topic]["kind"] == "network" and rows[topic]["doc"]
    if "train" in INSTALLED:  # a plugin's own topics name the plugin
        for topic in ("epoch/accuracy", "final/accuracy", "epoch/loss", "final/loss"):
            assert rows[topic]["source"] == "plugin 'train'"
    if "norms" in INSTALLED:
        assert rows["norm/weight_gradients"]["kind"] == "module"
        assert "subscriber 'norm' (norms)" in rows["norm/weight_gradients"]["source"]
    if "accuracy" in INSTALLED:
        assert rows["train_accuracy"]["kind"] == "network"
        # listed although it needs held-out data: a run that provides everything has some
        assert rows["test_accuracy"]["source"].startswith("subscriber 'test_accuracy'")
    code, text, _ = run_cli("topics")
    assert code == 0 and text.startswith("core:\n")
    assert re.search(r"^  weight_gradients\s+module\s+p\.grad of each weight as the", text, re.M)


def test_schema_is_the_message_contract() -> None:
    code, out, _ = run_cli("schema")
    assert code == 0
    schema = json.loads(out)
    assert schema == json.loads(json.dumps(message_json_schema()))
    assert schema["title"] == "Ikkuna message contract"


# ---------------------------------------------------------------------- subprocesses


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "IKKUNA_PLUGINS"}
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_python_m_imports_no_heavy_library_for_light_commands() -> None:
    # `ikkuna schema` (like --help) must not pay for matplotlib, tensorboard, torchvision or
    # scikit-learn: -X importtime lists every module the process imported.
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ikkuna_core", "schema"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["title"] == "Ikkuna message contract"
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "ikkuna_core.cli" in imported
    heavy = {
        m
        for m in imported
        if m.split(".")[0] in {"matplotlib", "tensorboard", "torchvision", "sklearn"}
    }
    assert not heavy, sorted(heavy)
