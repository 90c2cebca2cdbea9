"""train_accuracy, test_accuracy and loss compared with accuracies and losses computed
independently (own forward hooks, a hook-free copy of the model) during real SGD steps."""

from __future__ import annotations

import collections
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ikkuna_accuracy import Loss, TestAccuracy, TrainAccuracy, correct_and_total
from ikkuna_core import Exporter, MessageBundle, MessageBus, Subscriber
from ikkuna_core.testing import MemoryBackend, train_steps


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(256, 10),
    )


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


class Outputs:
    """Records the model's output of each training forward (own hook on the model)."""

    def __init__(self, model: nn.Module) -> None:
        self.values: list[np.ndarray] = []
        model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: object, output: torch.Tensor) -> None:
        if module.training:
            self.values.append(output.detach().numpy().astype(np.float64))


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    best = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean([label in row for row, label in zip(best, labels, strict=True)]))


def independent_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int = 1) -> float:
    """Accuracy of a hook-free copy of ``model`` (same weights and statistics), eval mode."""
    copy = make_model()
    copy.load_state_dict(model.state_dict())
    copy.eval()
    with torch.no_grad():
        scores = copy(x).numpy().astype(np.float64)
    return topk_accuracy(scores, y.numpy(), k)


# ------------------------------------------------------------------------- train accuracy
def test_train_accuracy_top1_and_top3() -> None:
    model = make_model()
    outputs = Outputs(model)
    x, y = make_data(64, seed=1)
    backend = MemoryBackend()
    top1, top3 = TrainAccuracy(), TrainAccuracy(top_k=3)
    assert top1.output_topics() == ["train_accuracy"]
    assert top3.output_topics() == ["train_accuracy/top3"]
    exporter = train_steps(model, [top1, top3], steps=4, inputs=x, targets=y, backend=backend)
    exporter.close()
    assert len(outputs.values) == 4
    for step, scores in enumerate(outputs.values):
        assert backend.scalar("train_accuracy", step) == pytest.approx(
            topk_accuracy(scores, y.numpy(), 1)
        )
        assert backend.scalar("train_accuracy/top3", step) == pytest.approx(
            topk_accuracy(scores, y.numpy(), 3)
        )
    # the model learns the fixed batch: a real signal, not a constant
    assert backend.scalar("train_accuracy", 3) > backend.scalar("train_accuracy", 0)


def test_train_accuracy_with_class_probability_targets() -> None:
    model = make_model()
    outputs = Outputs(model)
    x, y = make_data(32, seed=2)
    soft = nn.functional.one_hot(y, 10).float() * 0.9 + 0.01  # label smoothing
    backend = MemoryBackend()
    train_steps(model, [TrainAccuracy()], steps=2, inputs=x, targets=soft, backend=backend)
    for step, scores in enumerate(outputs.values):
        want = topk_accuracy(scores, y.numpy(), 1)
        assert backend.scalar("train_accuracy", step) == pytest.approx(want)


