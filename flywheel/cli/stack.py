"""``flywheel stack``: the production topology, natively on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flywheel.cli.output import console, fail
from flywheel.cli.services import database
from flywheel.settings import get_settings


def stack_command(
    api_port: Annotated[int, typer.Option(min=1, max=65535, help="API port.")] = 8000,
    prefect_port: Annotated[int, typer.Option(min=1, max=65535, help="Prefect port.")] = 4200,
    api_workers: Annotated[int, typer.Option(min=1, help="API worker processes.")] = 1,
    worker_concurrency: Annotated[int, typer.Option(min=1, help="Celery processes.")] = 1,
    logs: Annotated[Path, typer.Option(help="Directory of the processes' logs.")] = Path(
        "stack-logs"
    ),
) -> None:
    """Run the production topology natively on this machine — the API, a Celery worker and
    a Prefect server — against FLYWHEEL_DATABASE_URL and FLYWHEEL_REDIS_URL, until Ctrl-C."""
    import time as clock

    from flywheel.stack import StackConfig, StackError, native_stack

    settings = get_settings()
    if not settings.database_url or not settings.redis_url:
        fail("set FLYWHEEL_DATABASE_URL and FLYWHEEL_REDIS_URL (the stack runs on real services)")
    with database(settings):
        pass
    config = StackConfig(
        api_port=api_port,
        prefect_port=prefect_port,
        api_workers=api_workers,
        worker_concurrency=worker_concurrency,
        log_dir=logs,
    )
    try:
        with native_stack(settings, config) as running:
            console.print(
                f"api {running.api_url} · Prefect {running.prefect_api_url} · Celery worker "
                f"({worker_concurrency}) · logs in {logs}/ — Ctrl-C stops them",
                highlight=False,
            )
            while all(p.poll() is None for p in running.processes.values()):
                clock.sleep(1)
            dead = [name for name, p in running.processes.items() if p.poll() is not None]
            fail(f"{', '.join(dead)} stopped; see {logs}/", code=1)
    except StackError as exc:
        fail(str(exc), code=1)
    except KeyboardInterrupt:
        console.print("stopped")
