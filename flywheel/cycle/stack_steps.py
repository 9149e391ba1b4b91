"""The cycle's stack-dependent steps on a project's ports (a team's stack): attribute,
build each track's artefact, run its round through the launcher, evaluate through the judge.

They write the same rows as the embedded world's steps (:mod:`flywheel.world.loop.steps`), so
the shared steps (:mod:`flywheel.cycle.steps`: candidate, gate, review) and the reviewer's
decision finish the cycle the same way. Nothing here imports the world.

- **attribute**: signals to cases and themes, evidence through the ports
  (:func:`~flywheel.attribution.stack_evidence.gather_stack_evidence`: the rewrite test
  re-judged, density and tag rarity over the corpus index, the reward's rank), routed by the
  cold-start rules until enough human triage decisions exist
  (:func:`~flywheel.attribution.rules.cold_start_router`).
- **prepare rounds**: per track with at least ``min_cases`` routed cases, its cases split
  (:func:`~flywheel.tracks.routed.split_cases`): the train share builds the artefact
  (:data:`~flywheel.tracks.specs.TRACK_SPECS`), the gate share is only ever judged; its
  review item declares the edits it takes (:mod:`flywheel.tracks.edits`).
- **run a round** (once its artefact is approved: the flow's ``artefact-review``): the
  reviewer's edits applied once (the edited files beside the reviewed ones, the round's data
  manifest naming them), then its manifest written (``manifest.json``: base checkpoint,
  artefact files, recipe, budget) before the launcher runs it; generator rounds chain.
- **evaluate**: base and candidate — each its enhancer then its generator, as a product app
  serves them — on every round case (which are fixed), the gate share (what the gate
  counts), the regression suite (``suites``) and the active scenarios, all judged by the
  judge port; never by a round's own reward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from pydantic import BaseModel, ConfigDict, JsonValue
from qdrant_client import QdrantClient
from sqlalchemy.orm import Session

from flywheel.attribution.evidence import term_rarity
from flywheel.attribution.rules import RuleRouterConfig, cold_start_router
from flywheel.attribution.service import AttributionReport, attribute_open_cases
from flywheel.attribution.stack_evidence import (
    corpus_scarcity,
    gather_stack_evidence,
    tag_rarity,
)
from flywheel.cases.service import collect_failures
from flywheel.cases.themes import assign_themes
from flywheel.cycle import repository
from flywheel.cycle.config import CycleConfig
from flywheel.cycle.registry import ModelBundle, bundle
from flywheel.cycle.steps import (
    ROUND_ORDER,
    _note,
    _summary,
    add_round,
    base_model,
    cycle_config,
    cycle_dir,
    cycle_rounds,
    edit_round_data,
    record_round,
    round_case_ids,
    round_output,
)
from flywheel.cycle.verdicts import (
    Evaluation,
    RegressionEvaluation,
    ScenarioEvaluation,
    TrackEvaluation,
)
from flywheel.db.models import (
    Cycle,
    FailureCase,
    Json,
    RoundStatus,
    Signal,
    SignalKind,
    Track,
    TrainingRound,
)
from flywheel.parts import Parts
from flywheel.ports import (
    ImageGenerator,
    JudgeRequest,
    PortName,
    PromptEnhancer,
    RoundManifest,
    SuitePrompt,
)
from flywheel.project import PartSection, build_part
from flywheel.review.edits import ArtefactEdits
from flywheel.tracks.routed import CaseFeedback, RoutedCase, split_cases
from flywheel.tracks.specs import TRACK_SPECS, TrackInputs
from retrieval.embedding import TextEmbedder
from retrieval.store import QdrantConfig, collection_name
from training.io import atomic_write_text

MANIFEST_FILE = "manifest.json"
GATE_SEED = 1000
"""Noise seed of the gate's first batch (unlike the rewrite test's)."""


def round_budget(track: Track, config: CycleConfig) -> dict[str, int]:
    """The round's steps, named by its recipe (the manifest's ``budget``)."""
    return {TRACK_SPECS[track].recipe: config.round_section(track.value).steps}


def round_settings(track: Track, config: CycleConfig, parts: Parts) -> dict[str, JsonValue]:
    """The manifest's ``settings``: the track section's ``settings`` and the cycle's seed; a
    prompt-enhancer round also gets the project's enhancer ``system_prompt`` unless the
    section names its own."""
    settings: dict[str, JsonValue] = {**config.round_section(track.value).settings}
    if track == Track.PROMPT_ENHANCER and "system_prompt" not in settings:
        section = parts.project.section("enhancer")
        prompt = section.settings().get("system_prompt") if section is not None else None
        if isinstance(prompt, str) and prompt:
            settings["system_prompt"] = prompt
    return {**settings, "seed": config.seed}


# ---- 2. attribute ----------------------------------------------------------------------------


def attribute_cases(
    session: Session,
    *,
    config: CycleConfig,
    parts: Parts,
    client: QdrantClient,
    qdrant: QdrantConfig,
    embedder: TextEmbedder,
) -> dict[str, Any]:
    """Signals to cases and themes, every open case routed on the ports; what it did
    (commits as it goes)."""
    collected = collect_failures(session)
    assign_themes(session, embedder=embedder)
    probe = corpus_scarcity(parts, client, qdrant, embedder)
    rarity = tag_rarity(client, collection_name(qdrant, "prompts"))
    scarce_terms = term_rarity(client, collection_name(qdrant, "prompts"))
    router = cold_start_router(session, RuleRouterConfig(min_confidence=config.min_confidence))
    attributed: AttributionReport = attribute_open_cases(
        session,
        gather=lambda views: gather_stack_evidence(
            views,
            parts,
            scarcity=probe,
            rarity=rarity,
            term_rarity=scarce_terms,
            seed=config.seed,
        ),
        classifier=router,
    )
    return {
        "signals_collected": collected.signals_linked,
        "cases_created": collected.cases_created,
        "routed": attributed.routed,
        "awaiting_triage": attributed.awaiting_triage,
        "by_rule": attributed.by_rule,
        "router": type(router).__name__,
    }


def attribute(
    session: Session,
    cycle: Cycle,
    *,
    parts: Parts,
    client: QdrantClient,
    qdrant: QdrantConfig,
    embedder: TextEmbedder,
) -> dict[str, Any]:
    """Collect, theme and route on the ports (once per cycle); what it did."""
    done = _summary(cycle).get("attribution")
    if done is not None:
        return dict(done)
    report = attribute_cases(
        session,
        config=cycle_config(cycle),
        parts=parts,
        client=client,
        qdrant=qdrant,
        embedder=embedder,
    )
    _note(cycle, attribution=report)
    session.commit()
    return report


# ---- 3. artefacts and rounds -----------------------------------------------------------------


def _feedback(signal: Signal) -> CaseFeedback:
    return CaseFeedback(
        kind=signal.kind.value,
        image_uri=signal.image_uri,
        thumbs_up=signal.thumbs_up,
        rating=signal.rating,
        chosen_image_uri=signal.chosen_image_uri,
        rejected_image_uri=signal.rejected_image_uri,
        flags=tuple(signal.flags or ()),
    )


def _spec(signals: Sequence[Signal]) -> dict[str, JsonValue] | None:
    for signal in signals:
        details = signal.details if isinstance(signal.details, dict) else {}
        spec = details.get("spec")
        if isinstance(spec, dict):
            return spec
    return None


def routed_cases(
    session: Session, *, case_ids: Sequence[int] | None = None
) -> dict[Track, list[tuple[RoutedCase, FailureCase]]]:
    """The routed cases of each track (their current route), or the given cases'."""
    pairs = repository.latest_routes(session, case_ids=case_ids)
    cases = [case for _, case in pairs]
    signals = repository.case_signals(session, case_ids=[c.id for c in cases])
    by_prompt = repository.feedback_for_prompts(session, prompts=[c.prompt for c in cases])
    labels = repository.cluster_labels(
        session, cluster_ids=[c.cluster_id for c in cases if c.cluster_id is not None]
    )
    out: dict[Track, list[tuple[RoutedCase, FailureCase]]] = {t: [] for t in Track}
    for route, case in pairs:
        evidence = route.evidence if isinstance(route.evidence, dict) else {}
        features = evidence.get("features")
        reference = features.get("rewritten_prompt") if isinstance(features, dict) else None
        mine = signals.get(case.id, [])
        linked = {s.id for s in mine}
        feedback = [s for s in mine if s.kind != SignalKind.EVALUATION_SAMPLE]
        feedback += [s for s in by_prompt.get(case.prompt, []) if s.id not in linked]
        routed = RoutedCase(
            case_id=case.id,
            prompt=case.prompt,
            reference=str(reference or case.prompt),
            spec=_spec(mine),
            image_uri=case.image_uri,
            theme=labels.get(case.cluster_id) if case.cluster_id is not None else None,
            flags=tuple(sorted({f for s in mine for f in (s.flags or [])})),
            feedback=tuple(_feedback(s) for s in sorted(feedback, key=lambda s: s.id)),
        )
        out[route.track].append((routed, case))
    return out


