"""``flywheel demo``: one complete flywheel cycle on the embedded default, through the real
API, with the shipped base model.

1. Start (or join) the database, migrate, register the shipped base as the serving model
   (or, with ``--base DIR``, a build of ``flywheel world base``: :func:`serve_build`; the
   demo then runs on its world, ``world_of(generator)``), create a demo API key and serve the
   API on a loopback port.
2. **Evaluate** the base on the standard suite's colour, count and relation cases (the
   skills the world's injected weaknesses live in) and post the run to ``/v1/evaluations``;
   measure it on common concepts (shape, count, relation, colour probes without the rare
   concepts of the base's world, scored by the world's evaluator).
3. **Ingest feedback** through ``/v1/feedback`` (singles) and ``/v1/feedback/batch``: simulated
   users of a product app type terse prompts in their own colour words; the app enhances and
   generates them with the serving model and sends what the user typed with what the model
   was given (``served_prompt``); each user judges the image (the ground-truth
   evaluator stands in for their eyes): thumbs up, or thumbs down and a ``wrong_color`` flag.
   A few replays show the API's idempotency.
4. **Mine** bad cases with the Celery tasks (eager here): colour probes, and a reward scan of
   the app's generations the users liked.
5. **Attribution**: the classifier's macro-F1 on a held-out labeled set of the injected
   weaknesses (its seed set is the one the cycle fits), and on another world's (its shipped
   base, corpus, rare concepts, users' words and reward bias: ``other`` for the default
   world, ``default`` for ``other``).
6. **The cycle** (Prefect flow): collect → attribute → the three tracks' artefacts and rounds →
   candidate → evaluation on the held-out gate slices and the regression suite → gate → final
   review, **approved automatically in demo mode** (said so on screen; ``flywheel cycle``
   waits for a human) → promotion → regression scenarios.
7. A before / after table per track (each slice's n and 95 % Wilson intervals), ``--report
   FILE`` as JSON, and last the goals table: each goal of the demo, its measured value, its
   target and whether it is met (:func:`demo_goals`).
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import httpx
import uvicorn
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import select

from flywheel.api.app import create_app
from flywheel.auth.service import create_api_key
from flywheel.cycle.config import CycleConfig
from flywheel.cycle.verdicts import TrackEvaluation
from flywheel.db import migrate
from flywheel.db.engine import create_db_engine, database_url, session_factory
from flywheel.db.models import Scope
from flywheel.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session
    from torch import Tensor

    from flywheel.cycle.registry import ModelBundle
    from flywheel.world.benchmark import BenchmarkCase
    from flywheel.world.definition import WorldDefinition
    from model.pipeline import Generator

DEMO_APP = "demo-app"
EVALUATED_SKILLS = ("colour", "count", "relation")
FEEDBACK_BAND = 91_000_000
"""Seed band of the scenes the simulated users ask for (far from suites and probes)."""
PROBE_BAND = 92_000_000
HELD_OUT_BAND = 80_000_000
COMPARED_SHARE = 1.0
"""Share of the simulated users who were shown two images of their prompt, as image apps
show a grid (pairwise feedback where they liked one and not the other)."""
"""Seed band of the held-out labeled set (the seed set uses the default 70M band)."""
TRACKS = ("rl", "pretraining_gap", "prompt_enhancer")

SLICE_GOAL = -0.5
"""Each track's held-out routed slice: its failure rate's relative change, at most this."""
REGRESSION_GOAL = -2.0
"""The regression suite's score, candidate minus base, in points: at least this."""
OTHER_WORLD_MACRO_F1_GOAL = 0.9
"""The attribution classifier's macro-F1 on another world: at least this."""
BASE_CONCEPT_GOALS = {"shape": 0.7, "count": 0.6, "relation": 0.6, "colour": 0.8}
"""The base's score per skill on common concepts: at least these."""
WALL_TIME_GOAL = 15.0
"""The demo's wall time, minutes: at most this."""
OTHER_WORLD_REASON = (
    "no base of the other world ships (flywheel world base --world {world} --out DIR --ship "
    "builds one, a long training run); nothing was measured"
)


