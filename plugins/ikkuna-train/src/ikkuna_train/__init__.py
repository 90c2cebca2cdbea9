"""ikkuna-train: Ikkuna's training front end.

Demonstration models (:mod:`ikkuna_train.models`), image datasets by name
(:mod:`ikkuna_train.data`), the :class:`Trainer` that runs them with Ikkuna watching, the
dashboard (:mod:`ikkuna_train.report`), and the ``ikkuna train`` and ``ikkuna report``
commands, which it adds to the core's ``ikkuna`` console script as the plugin ``train``.

torchvision, scikit-learn, tqdm, matplotlib and tensorboard are imported only when a run
or a report needs them.
"""

from .trainer import HyperParameters, Trainer, TrainResult, UsageError

__all__ = ["HyperParameters", "TrainResult", "Trainer", "UsageError"]

__version__ = "0.1.0"
