"""A small GPT on CPU ranks with FSDP2, activation checkpointing and torch.compile, watched.

    python examples/gpt_fsdp.py [--steps 20] [--ranks 2] [--backend aot_eager] \\
        [--log-dir runs/gpt_fsdp] [--overwrite]
    tensorboard --logdir runs/gpt_fsdp

The torchtitan-style stack, small enough for a laptop. A GPT (token and position embeddings;
4 blocks of LayerNorm, causal self-attention, LayerNorm, MLP; a final LayerNorm; a linear
head: 210,304 parameters) learns a synthetic language made here from a seed (a random Markov
chain over 64 tokens; nothing is downloaded). ``--ranks`` processes on 127.0.0.1 (``gloo``,
``torch.multiprocessing.spawn``) each take their contiguous share of every global batch.

- FSDP2: ``fully_shard`` on each block, then on the root.
- Activation checkpointing: each block's forward is ``torch.utils.checkpoint.checkpoint(...,
  use_reentrant=False)`` of its body, called in ``Block.forward``. Not torch's
  ``checkpoint_wrapper``: that renames every module inside (``blocks.0._checkpoint_wrapped_
  module.attn.qkv``), so the curves would not carry the model's own names.
- torch.compile (``--backend``, ``none`` for eager): each block is compiled in place
  (``block.compile()``, as torchtitan does), not the whole model: FSDP2's hooks are
  ``torch._dynamo.disable``-d, so a compiled root forward breaks at each block's call inside
  its loop, and dynamo then runs the whole root forward eagerly. The checkpoint is inside the
  compiled block, traced as one higher-order op whose recomputation is part of the compiled
  backward (Ikkuna's hooks traced into it have no Python side effect to replay: no dynamo
  flag is needed).

Ikkuna (``ik.watch`` of the sharded model, with ``ikkuna_config`` below) publishes norms and
histograms of the weights, their gradients and their updates, and norms of the activations.
The parameter statistics are computed on each rank's shard and merged across the ranks, no
parameter gathered: they are those of the whole parameters, equal to a single-process run of
the same model on the whole batch without FSDP, compile or checkpointing
(tests/test_example_gpt_fsdp.py checks it). Activations are each rank's own share of the batch
(rank 0's are written). Rank 0 writes the TensorBoard log and ``summary.json`` (the loss of
the global batch per step, and what dynamo compiled).

What compiling costs with Ikkuna watching: nothing more than without it. The 4 blocks share
one graph, watched as unwatched (the hooks traced into a block are the same for every module:
they name the module by a tensor, and an op does the bookkeeping eagerly), compiled at the
first step, never again, no graph break; ``summary.json`` says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import ikkuna_core as ik


@dataclass(frozen=True)
class GPTConfig:
    """The model's sizes (the defaults: 210,304 parameters)."""

    vocab: int = 64
    context: int = 32  # tokens per sequence
    width: int = 64
    heads: int = 4
    layers: int = 4


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, tokens, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, tokens, width))


