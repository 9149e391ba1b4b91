"""The relational schema of the flywheel (SQLAlchemy 2, typed ``Mapped[]``).

Signals come in through the API; failure cases, routes, review items, cycles, training
rounds, checkpoints and regression scenarios are what the loop makes of them. Alembic
migrations in ``migrations/`` create exactly this schema (a test compares the two).
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Json = dict[str, Any]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar = {Json: JSONB, datetime: DateTime(timezone=True)}


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    """A VARCHAR + CHECK enum column type (no native PostgreSQL enum to migrate)."""
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Scope(enum.StrEnum):
    INGEST = "ingest"
    READ = "read"
    TRIAGE = "triage"
    REVIEW = "review"
    ADMIN = "admin"


class SignalSource(enum.StrEnum):
    EVALUATION = "evaluation"
    MINING = "mining"
    FEEDBACK = "feedback"


class SignalKind(enum.StrEnum):
    THUMBS = "thumbs"
    RATING = "rating"
    PAIRWISE = "pairwise"
    COMMENT = "comment"
    FLAGS = "flags"
    EVALUATION_SAMPLE = "evaluation_sample"
    MINING_HIT = "mining_hit"


class Task(enum.StrEnum):
    TEXT_TO_IMAGE = "text_to_image"
    IMAGE_EDITING = "image_editing"


class Track(enum.StrEnum):
    RL = "rl"
    PRETRAINING_GAP = "pretraining_gap"
    PROMPT_ENHANCER = "prompt_enhancer"


class CaseStatus(enum.StrEnum):
    OPEN = "open"
    ROUTED = "routed"
    AWAITING_TRIAGE = "awaiting_triage"
    IN_ROUND = "in_round"
    FIXED = "fixed"
    DISMISSED = "dismissed"


class Decider(enum.StrEnum):
    MODEL = "model"
    HUMAN = "human"


class ReviewKind(enum.StrEnum):
    AUGMENTATION_BATCH = "augmentation_batch"
    REWARD_RECALIBRATION = "reward_recalibration"
    PROMPT_ENHANCER_DATA = "prompt_enhancer_data"
    MODEL_PROMOTION = "model_promotion"
    TRIAGE_CASE = "triage_case"


class ReviewStatus(enum.StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    APPROVED = "approved"
    REJECTED = "rejected"


class CycleStatus(enum.StrEnum):
    RUNNING = "running"
    AWAITING_REVIEW = "awaiting_review"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    FAILED = "failed"
    NO_ROUNDS = "no_rounds"
    """No track had enough routed cases to train on."""


class Component(enum.StrEnum):
    """The part of a model version a checkpoint holds."""

    GENERATOR = "generator"
    ENHANCER = "enhancer"
    REWARD = "reward"


class RoundStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    """Its artefact was rejected before it trained: it never runs (migration 0005)."""


def _created_at() -> Mapped[datetime]:
    return mapped_column(server_default=func.now())


class ApiKey(Base):
    """A per-app API key. Only the SHA-256 of the secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    app: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(String(16)))
    rate_limit: Mapped[str | None] = mapped_column(String(100))
    """This key's request limit (``"50/second;3000/minute"``); NULL: the API's default."""
    created_at: Mapped[datetime] = _created_at()
    revoked_at: Mapped[datetime | None]


