"""Where Cockpit cannot run (in-place ReLU, LayerNorm, a tiny GPT-2: BackPACK refuses them),
gradstats' values equal those computed from explicit per-sample gradients
(``torch.func.vmap(grad)``) with Cockpit's formulas; a sum-reduced loss gives the values of
the mean-reduced one; layers it cannot cover are named, never silently left out."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import ikkuna_core as ik
from ikkuna_core.testing import MemoryBackend
from ikkuna_gradstats import EarlyStopping, InnerTest, MeanGSNR, NormTest, OrthoTest, persample

NAMES = ("norm_test", "inner_test", "ortho_test", "mean_gsnr", "early_stopping")


def reference(per_sample: dict[str, torch.Tensor], eps: float = 1e-5) -> dict[str, float]:
    """Cockpit's definitions from per-sample gradients g_n of the mean-reduced batch loss."""
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in per_sample.values()], 1).double()
    b = flat.shape[0]
    g = flat.sum(0)
    g2 = g.square().sum()
    l2 = flat.square().sum(1)
    proj = b * (flat @ g)
    sgs = flat.square().sum(0)
    var_l1 = (b**2 * l2.sum() - b * g2) / (b - 1)
    out = {
        "norm_test": (var_l1 / b / g2).sqrt(),
        "inner_test": (((proj.square().sum() - b * g2**2) / (b - 1)) / b / g2**2).sqrt(),
        "ortho_test": (((b**2 * l2.sum() - (proj.square() / g2).sum()) / (b - 1)) / b / g2).sqrt(),
        "mean_gsnr": (g.square() / (b * sgs - g.square() + eps)).mean(),
        "early_stopping": 1 - b * (g.square() / ((b**2 * sgs - b * g.square()) / (b - 1) + eps)
                                   ).mean(),
    }
    return {k: float(v) for k, v in out.items()}


def vmap_grads(model: nn.Module, loss_of, x: torch.Tensor, y: torch.Tensor | None,
               params: list[str]) -> dict[str, torch.Tensor]:
    """Per-sample gradients of sample n's share of the mean batch loss (1/B of its own loss)."""
    all_params = {k: v.detach() for k, v in model.named_parameters()}
    chosen = {k: all_params[k] for k in params}

    def single(p, xn, yn):
        merged = {**all_params, **p}
        out = functional_call(model, merged, (xn.unsqueeze(0),))
        return loss_of(out, None if yn is None else yn.unsqueeze(0))

    ys = y if y is not None else x
    grads = vmap(grad(single), in_dims=(None, 0, 0))(chosen, x, ys)
    return {k: v / x.shape[0] for k, v in grads.items()}


