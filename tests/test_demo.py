"""``flywheel demo``: a complete cycle on a fresh embedded default, as a newcomer runs it
(at the sizes of a tiny cycle: ``--config``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flywheel.cycle.config import CycleConfig
from flywheel.demo import BASE_CONCEPT_GOALS, TRACKS
from tests.helpers import TINY_CYCLE

TINY_DEMO = TINY_CYCLE | {
    "min_confidence": 0.0,
    "prompt_enhancer": {"steps": 60, "pairs_per_concept": 30},
    "pretraining_gap": TINY_CYCLE["pretraining_gap"] | {"steps": 10},
    "regression": TINY_CYCLE["regression"] | {"cases": 2},
    "gate": {"extra_seeds": 0},  # each gate case at its own seed: a third of the drawing
}
CONCEPT_PROBES = 12
EXPECTED_OUTCOME = "rejected"
"""What the seeded tiny demo's cycle ends in: its rounds are too small to fix failures, so the
gate refuses the candidate (measured on the held-out gate slices, each gate case at its own
seed: 22 -> 23 failures — rl 18/20 -> 19/20 (20 gate cases of 46 routed; one GRPO step against
the reward recalibrated on the users' pairwise feedback), pretraining_gap 2/2 -> 2/2 (10
steps), prompt_enhancer 2/3 -> 2/3 (60 SFT steps; its 20 routed cases are the users'-words
complaints the rewrite test drew as they were served))."""


def _meets(value: float | None, comparison: str, target: float) -> bool:
    if value is None:
        return False
    return value <= target if comparison == "<=" else value >= target


def _assert_interval_holds(interval: Any, rate: float) -> None:
    low, high = interval
    assert 0.0 <= low <= rate <= high <= 1.0, (interval, rate)


def demo_env(tmp_path: Path) -> dict[str, str]:
    """This process' environment without its flywheel and Prefect settings, a scratch home
    and unwrapped rich tables: what a demo subprocess runs in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "PREFECT_"))}
    env["FLYWHEEL_HOME"] = str(tmp_path / "home")
    env["COLUMNS"] = "200"  # rich's tables unwrapped
    return env


