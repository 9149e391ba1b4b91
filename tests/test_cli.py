"""The CLI against a real database: migrations, keys, and one-line errors with exit codes."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from flywheel.cli.main import app
from flywheel.settings import Settings
from tests.helpers import auth, thumbs_event

runner = CliRunner()


@pytest.fixture
def cli_database(create_database: Callable[[], str], use_database: Callable[[str], None]) -> str:
    """A fresh database that the CLI finds through FLYWHEEL_DATABASE_URL."""
    url = create_database()
    use_database(url)
    return url


def test_db_upgrade_current_downgrade(cli_database: str) -> None:
    result = runner.invoke(app, ["db", "current"])
    assert result.exit_code == 0, result.output
    assert "base" in result.output
    assert "behind" in result.output

    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["db", "current"])
    assert "up to date" in result.output

    result = runner.invoke(app, ["db", "downgrade", "base"])
    assert result.exit_code == 0, result.output
    assert "base" in result.output


def test_db_downgrade_to_unknown_revision_is_a_clean_error(cli_database: str) -> None:
    runner.invoke(app, ["db", "upgrade"])
    result = runner.invoke(app, ["db", "downgrade", "no-such-rev"])
    assert result.exit_code == 2
    assert "no-such-rev" in result.output
    assert "Traceback" not in result.output


def test_keys_create_list_revoke(cli_database: str) -> None:
    runner.invoke(app, ["db", "upgrade"])
    created = runner.invoke(app, ["keys", "create", "--app", "web", "--scopes", "ingest,read"])
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("fwk_")
    prefix = secret.split("_")[1]

    listed = runner.invoke(app, ["keys", "list"])
    assert prefix in listed.output
    assert "ingest,read" in listed.output
    assert secret[len("fwk_") + 13 :] not in listed.output

    revoked = runner.invoke(app, ["keys", "revoke", prefix])
    assert revoked.exit_code == 0, revoked.output
    assert prefix not in runner.invoke(app, ["keys", "list"]).output
    assert prefix in runner.invoke(app, ["keys", "list", "--all"]).output


def test_created_key_works_against_the_api(
    settings: Settings, client: TestClient, use_database: Callable[[str], None]
) -> None:
    assert settings.database_url is not None
    use_database(settings.database_url)
    created = runner.invoke(app, ["keys", "create", "--app", "cli-app", "--scopes", "ingest"])
    secret = created.stdout.strip().splitlines()[-1]
    reply = client.post("/v1/feedback", json=thumbs_event(), headers=auth(secret))
    assert reply.status_code == 201
    assert reply.json()["app"] == "cli-app"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["keys", "create", "--app", "web", "--scopes", "ingest,write"], "unknown scope 'write'"),
        (["keys", "create", "--app", "web", "--scopes", ","], "at least one scope"),
        (["keys", "create", "--app", "bad name", "--scopes", "read"], "invalid app name"),
        (["keys", "revoke", "nosuchprefix"], "no key with prefix"),
    ],
)
def test_bad_input_exits_2_with_one_line(cli_database: str, args: list[str], needle: str) -> None:
    runner.invoke(app, ["db", "upgrade"])
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreachable_database_exits_1(use_database: Callable[[str], None]) -> None:
    use_database("postgresql://postgres@127.0.0.1:1/none")
    result = runner.invoke(app, ["db", "current"])
    assert result.exit_code == 1
    assert "database unreachable" in result.stderr


def test_non_postgres_url_exits_2(use_database: Callable[[str], None]) -> None:
    use_database("sqlite:///x.db")
    result = runner.invoke(app, ["db", "current"])
    assert result.exit_code == 2
    assert "PostgreSQL URL" in result.stderr


def test_db_revision_refuses_a_database_behind_head(cli_database: str) -> None:
    result = runner.invoke(app, ["db", "revision", "-m", "x"])
    assert result.exit_code == 2
    assert "not at head" in result.stderr


def _command_paths(command: object, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    subcommands: dict[str, object] = getattr(command, "commands", {})
    paths = {prefix} if prefix else set()
    for name, sub in subcommands.items():
        paths |= _command_paths(sub, (*prefix, name))
    return paths


def test_every_command_name_is_kept_and_each_sub_app_has_a_module_of_its_own() -> None:
    """The command names are a contract; each sub-app's Typer lives in flywheel/cli/NAME.py
    (``mine``: mining.py) and is put together in flywheel/cli/main.py."""
    from typer.main import get_command

    paths = {" ".join(p) for p in _command_paths(get_command(app))}
    assert {
        "init", "doctor", "status", "cycle", "deploy", "worker", "convert", "train", "eval",
        "serve", "demo", "dashboard", "stack",
        "db upgrade", "db downgrade", "db revision", "db current",
        "keys create", "keys list", "keys revoke", "keys set-limit",
        "world render", "world corpus", "world suite", "world base", "world weaknesses",
        "world check", "world evaluator-train", "world evaluator-measure",
        "cache produce", "vae export",
    } <= paths  # fmt: skip
    modules = {group.name: group.typer_instance for group in app.registered_groups}
    for name, typer_app in modules.items():
        module = {"mine": "mining"}.get(str(name), str(name))
        assert typer_app is not None
        assert getattr(importlib.import_module(f"flywheel.cli.{module}"), f"{name}_app") is (
            typer_app
        ), name
