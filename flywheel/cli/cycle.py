"""``flywheel cycle``: run one flywheel cycle, or print its plan with ``--dry-run``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.table import Table

from flywheel.cli.output import console, fail
from flywheel.cli.services import database
from flywheel.settings import get_settings

if TYPE_CHECKING:
    from flywheel.cycle.config import CycleConfig
    from flywheel.cycle.flow import CycleOutcome
    from flywheel.cycle.plan_types import CyclePlan


def load_cycle_config(path: Path | None, **fields: Any) -> CycleConfig:
    """A :class:`CycleConfig` from a JSON file of its fields (if given) and ``fields``;
    exits 2 with the first problem."""
    from flywheel.cycle.config import CycleConfig

    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = json.loads(path.read_text())
        except OSError as exc:
            fail(f"cannot read {path}: {exc.strerror}")
        except json.JSONDecodeError as exc:
            fail(f"{path} is not JSON: {exc.msg} at line {exc.lineno}")
        if not isinstance(loaded, dict):
            fail(f"{path} must hold a JSON object of cycle settings")
        values.update(loaded)
    values.update(fields)
    try:
        return CycleConfig.model_validate(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "config"
        fail(f"cycle config: {where}: {error['msg']}")


def _plan_table(plan: CyclePlan) -> None:
    console.print(
        f"[bold]dry run[/] on {plan.model}: {plan.signals_collected} failing signal(s) -> "
        f"{plan.cases_created} new case(s); routed {plan.routed or 'none'}, "
        f"{plan.awaiting_triage} awaiting triage — nothing was written",
        highlight=False,
    )
    table = Table(title="the cycle would run")
    for column in ("track", "cases", "confidence", "top clusters", "data", "round", "est. s"):
        table.add_column(column, justify="right" if column in ("cases", "est. s") else "left")
    for track in plan.tracks:
        clusters = ", ".join(f"{label} ({n})" for label, n in track.top_clusters) or "-"
        data = "; ".join(f"{k}={v}" for k, v in track.data.items()) or "-"
        round_ = (
            f"{track.round.recipe} " + ", ".join(f"{k} {v}" for k, v in track.round.steps.items())
            if track.round
            else "none"
        )
        table.add_row(
            track.track,
            str(track.cases),
            f"{track.mean_confidence:.2f}" if track.mean_confidence is not None else "-",
            clusters,
            data,
            round_,
            f"{track.round.estimated_seconds:.0f}"
            if track.round and track.round.estimated_seconds is not None
            else "-",
        )
    console.print(table)
    if any(t.round and t.round.estimated_seconds is not None for t in plan.tracks):
        console.print(f"estimated training time: {plan.estimated_seconds:.0f} s", highlight=False)


def outcome_table(outcome: CycleOutcome) -> None:
    """The cycle's before / after per track, the regression suite and its status."""
    summary = outcome.summary
    evaluation = summary.get("evaluation") or {}
    table = Table(title=f"cycle {outcome.cycle_id}: routed failure slices, before / after")
    for column in ("track", "cases", "failure rate before", "after", "relative change"):
        table.add_column(column, justify="left" if column == "track" else "right")
    artefacts = summary.get("artefacts") or {}
    for name, track in (summary.get("tracks") or {}).items():
        figures = (evaluation.get("tracks") or {}).get(name)
        if figures is None:
            decision = (artefacts.get(name) or {}).get("decision")
            why = "skipped: its artefact was rejected" if decision == "rejected" else "no round"
            table.add_row(name, str(track["cases"]), "-", "-", track.get("reason", why))
            continue
        before, after = figures["failure_rate_before"], figures["failure_rate_after"]
        change = f"{(after - before) / before:+.0%}" if before else "-"
        table.add_row(name, str(figures["cases"]), f"{before:.2f}", f"{after:.2f}", change)
    console.print(table)
    regression = evaluation.get("regression")
    if regression:
        console.print(
            f"regression suite ({regression['cases']} cases x {regression['seeds']} seeds): "
            f"{regression['score_before']:.3f} -> {regression['score_after']:.3f}",
            highlight=False,
        )
    verdict = summary.get("gate")
    if verdict:
        console.print(
            "gate: "
            + ("[green]passed[/]" if verdict["passed"] else "[red]failed[/]: ")
            + "; ".join(verdict["reasons"]),
        )
    console.print(f"cycle {outcome.cycle_id}: [bold]{outcome.status}[/]")


