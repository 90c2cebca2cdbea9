"""The ``ikkuna`` command.

```
ikkuna train [options]            train a model with Ikkuna watching (see ikkuna train -h)
ikkuna plugins [--json]           installed plugins: distribution, version, what they provide
ikkuna topics [--json]            every topic a bus knows once the plugins are loaded
ikkuna schema                     JSON Schema of the message contract
ikkuna report LOG_DIR [-o PNG]    a PNG dashboard from a finished run's TensorBoard logs
```

Bad input (unknown names, a bad configuration file, a flag whose plugin is missing) prints one
``ikkuna: error: ...`` line and exits with status 2 before anything is written. Heavy
libraries are imported only by the command that needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "QUICKSTART_SUBSCRIBERS", "CLIError", "main"]

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CLIError(Exception):
    """Ends the command with a one-line message and an exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class _Flag:
    option: str  # the command-line flag
    subscriber: str  # the subscriber it adds
    plugin: str  # entry-point name of the plugin that provides it
    distribution: str  # the distribution to install

    @property
    def install_hint(self) -> str:
        return f"pip install ./plugins/{self.distribution}"


#: ``ikkuna train`` flags that add a subscriber, with the plugin each one needs.
FLAGS: tuple[_Flag, ...] = (
    _Flag("--spectral-norm", "spectral_norm", "norms", "ikkuna-norms"),
    _Flag("--ratio", "ratio", "norms", "ikkuna-norms"),
    _Flag("--histogram", "histogram", "histograms", "ikkuna-histograms"),
    _Flag("--train-accuracy", "train_accuracy", "accuracy", "ikkuna-accuracy"),
    _Flag("--test-accuracy", "test_accuracy", "accuracy", "ikkuna-accuracy"),
)

#: Subscribers of a run without ``--config``: the quickstart set (as in
#: ``examples/ikkuna.toml``), each used only when its plugin is installed.
QUICKSTART_SUBSCRIBERS: tuple[dict[str, Any], ...] = (
    {"name": "loss"},
    {"name": "train_accuracy"},
    {"name": "test_accuracy", "subsample": 10},
    {"name": "norm", "topics": ["weight_gradients"]},
    {"name": "spectral_norm", "topics": ["weights"]},
    {"name": "ratio", "topics": ["weight_updates", "weights"]},
    {"name": "histogram", "topics": ["activations"]},
    {"name": "dead_fraction"},
)

_VISUALISATION = {
    "tb": ["tensorboard"],
    "mpl": ["matplotlib"],
    "both": ["tensorboard", "matplotlib"],
}


_TRAIN_EXAMPLES = """\
examples:
  ikkuna train --log-dir runs/quickstart      # FullyConnected on digits, every installed plugin
  tensorboard --logdir runs/quickstart        # then look at it (or at its dashboard.png)
  ikkuna train --config examples/ikkuna.toml --histogram -s 10
  ikkuna train -m 3c3d -d CIFAR10 --data-dir data -e 20 -o SGD --lr 0.05 --device cuda
  ikkuna train --max-steps 20 --plugins norms --spectral-norm -V
"""

