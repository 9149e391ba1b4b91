"""Bad-case mining against a real PostgreSQL and Redis: the three miners, their idempotency,
the tasks in eager mode (the embedded default), on a worker thread, and on a worker process
whose task process is killed mid-task (each hit still stored once)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import torch
from celery import Celery
from celery.contrib.testing.worker import start_worker
from qdrant_client import QdrantClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from flywheel.cases.near import CasePrompts
from flywheel.cases.service import collect_failures
from flywheel.cases.themes import assign_themes
from flywheel.db.engine import session_factory
from flywheel.db.models import FailureCase, FailureCluster, Signal, SignalKind, SignalSource
from flywheel.media.access import SCHEMES, ImageAccessConfig, ImagePolicy
from flywheel.mining.miners import (
    MINER_APP,
    mine_near_duplicates,
    scan_generations,
    store_png,
)
from flywheel.mining.tasks import NEAR_TASK, PROBE_TASK, SCAN_TASK, create_celery
from flywheel.settings import get_settings
from flywheel.signals.repository import NewSignal, insert_signals, model_version_id
from flywheel.world.base_model import BASE_REWARD, load_world_reward
from flywheel.world.benchmark import BenchmarkCase
from flywheel.world.evaluation import BASE_MODEL, image_tensor
from flywheel.world.evaluator import load_evaluator
from flywheel.world.loop.mining import ProbeBatch, mine_probes
from flywheel.world.scenes import render
from flywheel.world.weaknesses import probes
from model.pipeline import Generator
from retrieval.embedding import TextEmbedder
from retrieval.store import QdrantConfig
from tests.helpers import stored_signal
from tests.test_image_access import opened_files
from training.io import local_path

BAND = 50_000_000


@pytest.fixture
def environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, migrated_url: str
) -> Iterator[dict[str, str]]:
    """The process settings a task reads: the scratch database, a scratch home, no Redis."""
    env = {"FLYWHEEL_DATABASE_URL": migrated_url, "FLYWHEEL_HOME": str(tmp_path / "home")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("FLYWHEEL_REDIS_URL", raising=False)
    get_settings.cache_clear()
    yield env
    get_settings.cache_clear()


@pytest.fixture
def redis_app(
    environment: dict[str, str], redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Celery:
    """The miners' Celery app on the test Redis (the settings a worker process reads too)."""
    monkeypatch.setenv("FLYWHEEL_REDIS_URL", redis_url)
    environment["FLYWHEEL_REDIS_URL"] = redis_url
    get_settings.cache_clear()
    return create_celery(get_settings())


def _hits(session: Session) -> list[Signal]:
    query = select(Signal).where(Signal.source == SignalSource.MINING).order_by(Signal.id)
    return list(session.scalars(query))


def _details(hit: Signal) -> dict[str, Any]:
    assert isinstance(hit.details, dict)
    return hit.details


def _file_digest(uri: str) -> str:
    path = local_path(uri)
    assert path is not None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_probe_mining_stores_each_failure_once(fresh_engine: Engine, tmp_path: Path) -> None:
    sessions = session_factory(fresh_engine)
    options: dict[str, Any] = {
        "generator": Generator.load(BASE_MODEL),
        "evaluator": load_evaluator(),
        "reward": load_world_reward(),
        "model_version": "world-base",
        "batch": ProbeBatch(skill="colour", count=14, band=BAND),
        "image_dir": tmp_path / "mined",
        "chunk": 7,
    }
    first = mine_probes(sessions, **options)
    assert first.examined == 14
    assert 0 < first.hits < 14
    assert first.stored == first.hits
    with sessions() as session:
        hits = _hits(session)
        assert [h.event_id for h in hits] == first.hit_event_ids
        foci = {_details(h)["focus"] for h in hits}
        assert "purple" in foci  # the base model cannot draw the corpus' rare colour
        for hit in hits:
            assert hit.app == MINER_APP
            assert hit.kind == SignalKind.MINING_HIT
            assert hit.passed is False
            details = _details(hit)
            assert details["skill"] == "colour"
            elements = details["spec"]["elements"]
            assert not all(e["passed"] for e in elements if e["kind"] == "colour")
            assert 0.0 <= (hit.scores or {})["reward_rank"] <= 1.0
            assert hit.image_uri is not None
            assert _file_digest(hit.image_uri) == hit.image_sha256
    # The same batch again: the same hits, none stored twice, no new image files.
    files = sorted(os.listdir(tmp_path / "mined"))
    again = mine_probes(sessions, **options)
    assert (again.hits, again.stored) == (first.hits, 0)
    assert again.hit_event_ids == first.hit_event_ids
    assert sorted(os.listdir(tmp_path / "mined")) == files
    # Hits become failure cases with their skill, themed by the colour they missed.
    with sessions() as session:
        report = collect_failures(session)
        assert report.signals_linked == first.hits
        skills = set(session.scalars(select(FailureCase.skill)))
        assign_themes(session, embedder=TextEmbedder())
        labels = set(session.scalars(select(FailureCluster.label)))
    assert skills == {"colour"}
    assert "colour: purple" in labels


