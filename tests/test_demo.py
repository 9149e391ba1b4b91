"""``flywheel demo``: the embedded default end to end, as a newcomer runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from flywheel.db.models import Signal
from flywheel.demo import run_demo
from flywheel.settings import Settings


def test_demo_ingests_through_the_api_and_reads_everything_back(
    settings: Settings, session: Session
) -> None:
    summary = run_demo(settings, events=120, seed=3, console=Console(quiet=True))

    assert summary["stored"] == 120 + 64
    assert summary["feedback_statuses"] == {"created": 120}
    assert summary["replays_idempotent"] is True
    assert summary["signals"]["evaluation/evaluation_sample"] == 64
    assert sum(n for k, n in summary["signals"].items() if k.startswith("feedback/")) == 120
    stored = session.scalar(
        select(func.count()).select_from(Signal).where(Signal.event_id.contains(summary["run"]))
    )
    assert stored == 184


@pytest.mark.timeout(180)
def test_flywheel_demo_command_on_the_embedded_default(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env["FLYWHEEL_HOME"] = str(tmp_path)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from flywheel.cli.main import app; app()",
            "demo",
            "--events",
            "50",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert result.returncode == 0, result.stderr
    assert "embedded PostgreSQL" in result.stdout
    assert "nothing stored twice" in result.stdout
    assert (tmp_path / "pgdata" / "PG_VERSION").exists()
