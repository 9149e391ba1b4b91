"""``flywheel keys``: the per-app API keys (create, list, revoke, set a request limit)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from flywheel.cli.output import console, err_console, fail
from flywheel.cli.services import database

keys_app = typer.Typer(help="Per-app API keys.", no_args_is_help=True)


@keys_app.command("create")
def keys_create(
    app_name: Annotated[str, typer.Option("--app", help="The app the key belongs to.")],
    scopes: Annotated[
        str, typer.Option("--scopes", help="Comma-separated: ingest, read, triage, review, admin.")
    ],
    rate_limit: Annotated[
        str | None,
        typer.Option(
            "--rate-limit",
            help="This key's request limit ('50/second;2000/minute', or 'off'); "
            "default: FLYWHEEL_RATE_LIMIT.",
        ),
    ] = None,
) -> None:
    """Create a key and print it once (only its hash is stored)."""
    from flywheel.auth.service import create_api_key, parse_scopes
    from flywheel.db.engine import session_factory

    try:
        parsed = parse_scopes(scopes.split(","))
    except ValueError as exc:
        fail(str(exc))
    with database() as engine, session_factory(engine)() as session:
        try:
            created = create_api_key(session, app=app_name, scopes=parsed, rate_limit=rate_limit)
        except ValueError as exc:
            fail(str(exc))
        session.commit()
    err_console.print(
        f"created key {created.record.prefix} for app {app_name!r} with scopes "
        f"{','.join(s.value for s in parsed)}; it is shown only now:",
        highlight=False,
    )
    print(created.secret)


@keys_app.command("list")
def keys_list(
    include_revoked: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
) -> None:
    """List keys (prefix, app, scopes, rate limit, created, revoked); secrets are never shown."""
    from flywheel.auth.repository import list_api_keys
    from flywheel.db.engine import session_factory

    with database() as engine, session_factory(engine)() as session:
        keys = list_api_keys(session, include_revoked=include_revoked)
    table = Table("prefix", "app", "scopes", "rate limit", "created", "revoked")
    for key in keys:
        table.add_row(
            key.prefix,
            key.app,
            ",".join(key.scopes),
            key.rate_limit or "default",
            f"{key.created_at:%Y-%m-%d %H:%M:%S}",
            f"{key.revoked_at:%Y-%m-%d %H:%M:%S}" if key.revoked_at else "",
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    prefix: Annotated[str, typer.Argument(help="The key's prefix, as `keys list` shows it.")],
) -> None:
    """Revoke a key; requests with it get 401 from then on."""
    from flywheel.auth.repository import revoke_api_key
    from flywheel.db.engine import session_factory

    if prefix.startswith("fwk_"):
        prefix = prefix.split("_")[1]
    with database() as engine, session_factory(engine)() as session:
        key = revoke_api_key(session, prefix=prefix)
        session.commit()
    if key is None:
        fail(f"no key with prefix {prefix!r}")
    console.print(f"revoked key {key.prefix} of app {key.app!r}")


@keys_app.command("set-limit")
def keys_set_limit(
    prefix: Annotated[str, typer.Argument(help="The key's prefix, as `keys list` shows it.")],
    rate_limit: Annotated[
        str,
        typer.Argument(
            help="'50/second;2000/minute', 'off' (no limit), or 'default' (FLYWHEEL_RATE_LIMIT)."
        ),
    ],
) -> None:
    """Change a key's request limit; API processes apply it from the key's next request."""
    from flywheel.auth.rate_limit import normalized_rate_limit
    from flywheel.auth.repository import set_rate_limit
    from flywheel.db.engine import session_factory

    if prefix.startswith("fwk_"):
        prefix = prefix.split("_")[1]
    stored: str | None = None
    if rate_limit.strip().lower() != "default":
        try:
            stored = normalized_rate_limit(rate_limit)
        except ValueError as exc:
            fail(str(exc))
    with database() as engine, session_factory(engine)() as session:
        key = set_rate_limit(session, prefix=prefix, rate_limit=stored)
        session.commit()
    if key is None:
        fail(f"no key with prefix {prefix!r}")
    console.print(f"key {key.prefix} of app {key.app!r}: rate limit {stored or 'default'}")
