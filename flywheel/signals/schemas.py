"""Pydantic schemas of the signal API: what product apps and evaluation runs send, and
what they get back. Separate from the ORM models in :mod:`flywheel.db.models`.

Every request schema carries an example that shows up in the OpenAPI spec.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    JsonValue,
    SkipValidation,
    StrictBool,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from flywheel.db.models import SignalKind, SignalSource, Task


def _no_nul(value: str) -> str:
    # PostgreSQL text and jsonb hold neither U+0000 nor lone surrogates; refuse both here.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (U+0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogate code points)") from None
    return value


def _json_without_nul(value: Any) -> Any:
    if isinstance(value, str):
        _no_nul(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _no_nul(key)
            _json_without_nul(item)
    elif isinstance(value, list):
        for item in value:
            _json_without_nul(item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers must be finite")
    return value


def _to_utc(value: datetime) -> datetime:
    # PostgreSQL refuses offsets beyond ±15:59 that ISO 8601 allows; store every time in UTC.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("must be a time between the years 1 and 9999 in UTC") from None


def _whole_number(value: Any) -> Any:
    # JSON Schema counts 4.0 as an integer; so does the API (4.5 and "4" stay refused).
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class _Storable:
    """Text PostgreSQL can hold: no NUL, no lone surrogate (checked after pydantic-core's
    length and pattern constraints); the spec states the NUL rule as a pattern."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(_no_nul, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema.setdefault("pattern", NUL_FREE_PATTERN)
        return json_schema


NUL_FREE_PATTERN = r"^[^\u0000]*$"
STORABLE = _Storable()


Prompt = Annotated[str, StringConstraints(min_length=1, max_length=20_000), STORABLE]
LongText = Annotated[str, StringConstraints(min_length=1, max_length=10_000), STORABLE]
Identifier = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$"),
    Field(description="1-200 printable ASCII characters, no spaces."),
]
# A run's samples are stored under the event id ``eval:<run_id>:<sample_id>`` (≤ 246).
RunIdentifier = Annotated[
    str,
    StringConstraints(min_length=1, max_length=120, pattern=r"^[\x21-\x7e]+$"),
    Field(description="1-120 printable ASCII characters, no spaces."),
]
OpaqueRef = Annotated[str, StringConstraints(min_length=1, max_length=200), STORABLE]
SKILL_PATTERN = r"^[A-Za-z0-9_.:/-]+$"
SkillName = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=SKILL_PATTERN)]
Score = Annotated[float, AfterValidator(_finite)]
# pydantic states a dict's key pattern as patternProperties, which lets other keys through
# in the spec; say what the API enforces.
Scores = Annotated[
    dict[SkillName, Score],
    Field(max_length=64),
    WithJsonSchema(
        {
            "type": "object",
            "maxProperties": 64,
            "propertyNames": {
                "type": "string",
                "minLength": 1,
                "maxLength": 100,
                "pattern": SKILL_PATTERN,
            },
            "additionalProperties": {"type": "number"},
        }
    ),
]
Timestamp = Annotated[AwareDatetime, AfterValidator(_to_utc)]
"""A time with its offset, stored in UTC."""
JsonObject = Annotated[dict[str, JsonValue], AfterValidator(_json_without_nul)]

Flag = Literal[
    "text_wrong", "artifact", "ignored_instruction", "wrong_count", "wrong_color", "other"
]

_EXAMPLE_IMAGE: JsonDict = {
    "uri": "s3://gen-outputs/2026/11/24/7f3a.png",
    "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
}


# No control character or Unicode space after the scheme, spelled out (not \s, which means
# different characters to Python, Rust and ECMA regular expressions: the spec's readers).
URI_PATTERN = (
    r"^[A-Za-z][A-Za-z0-9+.-]*:"
    r"[^\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]+$"
)


