"""The cycle as a Prefect 3 flow: small tasks over the cycle's steps — the embedded world's
(:mod:`flywheel.world.loop.steps`) or, when the project file names a team's stack, the ports'
(:mod:`flywheel.cycle.stack_steps`), and the steps both share (:mod:`flywheel.cycle.steps`).

``cycle_flow`` holds the cycle lock (one cycle at a time, any host on the database), opens
or resumes the cycle, and runs attribute → prepare rounds → artefact review → each round →
candidate → evaluation → gate and review request as tasks (retried; each step is
idempotent, so a retry or a rerun after a crash picks up where the last one stopped).

**Artefact review.** No round trains before a reviewer decided its artefact (the review
items ``prepare-rounds`` made): a rejected artefact's round is skipped (the others go on;
all skipped: the cycle closes like one with nothing to train), an approved one's round
trains on it as edited. While one waits, the flow run pauses in Prefect for up to
``review_wait_seconds`` (each decision resumes it); still undecided — or with no wait —
the run ends with the cycle ``running``, waiting at ``artefact-review`` (the outcome's
status ``waiting_for_review``, the items in the summary's ``paused`` note), and the next
run goes on from there. In ``auto_approve`` mode (the demo) the demo reviewer approves
each artefact, logged one line each.

The flow ends when the cycle waits for its final review: the reviewer's decision
(``flywheel review approve|reject`` or the review API) finishes the cycle in the decision's
transaction — the pause lives in PostgreSQL, so it survives restarts and needs no process
waiting. With ``review_wait_seconds`` the flow run also pauses in Prefect
(``pause_flow_run``, holding the cycle lock) and the decision resumes it
(:func:`flywheel.review.service` calls ``resume_flow_run``), so the run's state follows the
review. In ``auto_approve`` mode (the
demo) the review is decided at once and the flow returns the finished cycle.

:func:`flywheel.cycle.runner.run_cycle` is what the CLI calls: a dry run plans without
Prefect and without writing; otherwise it runs this flow.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from flywheel.adapters.base import AdapterContext
from flywheel.cycle import steps
from flywheel.cycle.backend import CycleBackend, Indexes, cycle_backend
from flywheel.cycle.config import CycleConfig
from flywheel.cycle.lock import cycle_lock
from flywheel.cycle.steps import ARTEFACT_REVIEW, ArtefactReview, WaitingItem
from flywheel.cycle.verdicts import Evaluation
from flywheel.db.engine import create_db_engine
from flywheel.db.models import Cycle, CycleStatus
from flywheel.ports import PortError
from flywheel.project import Project, load_project
from flywheel.settings import Settings, get_settings
from retrieval.embedding import TextEmbedder
from retrieval.store import open_qdrant, qdrant_config

FLOW_NAME = "flywheel-cycle"
PAUSED = steps.PAUSED
"""A run's outcome when a part of the stack failed: the cycle stays ``running`` with the
reason in its summary (``paused``), and the next run resumes it."""
WAITING_FOR_REVIEW = steps.WAITING_FOR_REVIEW
"""A run's outcome when artefacts wait for a reviewer: the cycle stays ``running``, the
items in its summary (``paused.review_items``), and the next run goes on once they are
decided."""


class AwaitingArtefactReview(Exception):
    """Artefacts still wait for a reviewer: the run stops at ``artefact-review``."""

    def __init__(self, waiting: list[WaitingItem]) -> None:
        super().__init__(steps.waiting_reason(waiting))
        self.waiting = waiting


class CycleOutcome(BaseModel):
    """Where a cycle run left the cycle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cycle_id: int
    status: str
    resumed: bool
    """The run finished a cycle an earlier run left running."""
    summary: dict[str, Any]


@dataclass(kw_only=True, slots=True)
class CycleRuntime:
    """The services the cycle's tasks share (built by the flow, not a parameter)."""

    engine: Engine
    home: Path
    indexes: Indexes
    backend: CycleBackend
    """The stack-dependent steps: a project's ports, or the embedded world's."""
    progress: bool


def _cycle(session: Session, cycle_id: int) -> Cycle:
    cycle = session.get(Cycle, cycle_id)
    if cycle is None:
        raise LookupError(f"no cycle {cycle_id}")
    return cycle


