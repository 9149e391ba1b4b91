"""``flywheel eval``: a benchmark suite on a generator, stored as evaluation signals."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flywheel.cli.output import console, err_console, fail
from flywheel.cli.services import database
from flywheel.settings import get_settings

EVAL_APP = "flywheel"
"""The app that ``flywheel eval`` stores its evaluation runs under."""


def _model_version(model: Path) -> str:
    """A model version name from a generator directory's name (printable ASCII, no spaces)."""
    name = re.sub(r"[^\x21-\x7e]+", "-", model.resolve().name).strip("-")
    return name[:200] or "model"


def eval_command(
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Generator directory (default: the shipped world base)."),
    ] = None,
    suite_name: Annotated[
        str, typer.Option("--suite", help="standard or regression.")
    ] = "standard",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Noise seed of the first batch.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Cases per batch.")] = 16,
    model_version: Annotated[
        str | None,
        typer.Option("--model-version", help="Version name stored (default: the directory name)."),
    ] = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Run id (default: suite, version, UTC time).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress on stderr.")] = True,
) -> None:
    """Run a benchmark suite on a generator, store it as evaluation signals, print per-skill
    scores."""
    from datetime import UTC, datetime

    from pydantic import TypeAdapter, ValidationError
    from rich.progress import Progress

    from flywheel.db import migrate
    from flywheel.db.engine import session_factory
    from flywheel.signals.schemas import Identifier, RunIdentifier
    from flywheel.signals.service import EventConflict, ingest_evaluation
    from flywheel.world.benchmark import suite, suite_names
    from flywheel.world.evaluation import (
        BASE_MODEL,
        evaluation_run,
        run_suite,
        save_images,
    )
    from model.pipeline import Generator, GeneratorError

    if suite_name not in suite_names():
        fail(f"unknown suite {suite_name!r}; known: {', '.join(suite_names())}")
    directory = model or BASE_MODEL
    version = model_version or _model_version(directory)
    now = datetime.now(UTC)
    run = run_id or f"{suite_name}-{version[:80]}-{now:%Y%m%dT%H%M%S%fZ}"
    for option, value, kind in (
        ("--model-version", version, Identifier),
        ("--run-id", run, RunIdentifier),
    ):  # checked before minutes of generation, not after
        try:
            TypeAdapter(kind).validate_python(value)
        except ValidationError as exc:
            fail(f"{option} {value!r}: {exc.errors()[0]['msg']}")
    try:
        generator = Generator.load(directory)
    except GeneratorError as exc:
        fail(str(exc).splitlines()[0])
    settings = get_settings()
    with database(settings) as engine:
        migrate.upgrade(engine)
        cases = suite(suite_name)
        with Progress(console=err_console, disable=not progress, transient=True) as display:
            result, generated = run_suite(
                generator,
                cases,
                suite=suite_name,
                seed=seed,
                batch_size=batch_size,
                progress=display,
            )
        images = settings.home / "eval" / re.sub(r"[^\w.-]+", "_", run)
        payload = evaluation_run(
            result,
            save_images(generated, images),
            run_id=run,
            model_version=version,
            timestamp=now,
        )
        with session_factory(engine)() as session:
            try:
                stored = ingest_evaluation(session, app=EVAL_APP, run=payload)
            except EventConflict as exc:
                fail(f"run id {run!r} was stored before with other results ({exc})")
    if as_json:
        console.print_json(
            data={
                "skills": {
                    name: {"score": s.score, "n": s.n, "pass_rate": s.pass_rate}
                    for name, s in result.skills.items()
                },
                "score": result.score,
                "suite": suite_name,
                "digest": result.digest,
                "model": str(directory),
                "model_version": version,
                "run_id": run,
                "evaluation_run": stored.result.id,
                "images": str(images),
            }
        )
        return
    table = Table("skill", "score", "pass rate", "cases")
    for name, skill in result.skills.items():
        table.add_row(name, f"{skill.score:.3f}", f"{skill.pass_rate:.3f}", str(skill.n))
    console.print(table)
    console.print(
        f"{version} on {suite_name}: score {result.score:.3f}; stored as evaluation run "
        f"{run!r} ({len(result.cases)} signals), images in {images}",
        highlight=False,
        soft_wrap=True,
    )
