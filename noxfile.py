"""Sessions: tests, lint, typecheck, bench, demo. Run ``nox -s tests`` for the whole suite."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
PLUGINS = sorted(
    str(p) for p in (ROOT / "plugins").glob("ikkuna-*") if (p / "pyproject.toml").exists()
)
PYTHON = "3.11"


def _install_project(session: nox.Session) -> None:
    # The plugins' own dependencies (ikkuna-train's torchvision, scikit-learn, tqdm) come with
    # the first install; the second reinstalls the plugins themselves, non-editable, so their
    # entry points are the real, installed ones and a reused virtualenv has the current code.
    # each plugin with its test extra: ikkuna-gradstats' tests run Cockpit itself
    session.install("-e", ".[all,test]", *(f"{p}[test]" for p in PLUGINS))
    if PLUGINS:
        session.install("--force-reinstall", "--no-deps", *PLUGINS)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The core's and every plugin's tests (plugins/ikkuna-train included); tests/test_installs
    also checks the core alone, in a virtual environment without the plugins and their
    libraries."""
    _install_project(session)
    session.run("pytest", "-n", "2", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: style and common bugs."""
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "plugins", "benchmarks", "examples", "noxfile.py")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy on the core's sources."""
    session.install("-e", ".[all]", "mypy")
    session.run("mypy", "src/ikkuna_core")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Overhead benchmark against plain training, hand-written TensorBoard code and Cockpit."""
    _install_project(session)
    session.install("cockpit-for-pytorch")
    session.run("python", "benchmarks/overhead.py", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Train the default model on digits with every plugin and write a dashboard."""
    _install_project(session)
    session.run("ikkuna", "train", *session.posargs)
