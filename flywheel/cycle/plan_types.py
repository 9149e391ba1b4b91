"""What a dry run of a cycle returns (``flywheel cycle --dry-run``): the plan, per track."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoundPlan(_Frozen):
    recipe: str
    steps: dict[str, int]
    estimated_seconds: float | None
    """None: not estimated (a team's rounds run on its own launcher)."""


class TrackPlan(_Frozen):
    track: str
    cases: int
    mean_confidence: float | None
    top_clusters: list[tuple[str, int]]
    """Theme labels of the routed cases, most common first (three at most)."""
    data: dict[str, object]
    """What would be built, retrieved or synthesized for the round."""
    round: RoundPlan | None
    """None: too few cases (below ``min_cases``) or nothing to train on."""


class CyclePlan(_Frozen):
    model: str
    signals_collected: int
    cases_created: int
    routed: dict[str, int]
    awaiting_triage: int
    tracks: list[TrackPlan]
    estimated_seconds: float
