"""What a user gets from what is installed, in real virtual environments.

Each environment is a fresh ``venv`` that sees this environment's site-packages minus chosen
distributions (their packages and metadata left out of a symlinked view, as if they had never
been installed), so nothing is downloaded. Into it, plugin distributions are really
pip-installed and pip-uninstalled, and the ``ikkuna`` command runs in a subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sysconfig
import venv
from importlib.metadata import distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
#: What the core needs no more: the training front end's libraries and the extras.
NOT_CORE = {"torchvision", "scikit-learn", "matplotlib", "tensorboard", "tqdm", "pillow"}


def _plugin_distributions() -> set[str]:
    """Every installed distribution registering an ``ikkuna`` entry point, but the core."""
    names = set()
    for dist in distributions():
        if any(ep.group == "ikkuna" for ep in dist.entry_points):
            names.add(dist.metadata["Name"].lower())
    return names - {"ikkuna-core"}


def make_env(root: Path, without: set[str]) -> Path:
    """A venv at ``root`` that sees this environment's packages except the distributions
    ``without``; returns its Python."""
    site = Path(sysconfig.get_paths()["purelib"])
    hidden: set[str] = set()
    for dist in distributions(path=[str(site)]):
        if dist.metadata["Name"].lower() in without:
            hidden |= {Path(str(f)).parts[0] for f in dist.files or ()}
    view = root / "view"
    view.mkdir(parents=True)
    for entry in site.iterdir():
        if entry.name not in hidden and entry.name != "__pycache__":
            (view / entry.name).symlink_to(entry)
    venv.create(root / "env", with_pip=False, symlinks=True)
    python = root / "env" / "bin" / "python"
    env_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    # an `import` line of a .pth file runs at start-up: the view becomes a site directory
    Path(env_site, "_ikkuna_view.pth").write_text(f"import site; site.addsitedir({str(view)!r})\n")
    return python


def run(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(python), *args], capture_output=True, text=True, env=env,
                          timeout=600)


def ikkuna(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(python, "-m", "ikkuna_core", *args)


def pip(python: Path, *args: str) -> None:
    proc = run(python, "-m", "pip", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr


LIBRARY_CHECK = """
import importlib.util, sys
for name in ("torchvision", "sklearn", "matplotlib", "tensorboard", "tqdm"):
    assert importlib.util.find_spec(name) is None, name + " is importable"
import torch
from torch import nn
import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend

class MaxAbs(ik.Subscriber):
    name = "max_abs"
    default_topics = ("weights",)
    def compute(self, bundle):
        self.publish_scalar(bundle, bundle[bundle.topics[0]].abs().max())

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
exporter = ik.watch(model, nn.CrossEntropyLoss(), {"backends": []})
exporter.bus.register_subscriber(MaxAbs())
backend = exporter.bus.add_backend(MemoryBackend())
opt = torch.optim.SGD(model.parameters(), lr=0.1)
opt.zero_grad()
exporter.loss_fn(model(torch.randn(5, 3)), torch.randint(0, 2, (5,))).backward()
opt.step()
exporter.close()
print(backend.scalar("max_abs/weights/2", 0), model[2].weight.abs().max().item())
"""


def test_the_core_alone(tmp_path: Path) -> None:
    """`pip install ./` without plugins, torchvision, scikit-learn, matplotlib: `ikkuna
    plugins`, `topics`, `schema` and the library work."""
    python = make_env(tmp_path, NOT_CORE | _plugin_distributions())

    proc = ikkuna(python, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [p["name"] for p in json.loads(proc.stdout)] == ["builtin"]
    assert proc.stderr == ""
    proc = ikkuna(python, "topics", "--json")
    assert proc.returncode == 0, proc.stderr
    assert {r["source"] for r in json.loads(proc.stdout)} == {"core"}
    proc = ikkuna(python, "schema")
    assert proc.returncode == 0 and json.loads(proc.stdout)["title"] == "Ikkuna message contract"
    proc = ikkuna(python, "--help")
    assert proc.returncode == 0 and "train" not in proc.stdout.split("COMMAND", 2)[2]

    proc = run(python, "-c", LIBRARY_CHECK)
    assert proc.returncode == 0, proc.stderr
    published, own = map(float, proc.stdout.split())
    assert published == pytest.approx(own)


def _copy(dist: str, where: Path) -> Path:
    """A private copy of a plugin's sources to build from (parallel test workers)."""
    return Path(shutil.copytree(PLUGINS / dist, where / dist,
                                ignore=shutil.ignore_patterns("build", "*.egg-info")))


@pytest.mark.skipif(not (PLUGINS / "ikkuna-train").is_dir(), reason="needs the plugins folder")
def test_uninstalling_a_plugin_removes_its_flags(tmp_path: Path) -> None:
    python = make_env(tmp_path, _plugin_distributions())
    sources = tmp_path / "src"
    sources.mkdir()
    pip(python, "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
        str(_copy("ikkuna-train", sources)), str(_copy("ikkuna-norms", sources)))

    proc = ikkuna(python, "train", "--help")
    assert proc.returncode == 0, proc.stderr
    flags = proc.stdout.split("subscriber flags:")[1].split("output:")[0]
    assert "--spectral-norm" in flags and "--ratio" in flags and "[norms]" in flags
    assert "--histogram" not in flags  # ikkuna-histograms is not installed here

    pip(python, "uninstall", "--yes", "ikkuna-norms")
    proc = ikkuna(python, "train", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "[norms]" not in proc.stdout
    flags = proc.stdout.split("subscriber flags:")[1].split("output:")[0]
    assert "--spectral-norm" not in flags and "--ratio" not in flags
    proc = ikkuna(python, "train", "--spectral-norm")
    assert proc.returncode == 2
    assert "ikkuna: error: unrecognized arguments: --spectral-norm" in proc.stderr
    proc = ikkuna(python, "plugins", "--json")
    assert [p["name"] for p in json.loads(proc.stdout)] == ["builtin", "train"]

