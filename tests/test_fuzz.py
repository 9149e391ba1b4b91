"""Property tests: whatever JSON a client sends, the API answers 2xx or 4xx, never 5xx."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import KeyFactory
from tests.helpers import auth, new_id, thumbs_event

# Any character, lone surrogates and NUL included.
_text = st.text(st.characters(exclude_categories=()), max_size=20)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)

FEEDBACK_FIELDS = [
    "kind", "event_id", "prompt", "task", "image", "input_images", "model_version",
    "user_id", "session_id", "timestamp", "value", "chosen", "rejected", "text", "flags",
    "note", "surprise",
]  # fmt: skip
SAMPLE_FIELDS = ["sample_id", "prompt", "image", "skill", "scores", "passed", "spec", "task"]

_fixture_ok = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _post(client: TestClient, key: str, path: str, body: Any) -> int:
    reply = client.post(
        path,
        content=json.dumps(body),
        headers={**auth(key), "Content-Type": "application/json"},
    )
    status: int = reply.status_code
    return status


@_fixture_ok
@given(field=st.sampled_from(FEEDBACK_FIELDS), value=json_values)
def test_feedback_never_5xx(
    client: TestClient, make_key: KeyFactory, field: str, value: Any
) -> None:
    key = make_key("ingest")
    event = thumbs_event()
    event[field] = value
    assert _post(client, key, "/v1/feedback", event) in {200, 201, 409, 422}
    assert _post(client, key, "/v1/feedback/batch", {"events": [event]}) in {207, 422}


@_fixture_ok
@given(field=st.sampled_from(SAMPLE_FIELDS), value=json_values)
def test_evaluations_never_5xx(
    client: TestClient, make_key: KeyFactory, field: str, value: Any
) -> None:
    key = make_key("ingest")
    sample: dict[str, Any] = {
        "sample_id": "s",
        "prompt": "p",
        "image": {"uri": "s3://x/y.png"},
        "scores": {"a": 0.5},
        "passed": True,
    }
    sample[field] = value
    run = {"run_id": new_id("run"), "benchmark": "b", "model_version": "v", "samples": [sample]}
    assert _post(client, key, "/v1/evaluations", run) in {201, 422}


@_fixture_ok
@given(body=json_values)
def test_any_json_body_is_answered_with_4xx(
    client: TestClient, make_key: KeyFactory, body: Any
) -> None:
    key = make_key("ingest")
    for path in ("/v1/feedback", "/v1/feedback/batch", "/v1/evaluations"):
        assert _post(client, key, path, body) == 422


@_fixture_ok
@given(params=st.dictionaries(st.sampled_from(
    ["limit", "cursor", "source", "kind", "model_version", "app", "since", "until"]
), _text, max_size=4))  # fmt: skip
def test_signal_queries_never_5xx(
    client: TestClient, make_key: KeyFactory, params: dict[str, str]
) -> None:
    key = make_key("read")
    clean = {k: v.encode("utf-8", "replace").decode() for k, v in params.items()}
    reply = client.get("/v1/signals", params=clean, headers=auth(key))
    assert reply.status_code in {200, 400, 403, 422}