class ImageRef(BaseModel):
    """Where an image lives, optionally with its content hash."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_EXAMPLE_IMAGE]})

    uri: Annotated[
        str,
        StringConstraints(max_length=4096, pattern=URI_PATTERN),
        STORABLE,
        Field(description="URI with a scheme: s3://, gs://, https://, file://, ..."),
    ]
    sha256: (
        Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$", to_lower=True)] | None
    ) = None


class _FeedbackBase(BaseModel):
    # Only typed fields here, no free-form mappings: the service relies on
    # ``model_dump_json()`` of a validated event being canonical for idempotency.
    model_config = ConfigDict(extra="forbid")

    event_id: Identifier = Field(
        description="The app's own id for this event: replays are idempotent."
    )
    prompt: Prompt = Field(description="What the user asked for, as they typed it.")
    served_prompt: Prompt | None = Field(
        default=None,
        description="The prompt the model was given, where the app rewrote `prompt` (its "
        "prompt enhancer); omitted: the model was given `prompt` as typed. Attribution's "
        "rewrite test draws it to reproduce the failure.",
    )
    task: Task = Task.TEXT_TO_IMAGE
    image: ImageRef | None = Field(
        default=None, description="The generated image the feedback is about."
    )
    input_images: Annotated[list[ImageRef], Field(max_length=16)] = Field(
        default_factory=list, description="Input images of an editing request, in order."
    )
    model_version: Identifier
    user_id: OpaqueRef | None = Field(default=None, description="The app's opaque user id.")
    session_id: OpaqueRef | None = Field(default=None, description="The app's opaque session id.")
    timestamp: Timestamp | None = Field(default=None, description="When the user gave it.")

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        # The spec states the rule below too: image_editing → at least one input image.
        json_schema = handler.resolve_ref_schema(handler(schema))
        json_schema["if"] = {
            "properties": {"task": {"const": Task.IMAGE_EDITING.value}},
            "required": ["task"],
        }
        json_schema["then"] = {
            "properties": {"input_images": {"minItems": 1}},
            "required": ["input_images"],
        }
        return json_schema

    @model_validator(mode="after")
    def _editing_needs_inputs(self) -> _FeedbackBase:
        if self.task is Task.IMAGE_EDITING and not self.input_images:
            raise ValueError("input_images: an image_editing event needs at least one input image")
        return self


class _SingleImageFeedback(_FeedbackBase):
    image: ImageRef = Field(description="The generated image the feedback is about.")


def _example(kind: str, **fields: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "event_id": f"evt-{kind}-0001",
        "prompt": "A red bicycle leaning on a wall with the sign 'OPEN 24H'",
        "image": _EXAMPLE_IMAGE,
        "model_version": "qwen-image-2.1-rc3",
        "user_id": "u-5c1e",
        "session_id": "s-88a0",
        "timestamp": "2026-11-24T09:15:00Z",
        **fields,
    }


class ThumbsFeedback(_SingleImageFeedback):
    """Thumbs up or down on one image."""

    model_config = ConfigDict(json_schema_extra={"examples": [_example("thumbs", value="down")]})
    kind: Literal["thumbs"]
    value: Literal["up", "down"]


class RatingFeedback(_SingleImageFeedback):
    """A 1-5 star rating of one image."""

    model_config = ConfigDict(json_schema_extra={"examples": [_example("rating", value=2)]})
    kind: Literal["rating"]
    value: Annotated[StrictInt, Field(ge=1, le=5), BeforeValidator(_whole_number)]


class PairwiseFeedback(_FeedbackBase):
    """The user preferred one of two images for the same prompt."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                _example(
                    "pairwise",
                    image=None,
                    chosen={"uri": "s3://gen-outputs/a.png"},
                    rejected={"uri": "s3://gen-outputs/b.png"},
                )
            ]
        }
    )
    kind: Literal["pairwise"]
    chosen: ImageRef
    rejected: ImageRef

    @model_validator(mode="after")
    def _distinct(self) -> PairwiseFeedback:
        if self.chosen.uri == self.rejected.uri:
            raise ValueError("rejected: must be a different image from chosen")
        return self


class CommentFeedback(_SingleImageFeedback):
    """Free-text comment on one image."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [_example("comment", text="The sign says 'OPEN 42H'.")]}
    )
    kind: Literal["comment"]
    text: LongText


class FlagsFeedback(_SingleImageFeedback):
    """One or more problem flags on one image."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [_example("flags", flags=["text_wrong"], note="sign text garbled")]
        }
    )
    kind: Literal["flags"]
    flags: Annotated[
        list[Flag], Field(min_length=1, max_length=6, json_schema_extra={"uniqueItems": True})
    ]
    note: LongText | None = None

    @field_validator("flags")
    @classmethod
    def _unique(cls, flags: list[str]) -> list[str]:
        if len(set(flags)) != len(flags):
            raise ValueError("flags must not repeat")
        return flags


FeedbackEvent = Annotated[
    ThumbsFeedback | RatingFeedback | PairwiseFeedback | CommentFeedback | FlagsFeedback,
    Field(discriminator="kind"),
]
FEEDBACK_EVENT: TypeAdapter[FeedbackEvent] = TypeAdapter(FeedbackEvent)

MAX_BATCH_EVENTS = 1000


