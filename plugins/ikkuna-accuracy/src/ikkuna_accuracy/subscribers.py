"""The subscribers of the ``accuracy`` plugin.

Every value stays a tensor on the model's device until the backends flush: nothing here
synchronises with the host (the test loop only moves batches *to* the device).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from pydantic import ConfigDict, Field, field_validator, model_validator
from torch import nn

from ikkuna_core import MessageBundle, Subscriber, SubscriberOptions

__all__ = [
    "Loss",
    "LossOptions",
    "TestAccuracy",
    "TestAccuracyOptions",
    "TrainAccuracy",
    "TrainAccuracyOptions",
    "correct_and_total",
]


def correct_and_total(
    output: torch.Tensor,
    labels: torch.Tensor,
    k: int = 1,
    *,
    ignore_index: int | None = None,
    shift_labels: bool = False,
) -> tuple[torch.Tensor, int | torch.Tensor]:
    """Number of top-``k`` hits (a 0-d tensor on the output's device) and number of
    predictions. ``output``: class scores ``(N, C)`` or ``(N, C, d1, ...)`` (one prediction
    per position), or sequence scores ``(N, T, C)`` with labels ``(N, T)`` (classes last, as
    language models return them); ``labels``: class indices ``(N)``/``(N, d1, ...)``, or
    one-hot / class probabilities shaped like ``output`` (their argmax is the label).

    ``ignore_index``: labels of this value (padding) are not predictions; then the count is
    a 0-d tensor on the device (no host synchronisation). ``shift_labels``: a causal language
    model's scores at position t predict the label at t + 1 (as GPT-2 shifts internally):
    scores ``(N, T, C)`` without their last position against labels without their first."""
    if output.dim() < 2:
        raise ValueError(
            f"accuracy needs class scores shaped (N, C, ...), got a tensor of shape "
            f"{tuple(output.shape)}"
        )
    if shift_labels:
        if output.dim() != 3 or tuple(labels.shape) != tuple(output.shape[:2]):
            raise ValueError(
                f"shift_labels needs sequence scores (N, T, C) and labels (N, T), got scores "
                f"{tuple(output.shape)} and labels {tuple(labels.shape)}"
            )
        output, labels = output[:, :-1], labels[:, 1:]
    if labels.dim() == output.dim():
        labels = labels.argmax(dim=1)
    elif (
        output.dim() > 2
        and tuple(labels.shape) != (output.shape[0], *output.shape[2:])
        and tuple(labels.shape) == tuple(output.shape[:-1])
    ):
        output = output.movedim(-1, 1)  # classes last: (N, T, C) sequence scores
    expected = (output.shape[0], *output.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match outputs of shape "
            f"{tuple(output.shape)} (expected labels shaped {expected}, or (N, T) for "
            "(N, T, C) sequence scores)"
        )
    labels = labels.to(output.device)
    k = min(k, output.shape[1])
    if k == 1:
        hit = output.argmax(dim=1) == labels
    else:
        hit = (output.topk(k, dim=1).indices == labels.unsqueeze(1)).any(dim=1)
    if ignore_index is None:
        return hit.sum(), hit.numel()
    counted = labels != ignore_index
    return (hit & counted).sum(), counted.sum()


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping):
        for value in output.values():
            if isinstance(value, torch.Tensor):
                return value
    raise TypeError(f"the model returned {type(output).__name__}, not class scores")


def _device_of(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


class _AccuracyNaming(Subscriber):
    """Accuracies are network-level metrics named after the subscriber, not after its
    inputs: ``train_accuracy``, ``test_accuracy``; ``train_accuracy/top5`` for top_k=5."""

    def output_topic(self, suffix: str | None = None) -> str:
        k = getattr(self.options, "top_k", 1)
        base = self.options.publish_as or (self.name if k == 1 else f"{self.name}/top{k}")
        return f"{base}/{suffix}" if suffix else base

    def output_topics(self) -> list[str]:
        return [self.output_topic()]

    def _topic_for(self, input_topic: str, suffix: str | None = None) -> str:
        return self.output_topic(suffix)


# -------------------------------------------------------------------------- train accuracy
class TrainAccuracyOptions(SubscriberOptions):
    top_k: int = Field(default=1, ge=1, description="a hit is a label among the k best scores")
    ignore_index: int | None = Field(
        default=-100,
        description="labels of this value (padding) are not counted; -100 as in torch's "
        "cross_entropy and Hugging Face models; None counts every label",
    )
    shift_labels: bool = Field(
        default=False,
        description="causal language models: the scores at position t predict the label at "
        "t + 1, as GPT-2 shifts its labels internally (scores (N, T, C), labels (N, T))",
    )

    @field_validator("topics")
    @classmethod
    def _output_and_labels(cls, topics: list[str]) -> list[str]:
        if len(topics) != 2:
            raise ValueError(
                f"train_accuracy needs two topics [outputs, labels], got {len(topics)}: {topics}"
            )
        return topics


class TrainAccuracy(_AccuracyNaming):
    """Accuracy of the current training batch, from the model output and the labels passed
    to the loss (one synchronized bundle per step); labels equal to ``ignore_index`` (-100,
    padding) are not counted, and ``shift_labels`` compares a causal language model's
    predictions with the next token."""

    name = "train_accuracy"
    Options = TrainAccuracyOptions
    default_topics: ClassVar[tuple[str, ...]] = ("network_output", "input_labels")
    synchronized = True
    options: TrainAccuracyOptions

    def compute(self, bundle: MessageBundle) -> None:
        out_topic, label_topic = self.options.topics
        output, labels = bundle[out_topic], bundle[label_topic]
        if output is None or labels is None:
            raise ValueError(f"topics {self.options.topics} must both carry tensors")
        correct, total = correct_and_total(
            output.detach(),
            labels.detach(),
            self.options.top_k,
            ignore_index=self.options.ignore_index,
            shift_labels=self.options.shift_labels,
        )
        self.publish_scalar(bundle, correct.to(torch.float32) / total)


# --------------------------------------------------------------------------- test accuracy
class TestAccuracyOptions(SubscriberOptions):
    __test__: ClassVar[bool] = False  # not a pytest test class

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    subsample: int = Field(default=100, ge=1, description="evaluate every n-th training step")
    loader: Any = Field(
        default=None,
        exclude=True,
        description="(Python only) any re-iterable of (inputs, labels) batches, e.g. a "
        "DataLoader; without it and `dataset`, the run's test loader (RunContext) is used",
    )
    dataset: str | None = Field(
        default=None,
        description="name of an ikkuna-train dataset whose test split is used (needs the "
        "ikkuna-train distribution)",
    )
    batch_size: int = Field(default=256, ge=1, description="batch size for `dataset`")
    data_dir: str = Field(default="data", description="where `dataset`'s files are")
    download: bool = Field(default=False, description="download `dataset` when it is missing")
    image_size: int | None = Field(
        default=None, ge=1, description="resize `dataset`'s images (as the training data was)"
    )
    max_batches: int | None = Field(
        default=None, ge=1, description="evaluate at most this many batches (None: all)"
    )
    top_k: int = Field(default=1, ge=1, description="a hit is a label among the k best scores")

    @field_validator("loader")
    @classmethod
    def _iterable(cls, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
            raise ValueError(
                "loader must be an iterable of (inputs, labels) batches given from Python "
                "(e.g. a DataLoader); in a configuration file use `dataset` instead"
            )
        if isinstance(value, Iterator):
            raise ValueError(
                "loader is evaluated many times: give a re-iterable (a DataLoader, a list), "
                "not a one-shot iterator or generator"
            )
        return value

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str | None) -> str | None:
        if value is not None:
            value = _train_data().dataset_info(value).name  # ValueError for unknown names
        return value

    @model_validator(mode="after")
    def _one_source(self) -> TestAccuracyOptions:
        if self.loader is not None and self.dataset is not None:
            raise ValueError("test_accuracy takes `loader` or `dataset`, not both")
        if self.loader is None and self.dataset is None:
            raise ValueError(
                "test_accuracy needs held-out data: a `loader` (from Python), a `dataset` "
                "name (needs ikkuna-train), or a run that provides its test loader "
                "(`ikkuna train` does; in Python: ikkuna_core.watch(..., "
                "context=ikkuna_core.RunContext(test_loader=...)))"
            )
        return self


def _train_data() -> Any:
    """``ikkuna_train.data``, where the ``dataset`` names come from: a soft dependency."""
    try:
        import ikkuna_train.data
    except ImportError as exc:
        raise ValueError(
            f"test_accuracy's `dataset` option needs the ikkuna-train distribution, which "
            f"cannot be imported ({exc}); install it (from a clone of Ikkuna: pip install "
            "./plugins/ikkuna-train), or give a `loader` instead"
        ) from None
    return ikkuna_train.data


class TestAccuracy(_AccuracyNaming):
    """Accuracy on held-out data, every ``subsample`` steps (at ``batch_finished`` by
    default). The model runs through ``Exporter.evaluate``: in eval mode, without autograd,
    publishing no training messages, and with its train/eval mode restored afterwards.
    Batches are moved to the model's device."""

    __test__: ClassVar[bool] = False  # not a pytest test class

    name = "test_accuracy"
    Options = TestAccuracyOptions
    default_topics: ClassVar[tuple[str, ...]] = ("batch_finished",)
    options: TestAccuracyOptions

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self._dataset_loader: Iterable[Any] | None = None

    @property
    def loader(self) -> Iterable[Any]:
        """The held-out batches: the ``loader`` option (or the run's test loader), or
        ``dataset``'s test split, loaded the first time it is needed."""
        if self.options.loader is not None:
            return self.options.loader  # type: ignore[no-any-return]
        if self._dataset_loader is None:
            from torch.utils.data import DataLoader

            assert self.options.dataset is not None
            test_set = _train_data().load_dataset(
                self.options.dataset,
                train=False,
                data_dir=self.options.data_dir,
                download=self.options.download,
                image_size=self.options.image_size,
            )
            self._dataset_loader = DataLoader(
                test_set, batch_size=self.options.batch_size, shuffle=False
            )
        return self._dataset_loader

    def compute(self, bundle: MessageBundle) -> None:
        exporter = self.exporter
        model = exporter.model
        if model is None:
            raise RuntimeError("test_accuracy: the exporter watches no model yet")
        device = _device_of(model)
        limit = self.options.max_batches
        correct: torch.Tensor | None = None
        total = 0
        # Exporter.evaluate restores the mode with model.train(was_training), which resets
        # every submodule to the model's mode; keep each module's own mode (a BatchNorm
        # frozen in eval mode inside a training model stays frozen).
        modes = [(module, module.training) for module in model.modules()]
        try:
            for i, batch in enumerate(self.loader):
                if limit is not None and i >= limit:
                    break
                inputs, labels = batch[0], batch[1]
                inputs = inputs.to(device, non_blocking=True)
                labels = torch.as_tensor(labels).to(device, non_blocking=True)
                output = _first_tensor(exporter.evaluate(inputs))
                hits, n = correct_and_total(output, labels, self.options.top_k)
                correct = hits if correct is None else correct + hits
                total += int(n)  # a Python int already: no ignore_index here
        finally:
            for module, training in modes:
                module.training = training
        if correct is None or total == 0:
            raise ValueError("test_accuracy: the held-out loader yielded no samples")
        self.publish_scalar(bundle, correct.to(torch.float32) / total)


# ------------------------------------------------------------------------------------ loss
class LossOptions(SubscriberOptions):
    window: int = Field(
        default=50, ge=1, description="number of most recent observed steps in the running mean"
    )


class Loss(Subscriber):
    """The training loss of each step (``loss/loss``) and its running mean over the last
    ``window`` observed steps (``loss/loss/running_mean``), both kept on the loss's device
    (a ring buffer, no host transfer). A non-scalar loss (``reduction='none'``) is
    averaged. Steps skipped by ``subsample`` are not in the window."""

    name = "loss"
    Options = LossOptions
    default_topics: ClassVar[tuple[str, ...]] = ("loss",)
    options: LossOptions

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self._buffers: dict[tuple[str, str | None], torch.Tensor] = {}
        self._counts: dict[tuple[str, str | None], int] = {}

    def output_topics(self) -> list[str]:
        topics = self.options.topics[:1] if self.options.publish_as else self.options.topics
        return [self._topic_for(t, s) for t in topics for s in (None, "running_mean")]

    def compute(self, bundle: MessageBundle) -> None:
        topic = bundle.topics[0]
        loss = bundle[topic]
        if loss is None:
            raise ValueError(f"topic {topic!r} carries no tensor payload")
        value = loss.detach()
        if not value.is_floating_point() or value.element_size() < 4:
            value = value.float()
        value = value.mean()  # a new 0-d tensor, never a view of the training state
        state = (topic, bundle.key)
        window = self.options.window
        buffer = self._buffers.get(state)
        if buffer is None or buffer.device != value.device or buffer.dtype != value.dtype:
            buffer = self._buffers[state] = torch.zeros(
                window, dtype=value.dtype, device=value.device
            )
            self._counts[state] = 0
        count = self._counts[state]
        buffer[count % window] = value
        self._counts[state] = count = count + 1
        self.publish_scalar(bundle, value)
        self.publish_scalar(bundle, buffer[: min(count, window)].mean(), suffix="running_mean")
