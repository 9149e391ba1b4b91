"""``flywheel``: the command line of the data flywheel.

Every command exits 0 on success, 2 with a one-line reason on bad input, and 1 with a
one-line reason when a service it needs is unavailable. Each sub-app (``flywheel db``,
``flywheel world``, ...) and each large command lives in a module of its own under
:mod:`flywheel.cli`; this module puts them together.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from flywheel.cli.attribution import attribution_app
from flywheel.cli.cache import cache_app
from flywheel.cli.convert import convert_command
from flywheel.cli.cycle import cycle_command, deploy_command
from flywheel.cli.db import db_app, run_migration
from flywheel.cli.evaluation import eval_command
from flywheel.cli.keys import keys_app
from flywheel.cli.mining import mine_app, worker
from flywheel.cli.models import models_app
from flywheel.cli.output import console, fail
from flywheel.cli.project import doctor_command, init_command
from flywheel.cli.retrieval import retrieval_app
from flywheel.cli.review import review_app, status
from flywheel.cli.services import database
from flywheel.cli.stack import stack_command
from flywheel.cli.train import train_command
from flywheel.cli.vae import vae_app
from flywheel.cli.world import world_app
from flywheel.settings import get_settings

app = typer.Typer(
    name="flywheel",
    help="A closed-loop data flywheel for image-generation models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


# ---- serve / demo ------------------------------------------------------------------


def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to bind.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    migrate_first: Annotated[
        bool, typer.Option("--migrate/--no-migrate", help="Upgrade the database to head first.")
    ] = True,
    access_log: Annotated[
        bool, typer.Option("--access-log/--no-access-log", help="Log every request.")
    ] = True,
) -> None:
    """Run the HTTP API under uvicorn."""
    import uvicorn

    from flywheel.db import migrate
    from flywheel.db.engine import database_url
    from flywheel.logs import uvicorn_log_config

    settings = get_settings()
    try:
        url = database_url(settings)
    except ValueError as exc:
        fail(str(exc))
    # Workers (and a reload) read settings from the environment: hand them the resolved
    # URL so they join this process's embedded server instead of starting their own.
    os.environ["FLYWHEEL_DATABASE_URL"] = url
    get_settings.cache_clear()
    if migrate_first:
        with database() as engine:
            run_migration(lambda: migrate.upgrade(engine), "head")
    uvicorn.run(
        "flywheel.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=uvicorn_log_config(),
        log_level="info",
        access_log=access_log,
    )


def demo(
    report: Annotated[
        Path | None, typer.Option("--report", help="Write the demo's report as JSON here.")
    ] = None,
    events: Annotated[
        int, typer.Option(min=1, max=10_000, help="Feedback events the product app sends.")
    ] = 48,
    probes: Annotated[int, typer.Option(min=1, max=10_000, help="Colour probes mined.")] = 48,
    concept_probes: Annotated[
        int,
        typer.Option(
            min=1, max=1_000, help="Probes per skill measuring the base on common concepts."
        ),
    ] = 24,
    seed: Annotated[int, typer.Option(help="Seed of the simulated users.")] = 0,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="JSON file of cycle settings (CycleConfig fields)."),
    ] = None,
    world: Annotated[
        str | None,
        typer.Option(
            "--world",
            help="World file, or a shipped world's name (default, other); default: the "
            "default world, or --base's.",
        ),
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option(
            "--base",
            help="A build directory of `flywheel world base` (generator/, reward/, enhancer/) "
            "to serve instead of the shipped base; needed for a world other than the default.",
        ),
    ] = None,
) -> None:
    """A complete flywheel cycle on the embedded default with the shipped base (or, with
    --base, a world's build): evaluate, ingest feedback through the API, mine, attribute, run
    the three tracks' rounds, re-evaluate, promote (the final review is approved
    automatically: demo mode only), print a before / after table per track and, last, the
    goals table."""
    from flywheel.cli.cycle import load_cycle_config
    from flywheel.cli.world import demo_base
    from flywheel.demo import run_demo
    from flywheel.settings import prefect_environment

    base_dir = demo_base(world, base)
    config = load_cycle_config(config_file, auto_approve=True)
    settings = get_settings()
    with database(settings):
        pass  # fail early, in one line, when the database is unreachable
    prefect_environment(settings)
    run_demo(
        settings,
        events=events,
        seed=seed,
        console=console,
        cycle=config,
        probes=probes,
        concept_probes=concept_probes,
        report_file=report,
        base_dir=base_dir,
    )


def dashboard(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 8501,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
) -> None:
    """Serve the triage dashboard and review queue (Streamlit) on the configured database."""
    import subprocess

    import dashboard as package

    settings = get_settings()
    with database(settings):
        pass  # one-line failure when the database is unreachable
    script = Path(package.__file__).resolve().parent / "app.py"
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(script),
        "--server.port",
        str(port),
        "--server.address",
        host,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]
    console.print(f"dashboard: http://{host}:{port}", highlight=False)
    raise typer.Exit(subprocess.call(command))


# ---- the commands, in the order the help lists them -------------------------------

app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
app.add_typer(world_app, name="world")
app.add_typer(retrieval_app, name="retrieval")
app.add_typer(mine_app, name="mine")
app.add_typer(attribution_app, name="attribution")
app.add_typer(review_app, name="review")
app.add_typer(models_app, name="models")
app.add_typer(cache_app, name="cache")
app.add_typer(vae_app, name="vae")
app.command("init")(init_command)
app.command("doctor")(doctor_command)
app.command("status")(status)
app.command("cycle")(cycle_command)
app.command("deploy")(deploy_command)
app.command("worker")(worker)
app.command("convert")(convert_command)
app.command("train")(train_command)
app.command("eval")(eval_command)
app.command("serve")(serve)
app.command("demo")(demo)
app.command("dashboard")(dashboard)
app.command("stack")(stack_command)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