def demo_cycle() -> CycleConfig:
    """The demo's cycle: the default sizes, the final review approved without a human."""
    return CycleConfig(auto_approve=True)


@dataclass(frozen=True, slots=True)
class _Base:
    name: str
    generator: Path
    enhancer: Path
    reward: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _BackgroundServer:
    """uvicorn serving the real app on a loopback port, in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.port = _free_port()
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the demo API server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def _prepare(
    settings: Settings, console: Console, *, base_dir: Path | None = None
) -> tuple[str, _Base]:
    """Migrate, register the base, create the demo key; the key's secret and the base. The
    base is the shipped one (the registry's serving model when it has one) or, given
    ``base_dir``, that build of ``flywheel world base`` registered and promoted
    (:func:`serve_build`)."""
    from flywheel.cycle.registry import current_model
    from flywheel.world.loop.backend import shipped_base

    engine = create_db_engine(settings, pool_size=2)
    try:
        migrate.upgrade(engine)
        console.print(f"[bold]schema[/]: migrated to {migrate.current_revision(engine)}")
        with session_factory(engine)() as session:
            if base_dir is None:
                model = current_model(session, shipped=shipped_base())
            else:
                model = serve_build(session, base_dir)
            assert model is not None
            key = create_api_key(session, app=DEMO_APP, scopes=[Scope.INGEST, Scope.READ])
            session.commit()
    finally:
        engine.dispose()
    console.print(
        f"[bold]serving model[/]: {model.name}; api key {key.record.prefix} for app "
        f"{DEMO_APP!r} (ingest, read)",
        highlight=False,
    )
    base = _Base(
        name=model.name, generator=model.generator, enhancer=model.enhancer, reward=model.reward
    )
    return key.secret, base


BUILD_PARTS = ("generator", "reward", "enhancer")
"""The directories of a ``flywheel world base`` build the demo serves."""


def build_version_name(base_dir: Path) -> str:
    """The registry name of a build: ``world-base-<world>-<8 hex digits of its path>``."""
    from flywheel.world.definition import world_of

    digest = hashlib.sha256(str(base_dir.resolve()).encode()).hexdigest()[:8]
    return f"world-base-{world_of(base_dir).name}-{digest}"


def serve_build(session: Session, base_dir: Path) -> ModelBundle:
    """Register the build ``base_dir`` (its generator, reward and enhancer directories; once:
    a second demo on the same database finds it registered) and promote it: it serves, and the
    cycle starts from it. Flushed; the caller commits."""
    from flywheel.cycle.registry import bundle, promote, register_version
    from flywheel.db.models import Checkpoint, Component, ModelVersion

    name = build_version_name(base_dir)
    version_id = session.scalar(select(ModelVersion.id).where(ModelVersion.name == name))
    registered = version_id is not None and (
        session.scalar(select(Checkpoint.id).where(Checkpoint.model_version_id == version_id))
        is not None
    )
    if version_id is None or not registered:
        version_id = register_version(
            session,
            name=name,
            components={
                Component.GENERATOR: base_dir / "generator",
                Component.ENHANCER: base_dir / "enhancer",
                Component.REWARD: base_dir / "reward",
            },
            description=f"the world base built in {base_dir.resolve()}",
        )
    promote(session, version_id=version_id)
    return bundle(session, version_id=version_id)


def _evaluate(
    client: httpx.Client, base: _Base, *, run: str, home: Path, console: Console
) -> dict[str, Any]:
    """The base on the evaluated skills of the standard suite, posted as one run."""
    from datetime import UTC, datetime

    from flywheel.world.benchmark import suite
    from flywheel.world.evaluation import evaluation_run, run_suite, save_images
    from model.pipeline import Generator

    cases = [c for c in suite("standard") if c.skill in EVALUATED_SKILLS]
    result, generated = run_suite(Generator.load(base.generator), cases, suite="standard")
    refs = save_images(generated, home / "demo" / run / "evaluation")
    payload = evaluation_run(
        result, refs, run_id=f"{run}-eval", model_version=base.name, timestamp=datetime.now(UTC)
    )
    client.post("/v1/evaluations", json=payload.model_dump(mode="json")).raise_for_status()
    table = Table(title=f"evaluation of {base.name} (standard suite, {len(cases)} cases)")
    table.add_column("skill")
    table.add_column("score", justify="right")
    table.add_column("failing", justify="right")
    for skill, figures in result.skills.items():
        failing = sum(not r.passed for r in result.cases if r.case.skill == skill)
        table.add_row(skill, f"{figures.score:.2f}", f"{failing}/{figures.n}")
    console.print(table)
    return {
        "cases": len(cases),
        "score": result.score,
        "failing": sum(not r.passed for r in result.cases),
    }


def user_prompts(
    rng: random.Random, *, events: int, run: str, world: WorldDefinition
) -> list[tuple[BenchmarkCase, str]]:
    """What the simulated users ask for: ``events`` colour cases of the feedback band, each
    with the terse prompt a user types, most (3 in 4) in the users' words of ``world``; no
    case about one of the world's rare concepts (a rare colour has no users' words: its
    failures are a data gap), and none whose colours the users' words leave unsaid (the asked
    mix kept). Draws from ``rng``."""
    from flywheel.world.benchmark import build_case
    from flywheel.world.scenes import captions

    vocabulary = world.user_vocabulary()
    rare = world.rare_concepts()
    asked: list[tuple[BenchmarkCase, str]] = []
    k = 0
    while len(asked) < events:
        case = build_case("colour", k, band=FEEDBACK_BAND, case_id=f"{run}/fb/{k}")
        k += 1
        terse = captions(case.spec).terse
        worded = vocabulary.to_user_words(terse, rng) if rng.random() < 0.75 else terse
        if case.focus in rare or (worded != terse and not vocabulary.has_user_words(worded)):
            continue  # a rare colour has no user words; keep the asked mix
        asked.append((case, worded))
    return asked


def _feedback_events(
    base: _Base, *, events: int, seed: int, run: str, home: Path, world: WorldDefinition
) -> list[dict[str, Any]]:
    """What the product app sends: users' terse prompts (most in their own colour words, the
    words of ``world``, the base's: :func:`user_prompts`), enhanced and generated by the
    serving model, judged by the user; each event carries what the user typed and, where the
    enhancer rewrote it, what the model was given (``served_prompt``). A share of them
    (:data:`COMPARED_SHARE`) were shown two images: where the user liked one and not the
    other, the app sends the pairwise preference and the user's flag on the rejected image;
    otherwise a thumbs up, a thumbs down or a flag on the first."""
    from flywheel.world.base_model import load_world_enhancer
    from flywheel.world.evaluation import score_case
    from flywheel.world.evaluator import load_evaluator
    from model.pipeline import Generator

    rng = random.Random(seed)
    asked = user_prompts(rng, events=events, run=run, world=world)
    compared = [rng.random() < COMPARED_SHARE for _ in asked]
    generator, enhancer = Generator.load(base.generator), load_world_enhancer(base.enhancer)
    evaluator = load_evaluator()
    prompts = enhancer.enhance([p for _, p in asked])
    directory = home / "demo" / "app"
    first = _generated(generator, prompts, seed=seed, directory=directory)
    picked = [i for i, shown in enumerate(compared) if shown]
    second = dict(
        zip(
            picked,
            _generated(
                generator, [prompts[i] for i in picked], seed=seed + 1_000_003, directory=directory
            ),
            strict=True,
        )
    )
    out = []
    for index, ((case, typed), served, (image, ref)) in enumerate(
        zip(asked, prompts, first, strict=True)
    ):
        event: dict[str, Any] = {
            "event_id": f"{run}-fb-{index:05d}",
            "prompt": typed,
            "image": ref,
            "model_version": base.name,
            "user_id": f"user-{rng.randrange(40)}",
            "session_id": f"session-{rng.randrange(120)}",
        }
        if served != typed:
            event["served_prompt"] = served
        liked = score_case(case, image, evaluator=evaluator).passed
        if index in second:
            other_image, other_ref = second[index]
            if score_case(case, other_image, evaluator=evaluator).passed != liked:
                chosen, rejected = (ref, other_ref) if liked else (other_ref, ref)
                pairwise = {k: v for k, v in event.items() if k != "image"}
                out.append(pairwise | {"kind": "pairwise", "chosen": chosen, "rejected": rejected})
                event |= {"event_id": f"{event['event_id']}-flag", "image": rejected}
                out.append(event | {"kind": "flags", "flags": ["wrong_color"]})
                continue
        if liked:
            event |= {"kind": "thumbs", "value": "up"}
        elif rng.random() < 0.5:
            event |= {"kind": "flags", "flags": ["wrong_color"]}
        else:
            event |= {"kind": "thumbs", "value": "down"}
        out.append(event)
    return out


def _generated(
    generator: Generator, prompts: list[str], *, seed: int, directory: Path
) -> list[tuple[Tensor, dict[str, str]]]:
    """``prompts`` drawn by ``generator`` (16 at a time, batch ``k`` from ``seed + k``), each
    image with its reference once stored as the app stores it."""
    from flywheel.mining.miners import store_png

    out = []
    for start in range(0, len(prompts), 16):
        images = generator.generate(prompts[start : start + 16], seed=seed + start).cpu()
        for image in images:
            uri, digest = store_png(image, directory)
            out.append((image, {"uri": uri, "sha256": digest}))
    return out


def _ingest(client: httpx.Client, events: list[dict[str, Any]], console: Console) -> dict[str, Any]:
    """Singles, then batches of 500, then a few replays; what the API answered."""
    statuses: Counter[str] = Counter()
    singles, batched = events[:10], events[10:]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("feedback through the API", total=len(events))
        for event in singles:
            reply = client.post("/v1/feedback", json=event)
            reply.raise_for_status()
            statuses["created" if reply.status_code == 201 else "duplicate"] += 1
            progress.advance(task)
        for start in range(0, len(batched), 500):
            chunk = batched[start : start + 500]
            reply = client.post("/v1/feedback/batch", json={"events": chunk})
            reply.raise_for_status()
            for item in reply.json()["results"]:
                statuses[item["status"]] += 1
            progress.advance(task, len(chunk))
    # Idempotency: replays come back with the stored result and store nothing new.
    replayed = [client.post("/v1/feedback", json=event) for event in singles[:5]]
    idempotent = all(
        r.status_code == 200 and r.headers.get("Idempotent-Replayed") for r in replayed
    )
    kinds = Counter(f"{e['kind']} {e.get('value', '')}".strip() for e in events)
    listed = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    console.print(
        f"[bold]feedback[/]: {len(events)} events ({listed}); replayed {len(replayed)}: "
        + ("same results, nothing stored twice" if idempotent else "NOT idempotent"),
        highlight=False,
    )
    return {"events": len(events), "statuses": dict(statuses), "replays_idempotent": idempotent}


def _mine(base: _Base, *, probes: int, console: Console) -> dict[str, Any]:
    """Colour probes and a reward scan of the app's generations, as Celery tasks (eager)."""
    from flywheel.mining.tasks import PROBE_TASK, SCAN_TASK, create_celery
    from flywheel.settings import get_settings

    celery = create_celery(get_settings())  # eager without FLYWHEEL_REDIS_URL
    probe = (
        celery.tasks[PROBE_TASK]
        .apply_async(
            kwargs={
                "model_version": base.name,
                "generator_dir": str(base.generator),
                "reward_dir": str(base.reward),
                "skill": "colour",
                "count": probes,
                "band": PROBE_BAND,
            }
        )
        .get()
    )
    scan = celery.tasks[SCAN_TASK].apply_async(kwargs={"reward_dir": str(base.reward)}).get()
    console.print(
        f"[bold]mining[/] (Celery, eager): {probe['hits']} hits in {probe['examined']} colour "
        f"probes; reward scan: {scan['hits']} hits in {scan['examined']} liked generations",
        highlight=False,
    )
    return {
        "probe": {k: probe[k] for k in ("examined", "hits", "stored")},
        "scan": {k: scan[k] for k in ("examined", "hits", "stored")},
    }


