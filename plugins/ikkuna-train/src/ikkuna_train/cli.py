"""The ``ikkuna train`` and ``ikkuna report`` commands (added to the core's ``ikkuna``
console script through the ``ikkuna_commands`` hook).

```
ikkuna train [options]            train a model with Ikkuna watching (see ikkuna train -h)
ikkuna report LOG_DIR [-o FILE]   a dashboard (PNG, JPEG, PDF, SVG) from a run's TensorBoard logs
```

The flags that add subscribers (``--spectral-norm`` and the like) come from the installed
plugins (``ikkuna_subscriber_flags``), and so do the subscribers of a run without
``--config`` (``ikkuna_default_subscribers``). Bad input (unknown names, a bad configuration
file, a flag whose plugin is not enabled, a log directory that cannot be used) prints one
``ikkuna: error: ...`` line and exits with status 2 before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ikkuna_core.commands import EXIT_FAILURE, CLIError, Command, SubscriberFlag
from ikkuna_core.plugins import PluginRegistry, PluginWarning, UnknownPluginError

__all__ = ["REPORT", "TRAIN"]

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
  ikkuna train -m 3c3d -d CIFAR10 --download -e 20 -o SGD --lr 0.05 --device cuda
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


class TrainSetup:
    """What ``ikkuna train``'s parser was built with: the installed plugins' registry and
    the subscriber flags that were added (a flag that clashed is not among them). Stored as
    the parser's ``train_setup`` default, so that each parser's arguments carry their own."""

    def __init__(self, registry: PluginRegistry, flags: list[tuple[SubscriberFlag, str]]):
        self.registry = registry
        self.flags = flags


def configure_train(parser: argparse.ArgumentParser, registry: PluginRegistry) -> None:
    """The options of ``ikkuna train``, with the subscriber flags of every installed plugin."""
    _model_and_data_options(parser)
    _optimisation_options(parser)
    _watch_options(parser)
    flags = _add_subscriber_flags(parser, registry)
    _output_options(parser, registry)
    parser.set_defaults(train_setup=TrainSetup(registry, flags))


def _model_and_data_options(parser: argparse.ArgumentParser) -> None:
    from .data import DATASETS
    from .models import ALIASES, MODELS

    t = parser.add_argument_group("model and data")
    t.add_argument(
        "-m",
        "--model",
        default="FullyConnected",
        help=f"model name, one of: {', '.join(MODELS)}; the thesis's "
        f"{', '.join(f'{a} (= {k})' for a, k in ALIASES.items())} work too (default: "
        "%(default)s, trains in seconds on a CPU)",
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
        help="where torchvision datasets are read from (default: %(default)s)",
    )
    t.add_argument(
        "--download",
        action="store_true",
        help="download a torchvision dataset into --data-dir when its files are missing "
        "(default: never touch the network)",
    )
    t.add_argument(
        "--init",
        default="kaiming",
        help="weight initialisation: kaiming (He normal), xavier (Glorot uniform) or default "
        "(PyTorch's own); biases start at 0 (default: %(default)s)",
    )


def _optimisation_options(parser: argparse.ArgumentParser) -> None:
    from .trainer import DEFAULT_EPOCHS, DEFAULT_LR, OPTIMIZERS, default_threads

    o = parser.add_argument_group("optimisation")
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
        default=None,
        help=f"number of epochs (default: {DEFAULT_EPOCHS}, or as many as --max-steps needs)",
    )
    o.add_argument(
        "--max-steps",
        type=_positive_int,
        default=None,
        help="train this many steps (the last epoch partly); with -e, stop at whichever "
        "limit comes first",
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
        help="torch CPU threads (default: half the CPUs, here "
        f"{default_threads()}; more threads rarely help small models and slow a busy machine)",
    )


def _watch_options(parser: argparse.ArgumentParser) -> None:
    w = parser.add_argument_group("what Ikkuna watches")
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
        "subscriber that does not set its own (default: each subscriber's own)",
    )
    w.add_argument(
        "--depth",
        type=_depth,
        default=None,
        help="module depth to watch: -1 leaf modules, d >= 1 modules d levels down "
        "(default: the configuration's, -1)",
    )
    w.add_argument(
        "--budget",
        type=_positive_float,
        default=None,
        metavar="FRACTION",
        help="the fraction of the plain step time watching may take on average, e.g. 0.02: "
        "Ikkuna then chooses each subscriber's cadence from its measured cost (sets "
        "'budget' of the configuration)",
    )
    w.add_argument(
        "--plan",
        action="store_true",
        help="instead of training: measure a few steps on a real batch with every subscriber "
        "running (nothing is written) and print each subscriber's cost, aten ops and the "
        "cadence the budget (default 0.02) would give",
    )


def _output_options(parser: argparse.ArgumentParser, registry: PluginRegistry) -> None:
    out = parser.add_argument_group("output")
    installed = sorted(set(registry.backends) - {"tensorboard", "matplotlib"})
    out.add_argument(
        "-v",
        "--visualisation",
        metavar="BACKENDS",
        type=lambda text: _backends(text, registry),
        default=None,
        help="comma-separated backends: tb (TensorBoard), mpl (PNG figures), both, or any "
        "installed backend's name"
        + (f" ({', '.join(installed)})" if installed else "")
        + ", e.g. -v tb,mlflow (default: the configuration's 'backends'; both when it "
        "names none)",
    )
    out.add_argument(
        "--log-dir",
        default=None,
        help="where logs go (default: the configuration's log_dir, or "
        "runs/<model>-<dataset>-<time>); one that holds a run is refused",
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --log-dir (its event files, figures, dashboard, "
        "model.pt, run.json) instead of refusing",
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
        "-V",
        "--verbose",
        action="store_true",
        help="print the plan and a line per epoch (a line per epoch is printed anyway when "
        "stdout is not a terminal)",
    )


def _add_subscriber_flags(
    parser: argparse.ArgumentParser, registry: PluginRegistry
) -> list[tuple[SubscriberFlag, str]]:
    """One switch per installed plugin's SubscriberFlag; a flag that clashes with one of
    ``ikkuna train``'s own options is skipped with a warning."""
    group = parser.add_argument_group(
        "subscriber flags",
        "add one subscriber each; they come from the installed plugins (`ikkuna plugins`)",
    )
    added = []
    for flag, plugin in registry.flags:
        detail = flag.help or f"add the {flag.subscriber!r} subscriber"
        try:
            group.add_argument(
                flag.option, dest=flag.dest, action="store_true", help=f"{detail} [{plugin}]"
            )
        except argparse.ArgumentError as exc:
            warnings.warn(
                f"plugin {plugin!r}: flag {flag.option} clashes with ikkuna train's own "
                f"options ({exc}); skipped",
                PluginWarning,
                stacklevel=2,
            )
            continue
        added.append((flag, plugin))
    return added


