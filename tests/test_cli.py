"""Tests for the ``ikkuna`` command: every sub-command and option, run in-process through
``main(argv)``, plus one real subprocess through the installed console script."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from importlib.metadata import EntryPoint, version
from pathlib import Path

import pytest
import torch

from ikkuna_core import MODULE_TOPICS, NETWORK_TOPICS, load_config, message_json_schema
from ikkuna_core.cli import QUICKSTART_SUBSCRIBERS, build_parser, main
from ikkuna_core.data import make_loaders
from ikkuna_core.models import get_model
from ikkuna_core.plugins import installed_entry_points

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
INSTALLED = {ep.name for ep in installed_entry_points()}
ALL_PLUGINS = {"norms", "histograms", "accuracy"}
#: A scalar (or histogram) tag each quickstart subscriber writes for FullyConnected.
QUICKSTART_TAGS = {
    "loss": ("accuracy", "loss/loss"),
    "train_accuracy": ("accuracy", "train_accuracy"),
    "test_accuracy": ("accuracy", "test_accuracy"),
    "norm": ("norms", "norm/weight_gradients/net.1"),
    "spectral_norm": ("norms", "spectral_norm/weights/net.3"),
    "ratio": ("norms", "ratio/weight_updates/weights/net.5"),
    "dead_fraction": ("histograms", "dead_fraction/activations/net.2"),
    "histogram": ("histograms", "histogram/activations/net.1"),
}


pytestmark = pytest.mark.usefixtures("installed_plugins", "one_thread")


def needs(*plugins: str) -> pytest.MarkDecorator:
    missing = sorted(set(plugins) - INSTALLED)
    return pytest.mark.skipif(bool(missing), reason=f"not installed: {', '.join(missing)}")


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def read_events(log_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """Scalars and histogram tags of a run, read back with EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    return scalars, list(tags["histograms"])


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def own_test_accuracy(model_path: Path) -> float:
    model = get_model("FullyConnected", input_shape=(1, 28, 28), num_classes=10)
    model.load_state_dict(torch.load(model_path, weights_only=True))
    model.eval()
    _, test_loader, _ = make_loaders("digits", batch_size=50)
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in test_loader)
    return hits / len(test_loader.dataset)


