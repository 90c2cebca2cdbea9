"""DDP (issue 18 item 2), on two real gloo ranks (tests/ddp_share_worker.py, CPU).

Parameter topics: each rank computes its share of the keys and the ranks exchange the
results in one all-gather per step; each reads about half the elements one rank doing
everything reads, and publishes the same tags and values (norms of ``p``/``p.grad``
computed directly). Forward topics with ``ddp_forward = "merge"``: the statistics of the
global batch, equal to those of a plain twin trained on both ranks' batches at once. A
subscriber failing on one rank is disabled on both, and training goes on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

WORKER = Path(__file__).with_name("ddp_share_worker.py")


@pytest.fixture(scope="module")
def ranks(
    tmp_path_factory: pytest.TempPathFactory, run_ranks: Any
) -> list[dict[str, Any]]:
    return run_ranks(WORKER, tmp_path_factory.mktemp("ddp_share"))


def test_each_rank_does_about_half_the_metric_work(ranks):
    """A norm on two topics and a histogram on one: the histogram is most of the work, so
    its keys are split between the ranks (a subscriber batches over keys, so its ops do
    not fall: the elements they read halve) and the norm is computed whole by one rank. At
    the first step every rank computes everything (counted: the placement's measure)."""
    for result in ranks:
        alone, shared = result["alone"]["elements"], result["shared"]["elements"]
        assert alone > 0
        assert shared <= 0.6 * alone, (shared, alone)
        assert result["shared"]["ops"] <= result["alone"]["ops"]
        assert result["shared"]["collectives"] == 3  # one exchange a step, no resize
        assert result["alone"]["collectives"] == 0


def test_subscriptions_placed_whole_halve_the_ops_too(ranks):
    """Four subscriptions of equal size (a norm and a histogram on each of two topics):
    each is computed whole by one rank, so each rank runs about half the ops and reads
    about half the elements one rank doing everything does, and the ranks publish the same
    values as that rank."""
    for result in ranks:
        shared, alone = result["per_topic"]["shared"], result["per_topic"]["alone"]
        assert 0 < shared["ops"] <= 0.6 * alone["ops"], (shared["ops"], alone["ops"])
        assert 0 < shared["elements"] <= 0.6 * alone["elements"]
        assert shared["collectives"] == 3
        assert shared["scalars"].keys() == alone["scalars"].keys()
        assert len(shared["scalars"]) == 3 * 2 * 6
        for key, value in shared["scalars"].items():
            assert value == pytest.approx(alone["scalars"][key], rel=1e-6)
            assert value == pytest.approx(shared["refs"][key], rel=1e-5)
        assert shared["hists"].keys() == alone["hists"].keys()
        assert len(shared["hists"]) == 3 * 2 * 6
        for key, (counts, edges, num, _) in shared["hists"].items():
            assert (counts, num) == alone["hists"][key][::2]
            assert edges == pytest.approx(alone["hists"][key][1], rel=1e-6)
    # the two ranks ran different halves: together, what one rank alone runs
    both = sum(r["per_topic"]["shared"]["ops"] for r in ranks)
    assert both == ranks[0]["per_topic"]["alone"]["ops"]


def test_a_split_spectral_norm_goes_on_from_its_vectors(ranks):
    """The spectral norm alone is split by keys after its first step, where every rank
    iterated every key's vectors: each rank's share goes on from them, and the values
    are those of one rank doing everything (a cold start would run the warm-up again)."""
    for result in ranks:
        shared, alone = result["spectral"]["shared"], result["spectral"]["alone"]
        assert 0 < shared["elements"] <= 0.6 * alone["elements"]
        assert shared["scalars"].keys() == alone["scalars"].keys()
        assert len(shared["scalars"]) == 3 * 6
        for key, value in shared["scalars"].items():
            assert value == pytest.approx(alone["scalars"][key], rel=1e-6), key


def test_published_values_are_those_of_one_rank_doing_everything(ranks):
    for result in ranks:
        shared, alone = result["shared"], result["alone"]
        assert shared["scalars"].keys() == alone["scalars"].keys()
        assert len(shared["scalars"]) == 3 * 2 * 6
        for key, value in shared["scalars"].items():
            assert value == pytest.approx(alone["scalars"][key], rel=1e-6)
            assert value == pytest.approx(shared["refs"][key], rel=1e-5)
        assert shared["hists"].keys() == alone["hists"].keys() and len(shared["hists"]) == 3 * 6
        for key, (counts, edges, num, total) in shared["hists"].items():
            a_counts, a_edges, a_num, a_total = alone["hists"][key]
            assert counts == a_counts and num == a_num == 16 * 16
            assert edges == pytest.approx(a_edges, rel=1e-6)
            assert total == pytest.approx(a_total, rel=1e-6, abs=1e-9)


def test_forward_topics_merged_are_the_global_batch(ranks):
    """``ddp_forward = "merge"``: norms, means and histograms of activations over both ranks'
    batches, as a plain model computes them on the two batches concatenated."""
    for result in ranks:
        merged, twin = result["forward"]["merged"], result["forward"]["twin"]
        assert merged["scalars"].keys() == twin["scalars"].keys()
        assert len(merged["scalars"]) == 2 * 6 * 3  # norm and mean, 6 modules, 3 steps
        for key, value in merged["scalars"].items():
            assert value == pytest.approx(twin["scalars"][key], rel=1e-5, abs=1e-7), key
        assert merged["hists"].keys() == twin["hists"].keys() and len(merged["hists"]) == 18
        for key, (counts, edges, num, _) in merged["hists"].items():
            t_counts, t_edges, t_num, _ = twin["hists"][key]
            assert num == t_num == 8 * 16
            assert edges == pytest.approx(t_edges, rel=1e-5, abs=1e-7)
            # an entry on a bin edge may fall either side under rounding
            assert sum(abs(a - b) for a, b in zip(counts, t_counts, strict=True)) <= 2, key
        assert not any("differ per rank" in w for w in merged["warnings"])


def test_a_subscriber_failing_on_one_rank_is_disabled_on_both(ranks):
    zero, one = ranks[0]["failing"], ranks[1]["failing"]
    assert any("planted failure on rank 1" in w for w in one["warnings"])
    assert any("failed on another rank" in w for w in zero["warnings"])
    for result in (zero, one):
        steps = {step for (tag, step) in result["scalars"] if tag.startswith("fails_on")}
        grads = {step for (tag, step) in result["scalars"] if tag.startswith("norm/")}
        assert grads == {0, 1, 2, 3}  # the other shared subscriber went on, on both ranks
        assert steps <= {0}


def test_a_budget_keeps_the_configured_cadences_on_every_rank(ranks):
    """Per-rank cadences would run merging/sharing subscribers at different steps on
    different ranks (collectives out of step): the budget keeps the configured ones."""
    for result in ranks:
        budgeted = result["budgeted"]
        assert budgeted["steps"] == list(range(20))
        assert budgeted["cadences"] == [1]
        assert any("keeps the configured cadences in a distributed run" in w
                   for w in budgeted["warnings"])