def configure_report(parser: argparse.ArgumentParser, registry: PluginRegistry) -> None:
    from .report import FORMATS

    parser.add_argument("log_dir", metavar="LOG_DIR", help="the run's log directory")
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        help=f"file to write, as {', '.join(FORMATS)} after its suffix "
        "(default: LOG_DIR/dashboard.png)",
    )


# ---------------------------------------------------------------------------- train


def _build_config(args: argparse.Namespace, hp: Any) -> tuple[Any, Any, list[str]]:
    """The run configuration from --config and the flags, the loaded plugin registry, and
    notes for the user. Raises CLIError for anything invalid."""
    from ikkuna_core.config import ConfigError, IkkunaConfig, load_config

    if args.config is not None:
        try:
            base = load_config(Path(args.config))
        except ConfigError as exc:
            raise CLIError(_one_line(str(exc))) from None
    else:
        base = IkkunaConfig()
    explicit = base.model_fields_set if args.config is not None else set()
    data = base.model_dump(exclude={"subscribers"})
    if args.plugins is not None:
        data["plugins"] = [n.strip() for n in args.plugins.split(",") if n.strip()]
    enabled = data.get("plugins")
    setup: TrainSetup = args.train_setup
    chosen = [(f, p) for f, p in setup.flags if getattr(args, f.dest)]
    registry = _registry_for(args, enabled, chosen)
    notes: list[str] = []
    if args.config is None:
        entries = [dict(entry) for entry, _ in registry.default_subscribers]
        notes += _left_out(setup.registry, registry, enabled)
    else:
        entries = [{"name": e.name, **e.options} for e in base.subscribers]
    data["subscribers"] = _with_flags(entries, chosen, args.subsample)
    _outputs(data, args, explicit, hp)
    try:
        cfg = load_config(data)
    except ConfigError as exc:
        where = args.config or "the command line"
        raise CLIError(_one_line(str(exc).replace("the configuration dict", where))) from None
    return cfg, registry, notes