def config_file(tmp_path: Path, body: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text("[ikkuna]\n" + body)
    return path


# ------------------------------------------------------------------ the quickstart run


def test_quickstart_run(tmp_path: Path) -> None:
    """`ikkuna train` with every default, cut short (12 steps of 64 images): one run, checked
    from every side (one test, so that parallel test workers do not each train it)."""
    log_dir = tmp_path / "run"
    code, out, err = run_cli(
        "train", "--max-steps", 12, "-b", 64, "--seed", 1, "--log-dir", log_dir, "--progress"
    )
    assert code == 0, err

    # what it writes
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert (log_dir / "model.pt").is_file()
    figures = sorted(p.name for p in (log_dir / "figures").glob("*.png"))
    assert "epoch__accuracy.png" in figures
    width, height = png_size(log_dir / "dashboard.png")
    assert width == 1620 and 800 <= height <= 2400
    doc = json.loads((log_dir / "run.json").read_text())
    expected = [
        e["name"] for e in QUICKSTART_SUBSCRIBERS if QUICKSTART_TAGS[e["name"]][0] in INSTALLED
    ]
    assert doc["subscribers"] == expected
    assert doc["hparams"]["model"] == "FullyConnected" and doc["hparams"]["dataset"] == "digits"
    assert doc["hparams"]["optimizer"] == "Adam" and doc["hparams"]["batch_size"] == 64
    assert doc["backends"] == ["tensorboard", "matplotlib"]
    assert doc["steps"] == 12

    # the one-screen summary and the progress bar
    assert f"tensorboard --logdir {log_dir}" in out
    assert str(log_dir / "dashboard.png") in out
    assert f"{len(figures)} PNGs in {log_dir / 'figures'}" in out
    assert re.search(r"accuracy\s+train 0\.\d{4}\s+test 0\.\d{4}", out)
    assert len(out.splitlines()) <= 25
    assert "12/12" in err and "loss=" in err and "test_acc=" in err

    # every plugin's metrics are in the TensorBoard logs
    scalars, histograms = read_events(log_dir)
    for name, (plugin, tag) in QUICKSTART_TAGS.items():
        if plugin in INSTALLED:
            assert tag in scalars or tag in histograms, f"{name}: {tag} missing"
    if "accuracy" in INSTALLED:
        assert [s for s, _ in scalars["test_accuracy"]] == [0, 10]  # subsample = 10
        assert [s for s, _ in scalars["train_accuracy"]] == list(range(12))

    # the logged final test accuracy is the saved model's, computed here
    own = own_test_accuracy(log_dir / "model.pt")
    assert scalars["final/accuracy/test"] == [(11, pytest.approx(own, abs=1e-6))]
    assert f"test {own:.4f}" in out
    assert doc["test_accuracy"] == pytest.approx(own)

    # `ikkuna report` redraws the same dashboard elsewhere
    out_png = tmp_path / "dash.png"
    code, out, err = run_cli("report", log_dir, "-o", out_png)
    assert code == 0, err
    size = png_size(out_png)
    assert size == (width, height)
    assert f"dashboard written to {out_png} ({size[0]} x {size[1]} px)" in out


def test_report_command_errors(tmp_path: Path) -> None:
    code, out, err = run_cli("report", tmp_path / "missing")
    assert (code, out) == (2, "")
    assert err == f"ikkuna: error: log directory {tmp_path / 'missing'} does not exist\n"
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("report", tmp_path / "empty")
    assert code == 2 and "no TensorBoard event files" in err


# -------------------------------------------------------------------- train options


@needs(*ALL_PLUGINS)
def test_flags_add_subscribers_to_the_config_file(tmp_path: Path) -> None:
    cfg = config_file(tmp_path, 'backends = ["tensorboard"]\n')
    log_dir = tmp_path / "run"
    code, _, err = run_cli(
        "train",
        "--config",
        cfg,
        "--log-dir",
        log_dir,
        "--max-steps",
        5,
        "-b",
        32,
        "-s",
        2,
        "--spectral-norm",
        "--histogram",
        "--ratio",
        "--test-accuracy",
        "--train-accuracy",
        "--no-report",
    )
    assert code == 0, err
    doc = json.loads((log_dir / "run.json").read_text())
    assert doc["subscribers"] == [
        "spectral_norm",
        "ratio",
        "histogram",
        "train_accuracy",
        "test_accuracy",
    ]
    assert doc["backends"] == ["tensorboard"]  # from the file: no figures
    assert not (log_dir / "figures").exists()
    scalars, histograms = read_events(log_dir)
    for tag in (
        "spectral_norm/weights/net.1",
        "ratio/weight_updates/weights/net.1",
        "train_accuracy",
        "test_accuracy",
    ):
        assert [s for s, _ in scalars[tag]] == [0, 2, 4], tag  # -s 2
    assert "histogram/activations/net.1" in histograms


@needs("norms", "histograms")
def test_flag_does_not_duplicate_and_file_subsample_wins(tmp_path: Path) -> None:
    cfg = config_file(
        tmp_path,
        'backends = ["tensorboard"]\n[[ikkuna.subscribers]]\nname = "spectral_norm"\n'
        "subsample = 3\n",
    )
    log_dir = tmp_path / "run"
    code, _, err = run_cli(
        "train",
        "--config",
        cfg,
        "--log-dir",
        log_dir,
        "--max-steps",
        7,
        "-b",
        32,
        "--spectral-norm",
        "--histogram",
        "-s",
        2,
        "--depth",
        1,
        "--no-report",
    )
    assert code == 0, err
    doc = json.loads((log_dir / "run.json").read_text())
    assert doc["subscribers"] == ["spectral_norm", "histogram"]
    assert doc["ikkuna_config"]["depth"] == 1
    scalars, histograms = read_events(log_dir)
    # --depth 1 watches FullyConnected's one child, the Sequential `net` (which has no
    # parameters of its own): no spectral norms, one activation histogram.
    assert not [t for t in scalars if t.startswith("spectral_norm")]
    assert histograms == ["histogram/activations/net"]


def test_visualisation_and_log_dir_choices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    base = ("train", "--max-steps", 1, "-b", 256, "--plugins", "", "--no-report")

    code, out, _ = run_cli(*base, "-v", "mpl", "--log-dir", "mpl")
    assert code == 0
    assert list((tmp_path / "mpl" / "figures").glob("*.png"))
    assert not list((tmp_path / "mpl").glob("events.out.tfevents.*"))
    assert "tensorboard --logdir" not in out

    code, out, _ = run_cli(*base, "-v", "tb", "--log-dir", "tb")
    assert code == 0 and not (tmp_path / "tb" / "figures").exists()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))

    # default log dir: runs/<model>-<dataset>-<time>, relative to the working directory
    code, out, _ = run_cli(*base, "-v", "tb")
    (made,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"FullyConnected-digits-\d{8}-\d{6}", made.name)
    assert f"tensorboard --logdir {Path('runs') / made.name}" in out

    # a configuration file's log_dir and backends are used unless the flags say otherwise
    cfg = config_file(tmp_path, 'log_dir = "from_file"\nbackends = ["matplotlib"]\n')
    assert run_cli(*base, "--config", cfg)[0] == 0
    assert list((tmp_path / "from_file" / "figures").glob("*.png"))
    assert run_cli(*base, "--config", cfg, "-v", "tb")[0] == 0
    assert list((tmp_path / "from_file").glob("events.out.tfevents.*"))