def flywheel_cli(*args: str, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess[str]:
    """``flywheel ARGS`` in a subprocess with exactly ``env``; output captured."""
    return subprocess.run(
        [sys.executable, "-c", "from flywheel.cli.main import app; app()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


TINY_EVENTS = 40
"""Users in the tiny demo: enough that the RL track's train side holds pairwise feedback."""


def run_tiny_demo(
    tmp_path: Path, report_file: Path, *args: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """The tiny demo (:data:`TINY_DEMO`, :data:`TINY_EVENTS` users, 16 probes) with ``args``
    before its options, its report at ``report_file``."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_DEMO))
    return flywheel_cli(
        "demo",
        *args,
        "--config",
        str(config),
        "--events",
        str(TINY_EVENTS),
        "--probes",
        "16",
        "--concept-probes",
        str(CONCEPT_PROBES),
        "--report",
        str(report_file),
        env=env,
        timeout=590,
    )


@pytest.mark.timeout(600)
def test_flywheel_demo_runs_a_whole_cycle_on_the_embedded_default(tmp_path: Path) -> None:
    env = demo_env(tmp_path)
    report_file = tmp_path / "out" / "report.json"
    result = run_tiny_demo(tmp_path, report_file, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    out = " ".join(result.stdout.split())  # rich wraps lines
    assert "embedded PostgreSQL" in out
    assert "nothing stored twice" in out
    assert "Demo mode: the final review is approved automatically" in out
    assert "before / after" in out
    assert (tmp_path / "home" / "pgdata" / "PG_VERSION").exists()

    report = json.loads(report_file.read_text())
    assert report["cycle"]["status"] == EXPECTED_OUTCOME, report["cycle"]
    assert set(report["tracks"]) == set(TRACKS)
    trained = {k: v for k, v in report["tracks"].items() if v["failure_rate_before"] is not None}
    # The RL round ran (its reward recalibrated on the users' pairwise feedback), and the
    # enhancer's: the users'-words complaints, drawn as they were served, reached it.
    assert {"rl", "prompt_enhancer"} <= set(trained), report["tracks"]
    for track in trained.values():  # held-out gate slices: each gate case at every seed
        assert track["cases"] >= 1
        assert track["seeds"] == 1 + CycleConfig.model_validate(TINY_DEMO).gate.extra_seeds == 1
        assert track["n"] == track["cases"] * track["seeds"]
        _assert_interval_holds(track["interval_before"], track["failure_rate_before"])
        _assert_interval_holds(track["interval"], track["failure_rate_after"])
    for name in set(TRACKS) - set(trained):
        assert report["tracks"][name]["n"] == 0
        assert report["tracks"][name]["interval"] is None
    if EXPECTED_OUTCOME == "promoted":
        assert any(t["failure_rate_after"] < t["failure_rate_before"] for t in trained.values())
    assert 0.0 <= report["regression"]["score_before"] <= 1.0
    assert 0.0 <= report["regression"]["score_after"] <= 1.0
    assert 0.0 <= report["attribution"]["macro_f1"] <= 1.0
    assert report["attribution"]["held_out_cases"] == 36
    # The classifier of the default world, measured on the other world's shipped base.
    other = report["attribution"]["other_world"]
    assert other["world"] == "other"
    assert 0.0 <= other["macro_f1"] <= 1.0
    assert other["cases"] >= 24
    assert set(other["tracks"]) == set(TRACKS)
    concepts = report["base_concepts"]
    assert concepts["model"] == "world-base"
    assert concepts["world"] == "default"
    assert concepts["rare_left_out"] == ["purple"]
    for skill in BASE_CONCEPT_GOALS:
        assert concepts["skills"][skill]["n"] == CONCEPT_PROBES
        assert 0.0 <= concepts["skills"][skill]["score"] <= 1.0
    assert report["seconds"] > 0
    assert report["feedback"]["replays_idempotent"] is True
    # Each user sent one event, two where they preferred one of their two images (the
    # pairwise preference and the flag on the other).
    feedback = report["feedback"]
    assert TINY_EVENTS < feedback["events"] <= 2 * TINY_EVENTS
    assert feedback["statuses"] == {"created": feedback["events"]}

    # Every goal, met exactly when its value reaches its target, from the report's figures.
    goals = report["goals"]
    assert set(goals) == (
        {f"slice.{name}" for name in TRACKS}
        | {"regression", "attribution.other_world", "wall_time"}
        | {f"base.{skill}" for skill in BASE_CONCEPT_GOALS}
    )
    for key, item in goals.items():
        assert item["met"] == _meets(item["value"], item["comparison"], item["target"]), key
    for name, track in report["tracks"].items():
        before, after = track["failure_rate_before"], track["failure_rate_after"]
        relative = (after - before) / before if before else None
        assert goals[f"slice.{name}"]["value"] == pytest.approx(relative), name
        assert goals[f"slice.{name}"]["target"] == -0.5
    regression = report["regression"]
    assert goals["regression"]["value"] == pytest.approx(
        (regression["score_after"] - regression["score_before"]) * 100
    )
    assert goals["attribution.other_world"]["value"] == other["macro_f1"]
    for skill, target in BASE_CONCEPT_GOALS.items():
        assert goals[f"base.{skill}"]["value"] == concepts["skills"][skill]["score"]
        assert goals[f"base.{skill}"]["target"] == target
    assert goals["wall_time"]["value"] == pytest.approx(report["seconds"] / 60)

    # The goals table is printed last, after the wall time and the report's path.
    finished = result.stdout.index("demo finished in")
    last_table = result.stdout.rindex("┏")
    assert finished < result.stdout.index(f"report: {report_file}") < last_table
    title = result.stdout[:last_table].rstrip().splitlines()[-1].strip()
    met = sum(item["met"] for item in goals.values())
    assert title == f"goals: {met} of {len(goals)} met"
    table = result.stdout[last_table:]
    assert table.rstrip().endswith("┘")
    cells = [
        [cell.strip() for cell in line.strip("│").split("│")]
        for line in table.splitlines()
        if line.startswith("│")
    ]
    rows = [row for row in cells if row[0]]  # a note wraps onto lines of its own
    assert len(rows) == len(goals)
    for (figure, _, _, verdict, _), item in zip(rows, goals.values(), strict=True):
        assert figure == item["figure"]
        assert verdict == ("✓ met" if item["met"] else "✗ not met")

    # What the demo left in its database, through `flywheel status` (which joins the
    # embedded server and stops it when it exits).
    status = flywheel_cli("status", "--json", env=env, timeout=120)
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
