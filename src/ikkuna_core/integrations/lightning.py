"""Ikkuna for Lightning: one callback watches the LightningModule while a ``Trainer`` fits.

```python
from lightning import Trainer
from ikkuna_core.integrations.lightning import IkkunaCallback

trainer = Trainer(callbacks=[IkkunaCallback(config="ikkuna.toml")])
trainer.fit(module, datamodule)
```

What it does, and why:

- ``on_fit_start`` (after the strategy has wrapped the model and moved it to its device):
  :func:`ikkuna_core.watch` on the LightningModule, with the callback's configuration; in a
  distributed run only rank 0 writes (``ranks = "all"``: every rank, to
  ``<log_dir>/rank<r>``).
- ``on_train_batch_start``: a training forward begins. Lightning's ``training_step`` may call
  any submodule (``self.net(x)``) rather than the LightningModule's own ``forward``, so the
  step's forward topics are captured from the watched submodules from here, whatever the
  training step calls; the batch gives ``input_data``. Steps still end at the optimizer step
  (Lightning's ``optimizer.step(closure)``): gradients are read after the closure, so after
  Lightning's ``gradient_clip_val`` clipping; ``accumulate_grad_batches`` batches make one step.
- ``on_before_backward``: the loss of the step (the value Lightning differentiates, divided
  by ``accumulate_grad_batches``) when no loss function is watched.
- ``on_train_epoch_end``: ``exporter.epoch_finished()``.
- ``on_fit_end``, ``on_exception`` and ``teardown``: the Exporter is closed (hooks removed,
  backends flushed and closed), also when training raised.

Lightning is an optional dependency (``pip install 'ikkuna-core[lightning]'``); only this
module imports it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._exporter import Exporter
from ..config import IkkunaConfig
from ..context import RunContext
from ..plugins import PluginRegistry
from ..watch import watch

if TYPE_CHECKING:
    from lightning.pytorch import Callback, LightningModule, Trainer
else:
    try:
        from lightning.pytorch import Callback, LightningModule, Trainer
    except ImportError as exc:  # pragma: no cover - depends on what is installed
        raise ImportError(
            "ikkuna_core.integrations.lightning needs Lightning: pip install "
            f"'ikkuna-core[lightning]' (or pip install lightning); {exc}"
        ) from exc

__all__ = ["IkkunaCallback"]


class IkkunaCallback(Callback):
    """Watch the LightningModule of every ``fit`` with Ikkuna.

    The arguments are those of :func:`ikkuna_core.watch`: ``config`` (a TOML path, a dict
    with the keys of the ``[ikkuna]`` table, or an :class:`~ikkuna_core.IkkunaConfig`),
    ``loss_fn`` (an ``nn.Module`` loss the LightningModule calls, for the loss, output and
    label topics; without it the loss comes from ``on_before_backward``), ``registry`` and
    ``context``. ``exporter`` is the running Exporter (None outside ``fit``).
    """

    def __init__(
        self,
        config: str | Path | Mapping[str, Any] | IkkunaConfig | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        *,
        registry: PluginRegistry | None = None,
        context: RunContext | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.loss_fn = loss_fn
        self.registry = registry
        self.context = context
        self.exporter: Exporter | None = None

    # ------------------------------------------------------------------ fit
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()  # a previous fit that ended without on_fit_end
        self.exporter = watch(
            pl_module, self.loss_fn, self.config, registry=self.registry, context=self.context
        )

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.exporter is not None:
            self.exporter.announce_forward((batch,), {})

    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor
    ) -> None:
        if self.exporter is not None:
            self.exporter.announce_loss(loss)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.exporter is not None:
            self.exporter.epoch_finished()

    # ------------------------------------------------------------------ end
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        # the training error is what the user needs: a failure to close is only a warning
        try:
            self._close()
        except Exception as exc:  # noqa: BLE001 - must not hide `exception`
            warnings.warn(
                f"ikkuna: closing the Exporter after {type(exception).__name__} failed: "
                f"{type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        exporter, self.exporter = self.exporter, None
        if exporter is not None:
            exporter.close()