def _attribution(
    settings: Settings, base: _Base, *, config: CycleConfig, held_out: int, console: Console
) -> dict[str, Any]:
    """The classifier fitted on the cycle's seed set (the base's world), measured on a
    held-out labeled set of the same world and on one of another world (its own base, corpus
    index, rare concepts, users' words and reward bias)."""
    from flywheel.attribution.classifier import fit_classifier, measure
    from flywheel.world.base_model import shipped_base_of
    from flywheel.world.definition import load_world, shipped_worlds, world_of
    from flywheel.world.loop.attribution import (
        LabeledSetConfig,
        labeled_examples,
        world_labeled_set,
    )
    from flywheel.world.loop.plan import attribution_tools
    from retrieval.embedding import TextEmbedder
    from retrieval.store import open_qdrant, qdrant_config

    qdrant = qdrant_config(settings)
    client = open_qdrant(qdrant)
    world = world_of(base.generator)
    embedder = TextEmbedder()
    held_out_config = LabeledSetConfig(per_track=held_out, band=HELD_OUT_BAND, seed=1)
    try:
        console.print("[bold]attribution[/]: the seed set and a held-out set of the weaknesses")
        # The cycle's own tools and seed set: the cycle then reads the seed set back.
        tools, seeds = attribution_tools(
            generator=base.generator,
            reward=base.reward,
            config=config,
            home=settings.home,
            client=client,
            qdrant=qdrant,
            embedder=embedder,
        )
        test = labeled_examples(tools, held_out_config, world=world)
    finally:
        client.close()
    classifier = fit_classifier(seeds)
    metrics = measure(classifier.decide([e for e, _ in test]), [t for _, t in test])
    console.print(
        f"attribution macro-F1 {metrics.macro_f1:.3f} on {metrics.cases} held-out cases "
        f"(accuracy {metrics.accuracy:.3f}, calibration error {metrics.calibration_error:.3f})",
        highlight=False,
    )
    other = load_world(shipped_worlds()["other" if world.name != "other" else "default"])
    shipped = shipped_base_of(other.name)
    other_world: dict[str, Any] = {"world": other.name}
    if shipped is None:
        other_world |= {"macro_f1": None, "reason": OTHER_WORLD_REASON.format(world=other.name)}
    else:
        console.print(
            f"[bold]attribution on the {other.name} world[/]: its base, corpus, rare "
            f"concepts ({', '.join(other.rare_concepts()) or 'none'}), users' words and "
            f"reward ({other.reward.caption} captions); the classifier of the {world.name} world"
        )
        elsewhere = world_labeled_set(
            other,
            generator=shipped.generator,
            reward=shipped.reward,
            config=held_out_config,
            embedder=embedder,
            corpus=config.world.corpus,
            seed=config.seed,
        )
        transfer = measure(classifier.decide([e for e, _ in elsewhere]), [t for _, t in elsewhere])
        console.print(
            f"attribution macro-F1 on the {other.name} world {transfer.macro_f1:.3f} on "
            f"{transfer.cases} cases (accuracy {transfer.accuracy:.3f})",
            highlight=False,
        )
        other_world |= {
            "macro_f1": transfer.macro_f1,
            "cases": transfer.cases,
            "accuracy": transfer.accuracy,
            "calibration_error": transfer.calibration_error,
            "tracks": {t: score.f1 for t, score in transfer.tracks.items()},
        }
    return {
        "macro_f1": metrics.macro_f1,
        "held_out_cases": metrics.cases,
        "accuracy": metrics.accuracy,
        "calibration_error": metrics.calibration_error,
        "other_world": other_world,
    }