def _registry_for(
    args: argparse.Namespace, enabled: list[str] | None, chosen: list[tuple[SubscriberFlag, str]]
) -> PluginRegistry:
    """The plugins of the run, loaded; every chosen flag's plugin must be among them."""
    from ikkuna_core.plugins import ENV_VAR, PluginError, load_plugins

    if enabled is not None:
        source = "--plugins" if args.plugins is not None else f"'plugins' in {args.config}"
        for flag, plugin in chosen:
            if plugin not in enabled:
                raise CLIError(
                    f"{flag.option} needs the {plugin!r} plugin, which {source} does not "
                    f"enable; add it: --plugins {','.join([*enabled, plugin])}"
                )
    try:
        registry = load_plugins(enabled)
    except PluginError as exc:
        unknown = isinstance(exc, UnknownPluginError)
        hint = "" if unknown else "; enable only the others: --plugins A,B"
        raise CLIError(_one_line(str(exc)) + hint) from None
    for flag, plugin in chosen:
        if flag.subscriber not in registry.subscribers:  # installed, but not enabled
            raise CLIError(
                f"{flag.option} needs the {plugin!r} plugin, which is installed but not "
                f"enabled ({ENV_VAR}={os.environ.get(ENV_VAR, '')!r}); add it to {ENV_VAR} or "
                "unset it"
            )
    return registry


def _left_out(
    installed: PluginRegistry, registry: PluginRegistry, enabled: list[str] | None
) -> list[str]:
    """A note when IKKUNA_PLUGINS (not the user here) left default subscribers out."""
    from ikkuna_core.plugins import ENV_VAR

    loaded = {name for name, info in registry.plugins.items() if info.loaded}
    skipped = sorted({p for _, p in installed.default_subscribers if p not in loaded})
    if not skipped or enabled is not None:
        return []
    return [
        f"the default subscribers of plugin(s) {', '.join(skipped)} are left out: "
        f"installed but not enabled by {ENV_VAR}; see `ikkuna plugins`"
    ]


def _with_flags(
    entries: list[dict[str, Any]], chosen: list[tuple[SubscriberFlag, str]],
    subsample: int | None,
) -> list[dict[str, Any]]:
    """``entries`` plus one per chosen flag whose subscriber is not there yet; ``-s`` as
    the subsample of every entry that sets none."""
    present = {e["name"] for e in entries}
    for flag, _ in chosen:
        if flag.subscriber not in present:
            entries.append({"name": flag.subscriber, **flag.options})
            present.add(flag.subscriber)
    if subsample is not None:
        for entry in entries:
            entry.setdefault("subsample", subsample)
    return entries


def _outputs(data: dict[str, Any], args: argparse.Namespace, explicit: set[str], hp: Any) -> None:
    """Backends, depth and log directory from the flags (or the defaults) into ``data``."""
    if args.visualisation is not None:
        data["backends"] = args.visualisation  # checked by the parser: _backends
    elif "backends" not in explicit:
        data["backends"] = _VISUALISATION["both"]
    if args.depth is not None:
        data["depth"] = args.depth
    if args.budget is not None:
        data["budget"] = args.budget
    if args.log_dir is not None:
        data["log_dir"] = Path(args.log_dir)
    elif "log_dir" not in explicit:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        data["log_dir"] = Path("runs") / f"{hp.model}-{hp.dataset}-{stamp}"


