"""``flywheel demo``: a complete cycle on a fresh embedded default, as a newcomer runs it
(at the sizes of a tiny cycle: ``--config``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY_CYCLE

TINY_DEMO = TINY_CYCLE | {
    "min_confidence": 0.0,
    "prompt_enhancer": {"steps": 60, "pairs_per_concept": 30},
    "pretraining_gap": TINY_CYCLE["pretraining_gap"] | {"steps": 10},
    "regression": TINY_CYCLE["regression"] | {"cases": 2},
}


@pytest.mark.timeout(600)
def test_flywheel_demo_runs_a_whole_cycle_on_the_embedded_default(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "PREFECT_"))}
    env["FLYWHEEL_HOME"] = str(tmp_path / "home")
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_DEMO))
    report_file = tmp_path / "out" / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from flywheel.cli.main import app; app()",
            "demo",
            "--config",
            str(config),
            "--events",
            "16",
            "--probes",
            "16",
            "--report",
            str(report_file),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=590,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = " ".join(result.stdout.split())  # rich wraps lines
    assert "embedded PostgreSQL" in out
    assert "nothing stored twice" in out
    assert "Demo mode: the final review is approved automatically" in out
    assert "before / after" in out
    assert (tmp_path / "home" / "pgdata" / "PG_VERSION").exists()

    report = json.loads(report_file.read_text())
    assert set(report["tracks"]) == {"rl", "pretraining_gap", "prompt_enhancer"}
    trained = {k: v for k, v in report["tracks"].items() if v["failure_rate_before"] is not None}
    assert trained, report["tracks"]
    for track in trained.values():
        assert track["cases"] >= TINY_DEMO["min_cases"]
        assert 0.0 <= track["failure_rate_after"] <= 1.0
        assert 0.0 <= track["failure_rate_before"] <= 1.0
    assert 0.0 <= report["regression"]["score_before"] <= 1.0
    assert 0.0 <= report["regression"]["score_after"] <= 1.0
    assert 0.0 <= report["attribution"]["macro_f1"] <= 1.0
    assert report["attribution"]["held_out_cases"] == 36
    assert report["seconds"] > 0
    assert report["feedback"]["replays_idempotent"] is True
    assert report["feedback"]["statuses"] == {"created": 16}
    assert report["cycle"]["status"] in ("promoted", "rejected")

    # What the demo left in its database, through `flywheel status` (which joins the
    # embedded server and stops it when it exits).
    status = subprocess.run(
        [sys.executable, "-c", "from flywheel.cli.main import app; app()", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert status.returncode == 0, status.stderr[-2000:]
    state = json.loads(status.stdout)
    (cycle,) = state["cycles"]
    assert cycle["status"] == report["cycle"]["status"]
    assert cycle["finished_at"] is not None
    if cycle["status"] == "promoted":
        assert state["model"]["version"] == f"cycle-{cycle['id']}"
        assert report["cycle"]["outcome"]["by"] == "demo (auto-approve)"
    else:
        assert state["model"]["version"] == "world-base"
    assert "model_promotion" not in state["review_queue"]