def _rate(rate: float, interval: tuple[float, float]) -> str:
    return f"{rate:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"


def _before_after(outcome: dict[str, Any], console: Console) -> dict[str, Any]:
    """The per-track table and the report's ``tracks`` and ``regression``."""
    summary = outcome["summary"]
    evaluation = summary.get("evaluation") or {}
    figures = evaluation.get("tracks") or {}
    tracks: dict[str, Any] = {}
    table = Table(
        title="held-out gate slices, before / after the cycle (95 % Wilson intervals; n: the "
        "gate's cases times its seeds)"
    )
    for column in ("track", "n", "failure rate before", "after", "relative change"):
        table.add_column(column, justify="left" if column == "track" else "right")
    for name in TRACKS:
        figure = figures.get(name)
        routed = (summary.get("tracks") or {}).get(name, {})
        if figure is None:
            tracks[name] = {
                "cases": routed.get("cases", 0),
                "n": 0,
                "failure_rate_before": None,
                "failure_rate_after": None,
                "interval": None,
                "interval_before": None,
                "note": routed.get("reason", "no round"),
            }
            table.add_row(name, "0", "-", "-", tracks[name]["note"])
            continue
        track = TrackEvaluation.model_validate(figure)  # evaluations stored before n: filled
        before, after = track.failure_rate_before, track.failure_rate_after
        tracks[name] = {
            "cases": track.cases,
            "seeds": track.seeds,
            "n": track.n,
            "failure_rate_before": before,
            "failure_rate_after": after,
            "interval": list(track.interval_after),
            "interval_before": list(track.interval_before),
        }
        table.add_row(
            name,
            str(track.n),
            _rate(before, track.interval_before),
            _rate(after, track.interval_after),
            f"{(after - before) / before:+.0%}" if before else "-",
        )
    console.print(table)
    regression = evaluation.get("regression") or {}
    if regression:
        console.print(
            f"regression suite (standard, {regression['cases']} cases x {regression['seeds']} "
            f"seeds): {regression['score_before']:.3f} -> {regression['score_after']:.3f} "
            f"({(regression['score_after'] - regression['score_before']) * 100:+.1f} points)",
            highlight=False,
        )
    return {
        "tracks": tracks,
        "regression": {
            "score_before": regression.get("score_before"),
            "score_after": regression.get("score_after"),
        },
    }


