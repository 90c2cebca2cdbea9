"""Sharded parameters (FSDP2's ``fully_shard``, tensor parallelism) watched without gathering,
for real: two ``gloo`` processes on 127.0.0.1 started with ``torch.multiprocessing.spawn``
(tests/sharded_worker.py), on the CPU.

Each scenario trains the same model unwatched and watched; the collectives that watching
adds per step are bounded (counted by a dispatch mode, deterministic), and every published
value equals the computation on the full tensor, gathered by the worker itself outside the
counted steps (``full_tensor()``) and computed here with plain torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import ikkuna_core as ik

WORKER = Path(__file__).with_name("sharded_worker.py")
BLOCKS = ("0", "2", "4", "6")  # the FSDP2 model's Linear modules
KIB = 1024


@pytest.fixture(scope="module")
def ranks(
    tmp_path_factory: pytest.TempPathFactory, run_ranks: Any
) -> list[dict[str, Any]]:
    """Every scenario on two ranks, once for the module; per rank, per scenario."""
    return run_ranks(WORKER, tmp_path_factory.mktemp("sharded"), "all", timeout=300)


@pytest.fixture(scope="module")
def failing(
    tmp_path_factory: pytest.TempPathFactory, run_ranks: Any
) -> list[dict[str, Any]]:
    """The worker's scenarios of subscribers failing on rank 1 only (a hang fails it)."""
    return run_ranks(WORKER, tmp_path_factory.mktemp("failing"), "failing", timeout=90)


def _added(watched: dict[str, Any], plain: dict[str, Any]) -> list[tuple[dict[str, int], int]]:
    """Per step: the collectives watching added (by name) and their bytes."""
    out = []
    for mine, base in zip(watched["steps"], plain["steps"], strict=True):
        names = set(mine["calls"]) | set(base["calls"])
        calls = {n: mine["calls"].get(n, 0) - base["calls"].get(n, 0) for n in names}
        out.append(({n: c for n, c in calls.items() if c}, mine["bytes"] - base["bytes"]))
    return out


def _assert_few_collectives(
    watched: dict[str, Any], plain: dict[str, Any], most: int, closing: int = 1
) -> None:
    """At most ``most`` all-reduces added per step, and ``closing`` more at the first (the
    closing rounds of a step whose subscriptions' rounds are not known yet)."""
    for step, (calls, nbytes) in enumerate(_added(watched, plain)):
        assert sum(calls.values()) <= most + (closing if step == 0 else 0), (step, calls)
        if step:
            assert sum(calls.values()) <= most, (step, calls)
        assert set(calls) <= {"c10d.allreduce_"}, (step, calls)  # nothing gathered
        assert nbytes <= 64 * KIB, (step, nbytes)


def _norm(t: torch.Tensor, p: float = 2.0) -> float:
    return float(torch.linalg.vector_norm(t.double(), ord=p))


def test_fsdp2_norms_on_three_topics_add_one_all_reduce_and_equal_the_full_tensors(ranks):
    for result in ranks:
        watched, plain = result["fsdp_norms"], result["fsdp_plain"]
        _assert_few_collectives(watched, plain, most=1)
        written = watched["scalars"]
        assert len(written) == 3 * len(BLOCKS) * len(watched["steps"])
        for step, ref in enumerate(watched["steps"]):
            for key in BLOCKS:
                name = f"{key}.weight"
                update = ref["after"][name] - ref["before"][name]
                expected = {"weights": _norm(ref["after"][name]),
                            "weight_gradients": _norm(ref["grads"][name]),
                            "weight_updates": _norm(update)}
                for topic, value in expected.items():
                    assert written[(f"norm/{topic}/{key}", step)] == pytest.approx(
                        value, rel=1e-5), (topic, key, step)
    # the same values on both ranks: merged, not one rank's shard
    assert ranks[0]["fsdp_norms"]["scalars"] == ranks[1]["fsdp_norms"]["scalars"]


