"""ikkuna-wandb: the ``wandb`` backend, which writes a run to Weights & Biases."""

from .backend import WATCH_NAMES, WandbBackend, watch_name

__all__ = ["WATCH_NAMES", "WandbBackend", "watch_name"]

__version__ = "0.1.0"