def _generation(
    number: int, prompt: str, image: torch.Tensor, directory: Path, served: str | None = None
) -> NewSignal:
    """A liked generation (not a failure, so the scan looks at it) with its image file; where
    the app rewrote ``prompt``, what the model was given (``served``)."""
    uri, digest = store_png(image, directory)
    return stored_signal(
        f"gen-{number}",
        prompt,
        image_uri=uri,
        image_sha256=digest,
        thumbs_up=True,
        details={"served_prompt": served} if served is not None else None,
    )


def _store_generations(
    engine: Engine,
    cases: list[BenchmarkCase],
    directory: Path,
    prompts: list[str],
    served: dict[int, str] | None = None,
) -> tuple[list[NewSignal], list[int]]:
    """Renders of ``cases`` stored as generations of ``prompts`` (the ``k``-th served as
    ``served[k]``); the rows and their ids."""
    served = served or {}
    rows = [
        _generation(k, prompt, image_tensor(render(case.spec, 64, 64)), directory, served.get(k))
        for k, (case, prompt) in enumerate(zip(cases, prompts, strict=True))
    ]
    with session_factory(engine)() as session:
        ids = [row.id for row in insert_signals(session, signals=rows)]
        session.commit()
    return rows, ids


def test_scan_flags_generations_the_reward_rejects(fresh_engine: Engine, tmp_path: Path) -> None:
    """Renders of world scenes stored as generations; a few carry the caption of another
    scene. The reward (colour accuracy 1.0) ranks those prompts low. Where the app rewrote
    the user's prompt, the image is ranked under what the model was given."""
    cases = probes("colour", 64, band=BAND)
    order = list(range(len(cases)))
    random.Random(BAND).shuffle(order)
    pairs = list(zip(order[0:8:2], order[1:8:2], strict=True))  # four images swap captions
    swapped = {a: b for pair in pairs for a, b in (pair, pair[::-1])}
    prompts = [cases[swapped.get(k, k)].prompt for k in range(len(cases))]
    # Four swapped images served their wrong caption from a user's words; four right ones
    # were served their own caption from a user's prompt the reward would rank low.
    served = {k: prompts[k] for k in order[0:8:2]} | {k: cases[k].prompt for k in order[8:12]}
    for k in order[0:8:2]:
        prompts[k] = f"what user {k} typed"
    for k in order[8:12]:
        prompts[k] = cases[order[k % 4]].prompt  # another scene's caption
    rows, ids = _store_generations(fresh_engine, cases, tmp_path, prompts, served)
    # A signal whose image is gone is skipped, not a failure of the scan.
    local_path(rows[1].image_uri or "").unlink()  # type: ignore[union-attr]
    sessions = session_factory(fresh_engine)
    policy = ImagePolicy(ImageAccessConfig(), home=tmp_path)  # the images are under the home
    report = scan_generations(sessions, reward=load_world_reward(), chunk=64, policy=policy)
    assert report.examined == len(cases) - 1
    assert [signal for signal, _ in report.unreadable] == [ids[1]]
    assert report.last_signal_id == ids[-1]
    flagged = {int(e.split(":")[1]) for e in report.hit_event_ids}
    wrong = {ids[k] for k in swapped}
    recall = len(flagged & wrong) / len(wrong)
    false_alarms = len(flagged - wrong) / (len(cases) - 1 - len(wrong))
    assert recall >= 0.6, (recall, false_alarms)
    assert false_alarms <= 0.05, (recall, false_alarms)
    assert not flagged & {ids[k] for k in order[8:12]}  # right under what they were served
    with sessions() as session:
        hits = {
            s.event_id: s
            for s in session.scalars(select(Signal).where(Signal.source == SignalSource.MINING))
        }
    caught = [k for k in order[0:8:2] if f"scan:{ids[k]}" in hits]
    assert caught  # a wrong caption served from a user's words is caught, and says so
    for k in caught:
        hit_details = hits[f"scan:{ids[k]}"].details
        assert isinstance(hit_details, dict)
        assert hit_details["served_prompt"] == served[k]
    again = scan_generations(sessions, reward=load_world_reward(), chunk=64, policy=policy)
    assert again.stored == 0
    # Nothing after the last id: the next scan examines nothing.
    later = scan_generations(sessions, reward=load_world_reward(), after_id=ids[-1], policy=policy)
    with pytest.raises(ValueError, match="min_rank"):
        scan_generations(sessions, reward=load_world_reward(), min_rank=0.0, policy=policy)
    assert (later.examined, later.last_signal_id) == (0, ids[-1])


