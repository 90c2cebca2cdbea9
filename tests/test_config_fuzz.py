"""Malformed configurations, from TOML files and from dicts: each is a ConfigError naming the
key path, and leaves no file and no hook behind (issue 11).

The subscribers are the project's real plugins (``norms``, ``histograms``, ``accuracy``),
found through their installed entry points.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ikkuna_core as ik

PLUGINS = "norms,histograms,accuracy"
HookState = Callable[..., dict[str, int]]

#: (case id, body of the [ikkuna] table, regex the message must match). ``{run}`` is a
#: fresh log directory, ``{file}`` an existing file. The regex starts at the key path.
CASES: list[tuple[str, str, str]] = [
    ("topics_empty", '[[ikkuna.subscribers]]\nname = "norm"\ntopics = []',
     r"ikkuna\.subscribers\[0\]\.topics: an empty list subscribes to nothing"),
    ("topics_str", '[[ikkuna.subscribers]]\nname = "norm"\ntopics = "weights"',
     r"ikkuna\.subscribers\[0\]\.topics: Input should be a valid list"),
    ("topics_unknown", '[[ikkuna.subscribers]]\nname = "norm"\ntopics = ["weight"]',
     r"ikkuna\.subscribers\[0\]\.topics: unknown topic 'weight'; known topics: "),
    ("topics_event", '[[ikkuna.subscribers]]\nname = "histogram"\ntopics = ["batch_started"]',
     r"ikkuna\.subscribers\[0\]\.topics: topics \['batch_started'\] carry no tensor payload"),
    ("depth_zero", "depth = 0", r"ikkuna\.depth: got 0; use -1 \(leaf modules\) or a level"),
    ("depth_negative", "depth = -3", r"ikkuna\.depth: got -3; use -1"),
    ("depth_str", 'depth = "3"', r"ikkuna\.depth: Input should be a valid integer"),
    ("depth_bool", "depth = true", r"ikkuna\.depth: Input should be a valid integer"),
    ("plugin_unknown", 'plugins = ["norms", "nrom"]',
     r"ikkuna\.plugins: unknown plugin\(s\) 'nrom'; installed plugins: .*norms"),
    ("plugins_str", 'plugins = "norms"', r"ikkuna\.plugins: Input should be a valid list"),
    ("publish_as_loss",
     '[[ikkuna.subscribers]]\nname = "norm"\ntopics = ["weights"]\npublish_as = "loss"',
     r"ikkuna\.subscribers\[0\]\.publish_as: 'loss' is already a topic \(the loss value"),
    ("publish_as_own_input",
     '[[ikkuna.subscribers]]\nname = "norm"\ntopics = ["weights"]\npublish_as = "weights"',
     r"ikkuna\.subscribers\[0\]\.publish_as: 'weights' is one of the subscriber's own input"),
    ("publish_as_loop",  # the second norm would consume its own results
     '[[ikkuna.subscribers]]\nname = "norm"\ntopics = ["weights"]\n'
     '[[ikkuna.subscribers]]\nname = "norm"\ntopics = ["norm/weights"]\n'
     'publish_as = "norm/weights"',
     r"ikkuna\.subscribers\[1\]\.publish_as: 'norm/weights' is one of the subscriber's own"),
    ("publish_as_empty", '[[ikkuna.subscribers]]\nname = "loss"\npublish_as = ""',
     r"ikkuna\.subscribers\[0\]\.publish_as: must not be empty"),
    ("log_dir_empty", 'log_dir = ""',
     r"ikkuna\.log_dir: got '', which would write into the current directory"),
    ("log_dir_blank", 'log_dir = "  "', r"ikkuna\.log_dir: got '  ', which would write"),
    ("log_dir_file", 'log_dir = "{file}"',
     r"ikkuna\.log_dir: '.*file\.txt' exists and is not a directory"),
    ("log_dir_under_file", 'log_dir = "{file}/run"',
     r"ikkuna\.log_dir: '.*file\.txt/run' cannot be created: '.*file\.txt' is a file"),
    ("log_dir_list", 'log_dir = ["runs"]', r"ikkuna\.log_dir: Input is not a valid path"),
    ("subscribers_table", '[ikkuna.subscribers]\nname = "norm"',
     r"ikkuna\.subscribers: Input should be a valid list"),
    ("subscriber_list", 'subscribers = [["norm"]]',
     r"ikkuna\.subscribers\[0\]: Input should be a valid dictionary"),
    ("subscriber_no_name", '[[ikkuna.subscribers]]\ntopics = ["weights"]',
     r"ikkuna\.subscribers\[0\]\.name: Field required"),
    ("subscriber_unknown", '[[ikkuna.subscribers]]\nname = "nrom"',
     r"ikkuna\.subscribers\[0\]\.name: unknown subscriber 'nrom'; available: .*norm"),
    ("subscriber_option_unknown", '[[ikkuna.subscribers]]\nname = "norm"\npp = 2',
     r"ikkuna\.subscribers\[0\]\.pp: unknown option of subscriber 'norm'; valid options: p,"),
    ("subscriber_option_type", '[[ikkuna.subscribers]]\nname = "norm"\np = "two"',
     r"ikkuna\.subscribers\[0\]\.p: p must be a number > 0 or 'inf', got 'two' "
     r"\(subscriber 'norm'\)"),
    ("subsample_zero", '[[ikkuna.subscribers]]\nname = "loss"\nsubsample = 0',
     r"ikkuna\.subscribers\[0\]\.subsample: Input should be greater than or equal to 1"),
    ("backends_str", 'backends = "tensorboard"', r"ikkuna\.backends: Input should be a valid list"),
    ("backends_twice", 'backends = ["tensorboard", "tensorboard"]',
     r"ikkuna\.backends: \['tensorboard'\] listed more than once"),
    ("backend_unknown", 'backends = ["tensorboard", "wandb"]',
     r"ikkuna\.backends\[1\]: unknown backend 'wandb'; available: matplotlib, tensorboard"),
    ("backend_options_list", 'backend_options = ["matplotlib"]',
     r"ikkuna\.backend_options: Input should be a valid dictionary"),
    ("backend_options_value", 'backends = ["matplotlib"]\nbackend_options = {matplotlib = 5}',
     r"ikkuna\.backend_options\.matplotlib: Input should be a valid dictionary"),
    ("backend_option_unknown",
     'backends = ["matplotlib"]\nbackend_options = {matplotlib = {plot_evry = 5}}',
     r"ikkuna\.backend_options\.matplotlib: got an unexpected keyword argument 'plot_evry'"),
    ("backend_option_range",
     'backends = ["tensorboard", "matplotlib"]\nbackend_options = {matplotlib = {plot_every = 0}}',
     r"ikkuna\.backend_options\.matplotlib\.plot_every: Input should be greater than or equal"),
    ("backend_option_type",
     'backends = ["matplotlib"]\nbackend_options = {matplotlib = {plot_every = "often"}}',
     r"ikkuna\.backend_options\.matplotlib\.plot_every: Input should be a valid integer"),
    ("backend_options_unused", 'backend_options = {matplotlib = {plot_every = 5}}',
     r"ikkuna\.backend_options: \['matplotlib'\] are not in ikkuna\.backends"),
    ("unknown_key", 'colour = "red"',
     r"ikkuna\.colour: Extra inputs are not permitted; valid keys: backend_options, backends"),
    ("misspelt_key", "flush_evry = 2",
     r"ikkuna\.flush_evry: .*\(did you mean 'flush_every'\?\); valid keys: "),
    ("flush_every_zero", "flush_every = 0",
     r"ikkuna\.flush_every: Input should be greater than or equal to 1"),
    ("flush_every_float", "flush_every = 1.5", r"ikkuna\.flush_every: Input should be a valid"),
    ("on_error", 'on_error = "ignore"', r"ikkuna\.on_error: Input should be 'raise' or 'warn'"),
    ("publish_in_eval_str", 'publish_in_eval = "yes"',
     r"ikkuna\.publish_in_eval: Input should be a valid boolean"),
    ("include_empty", "include = []", r"ikkuna\.include: an empty list selects no module"),
    ("include_unknown", 'include = ["Conv9d"]',
     r"ikkuna\.include: 'Conv9d' is not a torch\.nn module class"),
    ("include_absent", 'include = ["Conv2d"]',
     r"ikkuna\.include: no module of Sequential matches depth=-1 include=\['Conv2d'\]"),
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def tree(root: Path) -> list[str]:
    """Every path under ``root``, relative, sorted (directories included)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def project_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IKKUNA_PLUGINS", PLUGINS)


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory inside ``tmp_path``, so a run written into "the current
    directory" would show up in the tree."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (tmp_path / "file.txt").write_text("not a directory")
    return tmp_path