# --------------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _depth(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected -1 or a number >= 1, got {text!r}") from None
    if value == 0 or value < -1:
        raise argparse.ArgumentTypeError(f"expected -1 (leaf modules) or >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .models import MODELS
    from .trainer import DEFAULT_LR, OPTIMIZERS

    parser = argparse.ArgumentParser(
        prog="ikkuna",
        description="Watch a PyTorch model while it trains. Start with: ikkuna train",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ikkuna-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # ------------------------------------------------------------------ train
    train = sub.add_parser(
        "train",
        help="train a model with Ikkuna watching; write TensorBoard logs, figures, a dashboard",
        description=(
            "Train a model on a dataset with Ikkuna watching.\n\n"
            "Subscribers come from --config FILE (without it: the quickstart set of\n"
            "examples/ikkuna.toml, for the plugins that are installed); the subscriber\n"
            "flags add to them. Writes TensorBoard event files, figures/*.png,\n"
            "dashboard.png, model.pt and run.json into the log directory."
        ),
        epilog=_TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t = train.add_argument_group("model and data")
    t.add_argument(
        "-m",
        "--model",
        default="FullyConnected",
        help=f"model name, one of: {', '.join(MODELS)} (default: %(default)s, "
        "trains in seconds on a CPU)",
    )
    t.add_argument(
        "-d",
        "--dataset",
        default="digits",
        help=f"dataset name, one of: {', '.join(DATASETS)} (default: %(default)s, "
        "bundled with scikit-learn, works offline)",
    )
    t.add_argument(
        "--data-dir",
        default="data",
        help="where torchvision datasets are read from / downloaded to (default: %(default)s)",
    )
    t.add_argument(
        "--init",
        default="kaiming",
        help="weight initialisation: kaiming, xavier or default (default: %(default)s)",
    )
    o = train.add_argument_group("optimisation")
    o.add_argument(
        "-b",
        "--batch-size",
        type=_positive_int,
        default=128,
        help="batch size (default: %(default)s)",
    )
    o.add_argument(
        "-e",
        "--epochs",
        type=_positive_int,
        default=10,
        help="number of epochs (default: %(default)s)",
    )
    o.add_argument(
        "--max-steps",
        type=_positive_int,
        default=None,
        help="stop after this many training steps in total (a short run)",
    )
    o.add_argument(
        "-o",
        "--optimizer",
        default="Adam",
        help=f"one of: {', '.join(OPTIMIZERS)} (default: %(default)s)",
    )
    o.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="learning rate (default: "
        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
        + ")",
    )
    o.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds Python, NumPy, torch and the data order (default: %(default)s)",
    )
    o.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)",
    )
    o.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default: torch's choice; 1 is often fastest for small "
        "models and on a busy machine)",
    )
    w = train.add_argument_group("what Ikkuna watches")
    w.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="TOML run configuration with an [ikkuna] table (examples/ikkuna.toml)",
    )
    w.add_argument(
        "--plugins",
        metavar="NAME,...",
        default=None,
        help="comma-separated plugins to enable (default: every installed one)",
    )
    w.add_argument(
        "-s",
        "--subsample",
        type=_positive_int,
        default=None,
        help="run subscribers every N-th step: sets 'subsample' of every "
        "subscriber that does not set its own (default: each subscriber's own, "
        "1 for most; test_accuracy every 100 steps)",
    )
    w.add_argument(
        "--depth",
        type=_depth,
        default=None,
        help="module depth to watch: -1 leaf modules, d >= 1 modules d levels down "
        "(default: the configuration's, -1)",
    )
    for flag in FLAGS:
        w.add_argument(
            flag.option,
            action="store_true",
            help=f"add the {flag.subscriber!r} subscriber ({flag.distribution})",
        )
    out = train.add_argument_group("output")
    out.add_argument(
        "-v",
        "--visualisation",
        choices=sorted(_VISUALISATION),
        default=None,
        help="backends: tb (TensorBoard), mpl (PNG figures) or both (default: the "
        "configuration's 'backends'; both when it names none)",
    )
    out.add_argument(
        "--log-dir",
        default=None,
        help="where logs go (default: the configuration's log_dir, or "
        "runs/<model>-<dataset>-<time>)",
    )
    out.add_argument(
        "--no-report", action="store_true", help="do not write dashboard.png at the end"
    )
    out.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    out.add_argument(
        "-V", "--verbose", action="store_true", help="print the configuration and a line per epoch"
    )
    train.set_defaults(func=cmd_train)

    # ---------------------------------------------------------------- plugins
    plugins = sub.add_parser("plugins", help="list installed plugins and what they provide")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=cmd_plugins)

    # ----------------------------------------------------------------- topics
    topics = sub.add_parser("topics", help="list every topic a bus knows with the plugins loaded")
    topics.add_argument("--json", action="store_true", help="machine-readable output")
    topics.set_defaults(func=cmd_topics)

    # ----------------------------------------------------------------- schema
    schema = sub.add_parser("schema", help="print the JSON Schema of the message contract")
    schema.set_defaults(func=cmd_schema)

    # ----------------------------------------------------------------- report
    report = sub.add_parser(
        "report", help="write a PNG dashboard from a finished run's TensorBoard logs"
    )
    report.add_argument("log_dir", metavar="LOG_DIR", help="the run's log directory")
    report.add_argument(
        "-o", "--output", default=None, help="PNG to write (default: LOG_DIR/dashboard.png)"
    )
    report.set_defaults(func=cmd_report)
    return parser


