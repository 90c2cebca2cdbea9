"""Fixtures of ikkuna-train's tests."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

import ikkuna_core.plugins


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread, and parallel test workers share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _read_project_plugins() -> dict[str, str]:
    """{entry-point name: distribution} of this repository's plugins (``plugins/ikkuna-*``)."""
    found: dict[str, str] = {}
    for pyproject in sorted(Path(__file__).resolve().parents[2].glob("ikkuna-*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        for name in project.get("entry-points", {}).get("ikkuna", {}):
            found[name] = project["name"]
    return found


PROJECT_PLUGINS = _read_project_plugins()
_installed_entry_points = ikkuna_core.plugins.installed_entry_points


def _project_entry_points() -> list[EntryPoint]:
    """The installed entry points of this repository's plugin distributions (the real ones)."""
    return [
        ep for ep in _installed_entry_points()
        if PROJECT_PLUGINS.get(ep.name) == (ep.dist.metadata["Name"] if ep.dist else None)
    ]


@pytest.fixture(autouse=True)
def _the_projects_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests use the project's installed plugins, whatever else is installed and
    whatever the calling shell's IKKUNA_PLUGINS: a run loads them by name (IKKUNA_PLUGINS),
    and the command line, which offers every installed plugin's flags whatever
    IKKUNA_PLUGINS says, sees only theirs, so that another plugin installed beside them (a
    broken one warns on stderr; a working one adds flags and default subscribers) changes
    nothing the tests compare. Tests of other plugins install their own (test_plugins.py)."""
    installed = sorted(ep.name for ep in _project_entry_points())
    monkeypatch.setenv("IKKUNA_PLUGINS", ",".join(installed))
    monkeypatch.setattr(ikkuna_core.plugins, "installed_entry_points", _project_entry_points)
