"""The demo's figures: the 95 % Wilson intervals of a slice's failure rates, and the goals
evaluated from a report (no model, no database)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from rich.console import Console

from flywheel.cycle.verdicts import Evaluation, TrackEvaluation, wilson_interval
from flywheel.demo import (
    BASE_CONCEPT_GOALS,
    TRACKS,
    demo_goals,
    goal,
    goals_table,
)

# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I,
# method 3 (Wilson score, no continuity correction), and the 0/10, 5/10, 10/10 intervals
# of the same formula (z = 1.959964).
TEXTBOOK_INTERVALS = [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (0, 10, 0.0000, 0.2775),
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0000),
]


@pytest.mark.parametrize(("successes", "trials", "low", "high"), TEXTBOOK_INTERVALS)
def test_the_wilson_interval_matches_the_textbook_values(
    successes: int, trials: int, low: float, high: float
) -> None:
    interval = wilson_interval(successes, trials)
    assert interval == pytest.approx((low, high), abs=5e-5)


def test_a_wilson_interval_holds_its_rate_and_narrows_with_more_cases() -> None:
    for trials in (1, 3, 10, 57):
        for successes in range(trials + 1):
            low, high = wilson_interval(successes, trials)
            assert 0.0 <= low <= successes / trials <= high <= 1.0
    narrow, wide = wilson_interval(30, 100), wilson_interval(3, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes <= trials"):
        wilson_interval(4, 3)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 3, confidence=1.0)


def test_a_track_evaluation_gets_its_slice_size_and_intervals_from_its_counts() -> None:
    track = TrackEvaluation(
        cases=10,
        failures_before=5,
        failures_after=0,
        failure_rate_before=0.5,
        failure_rate_after=0.0,
    )
    assert track.n == 10
    assert track.interval_before == pytest.approx((0.2366, 0.7634), abs=5e-5)
    assert track.interval_after == pytest.approx((0.0, 0.2775), abs=5e-5)
    assert TrackEvaluation.model_validate(track.model_dump(mode="json")) == track
    with pytest.raises(ValidationError):
        TrackEvaluation(
            cases=3,
            failures_before=4,
            failures_after=0,
            failure_rate_before=1.0,
            failure_rate_after=0.0,
        )


def test_an_evaluation_stored_before_intervals_existed_still_loads() -> None:
    stored = {
        "tracks": {
            "rl": {
                "cases": 20,
                "failures_before": 15,
                "failures_after": 11,
                "failure_rate_before": 0.75,
                "failure_rate_after": 0.55,
            }
        },
        "regression": {"score_before": 0.1, "score_after": 0.12, "cases": 8, "seeds": 1},
        "scenarios": {"count": 0, "failures_before": 0, "failures_after": 0},
    }
    track = Evaluation.model_validate(stored).tracks["rl"]
    assert track.n == 20
    assert track.interval_before == wilson_interval(15, 20)
    assert track.interval_after == wilson_interval(11, 20)


def _report(**changes: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "tracks": {
            "rl": {
                "n": 20,
                "failure_rate_before": 0.8,
                "failure_rate_after": 0.4,
                "interval": list(wilson_interval(8, 20)),
            },
            "pretraining_gap": {"n": 9, "failure_rate_before": 1.0, "failure_rate_after": 0.56},
            "prompt_enhancer": {
                "n": 0,
                "failure_rate_before": None,
                "failure_rate_after": None,
                "note": "too few cases",
            },
        },
        "regression": {"score_before": 0.103, "score_after": 0.08},
        "attribution": {"other_world": {"macro_f1": None, "reason": "no other world"}},
        "base_concepts": {
            "model": "world-base",
            "skills": {
                "shape": {"score": 0.7, "n": 24},
                "count": {"score": 0.07, "n": 24},
                "relation": {"score": 0.61, "n": 24},
                "colour": {"score": 0.56, "n": 24},
            },
        },
        "seconds": 14.5 * 60,
    }
    return report | changes


def test_each_goal_is_met_exactly_when_its_value_reaches_its_target() -> None:
    goals = demo_goals(_report())
    assert set(goals) == (
        {f"slice.{t}" for t in TRACKS}
        | {"regression", "attribution.other_world", "wall_time"}
        | {f"base.{s}" for s in BASE_CONCEPT_GOALS}
    )
    met = {key: g.met for key, g in goals.items()}
    assert met == {
        "slice.rl": True,  # -50 % exactly
        "slice.pretraining_gap": False,  # -44 %
        "slice.prompt_enhancer": False,  # no round: no value
        "regression": False,  # -2.3 points
        "attribution.other_world": False,  # not measured
        "base.shape": True,  # 0.70 >= 0.7
        "base.count": False,
        "base.relation": True,
        "base.colour": False,
        "wall_time": True,  # 14.5 <= 15 min
    }
    assert goals["slice.rl"].value == pytest.approx(-0.5)
    assert goals["slice.prompt_enhancer"].value is None
    assert goals["slice.prompt_enhancer"].note == "too few cases"
    assert goals["regression"].value == pytest.approx(-2.3)
    assert goals["attribution.other_world"].note == "no other world"
    assert goals["wall_time"].value == pytest.approx(14.5)


def test_the_goals_move_with_the_figures() -> None:
    slower = demo_goals(
        _report(seconds=15.1 * 60, regression={"score_before": 0.1, "score_after": 0.081})
    )
    assert not slower["wall_time"].met
    assert slower["regression"].met  # -1.9 points
    measured = demo_goals(_report(attribution={"other_world": {"macro_f1": 0.93, "reason": None}}))
    assert measured["attribution.other_world"].met
    nothing_to_fix = demo_goals(
        _report(tracks={"rl": {"n": 4, "failure_rate_before": 0.0, "failure_rate_after": 0.0}})
    )
    assert nothing_to_fix["slice.rl"].value is None
    assert not nothing_to_fix["slice.rl"].met
    assert not nothing_to_fix["slice.pretraining_gap"].met  # no track in the report


def test_a_goal_without_a_value_is_not_met_and_says_so_in_the_table() -> None:
    assert not goal(figure="x", value=None, target=0.0, comparison=">=", unit="score").met
    assert goal(figure="x", value=0.0, target=0.0, comparison=">=", unit="score").met
    assert goal(figure="x", value=0.0, target=0.0, comparison="<=", unit="score").met
    assert not goal(figure="x", value=0.01, target=0.0, comparison="<=", unit="score").met
    console = Console(width=200, record=True)
    console.print(goals_table(demo_goals(_report())))
    text = console.export_text()
    assert "goals: 4 of 10 met" in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert "0.80 -> 0.40 [0.22, 0.61], n 20" in rows["rl: held-out slice, failure rate"]
    assert "✓ met" in rows["rl: held-out slice, failure rate"]
    assert "-50%" in rows["rl: held-out slice, failure rate"]
    assert "✗ not met" in rows["attribution macro-F1, other world"]
    assert ">= 0.90" in rows["attribution macro-F1, other world"]
    assert "14.5 min" in rows["demo wall time"]
