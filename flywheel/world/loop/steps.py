"""The embedded world's steps of a cycle (its backend: :mod:`flywheel.world.loop.backend`),
each reading and writing its state in PostgreSQL.

A step that finds its work already recorded returns what was recorded, so a cycle killed
anywhere is finished by the next run (which finds it ``running`` under a free cycle lock):

The world's steps (2, 3, 4, 6) are here; the steps every stack shares (1, 5, 7) are in
:mod:`flywheel.cycle.steps`.

1. :func:`open_cycle` — the cycle left running by a dead run (resumed with its own config),
   else a new ``running`` cycle on the serving model.
2. :func:`attribute` — signals to cases, themes, routes (:func:`collect_and_attribute`).
3. :func:`prepare_rounds` — per track with at least ``min_cases`` routed cases, its cases
   split by failure theme into a train side and a gate side
   (:func:`~flywheel.world.loop.gate.split_by_theme`, ``gate.share``; no prompt on both
   sides), its artefact (augmentation plan, reward recalibration, enhancer pairs) built from
   the train side alone, none of its prompts a gate prompt, with the split recorded
   (``train_cases``, ``gate_cases``, ``themes``), as a review item declaring the edits it
   takes (:mod:`flywheel.world.loop.edits`), and a ``pending`` training round holding the
   artefact as its data manifest and its cases (all of them ``in_round``). Everything
   commits together. The flow's ``artefact-review`` then waits for the items' decisions.
4. :func:`run_round` — the reviewer's edits applied once (:func:`~flywheel.cycle.steps.
   edit_round_data`), then the round under ``$FLYWHEEL_HOME/cycles/<cycle>/<track>``; a round
   killed mid-way resumes from its latest checkpoint. Generator rounds chain: the RL round
   starts from the gap round's generator (a skipped gap round's: the base's). The enhancer
   round's GRPO stage (``prompt_enhancer.grpo_steps`` > 0) draws its rewrites with the base's
   generator, frozen, and is rewarded by the world's evaluator — never the gate's judge of the
   enhancer's verdicts (the reward model) — on prompts none of which the gate, the regression
   suite or a scenario judges (:func:`_grpo_inputs`; the stage raises otherwise).
5. :func:`register_candidate` — ``cycle-<id>``: the rounds' components, the base's others.
6. :func:`evaluate` — base and candidate on each round's failure slice (same cases, seeds
   and judges) at the slice's own noise seed and ``gate.extra_seeds`` fresh ones
   (:func:`~flywheel.world.loop.gate.gate_seeds`): the track's figures count its gate side
   alone (held out of every round; ``n``: gate cases times seeds), the slice at its own seed
   says which cases the candidate fixed; then the regression suite (the world's standard
   suite over ``regression_seeds`` seeds) and the active regression scenarios.
7. :func:`request_review` — the gate (fixed failures up, regression flat, no scenario
   broken); passed: a ``model_promotion`` review item and the cycle ``awaiting_review`` (the
   reviewer's decision finishes it: :mod:`flywheel.cycle.finish`); failed: the cycle is
   rejected and its cases return to ``routed``.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from qdrant_client import QdrantClient
from sqlalchemy.orm import Session

from flywheel.cycle import repository
from flywheel.cycle.config import CycleConfig
from flywheel.cycle.registry import ModelBundle, bundle
from flywheel.cycle.steps import (
    ARTEFACT_KIND,
    RECIPES,
    ROUND_ORDER,
    _generator_before,
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
)
from flywheel.cycle.verdicts import (
    Evaluation,
    RegressionEvaluation,
    ScenarioEvaluation,
    TrackEvaluation,
)
from flywheel.db.models import (
    Cycle,
    Json,
    RoundStatus,
    Track,
    TrainingRound,
)
from flywheel.review.edits import ArtefactEdits
from flywheel.world.base_model import world_base_config
from flywheel.world.benchmark import BenchmarkCase, suite
from flywheel.world.definition import WORLD_FILE, WorldDefinition, world_of
from flywheel.world.loop.edits import apply_edits, edit_vocabulary
from flywheel.world.loop.gate import gate_seeds, split_tracks
from flywheel.world.loop.plan import case_slices, collect_and_attribute, routed_slices
from flywheel.world.loop.pretraining_gap import (
    AugmentationPlan,
    GapTrackConfig,
    diagnose_gap,
    index_world_pool,
    plan_augmentation,
)
from flywheel.world.loop.prompt_enhancer import (
    GRPOStageInputs,
    PromptEnhancerTrackConfig,
    enhancer_gate_judges,
    enhancer_pairs,
    failing_concepts,
)
from flywheel.world.loop.rl import (
    PreferenceArtefact,
    RLTrackConfig,
    preference_artefact,
    preference_cases,
    recalibrate,
)
from flywheel.world.loop.rounds import (
    RoundOutput,
    run_enhancer_round,
    run_gap_round,
    run_rl_round,
)
from flywheel.world.loop.slices import SliceCase, SliceJudges, failure_rate
from retrieval.embedding import TextEmbedder
from retrieval.store import QdrantConfig
from training.pe_sft import write_pairs

# ---- 2. attribute ----------------------------------------------------------------------------


def attribute(
    session: Session,
    cycle: Cycle,
    *,
    home: Path,
    client: QdrantClient,
    qdrant: QdrantConfig,
    embedder: TextEmbedder,
) -> dict[str, Any]:
    """Collect, theme and route (once per cycle); what it did."""
    done = _summary(cycle).get("attribution")
    if done is not None:
        return dict(done)
    collected, attributed = collect_and_attribute(
        session,
        model=base_model(session, cycle),
        config=cycle_config(cycle),
        home=home,
        client=client,
        qdrant=qdrant,
        embedder=embedder,
    )
    report = {
        "signals_collected": collected.signals_linked,
        "cases_created": collected.cases_created,
        "routed": attributed.routed,
        "awaiting_triage": attributed.awaiting_triage,
        "by_rule": attributed.by_rule,
    }
    _note(cycle, attribution=report)
    session.commit()
    return report


# ---- 3. artefacts and rounds -----------------------------------------------------------------


def model_world(model: ModelBundle) -> WorldDefinition:
    """The world the model's generator was built from (:func:`~flywheel.world.definition.
    world_of`: the default world for a generator without a world file, the shipped base's)."""
    return world_of(model.generator)


def _keep_world(base_generator: Path, candidate: Path) -> None:
    """Copy the base generator's world file (if it has one) into the candidate generator
    directory, so that a promoted candidate is known to be of its base's world."""
    source = base_generator / WORLD_FILE
    if source.is_file() and candidate.is_dir():
        shutil.copyfile(source, candidate / WORLD_FILE)


def _artefact(
    track: Track,
    cases: Sequence[SliceCase],
    *,
    session: Session,
    model: ModelBundle,
    config: CycleConfig,
    directory: Path,
    client: QdrantClient,
    qdrant: QdrantConfig,
    embedder: TextEmbedder,
    held_out: set[str],
    every_gate: set[str],
) -> tuple[dict[str, Any] | None, str]:
    """The track's reviewed artefact (also the round's data manifest) built from its train
    cases ``cases``, none of its training prompts one of ``held_out`` (the gate's prompt
    keys; ``every_gate``: every track's), or None and why. What is world-specific (the
    users' words, the candidate pool) is the model's world's (:func:`model_world`)."""
    world = model_world(model)
    if track == Track.PROMPT_ENHANCER:
        concepts = failing_concepts(cases, world=world)
        if not concepts:
            return None, "no routed prompt of the train side names a colour in the users' words"
        pe = PromptEnhancerTrackConfig.from_cycle(config)
        pairs = enhancer_pairs(concepts, pe, held_out=held_out, world=world)
        data = directory / "data"  # the round writes its own copy of what it trains on
        data.mkdir(parents=True, exist_ok=True)
        write_pairs(data / "pairs.jsonl", pairs)
        user = [p for p in pairs if p[0] != p[1]]
        return {
            "concepts": concepts,
            "pairs": len(pairs),
            "user_worded": len(user),
            "echo": len(pairs) - len(user),
            "examples": [list(p) for p in user[:8]],
            "pairs_file": str(data / "pairs.jsonl"),
        }, ""
    if track == Track.PRETRAINING_GAP:
        gap = GapTrackConfig.from_cycle(config)
        diagnosis = diagnose_gap(cases, client=client, qdrant=qdrant, config=gap)
        if not diagnosis.scarce:
            return None, "no concept the cases ask for is scarce in the corpus"
        index_world_pool(
            client, qdrant, embedder, count=config.world.pool, base=world_base_config(world)
        )
        plan = plan_augmentation(
            cases,
            diagnosis,
            client=client,
            qdrant=qdrant,
            embedder=embedder,
            config=gap,
            held_out=held_out,
        )
        return {
            "diagnosis": diagnosis.model_dump(mode="json"),
            "plan": plan.model_dump(mode="json"),
        }, ""
    routed = preference_cases(session, cases, every_gate=every_gate)
    preferences = preference_artefact(
        routed, reward=model.reward, out=directory / "data", seed=config.seed
    )
    if isinstance(preferences, str):
        return None, preferences
    return {
        "prompts": sorted({c.prompt for c in cases}),
        "preferences": preferences.model_dump(mode="json"),
    }, ""


def _title(track: Track, artefact: dict[str, Any], cases: int) -> str:
    if track == Track.PROMPT_ENHANCER:
        return (
            f"Prompt-enhancer pairs for {', '.join(artefact['concepts'])}: "
            f"{artefact['pairs']} pairs from {cases} cases"
        )
    if track == Track.PRETRAINING_GAP:
        plan = artefact["plan"]
        synthesized = sum(plan["synthesized"].values())
        return (
            f"Augmentation batch for {', '.join(plan['concepts'])}: "
            f"{len(plan['retrieved'])} retrieved + {synthesized} synthesized, "
            f"mixture {plan['mixture_weight']:g}"
        )
    preferences = PreferenceArtefact.model_validate(artefact["preferences"])
    sources = ", ".join(f"{n} {source}" for source, n in sorted(preferences.by_source.items()))
    agreement = ", ".join(f"{s} {a:.0%}" for s, a in sorted(preferences.agreement.items()))
    return (
        f"Reward recalibration from {preferences.pairs} preference pairs of {cases} cases "
        f"({sources}); the reward agrees with people on {agreement}"
    )


def _track_config(
    track: Track, config: CycleConfig
) -> GapTrackConfig | RLTrackConfig | PromptEnhancerTrackConfig:
    if track == Track.PRETRAINING_GAP:
        return GapTrackConfig.from_cycle(config)
    if track == Track.RL:
        return RLTrackConfig.from_cycle(config)
    return PromptEnhancerTrackConfig.from_cycle(config)


def prepare_rounds(
    session: Session,
    cycle: Cycle,
    *,
    home: Path,
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
    model = base_model(session, cycle)
    slices = routed_slices(session)
    tracks: dict[str, Any] = {}
    splits, every_gate = split_tracks(
        {track: slices[track][0] for track in ROUND_ORDER},
        gate_share=config.gate.share,
        seed=config.seed,
    )
    for track in ROUND_ORDER:
        cases, rows = slices[track]
        split = splits[track]
        if len(cases) < config.min_cases or not split.gate:
            reason = (
                f"{len(cases)} routed case(s), fewer than min_cases={config.min_cases}"
                if len(cases) < config.min_cases
                else "its cases are all one prompt: none left for the gate to judge"
            )
            tracks[track.value] = {"cases": len(cases), "round": None, "reason": reason}
            continue
        built, reason = _artefact(
            track,
            split.train,
            session=session,
            model=model,
            config=config,
            directory=cycle_dir(home, cycle.id) / track.value,
            client=client,
            qdrant=qdrant,
            embedder=embedder,
            held_out=split.gate_keys(),
            every_gate=every_gate,
        )
        if built is None:
            tracks[track.value] = {"cases": len(cases), "round": None, "reason": reason}
            continue
        artefact = {**built, **split.record()}
        track_config = _track_config(track, config)
        round_ = TrainingRound(
            cycle_id=cycle.id,
            track=track,
            recipe=RECIPES[track],
            status=RoundStatus.PENDING,
            config=dataclasses.asdict(track_config),
            data_manifest=artefact,
        )
        item_id = add_round(
            session,
            cycle,
            round_=round_,
            cases=rows,
            kind=ARTEFACT_KIND[track],
            title=_title(track, artefact, len(cases)),
            artefact=artefact,
            editable=edit_vocabulary(track, artefact),
        )
        tracks[track.value] = {
            "cases": len(cases),
            "train_cases": len(split.train),
            "gate_cases": len(split.gate),
            "round": round_.id,
            "review_item": item_id,
        }
    _note(cycle, tracks=tracks)
    session.commit()
    return tracks


def edited_data(round_: TrainingRound, edits: ArtefactEdits) -> dict[str, Any]:
    """The round's data manifest once the reviewer's edits are applied to its artefact."""
    data = dict(round_.data_manifest) if isinstance(round_.data_manifest, dict) else {}
    return apply_edits(round_.track, data, edits)


def run_round(
    session: Session, round_id: int, *, home: Path, progress: bool = False
) -> dict[str, Any]:
    """Apply the reviewer's edits to the round's data (once), train the round (resuming from
    its checkpoints); its metrics. Commits its status."""
    edit_round_data(session, round_id, edited_data)

    def train(round_: TrainingRound) -> Json:
        cycle = session.get(Cycle, round_.cycle_id)
        assert cycle is not None
        manifest = round_.data_manifest if isinstance(round_.data_manifest, dict) else {}
        output = _train(
            session,
            cycle,
            round_,
            manifest=manifest,
            model=base_model(session, cycle),
            config=cycle_config(cycle),
            out=cycle_dir(home, cycle.id) / round_.track.value,
            progress=progress,
        )
        return {"output": str(output.candidate), "stages": output.summary()}

    return record_round(session, round_id, train)


def _train(
    session: Session,
    cycle: Cycle,
    round_: TrainingRound,
    *,
    manifest: dict[str, Any],
    model: ModelBundle,
    config: CycleConfig,
    out: Path,
    progress: bool,
) -> RoundOutput:
    """The round of ``round_`` on the cycle's base ``model``, its world's (:func:`model_world`)
    users' words and recipe; a generator candidate keeps the base's world file."""
    world = model_world(model)
    if round_.track == Track.PROMPT_ENHANCER:
        from training.pe_sft import read_pairs

        pairs = read_pairs(Path(manifest["pairs_file"]))
        pe = PromptEnhancerTrackConfig.from_cycle(config)
        return run_enhancer_round(
            pairs,
            enhancer=model.enhancer,
            out=out,
            config=pe,
            progress=progress,
            grpo=_grpo_inputs(session, round_, manifest=manifest, model=model, config=config)
            if pe.grpo_steps > 0
            else None,
            world=world,
        )
    generator = _generator_before(session, cycle, round_)
    if round_.track == Track.PRETRAINING_GAP:
        output = run_gap_round(
            AugmentationPlan.model_validate(manifest["plan"]),
            generator=generator,
            out=out,
            base=world_base_config(world),
            config=GapTrackConfig.from_cycle(config),
            progress=progress,
        )
        _keep_world(model.generator, output.candidate)
        return output
    rl = RLTrackConfig.from_cycle(config)
    preferences = PreferenceArtefact.model_validate(manifest["preferences"])
    recalibration, recalibration_run = recalibrate(
        Path(preferences.preferences_file),
        reward=model.reward,
        out=out / "recalibration",
        config=rl,
    )
    output = run_rl_round(
        manifest["prompts"],
        generator=generator,
        reward=Path(recalibration.reward),
        out=out,
        config=rl,
        progress=progress,
    )
    if recalibration_run is not None:
        output.stages = {"recalibration": recalibration_run, **output.stages}
    output.figures["recalibration"] = recalibration.model_dump(mode="json")
    _keep_world(model.generator, output.candidate)
    return output


def _grpo_inputs(
    session: Session,
    round_: TrainingRound,
    *,
    manifest: dict[str, Any],
    model: ModelBundle,
    config: CycleConfig,
) -> GRPOStageInputs:
    """The enhancer round's GRPO stage inputs: the base's generator (frozen: the rewrites are
    drawn with it) and reward directories; what the gate judges — the held-out side's prompts
    and references (the round's cases before the split: all of them), the regression suite's
    and the active scenarios' prompts — held out of the stage's prompts; and the judges of the
    gate's verdicts the enhancer can change, which the stage's reward may not be."""
    recorded = manifest.get("gate_cases")
    ids = [int(i) for i in recorded] if recorded is not None else round_case_ids(session, round_)
    gate = case_slices(session, case_ids=ids)
    scenarios = _scenario_slice(session)
    prompts = [
        *(text for case in [*gate, *scenarios] for text in (case.prompt, case.reference)),
        *(case.prompt for case in regression_cases(config)),
    ]
    return GRPOStageInputs(
        generator=model.generator,
        reward=model.reward,
        gate_prompts=prompts,
        gate_judges=frozenset(enhancer_gate_judges([*gate, *scenarios])),
    )


# ---- 6. evaluate -----------------------------------------------------------------------------


def regression_cases(config: CycleConfig) -> list[BenchmarkCase]:
    """The regression suite: the world's standard suite (``regression_cases`` per skill)."""
    cases = suite("standard")
    if config.regression.cases is None:
        return cases
    kept: dict[str, int] = {}
    out = []
    for case in cases:
        if kept.get(case.skill, 0) < config.regression.cases:
            kept[case.skill] = kept.get(case.skill, 0) + 1
            out.append(case)
    return out


def scenario_spec(case: SliceCase) -> dict[str, Any]:
    """What a regression scenario keeps of a slice case to be judged again later."""
    return {
        "reference": case.reference,
        "scene": case.scene.model_dump(mode="json") if case.scene is not None else None,
    }


def _scenario_slice(session: Session) -> list[SliceCase]:
    out = []
    for row in repository.active_scenarios(session):
        spec = row.spec if isinstance(row.spec, dict) else {}
        scene = BenchmarkCase.model_validate(spec["scene"]) if spec.get("scene") else None
        out.append(
            SliceCase(
                case_id=row.id,
                prompt=row.prompt,
                reference=str(spec.get("reference", row.prompt)),
                scene=scene,
            )
        )
    return out


def _ids(cases: Sequence[SliceCase]) -> set[int]:
    return {c.case_id for c in cases if c.case_id is not None}


def evaluate(session: Session, cycle: Cycle) -> Evaluation:
    """Base and candidate on the failure slices, the regression suite and the scenarios
    (once per cycle); the figures, also stored per round."""
    done = _summary(cycle).get("evaluation")
    if done is not None:
        return Evaluation.model_validate(done)
    from flywheel.world.base_model import load_world_enhancer, load_world_reward
    from flywheel.world.evaluation import run_suite
    from flywheel.world.evaluator import load_evaluator
    from model.pipeline import Generator

    config = cycle_config(cycle)
    base = base_model(session, cycle)
    assert cycle.candidate_model_version_id is not None
    candidate = bundle(session, version_id=cycle.candidate_model_version_id)
    evaluator = load_evaluator()
    judges = SliceJudges(evaluator=evaluator, reward=load_world_reward(base.reward))
    models = {
        "before": (Generator.load(base.generator), load_world_enhancer(base.enhancer)),
        "after": (Generator.load(candidate.generator), load_world_enhancer(candidate.enhancer)),
    }
    seeds = gate_seeds(judges.seed, config.gate.extra_seeds)
    tracks: dict[str, TrackEvaluation] = {}
    for round_ in cycle_rounds(session, cycle):
        cases = case_slices(session, case_ids=round_case_ids(session, round_))
        data = round_.data_manifest if isinstance(round_.data_manifest, dict) else {}
        recorded = data.get("gate_cases")  # rounds prepared before the split: all their cases
        gate_ids = {int(i) for i in recorded} if recorded is not None else _ids(cases)
        gate_cases = [c for c in cases if c.case_id in gate_ids]
        # The whole slice at every seed (a reward-judged case is ranked among its batch's
        # references, as at the slice's own seed); the gate counts its held-out cases.
        results = {
            when: [
                failure_rate(
                    generator, cases, dataclasses.replace(judges, seed=seed), enhancer=enhancer
                )
                for seed in seeds
            ]
            for when, (generator, enhancer) in models.items()
        }
        gate_failed = {
            when: [
                [case_id, seed]
                for seed, result in zip(seeds, runs, strict=True)
                for case_id in result.failed
                if case_id in gate_ids
            ]
            for when, runs in results.items()
        }
        round_.evaluation = {
            "slice": [scenario_spec(c) | {"case_id": c.case_id} for c in cases],
            # the slice at its own seed (which cases the candidate fixed)
            **{when: runs[0].model_dump(mode="json") for when, runs in results.items()},
            "gate": {
                "cases": sorted(_ids(gate_cases)),
                "seeds": seeds,
                "judged": [[c, seed] for c in sorted(_ids(gate_cases)) for seed in seeds],
                "failed_before": gate_failed["before"],
                "failed_after": gate_failed["after"],
            },
        }
        n = len(gate_cases) * len(seeds)
        tracks[round_.track.value] = TrackEvaluation(
            cases=len(gate_cases),
            seeds=len(seeds),
            n=n,
            failure_rate_before=len(gate_failed["before"]) / max(1, n),
            failure_rate_after=len(gate_failed["after"]) / max(1, n),
            failures_before=len(gate_failed["before"]),
            failures_after=len(gate_failed["after"]),
            fixed_of_all_cases=results["before"][0].failures - results["after"][0].failures,
        )
    suite_cases = regression_cases(config)
    scores: dict[str, float] = {}
    for when, (generator, _) in models.items():
        runs = [
            run_suite(generator, suite_cases, suite="standard", seed=seed, evaluator=evaluator)[0]
            for seed in range(config.regression.seeds)
        ]
        scores[when] = fmean(r.score for r in runs)
    scenarios = _scenario_slice(session)
    held = {
        when: failure_rate(generator, scenarios, judges, enhancer=enhancer)
        for when, (generator, enhancer) in models.items()
    }
    evaluation = Evaluation(
        tracks=tracks,
        regression=RegressionEvaluation(
            score_before=scores["before"],
            score_after=scores["after"],
            cases=len(suite_cases),
            seeds=config.regression.seeds,
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