@task(name="attribute", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def attribute_task(runtime: CycleRuntime, cycle_id: int) -> dict[str, Any]:
    """Turn signals into cases, theme them and route them."""
    with Session(runtime.engine) as session:
        return runtime.backend.attribute(
            session, _cycle(session, cycle_id), home=runtime.home, indexes=runtime.indexes
        )


@task(name="prepare-rounds", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def prepare_task(runtime: CycleRuntime, cycle_id: int) -> dict[str, Any]:
    """Build each track's artefact, review item and pending round."""
    with Session(runtime.engine) as session:
        return runtime.backend.prepare_rounds(
            session, _cycle(session, cycle_id), home=runtime.home, indexes=runtime.indexes
        )


@task(name="artefact-review", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def artefact_review_task(runtime: CycleRuntime, cycle_id: int) -> ArtefactReview:
    """Act on the artefacts' decisions: rejected rounds skipped, the rest to train or waiting."""
    with Session(runtime.engine) as session:
        return steps.review_artefacts(session, _cycle(session, cycle_id))


@task(name="training-round", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def round_task(runtime: CycleRuntime, round_id: int) -> dict[str, Any]:
    """Train one round (in-process, or through the project's launcher), resuming from its
    checkpoints."""
    with Session(runtime.engine) as session:
        return runtime.backend.run_round(
            session, round_id, home=runtime.home, progress=runtime.progress
        )


@task(name="register-candidate", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def candidate_task(runtime: CycleRuntime, cycle_id: int) -> int:
    """Register the candidate model version."""
    with Session(runtime.engine) as session:
        return steps.register_candidate(session, _cycle(session, cycle_id))


@task(name="evaluate", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def evaluate_task(runtime: CycleRuntime, cycle_id: int) -> Evaluation:
    """Evaluate base and candidate on the gate's cases, the regression suite and the
    scenarios."""
    with Session(runtime.engine) as session:
        return runtime.backend.evaluate(session, _cycle(session, cycle_id))


@task(name="gate-and-review", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def review_task(runtime: CycleRuntime, cycle_id: int) -> str:
    """Gate the candidate and ask for the final review."""
    with Session(runtime.engine) as session:
        return steps.request_review(session, _cycle(session, cycle_id)).value


@task(name="close-without-rounds", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def close_task(runtime: CycleRuntime, cycle_id: int) -> str:
    """Close a cycle that had nothing to train."""
    with Session(runtime.engine) as session:
        return steps.close_without_rounds(session, _cycle(session, cycle_id)).value


@flow(name=FLOW_NAME, log_prints=True)
def cycle_flow(config: CycleConfig | None = None, progress: bool = False) -> CycleOutcome:
    """One flywheel cycle, from the signals to the final review (see the module docstring)."""
    config = config or CycleConfig()
    if config.dry_run:
        raise ValueError("the cycle flow does not plan: run_cycle plans a dry run")
    settings = get_settings()
    logger = get_run_logger()
    project = load_project()
    engine = create_db_engine(settings, pool_size=2)
    try:
        with (
            cycle_lock(engine),
            _runtime(
                settings, engine, project=project, device=config.device, progress=progress
            ) as runtime,
        ):
            with Session(engine) as session:
                cycle, resumed = steps.open_cycle(
                    session, config=config, shipped=runtime.backend.shipped_model()
                )
                steps.resume_cycle(session, cycle)
                cycle.flow_run_id = str(flow_run.get_id() or "") or cycle.flow_run_id
                session.commit()
                cycle_id = cycle.id
            logger.info(
                "%s cycle %d on %s",
                "resuming" if resumed else "started",
                cycle_id,
                runtime.backend.name,
            )
            position = _Position()
            try:
                _steps(runtime, cycle_id, logger, position)
            except PortError as exc:
                # A part of the stack failed (retries spent): pause, keep everything.
                with Session(engine) as session:
                    steps.pause_cycle(session, cycle_id, step=position.step, reason=str(exc))
                logger.warning("cycle %d paused: %s", cycle_id, exc)
            except AwaitingArtefactReview as exc:
                # Nothing failed: the cycle waits for its reviewers, the next run goes on.
                with Session(engine) as session:
                    steps.pause_cycle(
                        session,
                        cycle_id,
                        step=position.step,
                        reason=str(exc),
                        review_items=[w.item for w in exc.waiting],
                    )
                logger.info("cycle %d %s", cycle_id, exc)
            except Exception as exc:
                with Session(engine) as session:
                    steps.fail_cycle(session, cycle_id, error=f"{type(exc).__name__}: {exc}")
                raise
            with Session(engine) as session:
                cycle = _cycle(session, cycle_id)
                return CycleOutcome(
                    cycle_id=cycle.id,
                    status=steps.run_state(cycle),
                    resumed=resumed,
                    summary=dict(cycle.summary or {}),
                )
    finally:
        engine.dispose()


@dataclass(slots=True)
class _Position:
    """The step a cycle run is at (what a pause names)."""

    step: str = "attribute"


def _review_wait(runtime: CycleRuntime, cycle_id: int) -> int:
    with Session(runtime.engine) as session:
        return steps.cycle_config(_cycle(session, cycle_id)).review_wait_seconds


def _pause(wait: int) -> bool:
    """Pause the flow run until a decision resumes it (True) or ``wait`` seconds pass."""
    try:
        pause_flow_run(timeout=wait, poll_interval=max(1, min(10, wait // 20)))
    except FlowPauseTimeout:
        return False
    return True


def _reviewed_rounds(runtime: CycleRuntime, cycle_id: int, logger: Any) -> ArtefactReview:
    """The artefacts' decisions, waiting for them (paused in Prefect, up to
    ``review_wait_seconds``); :class:`AwaitingArtefactReview` when some are still undecided."""
    review = artefact_review_task(runtime, cycle_id)
    wait = _review_wait(runtime, cycle_id)
    deadline = time.monotonic() + wait
    while True:
        for item in review.auto_approved:
            logger.info(
                "demo mode: the %s round's %s (review item %d) is approved by the demo reviewer",
                item.track,
                item.kind,
                item.item,
            )
        if not review.waiting:
            break
        left = int(deadline - time.monotonic())
        if left <= 0:
            raise AwaitingArtefactReview(review.waiting)
        logger.info(
            "%s; the flow run pauses for up to %d s", steps.waiting_reason(review.waiting), left
        )
        if not _pause(left):
            raise AwaitingArtefactReview(review.waiting)
        review = artefact_review_task(runtime, cycle_id)
    for track, round_id in review.skipped.items():
        logger.info("%s round %d is skipped: its artefact was rejected", track, round_id)
    return review


def _steps(runtime: CycleRuntime, cycle_id: int, logger: Any, position: _Position) -> None:
    attribution = attribute_task(runtime, cycle_id)
    logger.info("attribution: %s", attribution)
    position.step = "prepare-rounds"
    tracks = prepare_task(runtime, cycle_id)
    if not any(t.get("round") is not None for t in tracks.values()):
        logger.info("no track has a round this cycle: %s", tracks)
        close_task(runtime, cycle_id)
        return
    position.step = ARTEFACT_REVIEW
    rounds = _reviewed_rounds(runtime, cycle_id, logger).rounds
    if not rounds:
        logger.info("every round's artefact was rejected: cycle %d has nothing to train", cycle_id)
        close_task(runtime, cycle_id)
        return
    for name, round_id in rounds:
        position.step = f"round-{name}"
        metrics = round_task.with_options(name=f"round-{name}")(runtime, round_id)
        logger.info("%s round %d: %s", name, round_id, metrics.get("stages"))
    position.step = "register-candidate"
    candidate_task(runtime, cycle_id)
    position.step = "evaluate"
    evaluation = evaluate_task(runtime, cycle_id)
    logger.info("evaluation: %s", evaluation)
    position.step = "gate-and-review"
    status = review_task(runtime, cycle_id)
    logger.info("cycle %d is %s", cycle_id, status)
    wait = _review_wait(runtime, cycle_id)
    if status == CycleStatus.AWAITING_REVIEW.value and wait > 0 and not _pause(wait):
        logger.info("no decision within %d s: the decision will finish cycle %d", wait, cycle_id)


@contextmanager
def _runtime(
    settings: Settings, engine: Engine, *, project: Project, device: str, progress: bool
) -> Iterator[CycleRuntime]:
    context = AdapterContext(root=project.root, home=settings.home, device=device)
    backend = cycle_backend(project, context)
    qdrant = qdrant_config(settings)
    client = open_qdrant(qdrant)
    try:
        yield CycleRuntime(
            engine=engine,
            home=settings.home,
            indexes=Indexes(client=client, qdrant=qdrant, embedder=TextEmbedder()),
            backend=backend,
            progress=progress,
        )
    finally:
        client.close()
