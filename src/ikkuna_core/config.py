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

``budget = 0.02`` makes Ikkuna choose the subscribers' cadences so that watching takes 2 % of
the plain step time on average (:mod:`ikkuna_core.cost`). ``compile_metrics = true`` computes
the step's histograms as one ``torch.compile``-d graph (:func:`ikkuna_core.ops.compiled`).

Every error is a :class:`ConfigError` whose message names the key path
(``ikkuna.subscribers[0].topics``) and what would be right. Integers and booleans are
strict (``depth = "3"`` is an error, not 3): a configuration means what it says.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["ConfigError", "IkkunaConfig", "SubscriberConfig", "load_config"]


class ConfigError(ValueError):
    """A run configuration is invalid; the message names the file, the key and what was
    expected."""


class SubscriberConfig(BaseModel):
    """One ``[[ikkuna.subscribers]]`` entry: ``name``, optionally ``topics``, plus that
    subscriber's own options, which its ``Options`` model validates when it is created."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(min_length=1)
    topics: list[str] | None = Field(
        default=None, description="topics to subscribe to; omitted: the subscriber's defaults"
    )

    @field_validator("topics")
    @classmethod
    def _not_empty(cls, topics: list[str] | None) -> list[str] | None:
        if topics is not None and not topics:
            raise ValueError(
                "an empty list subscribes to nothing; list topics such as "
                "['weight_gradients'], or omit the key for the subscriber's default topics"
            )
        return topics

    @property
    def options(self) -> dict[str, Any]:
        """The keyword options the subscriber is created with (``topics`` included when
        given)."""
        given = {} if self.topics is None else {"topics": list(self.topics)}
        return {**given, **(self.model_extra or {})}


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
    depth: int = Field(
        default=-1, strict=True, description="-1: leaf modules; d >= 1: d levels down"
    )
    include: list[str] | None = Field(
        default=None, description="torch.nn class names to watch, e.g. ['Conv2d', 'Linear']"
    )
    subscribers: list[SubscriberConfig] = Field(default_factory=list)
    flush_every: int = Field(
        default=1, ge=1, strict=True, description="steps between backend writes"
    )
    on_error: Literal["raise", "warn"] = Field(
        default="warn", description="a failing subscriber stops training, or is disabled"
    )
    publish_in_eval: bool = Field(default=False, strict=True)
    budget: float | None = Field(
        default=None,
        gt=0,
        description="the fraction of the plain step time watching may take on average "
        "(0.02: 2 %); Ikkuna then chooses each subscriber's cadence from its measured cost",
    )
    compile_metrics: bool = Field(
        default=False,
        strict=True,
        description="compute the histograms of every step as one graph compiled by "
        "torch.compile (inductor, static shapes; the first step compiles, seconds): the same "
        "values, fewer small ops (ikkuna_core.ops.compiled); off by default",
    )
    ranks: Literal["rank0", "all"] = Field(
        default="rank0",
        description="in a distributed run (torch.distributed): 'rank0' = only rank 0 writes "
        "(the other ranks compute, attach no backend); 'all' = every rank writes to "
        "<log_dir>/rank<r>",
    )
    ddp_forward: Literal["rank", "merge"] = Field(
        default="rank",
        description="under DDP, the forward topics' statistics (activations, layer_gradients, "
        "inputs, outputs): 'rank' = each rank's own batch; 'merge' = of the global batch, "
        "merged across the ranks by the subscribers that merge (norms, moments, histograms)",
    )

    @field_validator("depth")
    @classmethod
    def _depth(cls, depth: int) -> int:
        if depth == 0 or depth < -1:
            raise ValueError(
                f"got {depth}; use -1 (leaf modules) or a level d >= 1 (modules d levels "
                "below the model)"
            )
        return depth

    @field_validator("log_dir", mode="before")
    @classmethod
    def _log_dir(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError(
                f"got {value!r}, which would write into the current directory; give a "
                "directory such as 'runs/exp1' (or '.' if you mean the current one)"
            )
        return value

    @field_validator("backends")
    @classmethod
    def _no_duplicate_backends(cls, backends: list[str]) -> list[str]:
        twice = sorted({b for b in backends if backends.count(b) > 1})
        if twice:
            raise ValueError(f"{twice} listed more than once; list each backend once")
        return backends

    @field_validator("include")
    @classmethod
    def _include_not_empty(cls, include: list[str] | None) -> list[str] | None:
        if include is not None and not include:
            raise ValueError(
                "an empty list selects no module; list torch.nn classes such as "
                "['Conv2d', 'Linear'], or omit the key to watch by depth"
            )
        return include


def key_path(loc: tuple[str | int, ...] | list[str | int]) -> str:
    """``('subscribers', 0, 'topics')`` as ``ikkuna.subscribers[0].topics``."""
    out = "ikkuna"
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _describe(err: Any, model: type[BaseModel]) -> str:
    """One pydantic error as ``<key path>: <what was wrong>; <what would be right>``."""
    loc = tuple(err["loc"])
    where = key_path(loc)
    if err["type"] == "extra_forbidden":
        valid = sorted(model.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if loc == ("ikkuna",):
            hint = " (pass the [ikkuna] table itself, not the whole document)"
        return f"{where}: Extra inputs are not permitted{hint}; valid keys: {', '.join(valid)}"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    got_s = "" if isinstance(got, dict) or err["type"] == "value_error" else f" (got {got!r})"
    return f"{where}: {msg}{got_s}"


def _format(exc: ValidationError, source: str) -> str:
    lines = [f"invalid Ikkuna configuration in {source}:"]
    lines += [f"  {_describe(err, IkkunaConfig)}" for err in exc.errors()]
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
    elif isinstance(source, (str, Path)):
        path = Path(source)
        where = str(path)
        try:
            with path.open("rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"configuration file {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"configuration file {path} is a directory, not a file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        if "ikkuna" not in doc:
            raise ConfigError(f"{path} has no [ikkuna] table; tables found: {sorted(doc)}")
        data = doc["ikkuna"]
        if not isinstance(data, dict):
            kind = "an array of tables [[ikkuna]]" if isinstance(data, list) else repr(data)
            raise ConfigError(
                f"invalid Ikkuna configuration in {path}:\n  ikkuna: expected one table "
                f"[ikkuna], got {kind}"
            )
    else:
        raise ConfigError(
            "ikkuna: the configuration must be a TOML path, a mapping with the keys of the "
            f"[ikkuna] table or an IkkunaConfig; got {type(source).__name__} {source!r:.80}"
        )
    try:
        return IkkunaConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc, where)) from None