def _backends(text: str, registry: PluginRegistry) -> list[str]:
    """The backends ``-v`` names: aliases (tb, mpl, both) and the installed plugins' backend
    names, comma-separated, each once, in order."""
    names: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        for name in _VISUALISATION.get(part, [part]):
            if name not in registry.backends:
                known = sorted(_VISUALISATION) + sorted(registry.backends)
                raise argparse.ArgumentTypeError(
                    f"invalid choice: {part!r} (choose from {', '.join(known)}, or several "
                    "joined by commas: -v tb,mlflow)"
                )
            if name not in names:
                names.append(name)
    if not names:
        raise argparse.ArgumentTypeError("name at least one backend, e.g. -v tb")
    return names


def _one_line(message: str) -> str:
    """A multi-line message (pydantic's, say) as one line."""
    out = ""
    for part in (p.strip() for p in message.strip().splitlines()):
        if part:
            out += ("" if not out else " " if out.endswith(":") else "; ") + part
    return out


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def run_train(args: argparse.Namespace) -> int:
    from ikkuna_core.config import ConfigError

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
            download=args.download,
            threads=args.threads,
        ).resolved()
    except UsageError as exc:
        raise CLIError(_one_line(str(exc))) from None
    cfg, registry, notes = _build_config(args, hp)
    if args.plan:
        return _run_plan(hp, cfg, registry, notes)
    log_dir = Path(cfg.log_dir)
    for note in notes:
        print(f"ikkuna: note: {note}", file=sys.stderr)
    lines = args.verbose or not sys.stdout.isatty()  # a log file still shows progress

    def on_epoch(stats: EpochStats) -> None:
        if lines:
            print(
                f"epoch {stats.epoch + 1:>3}/{epochs}  step {stats.steps:>6}/{total}  "
                f"loss {stats.train_loss:.4f}  acc {stats.train_accuracy:.4f}  "
                f"test loss {stats.test_loss:.4f}  test acc {stats.test_accuracy:.4f}  "
                f"({stats.seconds:.1f} s)",
                flush=True,
            )

    try:
        trainer = Trainer(
            hp,
            cfg,
            registry=registry,
            progress=args.progress,
            on_epoch=on_epoch,
            overwrite=args.overwrite,
        )
    except (ConfigError, UsageError) as exc:
        message = _one_line(str(exc))
        if args.config is not None:  # watch() saw a dict: name the file it came from
            message = message.replace("the configuration:", f"{args.config}:", 1)
        raise CLIError(message) from None
    except DatasetUnavailableError as exc:
        raise CLIError(_one_line(str(exc)), EXIT_FAILURE) from None
    epochs, total = trainer.hparams.epochs, trainer.total_steps
    if hp.max_steps is not None and total < hp.max_steps:
        print(
            f"ikkuna: note: --max-steps {hp.max_steps} is not reached: "
            f"{_plural(trainer.hparams.epochs or 0, 'epoch')} of "
            f"{_plural(trainer.steps_per_epoch, 'step')} end the run after {total}; "
            "leave out -e to train every step",
            file=sys.stderr,
        )
    if args.verbose:
        _print_plan(trainer.hparams, cfg, total)
    elif lines:
        print(
            f"training {hp.model} on {hp.dataset}: {_plural(total, 'step')} in "
            f"{_plural(epochs or 0, 'epoch')}, logs in {log_dir}",
            flush=True,
        )
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