def test_fsdp2_histograms_moments_extremes_zero_fractions_merge_in_three_collectives(ranks):
    for result in ranks:
        watched = result["fsdp_stats"]
        # at step 0 two closing rounds: before ratio (which reads merged results) and at the end
        _assert_few_collectives(watched, result["fsdp_plain"], most=3, closing=2)
        scalars, hists = watched["scalars"], watched["histograms"]
        for step, ref in enumerate(watched["steps"]):
            grads = ref["grads"]
            total = math.sqrt(sum(_norm(g) ** 2 for n, g in grads.items()))
            assert scalars[("global_norm/weight_gradients/bias_gradients", step)] == \
                pytest.approx(total, rel=1e-5)
            for key in BLOCKS:
                w, g = ref["after"][f"{key}.weight"], grads[f"{key}.weight"]
                update = w - ref["before"][f"{key}.weight"]
                assert scalars[(f"mean/weights/{key}", step)] == pytest.approx(
                    float(w.double().mean()), rel=1e-5, abs=1e-9)
                assert scalars[(f"variance/weight_gradients/{key}", step)] == pytest.approx(
                    float(g.double().var()), rel=1e-5)
                assert scalars[(f"norm/weight_updates/{key}", step)] == pytest.approx(
                    float(update.abs().max()), rel=1e-5)
                # a subscriber of merged results runs after their merge
                assert scalars[(f"ratio/norm/weight_updates/mean/weights/{key}", step)] == \
                    pytest.approx(float(update.abs().max() / w.double().mean().abs()), rel=1e-5)
                # ReLU blocks: rows of dead units have exactly zero gradients
                assert scalars[(f"dead_fraction/weight_gradients/{key}", step)] == \
                    pytest.approx(float((g == 0).double().mean()), rel=1e-6)
                for topic, full in (("weights", w), ("weight_gradients", g)):
                    got = hists[(f"histogram/{topic}/{key}", step)]
                    # the single-process computation on the gathered tensor
                    want = ik.ops.histograms([full], bins=16)
                    assert got.counts.tolist() == want.counts[0].tolist(), (topic, key, step)
                    assert got.edges.tolist() == pytest.approx(want.edges[0].tolist(), rel=1e-12)
                    assert (got.min, got.max) == (float(full.min()), float(full.max()))
                    assert got.num == full.numel() and got.nonfinite == 0
                    assert got.sum == pytest.approx(float(full.double().sum()), rel=1e-5,
                                                    abs=1e-6)
                    assert got.sum_squares == pytest.approx(_norm(full) ** 2, rel=1e-5)


def test_a_statistic_of_the_whole_matrix_gathers_only_at_its_own_steps(ranks):
    for result in ranks:
        watched = result["fsdp_spectral"]  # norm every step, spectral_norm every 2nd
        added = _added(watched, result["fsdp_plain"])
        for step, (calls, _) in enumerate(added):
            gathers = calls.get("_c10d_functional.all_gather_into_tensor", 0)
            assert gathers == (len(BLOCKS) if step % 2 == 0 else 0), (step, calls)
            # the norms, merged (and at step 0, the first of the merging subscriptions, the
            # closing round; spectral_norm gathers, it is not one of them)
            assert calls.get("c10d.allreduce_") == (2 if step == 0 else 1), (step, calls)
        for step in (0, 2):
            ref = watched["steps"][step]
            for key in BLOCKS:
                w = ref["after"][f"{key}.weight"]
                sigma = float(torch.linalg.matrix_norm(w.double(), ord=2))
                assert watched["scalars"][(f"spectral_norm/weights/{key}", step)] == \
                    pytest.approx(sigma, rel=1e-3)
        assert ("spectral_norm/weights/0", 1) not in watched["scalars"]


