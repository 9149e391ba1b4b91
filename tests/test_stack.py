"""The native topology (``flywheel.stack``): the API, a Celery worker and a Prefect server
as processes against the machine's PostgreSQL and Redis — they come up, work together,
and stop."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from flywheel.auth.service import create_api_key
from flywheel.db.models import Scope, Signal, SignalSource
from flywheel.mining.tasks import SCAN_TASK, create_celery
from flywheel.settings import Settings, get_settings
from flywheel.stack import StackConfig, StackError, native_stack
from tests.helpers import run_flywheel, thumbs_event


@pytest.mark.timeout(240)
def test_the_native_stack_comes_up_works_and_stops(
    migrated_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(database_url=migrated_url, redis_url=redis_url, home=tmp_path / "home")
    engine = create_engine(migrated_url)
    with Session(engine) as session:
        key = create_api_key(session, app="web", scopes=[Scope.INGEST, Scope.READ]).secret
        session.commit()
    with native_stack(settings, StackConfig(log_dir=tmp_path / "logs")) as stack:
        # The API stores an event durably.
        event = thumbs_event(value="down")
        stored = httpx.post(
            f"{stack.api_url}/v1/feedback",
            json=event,
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert stored.status_code == 201, stored.text
        # The worker takes a task from Redis and answers through the result backend.
        for name, value in stack.env.items():
            if name.startswith(("FLYWHEEL_", "PREFECT_")):
                monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        try:
            app = create_celery(get_settings())
            from flywheel.world.base_model import BASE_REWARD

            report = app.tasks[SCAN_TASK].apply_async(kwargs={"reward_dir": str(BASE_REWARD)})
            assert report.get(timeout=60)["miner"] == "scan"
        finally:
            get_settings.cache_clear()
        # Prefect answers, and `flywheel deploy` registers the cycle with it.
        assert httpx.get(f"{stack.prefect_api_url}/health", timeout=5).status_code == 200
        deployed = run_flywheel(stack.env, "deploy", timeout=120)
        assert deployed.returncode == 0, deployed.stderr[-2000:]
        assert "flywheel-cycle/production" in deployed.stdout
        processes = dict(stack.processes)
    assert all(p.poll() is not None for p in processes.values())  # all stopped
    with Session(engine) as session:
        feedback = select(func.count()).where(Signal.source == SignalSource.FEEDBACK)
        assert session.scalar(feedback) == 1
    engine.dispose()
    with (
        pytest.raises(StackError, match="FLYWHEEL_REDIS_URL"),
        native_stack(
            Settings(database_url=migrated_url, redis_url=None),
            StackConfig(log_dir=tmp_path / "none"),
        ),
    ):
        pass