def test_hyperparameter_options_reach_the_run(tmp_path: Path) -> None:
    log_dir = tmp_path / "run"
    code, out, err = run_cli(
        "train",
        "-m",
        "fullyconnected",
        "-d",
        "DIGITS",
        "-b",
        100,
        "-e",
        2,
        "-o",
        "sgd",
        "--lr",
        0.2,
        "--seed",
        5,
        "--device",
        "cpu",
        "--data-dir",
        tmp_path / "data",
        "--init",
        "xavier",
        "--plugins",
        "",
        "-v",
        "tb",
        "--log-dir",
        log_dir,
        "--no-report",
        "-V",
        "--threads",
        2,
    )
    assert code == 0, err
    hp = json.loads((log_dir / "run.json").read_text())["hparams"]
    assert hp == {
        "model": "FullyConnected",
        "dataset": "digits",
        "batch_size": 100,
        "epochs": 2,
        "optimizer": "SGD",
        "lr": 0.2,
        "seed": 5,
        "device": "cpu",
        "init": "xavier",
        "max_steps": None,
        "data_dir": str(tmp_path / "data"),
        "download": True,
        "num_workers": 0,
        "threads": 2,
    }
    assert json.loads((log_dir / "run.json").read_text())["steps"] == 2 * 15  # 1437 / 100
    assert torch.get_num_threads() == 2
    # -V: the plan and one line per epoch
    assert "hyper-parameters: model=FullyConnected" in out
    assert len(re.findall(r"^epoch\s+\d+\s+step\s+\d+\s+loss", out, flags=re.M)) == 2