class Block(nn.Module):
    """Pre-norm transformer block; with ``checkpointed``, its forward is recomputed in the
    backward instead of keeping its activations."""

    def __init__(self, cfg: GPTConfig, checkpointed: bool = False) -> None:
        super().__init__()
        self.checkpointed = checkpointed
        self.ln1 = nn.LayerNorm(cfg.width)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(), nn.Linear(4 * cfg.width, cfg.width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed:
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Embeddings, ``cfg.layers`` blocks (each recomputed in the backward when
    ``checkpointed``), a final LayerNorm and a linear head; returns the logits."""

    def __init__(self, cfg: GPTConfig, checkpointed: bool = False) -> None:
        super().__init__()
        self.tokens = nn.Embedding(cfg.vocab, cfg.width)
        self.positions = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg, checkpointed) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tokens(idx) + self.positions(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build_model(cfg: GPTConfig, seed: int, checkpointed: bool = False) -> GPT:
    """The same initial weights wherever it is built with the same seed (every rank, and a
    single-process run to compare with)."""
    torch.manual_seed(seed)
    return GPT(cfg, checkpointed)


def global_batch(cfg: GPTConfig, seed: int, step: int, size: int) -> tuple[torch.Tensor, ...]:
    """``size`` sequences of step ``step`` (inputs and next-token targets) of a synthetic
    language: a random Markov chain, each token followed by one of its 3 successors (a loss
    of log 3 = 1.10 is the best possible)."""
    chain = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, cfg.vocab, (cfg.vocab, 3), generator=chain)
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    seq = torch.empty(size, cfg.context + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(0, cfg.vocab, (size,), generator=g)
    for t in range(cfg.context):
        pick = torch.randint(0, 3, (size,), generator=g)
        seq[:, t + 1] = successors[seq[:, t], pick]
    return seq[:, :-1], seq[:, 1:]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean next-token cross entropy over every token of the batch."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW (on the sharded parameters under FSDP2: each rank updates its shard)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


def ikkuna_config(log_dir: str | Path, bins: int = 32) -> dict[str, Any]:
    """What Ikkuna watches: norms of weights, gradients, updates and activations; histograms
    of weights, gradients and updates (``max_samples = 0``: every entry, the same counts
    whatever the sharding)."""
    params = ["weights", "weight_gradients", "weight_updates"]
    return {
        "plugins": ["norms", "histograms"],
        "backends": ["tensorboard"],
        "log_dir": str(log_dir),
        "subscribers": [
            {"name": "norm", "topics": [*params, "activations"]},
            {"name": "histogram", "topics": params, "bins": bins, "max_samples": 0},
        ],
    }


def shard(rank: int, world: int, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """This rank's contiguous share of the global batch."""
    return [t.chunk(world)[rank] for t in tensors]


def shard_and_compile(model: GPT, backend: str) -> GPT:
    """FSDP2 on each block, then on the root; each block compiled in place.

    Each block, not the whole model, is compiled (as torchtitan does): FSDP2's hooks are
    ``torch._dynamo.disable``-d, so a compiled root forward breaks at every block's call, in
    a loop, where dynamo gives up the whole frame and runs it eagerly. ``Module.compile()``
    keeps the module names. The checkpoint is inside the compiled block, one higher-order op
    whose recomputation is part of the compiled backward."""
    from torch.distributed.fsdp import fully_shard

    if backend != "none":
        for block in model.blocks:
            block.compile(backend=backend)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def train(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    """One rank: its share of each global batch, ``args.steps`` steps of AdamW."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        cfg = GPTConfig()
        model = shard_and_compile(build_model(cfg, args.seed, checkpointed=True), args.backend)
        exporter = ik.watch(model, config=ikkuna_config(args.log_dir), overwrite=args.overwrite)
        optimizer = make_optimizer(model, args.lr)
        losses, graphs = [], []
        for step in range(args.steps):
            x, y = shard(rank, world, *global_batch(cfg, args.seed, step, args.batch_size))
            optimizer.zero_grad(set_to_none=True)
            loss = lm_loss(model(x), y)
            loss.backward()
            optimizer.step()
            total = loss.detach().clone()
            dist.all_reduce(total)  # for printing: the mean over the global batch
            losses.append(float(total) / world)
            graphs.append(_compiler_stats()["unique_graphs"])
            if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
                print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)
        exporter.close()
        if rank == 0:
            stats = {**_compiler_stats(), "graphs_after_each_step": graphs}
            summary = {"losses": losses, "config": asdict(cfg), "compiler": stats}
            Path(args.log_dir, "summary.json").write_text(json.dumps(summary, indent=1))
            print(f"TensorBoard log in {args.log_dir}; compiler: {stats}")
    finally:
        dist.destroy_process_group()


def _compiler_stats() -> dict[str, Any]:
    """What dynamo did in this process: graphs compiled, graph breaks by reason, frames."""
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": dict(counters["graph_break"]),
        "frames": dict(counters["frames"]),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ranks", type=int, default=2, help="processes (gloo, CPU)")
    parser.add_argument("--backend", default="aot_eager",
                        help="torch.compile backend (aot_eager, inductor, ...); none: eager")
    parser.add_argument("--log-dir", default="runs/gpt_fsdp")
    parser.add_argument("--overwrite", action="store_true", help="replace a run in --log-dir")
    parser.add_argument("--batch-size", type=int, default=8, help="global: all ranks together")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.ranks < 1:
        parser.error(f"--ranks must be 1 or more, got {args.ranks}")
    if args.batch_size % args.ranks:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of --ranks {args.ranks}")
    if not args.overwrite and any(Path(args.log_dir).glob("events.out.tfevents.*")):
        parser.error(f"--log-dir {args.log_dir} already holds a run: give another, or --overwrite")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(train, args=(args.ranks, _free_port(), args), nprocs=args.ranks)


if __name__ == "__main__":
    main()