# ---------------------------------------------------------------------------- train


def _installed() -> tuple[set[str], set[str]]:
    """Entry-point names and normalised distribution names of the installed plugins."""
    from . import plugins as plugin_module

    names, dists = set(), set()
    for ep in plugin_module.installed_entry_points():
        names.add(ep.name)
        if ep.dist is not None:
            dists.add(_normalise(ep.dist.metadata["Name"]))
    return names, dists


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _check_flags(args: argparse.Namespace, enabled: list[str] | None, source: str) -> list[_Flag]:
    """The subscriber flags given, after checking that their plugins are installed (and
    enabled by --plugins)."""
    chosen = [f for f in FLAGS if getattr(args, _dest(f.option))]
    if not chosen:
        return []
    names, dists = _installed()
    for flag in chosen:
        if flag.plugin not in names and _normalise(flag.distribution) not in dists:
            raise CLIError(
                f"{flag.option} needs the {flag.distribution} plugin: {flag.install_hint}"
            )
        if enabled is not None and flag.plugin not in enabled:
            raise CLIError(
                f"{flag.option} needs the {flag.plugin!r} plugin, which {source} does not "
                f"enable; add it: --plugins {','.join([*enabled, flag.plugin])}"
            )
    return chosen


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def _build_config(args: argparse.Namespace, hp: Any) -> tuple[Any, Any, list[str]]:
    """The run configuration from --config and the flags, the loaded plugin registry, and
    notes for the user. Raises CLIError for anything invalid."""
    from .config import ConfigError, IkkunaConfig, load_config
    from .plugins import ENV_VAR, PluginError, load_plugins

    notes: list[str] = []
    if args.config is not None:
        try:
            base = load_config(Path(args.config))
        except ConfigError as exc:
            raise CLIError(_one_line(str(exc))) from None
    else:
        base = IkkunaConfig()
    explicit = base.model_fields_set if args.config is not None else set()
    data = base.model_dump(exclude={"subscribers"})
    entries = [{"name": e.name, **e.options} for e in base.subscribers]

    if args.plugins is not None:
        data["plugins"] = [n.strip() for n in args.plugins.split(",") if n.strip()]
    enabled = data.get("plugins")
    source = "--plugins" if args.plugins is not None else f"'plugins' in {args.config}"
    flags = _check_flags(args, enabled, source)
    try:
        registry = load_plugins(enabled)
    except PluginError as exc:
        hint = "" if "unknown plugin" in str(exc) else "; enable only the others: --plugins A,B"
        raise CLIError(_one_line(str(exc)) + hint) from None
    for flag in flags:
        if flag.subscriber not in registry.subscribers:  # installed, but not enabled
            raise CLIError(
                f"{flag.option} needs the {flag.plugin!r} plugin, which is installed but not "
                f"enabled ({ENV_VAR}={os.environ.get(ENV_VAR, '')!r}); add it to {ENV_VAR} or "
                "unset it"
            )

    if args.config is None:
        missing = sorted(
            {e["name"] for e in QUICKSTART_SUBSCRIBERS if e["name"] not in registry.subscribers}
        )
        entries = [dict(e) for e in QUICKSTART_SUBSCRIBERS if e["name"] in registry.subscribers]
        if missing:
            notes.append(
                f"quickstart subscribers skipped (their plugins are not installed or enabled): "
                f"{', '.join(missing)}; see `ikkuna plugins`"
            )
    present = {e["name"] for e in entries}
    for flag in flags:
        if flag.subscriber not in present:
            entries.append({"name": flag.subscriber})
            present.add(flag.subscriber)
    if args.subsample is not None:
        for entry in entries:
            entry.setdefault("subsample", args.subsample)
    data["subscribers"] = entries

    if args.visualisation is not None:
        data["backends"] = _VISUALISATION[args.visualisation]
    elif "backends" not in explicit:
        data["backends"] = _VISUALISATION["both"]
    if args.depth is not None:
        data["depth"] = args.depth
    if args.log_dir is not None:
        data["log_dir"] = Path(args.log_dir)
    elif "log_dir" not in explicit:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        data["log_dir"] = Path("runs") / f"{hp.model}-{hp.dataset}-{stamp}"
    try:
        cfg = load_config(data)
    except ConfigError as exc:
        source = args.config or "the command line"
        raise CLIError(_one_line(str(exc).replace("the configuration dict", source))) from None
    return cfg, registry, notes


