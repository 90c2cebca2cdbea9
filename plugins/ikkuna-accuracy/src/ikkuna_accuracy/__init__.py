"""ikkuna-accuracy: accuracy of the training batches, accuracy on held-out data every n
steps, and the training loss with its running mean.

Enable it with ``plugins = ["accuracy"]`` in a run configuration; its subscribers are
``train_accuracy``, ``test_accuracy`` and ``loss``.
"""

from .subscribers import (
    Loss,
    LossOptions,
    TestAccuracy,
    TestAccuracyOptions,
    TrainAccuracy,
    TrainAccuracyOptions,
    correct_and_total,
)

__all__ = [
    "Loss",
    "LossOptions",
    "TestAccuracy",
    "TestAccuracyOptions",
    "TrainAccuracy",
    "TrainAccuracyOptions",
    "correct_and_total",
]

__version__ = "0.1.0"
