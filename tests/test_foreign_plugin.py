"""The suite does not depend on what else is installed: with a third-party plugin distribution
whose import fails installed beside the project's plugins (pip-installed into a folder put
on the path, as in test_plugins.py), tests that use the installed plugins pass unchanged,
because they name the project's plugins instead of enabling every installed one."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ikkuna_core as ik

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "plugin_fixtures"

#: Tests that load the installed plugins, in the core (the `ikkuna plugins` listing) and in
#: ikkuna-train (the command line, whose stderr they compare line by line, and a short run).
SUBSET = [
    "tests/test_cli.py::test_plugins_json_lists_installed_distributions_with_real_versions",
    "tests/test_cli.py::test_topics",
    "plugins/ikkuna-train/tests/test_train_cli.py::test_bad_input_is_one_clear_line_and_exit_2"
    "[model]",
    "plugins/ikkuna-train/tests/test_train_cli.py::test_bad_input_is_one_clear_line_and_exit_2"
    "[config_unknown_subscriber]",
    "plugins/ikkuna-train/tests/test_train_cli.py::test_report_command_errors",
    "plugins/ikkuna-train/tests/test_train_cli.py::test_flag_whose_plugin_the_environment_disables",
    "plugins/ikkuna-train/tests/test_trainer.py::test_bad_configuration_writes_nothing",
]


@pytest.fixture(scope="module")
def foreign_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ikkuna-badplugins (entry points 'fixture-broken': its import fails; 'fixture-typo': a
    misspelled hook; 'fixture-clash': loads) installed with pip into a folder of its own.
    The names are the fixture's own, so a user's plugin called 'broken' collides with none."""
    sources = tmp_path_factory.mktemp("foreign_src")
    shutil.copytree(FIXTURES / "ikkuna-badplugins", sources / "ikkuna-badplugins",
                    ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = tmp_path_factory.mktemp("foreign_site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(sources / "ikkuna-badplugins")],
        check=True,
    )
    return site


def test_the_foreign_plugin_is_found_and_fails_to_import(
    foreign_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the subset below runs with: the plugin is installed, and loading every installed
    plugin (no IKKUNA_PLUGINS) meets its failure."""
    monkeypatch.setattr(sys, "path", [str(foreign_site), *sys.path])
    importlib.invalidate_caches()
    monkeypatch.delenv("IKKUNA_PLUGINS", raising=False)
    try:
        registry = ik.load_plugins(strict=False)
    finally:
        for name in [m for m in sys.modules if m.startswith("ikkuna_badplugins")]:
            del sys.modules[name]
    broken = registry.plugins["fixture-broken"]
    assert broken.distribution == "ikkuna-badplugins" and not broken.loaded
    assert "a_module_that_does_not_exist" in (broken.error or "")


def test_tests_that_use_installed_plugins_pass_beside_a_broken_one(
    foreign_site: Path, tmp_path: Path
) -> None:
    # (not the outer run's PYTEST_* variables: under xdist they describe its worker)
    env = {k: v for k, v in os.environ.items()
           if k != "IKKUNA_PLUGINS" and not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(foreign_site), os.environ.get("PYTHONPATH", "")) if p
    )
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         "--basetemp", str(tmp_path / "basetemp"), *SUBSET],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(rf"\b{len(SUBSET)} passed\b", proc.stdout), proc.stdout[-2000:]
