"""The miners as Celery tasks, and the Celery app they run on.

:func:`create_celery` builds the app from the settings: with ``FLYWHEEL_REDIS_URL`` the
tasks go through Redis (broker and result backend) to ``flywheel worker`` processes; without
it (the embedded default) they run eagerly, in the calling process.

Delivery is at least once: a task is acknowledged only after it returns (``acks_late``), a
task whose worker process died is handed out again (``reject_on_worker_lost``), and a task
that a whole worker took down with it returns to the queue after
``FLYWHEEL_TASK_VISIBILITY_TIMEOUT`` seconds. Every miner is idempotent (hits keyed by what
was mined, images content-addressed), so a task run twice stores each hit once.

Models, the evaluator and the database engine are loaded once per worker process.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from celery import Celery, shared_task
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from flywheel.settings import Settings, get_settings

PROBE_TASK = "flywheel.mining.probe"
"""The embedded world's probe miner (:mod:`flywheel.world.loop.mining`), registered by name
when the project is the world."""
WORLD_TASKS = "flywheel.world.loop.mining"
SCAN_TASK = "flywheel.mining.scan"
NEAR_TASK = "flywheel.mining.near"

AT_LEAST_ONCE: dict[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    # A database that hiccups (restart, failover) is retried, not lost.
    "autoretry_for": (OperationalError,),
    "retry_backoff": True,
    "max_retries": 5,
}


def _task_modules() -> tuple[str, ...]:
    """The modules whose tasks the app runs: the miners here, and the world's probe miner
    when the project is the embedded world."""
    from flywheel.project import load_project

    return ("flywheel.mining.tasks", *((WORLD_TASKS,) if load_project().is_world else ()))


def create_celery(settings: Settings) -> Celery:
    """The Celery app of the miners: on Redis when the settings name one, else eager."""
    app = Celery("flywheel", set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        worker_prefetch_multiplier=1,
        result_expires=7 * 24 * 3600,
        broker_connection_retry_on_startup=True,
        imports=_task_modules(),
    )
    if settings.redis_url:
        app.conf.update(
            broker_url=settings.redis_url,
            result_backend=settings.redis_url,
            broker_transport_options={"visibility_timeout": settings.task_visibility_timeout},
            result_backend_transport_options={"retry_policy": {"timeout": 5.0}},
        )
    else:
        app.conf.update(
            task_always_eager=True,
            task_eager_propagates=True,
            broker_url="memory://localhost/",
            result_backend="cache+memory://",
        )
    # The shared tasks below bind to every app; importing this module registered them.
    app.loader.import_default_modules()
    return app


# ---- per-process resources ---------------------------------------------------------------------


@functools.cache
def _engine(url: str) -> Engine:
    """One engine per database URL (the settings' URL at the time of the call)."""
    from flywheel.db.engine import create_db_engine

    return create_db_engine(get_settings().model_copy(update={"database_url": url}), pool_size=2)


def sessions() -> Any:
    from flywheel.db.engine import database_url, session_factory

    settings = get_settings()
    return session_factory(_engine(database_url(settings)))


@functools.cache
def generator_at(directory: str) -> Any:
    from model.pipeline import Generator

    return Generator.load(directory)


@functools.cache
def reward_at(directory: str) -> Any:
    """An open_clip reward directory (the world's is one)."""
    from flywheel.adapters.native import LocalReward

    return LocalReward(Path(directory)).model


@functools.cache
def _project_reward() -> Any:
    """The reward part of the project in force (its adapter, its settings)."""
    from flywheel.adapters.base import AdapterContext
    from flywheel.project import build_part, load_project

    project = load_project()
    context = AdapterContext(root=project.root, home=get_settings().home)
    built = build_part(project, "reward", context)
    assert built is not None
    return built.part


def image_dir() -> Path:
    return get_settings().home / "mining"


# ---- the tasks ---------------------------------------------------------------------------------


@shared_task(name=SCAN_TASK, **AT_LEAST_ONCE)
def scan_task(
    *, reward_dir: str | None = None, after_id: int = 0, limit: int = 256
) -> dict[str, Any]:
    """Reward scan of stored generations (:func:`~flywheel.mining.miners.scan_generations`)
    with the reward at ``reward_dir``, else the project's reward part."""
    from flywheel.mining.miners import scan_generations

    reward = reward_at(reward_dir) if reward_dir is not None else _project_reward()
    report = scan_generations(sessions(), reward=reward, after_id=after_id, limit=limit)
    return report.as_dict()


@shared_task(name=NEAR_TASK, **AT_LEAST_ONCE)
def near_task(*, after_id: int = 0, limit: int = 1024) -> dict[str, Any]:
    """Near-duplicates of known failures (:func:`~flywheel.mining.miners.mine_near_duplicates`)."""
    from flywheel.cases.near import CasePrompts
    from flywheel.mining.miners import mine_near_duplicates
    from retrieval.embedding import TextEmbedder
    from retrieval.store import open_qdrant, qdrant_config

    settings = get_settings()
    config = qdrant_config(settings)
    client = open_qdrant(config)
    try:
        prompts = CasePrompts(client=client, config=config, embedder=TextEmbedder())
        report = mine_near_duplicates(sessions(), prompts=prompts, after_id=after_id, limit=limit)
    finally:
        client.close()
    return report.as_dict()
