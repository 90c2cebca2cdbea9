"""The training front end: hyper-parameters, name look-ups, seeding and the :class:`Trainer`.

The Trainer is the thesis' training loop made reusable. It looks up the model, dataset and
optimizer by name, initialises the weights, hooks the Exporter in through
:func:`ikkuna_core.watch` (handing the subscribers its loaders through a
:class:`ikkuna_core.RunContext`), trains batch by batch, evaluates after every epoch, and
writes what a finished run leaves behind into its log directory:

- the backends' output (TensorBoard event files, ``figures/*.png``),
- ``model.pt`` (the trained ``state_dict``) and ``run.json`` (hyper-parameters, final
  metrics, the subscribers that ran).

Besides the subscribers' metrics, the Trainer reports its own, under network topics:

- ``epoch/accuracy`` and ``epoch/loss`` with keys ``train`` (mean over the epoch's training
  batches, as seen during training) and ``test`` (the whole test set, eval mode), after every
  epoch;
- ``final/accuracy`` and ``final/loss`` with keys ``train`` and ``test`` (whole sets, eval
  mode, the final model), once at the end.

A log directory that already holds a run is refused (``overwrite=True`` replaces that run),
so two runs never mix in one TensorBoard directory.

```python
from ikkuna_train import HyperParameters, Trainer

result = Trainer(HyperParameters(epochs=2), config={"subscribers": [{"name": "norm"}]}).run()
print(result.test_accuracy, result.log_dir)
```

torchvision, scikit-learn and tqdm are imported only when a Trainer is built or run.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ikkuna_core import (
    IkkunaConfig,
    PluginError,
    PluginRegistry,
    RunContext,
    load_config,
    load_plugins,
)
from ikkuna_core.plugins import UnknownPluginError

from ._files import probe_writable_dir

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "OPTIMIZERS",
    "RUN_FILES",
    "TRAINER_TOPICS",
    "EpochStats",
    "HyperParameters",
    "LogDirError",
    "TrainResult",
    "Trainer",
    "UsageError",
    "backend_files",
    "check_log_dir",
    "default_device",
    "default_threads",
    "evaluate",
    "previous_run",
    "make_optimizer",
    "resolve_dataset",
    "resolve_device",
    "resolve_model",
    "resolve_optimizer",
    "seed_everything",
]

#: Optimizers by their ``torch.optim`` class name.
OPTIMIZERS: tuple[str, ...] = ("SGD", "Adam", "AdamW", "RMSprop")
#: Learning rate used when none is given.
DEFAULT_LR: dict[str, float] = {"SGD": 0.05, "Adam": 1e-3, "AdamW": 1e-3, "RMSprop": 1e-3}
#: Epochs of a run that gives neither ``epochs`` nor ``max_steps``.
DEFAULT_EPOCHS = 10
#: What a run leaves in its log directory; any of them there means the directory holds a run.
RUN_FILES: tuple[str, ...] = (
    "events.out.tfevents.*",
    "run.json",
    "model.pt",
    "dashboard.png",
    "figures/*.png",
)
#: The Trainer's own metric topics (all network topics, keys ``train`` and ``test``).
TRAINER_TOPICS: dict[str, str] = {
    "epoch/accuracy": "Trainer: accuracy after each epoch (train: running mean; test: test set)",
    "epoch/loss": "Trainer: loss after each epoch (train: running mean; test: test set)",
    "final/accuracy": "Trainer: accuracy of the final model on the whole train and test sets",
    "final/loss": "Trainer: loss of the final model on the whole train and test sets",
}


class UsageError(ValueError):
    """A hyper-parameter is invalid; the message names it and what would be valid."""


class LogDirError(UsageError):
    """The log directory cannot take this run: it is a file, cannot be written, or already
    holds a run."""


# --------------------------------------------------------------------------- look-ups


def _pick(kind: str, name: str, choices: Iterable[str]) -> str:
    """The choice matching ``name`` case-insensitively, or a UsageError listing them."""
    options = list(choices)
    for option in options:
        if option.lower() == str(name).lower():
            return option
    close = difflib.get_close_matches(str(name).lower(), [o.lower() for o in options], n=1)
    hint = ""
    if close:
        hint = f" (did you mean {next(o for o in options if o.lower() == close[0])!r}?)"
    raise UsageError(f"unknown {kind} {name!r}{hint}; choose one of: {', '.join(options)}")


def resolve_model(name: str) -> str:
    """Canonical spelling of a model name from :data:`ikkuna_train.models.MODELS` (the
    thesis's names in :data:`~ikkuna_train.models.ALIASES` are accepted too)."""
    from .models import ALIASES, MODELS, canonical_model_name

    key = canonical_model_name(name)
    if key is not None:
        return key
    try:
        return _pick("model", name, MODELS)
    except UsageError as exc:
        also = ", ".join(f"{alias} (= {key})" for alias, key in ALIASES.items())
        raise UsageError(f"{exc}; also accepted: {also}") from None


def resolve_dataset(name: str) -> str:
    """Canonical spelling of a dataset name from :data:`ikkuna_train.data.DATASETS`."""
    from .data import DATASETS

    return _pick("dataset", name, DATASETS)


def resolve_optimizer(name: str) -> str:
    """Canonical spelling of an optimizer name (one of :data:`OPTIMIZERS`)."""
    return _pick("optimizer", name, OPTIMIZERS)


def make_optimizer(
    name: str, params: Iterable[nn.Parameter], lr: float | None = None
) -> torch.optim.Optimizer:
    """``torch.optim.<name>`` over ``params``; ``lr`` defaults to :data:`DEFAULT_LR`."""
    key = resolve_optimizer(name)
    rate = DEFAULT_LR[key] if lr is None else float(lr)
    if not rate > 0:
        raise UsageError(f"the learning rate must be > 0, got {lr}")
    cls = getattr(torch.optim, key)
    return cls(params, lr=rate)


def default_device() -> str:
    """``"cuda"`` when a CUDA device is available, otherwise ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A usable ``torch.device``; ``None`` means :func:`default_device`."""
    if device is None:
        return torch.device(default_device())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(
            f"invalid device {device!r} ({exc}); use e.g. 'cpu', 'cuda' or 'cuda:1'"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {device!r} does not exist; this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps" and not (
        hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    ):
        raise UsageError(f"device {device!r} requested but MPS is not available; use 'cpu'")
    return dev


def default_threads() -> int:
    """torch CPU threads when none are asked for: half the CPUs this process may use, at
    least 1 and at most 8. torch's own default (every core) oversubscribes a machine that
    is doing anything else; on a busy 2-core machine it made the quickstart 6.5x slower
    than one thread, and small models gain nothing from more."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // 2))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (every device's) random number generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


# ------------------------------------------------------------------- hyper-parameters


@dataclass(frozen=True)
class HyperParameters:
    """Everything that defines a training run besides the Ikkuna configuration.

    ``lr=None`` takes the optimizer's :data:`DEFAULT_LR`; ``device=None`` takes
    :func:`default_device`. ``max_steps`` is the number of training steps; without
    ``epochs`` the run takes as many epochs as that needs (the last one partly), with both
    it stops at whichever limit comes first, and with neither it trains
    :data:`DEFAULT_EPOCHS` epochs. ``download`` lets torchvision datasets be downloaded.
    ``threads`` sets torch's CPU threads (process-wide; ``None``: :func:`default_threads`).
    """

    model: str = "FullyConnected"
    dataset: str = "digits"
    batch_size: int = 128
    epochs: int | None = None
    optimizer: str = "Adam"
    lr: float | None = None
    seed: int = 0
    device: str | None = None
    init: str = "kaiming"
    max_steps: int | None = None
    data_dir: str = "data"
    download: bool = False
    num_workers: int = 0
    threads: int | None = None

    def resolved(self) -> HyperParameters:
        """A copy with canonical names, the learning rate and device filled in; raises
        :class:`UsageError` naming the first invalid value."""
        from .models import INIT_SCHEMES

        model = resolve_model(self.model)
        dataset = resolve_dataset(self.dataset)
        optimizer = resolve_optimizer(self.optimizer)
        init = _pick("init scheme", self.init, INIT_SCHEMES)
        lr = DEFAULT_LR[optimizer] if self.lr is None else float(self.lr)
        for what, value, low in (
            ("batch size", self.batch_size, 1),
            ("number of epochs", self.epochs, 1),
            ("max steps", self.max_steps, 1),
            ("num workers", self.num_workers, 0),
            ("number of threads", self.threads, 1),
        ):
            if value is not None and int(value) < low:
                raise UsageError(f"the {what} must be >= {low}, got {value}")
        if not lr > 0:
            raise UsageError(f"the learning rate must be > 0, got {self.lr}")
        device = str(resolve_device(self.device))
        return replace(
            self,
            model=model,
            dataset=dataset,
            optimizer=optimizer,
            init=init,
            lr=lr,
            device=device,
            threads=default_threads() if self.threads is None else self.threads,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------- results


@dataclass
class EpochStats:
    """Metrics at the end of one epoch."""

    epoch: int
    steps: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    seconds: float


@dataclass
class TrainResult:
    """What :meth:`Trainer.run` returns (and ``run.json`` records)."""

    model: nn.Module
    hparams: HyperParameters
    log_dir: Path
    steps: int
    epochs: int
    train_accuracy: float
    test_accuracy: float
    train_loss: float
    test_loss: float
    seconds: float
    history: list[EpochStats] = field(default_factory=list)
    subscribers: list[str] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    model_path: Path | None = None
    run_file: Path | None = None
    #: what watching cost, one line per subscriber (:meth:`ikkuna_core.cost.CostMeter.summary`)
    costs: list[str] = field(default_factory=list)

    def summary_dict(self) -> dict[str, Any]:
        """JSON-ready summary (everything but the model)."""
        return {
            "hparams": self.hparams.as_dict(),
            "log_dir": str(self.log_dir),
            "steps": self.steps,
            "epochs": self.epochs,
            "train_accuracy": self.train_accuracy,
            "test_accuracy": self.test_accuracy,
            "train_loss": self.train_loss,
            "test_loss": self.test_loss,
            "seconds": round(self.seconds, 3),
            "history": [asdict(h) for h in self.history],
            "subscribers": self.subscribers,
            "backends": self.backends,
            "figures": [str(p) for p in self.figures],
            "model_path": str(self.model_path) if self.model_path else None,
            "costs": self.costs,
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy loss) of ``model`` over ``loader`` in eval mode.

    ``forward`` replaces ``model(x)`` (the Trainer passes ``exporter.evaluate`` so that the
    evaluation publishes nothing). The model's train/eval mode is restored afterwards.
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    forward = forward or model
    was_training = model.training
    model.eval()
    dev = torch.device(device)
    correct = torch.zeros((), dtype=torch.long, device=dev)
    total_loss = torch.zeros((), dtype=torch.float64, device=dev)
    count = 0
    try:
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            out = forward(x)
            correct += (out.argmax(dim=1) == y).sum()
            total_loss += loss_fn(out, y).to(torch.float64) * y.shape[0]
            count += int(y.shape[0])
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("cannot evaluate on an empty loader")
    return correct.item() / count, total_loss.item() / count


# --------------------------------------------------------------------------- Trainer


class Trainer:
    """Builds a run from :class:`HyperParameters` and an Ikkuna configuration, then trains.

    ``config`` is anything :func:`ikkuna_core.load_config` accepts (TOML path, dict, or
    :class:`~ikkuna_core.IkkunaConfig`). The subscribers are offered the Trainer's train and
    test loaders through a :class:`~ikkuna_core.RunContext` (a held-out accuracy takes the
    test loader from there). ``progress=True`` shows a tqdm bar on stderr (``None``: only
    when stderr is a terminal). ``on_epoch`` is called with each :class:`EpochStats`.
    A log directory that already holds a run raises :class:`LogDirError`;
    ``overwrite=True`` replaces that run's files instead (once everything is validated).

    Nothing is written until every name and option has been validated. A Trainer runs
    once: :meth:`run` closes its Exporter.
    """

    def __init__(
        self,
        hparams: HyperParameters | None = None,
        config: str | Path | Mapping[str, Any] | IkkunaConfig | None = None,
        *,
        registry: Any = None,
        progress: bool | None = False,
        on_epoch: Callable[[EpochStats], None] | None = None,
        save_model: bool = True,
        overwrite: bool = False,
    ) -> None:
        from ikkuna_core import watch

        from .data import make_loaders
        from .models import get_model, init_weights

        hp = (hparams or HyperParameters()).resolved()
        cfg = load_config(config)
        if registry is None:  # loaded here: the backends' files are checked before watch()
            try:
                registry = load_plugins(cfg.plugins)
            except UnknownPluginError as exc:
                source = str(config) if isinstance(config, (str, Path)) else "the configuration"
                raise UnknownPluginError(f"{source}: ikkuna.plugins: {exc}") from None
        previous = check_log_dir(
            Path(cfg.log_dir), overwrite=overwrite, patterns=backend_files(registry, cfg.backends)
        )
        self.config = cfg
        self.progress = progress
        self.on_epoch = on_epoch
        self.save_model = save_model
        self.device = torch.device(str(hp.device))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True

        assert hp.threads is not None  # resolved
        torch.set_num_threads(hp.threads)
        seed_everything(hp.seed)
        self.train_loader, self.test_loader, self.data_info = make_loaders(
            hp.dataset,
            batch_size=hp.batch_size,
            data_dir=hp.data_dir,
            download=hp.download,
            seed=hp.seed,
            num_workers=hp.num_workers,
        )
        self.steps_per_epoch = len(self.train_loader)
        self.hparams = hp = replace(hp, epochs=self._epochs(hp))
        seed_everything(hp.seed)  # the same weights whatever loading the data consumed
        model = get_model(
            hp.model, input_shape=self.data_info.input_shape, num_classes=self.data_info.num_classes
        )
        _check_depth(cfg.depth, model, hp.model)
        init_weights(model, hp.init)
        self.model = model.to(self.device)
        self.optimizer = make_optimizer(hp.optimizer, self.model.parameters(), hp.lr)
        loss_fn = nn.CrossEntropyLoss()
        context = RunContext(test_loader=self.test_loader, train_loader=self.train_loader)
        # The earlier run is moved aside before the backends open their files (a backend may
        # open a fixed name: metrics.jsonl, mlflow.db), put back if watch() refuses the
        # configuration, and deleted once the new run is attached.
        stash = _stash(Path(cfg.log_dir), previous)
        try:
            self.exporter = watch(
                self.model, loss_fn, cfg, registry=registry, context=context, overwrite=overwrite
            )
        except BaseException:
            _unstash(Path(cfg.log_dir), stash)
            raise
        if stash is not None:
            shutil.rmtree(stash)
        self.loss_fn = self.exporter.loss_fn or loss_fn
        self.bus = self.exporter.bus
        for topic, doc in TRAINER_TOPICS.items():
            self.bus.register_topic(topic, "network", doc)
        self.log_dir = Path(cfg.log_dir)
        self.steps = 0
        self.history: list[EpochStats] = []
        self._last_test_accuracy: float | None = None
        self._write_hparams_text()

    # --------------------------------------------------------------- set-up
    def _epochs(self, hp: HyperParameters) -> int:
        if hp.epochs is not None:
            return hp.epochs
        if hp.max_steps is not None:
            return math.ceil(hp.max_steps / max(self.steps_per_epoch, 1))
        return DEFAULT_EPOCHS

    def _write_hparams_text(self) -> None:
        """Record the hyper-parameters in TensorBoard's TEXT tab, when it is a backend."""
        rows = "\n".join(f"| {k} | {v} |" for k, v in self.hparams.as_dict().items())
        self.bus.log_text("hyperparameters", "| name | value |\n|---|---|\n" + rows)

    @property
    def subscriber_names(self) -> list[str]:
        return [s.name for s in self.bus.subscribers]

    @property
    def backend_names(self) -> list[str]:
        return [b.name for b in self.bus.backends]

    @property
    def total_steps(self) -> int:
        """Steps :meth:`run` will take."""
        assert self.hparams.epochs is not None  # resolved in __init__
        total = self.steps_per_epoch * self.hparams.epochs
        return min(total, self.hparams.max_steps) if self.hparams.max_steps else total

    # ------------------------------------------------------------- training
    def _done(self) -> bool:
        return self.hparams.max_steps is not None and self.steps >= self.hparams.max_steps

    def train_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step; returns (loss, number correct) as tensors on the device."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        output = self.model(x)
        loss = self.loss_fn(output, y)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        return loss.detach(), (output.detach().argmax(dim=1) == y).sum()

    def train_epoch(self, epoch: int, bar: Any = None) -> EpochStats:
        """Train one epoch (or until ``max_steps``), evaluate on the test set, report."""
        start = time.perf_counter()
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        seen = 0
        for i, (x, y) in enumerate(self.train_loader):
            if self._done():
                break
            loss, right = self.train_batch(x, y)
            n = int(y.shape[0])
            loss_sum += loss.to(torch.float64) * n
            correct += right
            seen += n
            if bar is not None:
                bar.update(1)
                if i % 10 == 0:  # one host synchronisation every ten steps, not every step
                    self._postfix(bar, epoch, loss_sum.item() / seen, correct.item() / seen)
        train_loss = loss_sum.item() / max(seen, 1)
        train_acc = correct.item() / max(seen, 1)
        test_acc, test_loss = self.evaluate(self.test_loader)
        stats = EpochStats(
            epoch=epoch,
            steps=self.steps,
            train_loss=train_loss,
            train_accuracy=train_acc,
            test_loss=test_loss,
            test_accuracy=test_acc,
            seconds=time.perf_counter() - start,
        )
        self._publish("epoch/accuracy", {"train": train_acc, "test": test_acc})
        self._publish("epoch/loss", {"train": train_loss, "test": test_loss})
        self.exporter.epoch_finished()
        self._last_test_accuracy = test_acc
        if bar is not None:
            self._postfix(bar, epoch, train_loss, train_acc)
        self.history.append(stats)
        if self.on_epoch is not None:
            self.on_epoch(stats)
        return stats

    def _postfix(self, bar: Any, epoch: int, loss: float, accuracy: float) -> None:
        fields = {
            "epoch": f"{epoch + 1}/{self.hparams.epochs}",
            "loss": f"{loss:.3f}",
            "acc": f"{accuracy:.3f}",
        }
        if self._last_test_accuracy is not None:
            fields["test_acc"] = f"{self._last_test_accuracy:.3f}"
        bar.set_postfix(ordered_dict=fields, refresh=False)

    def evaluate(self, loader: Iterable[Any]) -> tuple[float, float]:
        """(accuracy, loss) over ``loader``; publishes nothing and counts no step."""
        return evaluate(
            self.model, loader, self.device, nn.functional.cross_entropy, self.exporter.evaluate
        )

    def _publish(self, topic: str, values: Mapping[str, float]) -> None:
        scalars: dict[str | None, float | torch.Tensor] = {k: v for k, v in values.items()}
        self.bus.log_scalars(topic, scalars)

    def run(self) -> TrainResult:
        """Train for the configured epochs (or ``max_steps``), evaluate the final model on
        the whole train and test sets, close the Exporter and save ``model.pt`` and
        ``run.json`` in the log directory."""
        start = time.perf_counter()
        bar = self._progress_bar()
        epochs = self.hparams.epochs or DEFAULT_EPOCHS
        try:
            epoch = 0
            while epoch < epochs and not self._done():
                self.train_epoch(epoch, bar)
                epoch += 1
            train_acc, train_loss = self.evaluate(self.train_loader)
            test_acc, test_loss = self.evaluate(self.test_loader)
            self._publish("final/accuracy", {"train": train_acc, "test": test_acc})
            self._publish("final/loss", {"train": train_loss, "test": test_loss})
        finally:
            if bar is not None:
                bar.close()
            self.exporter.close()
        result = TrainResult(
            model=self.model,
            hparams=self.hparams,
            log_dir=self.log_dir,
            steps=self.steps,
            epochs=epoch,
            train_accuracy=train_acc,
            test_accuracy=test_acc,
            train_loss=train_loss,
            test_loss=test_loss,
            seconds=time.perf_counter() - start,
            history=self.history,
            subscribers=self.subscriber_names,
            backends=self.backend_names,
            costs=self.bus.cost.summary(),
        )
        if "matplotlib" in result.backends:
            result.figures = sorted((self.log_dir / "figures").glob("*.png"))
        self._save(result)
        return result

    def _progress_bar(self) -> Any:
        if self.progress is False:
            return None
        import sys

        from tqdm.auto import tqdm

        return tqdm(
            total=self.total_steps,
            desc=f"{self.hparams.model} on {self.hparams.dataset}",
            unit="step",
            file=sys.stderr,
            disable=None if self.progress is None else False,
            dynamic_ncols=True,
        )

    def _save(self, result: TrainResult) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.save_model:
            result.model_path = self.log_dir / "model.pt"
            torch.save(self.model.state_dict(), result.model_path)
        result.run_file = self.log_dir / "run.json"
        doc = result.summary_dict()
        doc["dataset"] = {
            "name": self.data_info.name,
            "input_shape": list(self.data_info.input_shape),
            "num_classes": self.data_info.num_classes,
        }
        doc["modules"] = {name: info.type for name, info in self.exporter.modules.items()}
        doc["ikkuna_config"] = self.config.model_dump(mode="json", exclude={"subscribers"})
        doc["ikkuna_config"]["subscribers"] = [
            {"name": e.name, **{k: _jsonable(v) for k, v in e.options.items()}}
            for e in self.config.subscribers
        ]
        result.run_file.write_text(json.dumps(doc, indent=2) + "\n")


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return f"<{type(value).__name__}>"


def _check_depth(depth: int, model: nn.Module, name: str) -> None:
    """A ``depth`` deeper than the model's deepest module would silently watch its leaves."""
    deepest = max((n.count(".") + 1 for n, _ in model.named_modules() if n), default=0)
    if depth > deepest:
        raise UsageError(
            f"depth {depth} is deeper than {name}, whose modules go {deepest} level"
            f"{'s' if deepest != 1 else ''} down; use -1 (the leaf modules) or 1 to {deepest}"
        )


# ------------------------------------------------------------------------ log directory


def backend_files(registry: PluginRegistry, names: Iterable[str]) -> tuple[str, ...]:
    """The glob patterns of what the backends called ``names`` write in a log directory
    (their ``files``); names the registry does not know are left to ``watch`` to report."""
    patterns: list[str] = []
    for name in names:
        try:
            patterns += registry.backend(name).files
        except PluginError:
            continue
    return tuple(patterns)


def _stash(log_dir: Path, paths: Sequence[Path]) -> Path | None:
    """Move ``paths`` (inside ``log_dir``) into a new hidden folder of ``log_dir``, keeping
    their relative paths; returns the folder (None when there is nothing to move)."""
    if not paths:
        return None
    import tempfile

    stash = Path(tempfile.mkdtemp(prefix=".replaced-", dir=log_dir))
    for path in paths:
        target = stash / path.relative_to(log_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    return stash


def _unstash(log_dir: Path, stash: Path | None) -> None:
    """Put what :func:`_stash` moved back in place (replacing anything made since)."""
    if stash is None:
        return
    for moved in sorted(p for p in stash.rglob("*") if not p.is_dir()):
        target = log_dir / moved.relative_to(stash)
        target.parent.mkdir(parents=True, exist_ok=True)
        moved.replace(target)
    shutil.rmtree(stash)


def previous_run(log_dir: Path, patterns: Iterable[str] = ()) -> list[Path]:
    """The files of an earlier run in ``log_dir`` (see :data:`RUN_FILES`), and what the
    backends' ``patterns`` match (files or folders); empty if none."""
    if not log_dir.is_dir():
        return []
    found = {p for pattern in RUN_FILES for p in log_dir.glob(pattern) if p.is_file()}
    found |= {p for pattern in patterns for p in log_dir.glob(pattern) if p.exists()}
    return sorted(found)


def check_log_dir(
    log_dir: str | Path, *, overwrite: bool = False, patterns: Iterable[str] = ()
) -> list[Path]:
    """Check, before anything is written, that a run can use ``log_dir``: it must be a
    directory (or not exist yet), be writable, and hold no earlier run unless
    ``overwrite``. ``patterns``: what the run's backends write besides :data:`RUN_FILES`
    (:func:`backend_files`). Returns the earlier run's files and folders, which the caller
    replaces. Raises :class:`LogDirError`; leaves nothing behind."""
    path = Path(log_dir)
    if path.exists() and not path.is_dir():
        raise LogDirError(f"log directory {path} is a file, not a directory; choose another one")
    previous = previous_run(path, patterns)
    if previous and not overwrite:
        shown = ", ".join(str(p.relative_to(path)) for p in previous[:3])
        more = f" and {len(previous) - 3} more" if len(previous) > 3 else ""
        raise LogDirError(
            f"log directory {path} already holds a run ({shown}{more}); a second run there "
            "would mix with it in TensorBoard and the figures. Choose another --log-dir, or "
            "pass --overwrite to replace that run"
        )
    try:
        probe_writable_dir(path)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise LogDirError(f"cannot write to log directory {path} ({reason})") from None
    return previous
