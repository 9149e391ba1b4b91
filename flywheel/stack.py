"""The production topology natively, for tests and a single machine: the API
(``flywheel serve``), a Celery worker (``flywheel worker``) and a Prefect server, each its
own process, against the PostgreSQL and Redis the settings name (``flywheel stack``).

:func:`native_stack` starts them, waits until each answers (``/readyz``, a Celery ping,
Prefect's ``/api/health``) and stops them — SIGTERM to each process group, SIGKILL after a
grace period — when the ``with`` block ends. Logs go to one file per process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from flywheel.settings import Settings

FLYWHEEL = [sys.executable, "-c", "from flywheel.cli.main import app; app()"]


class StackError(RuntimeError):
    """A process of the stack did not start (its log says why)."""


@dataclass(kw_only=True, slots=True)
class StackConfig:
    """Where the stack listens and how big it is."""

    api_port: int = 0
    """0: a free port."""
    prefect_port: int = 0
    """0: a free port."""
    api_workers: int = 1
    worker_concurrency: int = 1
    log_dir: Path
    """One ``<process>.log`` each."""
    start_timeout: float = 90.0
    """Seconds each process has to answer."""
    prefect: bool = True
    """Start the Prefect server too (a load test of the API needs none)."""


@dataclass(frozen=True, slots=True)
class RunningStack:
    """Where the running stack answers, and its processes (by role)."""

    api_url: str
    prefect_api_url: str
    processes: dict[str, subprocess.Popen[bytes]]
    env: dict[str, str]
    """The environment its processes run with (give it to clients)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(
    name: str,
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    *,
    log: Path,
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise StackError(f"{name} exited with {process.returncode}; see {log}")
        try:
            if ready():
                return
        except (httpx.HTTPError, OSError):
            pass
        if time.monotonic() > deadline:
            raise StackError(f"{name} did not answer within {timeout:g} s; see {log}")
        time.sleep(0.2)


def _stop(process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _http_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=2).status_code == 200


def _celery_answers(settings: Settings) -> Callable[[], bool]:
    from flywheel.mining.tasks import create_celery

    app = create_celery(settings)
    return lambda: bool(app.control.ping(timeout=1.0))


@contextmanager
def native_stack(settings: Settings, config: StackConfig) -> Iterator[RunningStack]:
    """Start the API, a Celery worker and a Prefect server; stop them on exit."""
    if not settings.database_url or not settings.redis_url:
        raise StackError("the native stack needs FLYWHEEL_DATABASE_URL and FLYWHEEL_REDIS_URL")
    config.log_dir.mkdir(parents=True, exist_ok=True)
    (settings.home / "prefect-server").mkdir(parents=True, exist_ok=True)  # its SQLite
    api_port = config.api_port or _free_port()
    prefect_port = config.prefect_port or _free_port()
    prefect_api = f"http://127.0.0.1:{prefect_port}/api"
    env = {
        **os.environ,
        "FLYWHEEL_DATABASE_URL": settings.database_url,
        "FLYWHEEL_REDIS_URL": settings.redis_url,
        "FLYWHEEL_HOME": str(settings.home),
        "FLYWHEEL_RATE_LIMIT": settings.rate_limit,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_HOME": str(settings.home / "prefect-server"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    commands = {
        "prefect": [
            sys.executable, "-m", "prefect", "server", "start",
            "--host", "127.0.0.1", "--port", str(prefect_port),
        ],
        "api": [
            *FLYWHEEL, "serve", "--port", str(api_port), "--workers", str(config.api_workers),
        ],
        "worker": [
            *FLYWHEEL, "worker", "--concurrency", str(config.worker_concurrency),
            "--pool", "prefork",
        ],
    }  # fmt: skip
    checks = {
        "prefect": _http_ok(f"{prefect_api}/health"),
        "api": _http_ok(f"http://127.0.0.1:{api_port}/readyz"),
        "worker": _celery_answers(settings),
    }
    if not config.prefect:
        del commands["prefect"], checks["prefect"]
    processes: dict[str, subprocess.Popen[bytes]] = {}
    with ExitStack() as cleanup:
        for name, command in commands.items():
            log = config.log_dir / f"{name}.log"
            handle = cleanup.enter_context(log.open("wb"))
            process = subprocess.Popen(
                command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
            )
            processes[name] = process
            cleanup.callback(_stop, process)
        for name, process in processes.items():
            _wait(
                name,
                process,
                checks[name],
                log=config.log_dir / f"{name}.log",
                timeout=config.start_timeout,
            )
        yield RunningStack(
            api_url=f"http://127.0.0.1:{api_port}",
            prefect_api_url=prefect_api,
            processes=processes,
            env=env,
        )