def test_train_defaults_and_help() -> None:
    args = build_parser().parse_args(["train"])
    assert (args.model, args.dataset, args.batch_size, args.epochs, args.optimizer) == (
        "FullyConnected",
        "digits",
        128,
        10,
        "Adam",
    )
    assert (args.lr, args.subsample, args.depth, args.visualisation, args.seed) == (
        None,
        None,
        None,
        None,
        0,
    )
    code, out, _ = run_cli("train", "--help")
    assert code == 0
    for option in (
        "-m",
        "--model",
        "-d",
        "--dataset",
        "-b",
        "--batch-size",
        "-e",
        "--epochs",
        "-o",
        "--optimizer",
        "--lr",
        "-s",
        "--subsample",
        "-v",
        "--visualisation",
        "-V",
        "--verbose",
        "--spectral-norm",
        "--histogram",
        "--ratio",
        "--test-accuracy",
        "--train-accuracy",
        "--depth",
        "--config",
        "--plugins",
        "--seed",
        "--log-dir",
        "--device",
        "--data-dir",
        "--max-steps",
        "--threads",
    ):
        assert re.search(rf"(^|[\s,\[]){re.escape(option)}\b", out), option
    code, out, _ = run_cli("--help")
    assert code == 0 and all(c in out for c in ("train", "plugins", "topics", "schema", "report"))
    code, out, _ = run_cli()
    assert code == 2 and "usage: ikkuna" in out
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"ikkuna-core {version('ikkuna-core')}"


# ------------------------------------------------------------------------ bad input

FLAG_PLUGINS = [
    ("--spectral-norm", "ikkuna-norms"),
    ("--ratio", "ikkuna-norms"),
    ("--histogram", "ikkuna-histograms"),
    ("--train-accuracy", "ikkuna-accuracy"),
    ("--test-accuracy", "ikkuna-accuracy"),
]


@pytest.mark.parametrize(("flag", "distribution"), FLAG_PLUGINS)
def test_flag_without_its_plugin_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str, distribution: str
) -> None:
    monkeypatch.setattr("ikkuna_core.plugins.installed_entry_points", lambda: [])
    code, out, err = run_cli("train", flag, "--log-dir", tmp_path / "run")
    assert (code, out) == (2, "")
    assert err == (
        f"ikkuna: error: {flag} needs the {distribution} plugin: "
        f"pip install ./plugins/{distribution}\n"
    )
    assert not (tmp_path / "run").exists()


@needs("norms", "histograms")
def test_flag_whose_plugin_is_not_enabled(tmp_path: Path) -> None:
    code, _, err = run_cli("train", "--plugins", "histograms", "--ratio", "--log-dir", tmp_path)
    assert code == 2
    assert "--ratio needs the 'norms' plugin, which --plugins does not enable" in err
    assert "--plugins histograms,norms" in err
    assert not list(tmp_path.iterdir())


@needs("norms")
def test_flag_whose_plugin_the_environment_disables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IKKUNA_PLUGINS", "")
    code, _, err = run_cli("train", "--spectral-norm", "--log-dir", tmp_path / "run")
    assert code == 2
    assert err == (
        "ikkuna: error: --spectral-norm needs the 'norms' plugin, which is installed but not "
        "enabled (IKKUNA_PLUGINS=''); add it to IKKUNA_PLUGINS or unset it\n"
    )
    assert not (tmp_path / "run").exists()


def test_unavailable_dataset_is_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ikkuna_core.data import DatasetUnavailableError

    def offline(name: str, **kwargs: object) -> None:
        raise DatasetUnavailableError(f"Dataset {name} is not available: download failed")

    monkeypatch.setattr("ikkuna_core.data.make_loaders", offline)
    code, out, err = run_cli("train", "-d", "mnist", "--log-dir", tmp_path / "run")
    assert (code, out) == (1, "")
    assert err == "ikkuna: error: Dataset MNIST is not available: download failed\n"
    assert not (tmp_path / "run").exists()