def test_accuracy_options_and_shapes() -> None:
    with pytest.raises(ValueError, match="two topics"):
        TrainAccuracy(topics=["network_output"])
    with pytest.raises(ValueError):
        TrainAccuracy(top_k=0)
    with pytest.raises(ValueError, match="class scores"):
        correct_and_total(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="do not match"):
        correct_and_total(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
    # one prediction per position: (N, C, L) scores, (N, L) labels
    scores = torch.tensor([[[0.1, 0.9], [0.8, 0.05], [0.2, 0.07]]])  # N=1, C=3, L=2
    # position 0 ranks classes 1, 2, 0; position 1 ranks 0, 2, 1
    hits, total = correct_and_total(scores, torch.tensor([[1, 2]]))
    assert (int(hits), total) == (1, 2)
    hits, total = correct_and_total(scores, torch.tensor([[1, 2]]), k=2)
    assert (int(hits), total) == (2, 2)
    hits, total = correct_and_total(scores, torch.tensor([[2, 1]]), k=2)
    assert (int(hits), total) == (1, 2)
    hits, total = correct_and_total(scores, torch.tensor([[2, 1]]), k=5)  # k > C: all hit
    assert (int(hits), total) == (2, 2)


def test_sequence_scores_padding_and_shifted_labels() -> None:
    """Language-model logits (N, T, C), classes last, against a numpy computation: padding
    labels (-100) are not counted; with shift_labels the scores at t predict label t + 1."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 7, generator=g)
    labels = torch.randint(0, 7, (3, 6), generator=g)
    labels[0, 4:] = -100
    labels[2, :2] = -100
    scores, lab = logits.numpy(), labels.numpy()
    for shift in (False, True):
        s, y = (scores[:, :-1], lab[:, 1:]) if shift else (scores, lab)
        keep = y != -100
        want = ((s.argmax(-1) == y) & keep).sum(), keep.sum()
        hits, total = correct_and_total(logits, labels, ignore_index=-100, shift_labels=shift)
        assert (int(hits), int(total)) == (int(want[0]), int(want[1]))
        top3 = (np.argsort(-s, axis=-1)[..., :3] == y[..., None]).any(-1) & keep
        hits, total = correct_and_total(logits, labels, 3, ignore_index=-100,
                                        shift_labels=shift)
        assert int(hits) == int(top3.sum()) and int(total) == int(keep.sum())
    # without ignore_index every position counts (a padding label is never a hit)
    hits, total = correct_and_total(logits, labels)
    assert total == 18 and int(hits) == int((scores.argmax(-1) == lab).sum())
    with pytest.raises(ValueError, match="shift_labels needs"):
        correct_and_total(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long),
                          shift_labels=True)
    options = TrainAccuracy(shift_labels=True).options
    assert options.shift_labels and options.ignore_index == -100


# -------------------------------------------------------------------------- test accuracy
class MessageCounter(Subscriber):
    """Counts the messages of its topics per step (what the Exporter publishes)."""

    name = "message_counter"

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.seen: collections.Counter[tuple[str, int]] = collections.Counter()

    def compute(self, bundle: MessageBundle) -> None:
        self.seen[(bundle.topics[0], bundle.global_step)] += 1


def test_test_accuracy_from_a_loader_every_n_steps() -> None:
    model = make_model()
    model.train()
    model[1].eval()  # a frozen BatchNorm inside a training model: a mixed mode to preserve
    x, y = make_data(32, seed=1)
    x_test, y_test = make_data(50, seed=7)
    loader = DataLoader(TensorDataset(x_test, y_test), batch_size=16)  # 4 batches, last of 2
    sub = TestAccuracy(loader=loader, subsample=2)
    counter = MessageCounter(topics=["activations", "input_data", "loss", "batch_finished"])
    expected: dict[int, float] = {}
    modes: list[list[bool]] = []

    def on_step(step: int) -> None:
        modes.append([m.training for m in model.modules()])
        if step % 2 == 0:
            expected[step] = independent_eval(model, x_test, y_test)

    # own loop: train_steps would call model.train() and unfreeze the BatchNorm
    backend = MemoryBackend()
    exporter = Exporter(bus=MessageBus(on_error="raise"))
    exporter.set_model(model)
    loss_fn = exporter.set_loss(nn.CrossEntropyLoss())
    exporter.bus.register_subscriber(counter)
    exporter.bus.register_subscriber(sub)
    exporter.bus.add_backend(backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = 5
    for step in range(steps):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        on_step(step)
    exporter.close()
    written = {r.step: r.value for r in backend.scalars if r.tag == "test_accuracy"}
    assert sorted(written) == [0, 2, 4]
    for step, value in written.items():
        assert value == pytest.approx(expected[step])
        assert value == pytest.approx(round(value * 50) / 50)  # all 50 samples counted
    # train/eval mode of every module is as it was: model training, the BatchNorm frozen
    initial = [True, True, False, True, True, True, True]
    assert modes == [initial] * steps
    # evaluating 4 batches published nothing: one forward's worth of messages per step
    for step in range(steps):
        assert counter.seen[("activations", step)] == 6
        assert counter.seen[("input_data", step)] == 1
        assert counter.seen[("loss", step)] == 1
        assert counter.seen[("batch_finished", step)] == 1
    assert {s for _, s in counter.seen} == set(range(steps))
    assert exporter.global_step == steps - 1


def test_test_accuracy_max_batches_and_top_k() -> None:
    model = make_model()
    x, y = make_data(32, seed=1)
    x_test, y_test = make_data(80, seed=8)
    loader = DataLoader(TensorDataset(x_test, y_test), batch_size=16)
    sub = TestAccuracy(loader=loader, subsample=1, max_batches=2, top_k=2)
    assert sub.output_topics() == ["test_accuracy/top2"]
    expected = []
    backend = MemoryBackend()
    train_steps(
        model, [sub], steps=2, inputs=x, targets=y, backend=backend,
        on_step=lambda s: expected.append(independent_eval(model, x_test[:32], y_test[:32], 2)),
    )
    for step in range(2):
        assert backend.scalar("test_accuracy/top2", step) == pytest.approx(expected[step])


def test_test_accuracy_resolves_a_dataset_lazily() -> None:
    from ikkuna_train.data import load_dataset

    sub = TestAccuracy(dataset="digits", image_size=8, batch_size=64, max_batches=3, subsample=3)
    assert sub._dataset_loader is None  # nothing loaded before the first evaluation
    model = make_model()
    x, y = make_data(32, seed=1)
    digits = load_dataset("digits", train=False, image_size=8)
    x_test = torch.stack([digits[i][0] for i in range(3 * 64)])
    y_test = torch.tensor([int(digits[i][1]) for i in range(3 * 64)])
    expected = {}
    backend = MemoryBackend()
    train_steps(
        model, [sub], steps=4, inputs=x, targets=y, backend=backend,
        on_step=lambda s: expected.__setitem__(s, independent_eval(model, x_test, y_test)),
    )
    assert sub._dataset_loader is not None
    written = {r.step: r.value for r in backend.scalars if r.tag == "test_accuracy"}
    assert sorted(written) == [0, 3]
    for step, value in written.items():
        assert value == pytest.approx(expected[step])


def test_test_accuracy_options() -> None:
    loader = [(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))]
    assert TestAccuracy(loader=loader).options.subsample == 100
    assert TestAccuracy(loader=loader).options.topics == ["batch_finished"]
    assert "loader" not in TestAccuracy(loader=loader).options.model_dump()
    with pytest.raises(ValueError, match="needs held-out data: a `loader`.*RunContext"):
        TestAccuracy()
    with pytest.raises(ValueError, match="`loader` or `dataset`, not both"):
        TestAccuracy(loader=loader, dataset="digits")
    with pytest.raises(ValueError, match="(?i)unknown dataset"):
        TestAccuracy(dataset="imagenet-42")
    with pytest.raises(ValueError, match="use `dataset`"):
        TestAccuracy(loader="data/test")
    with pytest.raises(ValueError, match="re-iterable"):
        TestAccuracy(loader=iter(loader))
    with pytest.raises(ValueError):
        TestAccuracy(dataset="digits", max_batches=0)


# ------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize(("window", "subsample"), [(3, 1), (50, 1), (2, 2)])
def test_loss_and_running_mean(window: int, subsample: int) -> None:
    model = make_model()
    outputs = Outputs(model)
    x, y = make_data(32, seed=1)
    sub = Loss(window=window, subsample=subsample)
    assert sub.output_topics() == ["loss/loss", "loss/loss/running_mean"]
    backend = MemoryBackend()
    steps = 7
    train_steps(model, [sub], steps=steps, inputs=x, targets=y, backend=backend)
    losses = [
        float(nn.functional.cross_entropy(torch.from_numpy(scores), y)) for scores in outputs.values
    ]
    observed: list[float] = []
    for step in range(steps):
        if step % subsample:
            assert not [r for r in backend.scalars if r.step == step]
            continue
        observed.append(losses[step])
        assert backend.scalar("loss/loss", step) == pytest.approx(losses[step], rel=1e-6)
        assert backend.scalar("loss/loss/running_mean", step) == pytest.approx(
            np.mean(observed[-window:]), rel=1e-6
        )
    assert Loss().options.window == 50
    with pytest.raises(ValueError):
        Loss(window=0)


def test_dataset_names_need_ikkuna_train(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dataset` is a soft dependency on ikkuna-train: without it the error says so."""
    monkeypatch.setitem(sys.modules, "ikkuna_train", None)  # import raises ImportError
    monkeypatch.delitem(sys.modules, "ikkuna_train.data", raising=False)
    with pytest.raises(ValueError, match=r"`dataset` option needs the ikkuna-train distribution"):
        TestAccuracy(dataset="digits")
    loader = [(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))]
    assert TestAccuracy(loader=loader).loader is loader  # a loader needs nothing else
