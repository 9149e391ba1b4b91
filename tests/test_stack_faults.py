"""A team's stack failing mid-cycle: the cycle pauses — it stays ``running`` with the step and
the one-line reason in its summary, nothing it finished is lost, nothing half-made is kept —
and the next run, once the part is fixed, resumes the same cycle where it stopped.

The stack is the acid test's (:mod:`tests.team_stack`), built once for the module: its judge
served over HTTP (with a timeout of :data:`JUDGE_TIMEOUT_S`), its trainer run by the command
launcher behind a wrapper that counts the launches. Each test gets a database and a home of
its own, a user's thumbs down on each of the pretraining-gap prompts, routed by a reviewer to
that track (one round per cycle). The cycle runs in this process (the CLI in its own, as the
acid test runs it) with ``flywheel.world`` unimportable.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

import flywheel
from flywheel.adapters.datasets import RECORDS_FILE
from flywheel.attribution.service import override_route
from flywheel.cases.service import collect_failures
from flywheel.cli.main import app
from flywheel.cycle.config import CycleConfig
from flywheel.cycle.flow import PAUSED, WAITING_FOR_REVIEW, CycleOutcome
from flywheel.cycle.runner import run_cycle
from flywheel.cycle.steps import cycle_dir, round_output
from flywheel.db.engine import create_db_engine
from flywheel.db.models import (
    CaseStatus,
    Cycle,
    CycleStatus,
    FailureCase,
    ReviewItem,
    ReviewKind,
    RoundStatus,
    Track,
    TrainingRound,
)
from flywheel.settings import get_settings
from tests.helpers import approve_artefacts
from tests.team_stack import CORPUS_DIR, GENERATOR_DIR, TRAINER, JudgeServer, build_team_stack
from tests.test_own_stack import PROMPTS, post_feedback
from tests.test_own_stack import flywheel as flywheel_cli

JUDGE_TIMEOUT_S = 1.0
"""The project's ``[judge] timeout_s`` here: a stalled judge costs seconds, not minutes."""
CONFIG = {
    "min_cases": 2,
    "pretraining_gap": {"steps": 1, "replay": 8},
    "regression": {"seeds": 1},
}
"""The cycles' settings: one small gap round."""
SUITE_MARK = "on a grey background"
"""In every suite prompt and in no case's: what the evaluation judges after the cases."""
LAUNCHES = "launches.log"
"""A line per launch of a round, beside its manifest."""
COUNTING_TRAINER = """
import os, sys
from pathlib import Path

manifest = Path(sys.argv[sys.argv.index("--manifest") + 1])
with (manifest.parent / %r).open("a") as log:
    log.write(f"{os.getpid()}\\n")
trainer = Path(__file__).with_name(%r)
os.execv(sys.executable, [sys.executable, str(trainer), "--manifest", str(manifest)])
"""
"""The team's trainer behind a wrapper that counts its launches."""


@dataclass(frozen=True, slots=True)
class Stack:
    project: Path
    judge: JudgeServer

    @property
    def root(self) -> Path:
        return self.project.parent


@dataclass(frozen=True, slots=True)
class Team:
    stack: Stack
    env: dict[str, str]
    engine: Engine
    home: Path


@pytest.fixture(scope="module")
def stack(offline: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The team's stack, built once: its judge served (answering within
    :data:`JUDGE_TIMEOUT_S`), its trainer's launches counted."""
    with JudgeServer() as judge:
        project = build_team_stack(tmp_path_factory.mktemp("team"), judge_url=judge.url)
        counting = project.parent / "counting_trainer.py"
        counting.write_text(COUNTING_TRAINER % (LAUNCHES, TRAINER))
        trainer = str((project.parent / TRAINER).resolve())
        text = project.read_text()
        assert trainer in text
        assert "timeout_s = 5.0" in text
        text = text.replace(trainer, str(counting.resolve()))
        project.write_text(text.replace("timeout_s = 5.0", f"timeout_s = {JUDGE_TIMEOUT_S}"))
        yield Stack(project=project, judge=judge)
    assert judge.errors == []


