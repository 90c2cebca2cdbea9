"""Shared fixtures: a subscriber that records clones of every payload it receives; the
project's own plugins, by name."""

from __future__ import annotations

import importlib.util
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.optim.optimizer as torch_optimizer
from torch import nn

import ikkuna_core as ik
from ikkuna_core.plugins import installed_entry_points


class Recorder(ik.Subscriber):
    """Keeps a clone of each payload, by (topic, key, step)."""

    name = "recorder"

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.seen: dict[tuple[str, str | None, int], torch.Tensor | None] = {}
        self.order: list[tuple[str, str | None, int]] = []

    def compute(self, bundle: ik.MessageBundle) -> None:
        for topic in bundle.topics:
            data = bundle[topic]
            ident = (topic, bundle.key, bundle.global_step)
            self.seen[ident] = None if data is None else data.detach().clone()
            self.order.append(ident)

    def topic_count(self, topic: str) -> int:
        return sum(1 for t, _, _ in self.order if t == topic)


@pytest.fixture(autouse=True)
def _no_installed_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Core tests see no installed plugin unless a test asks for one (like datasette)."""
    monkeypatch.setenv("IKKUNA_PLUGINS", "")


def _read_project_plugins() -> dict[str, str]:
    """The entry-point names of this repository's plugins (``plugins/ikkuna-*``) that are
    installed, each with its distribution's name (from their pyproject.toml files)."""
    found: dict[str, str] = {}
    root = Path(__file__).resolve().parents[1]
    for pyproject in sorted((root / "plugins").glob("ikkuna-*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        for name in project.get("entry-points", {}).get("ikkuna", {}):
            found[name] = project["name"]
    installed = {(ep.name, ep.dist.metadata["Name"] if ep.dist else None)
                 for ep in installed_entry_points()}
    return {name: dist for name, dist in found.items() if (name, dist) in installed}


PROJECT_PLUGINS = _read_project_plugins()


@pytest.fixture
def installed_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests of the installed plugins: the project's own, by name (``IKKUNA_PLUGINS``),
    so that another plugin installed beside them (a broken one, say) is never loaded."""
    monkeypatch.setenv("IKKUNA_PLUGINS", ",".join(sorted(PROJECT_PLUGINS)))


@pytest.fixture
def project_plugins() -> dict[str, str]:
    """{entry-point name: distribution} of this repository's installed plugins."""
    return dict(PROJECT_PLUGINS)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread, and parallel test workers share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def recorder_cls() -> type[Recorder]:
    return Recorder


def _hook_state(model: nn.Module, *others: nn.Module) -> dict[str, int]:
    """Every kind of hook an Exporter could leave behind on ``model`` (and on ``others``,
    e.g. a loss module), counted, with torch's global optimizer hooks."""
    modules = [*model.modules(), *others]
    return {
        "forward": sum(len(m._forward_hooks) for m in modules),
        "forward_pre": sum(len(m._forward_pre_hooks) for m in modules),
        "backward": sum(len(m._backward_hooks) + len(m._backward_pre_hooks) for m in modules),
        "post_accumulate": sum(
            len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()
        ),
        "optimizer_pre": len(torch_optimizer._global_optimizer_pre_hooks),
        "optimizer_post": len(torch_optimizer._global_optimizer_post_hooks),
    }


@pytest.fixture
def hook_state() -> Callable[..., dict[str, int]]:
    """``hook_state(model, loss_fn)``: hook counts to compare before and after."""
    return _hook_state


@pytest.fixture(scope="session")
def run_ranks() -> Callable[..., list[Any]]:
    """tests/_spawn.py's ``run_ranks``: a worker script on two real gloo ranks (the workers
    import that module as a script's neighbour; the tests, imported by path, get it here)."""
    spec = importlib.util.spec_from_file_location("_spawn", Path(__file__).with_name("_spawn.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run_ranks  # type: ignore[no-any-return]