def prepare_rounds(
    session: Session,
    cycle: Cycle,
    *,
    home: Path,
    parts: Parts,
    client: QdrantClient,
    qdrant: QdrantConfig,
    embedder: TextEmbedder,
) -> dict[str, Any]:
    """Artefacts, review items and pending rounds of the tracks with work (once per cycle);
    per track what was decided."""
    done = _summary(cycle).get("tracks")
    if done is not None:
        return dict(done)
    config = cycle_config(cycle)
    by_track = routed_cases(session)
    tracks: dict[str, Any] = {}
    for track in ROUND_ORDER:
        spec = TRACK_SPECS[track]
        pairs = by_track[track]
        train, held = split_cases(
            [c for c, _ in pairs], gate_share=config.gate.share, seed=config.seed
        )
        if len(pairs) < config.min_cases or not held:
            reason = (
                f"{len(pairs)} routed case(s), fewer than min_cases={config.min_cases}"
                if len(pairs) < config.min_cases
                else "one routed case: none left to judge a round on"
            )
            tracks[track.value] = {"cases": len(pairs), "round": None, "reason": reason}
            continue
        directory = cycle_dir(home, cycle.id) / track.value
        artefact = spec.build(
            TrackInputs(
                cases=train,
                held_out=held,
                parts=parts,
                client=client,
                qdrant=qdrant,
                embedder=embedder,
                out_dir=directory / "data",
                seed=config.seed,
                replay=config.pretraining_gap.replay,
            )
        )
        if isinstance(artefact, str):
            tracks[track.value] = {"cases": len(pairs), "round": None, "reason": artefact}
            continue
        body = artefact.model_dump(mode="json")
        split = {"train_cases": [c.case_id for c in train], "gate_cases": [c.case_id for c in held]}
        round_ = TrainingRound(
            cycle_id=cycle.id,
            track=track,
            recipe=spec.recipe,
            status=RoundStatus.PENDING,
            config={
                "budget": round_budget(track, config),
                "settings": round_settings(track, config, parts),
                "seed": config.seed,
            },
            data_manifest={"artefact": body, "files": spec.files(artefact), **split},
        )
        item_id = add_round(
            session,
            cycle,
            round_=round_,
            cases=[case for _, case in pairs],
            kind=spec.review_kind,
            title=spec.title(artefact, len(pairs)),
            artefact={**split, **body},
            editable=spec.editable(artefact),
        )
        tracks[track.value] = {"cases": len(pairs), "round": round_.id, "review_item": item_id}
    _note(cycle, tracks=tracks)
    session.commit()
    return tracks