@pytest.fixture
def team(
    stack: Stack,
    tmp_path: Path,
    migrated_url: str,
    prefect_api: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Team]:
    """A database and a home of the test's own; the team's model registered; a thumbs down
    on each pretraining-gap prompt, its case routed to that track by a reviewer."""
    stack.judge.heal()
    home = tmp_path / "home"
    env = {
        "FLYWHEEL_DATABASE_URL": migrated_url,
        "FLYWHEEL_HOME": str(home),
        "FLYWHEEL_PROJECT": str(stack.project),
        "FLYWHEEL_RATE_LIMIT": "off",
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    settings = get_settings()
    registered = CliRunner().invoke(
        app, ["models", "register", "team-v1", "--generator", str(stack.root / GENERATOR_DIR)]
    )
    assert registered.exit_code == 0, registered.output
    gap = {Track.PRETRAINING_GAP: PROMPTS[Track.PRETRAINING_GAP]}
    post_feedback(stack.root, settings, gap)
    engine = create_db_engine(settings, pool_size=2)
    with Session(engine) as session:
        collect_failures(session)
        session.commit()
        cases = session.scalars(select(FailureCase)).all()
        assert {c.prompt for c in cases} == set(gap[Track.PRETRAINING_GAP])
        for case in cases:
            override_route(session, case_id=case.id, track=Track.PRETRAINING_GAP, reviewer="alice")
    yield Team(stack=stack, env=env, engine=engine, home=home)
    stack.judge.heal()
    engine.dispose()
    get_settings.cache_clear()


class _NoWorld(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == "flywheel.world" or fullname.startswith("flywheel.world."):
            raise ImportError(f"{fullname}: the world is not to be imported by a team's cycle")
        return None


@contextmanager
def world_forbidden() -> Iterator[None]:
    """``flywheel.world`` unimportable in this process for the block (what an earlier test
    imported is put back after it)."""
    hidden = {
        name: module
        for name, module in sys.modules.items()
        if name == "flywheel.world" or name.startswith("flywheel.world.")
    }
    for name in hidden:
        del sys.modules[name]
    attribute = flywheel.__dict__.pop("world", None)
    finder = _NoWorld()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        sys.modules.update(hidden)
        if attribute is not None:
            flywheel.__dict__["world"] = attribute


def run(team: Team) -> CycleOutcome:
    """One run of ``flywheel cycle`` in this process (the world forbidden)."""
    with world_forbidden():
        outcome = run_cycle(CycleConfig.model_validate(CONFIG))
    assert isinstance(outcome, CycleOutcome)
    return outcome


def launches(team: Team, cycle_id: int) -> int:
    """Rounds of the cycle launched so far."""
    logs = cycle_dir(team.home, cycle_id).glob(f"*/{LAUNCHES}")
    return sum(len(log.read_text().splitlines()) for log in logs)


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


@contextmanager
def broken(path: Path, keep: int) -> Iterator[bytes]:
    """``path`` cut to its first ``keep`` bytes for the block (its bytes are yielded, and
    put back after it)."""
    original = path.read_bytes()
    assert 0 < keep < len(original)
    path.write_bytes(original[:keep])
    try:
        yield original
    finally:
        path.write_bytes(original)


def test_a_judge_timing_out_mid_evaluation_pauses_the_cycle_and_the_next_run_resumes_it(
    team: Team,
) -> None:
    judge = team.stack.judge
    # The judge answers the cases, then stalls on the regression suite, past the timeout.
    fault = judge.fail("stall", matching=SUITE_MARK)
    before = judge.requests
    waiting = run(team)  # the artefact's review first: no round trains before it
    assert waiting.status == WAITING_FOR_REVIEW, waiting
    approve_artefacts(team.engine)
    paused = run(team)

    assert paused.status == PAUSED, paused
    assert paused.resumed is True
    note = paused.summary["paused"]
    assert note["step"] == "evaluate"
    assert note["reason"] == (
        f"judge: {judge.url}: timed out (timeout_s={JUDGE_TIMEOUT_S:g}) on each of 2 attempt(s)"
    )
    assert "\n" not in note["reason"]
    assert fault.hit >= 2  # the evaluate task and its retry each gave up on it
    assert judge.requests - before > fault.hit  # the cases were judged first: mid-evaluation
    cycle_id = paused.cycle_id
    with Session(team.engine) as session:
        cycle = session.get(Cycle, cycle_id)
        assert cycle is not None
        assert cycle.status == CycleStatus.RUNNING
        summary = cycle.summary or {}
        assert summary["paused"] == note
        assert "evaluation" not in summary
        assert "gate" not in summary
        assert cycle.candidate_model_version_id is not None
        promotions = session.scalars(
            select(ReviewItem).where(ReviewItem.kind == ReviewKind.MODEL_PROMOTION)
        ).all()
        assert promotions == []
        rounds = session.scalars(
            select(TrainingRound).where(TrainingRound.cycle_id == cycle_id)
        ).all()
        assert [r.track for r in rounds] == [Track.PRETRAINING_GAP]
        (round_,) = rounds
        assert round_.status == RoundStatus.SUCCEEDED
        candidate = round_output(round_)
        assert candidate is not None
        assert (candidate / "model_index.json").is_file()
        assert (candidate / "metrics.json").is_file()
        started, finished = round_.started_at, round_.finished_at
        statuses = {c.status for c in session.scalars(select(FailureCase))}
        assert statuses == {CaseStatus.IN_ROUND}
    assert launches(team, cycle_id) == 1

    # The judge is healthy again: the next run resumes the cycle at the evaluation.
    judge.heal()
    asked = judge.requests
    resumed = run(team)

    assert resumed.cycle_id == cycle_id
    assert resumed.resumed is True
    assert resumed.status in (CycleStatus.REJECTED.value, CycleStatus.AWAITING_REVIEW.value)
    assert "paused" not in resumed.summary
    assert resumed.summary["gate"]["fixed"] == sum(
        t["failures_before"] - t["failures_after"]
        for t in resumed.summary["evaluation"]["tracks"].values()
    )
    assert judge.requests > asked
    assert launches(team, cycle_id) == 1  # no round was launched again
    with Session(team.engine) as session:
        cycle = session.get(Cycle, cycle_id)
        assert cycle is not None
        assert cycle.status.value == resumed.status
        assert session.scalar(select(func.count()).select_from(Cycle)) == 1
        (round_,) = session.scalars(
            select(TrainingRound).where(TrainingRound.cycle_id == cycle_id)
        ).all()
        assert (round_.started_at, round_.finished_at) == (started, finished)


def test_a_broken_corpus_image_pauses_the_cycle_at_prepare_rounds_and_the_repaired_file_resumes_it(
    team: Team,
) -> None:
    # Every train image is decoded while the gap track builds its batch (near-duplicate
    # hashes, replay): a truncated one fails the corpus port there, after attribution.
    image = team.stack.root / CORPUS_DIR / "images" / "train-000.png"
    with broken(image, keep=image.stat().st_size // 2):
        paused = run(team)

        assert paused.status == PAUSED, paused
        note = paused.summary["paused"]
        assert note["step"] == "prepare-rounds"
        assert note["reason"].startswith("corpus: train-000 (")
        assert f"{image}): cannot be decoded" in note["reason"]
        assert "\n" not in note["reason"]
        cycle_id = paused.cycle_id
        assert "attribution" in paused.summary
        assert "tracks" not in paused.summary
        with Session(team.engine) as session:
            cycle = session.get(Cycle, cycle_id)
            assert cycle is not None
            assert cycle.status == CycleStatus.RUNNING
            assert session.scalar(select(func.count()).select_from(TrainingRound)) == 0
            items = session.scalars(select(ReviewItem).where(ReviewItem.cycle_id == cycle_id))
            assert items.all() == []
            statuses = {c.status for c in session.scalars(select(FailureCase))}
            assert statuses == {CaseStatus.ROUTED}
        # Nothing half-written: no batch, no temporary directory, no manifest.
        assert files_under(cycle_dir(team.home, cycle_id)) == []

    # The file repaired, the next run resumes the cycle and builds the batch; once it is
    # approved, the next trains on it.
    waiting = run(team)
    assert waiting.status == WAITING_FOR_REVIEW, waiting
    approve_artefacts(team.engine)
    resumed = run(team)

    assert resumed.cycle_id == cycle_id
    assert resumed.resumed is True
    assert resumed.status in (CycleStatus.REJECTED.value, CycleStatus.AWAITING_REVIEW.value)
    assert "paused" not in resumed.summary
    assert resumed.summary["tracks"][Track.PRETRAINING_GAP.value]["round"] is not None
    data = cycle_dir(team.home, cycle_id) / Track.PRETRAINING_GAP.value / "data"
    artefact = json.loads((data / "artefact.json").read_text())
    samples = (data / "dataset" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == artefact["samples"] > artefact["replay"] > 0
    assert not list(data.parent.glob(".data.*.tmp"))
    assert launches(team, cycle_id) == 1
    with Session(team.engine) as session:
        assert session.scalar(select(func.count()).select_from(Cycle)) == 1


def test_flywheel_cycle_on_a_paused_cycle_exits_1_with_the_one_line_reason(team: Team) -> None:
    records = team.stack.root / CORPUS_DIR / RECORDS_FILE
    lines = records.read_bytes().splitlines(keepends=True)
    cut = sum(len(line) for line in lines[:-1]) + len(lines[-1]) // 2
    # The corpus index cut mid-line: the attribution's corpus scan fails on its last line.
    with broken(records, keep=cut):
        paused = run(team)
        assert paused.status == PAUSED
        assert paused.summary["paused"]["step"] == "attribute"

        config = team.home / "cycle.json"
        config.write_text(json.dumps(CONFIG))
        again = flywheel_cli(team.env, "cycle", "--config", str(config))

    assert again.returncode == 1, again.stderr[-3000:]
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: cycle {paused.cycle_id} paused at attribute: corpus: {records}:{len(lines)}: "
        "invalid JSON ("
    ), again.stderr[-3000:]
    assert last.endswith(" — fix it and run `flywheel cycle` again to resume")
    with Session(team.engine) as session:
        cycle = session.get(Cycle, paused.cycle_id)
        assert cycle is not None
        assert cycle.status == CycleStatus.RUNNING
        assert (cycle.summary or {})["paused"]["step"] == "attribute"
        assert session.scalar(select(func.count()).select_from(Cycle)) == 1
