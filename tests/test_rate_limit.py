"""Per-key rate limiting: 429 with Retry-After, per key, shared by API processes through
Redis, a key's own limit, failing open when Redis is away; the CLI and settings that set it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from flywheel.api.app import create_app
from flywheel.cli.main import app as cli
from flywheel.db.models import Signal
from flywheel.settings import Settings
from tests.conftest import KeyFactory
from tests.helpers import auth, thumbs_event


def _stored(session: Session, event_id: object) -> int:
    return (
        session.scalar(
            select(func.count()).select_from(Signal).where(Signal.event_id == str(event_id))
        )
        or 0
    )


@pytest.fixture
def limited_app(settings: Settings) -> Callable[..., TestClient]:
    """A client of an app with the given default limit (and Redis URL)."""

    def build(rate_limit: str, redis_url: str | None = None) -> TestClient:
        limited = settings.model_copy(update={"rate_limit": rate_limit, "redis_url": redis_url})
        return TestClient(create_app(limited))

    return build


def test_a_key_over_its_limit_gets_429_with_retry_after(
    limited_app: Callable[..., TestClient], make_key: KeyFactory, session: Session
) -> None:
    key, other = make_key("ingest", "read"), make_key("ingest")
    with limited_app("5/minute") as client:
        codes = [
            client.post("/v1/feedback", json=thumbs_event(), headers=auth(key)).status_code
            for _ in range(5)
        ]
        assert codes == [201] * 5
        refused_event = thumbs_event()
        refused = client.post("/v1/feedback", json=refused_event, headers=auth(key))
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert "5 per 1 minute" in refused.json()["detail"]
        assert _stored(session, refused_event["event_id"]) == 0  # refused, not stored
        # Every endpoint counts against the same key; other keys have their own budget.
        assert client.get("/v1/signals", headers=auth(key)).status_code == 429
        assert (
            client.post("/v1/feedback", json=thumbs_event(), headers=auth(other)).status_code == 201
        )
        # Refusals before the key is known are not counted (and need no budget).
        assert client.get("/v1/signals").status_code == 401
        assert client.get("/healthz").status_code == 200


def test_retry_after_is_honest(
    limited_app: Callable[..., TestClient], make_key: KeyFactory
) -> None:
    key = make_key("read")
    with limited_app("2/second") as client:
        replies = [client.get("/v1/signals", headers=auth(key)) for _ in range(3)]
        assert [r.status_code for r in replies] == [200, 200, 429]
        time.sleep(int(replies[-1].headers["Retry-After"]))
        assert client.get("/v1/signals", headers=auth(key)).status_code == 200


def test_a_keys_own_limit_replaces_the_default(
    limited_app: Callable[..., TestClient], make_key: KeyFactory, session: Session
) -> None:
    from flywheel.auth.repository import set_rate_limit

    tight, unlimited = make_key("read"), make_key("read")
    for secret, limit in ((tight, "2/minute"), (unlimited, "off")):
        set_rate_limit(session, prefix=secret.split("_")[1], rate_limit=limit)
    session.commit()
    with limited_app("4/minute") as client:
        tight_codes = [client.get("/v1/signals", headers=auth(tight)).status_code for _ in range(3)]
        assert tight_codes == [200, 200, 429]
        free_codes = {
            client.get("/v1/signals", headers=auth(unlimited)).status_code for _ in range(8)
        }
        assert free_codes == {200}


def test_api_processes_share_the_count_through_redis(
    limited_app: Callable[..., TestClient], make_key: KeyFactory, redis_url: str
) -> None:
    key = make_key("read")
    with limited_app("6/minute", redis_url) as first, limited_app("6/minute", redis_url) as second:
        codes = [
            client.get("/v1/signals", headers=auth(key)).status_code
            for client in (first, second, first, second, first, second)
        ]
        assert codes == [200] * 6
        assert first.get("/v1/signals", headers=auth(key)).status_code == 429
        assert second.get("/v1/signals", headers=auth(key)).status_code == 429


def test_requests_pass_when_redis_is_away(
    limited_app: Callable[..., TestClient],
    make_key: KeyFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = make_key("read")
    with (
        caplog.at_level(logging.WARNING, logger="flywheel.auth.rate_limit"),
        limited_app("1/minute", "redis://127.0.0.1:1/0") as client,
    ):
        codes = {client.get("/v1/signals", headers=auth(key)).status_code for _ in range(3)}
    assert codes == {200}
    assert "rate limit counter unavailable" in caplog.text


def test_settings_refuse_a_malformed_limit() -> None:
    with pytest.raises(ValidationError, match="invalid rate limit 'lots'"):
        Settings(rate_limit="lots")
    assert Settings(rate_limit=" 10/Second ; 100/minute").rate_limit == "10/second ; 100/minute"
    assert Settings(rate_limit="OFF").rate_limit == "off"


runner = CliRunner()


@pytest.fixture
def cli_database(migrated_url: str, use_database: Callable[[str], None]) -> str:
    """A migrated database the CLI finds through FLYWHEEL_DATABASE_URL."""
    use_database(migrated_url)
    return migrated_url


def test_cli_sets_and_shows_a_keys_limit(cli_database: str) -> None:
    made = runner.invoke(
        cli, ["keys", "create", "--app", "web", "--scopes", "read", "--rate-limit", "50/Second"]
    )
    assert made.exit_code == 0, made.output
    prefix = made.stdout.strip().split("_")[1]
    listed = runner.invoke(cli, ["keys", "list"], terminal_width=200)
    assert "50/second" in listed.output

    changed = runner.invoke(cli, ["keys", "set-limit", prefix, "default"])
    assert changed.exit_code == 0, changed.output
    assert "rate limit default" in changed.output
    assert "50/second" not in runner.invoke(cli, ["keys", "list"], terminal_width=200).output

    bad = runner.invoke(cli, ["keys", "set-limit", prefix, "often"])
    assert bad.exit_code == 2
    assert "invalid rate limit 'often'" in bad.output
    unknown = runner.invoke(cli, ["keys", "set-limit", "000000000000", "5/minute"])
    assert unknown.exit_code == 2
    assert "no key with prefix" in unknown.output
    refused = runner.invoke(
        cli, ["keys", "create", "--app", "web", "--scopes", "read", "--rate-limit", "x"]
    )
    assert refused.exit_code == 2
    assert "invalid rate limit" in refused.output
