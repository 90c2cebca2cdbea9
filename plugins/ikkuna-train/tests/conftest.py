"""Fixtures of ikkuna-train's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread, and parallel test workers share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _every_installed_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests use the installed plugins, whatever the calling shell's IKKUNA_PLUGINS."""
    monkeypatch.delenv("IKKUNA_PLUGINS", raising=False)
