"""Settings come from FLYWHEEL_* variables, through a cached factory, never at import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.db.engine import database_url
from flywheel.settings import Settings, get_settings


def test_environment_variables_map_onto_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", "postgresql://u@db:5432/fw")
    monkeypatch.setenv("FLYWHEEL_QDRANT_URL", "http://qdrant:6333")
    monkeypatch.setenv("FLYWHEEL_REDIS_URL", "redis://redis:6379/0")
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    get_settings.cache_clear()
    try:
        settings = get_settings()
        assert get_settings() is settings  # built once
    finally:
        get_settings.cache_clear()
    assert settings.database_url == "postgresql://u@db:5432/fw"
    assert settings.qdrant_url == "http://qdrant:6333"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.home == tmp_path
    assert settings.qdrant_path == tmp_path / "qdrant"


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "QDRANT_URL", "REDIS_URL", "HOME"):
        monkeypatch.delenv(f"FLYWHEEL_{name}", raising=False)
    settings = Settings(_env_file=None)
    assert settings.database_url is None
    assert settings.qdrant_url is None
    assert settings.redis_url is None
    assert settings.home == Path("~/.flywheel").expanduser()


def test_database_url_normalizes_the_driver() -> None:
    url = database_url(Settings(database_url="postgres://u:p@h:5/d"))
    assert url == "postgresql+psycopg://u:p@h:5/d"
    with pytest.raises(ValueError, match="PostgreSQL URL"):
        database_url(Settings(database_url="mysql://u@h/d"))


def test_importing_builds_no_settings_and_starts_nothing() -> None:
    code = (
        "import flywheel.api.app, flywheel.cli.main, flywheel.demo, migrations;"
        "from flywheel.settings import get_settings;"
        "from flywheel.db import embedded;"
        "assert get_settings.cache_info().currsize == 0;"
        "assert not embedded._servers"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_embedded_default_starts_a_real_postgres(tmp_path: Path) -> None:
    """No FLYWHEEL_DATABASE_URL: a PostgreSQL is started under FLYWHEEL_HOME and used."""
    code = (
        "from flywheel.settings import Settings;"
        "from flywheel.db.engine import create_db_engine;"
        "from flywheel.db import migrate;"
        "from sqlalchemy import text;"
        f"s = Settings(home={str(tmp_path)!r});"
        "e = create_db_engine(s, pool_size=1);"
        "migrate.upgrade(e);"
        "c = e.connect();"
        "print(c.execute(text('select version()')).scalar());"
        "c.close();"
        "print(migrate.current_revision(e))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    assert out.startswith("PostgreSQL")
    assert out.strip().endswith(migrate_head())
    assert (tmp_path / "pgdata" / "PG_VERSION").exists()


def migrate_head() -> str:
    from flywheel.db.migrate import head_revision

    return head_revision()