def _base_concepts(base: _Base, *, per_skill: int, console: Console) -> dict[str, Any]:
    """The base's score on ``per_skill`` probes of each skill of :data:`BASE_CONCEPT_GOALS`
    (the probes of ``flywheel world weaknesses``, leaving out any that shows one of the rare
    concepts of the base's world), scored by the world's evaluator."""
    from flywheel.world.benchmark import Skill, build_case
    from flywheel.world.definition import world_of
    from flywheel.world.evaluation import run_suite
    from flywheel.world.weaknesses import PROBE_BAND as WEAKNESS_PROBE_BAND
    from model.pipeline import Generator

    started = time.perf_counter()
    world = world_of(base.generator)
    rare = world.rare_concepts()
    cases: list[BenchmarkCase] = []
    for skill in BASE_CONCEPT_GOALS:
        drawn: list[BenchmarkCase] = []
        k = 0
        while len(drawn) < per_skill:
            case = build_case(
                cast("Skill", skill), k, band=WEAKNESS_PROBE_BAND, case_id=f"probe/{skill}/{k:02d}"
            )
            k += 1
            if not any(o.colour in rare or o.shape in rare for o in case.spec.objects):
                drawn.append(case)
        cases += drawn
    result, _ = run_suite(Generator.load(base.generator), cases, suite="probes", batch_size=32)
    skills = {
        skill: {
            "score": result.skills[skill].score,
            "pass_rate": result.skills[skill].pass_rate,
            "n": result.skills[skill].n,
        }
        for skill in BASE_CONCEPT_GOALS
    }
    seconds = time.perf_counter() - started
    listed = ", ".join(f"{skill} {figures['score']:.2f}" for skill, figures in skills.items())
    console.print(
        f"[bold]base on common concepts[/] ({per_skill} probes per skill, without "
        f"{', '.join(rare)}; world evaluator): {listed} ({seconds:.0f} s)",
        highlight=False,
    )
    return {"model": base.name, "world": world.name, "rare_left_out": list(rare), "skills": skills}


