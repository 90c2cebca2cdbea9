"""The budget's arithmetic (ikkuna_core.budget): costs + budget + subsample -> cadences."""

from __future__ import annotations

import pytest

from ikkuna_core.budget import MAX_DOUBLINGS, amortised, decide, plan


def test_a_subscriber_whose_cost_is_known_gets_the_cadence_the_budget_implies() -> None:
    # 10 % of the step per run under a 2 % budget: every 5th step would do; the ladder's
    # next rung is 8 (1.25 % on average)
    assert plan({"a": 0.10}, 0.02, {"a": 1}) == {"a": 8}
    # one that fits runs every step
    assert plan({"a": 0.015}, 0.02, {"a": 1}) == {"a": 1}
    # exactly twice the budget: every 2nd step
    assert plan({"a": 0.5}, 0.25, {"a": 1}) == {"a": 2}


def test_the_expensive_subscriber_is_slowed_first_cheap_ones_keep_running() -> None:
    # a: 10 % per run, b: 1 %; a -> 8 gives 1.25 + 1 = 2.25 % > 2 %; a is still the most
    # expensive per step (1.25 > 1), so a -> 16: 0.625 + 1 = 1.625 %
    assert plan({"a": 0.10, "b": 0.01}, 0.02, {"a": 1, "b": 1}) == {"a": 16, "b": 1}
    # two equal ones halve alternately, the first first
    assert plan({"a": 0.02, "b": 0.02}, 0.02, {"a": 1, "b": 1}) == {"a": 2, "b": 2}
    assert plan({"a": 0.02, "b": 0.02}, 0.03, {"a": 1, "b": 1}) == {"a": 2, "b": 1}


def test_the_ladder_starts_at_the_configured_subsample() -> None:
    # never more often than subsample = 3; rungs 3, 6, 12, 24: cost 20 % -> 24 (0.83 %)
    chosen = plan({"a": 0.20}, 0.01, {"a": 3})
    assert chosen == {"a": 24}
    for costs in ({"a": 0.0}, {"a": 1e-6}):
        assert plan(costs, 0.01, {"a": 3}) == {"a": 3}
    # every cadence is floor * 2**j, for many costs
    for cost in (0.001, 0.013, 0.07, 0.4, 3.0, 77.0):
        k = plan({"a": cost}, 0.02, {"a": 5})["a"]
        j = (k // 5).bit_length() - 1
        assert k == 5 * 2**j and cost / k <= 0.02 and (k == 5 or cost / (k // 2) > 0.02)


def test_a_cost_beyond_reach_stops_at_the_slowest_rung() -> None:
    assert plan({"a": 1e9}, 0.02, {"a": 1}) == {"a": 2**MAX_DOUBLINGS}
    assert plan({"a": 1e9}, 0.02, {"a": 1}, max_doublings=3) == {"a": 8}


def test_unmeasured_subscribers_keep_their_floor_and_current_cadence() -> None:
    assert plan({"a": 0.1}, 0.02, {"a": 1, "b": 4}) == {"a": 8, "b": 4}
    assert decide({"a": 0.1}, 0.02, {"a": 1, "b": 4}, {"a": 1, "b": 16}) == {"a": 8, "b": 16}


def test_decide_keeps_a_cadence_that_fits_and_re_decides_when_costs_change() -> None:
    floors = {"a": 1}
    assert decide({"a": 0.10}, 0.02, floors, {"a": 1}) == {"a": 8}
    # noise near a rung: 0.0165 at 8 is 2.06 % (within 10 % of the budget): kept
    assert decide({"a": 0.165}, 0.02, floors, {"a": 8}) == {"a": 8}
    # the cost grew 50 %: 1.9 % -> over budget at 8: 16
    assert decide({"a": 0.30}, 0.02, floors, {"a": 8}) == {"a": 16}
    # the cost fell to a tenth: every step fits, and 8 would waste the budget: 1
    assert decide({"a": 0.01}, 0.02, floors, {"a": 8}) == {"a": 1}


def test_decide_does_not_flip_between_two_rungs_on_noisy_costs() -> None:
    """Measured on the 2-core CPU (issue 19): norm's cost per run read 11 %, 22 %, 19 %,
    23 % of the step in successive windows, and the cadence went 32, 64, 32, 64, 32, 64.
    Slowing down when over budget stays quick; speeding up needs the plan to use twice
    what the current cadences use."""
    floors, budget = {"norm": 1, "hist": 1}, 0.02
    current = {"norm": 64, "hist": 128}
    for norm in (0.223, 0.194, 0.229, 0.167, 0.222):
        current = decide({"norm": norm, "hist": 1.07}, budget, floors, current)
    assert current == {"norm": 64, "hist": 128}
    # a real change (norm's cost a twentieth) still speeds it up
    assert decide({"norm": 0.01, "hist": 1.07}, budget, floors, current)["norm"] < 64


def test_amortised() -> None:
    assert amortised({"a": 0.1, "b": 0.04}, {"a": 8, "b": 2}) == pytest.approx(0.0325)


@pytest.mark.parametrize(
    ("costs", "budget", "floors", "match"),
    [
        ({"a": 0.1}, 0.0, {"a": 1}, "budget must be a number > 0"),
        ({"a": 0.1}, float("nan"), {"a": 1}, "budget must be a number > 0"),
        ({"a": -1.0}, 0.02, {"a": 1}, "cost of 'a' must be a finite number >= 0"),
        ({"a": 0.1}, 0.02, {}, "'a' has a cost but no subsample"),
        ({"a": 0.1}, 0.02, {"a": 0}, "subsample of 'a' must be an integer >= 1"),
    ],
)
def test_bad_input_is_named(costs: dict, budget: float, floors: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan(costs, budget, floors)