def _start(session: Session, cycle: Cycle, round_: TrainingRound) -> Path:
    """The checkpoint a round starts from: the base's component, or for a generator round the
    previous generator round's output."""
    base = base_model(session, cycle)
    component = TRACK_SPECS[round_.track].component
    start = base.components()[component]
    for earlier in cycle_rounds(session, cycle):
        if earlier.id == round_.id:
            break
        if TRACK_SPECS[earlier.track].component == component:
            start = round_output(earlier) or start
    return start


def _manifest_settings(config: dict[str, Any]) -> dict[str, JsonValue]:
    """A round's recorded ``settings`` (rounds recorded before them: the seed alone)."""
    settings = config.get("settings")
    if isinstance(settings, dict):
        return dict(settings)
    return {"seed": config.get("seed", 0)}


def write_round_manifest(
    session: Session, round_: TrainingRound, *, home: Path, device: str
) -> Path:
    """The round's manifest (written once, before the round starts); its path."""
    cycle = session.get(Cycle, round_.cycle_id)
    assert cycle is not None
    directory = cycle_dir(home, cycle.id) / round_.track.value
    path = directory / MANIFEST_FILE
    if path.is_file():
        return path
    data = round_.data_manifest if isinstance(round_.data_manifest, dict) else {}
    settings = round_.config if isinstance(round_.config, dict) else {}
    manifest = RoundManifest(
        round_id=round_.id,
        cycle_id=cycle.id,
        track=round_.track.value,
        recipe=TRACK_SPECS[round_.track].recipe,
        base_checkpoint=str(_start(session, cycle, round_)),
        artefacts={k: str(v) for k, v in dict(data.get("files", {})).items()},
        budget={k: int(v) for k, v in dict(settings.get("budget", {})).items()},
        settings=_manifest_settings(settings),
        output_dir=str(directory / "candidate"),
        work_dir=str(directory / "work"),
        device=device,
    )
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, manifest.model_dump_json(indent=1) + "\n")
    return path