def _one_line(message: str) -> str:
    """A multi-line message (pydantic's, say) as one line."""
    out = ""
    for part in (p.strip() for p in message.strip().splitlines()):
        if part:
            out += ("" if not out else " " if out.endswith(":") else "; ") + part
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .data import DatasetUnavailableError
    from .trainer import EpochStats, HyperParameters, Trainer, UsageError

    try:
        hp = HyperParameters(
            model=args.model,
            dataset=args.dataset,
            batch_size=args.batch_size,
            epochs=args.epochs,
            optimizer=args.optimizer,
            lr=args.lr,
            seed=args.seed,
            device=args.device,
            init=args.init,
            max_steps=args.max_steps,
            data_dir=args.data_dir,
            threads=args.threads,
        ).resolved()
    except UsageError as exc:
        raise CLIError(_one_line(str(exc))) from None
    cfg, registry, notes = _build_config(args, hp)
    log_dir = Path(cfg.log_dir)
    for note in notes:
        print(f"ikkuna: note: {note}", file=sys.stderr)
    if args.verbose:
        _print_plan(hp, cfg)

    def on_epoch(stats: EpochStats) -> None:
        if args.verbose:
            print(
                f"epoch {stats.epoch + 1:>3}  step {stats.steps:>6}  "
                f"loss {stats.train_loss:.4f}  acc {stats.train_accuracy:.4f}  "
                f"test loss {stats.test_loss:.4f}  test acc {stats.test_accuracy:.4f}  "
                f"({stats.seconds:.1f} s)",
                flush=True,
            )

    try:
        trainer = Trainer(hp, cfg, registry=registry, progress=args.progress, on_epoch=on_epoch)
    except (ConfigError, UsageError) as exc:
        message = _one_line(str(exc))
        if args.config is not None:  # watch() saw a dict: name the file it came from
            message = message.replace("the configuration:", f"{args.config}:", 1)
        raise CLIError(message) from None
    except DatasetUnavailableError as exc:
        raise CLIError(_one_line(str(exc)), EXIT_FAILURE) from None
    result = trainer.run()

    dashboard = None
    if not args.no_report and "tensorboard" in result.backends:
        from .report import ReportError, make_report

        try:
            dashboard = make_report(log_dir, log_dir / "dashboard.png")
        except ReportError as exc:  # e.g. nothing was logged
            print(f"ikkuna: note: no dashboard: {exc}", file=sys.stderr)
    _print_summary(result, dashboard)
    return 0


def _print_plan(hp: Any, cfg: Any) -> None:
    print("hyper-parameters: " + ", ".join(f"{k}={v}" for k, v in hp.as_dict().items()))
    print(f"backends: {', '.join(cfg.backends)}   depth: {cfg.depth}   log dir: {cfg.log_dir}")
    for entry in cfg.subscribers:
        opts = ", ".join(f"{k}={v}" for k, v in entry.options.items())
        print(f"subscriber {entry.name}: {opts}")


