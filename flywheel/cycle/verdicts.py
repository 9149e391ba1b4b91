"""What a cycle's evaluation found and what its gate decided: typed, stored as JSON in the
cycle's summary (``evaluation``, ``gate``) and in the promotion review item."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

CONFIDENCE = 0.95
"""The confidence level of the intervals an evaluation reports."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def wilson_interval(
    successes: int, trials: int, *, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``successes / trials`` at ``confidence``
    (Newcombe 1998, method 3: no continuity correction); ``(0, 1)`` when there are no
    trials."""
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"a proportion needs 0 <= successes <= trials, got {successes}/{trials}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if trials == 0:
        return (0.0, 1.0)
    from scipy.stats import binomtest

    interval = binomtest(successes, trials).proportion_ci(
        confidence_level=confidence, method="wilson"
    )
    return (max(0.0, float(interval.low)), min(1.0, float(interval.high)))


class TrackEvaluation(_Record):
    """Base and candidate on one round's gate slice: the held-out share of its routed cases,
    which no round trained on (evaluations stored before the split: all its cases)."""

    cases: int
    """Gate cases judged."""
    failures_before: int
    failures_after: int
    failure_rate_before: float
    failure_rate_after: float
    fixed_of_all_cases: int | None = None
    """Failures fixed among all the round's cases, trained-on included (a team's stack; the
    gate counts only the held-out share)."""
    seeds: int = 1
    """Noise seeds each gate case was judged at (the embedded world: its own and fresh
    ones; a team's stack: one)."""
    n: int = 0
    """Images judged: ``cases`` times ``seeds``, which the failure rates and intervals are of
    (filled in from them when absent, as in evaluations stored before it existed)."""
    interval_before: tuple[float, float] = (0.0, 1.0)
    """The base's failure rate's 95 % Wilson score interval, ``[low, high]`` (computed from
    ``failures_before`` and ``n`` when absent)."""
    interval_after: tuple[float, float] = (0.0, 1.0)
    """The candidate's failure rate's 95 % Wilson score interval (from ``failures_after``)."""

    @model_validator(mode="before")
    @classmethod
    def _slice_size_and_intervals(cls, data: Any) -> Any:
        """Fill in ``n`` and the intervals from the counts when they are not given."""
        if not isinstance(data, dict) or not isinstance(data.get("cases"), int):
            return data  # the field validation says what is wrong
        filled = dict(data)
        seeds = filled.get("seeds", 1)
        n = filled.setdefault("n", filled["cases"] * (seeds if isinstance(seeds, int) else 1))
        for when in ("before", "after"):
            failures = filled.get(f"failures_{when}")
            if (
                f"interval_{when}" not in filled
                and isinstance(failures, int)
                and isinstance(n, int)
            ):
                filled[f"interval_{when}"] = wilson_interval(failures, n)
        return filled


class RegressionEvaluation(_Record):
    """Base and candidate on the regression suite."""

    score_before: float
    score_after: float
    cases: int
    seeds: int
    judged_by: str = "evaluator"
    """Who judged it: the world's ``evaluator`` or the project's ``judge``."""


class ScenarioEvaluation(_Record):
    """Base and candidate on the active regression scenarios (fixed failures of earlier
    cycles)."""

    count: int
    failures_before: int
    failures_after: int


class Evaluation(_Record):
    """One cycle's evaluation of its candidate against its base."""

    tracks: dict[str, TrackEvaluation]
    """Per track that had a round."""
    regression: RegressionEvaluation
    scenarios: ScenarioEvaluation


class GateVerdict(_Record):
    """The gate's decision on an :class:`Evaluation`."""

    passed: bool
    fixed: int
    """Failures fixed on the gate's cases, all tracks together."""
    regression_delta: float
    """The regression suite's score, candidate minus base."""
    reasons: list[str]
    """Why it failed (empty when it passed)."""


def gate(evaluation: Evaluation, *, tolerance: float) -> GateVerdict:
    """Fixed failures up, no track's slice worse (its failure rate up by more than
    ``tolerance``: a track that regresses is not hidden by another that improves), the
    regression suite flat (drop <= ``tolerance``), no scenario broken; the verdict and its
    reasons."""
    before = sum(t.failures_before for t in evaluation.tracks.values())
    after = sum(t.failures_after for t in evaluation.tracks.values())
    regression = evaluation.regression
    delta = regression.score_after - regression.score_before
    scenarios = evaluation.scenarios
    reasons = []
    if after >= before:
        reasons.append(f"no failure fixed on the gate slices ({before} -> {after})")
    for name, track in evaluation.tracks.items():
        if track.failure_rate_after - track.failure_rate_before > tolerance:
            reasons.append(
                f"the {name} slice got worse ({track.failure_rate_before:.2f} -> "
                f"{track.failure_rate_after:.2f} failure rate, > {tolerance:g})"
            )
    if delta < -tolerance:
        reasons.append(f"the regression suite dropped {-delta:.3f} (> {tolerance:g})")
    if scenarios.failures_after > scenarios.failures_before:
        reasons.append(
            f"regression scenarios broken ({scenarios.failures_before} -> "
            f"{scenarios.failures_after} failing)"
        )
    return GateVerdict(
        passed=not reasons, fixed=before - after, regression_delta=delta, reasons=reasons
    )
