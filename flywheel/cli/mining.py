"""``flywheel worker`` and ``flywheel mine``: the Celery worker of the miners, and sending
mining tasks to it (or running them in-process, eagerly, in the embedded default)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.table import Table
from sqlalchemy.exc import OperationalError

from flywheel.cli.output import console, fail
from flywheel.cli.services import database
from flywheel.settings import get_settings

mine_app = typer.Typer(
    help="Bad-case mining: send miner tasks to the workers (in-process without Redis).",
    no_args_is_help=True,
)

PROBE_BAND = 50_000_000
"""Default seed band of mining probes: far from the benchmark suites' and weaknesses' bands."""


def worker(
    concurrency: Annotated[
        int, typer.Option(min=1, help="Worker processes (prefork) or threads.")
    ] = 1,
    pool: Annotated[
        Literal["prefork", "solo", "threads"], typer.Option(help="Celery execution pool.")
    ] = "prefork",
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    name: Annotated[
        str | None, typer.Option(help="Worker node name (default: mining@<host>).")
    ] = None,
) -> None:
    """Start a Celery worker of the miners on the Redis of FLYWHEEL_REDIS_URL."""
    from flywheel.logs import redact_celery_logs
    from flywheel.mining.tasks import create_celery

    settings = get_settings()
    if not settings.redis_url:
        fail(
            "FLYWHEEL_REDIS_URL is not set: without a broker the miners run in-process "
            "(eagerly) and need no worker"
        )
    app = create_celery(settings)
    redact_celery_logs()
    app.worker_main(
        [
            "worker",
            f"--loglevel={loglevel}",
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            f"--hostname={name or f'mining@{socket.gethostname()}'}",
        ]
    )


def _send(name: str, kwargs: dict[str, Any], *, wait: bool, as_json: bool, timeout: float) -> None:
    from celery.exceptions import TimeoutError as ResultTimeout
    from kombu.exceptions import OperationalError as BrokerError

    from flywheel.logs import redact
    from flywheel.mining.tasks import create_celery

    settings = get_settings()
    app = create_celery(settings)
    if not settings.redis_url:
        with database():  # in-process: the database must answer first (exits 1 if not)
            pass
    try:
        if settings.redis_url:  # fail fast, with one line, when Redis does not answer
            with app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=2, interval_start=0.2, timeout=5)
        result = app.tasks[name].apply_async(kwargs=kwargs)
        if not wait and settings.redis_url:
            console.print(f"sent {name} as task {result.id}")
            return
        report: dict[str, Any] = result.get(timeout=timeout)
    except BrokerError as exc:
        reason = redact(str(exc).splitlines()[0])
        fail(f"broker unreachable ({redact(settings.redis_url or '')}): {reason}", code=1)
    except ResultTimeout:
        fail(f"no result in {timeout:g} s: is a `flywheel worker` running?", code=1)
    except (OperationalError, ValueError, OSError) as exc:
        fail(f"{name} failed: {str(exc).splitlines()[0]}", code=1)
    if as_json:
        typer.echo(json.dumps(report))
        return
    table = Table("miner", "examined", "hits", "stored", "last signal id")
    table.add_row(
        report["miner"],
        str(report["examined"]),
        str(report["hits"]),
        str(report["stored"]),
        str(report["last_signal_id"] if report["last_signal_id"] is not None else "-"),
    )
    console.print(table)


WaitOption = Annotated[
    bool, typer.Option("--wait/--no-wait", help="Wait for the result (always, without Redis).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the report as JSON.")]
TimeoutOption = Annotated[
    float, typer.Option(min=1, help="Seconds to wait for the result (with Redis).")
]


@mine_app.command("probe")
def mine_probe(
    skill: Annotated[
        str,
        typer.Option(
            help="Skill to probe: shape, colour, count, relation, text-latin, "
            "text-logographic, editing, terse."
        ),
    ],
    count: Annotated[int, typer.Option(min=1, help="Probe cases.")] = 64,
    band: Annotated[int, typer.Option(min=0, help="Seed band of the probe scenes.")] = PROBE_BAND,
    seed: Annotated[int, typer.Option(help="Noise seed of the first chunk.")] = 0,
    model: Annotated[
        Path | None, typer.Option(help="Generator directory (default: the shipped world base).")
    ] = None,
    model_version: Annotated[
        str | None,
        typer.Option(help="Model version of the hits (default: <dir name>-<weights digest>)."),
    ] = None,
    reward: Annotated[
        Path | None, typer.Option(help="Reward model directory (default: the shipped one).")
    ] = None,
    chunk: Annotated[int, typer.Option(min=1, help="Probes per generated chunk.")] = 16,
    wait: WaitOption = True,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 3600,
) -> None:
    """Targeted mining: generate a skill's probes, store the failing ones as mining hits."""
    from flywheel.world.base_model import BASE_REWARD
    from flywheel.world.benchmark import SKILLS
    from flywheel.world.evaluation import BASE_MODEL
    from retrieval.embedding import weights_digest

    if skill not in SKILLS:
        fail(f"unknown skill {skill!r}; known: {', '.join(SKILLS)}")
    generator = (model or BASE_MODEL).resolve()
    reward_dir = (reward or BASE_REWARD).resolve()
    for what, path, marker in (
        ("generator", generator, "generator.json"),
        ("reward model", reward_dir, "open_clip_config.json"),
    ):
        if not (path / marker).is_file():
            fail(f"{path}: not a {what} directory (no {marker})")
    kwargs = {
        "model_version": model_version or f"{generator.name}-{weights_digest(generator)}",
        "generator_dir": str(generator),
        "reward_dir": str(reward_dir),
        "skill": skill,
        "count": count,
        "band": band,
        "seed": seed,
        "chunk": chunk,
    }
    from flywheel.mining.tasks import PROBE_TASK

    _send(PROBE_TASK, kwargs, wait=wait, as_json=as_json, timeout=timeout)