def _body(text: str, tmp: Path) -> str:
    text = text.replace("{file}", (tmp / "file.txt").as_posix())
    has_log_dir = re.search(r"^log_dir\s*=", text, flags=re.MULTILINE)
    plugins = "" if "plugins" in text else f"plugins = {PLUGINS.split(',')!r}\n"
    log_dir = "" if has_log_dir else f'log_dir = "{(tmp / "run").as_posix()}"\n'
    # top-level keys must precede the [[ikkuna.subscribers]] tables
    return "[ikkuna]\n" + plugins + log_dir + text + "\n"


def _attempt(config: Any, expected: str, sandbox: Path, hook_state: HookState) -> None:
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    hooks, files = hook_state(model, loss_fn), tree(sandbox)
    with pytest.raises(ik.ConfigError) as err:
        ik.watch(model, loss_fn, config=config)
    assert re.search(expected, str(err.value)), str(err.value)
    assert hook_state(model, loss_fn) == hooks
    assert tree(sandbox) == files


@pytest.mark.usefixtures("project_plugins")
@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_toml_file(
    sandbox: Path, text: str, expected: str, hook_state: HookState
) -> None:
    path = sandbox / "ikkuna.toml"
    path.write_text(_body(text, sandbox))
    _attempt(path, expected, sandbox, hook_state)


