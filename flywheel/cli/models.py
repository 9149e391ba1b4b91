"""``flywheel models``: register a team's model (its generator, enhancer and reward
directories) so a cycle starts from it; list and show the registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy import select

from flywheel.cli.output import console, fail
from flywheel.cli.project import ProjectOption
from flywheel.cli.services import database
from flywheel.cycle.registry import RegistryError, promote, register_version
from flywheel.db.engine import session_factory
from flywheel.db.models import Checkpoint, Component, ModelVersion
from flywheel.ports import PortName
from flywheel.project import Project, ProjectError, load_project

models_app = typer.Typer(help="The model registry: which versions exist and which serves.")


def _default_component(project: Project, component: Component) -> Path | None:
    """The directory the project file names for ``component`` (its ``path`` setting), or the
    embedded world's shipped one."""
    port: PortName = "enhancer" if component == Component.ENHANCER else "reward"
    section = project.section(port)
    if section is None:
        return None
    if section.adapter == "world":
        from flywheel.world.loop.backend import shipped_base

        configured = section.settings().get("path")
        shipped = shipped_base().components[component]
        return project.root / str(configured) if configured else shipped
    configured = section.settings().get("path")
    return (project.root / str(configured)) if configured else None


@models_app.command("register")
def register_command(
    name: Annotated[str, typer.Argument(help="The version's name (unique).")],
    generator: Annotated[
        Path,
        typer.Option("--generator", help="The generator directory (a diffusers pipeline or ours)."),
    ],
    enhancer: Annotated[
        Path | None,
        typer.Option(help="The prompt enhancer directory (default: the project's [enhancer])."),
    ] = None,
    reward: Annotated[
        Path | None, typer.Option(help="The reward directory (default: the project's [reward]).")
    ] = None,
    description: Annotated[str | None, typer.Option(help="What this version is.")] = None,
    serve: Annotated[
        bool,
        typer.Option("--promote/--no-promote", help="Make it the serving version (default)."),
    ] = True,
    project: ProjectOption = None,
) -> None:
    """Register a model version; promoted, the next cycle starts from it."""
    if not name.strip() or len(name) > 200:
        fail("NAME: 1 to 200 characters")
    try:
        loaded = load_project(project)
    except ProjectError as exc:
        fail(str(exc))
    components = {
        Component.GENERATOR: generator,
        Component.ENHANCER: enhancer or _default_component(loaded, Component.ENHANCER),
        Component.REWARD: reward or _default_component(loaded, Component.REWARD),
    }
    missing = [c.value for c, p in components.items() if p is None]
    if missing:
        fail(f"no {' or '.join(missing)} directory: pass --{missing[0]} DIR")
    with database() as engine, session_factory(engine)() as session:
        try:
            version_id = register_version(
                session,
                name=name,
                components={c: p for c, p in components.items() if p is not None},
                description=description,
            )
            if serve:
                promote(session, version_id=version_id)
        except RegistryError as exc:
            fail(str(exc))
        session.commit()
    state = "serving" if serve else "registered, not serving"
    console.print(f"model {name} (version {version_id}): {state}", highlight=False)


@models_app.command("list")
def list_command() -> None:
    """Every version, the serving one marked."""
    with database() as engine, session_factory(engine)() as session:
        versions = session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
        serving = max(
            (v for v in versions if v.promoted_at is not None),
            key=lambda v: (v.promoted_at, v.id),
            default=None,
        )
        counts = {
            v.id: len(
                session.scalars(
                    select(Checkpoint.id).where(Checkpoint.model_version_id == v.id)
                ).all()
            )
            for v in versions
        }
        table = Table("id", "serving", "promoted", "components", "description")
        table.add_column("name", no_wrap=True)
        for v in versions:
            table.add_row(
                str(v.id),
                "yes" if serving is not None and v.id == serving.id else "",
                f"{v.promoted_at:%Y-%m-%d %H:%M}" if v.promoted_at else "-",
                str(counts[v.id]),
                v.description or "",
                v.name,
            )
    console.print(table)


@models_app.command("show")
def show_command(name: Annotated[str, typer.Argument(help="The version's name.")]) -> None:
    """A version's components: where each lives, its digest, the round that made it."""
    with database() as engine, session_factory(engine)() as session:
        version = session.scalar(select(ModelVersion).where(ModelVersion.name == name))
        if version is None:
            fail(f"no model version {name!r}")
        rows = session.scalars(
            select(Checkpoint)
            .where(Checkpoint.model_version_id == version.id)
            .order_by(Checkpoint.id)
        ).all()
        promoted = f"{version.promoted_at:%Y-%m-%d %H:%M}" if version.promoted_at else "never"
        console.print(
            f"{version.name} (version {version.id}) · promoted {promoted}"
            + (f" · {version.description}" if version.description else ""),
            highlight=False,
        )
        table = Table("component", "uri", "sha256", "round")
        for row in rows:
            table.add_row(
                row.component.value,
                row.uri,
                (row.sha256 or "-")[:12],
                str(row.training_round_id) if row.training_round_id is not None else "-",
            )
    console.print(table)