def _run_plan(hp: Any, cfg: Any, registry: PluginRegistry, notes: list[str]) -> int:
    """``ikkuna train --plan``: the run as configured, on its first training batch, with
    no backend and a throw-away log directory; prints the plan's table."""
    import tempfile

    from ikkuna_core.config import ConfigError
    from ikkuna_core.cost import measure_plan

    from .data import DatasetUnavailableError
    from .trainer import Trainer, UsageError

    for note in notes:
        print(f"ikkuna: note: {note}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="ikkuna-plan-") as tmp:
        dry = cfg.model_copy(update={"backends": [], "log_dir": Path(tmp)})
        try:
            trainer = Trainer(hp, dry, registry=registry, progress=False, save_model=False)
        except (ConfigError, UsageError) as exc:
            raise CLIError(_one_line(str(exc))) from None
        except DatasetUnavailableError as exc:
            raise CLIError(_one_line(str(exc)), EXIT_FAILURE) from None
        x, y = next(iter(trainer.train_loader))
        try:
            plan = measure_plan(trainer.exporter, lambda: trainer.train_batch(x, y))
        finally:
            trainer.exporter.close()
    print(f"plan for {hp.model} on {hp.dataset}, batch {hp.batch_size} (one real batch; "
          "costs as measured on this machine, now)")
    print(plan.table())
    return 0


def _print_plan(hp: Any, cfg: Any, total: int) -> None:
    print("hyper-parameters: " + ", ".join(f"{k}={v}" for k, v in hp.as_dict().items()))
    print(f"steps: {total}   backends: {', '.join(cfg.backends)}   depth: {cfg.depth}   "
          f"log dir: {cfg.log_dir}")
    for entry in cfg.subscribers:
        opts = ", ".join(f"{k}={v}" for k, v in entry.options.items())
        print(f"subscriber {entry.name}: {opts}")


def _print_summary(result: Any, dashboard: Path | None) -> None:
    hp = result.hparams
    log_dir = result.log_dir
    rows = [
        (
            "model",
            f"{hp.model} on {hp.dataset}: {_plural(result.steps, 'step')}, "
            f"{_plural(result.epochs, 'epoch')}, {hp.optimizer} lr={hp.lr:g}, "
            f"batch {hp.batch_size}, seed {hp.seed}, {hp.device}",
        ),
        (
            "accuracy",
            f"train {result.train_accuracy:.4f}   test {result.test_accuracy:.4f}   "
            f"(loss train {result.train_loss:.4f}, test {result.test_loss:.4f})",
        ),
        ("subscribers", ", ".join(result.subscribers) or "(none)"),
        *(("cost" if i == 0 else "", line) for i, line in enumerate(result.costs)),
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


# --------------------------------------------------------------------------- report


def run_report(args: argparse.Namespace) -> int:
    from .report import ReportError, make_report

    try:
        path = make_report(args.log_dir, args.output)  # checks the output before reading
    except ReportError as exc:
        raise CLIError(str(exc)) from None
    size = _image_size(path)
    print(f"dashboard written to {path}" + (f" ({size[0]} x {size[1]} px)" if size else ""))
    return 0


def _image_size(path: Path) -> tuple[int, int] | None:
    """Width and height of a PNG or JPEG; None for vector formats."""
    if path.suffix.lower() not in {".png", ".jpg", ".jpeg"}:
        return None
    from PIL import Image

    with Image.open(path) as image:
        return image.size


TRAIN = Command(
    name="train",
    help="train a model with Ikkuna watching; write TensorBoard logs, figures, a dashboard",
    configure=configure_train,
    run=run_train,
    description=(
        "Train a model on a dataset with Ikkuna watching.\n\n"
        "Subscribers come from --config FILE (without it: every enabled plugin's default\n"
        "subscribers, the quickstart set of examples/ikkuna.toml); the subscriber flags add\n"
        "to them. Writes TensorBoard event files, figures/*.png, dashboard.png, model.pt and\n"
        "run.json into the log directory, which must not hold another run."
    ),
    epilog=_TRAIN_EXAMPLES,
)

REPORT = Command(
    name="report",
    help="write a dashboard image from a finished run's TensorBoard logs",
    configure=configure_report,
    run=run_report,
)