class Goal(BaseModel):
    """One goal of the demo: a measured figure against its target."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    figure: str
    """What is measured."""
    value: float | None
    """The measured value (None: not measured)."""
    target: float
    comparison: Literal["<=", ">="]
    """Met when ``value <comparison> target``."""
    unit: Literal["relative change", "points", "macro-F1", "score", "minutes"]
    met: bool
    """``value`` meets ``target`` (False when it was not measured)."""
    note: str | None = None
    """Why there is no value, or what it was measured on."""


def goal(
    *,
    figure: str,
    value: float | None,
    target: float,
    comparison: Literal["<=", ">="],
    unit: Literal["relative change", "points", "macro-F1", "score", "minutes"],
    note: str | None = None,
) -> Goal:
    """The goal, with whether ``value`` meets ``target``."""
    if value is None:
        met = False
    elif comparison == "<=":
        met = value <= target
    else:
        met = value >= target
    return Goal(
        figure=figure,
        value=value,
        target=target,
        comparison=comparison,
        unit=unit,
        met=met,
        note=note,
    )


def _interval(interval: list[float] | None) -> str:
    return "" if interval is None else f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def _slice_goal(name: str, track: dict[str, Any] | None) -> Goal:
    """A track's held-out routed slice: its failure rate's relative change."""
    figure = f"{name}: held-out slice, failure rate"
    before = None if track is None else track.get("failure_rate_before")
    after = None if track is None else track.get("failure_rate_after")
    if track is None or before is None or after is None or before == 0:
        note = (track or {}).get("note") or "no failure before: nothing to fix"
        return goal(
            figure=figure,
            value=None,
            target=SLICE_GOAL,
            comparison="<=",
            unit="relative change",
            note=note,
        )
    return goal(
        figure=figure,
        value=(after - before) / before,
        target=SLICE_GOAL,
        comparison="<=",
        unit="relative change",
        note=f"{before:.2f} -> {after:.2f} {_interval(track.get('interval'))}, n {track['n']}",
    )


def demo_goals(report: dict[str, Any]) -> dict[str, Goal]:
    """Every goal of the demo, from its report (``tracks``, ``regression``,
    ``attribution.other_world``, ``base_concepts``, ``seconds``), keyed ``slice.<track>``,
    ``regression``, ``attribution.other_world``, ``base.<skill>``, ``wall_time``."""
    goals = {f"slice.{name}": _slice_goal(name, report["tracks"].get(name)) for name in TRACKS}
    regression = report["regression"]
    before, after = regression.get("score_before"), regression.get("score_after")
    goals["regression"] = goal(
        figure="regression suite, candidate - base",
        value=(after - before) * 100 if before is not None and after is not None else None,
        target=REGRESSION_GOAL,
        comparison=">=",
        unit="points",
        note=None if before is not None and after is not None else "not evaluated",
    )
    other_world = report["attribution"]["other_world"]
    goals["attribution.other_world"] = goal(
        figure="attribution macro-F1, other world",
        value=other_world.get("macro_f1"),
        target=OTHER_WORLD_MACRO_F1_GOAL,
        comparison=">=",
        unit="macro-F1",
        note=other_world.get("reason"),
    )
    concepts = report["base_concepts"]
    for skill, target in BASE_CONCEPT_GOALS.items():
        figures = concepts["skills"][skill]
        goals[f"base.{skill}"] = goal(
            figure=f"base, common concepts: {skill}",
            value=figures["score"],
            target=target,
            comparison=">=",
            unit="score",
            note=f"{concepts['model']}, n {figures['n']}",
        )
    goals["wall_time"] = goal(
        figure="demo wall time",
        value=report["seconds"] / 60,
        target=WALL_TIME_GOAL,
        comparison="<=",
        unit="minutes",
    )
    return goals


def _goal_figure(value: float, unit: str) -> str:
    if unit == "relative change":
        return f"{value:+.0%}"
    if unit == "points":
        return f"{value:+.1f} points"
    if unit == "minutes":
        return f"{value:.1f} min"
    return f"{value:.2f}"


def goals_table(goals: dict[str, Goal]) -> Table:
    """The goals as a table: figure, value, target, met (✓ / ✗) and a note."""
    met = sum(g.met for g in goals.values())
    table = Table(title=f"goals: {met} of {len(goals)} met")
    for column in ("figure", "value", "target", "met", "note"):
        table.add_column(
            column,
            justify="right" if column in ("value", "target") else "left",
            no_wrap=column != "note",
        )
    for item in goals.values():
        table.add_row(
            item.figure,
            "-" if item.value is None else _goal_figure(item.value, item.unit),
            f"{item.comparison} {_goal_figure(item.target, item.unit)}",
            "[green]✓ met[/]" if item.met else "[red]✗ not met[/]",
            item.note or "",
        )
    return table


def run_demo(
    settings: Settings,
    *,
    events: int,
    seed: int,
    console: Console,
    cycle: CycleConfig | None = None,
    probes: int = 48,
    held_out: int = 12,
    concept_probes: int = 24,
    report_file: Path | None = None,
    base_dir: Path | None = None,
) -> dict[str, Any]:
    """Run the demo (see the module docstring), write its report to ``report_file`` (when
    given) and print the goals table last; returns the report. Given ``base_dir`` (a build
    directory of ``flywheel world base``: generator/, reward/, enhancer/), that base serves
    instead of the shipped one, and the demo runs on its world (:func:`serve_build`)."""
    started = time.perf_counter()
    cycle = (cycle or demo_cycle()).model_copy(update={"auto_approve": True, "dry_run": False})
    embedded = settings.database_url is None
    settings = settings.model_copy(update={"database_url": database_url(settings)})
    console.print(
        "[bold]database[/]: "
        + (
            f"embedded PostgreSQL under {settings.pgdata_path}"
            if embedded
            else "FLYWHEEL_DATABASE_URL"
        )
    )
    secret, base = _prepare(settings, console, base_dir=base_dir)
    from flywheel.world.definition import world_of

    world = world_of(base.generator)  # what the simulated users say, what is rare
    run = f"demo-{uuid.uuid4().hex[:8]}"
    with (
        _BackgroundServer(settings) as base_url,
        httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {secret}"}, timeout=60
        ) as client,
    ):
        console.print(f"[bold]api[/]: serving on {base_url}")
        evaluated = _evaluate(client, base, run=run, home=settings.home, console=console)
        feedback = _ingest(
            client,
            _feedback_events(
                base, events=events, seed=seed, run=run, home=settings.home, world=world
            ),
            console,
        )
    concepts = _base_concepts(base, per_skill=concept_probes, console=console)
    mined = _mine(base, probes=probes, console=console)
    attribution = _attribution(settings, base, config=cycle, held_out=held_out, console=console)

    from flywheel.cycle.flow import cycle_flow

    console.print(
        "[bold]cycle[/]: collect -> attribute -> tracks -> rounds -> evaluation -> gate -> "
        "review. [bold yellow]Demo mode: the final review is approved automatically[/] "
        "(`flywheel cycle` waits for a human reviewer)."
    )
    outcome = cycle_flow(config=cycle, progress=True).model_dump(mode="json")
    report = _before_after(outcome, console)
    summary = outcome["summary"]
    verdict = summary.get("gate") or {}
    console.print(
        f"cycle {outcome['cycle_id']}: [bold]{outcome['status']}[/]"
        + (f" (gate: {'; '.join(verdict['reasons'])})" if verdict.get("reasons") else "")
    )
    seconds = time.perf_counter() - started
    report |= {
        "attribution": attribution,
        "base_concepts": concepts,
        "seconds": round(seconds, 1),
        "cycle": {
            "id": outcome["cycle_id"],
            "status": outcome["status"],
            "gate": verdict,
            "routed": (summary.get("attribution") or {}).get("routed"),
            "outcome": summary.get("outcome"),
        },
        "evaluation": evaluated,
        "feedback": feedback,
        "mining": mined,
        "run": run,
    }
    goals = demo_goals(report)
    report["goals"] = {key: item.model_dump(mode="json") for key, item in goals.items()}
    console.print(f"demo finished in {seconds / 60:.1f} min")
    if report_file is not None:
        write_report(report, report_file)
        console.print(f"report: {report_file}", highlight=False)
    console.print(goals_table(goals))
    return report


def write_report(report: dict[str, Any], path: Path) -> None:
    """The report as JSON at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
