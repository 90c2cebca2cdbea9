"""Distributed training with Ikkuna, for real: two ``gloo`` processes on 127.0.0.1
(tests/distributed_worker.py), on the CPU.

- DDP: the published gradient is the all-reduced ``p.grad`` (equal to the ranks' local
  gradients averaged by hand), module names carry no ``module.``, only rank 0 writes by
  default, and ``ranks = "all"`` writes each rank to ``<log_dir>/rank<r>``.
- FSDP2 (``fully_shard``): parameters are DTensor shards; a subscriber that does not merge
  shards (the default, ``sharded = "gather"``) receives the full parameter (its gradient,
  its update), and norms (merged from the shards) are of the whole parameter, never of one
  rank's shard. tests/test_distributed_sharded.py bounds what that costs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

WORKER = Path(__file__).with_name("distributed_worker.py")
KEYS = {"0", "2", "4"}


@pytest.fixture(scope="module")
def ranks(
    tmp_path_factory: pytest.TempPathFactory, run_ranks: Any
) -> tuple[Path, list[dict[str, Any]]]:
    """Run the two processes once for every test of this module; (out dir, per-rank
    results)."""
    out = tmp_path_factory.mktemp("distributed")
    return out, run_ranks(WORKER, out)


def _scalars(log_dir: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def test_ddp_publishes_the_all_reduced_gradient_on_every_rank(ranks):
    _, results = ranks
    for rank, result in enumerate(results):
        for mode in ("rank0", "all"):
            run = result["ddp"][mode]
            keys = {key for _, key, _ in run["seen"]}
            assert keys == KEYS  # names of the wrapped model: no "module." prefix
            for step, ref in enumerate(run["steps"]):
                for name, grad in ref["grads"].items():
                    key, kind = name.split(".")
                    if kind != "weight":
                        continue
                    published = run["seen"][("weight_gradients", key, step)]
                    assert torch.equal(published, grad), (rank, mode, step, name)
                    torch.testing.assert_close(published, ref["averaged"][name])
                    assert not torch.allclose(published, ref["local"][name])
    # the all-reduced gradient is the same on both ranks
    for step in range(2):
        for key in KEYS:
            ident = ("weight_gradients", key, step)
            assert torch.equal(results[0]["ddp"]["rank0"]["seen"][ident],
                               results[1]["ddp"]["rank0"]["seen"][ident])


def _assert_gradient_norms(
    written: dict[tuple[str, int], float], seen: dict[tuple[str, str, int], torch.Tensor]
) -> None:
    """Every written ``norm/weight_gradients/<key>`` value is the norm of the gradient the
    rank's recorder saw at that step (after the all-reduce)."""
    for (tag, step), value in written.items():
        key = tag.rsplit("/", 1)[1]
        assert value == pytest.approx(float(seen[("weight_gradients", key, step)].norm()),
                                      rel=1e-5)


def test_ddp_only_rank_zero_writes_by_default(ranks):
    out, results = ranks
    assert results[0]["ddp"]["rank0"]["backends"] == ["TensorBoardBackend"]
    assert results[1]["ddp"]["rank0"]["backends"] == []
    assert sorted(p.name for p in (out / "rank0").iterdir() if p.is_dir()) == []
    written = _scalars(out / "rank0")
    seen = results[0]["ddp"]["rank0"]["seen"]
    assert {tag for tag, _ in written} == {f"norm/weight_gradients/{k}" for k in KEYS}
    _assert_gradient_norms(written, seen)


def test_ddp_ranks_all_writes_each_rank_to_its_own_directory(ranks):
    out, results = ranks
    assert sorted(p.name for p in (out / "all").iterdir()) == ["rank0", "rank1"]
    for rank in range(2):
        assert results[rank]["ddp"]["all"]["backends"] == ["TensorBoardBackend"]
        written = _scalars(out / "all" / f"rank{rank}")
        seen = results[rank]["ddp"]["all"]["seen"]
        assert len(written) == 2 * len(KEYS)
        _assert_gradient_norms(written, seen)


def test_fsdp2_publishes_full_parameters_never_shards(ranks):
    _, results = ranks
    for result in results:
        run = result["fsdp"]
        assert {key for _, key, _ in run["seen"]} == KEYS
        for step, ref in enumerate(run["steps"]):
            for name, grad in ref["grads"].items():
                key, kind = name.split(".")
                if kind != "weight":
                    continue
                published = run["seen"][("weight_gradients", key, step)]
                assert published.shape == grad.shape  # the whole parameter, not a shard
                assert ref["shard"][name].shape[0] < grad.shape[0]
                assert torch.equal(published, grad)
                torch.testing.assert_close(published, ref["averaged"][name])
                torch.testing.assert_close(run["seen"][("weight_updates", key, step)],
                                           ref["after"][name] - ref["before"][name])
                assert torch.equal(run["seen"][("weights", key, step)], ref["after"][name])
                # the norm of the full gradient (sum of the shards' squares), on every rank
                assert run["norms"][(f"norm/weight_gradients/{key}", step)] == pytest.approx(
                    float(ref["averaged"][name].norm()), rel=1e-5
                )