def watch(model: nn.Module, loss_fn=None, include=None):
    exporter = ik.Exporter(include=include, bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    if loss_fn is not None:
        loss_fn = exporter.set_loss(loss_fn)
    for sub in (NormTest(), InnerTest(), OrthoTest(), MeanGSNR(), EarlyStopping()):
        exporter.bus.register_subscriber(sub)
    return exporter, loss_fn, exporter.bus.add_backend(MemoryBackend())


def _check(mem: MemoryBackend, step: int, expected: dict[str, float]) -> None:
    for name in NAMES:
        assert mem.scalar(name, step) == pytest.approx(expected[name], rel=1e-4), (name, step)


class Residual(nn.Module):
    """In-place ReLU, LayerNorm over (B, T, D), a Linear called twice, and a Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding="same")
        self.proj = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.relu = nn.ReLU(inplace=True)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(3 * 4 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv(x))  # (B, 3, 4, 4)
        h = self.proj(h.reshape(x.shape[0], 3 * 4, 4))  # (B, T=12, 6)
        h = self.relu(self.norm(h))
        h = self.mix(self.mix(h)) + h  # called twice: its calls' positions together
        return self.head(h.reshape(x.shape[0], -1))


def test_inplace_relu_layernorm_and_repeated_calls_equal_a_per_sample_loop() -> None:
    torch.manual_seed(0)
    model = Residual()
    exporter, loss_fn, mem = watch(model, nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    g = torch.Generator().manual_seed(1)
    names = [n for n, _ in model.named_parameters()]
    reference_model = Residual()
    for step in range(3):
        x, y = torch.randn(7, 1, 4, 4, generator=g), torch.randint(0, 5, (7,), generator=g)
        reference_model.load_state_dict(model.state_dict())
        reference_model.relu.inplace = False  # vmap reference: the same function
        per_sample = vmap_grads(reference_model, nn.functional.cross_entropy, x, y, names)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        _check(mem, step, reference(per_sample))
    exporter.close()


@pytest.mark.parametrize("need_sgs", [False, True], ids=["gram", "dense"])
def test_sequence_linear_gram_and_dense_paths_agree_with_the_loop(need_sgs: bool) -> None:
    """The two ways of a sequence layer's per-sample norms (Gram matrices; per-sample
    gradients a chunk at a time, chunks of 1 sample here) give the loop's values."""
    torch.manual_seed(0)
    lin = nn.Linear(9, 7)
    x = torch.randn(5, 3, 9)
    out = lin(x)
    d = torch.randn_like(out) / 5
    layer = persample.prepare_layer("lin", lin, [x], [d], 1.0)
    old = persample.DENSE_BUDGET
    persample.DENSE_BUDGET = 1 if need_sgs else old
    try:
        stats = persample.StepStats([layer], need_sgs=need_sgs)
    finally:
        persample.DENSE_BUDGET = old
    gw = torch.einsum("bto,bti->boi", d, x)
    gb = d.sum(1)
    flat = torch.cat([gw.reshape(5, -1), gb], 1)
    torch.testing.assert_close(stats.l2, flat.square().sum(1))
    torch.testing.assert_close(stats.dot, flat @ flat.sum(0))
    torch.testing.assert_close(stats.grads[("lin", "weight")], gw.sum(0))
    if need_sgs:
        torch.testing.assert_close(stats.sgs[("lin", "weight")], gw.square().sum(0))


def test_a_sum_reduced_loss_gives_the_mean_reduced_values() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    exporter, loss_fn, mem = watch(model, nn.CrossEntropyLoss(reduction="sum"))
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    names = [n for n, _ in model.named_parameters()]
    with exporter.silenced():  # the reference's forwards are no training step
        per_sample = vmap_grads(model, nn.functional.cross_entropy, x, y, names)
    loss_fn(model(x), y).backward()
    exporter.close()
    _check(mem, 0, reference(per_sample))


def test_tiny_gpt2_conv1d_and_layernorm_equal_a_per_sample_loop() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    config = transformers.GPT2Config(
        vocab_size=40, n_positions=8, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, eos_token_id=0, bos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    # The embeddings (and the output layer that shares wte) are not covered: watch the rest
    exporter, _, mem = watch(model, include=(nn.LayerNorm, Conv1D))
    ids = torch.randint(0, 40, (4, 8), generator=torch.Generator().manual_seed(2))
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, Conv1D))]
    params = [f"{n}.{p}" for n in names for p in ("weight", "bias")]

    def lm_loss(out, labels):
        return model.loss_function(out.logits, labels, vocab_size=config.vocab_size)

    with exporter.silenced():
        per_sample = vmap_grads(model, lm_loss, ids, None, params)
    model(ids, labels=ids).loss.backward()
    exporter.close()
    _check(mem, 0, reference(per_sample))


@pytest.mark.parametrize(
    "model, message",
    [
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
         r"'1': BatchNorm1d is not supported"),
        (nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)), r"'0': Embedding is not supported"),
        (nn.Sequential(nn.Conv2d(2, 2, 1, groups=2), nn.Flatten(), nn.Linear(8, 2)),
         r"'0': Conv2d with groups=2"),
    ],
    ids=["batchnorm", "embedding", "groups"],
)
def test_a_layer_it_cannot_cover_is_named(model: nn.Module, message: str) -> None:
    exporter = ik.Exporter(bus=ik.MessageBus(on_error="raise"))
    exporter.set_model(model)
    exporter.bus.register_subscriber(NormTest())
    x = torch.randint(0, 10, (4, 2)) if isinstance(model[0], nn.Embedding) else (
        torch.randn(4, 2, 2, 2) if isinstance(model[0], nn.Conv2d) else torch.randn(4, 3))
    with pytest.raises(ik.SubscriberError, match=message):
        model(x).sum().backward()
        exporter.close()
