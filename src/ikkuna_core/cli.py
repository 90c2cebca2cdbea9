"""The ``ikkuna`` command.

```
ikkuna plugins [--json]           installed plugins: distribution, version, what they provide
ikkuna topics [--json]            every topic a bus knows once the plugins are loaded
ikkuna schema                     JSON Schema of the message contract
ikkuna COMMAND ...                a command an installed plugin adds (ikkuna --help lists them)
```

Every other command comes from an installed plugin through the ``ikkuna_commands`` hook
(:mod:`ikkuna_core.commands`). The command line sees every installed plugin, whatever
``IKKUNA_PLUGINS`` says (that variable narrows which plugins a *run* enables); a plugin that
fails to load is reported as a warning and the command goes on. Bad input prints one
``ikkuna: error: ...`` line and exits with status 2. Heavy libraries are imported only by the
command that needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .commands import EXIT_FAILURE, EXIT_USAGE, CLIError

if TYPE_CHECKING:
    from .plugins import PluginRegistry

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "CLIError", "build_parser", "main"]


# ---------------------------------------------------------------------------- parser


def build_parser(registry: PluginRegistry | None = None) -> argparse.ArgumentParser:
    """The ``ikkuna`` parser: the core's commands and those of the plugins in ``registry``
    (default: every installed plugin that loads)."""
    from . import __version__

    if registry is None:
        registry = command_registry()
    parser = argparse.ArgumentParser(
        prog="ikkuna",
        description="Watch a PyTorch model while it trains. `ikkuna plugins` shows what is "
        "installed; installed plugins add commands.",
    )
    parser.add_argument("--version", action="version", version=f"ikkuna-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for name, (command, plugin) in registry.commands.items():
        cmd = sub.add_parser(
            name,
            help=f"{command.help} [{plugin}]",
            description=command.description or command.help,
            epilog=command.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.configure(cmd, registry)
        cmd.set_defaults(func=command.run)

    plugins = sub.add_parser("plugins", help="list installed plugins and what they provide")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=cmd_plugins)

    topics = sub.add_parser("topics", help="list every topic a bus knows with the plugins loaded")
    topics.add_argument("--json", action="store_true", help="machine-readable output")
    topics.set_defaults(func=cmd_topics)

    schema = sub.add_parser("schema", help="print the JSON Schema of the message contract")
    schema.set_defaults(func=cmd_schema)
    return parser


def command_registry() -> PluginRegistry:
    """Every installed plugin that loads, whatever ``IKKUNA_PLUGINS`` says: the command line
    offers all their commands and flags. One that fails is skipped with a warning."""
    from .plugins import load_plugins

    return load_plugins(environment=False)


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
            ("commands", info.commands),
            ("flags", info.flags),
            ("hooks", info.hooks),
        ):
            if values:
                print(f"    {label + ':':<13}{', '.join(values)}")
        if info.error:
            print(f"    {'error:':<13}{info.error}")
    return 0


def _topic_table() -> list[dict[str, str]]:
    """Every topic a bus knows with the installed plugins loaded: the Exporter's, the
    plugins' own topics, and what each subscriber publishes with its default options in a
    run that provides everything a :class:`~ikkuna_core.RunContext` can hold."""
    from ._bus import MessageBus
    from .context import RunContext
    from .plugins import load_plugins

    registry = load_plugins(strict=False)
    bus = MessageBus()
    source = {name: "core" for name in bus.topics}
    owner = {t: name for name, info in registry.plugins.items() for t in info.topics}
    for spec in registry.topics:
        bus.register_topic(spec.name, spec.kind, spec.doc)
        source.setdefault(spec.name, f"plugin {owner.get(spec.name, '?')!r}")
    everything = RunContext.complete()
    for name, (cls, plugin) in sorted(registry.subscribers.items()):
        try:
            bus.subscribe(cls(**registry.subscriber_options(name, {}, everything)))
        except Exception:  # noqa: BLE001 - a subscriber that needs options is listed without
            continue
        for topic in bus.topics:
            source.setdefault(topic, f"subscriber {name!r} ({plugin}), default options")
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
            print(("\n" if last is not None else "") + f"{row['source']}:")
            last = row["source"]
        print(f"  {row['name']:<{width}}  {row['kind']:<7}  {row['doc']}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from .messages import message_json_schema

    print(json.dumps(message_json_schema(), indent=2))
    return 0


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ikkuna`` command; returns the exit status."""
    from .plugins import PluginWarning

    shown: set[str] = set()
    default_show = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], *args: Any, **kw: Any) -> None:
        if not issubclass(category, PluginWarning):
            default_show(message, category, *args, **kw)
            return
        text = str(message)
        if text not in shown:  # the command line and a run may load the same plugins
            shown.add(text)
            print(f"ikkuna: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", PluginWarning)
        warnings.showwarning = show
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            where = f"ikkuna {args.command}" if getattr(args, "command", None) else "ikkuna"
            parser.error(
                f"unrecognized arguments: {' '.join(unknown)} (`{where} --help` lists the "
                "options, those of the installed plugins included)"
            )
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
