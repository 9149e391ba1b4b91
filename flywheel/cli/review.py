"""``flywheel status`` and ``flywheel review``: where the flywheel stands, and the human
review queue for reviewers without the dashboard."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from flywheel.cli.output import console, fail
from flywheel.cli.services import database

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from flywheel.review.service import ReviewItemOut

review_app = typer.Typer(
    help="The human review queue: triage cases, training-data artefacts, promotions.",
    no_args_is_help=True,
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
ByOption = Annotated[str, typer.Option("--by", help="Who decides (recorded).")]
KINDS = (
    "augmentation_batch",
    "reward_recalibration",
    "prompt_enhancer_data",
    "model_promotion",
    "triage_case",
)
TRACKS = ("rl", "pretraining_gap", "prompt_enhancer")


def status(as_json: JsonOption = False) -> None:
    """The serving model, open cases per track, the review queue and the last cycles."""
    from flywheel.cycle.registry import RegistryError
    from flywheel.cycle.status import status_report
    from flywheel.db.engine import session_factory

    with database() as engine, session_factory(engine)() as session:
        try:
            report = status_report(session)
        except RegistryError as exc:
            fail(str(exc), code=1)
    if as_json:
        typer.echo(report.model_dump_json())
        return
    model = report.model
    console.print(
        f"model: [bold]{model.version}[/] (generator {model.generator})"
        if model
        else "model: none promoted yet (the first cycle registers the shipped base)",
        highlight=False,
    )
    cases = Table("status", "cases", title="open failure cases")
    for name, count in report.cases.items():
        cases.add_row(name, str(count))
    console.print(cases)
    tracks = Table("track", "routed", "awaiting triage", "in round", title="by track")
    for track in TRACKS:
        row = report.tracks.get(track, {})
        tracks.add_row(
            track,
            str(row.get("routed", 0)),
            str(row.get("awaiting_triage", 0)),
            str(row.get("in_round", 0)),
        )
    console.print(tracks)
    queue = Table("kind", "waiting", title="review queue")
    for kind in KINDS:
        queue.add_row(kind, str(report.review_queue.get(kind, 0)))
    console.print(queue)
    cycles = Table("cycle", "status", "started", "finished", title="last cycles")
    for cycle in report.cycles:
        finished = cycle.finished_at.isoformat(timespec="seconds") if cycle.finished_at else "-"
        cycles.add_row(
            str(cycle.id), cycle.status, cycle.started_at.isoformat(timespec="seconds"), finished
        )
    console.print(cycles)
    for cycle in report.cycles:
        if cycle.status == "waiting_for_review":
            note = (cycle.summary or {}).get("paused")
            items = note.get("review_items", []) if isinstance(note, dict) else []
            console.print(
                f"cycle {cycle.id} waits for the review of artefact item(s) "
                f"{', '.join(str(i) for i in items)} before its rounds train: "
                "`flywheel review show ID`, then approve or reject each and run "
                "`flywheel cycle` again",
                highlight=False,
                markup=False,
            )


@review_app.command("list")
def review_list(
    everything: Annotated[bool, typer.Option("--all", help="Decided items too.")] = False,
    kind: Annotated[str | None, typer.Option(help=f"Only this kind: {', '.join(KINDS)}.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Items at most.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """Items waiting for a decision (oldest first)."""
    from flywheel.db.engine import session_factory
    from flywheel.db.models import ReviewKind
    from flywheel.review.service import list_queue

    if kind is not None and kind not in KINDS:
        fail(f"--kind {kind!r}: one of {', '.join(KINDS)}")
    with database() as engine, session_factory(engine)() as session:
        items = list_queue(
            session,
            everything=everything,
            kind=ReviewKind(kind) if kind else None,
            limit=limit,
        )
    if as_json:
        typer.echo(json.dumps([i.model_dump(mode="json") for i in items]))
        return
    table = Table("id", "kind", "status", "title", "created")
    for item in items:
        table.add_row(
            str(item.id),
            item.kind,
            item.status,
            item.title,
            item.created_at.isoformat(timespec="seconds"),
        )
    console.print(table)


@review_app.command("show")
def review_show(
    item_id: Annotated[int, typer.Argument(help="The review item.")],
    as_json: JsonOption = False,
) -> None:
    """One item: its artefact and its audit trail."""
    from flywheel.db.engine import session_factory
    from flywheel.review.service import ItemNotFoundError, show_item

    with database() as engine, session_factory(engine)() as session:
        try:
            item, trail = show_item(session, item_id=item_id)
        except ItemNotFoundError as exc:
            fail(str(exc))
    if as_json:
        typer.echo(json.dumps({"item": item.model_dump(mode="json"), "audit": trail}))
        return
    console.print(f"[bold]#{item.id}[/] {item.kind} — {item.status}: {item.title}", highlight=False)
    console.print_json(json.dumps(item.artefact, default=str))
    for entry in trail:
        console.print(f"{entry['at']}  {entry['actor']}: {entry['action']}", highlight=False)


def _decide(decision: Callable[[Session], ReviewItemOut]) -> None:
    from flywheel.db.engine import session_factory
    from flywheel.review.service import ItemNotFoundError, ReviewError

    with database() as engine, session_factory(engine)() as session:
        try:
            item = decision(session)
        except (ItemNotFoundError, ReviewError, ValueError) as exc:
            fail(str(exc))
    who = item.decided_by if item.decided_by else item.claimed_by or "-"
    console.print(f"review item {item.id}: {item.status} by {who}", highlight=False)


@review_app.command("approve")
def review_approve(
    item_id: Annotated[int, typer.Argument(help="The review item.")],
    reviewer: ByOption,
    track: Annotated[
        str | None, typer.Option(help="Triage items: the track to route the case to.")
    ] = None,
    reason: Annotated[str | None, typer.Option(help="Why (recorded).")] = None,
    edits: Annotated[
        str | None,
        typer.Option(help="Artefacts: approve as edited — a JSON object (needs --reason)."),
    ] = None,
) -> None:
    """Approve an item (a triage item: route its case to --track; a model promotion:
    promote the candidate and finish its cycle)."""
    from flywheel.db.models import Track

    if track is not None and track not in TRACKS:
        fail(f"--track {track!r}: one of {', '.join(TRACKS)}")
    changes = _edits(edits)
    from flywheel.review.service import approve

    chosen = Track(track) if track else None
    _decide(
        lambda session: approve(
            session, item_id=item_id, reviewer=reviewer, reason=reason, track=chosen, edits=changes
        )
    )


def _edits(text: str | None) -> dict[str, object] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"--edits is not JSON: {exc.msg}")
    if not isinstance(value, dict):
        fail("--edits must be a JSON object")
    return value


@review_app.command("claim")
def review_claim(
    reviewer: ByOption,
    kind: Annotated[str | None, typer.Option(help="Only this kind.")] = None,
    lease_minutes: Annotated[
        float, typer.Option(min=0.2, max=1440, help="How long the claim holds the item.")
    ] = 15.0,
    as_json: JsonOption = False,
) -> None:
    """Claim the oldest waiting item under a lease (exit 1 when nothing is waiting)."""
    from datetime import timedelta

    from flywheel.db.engine import session_factory
    from flywheel.db.models import ReviewKind
    from flywheel.review.service import ReviewError, claim_next

    if kind is not None and kind not in KINDS:
        fail(f"--kind {kind!r}: one of {', '.join(KINDS)}")
    with database() as engine, session_factory(engine)() as session:
        try:
            item = claim_next(
                session,
                reviewer=reviewer,
                kind=ReviewKind(kind) if kind else None,
                lease=timedelta(minutes=lease_minutes),
            )
        except ReviewError as exc:
            fail(str(exc))
    if item is None:
        fail("nothing is waiting for review", code=1)
    if as_json:
        typer.echo(item.model_dump_json())
        return
    assert item.lease_expires_at is not None
    console.print(
        f"[bold]#{item.id}[/] {item.kind}: {item.title} — yours until "
        f"{item.lease_expires_at.isoformat(timespec='seconds')}",
        highlight=False,
    )


@review_app.command("release")
def review_release(
    item_id: Annotated[int, typer.Argument(help="The review item.")], reviewer: ByOption
) -> None:
    """Give a claimed item back to the queue."""
    from flywheel.review.service import release

    _decide(lambda session: release(session, item_id=item_id, reviewer=reviewer))


@review_app.command("decide-cluster")
def review_decide_cluster(
    cluster_id: Annotated[int, typer.Argument(help="The failure cluster.")],
    reviewer: ByOption,
    kind: Annotated[str, typer.Option(help="The kind of its items to decide.")] = "triage_case",
    approve_all: Annotated[
        bool, typer.Option("--approve/--reject", help="The decision for every item.")
    ] = True,
    track: Annotated[str | None, typer.Option(help="Triage items: the track.")] = None,
    reason: Annotated[
        str | None, typer.Option(help="Why (recorded; a rejection needs one).")
    ] = None,
) -> None:
    """One decision for every open item of a kind in a failure cluster."""
    from flywheel.db.engine import session_factory
    from flywheel.db.models import ReviewKind, Track
    from flywheel.review.service import ItemNotFoundError, ReviewError, decide_cluster

    if kind not in KINDS:
        fail(f"--kind {kind!r}: one of {', '.join(KINDS)}")
    if track is not None and track not in TRACKS:
        fail(f"--track {track!r}: one of {', '.join(TRACKS)}")
    with database() as engine, session_factory(engine)() as session:
        try:
            result = decide_cluster(
                session,
                cluster_id=cluster_id,
                kind=ReviewKind(kind),
                approved=approve_all,
                reviewer=reviewer,
                reason=reason,
                track=Track(track) if track else None,
            )
        except (ItemNotFoundError, ReviewError) as exc:
            fail(str(exc))
    console.print(
        f"cluster {cluster_id}: {len(result.decided)} decided, {len(result.skipped)} skipped",
        highlight=False,
    )
    for item_id, why in result.skipped.items():
        console.print(f"  #{item_id}: {why}", highlight=False)


@review_app.command("reject")
def review_reject(
    item_id: Annotated[int, typer.Argument(help="The review item.")],
    reviewer: ByOption,
    reason: Annotated[str, typer.Option(help="Why (recorded; required).")],
) -> None:
    """Reject an item (a triage item: dismiss its case)."""
    from flywheel.review.service import reject

    _decide(lambda session: reject(session, item_id=item_id, reviewer=reviewer, reason=reason))