def _print_summary(result: Any, dashboard: Path | None) -> None:
    hp = result.hparams
    log_dir = result.log_dir
    rows = [
        (
            "model",
            f"{hp.model} on {hp.dataset}: {result.steps} steps, {result.epochs} epochs, "
            f"{hp.optimizer} lr={hp.lr:g}, batch {hp.batch_size}, seed {hp.seed}, "
            f"{hp.device}",
        ),
        (
            "accuracy",
            f"train {result.train_accuracy:.4f}   test {result.test_accuracy:.4f}   "
            f"(loss train {result.train_loss:.4f}, test {result.test_loss:.4f})",
        ),
        ("subscribers", ", ".join(result.subscribers) or "(none)"),
        ("logs", str(log_dir)),
    ]
    if "tensorboard" in result.backends:
        rows.append(("TensorBoard", f"tensorboard --logdir {log_dir}"))
    if result.figures:
        rows.append(("figures", f"{len(result.figures)} PNGs in {log_dir / 'figures'}"))
    if dashboard is not None:
        rows.append(("dashboard", str(dashboard)))
    if result.model_path is not None:
        rows.append(("model", f"{result.model_path}  (torch.load -> state_dict)"))
    width = max(len(k) for k, _ in rows)
    print(f"\nIkkuna: training finished in {result.seconds:.1f} s")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


# --------------------------------------------------------------- plugins / topics / schema


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import load_plugins

    registry = load_plugins(strict=False)
    infos = list(registry.plugins.values())
    if args.json:
        print(json.dumps([i.as_dict() for i in infos], indent=2))
        return 0
    print(f"{len(infos)} plugin(s) (the core's built-in plugin included):")
    for info in infos:
        if info.error:
            status = "FAILED"
        elif info.loaded:
            status = "loaded"
        else:
            status = "not enabled"
        print(
            f"\n  {info.name}  [{status}]  {info.distribution or '?'} {info.version or '?'}"
            f"  ({info.value})"
        )
        for label, values in (
            ("subscribers", info.subscribers),
            ("backends", info.backends),
            ("topics", info.topics),
            ("hooks", info.hooks),
        ):
            if values:
                print(f"    {label + ':':<13}{', '.join(values)}")
        if info.error:
            print(f"    {'error:':<13}{info.error}")
    return 0


def _topic_table() -> list[dict[str, str]]:
    """Every topic a bus knows with the installed plugins loaded: the Exporter's, the
    plugins' extra topics, what each subscriber publishes with its default options, and the
    Trainer's own metrics."""
    from .bus import MessageBus
    from .plugins import load_plugins
    from .trainer import TRAINER_TOPICS

    registry = load_plugins(strict=False)
    bus = MessageBus()
    source = {name: "core" for name in bus.topics}
    for spec in registry.topics:
        bus.register_topic(spec.name, spec.kind, spec.doc)
        source.setdefault(spec.name, "plugin")
    for name, (cls, plugin) in sorted(registry.subscribers.items()):
        try:
            bus.register_subscriber(cls())
        except Exception:  # noqa: BLE001 - a subscriber that needs options is listed without
            continue
        for topic in bus.topics:
            source.setdefault(topic, f"subscriber {name!r} ({plugin}), default options")
    for topic, doc in TRAINER_TOPICS.items():
        bus.register_topic(topic, "network", doc)
        source.setdefault(topic, "ikkuna train")
    return [
        {"name": spec.name, "kind": spec.kind, "doc": spec.doc, "source": source[spec.name]}
        for spec in bus.topics.values()
    ]


def cmd_topics(args: argparse.Namespace) -> int:
    rows = _topic_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    last = None
    for row in rows:
        if row["source"] != last:
            print(f"\n{row['source']}:")
            last = row["source"]
        print(f"  {row['name']:<{width}}  {row['kind']:<7}  {row['doc']}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .messages import message_json_schema

    print(json.dumps(message_json_schema(), indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import ReportError, make_report

    try:
        path = make_report(args.log_dir, args.output)
    except ReportError as exc:
        raise CLIError(str(exc)) from None
    size = _png_size(path)
    print(f"dashboard written to {path}" + (f" ({size[0]} x {size[1]} px)" if size else ""))
    return 0


def _png_size(path: Path) -> tuple[int, int] | None:
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ikkuna`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse reported
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    if getattr(args, "func", None) is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except CLIError as exc:
        print(f"ikkuna: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("ikkuna: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stays open until exit
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