class FeedbackBatchIn(BaseModel):
    """Up to 1,000 feedback events; each is validated and stored on its own."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"events": [_example("thumbs", value="up"), _example("rating", value=4)]}]
        },
    )
    # Items are validated one by one in the service, so a bad one cannot sink the batch.
    events: Annotated[
        list[SkipValidation[FeedbackEvent]],
        Field(min_length=1, max_length=MAX_BATCH_EVENTS),
    ]


class EvaluationSample(BaseModel):
    """One sample of an evaluation run."""

    model_config = ConfigDict(extra="forbid")

    sample_id: RunIdentifier
    prompt: Prompt
    task: Task = Task.TEXT_TO_IMAGE
    image: ImageRef
    input_images: Annotated[list[ImageRef], Field(max_length=16)] = Field(default_factory=list)
    skill: SkillName | None = Field(default=None, description="The skill this sample tests.")
    scores: Scores = Field(
        description="Per-skill scores, finite numbers (conventionally in [0, 1])."
    )
    passed: StrictBool
    spec: JsonObject | None = Field(
        default=None, description="The benchmark's structured intent for this sample."
    )


class EvaluationRunIn(BaseModel):
    """One evaluation run of a benchmark on one model version."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "run_id": "nightly-2026-11-24",
                    "benchmark": "world-v1",
                    "suite": "standard",
                    "model_version": "qwen-image-2.1-rc3",
                    "timestamp": "2026-11-24T03:00:00Z",
                    "samples": [
                        {
                            "sample_id": "text-latin-017",
                            "prompt": "A poster that reads 'SALE 50%'",
                            "image": {"uri": "s3://eval/nightly/text-latin-017.png"},
                            "skill": "text_latin",
                            "scores": {"text_latin": 0.35, "overall": 0.6},
                            "passed": False,
                        }
                    ],
                }
            ]
        },
    )

    run_id: RunIdentifier
    benchmark: Identifier
    suite: Identifier | None = None
    model_version: Identifier
    timestamp: Timestamp | None = None
    samples: Annotated[list[EvaluationSample], Field(min_length=1, max_length=10_000)]

    @field_validator("samples")
    @classmethod
    def _unique_ids(cls, samples: list[EvaluationSample]) -> list[EvaluationSample]:
        seen: set[str] = set()
        for sample in samples:
            if sample.sample_id in seen:
                raise ValueError(f"sample_id {sample.sample_id!r} appears more than once")
            seen.add(sample.sample_id)
        return samples


class SignalQuery(BaseModel):
    """Filters and paging of ``GET /v1/signals`` (query parameters)."""

    limit: Annotated[int, Field(ge=1, le=500)] = 100
    cursor: Annotated[str | None, Field(max_length=64, description="next_cursor of a page")] = None
    source: SignalSource | None = None
    kind: SignalKind | None = None
    model_version: Identifier | None = None
    app: Identifier | None = Field(
        default=None, description="Admin keys only; other keys see their own app."
    )
    since: Timestamp | None = Field(default=None, description="received_at >= since")
    until: Timestamp | None = Field(default=None, description="received_at < until")


# ---- responses ---------------------------------------------------------------------


class IngestResult(BaseModel):
    """The stored event. A replay of the same event gets the same result back."""

    id: int
    app: str
    event_id: str
    source: SignalSource
    kind: SignalKind
    received_at: datetime


BatchItemStatus = Literal["created", "duplicate", "conflict", "invalid"]


class BatchItemResult(BaseModel):
    """The outcome of one event of a batch; ``status_code`` is what a single POST would answer."""

    index: int
    event_id: str | None
    status: BatchItemStatus
    status_code: int
    id: int | None = None
    received_at: datetime | None = None
    error: str | None = None


class BatchResult(BaseModel):
    results: list[BatchItemResult]
    created: int
    duplicates: int
    conflicts: int
    invalid: int


class EvaluationRunResult(BaseModel):
    """The stored run; each sample became one signal of source ``evaluation``."""

    id: int
    app: str
    run_id: str
    benchmark: str
    suite: str | None
    model_version: str
    samples: int
    passed: int
    received_at: datetime


class SignalOut(BaseModel):
    id: int
    source: SignalSource
    kind: SignalKind
    app: str
    event_id: str
    task: Task
    prompt: str
    image: ImageRef | None
    input_images: list[ImageRef]
    model_version: str | None
    evaluation_run_id: int | None
    thumbs_up: bool | None
    rating: int | None
    passed: bool | None
    flags: list[str] | None
    comment: str | None
    chosen_image_uri: str | None
    rejected_image_uri: str | None
    scores: dict[str, float] | None
    details: dict[str, Any] | None
    user_id: str | None
    session_id: str | None
    timestamp: datetime | None
    received_at: datetime


class SignalPage(BaseModel):
    """One page of signals, newest first; pass ``next_cursor`` back as ``cursor`` for the next."""

    items: list[SignalOut]
    next_cursor: str | None