BAD_CONFIGS = {
    "syntax": ('[ikkuna\nbackends = "x"\n', r"is not valid TOML"),
    "no_table": ("[run]\nx = 1\n", r"has no \[ikkuna\] table; tables found: \['run'\]"),
    "unknown_key": ('[ikkuna]\ncolour = "red"\n', r"ikkuna\.colour: Extra inputs"),
    "wrong_type": ('[ikkuna]\ndepth = "deep"\n', r"ikkuna\.depth: Input should be a valid"),
    "unknown_subscriber": (
        '[ikkuna]\n[[ikkuna.subscribers]]\nname = "nrom"\n',
        r"ikkuna\.subscribers\[0\]\.name: unknown subscriber 'nrom'; available: ",
    ),
    "unknown_backend": (
        '[ikkuna]\nbackends = ["wandb"]\n',
        r"unknown backend 'wandb'; available: matplotlib, tensorboard",
    ),
}


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["-m", "ResNet50"], id="model"),
        pytest.param(["-d", "mnst"], id="dataset"),
        pytest.param(["-o", "adamm"], id="optimizer"),
        pytest.param(["--init", "he"], id="init"),
        pytest.param(["--device", "bogus"], id="device"),
        pytest.param(["--plugins", "nosuch"], id="plugins"),
        pytest.param(["--config", "{tmp}/missing.toml"], id="missing_config"),
        *[pytest.param(["--config", f"{{tmp}}/{k}.toml"], id=f"config_{k}") for k in BAD_CONFIGS],
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path: Path, argv: list[str]) -> None:
    for name, (body, _) in BAD_CONFIGS.items():
        (tmp_path / f"{name}.toml").write_text(body)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    log_dir = tmp_path / "run"
    code, out, err = run_cli("train", *argv, "--log-dir", log_dir, "--max-steps", 1)
    assert (code, out) == (2, "")
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ikkuna: error: "), err
    expected = {
        "-m": r"unknown model 'ResNet50'.*choose one of: FullyConnected, AlexNetMini",
        "-d": r"unknown dataset 'mnst' \(did you mean 'MNIST'\?\)",
        "-o": r"unknown optimizer 'adamm' \(did you mean 'Adam'\?\); choose one of: SGD",
        "--init": r"unknown init scheme 'he'; choose one of: kaiming, xavier, default",
        "--device": r"invalid device 'bogus'",
        "--plugins": r"unknown plugin\(s\) 'nosuch'; installed plugins: ",
    }.get(argv[0])
    if expected is None:
        name = Path(argv[1]).stem
        expected = BAD_CONFIGS[name][1] if name in BAD_CONFIGS else r"missing\.toml does not exist"
        assert argv[1] in err  # names the file
    assert re.search(expected, err), err
    assert not log_dir.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "-1"], "argument --lr: expected a number > 0, got -1.0"),
        (["-b", "0"], "argument -b/--batch-size: expected a number >= 1, got 0"),
        (["-v", "png"], "argument -v/--visualisation: invalid choice: 'png'"),
        (["--depth", "0"], "argument --depth: expected -1 (leaf modules) or >= 1, got 0"),
        (["--epochs", "many"], "argument -e/--epochs: expected a whole number, got 'many'"),
    ],
)
def test_bad_option_values_are_reported_by_the_parser(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    code, out, err = run_cli("train", *argv, "--log-dir", tmp_path / "run")
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith("ikkuna train: error: ") and message in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


# --------------------------------------------------------- plugins, topics, schema


def test_plugins_json_lists_installed_distributions_with_real_versions() -> None:
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
        assert entry["loaded"] and entry["error"] is None, entry
        assert "ikkuna_subscribers" in entry["hooks"]
    provided = {
        "norms": {"norm", "spectral_norm", "ratio", "variance", "mean"},
        "histograms": {"histogram", "dead_fraction"},
        "accuracy": {"train_accuracy", "test_accuracy", "loss"},
    }
    for plugin, subscribers in provided.items():
        if plugin in listed:
            assert set(listed[plugin]["subscribers"]) >= subscribers

    code, text, _ = run_cli("plugins")
    assert code == 0
    for ep in eps:
        assert f"{ep.name}  [loaded]  {ep.dist.metadata['Name']} {ep.dist.version}" in text


def test_plugins_shows_a_plugin_that_fails_to_load(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = EntryPoint(name="broken", value="ikkuna_no_such_module_xyz", group="ikkuna")
    monkeypatch.setattr("ikkuna_core.plugins.installed_entry_points", lambda: [broken])
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
    for topic in ("epoch/accuracy", "final/accuracy", "epoch/loss", "final/loss"):
        assert rows[topic]["source"] == "ikkuna train"
    if "norms" in INSTALLED:
        assert rows["norm/weight_gradients"]["kind"] == "module"
        assert "subscriber 'norm' (norms)" in rows["norm/weight_gradients"]["source"]
    if "accuracy" in INSTALLED:
        assert rows["train_accuracy"]["kind"] == "network"
    code, text, _ = run_cli("topics")
    assert code == 0 and "core:" in text
    assert re.search(r"^  weight_gradients\s+module\s+gradient of the loss", text, re.M)


def test_schema_is_the_message_contract() -> None:
    code, out, _ = run_cli("schema")
    assert code == 0
    schema = json.loads(out)
    assert schema == json.loads(json.dumps(message_json_schema()))
    assert schema["title"] == "Ikkuna message contract"


# ------------------------------------------------------------------------ examples


def test_example_config_is_the_quickstart_set() -> None:
    cfg = load_config(EXAMPLES / "ikkuna.toml")
    assert [{"name": e.name, **e.options} for e in cfg.subscribers] == list(QUICKSTART_SUBSCRIBERS)
    assert cfg.backends == ["tensorboard", "matplotlib"]


@needs(*ALL_PLUGINS)
def test_example_config_runs(tmp_path: Path) -> None:
    log_dir = tmp_path / "run"
    code, _, err = run_cli(
        "train",
        "--config",
        EXAMPLES / "ikkuna.toml",
        "--log-dir",
        log_dir,
        "--max-steps",
        3,
        "-b",
        64,
        "-v",
        "tb",
        "--no-report",
    )
    assert code == 0, err
    scalars, histograms = read_events(log_dir)
    for _, tag in QUICKSTART_TAGS.values():
        assert tag in scalars or tag in histograms, tag


@needs(*ALL_PLUGINS)
def test_plain_pytorch_example(tmp_path: Path) -> None:
    namespace = runpy.run_path(str(EXAMPLES / "plain_pytorch.py"), run_name="example")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        accuracy = namespace["main"](
            ["--epochs", "2", "--max-steps", "4", "--log-dir", str(tmp_path)]
        )
    assert 0.0 <= accuracy <= 1.0
    assert f"test accuracy {accuracy:.4f}" in out.getvalue()
    scalars, histograms = read_events(tmp_path)
    assert [s for s, _ in scalars["loss/loss"]] == [0, 1, 2, 3]
    assert "histogram/activations/1" in histograms  # nn.Sequential: modules named 0, 1, ...
    assert list((tmp_path / "figures").glob("*.png"))
    source = (EXAMPLES / "plain_pytorch.py").read_text()
    assert [f"ikkuna ({i}/5)" in source for i in range(1, 6)] == [True] * 5


# ---------------------------------------------------------------------- subprocesses


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "IKKUNA_PLUGINS"}
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_installed_console_script(tmp_path: Path) -> None:
    script = shutil.which("ikkuna", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the ikkuna console script is not installed next to this Python")
    log_dir = tmp_path / "run"
    proc = subprocess.run(
        [script, "train", "--max-steps", "3", "-b", "64", "-v", "tb", "--log-dir", str(log_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"tensorboard --logdir {log_dir}" in proc.stdout
    assert png_size(log_dir / "dashboard.png")[0] == 1620
    assert "Traceback" not in proc.stderr
    own = own_test_accuracy(log_dir / "model.pt")
    assert f"test {own:.4f}" in proc.stdout


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