@mine_app.command("scan")
def mine_scan(
    after_id: Annotated[int, typer.Option(min=0, help="Scan signals after this id.")] = 0,
    limit: Annotated[int, typer.Option(min=1, help="Signals to scan at most.")] = 256,
    reward: Annotated[
        Path | None,
        typer.Option(
            help="An open_clip reward directory (default: the project's [reward]; the embedded "
            "world's shipped reward)."
        ),
    ] = None,
    wait: WaitOption = True,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 3600,
) -> None:
    """Score stored generations with the reward model; store the ones it rejects as hits."""
    from flywheel.mining.tasks import SCAN_TASK
    from flywheel.project import ProjectError, load_project

    try:
        project = load_project()
    except ProjectError as exc:
        fail(str(exc))
    reward_dir: Path | None = reward.resolve() if reward is not None else None
    if reward_dir is None and project.is_world:
        from flywheel.world.base_model import BASE_REWARD

        reward_dir = BASE_REWARD.resolve()
    if reward_dir is not None and not (reward_dir / "open_clip_config.json").is_file():
        fail(f"{reward_dir}: not a reward model directory (no open_clip_config.json)")
    kwargs = {
        "reward_dir": str(reward_dir) if reward_dir is not None else None,
        "after_id": after_id,
        "limit": limit,
    }
    _send(SCAN_TASK, kwargs, wait=wait, as_json=as_json, timeout=timeout)


@mine_app.command("near")
def mine_near(
    after_id: Annotated[int, typer.Option(min=0, help="Look at signals after this id.")] = 0,
    limit: Annotated[int, typer.Option(min=1, help="Signals to look at, at most.")] = 1024,
    wait: WaitOption = True,
    as_json: JsonOption = False,
    timeout: TimeoutOption = 3600,
) -> None:
    """Store signals whose prompt nearly repeats a known failure's as mining hits."""
    from flywheel.mining.tasks import NEAR_TASK

    kwargs = {"after_id": after_id, "limit": limit}
    _send(NEAR_TASK, kwargs, wait=wait, as_json=as_json, timeout=timeout)
