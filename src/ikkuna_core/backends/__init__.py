"""Backends write metric results somewhere a person can look at them.

Built in: ``tensorboard`` (event files) and ``matplotlib`` (PNG figures). Each imports its
library only when it is constructed, so ``import ikkuna_core`` stays light.

Tag naming: a metric's tag is its topic, followed by the module key for per-module metrics:
``max_abs/weight_gradients/layer1.0.conv1`` (a subscriber ``max_abs`` of the topic
``weight_gradients``, module ``layer1.0.conv1``), ``my_metric``, ``my_metric/top5``.
"""

from .base import Backend, HistogramRecord, ScalarRecord

__all__ = ["Backend", "HistogramRecord", "ScalarRecord"]