def test_a_scan_reads_no_image_the_policy_refuses_and_reports_why(
    fresh_engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    allowed = []
    for k in range(3):
        pixels = torch.zeros(3, 32, 32)
        pixels[k] = 1.0
        allowed.append(store_png(pixels, root)[0])
    secret = store_png(torch.ones(3, 32, 32), outside)[0]  # an image, but outside the roots
    refused = {
        secret: f"{secret} is outside the allowed roots",
        "file:///etc/passwd": "file:///etc/passwd is outside the allowed roots",
        "https://169.254.169.254/latest/meta-data/x.png": (
            "https://169.254.169.254/latest/meta-data/x.png: host 169.254.169.254 is not an "
            "allowed https host"
        ),
        "data:image/png;base64,iVBORw0KGgo=": "data:image/png;base64,iVBORw0KGgo=: data: URIs "
        f"are never read (only {SCHEMES})",
    }
    uris = [*allowed, *refused]
    rows = [
        stored_signal(f"gen-{k}", f"a square {k}", image_uri=uri, thumbs_up=True)
        for k, uri in enumerate(uris)
    ]
    sessions = session_factory(fresh_engine)
    with sessions() as session:
        ids = [row.id for row in insert_signals(session, signals=rows)]
        session.commit()
    policy = ImagePolicy(ImageAccessConfig(file_roots=[root]), home=tmp_path / "home")
    reward = load_world_reward()
    with (
        caplog.at_level(logging.WARNING, logger="flywheel.mining.miners"),
        opened_files() as opened,
    ):
        report = scan_generations(sessions, reward=reward, policy=policy)
    assert report.examined == 3  # the allowed images only
    assert report.refused == [(ids[k], refused[uri]) for k, uri in enumerate(uris) if k >= 3]
    assert report.as_dict()["refused"][0] == {"signal_id": ids[3], "reason": refused[secret]}
    assert not [p for p in opened if p.startswith(str(outside)) or p == "/etc/passwd"], opened
    assert [r.getMessage() for r in caplog.records] == [
        f"scan: signal {ids[k]}: image refused: {refused[uri]}"
        for k, uri in enumerate(uris)
        if k >= 3
    ]
    with sessions() as session:  # stored as sent, never read
        query = select(Signal.image_uri).where(Signal.id.in_(ids[3:])).order_by(Signal.id)
        assert list(session.scalars(query)) == list(refused)


RED = "A picture with a white background showing a large red circle at the centre."


def _feedback(number: int, prompt: str, version: int, *, up: bool) -> NewSignal:
    return stored_signal(f"fb-{number}", prompt, thumbs_up=up, model_version_id=version)


def test_near_duplicates_of_known_failures_become_hits(fresh_engine: Engine, offline: None) -> None:
    prompts = CasePrompts(
        client=QdrantClient(location=":memory:"), config=QdrantConfig(), embedder=TextEmbedder()
    )
    sessions = session_factory(fresh_engine)
    with sessions() as session:
        base = model_version_id(session, name="base")
        other = model_version_id(session, name="candidate")
        insert_signals(session, signals=[_feedback(1, RED, base, up=False)])
        session.commit()
        collect_failures(session, prompts=prompts)
        liked = [
            _feedback(2, RED.replace("at the", "in the"), base, up=True),  # a paraphrase
            _feedback(3, RED.replace("red", "blue"), base, up=True),  # another colour
            _feedback(4, RED.replace("at the", "in the"), other, up=True),  # another version
        ]
        ids = [row.id for row in insert_signals(session, signals=liked)]
        session.commit()
    report = mine_near_duplicates(sessions, prompts=prompts)
    assert report.examined == 3
    assert report.hit_event_ids == [f"near:{ids[0]}"]
    assert mine_near_duplicates(sessions, prompts=prompts).stored == 0
    with sessions() as session:
        (hit,) = _hits(session)
        case_id = session.scalar(select(FailureCase.id))
        assert _details(hit)["near_case"] == case_id
        # The hit joins the known case (the same prompt on the same model version).
        collect_failures(session, prompts=prompts)
        assert session.scalar(select(func.count()).select_from(FailureCase)) == 1


def test_tasks_run_eagerly_without_redis(environment: dict[str, str]) -> None:
    app = create_celery(get_settings())
    assert app.conf.task_always_eager
    kwargs = {
        "model_version": "world-base",
        "generator_dir": str(BASE_MODEL),
        "reward_dir": str(BASE_REWARD),
        "skill": "colour",
        "count": 7,
        "band": BAND,
        "chunk": 7,
    }
    report = app.tasks[PROBE_TASK].apply_async(kwargs=kwargs).get()
    assert report["examined"] == 7
    assert report["hits"] == report["stored"] > 0
    images = Path(environment["FLYWHEEL_HOME"]) / "mining"
    assert len(list(images.glob("*.png"))) == report["hits"]


def test_tasks_on_a_worker_over_redis(
    redis_app: Celery, fresh_engine: Engine, tmp_path: Path
) -> None:
    """A real worker (a thread of this process) takes the tasks from Redis."""
    app = redis_app
    assert not app.conf.task_always_eager
    cases = probes("colour", 8, band=BAND)
    home = Path(get_settings().home)  # the worker reads images through the policy in force
    _store_generations(fresh_engine, cases, home / "generations", [c.prompt for c in cases])
    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=30):
        scan = app.tasks[SCAN_TASK].apply_async(kwargs={"reward_dir": str(BASE_REWARD)})
        near = app.tasks[NEAR_TASK].apply_async(kwargs={})
        scanned = scan.get(timeout=120)
        assert scanned["examined"] == 8
        assert near.get(timeout=120)["hits"] == 0  # no failure cases yet
    assert scan.state == "SUCCESS"