def test_fsdp2_mixed_precision_publishes_the_fp32_sharded_parameters(ranks):
    shards: dict[tuple[str, str, int], list[torch.Tensor]] = {}
    for rank, result in enumerate(ranks):
        watched, plain = result["fsdp_mixed"], result["fsdp_mixed_plain"]
        _assert_few_collectives(watched, plain, most=1)
        gathered = result["fsdp_mixed_gathered"]
        for step, ref in enumerate(watched["steps"]):
            for key in BLOCKS:
                name = f"{key}.weight"
                # the optimizer's parameters and gradients are fp32 (bf16 only in compute)
                assert ref["dtypes"][name] == (torch.float32, torch.float32)
                update = ref["after"][name] - ref["before"][name]
                for topic, full in (("weights", ref["after"][name]),
                                    ("weight_gradients", ref["grads"][name]),
                                    ("weight_updates", update)):
                    assert watched["scalars"][(f"norm/{topic}/{key}", step)] == pytest.approx(
                        _norm(full), rel=1e-5)
                    shard = watched["seen"][("merge_recorder", topic, key, step)]
                    assert shard.dtype == torch.float32
                    rows = -(-full.shape[0] // 2)  # Shard(0): rank 0 holds ceil(rows / 2)
                    assert shard.shape == (rows if rank == 0 else full.shape[0] - rows,
                                           full.shape[1])
                    shards.setdefault((topic, key, step), []).append(shard)
                    if rank == 1:  # the two ranks' shards are the full fp32 tensor
                        torch.testing.assert_close(torch.cat(shards[(topic, key, step)]), full,
                                                   rtol=1e-6, atol=1e-7)
            gref = gathered["steps"][step]
            for key in BLOCKS:
                name = f"{key}.weight"
                full_w = gathered["seen"][("recorder", "weights", key, step)]
                assert full_w.dtype == torch.float32 and torch.equal(full_w, gref["after"][name])
                full_g = gathered["seen"][("recorder", "weight_gradients", key, step)]
                assert full_g.dtype == torch.float32 and torch.equal(full_g, gref["grads"][name])


def test_tensor_parallel_norms_and_histograms_merge_colwise_and_rowwise_shards(ranks):
    for result in ranks:
        watched, plain = result["tp_norms"], result["tp_plain"]
        _assert_few_collectives(watched, plain, most=3)
        scalars, hists = watched["scalars"], watched["histograms"]
        for step, ref in enumerate(watched["steps"]):
            for key in ("0", "2"):  # ColwiseParallel: Shard(0); RowwiseParallel: Shard(1)
                w = ref["after"][f"{key}.weight"]
                update = w - ref["before"][f"{key}.weight"]
                for topic, full in (("weights", w), ("weight_gradients",
                                                     ref["grads"][f"{key}.weight"]),
                                    ("weight_updates", update),
                                    ("bias_gradients", ref["grads"][f"{key}.bias"])):
                    assert scalars[(f"norm/{topic}/{key}", step)] == pytest.approx(
                        _norm(full), rel=1e-5), (topic, key, step)
                got = hists[(f"histogram/weights/{key}", step)]
                want = ik.ops.histograms([w], bins=8)
                assert got.counts.tolist() == want.counts[0].tolist()
                assert (got.min, got.max, got.num) == (float(w.min()), float(w.max()), w.numel())


def test_a_merging_subscriber_failing_on_one_rank_is_disabled_on_both(failing):
    """A merging subscriber raising on rank 1 only (in compute_step before its partial, or
    in its merge callback) is disabled on both ranks, said on each; training and the other
    merging subscribers go on, their merged values those of the full tensors."""
    zero, one = failing[0]["failing"], failing[1]["failing"]
    for planted in ("in compute_step", "in the merge callback"):
        assert any(f"planted failure {planted} on rank 1" in w for w in one["warnings"])
        assert not any("planted failure" in w for w in zero["warnings"])
    for name in ("fails_in_compute", "fails_in_merge"):
        assert any(f"{name!r} failed on another rank and is disabled" in w
                   for w in zero["warnings"]), zero["warnings"]
    for result in (zero, one):
        scalars, hists = result["scalars"], result["histograms"]
        assert {s for (t, s) in scalars if t.startswith("fails_in_compute/")} == {0}
        # rank 0 merged and published step 2 before rank 1's failure in it was told
        assert {s for (t, s) in scalars if t.startswith("fails_in_merge/")} == (
            {0, 1, 2} if result is zero else {0, 1})
        for step, ref in enumerate(result["steps"]):
            if step in (0, 3):  # no failure: a round per kind, as without one (two rounds),
                # and the closing round: each is the first step of its subscriptions (at
                # step 3, fails_in_merge is gone)
                assert ref["calls"].get("c10d.allreduce_") == 3 + 1, (step, ref["calls"])
            for key in BLOCKS:
                grad, w = ref["grads"][f"{key}.weight"], ref["after"][f"{key}.weight"]
                assert scalars[(f"norm/weight_gradients/{key}", step)] == pytest.approx(
                    _norm(grad), rel=1e-5), (key, step)
                got = hists[(f"histogram/weights/{key}", step)]
                assert got.counts.tolist() == ik.ops.histograms([w], bins=8).counts[0].tolist()
                assert got.num == w.numel()
    assert {k: v for k, v in zero["scalars"].items() if k[1] < 2 or "fails" not in k[0]} == \
        one["scalars"]


def _assert_both_disabled(zero: dict[str, Any], one: dict[str, Any]) -> None:
    """Rank 1 said both planted failures; rank 0 said it disabled both subscribers."""
    for planted in ("in the last merge callback", "in the edges' merge callback"):
        assert any(f"planted failure {planted} on rank 1" in w for w in one["warnings"])
    for name in ("fails_in_final", "fails_in_edges"):
        assert any(f"{name!r} failed on another rank and is disabled" in w
                   for w in zero["warnings"]), zero["warnings"]


def test_a_merge_callback_failing_on_one_rank_with_nothing_else_to_merge_there(failing):
    """Rank 1 fails in a merge callback and has nothing else to merge in the step: in the
    last round (told in the next step's round, where rank 0 merges that subscriber again) and
    in a histogram's edges (rank 0 merges its counts: rank 1 knows the step's rounds from
    the step before and takes part)."""
    zero, one = failing[0]["failing_late"], failing[1]["failing_late"]
    _assert_both_disabled(zero, one)
    for result in (zero, one):
        scalars, hists = result["scalars"], result["histograms"]
        assert {s for (t, s) in scalars if t.startswith("fails_in_final/")} == (
            {0, 1} if result is zero else {0})
        assert {s for (t, s) in hists if t.startswith("fails_in_edges/")} == {0, 1, 2, 3}
        for step, ref in enumerate(result["steps"]):
            for key in BLOCKS:
                assert scalars[(f"norm/weight_gradients/{key}", step)] == pytest.approx(
                    _norm(ref["grads"][f"{key}.weight"]), rel=1e-5), (key, step)
                if step < 4:
                    w = ref["after"][f"{key}.weight"]
                    got = hists[(f"fails_in_edges/weights/{key}", step)]
                    assert got.counts.tolist() == \
                        ik.ops.histograms([w], bins=8).counts[0].tolist()


def test_a_merge_callback_failing_on_one_rank_at_the_first_step(failing):
    """At the first step of its subscriptions no rank knows how many rounds they merge:
    rank 1 failing in the step's last callback, and in a histogram's edges (rank 0 merges
    its counts after them), is told in the closing round every rank takes part in at such a
    step. Both subscribers are disabled on both ranks; the norms go on, exact."""
    zero, one = failing[0]["failing_first"], failing[1]["failing_first"]
    _assert_both_disabled(zero, one)
    for result in (zero, one):
        scalars, hists = result["scalars"], result["histograms"]
        assert {s for (t, s) in scalars if t.startswith("fails_in_final/")} == (
            {0} if result is zero else set())
        assert not [k for k in hists if k[0].startswith("fails_in_edges/")]
        for step, ref in enumerate(result["steps"]):
            for key in BLOCKS:
                assert scalars[(f"norm/weight_gradients/{key}", step)] == pytest.approx(
                    _norm(ref["grads"][f"{key}.weight"]), rel=1e-5), (key, step)
        # step 1, the norm alone: its round and the closing one; step 2: its round alone
        assert [ref["calls"].get("c10d.allreduce_") for ref in result["steps"][1:]] == [2, 1]


def test_merge_shards_outside_sharded_training_is_the_plain_computation():
    """Without DTensors, a merging subscriber's ``then`` runs at once with its partial: the
    values and the messages are those of the single-process path."""
    from ikkuna_core.testing import MemoryBackend, train_steps

    class Squares(ik.Subscriber):
        name = "squares"
        sharded = "merge"

        def compute_step(self, step: ik.StepBundle) -> None:
            assert not self.merging(step)
            partial = ik.ops.norms(step["weights"].tensors()) ** 2
            self.merge_shards(step, partial, lambda total: self.publish_scalars(step, total))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    backend = MemoryBackend()
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    train_steps(model, [Squares(topics=["weights"])], steps=2, inputs=x, targets=y,
                backend=backend).close()
    assert backend.scalar("squares/weights/0", step=1) == pytest.approx(
        float(model[0].weight.detach().pow(2).sum()), rel=1e-6)


def test_merge_shards_names_a_partial_of_the_wrong_shape():
    from ikkuna_core.testing import train_steps

    class Wrong(ik.Subscriber):
        name = "wrong"
        sharded = "merge"

        def compute_step(self, step: ik.StepBundle) -> None:
            self.merge_shards(step, torch.zeros(5), lambda total: None)

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with pytest.raises(ik.SubscriberError, match=r"one row per payload of \['weights'\] \(2\)"):
        train_steps(model, [Wrong(topics=["weights"])], steps=1, inputs=torch.randn(8, 4),
                    targets=torch.randint(0, 2, (8,)))


def test_a_reader_of_merged_results_disabled_on_one_rank_only(failing):
    """A subscriber reading a merging one's results fails on rank 1 at step 0 (disabled
    there only: it does not merge). At step 1, the first of a new set of merging
    subscriptions, rank 0 settles before it and rank 1 does not run it: the ranks still take
    part in the same rounds (on the old code rank 0 waited for rank 1), and the norms and
    means are those of the full weights at every step."""
    zero, one = failing[0]["failing_reader"], failing[1]["failing_reader"]
    assert any("planted failure in a reader on rank 1" in w for w in one["warnings"])
    assert not any("planted failure" in w for w in zero["warnings"])
    for result in (zero, one):
        scalars = result["scalars"]
        for step, ref in enumerate(result["steps"]):
            for key in BLOCKS:
                w = ref["after"][f"{key}.weight"]
                assert scalars[(f"norm/weights/{key}", step)] == pytest.approx(
                    _norm(w), rel=1e-5), (key, step)
                if step % 2 == 0:
                    assert scalars[(f"mean/weights/{key}", step)] == pytest.approx(
                        float(w.double().mean()), rel=1e-5, abs=1e-7), (key, step)
