"""The Lightning integration with a real ``lightning.Trainer`` on the CPU: the callback
watches a LightningModule whose ``training_step`` calls a submodule (``self.net(x)``), the
published gradients are the ones Lightning's ``gradient_clip_val`` clipped, forward topics and
the loss come from the training step, epochs end, and the Exporter is closed at the end of
``fit`` and when training raises; the TensorBoard file is read back."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated")  # Lightning's own

from ikkuna_core.integrations.lightning import IkkunaCallback  # noqa: E402

CPU = torch.device("cpu")


class Classifier(L.LightningModule):
    """Records, independently of Ikkuna, what each training step saw: the batch, the loss,
    the output of ``net.2`` and the gradients after Lightning's clipping."""

    def __init__(self, fail_at: int | None = None, own_forward: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
        self.fail_at = fail_at
        self.own_forward = own_forward
        self.batches: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.clipped: list[dict[str, torch.Tensor]] = []
        self.totals: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("boom in training_step")
        x, y = batch
        # by default not self(x): the LightningModule's own forward never runs
        out = self(x) if self.own_forward else self.net(x)
        loss = nn.functional.cross_entropy(out, y)
        self.batches.append(x.clone())
        self.outputs.append(out.detach().clone())
        self.losses.append(loss.detach().clone())
        return loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None):
        squares = sum(float(p.grad.pow(2).sum()) for p in self.parameters())
        self.totals.append(math.sqrt(squares))
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.clipped.append({n: p.grad.detach().clone() for n, p in self.named_parameters()})


class RecordWith(L.Callback):
    """Registers a recording subscriber on the IkkunaCallback's bus once fit has started."""

    def __init__(self, ikkuna: IkkunaCallback, recorder) -> None:
        self.ikkuna, self.recorder = ikkuna, recorder
        self.hooks_during_fit = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.ikkuna.exporter.bus.register_subscriber(self.recorder)
        self.hooks_during_fit = self.ikkuna.exporter.hook_count


def _loader(n: int = 16, batch_size: int = 4):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 6, generator=g),
                                          torch.randint(0, 4, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def _trainer(callbacks, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kw,
    )


def _config(log_dir) -> dict:
    return {
        "plugins": ["norms"], "backends": ["tensorboard"], "log_dir": str(log_dir),
        "on_error": "raise",
        "subscribers": [{"name": "norm", "topics": ["weight_gradients"]}],
    }


def _scalars(log_dir) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


TOPICS = ["weight_gradients", "bias_gradients", "activations", "input_data", "loss",
          "epoch_finished"]


@pytest.mark.parametrize("own_forward", [False, True], ids=["self.net(x)", "self(x)"])
def test_trainer_with_the_callback_publishes_what_the_training_step_did(
    own_forward, tmp_path, installed_plugins, recorder_cls, hook_state
):
    module = Classifier(own_forward=own_forward)
    before = hook_state(module)
    ikkuna = IkkunaCallback(config=_config(tmp_path))
    recorder = recorder_cls(topics=TOPICS)
    record = RecordWith(ikkuna, recorder)
    clip = 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # e.g. "never ran a training forward"
        _trainer([ikkuna, record], max_steps=6, gradient_clip_val=clip).fit(module, _loader())
    assert record.hooks_during_fit > 0
    assert ikkuna.exporter is None and hook_state(module) == before  # closed at fit end
    seen = recorder.seen
    steps = sorted({s for t, _, s in seen if t == "weight_gradients"})
    assert steps == list(range(6)) and len(module.clipped) == 6
    for step in steps:
        assert module.totals[step] > 2 * clip  # Lightning did clip
        squares = 0.0
        for name, grad in module.clipped[step].items():
            owner, kind = name.rsplit(".", 1)
            topic = "weight_gradients" if kind == "weight" else "bias_gradients"
            published = seen[(topic, owner, step)]
            assert torch.equal(published, grad), (step, name)
            squares += float(published.pow(2).sum())
        assert math.sqrt(squares) == pytest.approx(clip, rel=1e-4)
        torch.testing.assert_close(seen[("activations", "net.2", step)], module.outputs[step])
        assert torch.equal(seen[("input_data", None, step)], module.batches[step])
        torch.testing.assert_close(seen[("loss", None, step)], module.losses[step])
    # 4 batches per epoch: epoch 0 ends after step 3; max_steps ends fit during epoch 1
    assert next(s for t, _, s in recorder.order if t == "epoch_finished") == 3
    written = _scalars(tmp_path)
    for step in steps:
        expected = float(module.clipped[step]["net.0.weight"].norm())
        assert written[("norm/weight_gradients/net.0", step)] == pytest.approx(expected, rel=1e-5)


def test_accumulated_batches_make_one_step_with_the_full_gradient(
    tmp_path, installed_plugins, recorder_cls
):
    module = Classifier()
    ikkuna = IkkunaCallback(config={**_config(tmp_path), "backends": []})
    recorder = recorder_cls(topics=["weight_gradients", "input_data", "loss"])
    grads: list[torch.Tensor] = []

    class Grads(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            grads.append(pl_module.net[0].weight.grad.clone())

    _trainer([ikkuna, RecordWith(ikkuna, recorder), Grads()], max_steps=3,
             accumulate_grad_batches=2).fit(module, _loader(n=24))
    assert len(grads) == 3 and len(module.batches) == 6
    for step in range(3):
        assert torch.equal(recorder.seen[("weight_gradients", "net.0", step)], grads[step])
        # the step's forward topics come from its first micro-batch
        assert torch.equal(recorder.seen[("input_data", None, step)], module.batches[2 * step])
        # the loss Lightning differentiates: the step's first micro-batch's loss (recorded by
        # the module itself) divided by accumulate_grad_batches
        torch.testing.assert_close(recorder.seen[("loss", None, step)],
                                   module.losses[2 * step] / 2)


def test_an_exception_in_training_closes_the_exporter(
    tmp_path, installed_plugins, hook_state
):
    module = Classifier(fail_at=2)
    before = hook_state(module)
    ikkuna = IkkunaCallback(config=_config(tmp_path))
    with pytest.raises(RuntimeError, match="boom in training_step"):
        _trainer([ikkuna], max_steps=6).fit(module, _loader())
    assert ikkuna.exporter is None and hook_state(module) == before
    written = _scalars(tmp_path)  # what was published before the error is on disk
    assert {s for (tag, s) in written if tag == "norm/weight_gradients/net.0"} == {0, 1}
