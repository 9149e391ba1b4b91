"""API keys and service passwords never reach a log: the native stack (API + Celery worker)
runs on URLs that carry canary passwords, is used with good, unknown and over-limit keys
(one sent in a query string, as a careless client does), runs a task, and the CLI fails on
an unreachable broker; then every log and every CLI output is searched for the secrets."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from flywheel.logs import RedactSecrets, redact
from flywheel.settings import Settings
from flywheel.stack import StackConfig, native_stack
from tests.helpers import auth, run_flywheel, thumbs_event


def test_redact_masks_keys_and_url_passwords() -> None:
    key = "fwk_0123456789ab_" + "Zz9-_" * 8 + "abc"
    assert redact(f"GET /v1/signals?api_key={key} 200") == (
        "GET /v1/signals?api_key=fwk_0123456789ab_*** 200"
    )
    assert redact("postgresql+psycopg://flywheel:s3cr%40t@db:5432/flywheel") == (
        "postgresql+psycopg://flywheel:***@db:5432/flywheel"
    )
    assert redact("redis://:pw@redis:6379/0 and https://host/path@x") == (
        "redis://:***@redis:6379/0 and https://host/path@x"
    )
    record = logging.LogRecord("x", logging.INFO, "f", 1, "url %s key %s", ("a://u:p@h", key), None)
    RedactSecrets().filter(record)
    assert record.getMessage() == "url a://u:***@h key fwk_0123456789ab_***"


@pytest.mark.timeout(300)
def test_no_secret_reaches_a_log(
    migrated_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = {name: f"{name}-canary-{uuid.uuid4().hex[:12]}" for name in ("pg", "redis", "qdrant")}
    database_url = make_url(migrated_url).set(password=canary["pg"])  # trust auth ignores it
    settings = Settings(
        database_url=database_url.render_as_string(hide_password=False),
        redis_url=redis_url.replace("redis://", f"redis://default:{canary['redis']}@", 1),
        home=tmp_path / "home",
        rate_limit="4/minute",
    )
    monkeypatch.setenv("FLYWHEEL_QDRANT_API_KEY", canary["qdrant"])
    assert settings.database_url
    assert settings.redis_url
    env = {
        **os.environ,
        "FLYWHEEL_DATABASE_URL": settings.database_url,
        "FLYWHEEL_REDIS_URL": settings.redis_url,
        "FLYWHEEL_HOME": str(settings.home),
    }
    outputs: list[str] = []

    made = run_flywheel(
        env, "keys", "create", "--app", "web", "--scopes", "ingest,read", timeout=180
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()  # shown once, on stdout, to the operator who asked
    outputs.append(made.stderr)
    unknown_key = "fwk_0123456789ab_" + uuid.uuid4().hex + "A" * 11

    logs = tmp_path / "logs"
    with native_stack(settings, StackConfig(log_dir=logs, prefect=False)) as stack:
        with httpx.Client(base_url=stack.api_url, timeout=10) as client:
            stored = client.post("/v1/feedback", json=thumbs_event(), headers=auth(key))
            assert stored.status_code == 201, stored.text
            careless = client.get("/v1/signals", params={"api_key": key}, headers=auth(key))
            assert careless.status_code == 200
            assert client.get("/v1/signals", headers=auth(unknown_key)).status_code == 401
            assert client.get("/v1/signals", headers={"Authorization": key}).status_code == 401
            codes = [client.get("/v1/signals", headers=auth(key)).status_code for _ in range(3)]
            assert codes[-1] == 429
        scanned = run_flywheel(stack.env, "mine", "scan", "--json", "--timeout", "120", timeout=180)
        assert scanned.returncode == 0, scanned.stderr[-2000:]
        outputs += [scanned.stdout, scanned.stderr]

    away = {**env, "FLYWHEEL_REDIS_URL": f"redis://default:{canary['redis']}@127.0.0.1:1/0"}
    unreachable = run_flywheel(away, "mine", "scan", "--no-wait", timeout=180)
    assert unreachable.returncode == 1
    assert "broker unreachable (redis://default:***@127.0.0.1:1/0)" in unreachable.stderr
    outputs += [unreachable.stdout, unreachable.stderr]

    written = {path.name: path.read_text() for path in logs.iterdir()}
    api_log, worker_log = written["api.log"], written["worker.log"]
    # The logs hold what they should (the search below is not vacuous) ...
    assert '"POST /v1/feedback HTTP/1.1" 201' in api_log
    prefix = key.split("_")[1]
    assert f"/v1/signals?api_key=fwk_{prefix}_*** HTTP/1.1" in api_log  # masked, not dropped
    assert "ready." in worker_log
    assert "succeeded" in worker_log
    # ... and no secret.
    for name, text in {**written, **{f"cli output {i}": o for i, o in enumerate(outputs)}}.items():
        for secret in (key, unknown_key, *canary.values()):
            assert secret not in text, f"{secret[:12]}… in {name}"
