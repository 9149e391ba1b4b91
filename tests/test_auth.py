"""The auth matrix: each protected endpoint against no key, bad keys, revoked keys, each scope."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from flywheel.auth.repository import revoke_api_key
from flywheel.auth.service import KEY_PATTERN, create_api_key
from flywheel.db.models import ApiKey, Scope
from tests.conftest import KeyFactory
from tests.helpers import auth, new_id, thumbs_event


def _evaluation() -> dict[str, Any]:
    return {
        "run_id": new_id("run"),
        "benchmark": "b",
        "model_version": "v",
        "samples": [
            {
                "sample_id": "s",
                "prompt": "p",
                "image": {"uri": "s3://x/y.png"},
                "scores": {"a": 1.0},
                "passed": True,
            }
        ],
    }


NO_ITEM = 2**53 - 1
# (method, path, body factory, the scope it needs, success status: None where the answer
# depends on state, e.g. 404 for an item that does not exist, which still proves the key
# was let through)
ENDPOINTS: list[tuple[str, str, Any, str, int | None]] = [
    ("POST", "/v1/feedback", thumbs_event, "ingest", 201),
    ("POST", "/v1/feedback/batch", lambda: {"events": [thumbs_event()]}, "ingest", 207),
    ("POST", "/v1/evaluations", _evaluation, "ingest", 201),
    ("GET", "/v1/signals", None, "read", 200),
    ("GET", "/v1/review/items", None, "review", 200),
    ("GET", f"/v1/review/items/{NO_ITEM}", None, "review", 404),
    ("POST", "/v1/review/claim", lambda: {"kind": "model_promotion"}, "review", None),
    ("POST", f"/v1/review/items/{NO_ITEM}/release", None, "review", 404),
    ("POST", f"/v1/review/items/{NO_ITEM}/approve", lambda: {}, "review", 404),
    ("POST", f"/v1/review/items/{NO_ITEM}/reject", lambda: {"reason": "no"}, "review", 404),
    (
        "POST",
        f"/v1/review/clusters/{NO_ITEM}/decide",
        lambda: {"kind": "triage_case", "decision": "reject", "reason": "no"},
        "review",
        404,
    ),
]
PUBLIC = {"GET /healthz", "GET /readyz"}
ALL_SCOPES = [s.value for s in Scope]


def _call(client: TestClient, method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
    return client.request(method, path, json=body() if body else None, headers=headers)


def _let_through(reply: Any, ok: int | None) -> bool:
    if ok is not None:
        return bool(reply.status_code == ok)
    return reply.status_code not in (401, 403) and reply.status_code < 500


def test_the_matrix_covers_every_operation_of_the_spec(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operations = {f"{m.upper()} {p}" for p, item in spec["paths"].items() for m in item}
    templated = {"clusters": "{cluster_id}", "items": "{item_id}"}
    covered = set()
    for method, path, *_ in ENDPOINTS:
        parts = path.split("/")
        for i, part in enumerate(parts):
            if part == str(NO_ITEM):
                parts[i] = templated[parts[i - 1]]
        covered.add(f"{method} {'/'.join(parts)}")
    assert operations == covered | PUBLIC
    for operation in operations - PUBLIC:
        method, path = operation.split(" ", 1)
        assert spec["paths"][path][method.lower()]["security"] == [{"HTTPBearer": []}], operation


@pytest.mark.parametrize(("method", "path", "body", "needed", "ok"), ENDPOINTS)
def test_auth_matrix(
    client: TestClient,
    make_key: KeyFactory,
    session: Session,
    method: str,
    path: str,
    body: Any,
    needed: str,
    ok: int | None,
) -> None:
    malformed = {"Authorization": "Bearer not-a-key"}
    well_formed_unknown = auth("fwk_0123456789ab_" + "A" * 43)
    wrong_scheme = {"Authorization": "Basic dXNlcjpwYXNz"}
    for headers in ({}, malformed, well_formed_unknown, wrong_scheme):
        reply = _call(client, method, path, body, headers)
        assert reply.status_code == 401, (headers, reply.text)
        assert reply.headers["WWW-Authenticate"] == "Bearer"

    for scope in ALL_SCOPES:
        reply = _call(client, method, path, body, auth(make_key(scope)))
        if scope in (needed, "admin"):
            assert _let_through(reply, ok), (scope, reply.status_code, reply.text)
        else:
            assert reply.status_code == 403, (scope, reply.text)
            assert needed in reply.json()["detail"]

    others = [s for s in ALL_SCOPES if s not in (needed, "admin")]
    both = make_key(needed, others[0])
    assert _let_through(_call(client, method, path, body, auth(both)), ok)

    revoked = make_key(needed)
    prefix = KEY_PATTERN.fullmatch(revoked)
    assert prefix is not None
    revoke_api_key(session, prefix=prefix.group(1))
    session.commit()
    assert _call(client, method, path, body, auth(revoked)).status_code == 401


def test_health_endpoints_need_no_key(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_keys_are_stored_only_as_hashes(session: Session) -> None:
    created = create_api_key(session, app="hash-check", scopes=[Scope.READ])
    session.commit()

    row = session.scalars(select(ApiKey).where(ApiKey.id == created.record.id)).one()
    stored = [str(v) for v in (row.app, row.prefix, row.secret_hash, row.scopes)]
    assert all(created.secret not in value for value in stored)
    secret_part = created.secret.rsplit("_", 1)[1]
    assert all(secret_part not in value for value in stored)
    assert len(row.secret_hash) == 64


def test_invalid_app_names_are_refused(session: Session) -> None:
    with pytest.raises(ValueError, match="invalid app name"):
        create_api_key(session, app="has space", scopes=[Scope.READ])