def waiting_lines(outcome: CycleOutcome) -> None:
    """What a cycle waiting at ``artefact-review`` waits for, and how to decide it."""
    summary = outcome.summary
    waiting = set((summary.get("paused") or {}).get("review_items") or [])
    console.print(
        f"cycle {outcome.cycle_id} [bold]waits for review[/]: no round trains before its "
        "artefact is decided",
        highlight=False,
    )
    for track, artefact in (summary.get("artefacts") or {}).items():
        if artefact.get("item") in waiting:
            console.print(
                f"  review item {artefact['item']}: {artefact['kind']} ({track} round)",
                highlight=False,
            )
    console.print(
        "look:    flywheel review show ID\n"
        "approve: flywheel review approve ID --by NAME [--edits JSON --reason WHY]\n"
        "reject:  flywheel review reject ID --by NAME --reason WHY  (that round is skipped)\n"
        "then run `flywheel cycle` again: the cycle goes on from its artefact review",
        highlight=False,
        markup=False,
    )


def cycle_command(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; write nothing.")
    ] = False,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="JSON file of cycle settings (CycleConfig fields)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Run one flywheel cycle: collect, attribute, build each track's artefact, wait for
    the artefacts' reviews (a run ends waiting; the next one goes on), train each approved
    round, evaluate, gate, and queue the candidate for the final human review."""
    config = load_cycle_config(config_file, dry_run=dry_run)
    if config.auto_approve:
        fail("auto_approve is for `flywheel demo` only: a cycle's final review is a human's")
    from flywheel.project import ProjectError, load_project

    try:
        load_project()
    except ProjectError as exc:
        fail(str(exc))
    settings = get_settings()
    with database(settings):
        pass  # one-line failure when the database is unreachable
    from flywheel.cycle.lock import CycleBusyError
    from flywheel.cycle.runner import run_cycle

    try:
        result = run_cycle(config, progress=not as_json)
    except CycleBusyError as exc:
        fail(str(exc), code=1)
    except Exception as exc:  # the flow logged the traceback; the cycle is marked failed
        fail(f"the cycle failed: {type(exc).__name__}: {exc}", code=1)
    if as_json:
        typer.echo(result.model_dump_json())
        return
    if config.dry_run:
        from flywheel.cycle.plan_types import CyclePlan

        assert isinstance(result, CyclePlan)
        _plan_table(result)
        return
    from flywheel.cycle.flow import CycleOutcome

    assert isinstance(result, CycleOutcome)
    if result.status == "paused":
        paused = result.summary.get("paused") or {}
        fail(
            f"cycle {result.cycle_id} paused at {paused.get('step', '?')}: "
            f"{paused.get('reason', '?')} — fix it and run `flywheel cycle` again to resume",
            code=1,
        )
    from flywheel.cycle.steps import WAITING_FOR_REVIEW

    if result.status == WAITING_FOR_REVIEW:
        waiting_lines(result)
        return
    outcome_table(result)
    if result.status == "awaiting_review":
        console.print(
            "next: the final review — `flywheel review list --kind model_promotion`, "
            "then `flywheel review approve|reject ID`"
        )


def deploy_command(
    work_pool: Annotated[
        str, typer.Option(help="Process work pool that runs cycles.")
    ] = "flywheel",
    name: Annotated[
        str, typer.Option(help="Deployment name (flywheel-cycle/NAME).")
    ] = "production",
    min_cases: Annotated[
        int, typer.Option(min=1, help="Routed cases on one track that start a cycle.")
    ] = 20,
    within_hours: Annotated[
        float, typer.Option(min=0.01, help="Window (hours) those cases are counted in.")
    ] = 24.0,
    cron: Annotated[str | None, typer.Option(help="Also run on this cron schedule.")] = None,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="JSON file of cycle settings (CycleConfig fields)."),
    ] = None,
) -> None:
    """Register the production cycle with the Prefect API (PREFECT_API_URL): a process work
    pool, the cycle deployment and the automation that runs it when enough cases are routed
    to a track."""
    import os
    from datetime import timedelta

    config = load_cycle_config(config_file)
    if config.auto_approve:
        fail("auto_approve is for `flywheel demo` only: a cycle's final review is a human's")
    if not os.environ.get("PREFECT_API_URL"):
        fail("set PREFECT_API_URL to the Prefect server the workers poll (see the README)")
    from flywheel.cycle.deploy import DeployConfig, deploy_cycle

    deploy = DeployConfig(
        work_pool=work_pool,
        name=name,
        min_cases=min_cases,
        within=timedelta(hours=within_hours),
        cron=cron,
    )
    try:
        deployed = deploy_cycle(deploy, config)
    except ValueError as exc:
        fail(str(exc))
    except Exception as exc:  # the API refused or did not answer
        fail(f"Prefect API: {type(exc).__name__}: {str(exc).splitlines()[0]}", code=1)
    console.print(
        f"deployment [bold]{deployed.deployment}[/] ({deployed.deployment_id}) on work pool "
        f"[bold]{deployed.work_pool}[/]; runs when {min_cases} cases are routed to a track "
        f"within {within_hours:g} h" + (f" and on {cron!r}" if cron else ""),
        highlight=False,
    )
    console.print(f"start a worker: prefect worker start --pool {deployed.work_pool}")