def edited_data(round_: TrainingRound, edits: ArtefactEdits) -> dict[str, Any]:
    """The round's data manifest once the reviewer's edits are applied to its artefact (the
    track spec's ``edit``: edited files next to the reviewed ones)."""
    spec = TRACK_SPECS[round_.track]
    data = dict(round_.data_manifest) if isinstance(round_.data_manifest, dict) else {}
    edited = spec.edit(spec.artefact_type.model_validate(data["artefact"]), edits)
    return {**data, "artefact": edited.model_dump(mode="json"), "files": spec.files(edited)}


def run_round(session: Session, round_id: int, *, home: Path, parts: Parts) -> dict[str, Any]:
    """Apply the reviewer's edits to the round's data (once), launch the round from its
    manifest (written first; a finished round returns what it recorded); its metrics. A
    launcher's failure marks it failed and is raised."""
    edit_round_data(session, round_id, edited_data)

    def launch(round_: TrainingRound) -> Json:
        manifest = write_round_manifest(session, round_, home=home, device=parts.context.device)
        result = parts.launcher.launch(manifest)
        return {
            "output": str(result.checkpoint),
            "manifest": str(manifest),
            "stages": dict(result.metrics),
        }

    return record_round(session, round_id, launch)


# ---- 6. evaluate -----------------------------------------------------------------------------


class Judged(BaseModel):
    """One model on one set of prompts, as the judge saw it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cases: int
    failures: int
    failure_rate: float
    failed: list[int | None]
    """Ids of the failing cases (None: prompts without one)."""
    score: float
    """Mean verdict score."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Served:
    """A model as an app serves it: its enhancer, then its generator."""

    enhancer: PromptEnhancer
    generator: ImageGenerator


def _with_path(parts: Parts, port: PortName, directory: Path) -> Any:
    """``port``'s part built from the project's section with ``path`` set to ``directory``."""
    section = parts.project.section(port)
    assert section is not None
    moved = PartSection(adapter=section.adapter, **{**section.settings(), "path": str(directory)})
    project = parts.project.model_copy(update={port: moved})
    built = build_part(project, port, parts.context)
    assert built is not None
    return built.part


def _served(parts: Parts, model: ModelBundle) -> _Served:
    return _Served(
        enhancer=_with_path(parts, "enhancer", model.enhancer),
        generator=_with_path(parts, "generator", model.generator),
    )


