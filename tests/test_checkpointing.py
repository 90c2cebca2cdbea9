"""Activation checkpointing (``torch.utils.checkpoint``, reentrant and not): the forward
recomputed inside the backward is no call of the modules, so it publishes nothing and no
``name#1`` key; ``activations``, ``layer_gradients`` and ``inputs`` equal those of the same
model trained without checkpointing (whose layer gradients are checked here against
``retain_grad`` on the modules' outputs). With reentrant checkpointing the step's forward
runs under ``no_grad``: the layer gradients are taken in the recomputation. FSDP2 with
checkpointed blocks runs on two real gloo processes."""

from __future__ import annotations

import functools
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

import ikkuna_core as ik

TOPICS = ["activations", "layer_gradients", "inputs", "weight_gradients"]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class TwiceBlock(Block):
    """A block that calls its ``fc`` twice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(self.act(self.fc(x))))


class Net(nn.Module):
    """A stem, two blocks (each checkpointed when ``reentrant`` is not None; ``shared``: the
    same block twice, a module really called twice; ``twice``: blocks that call their
    modules twice) and a head."""

    def __init__(self, reentrant: bool | None, shared: bool = False, twice: bool = False
                 ) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.stem = nn.Linear(6, 6)
        self.b1 = TwiceBlock() if twice else Block()
        self.b2 = self.b1 if shared else TwiceBlock() if twice else Block()
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in (self.b1, self.b2):
            if self.reentrant is None:
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.reentrant)
        return self.head(x)


def _train(
    model: nn.Module, recorder_cls: Any, steps: int = 2, whole: bool | None = None
) -> Any:
    """Train ``model`` watched (``whole``: the whole model's forward checkpointed, reentrant
    or not); the recorder."""
    exporter = ik.Exporter(model, nn.CrossEntropyLoss(), bus=ik.MessageBus(on_error="raise"))
    rec = recorder_cls(topics=TOPICS)
    exporter.subscribe(rec)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 6, generator=g, requires_grad=whole is not None)
        y = torch.randint(0, 3, (4,), generator=g)
        opt.zero_grad()
        out = model(x) if whole is None else checkpoint(model, x, use_reentrant=whole)
        exporter.loss_fn(out, y).backward()
        opt.step()
    exporter.close()
    return rec


def _assert_same(got: dict, expected: dict) -> None:
    assert sorted(got, key=str) == sorted(expected, key=str)
    for ident, value in expected.items():
        torch.testing.assert_close(got[ident], value, msg=str(ident))


def _output_grads(model: Net) -> dict[str, torch.Tensor]:
    """The gradient of each module's output at the first step, by ``retain_grad``."""
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        outputs[name] = out

    for name, module in model.named_modules():
        if name and not list(module.children()):
            module.register_forward_hook(functools.partial(keep, name))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()
    return {name: out.grad for name, out in outputs.items() if out.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_blocks_publish_what_the_plain_model_does(
    reentrant: bool, recorder_cls: Any
) -> None:
    torch.manual_seed(0)
    plain = Net(None)
    torch.manual_seed(0)
    reference = Net(None)
    torch.manual_seed(0)
    checkpointed = Net(reentrant)
    expected = _train(plain, recorder_cls).seen
    got = _train(checkpointed, recorder_cls).seen
    assert not any("#" in str(key) for _, key, _ in got)
    _assert_same(got, expected)
    grads = _output_grads(reference)
    assert set(grads) == {"stem", "b1.fc", "b1.act", "b2.fc", "b2.act", "head"}
    for name, grad in grads.items():
        torch.testing.assert_close(got[("layer_gradients", name, 0)], grad, msg=name)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("where", ["two segments", "one segment"])
def test_a_module_called_twice_keeps_both_calls_under_checkpointing(
    reentrant: bool, where: str, recorder_cls: Any
) -> None:
    """The same block in two checkpointed segments, or a module called twice inside one
    segment: each call keeps its own values (reentrant: each recomputed call is matched to
    the call it repeats)."""
    shape = {"shared": True} if where == "two segments" else {"twice": True}
    torch.manual_seed(0)
    expected = _train(Net(None, **shape), recorder_cls).seen
    torch.manual_seed(0)
    got = _train(Net(reentrant, **shape), recorder_cls).seen
    assert ("layer_gradients", "b1.fc#1", 0) in expected
    assert not any("#2" in str(key) for _, key, _ in got)
    _assert_same(got, expected)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_a_checkpointed_whole_model_counts_one_forward_per_step(
    reentrant: bool, recorder_cls: Any
) -> None:
    """The model's own forward pre-hook runs again in the recomputation: no forward of the
    step. Reentrant checkpointing runs the step's forward under no_grad, which is an
    evaluation forward to the Exporter: the step publishes its parameter topics only."""
    torch.manual_seed(0)
    plain = _train(Net(None), recorder_cls, steps=3, whole=None).seen
    torch.manual_seed(0)
    got = _train(Net(None), recorder_cls, steps=3, whole=reentrant).seen
    assert {step for _, _, step in got} == {0, 1, 2}
    assert not any("#" in str(key) for _, key, _ in got)
    if reentrant:
        plain = {k: v for k, v in plain.items() if k[0] == "weight_gradients"}
    # the input requires grad here only; values that do not depend on it are the same
    for ident, value in plain.items():
        torch.testing.assert_close(got[ident], value, msg=str(ident))
    assert set(got) == set(plain)


# ------------------------------------------------------------ FSDP2, two gloo ranks
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Seen(ik.Subscriber):
    name = "seen"

    def __init__(self, **options: object) -> None:
        super().__init__(**options)
        self.seen: dict[tuple[str, str | None, int], torch.Tensor] = {}

    def compute(self, bundle: ik.MessageBundle) -> None:
        for topic in bundle.topics:
            data = bundle[topic]
            if data is not None:
                full = data.full_tensor() if hasattr(data, "full_tensor") else data
                self.seen[(topic, bundle.key, bundle.global_step)] = full.detach().clone()


class _Sharded(nn.Module):
    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.checkpointed = checkpointed
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return self.head(x)


def _fsdp_run(rank: int, checkpointed: bool) -> dict:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = _Sharded(checkpointed)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    exporter = ik.Exporter(model, nn.CrossEntropyLoss(), bus=ik.MessageBus(on_error="raise"))
    rec = _Seen(topics=TOPICS)
    exporter.subscribe(rec)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        g = torch.Generator().manual_seed(10 * step + rank)
        x = torch.randn(4, 6, generator=g, requires_grad=True)
        y = torch.randint(0, 3, (4,), generator=g)
        opt.zero_grad()
        exporter.loss_fn(model(x), y).backward()
        opt.step()
    exporter.close()
    return rec.seen


def _fsdp_worker(rank: int, port: int, results: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        results[rank] = {"plain": _fsdp_run(rank, False), "checkpointed": _fsdp_run(rank, True)}
    finally:
        dist.destroy_process_group()


def test_fsdp2_with_checkpointed_blocks_publishes_what_the_plain_run_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    # the spawned ranks unpickle _fsdp_worker as tests.test_checkpointing: they get this
    # process's sys.path, which must hold the repository root whatever directory pytest
    # was started from (a nox session's is not it)
    # (set directly: monkeypatch.syspath_prepend also asks pkg_resources to fix namespace
    # packages up, which fails where setuptools ships no pkg_resources)
    monkeypatch.setattr(sys, "path", [str(Path(__file__).resolve().parents[1]), *sys.path])
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_fsdp_worker, args=(_free_port(), results), nprocs=2, join=True)
        runs = dict(results)
    for rank in range(2):
        plain, checkpointed = runs[rank]["plain"], runs[rank]["checkpointed"]
        assert {t for t, _, _ in plain} == set(TOPICS)
        assert ("layer_gradients", "blocks.1.fc", 1) in plain
        assert not any("#" in str(key) for _, key, _ in checkpointed)
        _assert_same(checkpointed, plain)


@pytest.mark.parametrize("skip_side_effects", [True, False], ids=["skip-flag", "no-flag"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_compiled_checkpointed_blocks_compile_into_one_graph(
    reentrant: bool, skip_side_effects: bool, recorder_cls: Any
) -> None:
    """Under torch.compile the checkpoint is one higher-order op, recomputed in the compiled
    backward. The hooks traced into it have no Python side effect (the op
    ``ikkuna::module_forward`` does the bookkeeping, and its recomputation stashes nothing):
    with or without dynamo's ``skip_fwd_side_effects_in_bwd_under_checkpoint`` the model
    compiles into one graph, with no break, and publishes the eager values of the model
    without checkpointing."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    expected = _train(Net(None), recorder_cls, steps=3).seen
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Net(reentrant)
    flag = {"skip_fwd_side_effects_in_bwd_under_checkpoint": skip_side_effects}
    with torch._dynamo.config.patch(**flag):
        got = _train(torch.compile(model, backend="aot_eager"), recorder_cls, steps=3).seen
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    _assert_same(got, expected)
    torch._dynamo.reset()
