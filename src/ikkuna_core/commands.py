"""What a plugin adds to the ``ikkuna`` command line: sub-commands and subscriber flags.

The ``ikkuna`` console script belongs to the core, which provides only ``plugins``,
``topics`` and ``schema``; every other command (a training front end, say) and every
flag that switches on a subscriber comes from an installed plugin, through the
``ikkuna_commands`` and ``ikkuna_subscriber_flags`` hooks (see :mod:`ikkuna_core.hookspecs`).

```python
from ikkuna_core.commands import CLIError, Command

def _configure(parser: argparse.ArgumentParser, registry: PluginRegistry) -> None:
    parser.add_argument("name")

def _run(args: argparse.Namespace) -> int:
    if not args.name:
        raise CLIError("give a name")          # printed as `ikkuna: error: give a name`, exit 2
    print(f"hello {args.name}")
    return 0

@ik.hookimpl
def ikkuna_commands() -> list[Command]:
    return [Command("hello", "say hello", _configure, _run)]
```
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CORE_COMMANDS",
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "CLIError",
    "Command",
    "SubscriberFlag",
]

#: The core's own sub-commands; plugins cannot take these names.
CORE_COMMANDS: tuple[str, ...] = ("plugins", "topics", "schema")

#: Exit status of bad input (unknown names, invalid options): nothing was done.
EXIT_USAGE = 2
#: Exit status of a command that started and failed (a dataset that cannot be loaded).
EXIT_FAILURE = 1


class CLIError(Exception):
    """Ends a command with the one line ``ikkuna: error: <message>`` and an exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Command:
    """A sub-command of ``ikkuna``. ``configure(parser, registry)`` adds its arguments to
    the sub-command's parser (``registry`` holds every installed plugin, e.g. for their
    :class:`SubscriberFlag` s); ``run(args)`` does the work and returns the exit status
    (raise :class:`CLIError` for bad input)."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser, Any], None]  # (parser, PluginRegistry)
    run: Callable[[argparse.Namespace], int]
    description: str | None = None
    epilog: str | None = None


@dataclass(frozen=True)
class SubscriberFlag:
    """A command-line switch (``option``, e.g. ``"--my-metric"``) that adds the plugin's
    subscriber ``subscriber`` to a run, created with ``options``. Commands that start a run
    add every installed plugin's flags to their parser."""

    option: str
    subscriber: str
    help: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        """The attribute of the parsed arguments that holds the switch."""
        return self.option.lstrip("-").replace("-", "_")
