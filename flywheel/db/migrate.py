"""Alembic, driven from Python: upgrade, downgrade and the current revision."""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import migrations


def alembic_config(engine: Engine) -> Config:
    """An Alembic config over the packaged ``migrations/`` scripts."""
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("path_separator", "os")
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database up to ``revision``."""
    config = alembic_config(engine)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the database down to ``revision`` (``base`` drops everything)."""
    config = alembic_config(engine)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def autogenerate_revision(
    engine: Engine, message: str, *, version_path: Path | None = None
) -> Path:
    """Write a new migration from the difference between the models and a database at head.

    ``version_path`` puts the file elsewhere than ``migrations/versions`` (tests use it).
    """
    config = alembic_config(engine)
    if version_path is not None:
        versions = Path(migrations.__file__).parent / "versions"
        config.set_main_option("path_separator", "os")
        config.set_main_option(
            "version_locations", os.pathsep.join([str(versions), str(version_path)])
        )
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        script = command.revision(
            config,
            message=message,
            autogenerate=True,
            version_path=str(version_path) if version_path else None,
        )
    if script is None or isinstance(script, list):
        raise RuntimeError("alembic wrote no single revision")
    return Path(script.path)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or ``None`` for an empty database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    """The newest revision the code knows."""
    head = ScriptDirectory(str(Path(migrations.__file__).parent)).get_current_head()
    assert head is not None
    return head
