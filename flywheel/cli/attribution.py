"""``flywheel attribution``: route failure cases to tracks, override a route, measure the
classifier on the world's labeled set."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from flywheel.cli.output import console, fail
from flywheel.cli.services import database, qdrant

if TYPE_CHECKING:
    from flywheel.attribution.classifier import AttributionMetrics

attribution_app = typer.Typer(
    help="Attribution: route failure cases to the rl, pretraining_gap or prompt_enhancer track.",
    no_args_is_help=True,
)

ModelOption = Annotated[
    Path | None, typer.Option(help="Generator under test (default: the shipped world base).")
]
RewardOption = Annotated[
    Path | None, typer.Option(help="Reward model directory (default: the shipped one).")
]
PerTrackOption = Annotated[
    int, typer.Option(min=2, help="Labeled failing cases per track (seed set).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
TRACK_NAMES = ("rl", "pretraining_gap", "prompt_enhancer")


def _directories(model: Path | None, reward: Path | None) -> tuple[Path, Path]:
    from flywheel.world.base_model import BASE_REWARD
    from flywheel.world.evaluation import BASE_MODEL

    generator = (model or BASE_MODEL).resolve()
    reward_dir = (reward or BASE_REWARD).resolve()
    if not (generator / "generator.json").is_file():
        fail(f"{generator}: not a generator directory (no generator.json)")
    if not (reward_dir / "open_clip_config.json").is_file():
        fail(f"{reward_dir}: not a reward model directory (no open_clip_config.json)")
    return generator, reward_dir


def _metrics_table(metrics: AttributionMetrics) -> Table:
    table = Table("track", "precision", "recall", "F1", "cases", title="attribution (held out)")
    for track, scores in metrics.tracks.items():
        table.add_row(
            track,
            f"{scores.precision:.3f}",
            f"{scores.recall:.3f}",
            f"{scores.f1:.3f}",
            str(scores.support),
        )
    return table


@attribution_app.command("measure")
def measure_command(
    per_track: PerTrackOption = 24,
    train_band: Annotated[int, typer.Option(help="Seed band of the training set.")] = 70_000_000,
    test_band: Annotated[int, typer.Option(help="Seed band of the held-out set.")] = 80_000_000,
    corpus: Annotated[int, typer.Option(min=10, help="Corpus captions to index.")] = 1500,
    model: ModelOption = None,
    reward: RewardOption = None,
    on_world: Annotated[
        str | None,
        typer.Option(
            "--on-world",
            help="Measure on this world (a file or a shipped world's name) with its shipped "
            "base, instead of the model's own world.",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Fit the classifier on one labeled set of the model's world's weaknesses, measure it on
    another — of another seed band, or of another world (``--on-world``: its base, corpus,
    rare concepts, users' words and reward bias) — per-track precision / recall / F1,
    macro-F1, calibration error."""
    from flywheel.attribution.classifier import NotEnoughExamplesError, fit_classifier, measure
    from flywheel.world.base_model import ShippedBase, shipped_base_of, world_base_config
    from flywheel.world.definition import (
        WorldDefinition,
        WorldFileError,
        load_world,
        world_file,
        world_of,
    )
    from flywheel.world.loop.attribution import (
        LabeledSetConfig,
        labeled_examples,
        world_evidence_tools,
        world_labeled_set,
        world_scarcity,
    )
    from retrieval.embedding import TextEmbedder

    if train_band == test_band:
        fail("--train-band and --test-band must differ (the held-out set is another band)")
    generator, reward_dir = _directories(model, reward)
    world = world_of(generator)
    elsewhere: WorldDefinition | None = None
    shipped: ShippedBase | None = None
    if on_world is not None:
        try:
            elsewhere = load_world(world_file(on_world))
        except WorldFileError as exc:
            fail(str(exc))
        if elsewhere.name == world.name:
            fail(f"--on-world {on_world} is the model's own world; name another")
        shipped = shipped_base_of(elsewhere.name)
        if shipped is None:
            fail(
                f"no base of the {elsewhere.name} world ships; build one with flywheel world "
                f"base --world {on_world} --out DIR --ship"
            )
    embedder = TextEmbedder()
    test_config = LabeledSetConfig(per_track=per_track, band=test_band, seed=1)
    with qdrant() as (client, config):
        probe = world_scarcity(
            client, config, embedder, corpus=corpus, base=world_base_config(world)
        )
        tools = world_evidence_tools(generator, reward_dir=reward_dir, scarcity=probe)
        train = labeled_examples(
            tools, LabeledSetConfig(per_track=per_track, band=train_band), world=world
        )
        if elsewhere is None:
            test = labeled_examples(tools, test_config, world=world)
    if elsewhere is not None and shipped is not None:
        test = world_labeled_set(
            elsewhere,
            generator=shipped.generator,
            reward=shipped.reward,
            config=test_config,
            embedder=embedder,
            corpus=corpus,
        )
    try:
        classifier = fit_classifier(train)
    except NotEnoughExamplesError as exc:
        fail(str(exc))
    metrics = measure(classifier.decide([e for e, _ in test]), [t for _, t in test])
    if as_json:
        typer.echo(metrics.model_dump_json())
        return
    console.print(_metrics_table(metrics))
    console.print(
        f"accuracy {metrics.accuracy:.3f}, calibration error {metrics.calibration_error:.3f}, "
        f"{metrics.cases} held-out cases"
        + (f" of the {elsewhere.name} world" if elsewhere is not None else ""),
        highlight=False,
    )
    console.print(f"macro-F1 {metrics.macro_f1:.3f}")