class ModelVersion(Base):
    """A named version of the generator; signals and evaluations refer to it."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    promoted_at: Mapped[datetime | None]


class EvaluationRun(Base):
    """One run of a benchmark on one model version; its samples are signals."""

    __tablename__ = "evaluation_runs"
    __table_args__ = (UniqueConstraint("app", "run_id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    app: Mapped[str] = mapped_column(String(100))
    run_id: Mapped[str] = mapped_column(String(200))
    benchmark: Mapped[str] = mapped_column(String(200))
    suite: Mapped[str | None] = mapped_column(String(200))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    sample_count: Mapped[int] = mapped_column(Integer)
    passed_count: Mapped[int] = mapped_column(Integer)
    payload_sha256: Mapped[str] = mapped_column(String(64))
    occurred_at: Mapped[datetime | None]
    received_at: Mapped[datetime] = mapped_column(server_default=func.now())


class Signal(Base):
    """One piece of evidence about the generator: an evaluation sample, a miner hit or feedback.

    Provenance is kept whole: ``app`` + ``event_id`` (unique), the model version, the
    prompt, the image reference and the raw request payload.
    """

    __tablename__ = "signals"
    __table_args__ = (
        UniqueConstraint("app", "event_id"),
        CheckConstraint("rating IS NULL OR rating BETWEEN 1 AND 5", name="rating_range"),
        Index("ix_signals_source_id", "source", "id"),
        Index("ix_signals_kind_id", "kind", "id"),
        Index("ix_signals_model_version_id_id", "model_version_id", "id"),
        Index("ix_signals_received_at", "received_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    source: Mapped[SignalSource] = mapped_column(_enum(SignalSource, "signal_source"))
    kind: Mapped[SignalKind] = mapped_column(_enum(SignalKind, "signal_kind"))
    app: Mapped[str] = mapped_column(String(100))
    event_id: Mapped[str] = mapped_column(String(256))
    task: Mapped[Task] = mapped_column(_enum(Task, "task"))
    prompt: Mapped[str] = mapped_column(Text)
    image_uri: Mapped[str | None] = mapped_column(Text)
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    input_images: Mapped[list[Json] | None] = mapped_column(JSONB)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    evaluation_run_id: Mapped[int | None] = mapped_column(
        ForeignKey("evaluation_runs.id", ondelete="CASCADE"), index=True
    )
    # Kind-specific fields, as columns where the loop filters on them.
    thumbs_up: Mapped[bool | None]
    rating: Mapped[int | None] = mapped_column(SmallInteger)
    passed: Mapped[bool | None]
    flags: Mapped[list[str] | None] = mapped_column(ARRAY(String(32)))
    comment: Mapped[str | None] = mapped_column(Text)
    chosen_image_uri: Mapped[str | None] = mapped_column(Text)
    rejected_image_uri: Mapped[str | None] = mapped_column(Text)
    scores: Mapped[dict[str, float] | None] = mapped_column(JSONB)
    details: Mapped[Json | None] = mapped_column(JSONB)
    user_ref: Mapped[str | None] = mapped_column(String(200))
    session_ref: Mapped[str | None] = mapped_column(String(200))
    occurred_at: Mapped[datetime | None]
    received_at: Mapped[datetime] = mapped_column(server_default=func.now())
    payload: Mapped[Json] = mapped_column(JSONB)
    payload_sha256: Mapped[str] = mapped_column(String(64))


class FailureCluster(Base):
    """A theme that groups failure cases, with a readable label."""

    __tablename__ = "failure_clusters"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    label: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    fixed_at: Mapped[datetime | None]


class FailureCase(Base):
    """A failure of the generator, made from one or more near-duplicate signals."""

    __tablename__ = "failure_cases"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    dedup_key: Mapped[str] = mapped_column(String(128), unique=True)
    cluster_id: Mapped[int | None] = mapped_column(ForeignKey("failure_clusters.id"), index=True)
    status: Mapped[CaseStatus] = mapped_column(_enum(CaseStatus, "case_status"), index=True)
    task: Mapped[Task] = mapped_column(_enum(Task, "task"))
    prompt: Mapped[str] = mapped_column(Text)
    image_uri: Mapped[str | None] = mapped_column(Text)
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    skill: Mapped[str | None] = mapped_column(String(100))
    signal_count: Mapped[int] = mapped_column(Integer, server_default="0")
    first_seen_at: Mapped[datetime] = _created_at()
    last_seen_at: Mapped[datetime] = _created_at()


class CaseSignal(Base):
    """Links a failure case to every signal that made it."""

    __tablename__ = "case_signals"

    case_id: Mapped[int] = mapped_column(
        ForeignKey("failure_cases.id", ondelete="CASCADE"), primary_key=True
    )
    signal_id: Mapped[int] = mapped_column(ForeignKey("signals.id"), primary_key=True, unique=True)
    linked_at: Mapped[datetime] = _created_at()


class CaseRoute(Base):
    """One routing decision for a case; the newest row is the case's current route."""

    __tablename__ = "case_routes"
    __table_args__ = (
        CheckConstraint("confidence >= 0 AND confidence <= 1", name="confidence_unit"),
        Index("ix_case_routes_case_id_created_at", "case_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("failure_cases.id", ondelete="CASCADE"))
    track: Mapped[Track] = mapped_column(_enum(Track, "track"))
    confidence: Mapped[float] = mapped_column(Double)
    evidence: Mapped[Json] = mapped_column(JSONB)
    decided_by: Mapped[Decider] = mapped_column(_enum(Decider, "decider"))
    decider_ref: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()


class Cycle(Base):
    """One turn of the flywheel: collect, attribute, train, evaluate, review, promote."""

    __tablename__ = "cycles"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    status: Mapped[CycleStatus] = mapped_column(_enum(CycleStatus, "cycle_status"), index=True)
    base_model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    candidate_model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    config: Mapped[Json] = mapped_column(JSONB)
    summary: Mapped[Json | None] = mapped_column(JSONB)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime] = _created_at()
    finished_at: Mapped[datetime | None]


class TrainingRound(Base):
    """A training run of one track within a cycle, with its lineage."""

    __tablename__ = "training_rounds"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    cycle_id: Mapped[int] = mapped_column(ForeignKey("cycles.id"), index=True)
    track: Mapped[Track] = mapped_column(_enum(Track, "track"))
    recipe: Mapped[str] = mapped_column(String(100))
    status: Mapped[RoundStatus] = mapped_column(_enum(RoundStatus, "round_status"))
    config: Mapped[Json] = mapped_column(JSONB)
    data_manifest: Mapped[Json | None] = mapped_column(JSONB)
    metrics: Mapped[Json | None] = mapped_column(JSONB)
    evaluation: Mapped[Json | None] = mapped_column(JSONB)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class TrainingRoundCase(Base):
    """Which failure cases a training round was meant to fix."""

    __tablename__ = "training_round_cases"

    training_round_id: Mapped[int] = mapped_column(
        ForeignKey("training_rounds.id", ondelete="CASCADE"), primary_key=True
    )
    case_id: Mapped[int] = mapped_column(ForeignKey("failure_cases.id"), primary_key=True)


class Checkpoint(Base):
    """A saved model state; a promoted one names a model version."""

    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    training_round_id: Mapped[int | None] = mapped_column(
        ForeignKey("training_rounds.id"), index=True
    )
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    component: Mapped[Component] = mapped_column(
        _enum(Component, "component"), server_default=Component.GENERATOR.value
    )
    """Which part of the model version (a version is a generator, an enhancer, a reward)."""
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = _created_at()


class ReviewItem(Base):
    """An artefact waiting for (or decided by) a human reviewer."""

    __tablename__ = "review_items"
    __table_args__ = (Index("ix_review_items_status_created_at", "status", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[ReviewKind] = mapped_column(_enum(ReviewKind, "review_kind"))
    status: Mapped[ReviewStatus] = mapped_column(_enum(ReviewStatus, "review_status"))
    title: Mapped[str] = mapped_column(Text)
    artefact: Mapped[Json] = mapped_column(JSONB)
    cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"), index=True)
    training_round_id: Mapped[int | None] = mapped_column(ForeignKey("training_rounds.id"))
    case_id: Mapped[int | None] = mapped_column(ForeignKey("failure_cases.id"))
    cluster_id: Mapped[int | None] = mapped_column(ForeignKey("failure_clusters.id"))
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None]
    decided_by: Mapped[str | None] = mapped_column(String(200))
    decided_at: Mapped[datetime | None]
    decision_reason: Mapped[str | None] = mapped_column(Text)
    edits: Mapped[Json | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _created_at()


class ReviewAudit(Base):
    """Append-only history of every review state change."""

    __tablename__ = "review_audit"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    review_item_id: Mapped[int] = mapped_column(ForeignKey("review_items.id"), index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(32))
    before: Mapped[Json | None] = mapped_column(JSONB)
    after: Mapped[Json | None] = mapped_column(JSONB)
    at: Mapped[datetime] = _created_at()


class RegressionScenario(Base):
    """A fixed failure kept forever as a test of every later candidate."""

    __tablename__ = "regression_scenarios"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    cluster_id: Mapped[int | None] = mapped_column(ForeignKey("failure_clusters.id"))
    source_case_id: Mapped[int | None] = mapped_column(ForeignKey("failure_cases.id"))
    fixed_in_cycle_id: Mapped[int | None] = mapped_column(ForeignKey("cycles.id"))
    task: Mapped[Task] = mapped_column(_enum(Task, "task"))
    prompt: Mapped[str] = mapped_column(Text)
    skill: Mapped[str | None] = mapped_column(String(100))
    spec: Mapped[Json | None] = mapped_column(JSONB)
    active: Mapped[bool] = mapped_column(Boolean, server_default="true")
    created_at: Mapped[datetime] = _created_at()