def _worker(env: dict[str, str], log: BinaryIO) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from flywheel.cli.main import app; app()",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            "1",
            "--loglevel",
            "INFO",
        ],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_task_killed_mid_run_still_stores_each_hit_once(
    environment: dict[str, str], redis_app: Celery, fresh_engine: Engine, tmp_path: Path
) -> None:
    """``flywheel worker`` (prefork, one process) runs a probe task; its task process is
    killed after the first chunks committed. The task is handed out again and the rerun
    stores the rest: every failing probe once, as one uninterrupted run would."""
    app = redis_app
    sessions = session_factory(fresh_engine)
    log = tmp_path / "worker.log"
    with log.open("wb") as log_file:
        worker = _worker(environment, log_file)
    try:
        kwargs = {
            "model_version": "world-base",
            "generator_dir": str(BASE_MODEL),
            "reward_dir": str(BASE_REWARD),
            "skill": "colour",
            "count": 112,
            "band": BAND,
            "chunk": 14,
        }
        result = app.tasks[PROBE_TASK].apply_async(kwargs=kwargs)

        def stored() -> int:
            with sessions() as session:
                count = session.scalar(select(func.count()).where(Signal.app == MINER_APP))
                return int(count or 0)

        _wait(lambda: stored() > 0, timeout=180, what=f"the first hits (log: {log})")
        assert result.state == "STARTED", "the task finished before it could be killed"
        partial = stored()
        os.kill(int(result.info["pid"]), signal.SIGKILL)
        report = result.get(timeout=300)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
    assert "WorkerLostError" in log.read_text(errors="replace")
    assert report["examined"] == 112
    assert 0 < partial < report["hits"]  # killed between the first and the last chunk
    assert report["stored"] <= report["hits"] - partial  # the rerun stored only the rest
    with sessions() as session:
        hits = _hits(session)
    assert sorted(h.event_id for h in hits) == sorted(report["hit_event_ids"])
    assert len({h.event_id for h in hits}) == len(hits) == report["hits"]
    # Every stored image is the file its hit names.
    assert all(_file_digest(h.image_uri or "") == h.image_sha256 for h in hits)
    assert json.loads(json.dumps(report)) == report


def test_cli_mines_in_process_and_refuses_a_worker_without_redis(
    environment: dict[str, str], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from flywheel.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["worker"])
    assert result.exit_code == 2
    assert "FLYWHEEL_REDIS_URL is not set" in result.output
    result = runner.invoke(app, ["mine", "probe", "--skill", "dance"])
    assert result.exit_code == 2
    assert "unknown skill 'dance'" in result.output
    result = runner.invoke(app, ["mine", "probe", "--skill", "colour", "--model", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a generator directory" in result.output
    args = ["mine", "probe", "--skill", "colour", "--count", "7", "--band", str(BAND), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["miner"], report["examined"]) == ("probe", 7)
    assert report["stored"] == report["hits"] > 0
    result = runner.invoke(app, [*args[:-1]])  # again: every hit known, a table
    assert result.exit_code == 0, result.output
    assert "probe" in result.output
