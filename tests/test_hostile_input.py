"""Hostile strings through the API: SQL, HTML, control and formatting characters, bidi
overrides, decomposed Unicode, astral characters — stored byte for byte, read back the
same, replayed idempotently; in query filters they are refused, never interpreted.
(How the dashboard shows them: tests/test_dashboard.py.)"""

from __future__ import annotations

import unicodedata
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from flywheel.db.models import Signal
from tests.conftest import KeyFactory
from tests.helpers import auth, new_id, thumbs_event

HOSTILE = [
    "'; DROP TABLE signals; --",
    "\" OR 1=1 -- ' OR ''='",
    "<script>alert(document.cookie)</script><img src=x onerror=alert(1)>",
    "![pixel](http://127.0.0.1:9/p.png) [x](javascript:alert(1)) $x^2$ :red[red] **b** # h",
    "bell \x07 esc \x1b[31m tab \t cr \r lf \n del \x7f c1 \x85 \x9b",
    "bidi \u202egnp.exe\u202c zero\u200bwidth \ufeff bom",
    "decomposed e\u0301 vs composed \u00e9",
    "astral \U0001f600 \U00020000 \U0010fffd",
    "%s %(name)s {0} {name!r} \\N{BULLET} \\u0000 \\x00",
    "null",
    " leading and trailing blanks  ",
    "a" * 20_000,
]


def _feedback(prompt: str) -> dict[str, Any]:
    event = thumbs_event(
        event_id=new_id("hostile"),
        prompt=prompt,
        user_id=prompt[:200],
        session_id=prompt[-200:],
        kind="flags",
        flags=["other"],
        note=prompt[:10_000],
    )
    del event["value"]
    return event


@pytest.mark.parametrize("hostile", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_strings_are_stored_verbatim(
    client: TestClient, make_key: KeyFactory, session: Session, hostile: str
) -> None:
    key = make_key("ingest", "read")
    event = _feedback(hostile)
    created = client.post("/v1/feedback", json=event, headers=auth(key))
    assert created.status_code == 201, created.text

    row = session.scalars(select(Signal).where(Signal.id == created.json()["id"])).one()
    assert (row.prompt, row.user_ref, row.session_ref, row.comment) == (
        hostile,
        hostile[:200],
        hostile[-200:],
        hostile[:10_000],
    )
    if "decomposed" in hostile:  # not normalized: NFD stays NFD
        assert unicodedata.normalize("NFC", row.prompt) != row.prompt
    (read,) = [
        item
        for item in client.get("/v1/signals", params={"limit": 5}, headers=auth(key)).json()[
            "items"
        ]
        if item["event_id"] == event["event_id"]
    ]
    assert (read["prompt"], read["user_id"], read["comment"]) == (
        hostile,
        hostile[:200],
        hostile[:10_000],
    )
    replay = client.post("/v1/feedback", json=event, headers=auth(key))
    assert replay.status_code == 200
    assert replay.json()["id"] == created.json()["id"]


def test_the_tables_are_still_there(session: Session) -> None:
    """After every injection attempt above (and in any order), the schema is intact."""
    tables = set(
        session.scalars(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
    )
    assert {"signals", "api_keys", "failure_cases"} <= tables


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("model_version", "' OR 1=1 --"),
        ("app", "x'; DROP TABLE signals; --"),
        ("source", "feedback' OR 'a'='a"),
        ("since", "now(); DROP TABLE signals"),
        ("cursor", "' UNION SELECT * FROM api_keys --"),
    ],
)
def test_hostile_filters_are_refused_not_interpreted(
    client: TestClient, make_key: KeyFactory, name: str, value: str
) -> None:
    reply = client.get("/v1/signals", params={name: value}, headers=auth(make_key("admin")))
    assert reply.status_code in (400, 422), reply.text
    assert name in reply.text
