"""Request and response bodies of ``/v1/review`` (pydantic; separate from the ORM rows)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from flywheel.review.service import ReviewItemOut
from flywheel.signals.schemas import STORABLE

KindName = Literal[
    "augmentation_batch",
    "reward_recalibration",
    "prompt_enhancer_data",
    "model_promotion",
    "triage_case",
]
TrackName = Literal["rl", "pretraining_gap", "prompt_enhancer"]
MAX_ID = 2**53 - 1
"""The largest id the API takes: every JSON parser keeps integers up to 2**53 exact."""

Reason = Annotated[str, StringConstraints(min_length=1, max_length=4000), STORABLE]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClaimIn(_In):
    """Claim the oldest waiting item (of a kind, of a cluster)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"kind": "triage_case", "lease_seconds": 900}]},
    )

    kind: KindName | None = None
    cluster_id: int | None = Field(default=None, ge=1, le=MAX_ID)
    lease_seconds: int = Field(
        default=900, ge=10, le=86_400, description="How long the claim holds the item."
    )


class ApproveIn(_In):
    """Approve (a triage item needs ``track``; edits need a reason)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"track": "pretraining_gap", "reason": "purple is rare in the corpus"},
                {"edits": {"drop": ["pool:17"]}, "reason": "a duplicate scene"},
            ]
        },
    )
    reason: Reason | None = None
    track: TrackName | None = Field(
        default=None, description="A triage item: the track its case goes to (required)."
    )
    edits: dict[str, Any] | None = Field(
        default=None, description="An artefact approved as edited (needs a reason)."
    )


class RejectIn(_In):
    """Reject with a reason."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"reason": "not a model failure"}]}
    )
    reason: Reason


class ClusterDecisionIn(_In):
    """One decision for every open item of ``kind`` in the cluster."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "kind": "triage_case",
                    "decision": "approve",
                    "track": "prompt_enhancer",
                    "reason": "users' colour words",
                }
            ]
        },
    )
    kind: KindName
    decision: Literal["approve", "reject"]
    reason: Reason | None = None
    track: TrackName | None = None


class AuditEntry(BaseModel):
    actor: str
    action: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    at: str


class ReviewItemDetail(BaseModel):
    item: ReviewItemOut
    audit: list[AuditEntry]


class ReviewPage(BaseModel):
    items: list[ReviewItemOut]
    next_after: int | None = Field(
        description="Pass as ?after= for the next page; null on the last page."
    )


__all__ = [
    "ApproveIn",
    "AuditEntry",
    "ClaimIn",
    "ClusterDecisionIn",
    "RejectIn",
    "ReviewItemDetail",
    "ReviewPage",
]
