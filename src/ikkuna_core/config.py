"""The run configuration: which plugins, subscribers and backends a run uses, validated by
pydantic and read from the ``[ikkuna]`` table of a TOML file.

```toml
[ikkuna]
plugins = ["myplugin"]                  # entry-point names; omit to load every installed plugin
backends = ["tensorboard"]
log_dir = "runs/exp1"

[[ikkuna.subscribers]]
name = "max_abs"                        # a subscriber's `name`
topics = ["weight_gradients"]
subsample = 10
```
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "ConfigError",
    "IkkunaConfig",
    "SubscriberConfig",
    "describe_validation_error",
    "load_config",
]


class ConfigError(ValueError):
    """A run configuration is invalid; the message names the file, the key and what was
    expected."""


class SubscriberConfig(BaseModel):
    """One ``[[ikkuna.subscribers]]`` entry: ``name`` plus that subscriber's own options,
    which its ``Options`` model validates when the subscriber is created."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(min_length=1)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class IkkunaConfig(BaseModel):
    """The ``[ikkuna]`` table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plugins: list[str] | None = Field(
        default=None, description="entry-point names to enable; None enables every installed one"
    )
    backends: list[str] = Field(default_factory=lambda: ["tensorboard"])
    backend_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="keyword options per backend, e.g. {matplotlib = {plot_every = 100}}",
    )
    log_dir: Path = Path("runs/ikkuna")
    depth: int = Field(default=-1, ge=-1, description="-1: leaf modules; d >= 1: d levels down")
    include: list[str] | None = Field(
        default=None, description="torch.nn class names to watch, e.g. ['Conv2d', 'Linear']"
    )
    subscribers: list[SubscriberConfig] = Field(default_factory=list)
    flush_every: int = Field(default=1, ge=1, description="steps between backend writes")
    on_error: Literal["raise", "warn"] = Field(
        default="warn", description="a failing subscriber stops training, or is disabled"
    )
    publish_in_eval: bool = False
    background: bool = Field(
        default=False, description="compute metrics on a background thread (see benchmarks)"
    )


def describe_validation_error(
    exc: ValidationError, model: type[BaseModel], prefix: str = ""
) -> list[str]:
    """One line per error of a pydantic validation of ``model``: ``<prefix><key>: <what is
    wrong>``. An unknown key lists the valid ones; the offending value is shown once."""
    lines = []
    for err in exc.errors():
        loc = prefix + ".".join(str(p) for p in err["loc"])
        got = err.get("input")
        if err["type"] == "extra_forbidden":
            valid = ", ".join(sorted(model.model_fields)) if len(err["loc"]) == 1 else ""
            lines.append(f"{loc}: unknown key" + (f"; valid keys: {valid}" if valid else ""))
            continue
        msg = str(err["msg"]).removeprefix("Value error, ")
        shown = isinstance(got, dict) or repr(got) in msg
        lines.append(f"{loc}: {msg}" + ("" if shown else f" (got {got!r})"))
    return lines


def _format(exc: ValidationError, source: str) -> str:
    lines = [f"invalid Ikkuna configuration in {source}:"]
    for line in describe_validation_error(exc, IkkunaConfig, "ikkuna."):
        lines.append(f"  {line}")
    return "\n".join(lines)


def load_config(
    source: str | Path | Mapping[str, Any] | IkkunaConfig | None = None,
) -> IkkunaConfig:
    """Read and validate a configuration from a TOML path, a dict with the keys of the
    ``[ikkuna]`` table, or an :class:`IkkunaConfig` (returned as is)."""
    if source is None:
        return IkkunaConfig()
    if isinstance(source, IkkunaConfig):
        return source
    if isinstance(source, Mapping):
        data, where = dict(source), "the configuration dict"
    else:
        path = Path(source)
        where = str(path)
        try:
            with path.open("rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        if "ikkuna" not in doc or not isinstance(doc["ikkuna"], dict):
            raise ConfigError(f"{path} has no [ikkuna] table; tables found: {sorted(doc)}")
        data = doc["ikkuna"]
    try:
        return IkkunaConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc, where)) from None