def judge_prompts(
    served: _Served,
    prompts: Sequence[tuple[int | None, str, dict[str, JsonValue] | None]],
    parts: Parts,
    *,
    seed: int,
    batch_size: int = 8,
) -> Judged:
    """Rewrite, generate (seeded per batch) and judge each (case id, prompt, spec)."""
    if not prompts:
        return Judged(cases=0, failures=0, failure_rate=0.0, failed=[], score=0.0)
    failed: list[int | None] = []
    scores: list[float] = []
    for k in range(0, len(prompts), batch_size):
        batch = prompts[k : k + batch_size]
        rewritten = served.enhancer.enhance([p for _, p, _ in batch])
        images = served.generator.generate(rewritten, seed=seed + k // batch_size)
        verdicts = parts.judge.judge(
            [
                JudgeRequest(prompt=prompt, image=image, spec=spec)
                for (_, prompt, spec), image in zip(batch, images, strict=True)
            ]
        )
        for (case_id, _, _), verdict in zip(batch, verdicts, strict=True):
            scores.append(verdict.score)
            if not verdict.passed:
                failed.append(case_id)
    return Judged(
        cases=len(prompts),
        failures=len(failed),
        failure_rate=len(failed) / len(prompts),
        failed=failed,
        score=fmean(scores),
    )


def _suite(parts: Parts) -> list[SuitePrompt]:
    """The regression suite: ``regression``, or ``standard`` while it is empty."""
    cases = parts.suites.suite("regression")
    return cases or parts.suites.suite("standard")


def evaluate(session: Session, cycle: Cycle, *, parts: Parts) -> Evaluation:
    """Base and candidate through the judge (once per cycle); the figures, also per round."""
    done = _summary(cycle).get("evaluation")
    if done is not None:
        return Evaluation.model_validate(done)
    config = cycle_config(cycle)
    assert cycle.candidate_model_version_id is not None
    models = {
        "before": _served(parts, base_model(session, cycle)),
        "after": _served(parts, bundle(session, version_id=cycle.candidate_model_version_id)),
    }
    tracks: dict[str, TrackEvaluation] = {}
    for round_ in cycle_rounds(session, cycle):
        data = round_.data_manifest if isinstance(round_.data_manifest, dict) else {}
        gate_ids = {int(i) for i in data.get("gate_cases", [])}
        ids = round_case_ids(session, round_)
        cases = [c for c, _ in routed_cases(session, case_ids=ids)[round_.track]]
        prompts = [(c.case_id, c.prompt, c.spec) for c in cases]
        results = {
            when: judge_prompts(served, prompts, parts, seed=GATE_SEED)
            for when, served in models.items()
        }
        round_.evaluation = {
            "slice": [
                {"case_id": c.case_id, "reference": c.reference, "spec": c.spec} for c in cases
            ],
            "gate_cases": sorted(gate_ids),
            **{when: r.model_dump(mode="json") for when, r in results.items()},
        }
        gate_failures = {
            when: sum(1 for i in r.failed if i in gate_ids) for when, r in results.items()
        }
        tracks[round_.track.value] = TrackEvaluation(
            cases=len(gate_ids),
            failures_before=gate_failures["before"],
            failures_after=gate_failures["after"],
            failure_rate_before=gate_failures["before"] / max(1, len(gate_ids)),
            failure_rate_after=gate_failures["after"] / max(1, len(gate_ids)),
            fixed_of_all_cases=results["before"].failures - results["after"].failures,
        )
    suite = [(None, p.prompt, p.spec) for p in _suite(parts)]
    scores = {
        when: fmean(
            1.0 - judge_prompts(served, suite, parts, seed=seed).failure_rate
            for seed in range(config.regression.seeds)
        )
        if suite
        else 0.0
        for when, served in models.items()
    }
    scenarios = [
        (s.id, s.prompt, (s.spec or {}).get("spec") if isinstance(s.spec, dict) else None)
        for s in repository.active_scenarios(session)
    ]
    held = {
        when: judge_prompts(served, scenarios, parts, seed=GATE_SEED)
        for when, served in models.items()
    }
    evaluation = Evaluation(
        tracks=tracks,
        regression=RegressionEvaluation(
            score_before=scores["before"],
            score_after=scores["after"],
            cases=len(suite),
            seeds=config.regression.seeds,
            judged_by="judge",
        ),
        scenarios=ScenarioEvaluation(
            count=len(scenarios),
            failures_before=held["before"].failures,
            failures_after=held["after"].failures,
        ),
    )
    _note(cycle, evaluation=evaluation.model_dump(mode="json"))
    session.commit()
    return evaluation
