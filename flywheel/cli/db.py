"""``flywheel db``: the database's migrations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from flywheel.cli.output import console, fail
from flywheel.cli.services import database

db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Migrate the database up (to head by default)."""
    from flywheel.db import migrate

    with database() as engine:
        run_migration(lambda: migrate.upgrade(engine, revision), revision)
        console.print(f"database at revision {migrate.current_revision(engine)}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision; 'base' empties the database.")],
) -> None:
    """Migrate the database down to REVISION."""
    from flywheel.db import migrate

    with database() as engine:
        run_migration(lambda: migrate.downgrade(engine, revision), revision)
        console.print(f"database at revision {migrate.current_revision(engine) or 'base'}")


@db_app.command("revision")
def db_revision(
    message: Annotated[str, typer.Option("--message", "-m", help="What the migration does.")],
) -> None:
    """For developers: write a migration for what the models changed (database must be at head)."""
    from flywheel.db import migrate

    with database() as engine:
        if migrate.current_revision(engine) != migrate.head_revision():
            fail("the database is not at head: run `flywheel db upgrade` first")
        path = migrate.autogenerate_revision(engine, message)
    console.print(f"wrote {path}: review it before committing")


@db_app.command("current")
def db_current() -> None:
    """Print the database's revision and the code's head."""
    from flywheel.db import migrate

    with database() as engine:
        current = migrate.current_revision(engine)
    head = migrate.head_revision()
    state = "up to date" if current == head else "behind: run `flywheel db upgrade`"
    console.print(f"{current or 'base'} (head {head}, {state})")


def run_migration(step: Callable[[], None], revision: str) -> None:
    """Run a migration ``step``; a revision Alembic refuses exits 2 with its reason."""
    from alembic.util import CommandError

    try:
        step()
    except CommandError as exc:
        fail(f"cannot migrate to {revision!r}: {exc}")