@attribution_app.command("run")
def run_command(
    min_confidence: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Below this a case waits for triage.")
    ] = 0.6,
    limit: Annotated[int | None, typer.Option(min=1, help="Route at most this many.")] = None,
    per_track: PerTrackOption = 24,
    corpus: Annotated[int, typer.Option(min=10, help="Corpus captions to index.")] = 1500,
    model: ModelOption = None,
    reward: RewardOption = None,
    as_json: JsonOption = False,
) -> None:
    """Route every open failure case (evidence, classifier, triage below the threshold)."""
    from flywheel.attribution.classifier import ClassifierConfig, NotEnoughExamplesError
    from flywheel.attribution.service import attribute_open_cases, routing_classifier
    from flywheel.db.engine import session_factory
    from flywheel.settings import get_settings
    from flywheel.world.loop.attribution import (
        LabeledSetConfig,
        seed_examples,
        world_evidence_tools,
        world_scarcity,
    )
    from retrieval.embedding import TextEmbedder

    generator, reward_dir = _directories(model, reward)
    with database() as engine, qdrant() as (client, config):
        probe = world_scarcity(client, config, TextEmbedder(), corpus=corpus)
        tools = world_evidence_tools(generator, reward_dir=reward_dir, scarcity=probe)
        try:
            seeds = seed_examples(
                tools,
                generator_dir=generator,
                reward_dir=reward_dir,
                directory=get_settings().home / "attribution",
                config=LabeledSetConfig(per_track=per_track),
            )
        except ValueError as exc:  # a damaged cache file names itself and its line
            fail(str(exc).splitlines()[0])
        with session_factory(engine)() as session:
            try:
                classifier = routing_classifier(
                    session, seeds, ClassifierConfig(min_confidence=min_confidence)
                )
            except NotEnoughExamplesError as exc:
                fail(str(exc))
            report = attribute_open_cases(session, gather=tools, classifier=classifier, limit=limit)
    sent = _announce(report.routed)
    if as_json:
        typer.echo(report.model_dump_json())
        return
    table = Table("track", "routed")
    for track in TRACK_NAMES:
        table.add_row(track, str(report.routed.get(track, 0)))
    table.add_row("awaiting triage", str(report.awaiting_triage))
    console.print(table)
    console.print(
        f"{report.cases} cases in {report.seconds:.1f} s; {report.by_rule} settled by a rule"
        + (f"; {sent} routed-case events sent to Prefect" if sent else "")
    )


def _announce(routed: dict[str, int]) -> int:
    """Tell a configured Prefect API about the routed cases (its automation may start a
    cycle: ``flywheel deploy``); nothing without ``PREFECT_API_URL``."""
    import os

    if not routed or not os.environ.get("PREFECT_API_URL"):
        return 0
    from flywheel.cycle.deploy import emit_routed

    return emit_routed(routed)


@attribution_app.command("override")
def override_command(
    case_id: Annotated[int, typer.Argument(help="The failure case.")],
    track: Annotated[str, typer.Option(help="rl, pretraining_gap or prompt_enhancer.")],
    reviewer: Annotated[str, typer.Option("--by", help="Who decides (recorded).")],
    reason: Annotated[str | None, typer.Option(help="Why (recorded).")] = None,
) -> None:
    """Route a case by hand; the decision becomes a training example of the classifier."""
    from flywheel.attribution.service import CaseClosedError, CaseNotFoundError, override_route
    from flywheel.db.engine import session_factory
    from flywheel.db.models import Track

    if track not in TRACK_NAMES:
        fail(f"--track {track!r}: one of {', '.join(TRACK_NAMES)}")
    with database() as engine, session_factory(engine)() as session:
        try:
            route = override_route(
                session, case_id=case_id, track=Track(track), reviewer=reviewer, reason=reason
            )
        except (CaseNotFoundError, CaseClosedError, ValueError) as exc:
            fail(str(exc))
        console.print(
            f"case {case_id} routed to {route.track.value} by {reviewer} (route {route.id})",
            highlight=False,
        )