@pytest.mark.usefixtures("project_plugins")
@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_dict(sandbox: Path, text: str, expected: str, hook_state: HookState) -> None:
    config = tomllib.loads(_body(text, sandbox))["ikkuna"]
    _attempt(config, expected, sandbox, hook_state)


@pytest.mark.usefixtures("project_plugins")
@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (["norm"], r"ikkuna: the configuration must be a TOML path, a mapping"),
        ({"ikkuna": {"depth": 1}}, r"ikkuna\.ikkuna: .*pass the \[ikkuna\] table itself"),
        ({"log_dir": 3}, r"ikkuna\.log_dir: Input is not a valid path"),
        ({"subscribers": [{"name": "loss", "window": 0}]},
         r"ikkuna\.subscribers\[0\]\.window: Input should be greater than or equal to 1"),
    ],
)
def test_malformed_python_values(
    sandbox: Path, config: Any, expected: str, hook_state: HookState
) -> None:
    _attempt(config, expected, sandbox, hook_state)


@pytest.mark.skipif(
    os.geteuid() == 0 and os.access("/proc/sys", os.W_OK),
    reason="no directory here is read-only for this user",
)
@pytest.mark.usefixtures("project_plugins")
def test_log_dir_not_writable(sandbox: Path, hook_state: HookState) -> None:
    locked = sandbox / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        parent = locked if not os.access(locked, os.W_OK) else Path("/proc/sys")  # root
        config = {"plugins": [], "log_dir": str(parent / "run")}
        expected = rf"ikkuna\.log_dir: '{re.escape(str(parent))}' is not writable"
        _attempt(config, expected, sandbox, hook_state)
    finally:
        locked.chmod(0o700)


@pytest.mark.usefixtures("project_plugins")
def test_the_probes_see_what_watch_attaches(sandbox: Path, hook_state: HookState) -> None:
    """The checks above can fail: a valid configuration changes both probes."""
    model, loss_fn = _model(), nn.CrossEntropyLoss()
    hooks, files = hook_state(model, loss_fn), tree(sandbox)
    config = _body('[[ikkuna.subscribers]]\nname = "norm"\ntopics = ["weight_gradients"]', sandbox)
    exporter = ik.watch(model, loss_fn, config=tomllib.loads(config)["ikkuna"])
    try:
        after = hook_state(model, loss_fn)
        assert after["forward_pre"] == hooks["forward_pre"] + 1
        assert after["forward"] == hooks["forward"] + 1  # the loss module
        assert after["post_accumulate"] == hooks["post_accumulate"] + 2  # two weights
        assert after["optimizer_pre"] == hooks["optimizer_pre"] + 1
        assert after["optimizer_post"] == hooks["optimizer_post"] + 1
        assert tree(sandbox) != files  # the TensorBoard run directory
    finally:
        exporter.close()
    assert hook_state(model, loss_fn) == hooks
