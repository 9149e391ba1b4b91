"""The prompt enhancer's GRPO stage in a real cycle of the embedded world: with
``prompt_enhancer.grpo_steps`` > 0 the enhancer round runs its SFT and then its GRPO stage —
the base's generator drawing the rewrites, the world's evaluator judging them — on prompts
none of which the round's gate judges.

One real cycle of a tiny world, its steps called in-process against a real PostgreSQL (no
Prefect: the flow's steps in its order), with users' feedback alone (the enhancer's track)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from qdrant_client import QdrantClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from flywheel.attribution.service import override_route
from flywheel.cycle import steps
from flywheel.cycle.config import CycleConfig
from flywheel.cycle.registry import bundle
from flywheel.db.engine import session_factory
from flywheel.db.models import CaseRoute, Cycle, FailureCase, Track, TrainingRound
from flywheel.signals.repository import insert_signals, model_version_id
from flywheel.tracks.routed import same_prompt_key
from flywheel.world.benchmark import build_case
from flywheel.world.loop import steps as world_steps
from flywheel.world.loop.backend import shipped_base
from flywheel.world.loop.gate import case_keys
from flywheel.world.loop.plan import case_slices
from flywheel.world.loop.prompt_enhancer import (
    EVALUATOR_NAME,
    WORLD_REWARD_NAME,
    PromptEnhancerTrackConfig,
    grpo_prompts,
    pair_concepts,
)
from retrieval.embedding import TextEmbedder
from retrieval.store import QdrantConfig
from tests.helpers import TINY_CYCLE, approve_artefacts, colour_complaints
from training.pe_sft import read_pairs

BAND = 97_000_000
GRPO_STEPS = 2


@pytest.fixture
def engine(scratch_engine: Engine) -> Engine:
    """The scratch database and a scratch home for this process (``scratch_engine``)."""
    return scratch_engine


def _store_feedback(engine: Engine) -> list[str]:
    """Users' feedback naming colours in words the captions never use; the prompts."""
    rng = random.Random(11)
    with session_factory(engine)() as session:
        version = model_version_id(session, name="world-base")
        colours = [build_case("colour", k, band=BAND, case_id=f"c/{k}") for k in range(60)]
        worded = [c for c in colours if c.focus in ("red", "blue")][:8]
        user, rows = colour_complaints(worded, rng, version=version)
        insert_signals(session, signals=rows)
        session.commit()
    return user


@pytest.mark.timeout(600)
def test_a_world_cycle_runs_the_enhancers_grpo_on_prompts_its_gate_never_judges(
    engine: Engine, tmp_path: Path, offline: None
) -> None:
    prompts = _store_feedback(engine)
    assert len(prompts) >= 4
    home = tmp_path / "home"
    config = CycleConfig.model_validate(
        TINY_CYCLE
        | {
            "prompt_enhancer": {
                "steps": 10,
                "pairs_per_concept": 12,
                "grpo_steps": GRPO_STEPS,
                "grpo_prompts_per_concept": 8,
                "grpo_group_size": 2,
            },
        }
    )
    client, qdrant, embedder = QdrantClient(location=":memory:"), QdrantConfig(), TextEmbedder()
    indexes = {"client": client, "qdrant": qdrant, "embedder": embedder}
    with Session(engine) as session:
        cycle, _ = steps.open_cycle(session, config=config, shipped=shipped_base())
        world_steps.attribute(session, cycle, home=home, **indexes)  # type: ignore[arg-type]
        for case in session.scalars(select(FailureCase)).all():  # a reviewer's corrections
            route = session.scalars(
                select(CaseRoute).where(CaseRoute.case_id == case.id).order_by(CaseRoute.id.desc())
            ).first()
            if route is None or route.track != Track.PROMPT_ENHANCER:
                override_route(session, case_id=case.id, track=Track.PROMPT_ENHANCER, reviewer="al")
        world_steps.prepare_rounds(session, cycle, home=home, **indexes)  # type: ignore[arg-type]
        cycle_id = cycle.id
    client.close()
    assert approve_artefacts(engine)
    with Session(engine) as session:
        (round_,) = session.scalars(
            select(TrainingRound).where(TrainingRound.cycle_id == cycle_id)
        ).all()
        assert round_.track == Track.PROMPT_ENHANCER
        world_steps.run_round(session, round_.id, home=home)
        session.refresh(round_)
        data = round_.data_manifest
        metrics = round_.metrics
        assert isinstance(data, dict)
        assert isinstance(metrics, dict)
        gate_cases = case_slices(session, case_ids=[int(i) for i in data["gate_cases"]])
        finished = session.get(Cycle, cycle_id)
        assert finished is not None
        steps.register_candidate(session, finished)
        assert finished.candidate_model_version_id is not None
        candidate = bundle(session, version_id=finished.candidate_model_version_id)

    # (a) The round's metrics record both stages; the GRPO stage's figures name its reward
    # (the evaluator: the gate judges these scene-less app cases with the reward model) and
    # give its reward at every step.
    stages = metrics["stages"]
    assert set(stages) == {"sft", "grpo"}
    grpo = stages["grpo"]
    assert grpo["steps"] == GRPO_STEPS
    assert grpo["reward"] == EVALUATOR_NAME != WORLD_REWARD_NAME
    assert all(c.scene is None for c in gate_cases)  # judged by the reward model's rank
    assert len(grpo["rewards"]) == GRPO_STEPS
    assert all(isinstance(r, float) for r in grpo["rewards"])
    assert grpo["first_loss"] is not None
    assert grpo["last_loss"] is not None
    out = home / "cycles" / str(cycle_id) / Track.PROMPT_ENHANCER.value
    rows = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, GRPO_STEPS + 1))
    assert all("loss" in r and "reward_mean" in r for r in rows)
    assert Path(str(metrics["output"])) == out / "enhancer"

    # (b) The stage's prompts are none of the gate's prompts nor their references, nor any
    # pair the SFT trained on (new scenes), and it held the gate's prompts out.
    trained = read_pairs(out / "grpo_prompts.jsonl")
    assert trained
    assert grpo["prompts"] == len(trained)
    gate_keys = {k for c in gate_cases for k in case_keys(c)}
    assert gate_cases
    assert gate_keys
    assert not {same_prompt_key(p) for p, _ in trained} & gate_keys
    assert grpo["gate_prompts_held_out"] >= len(gate_keys)
    # Not by chance: drawn without holding the gate out, the stage's prompts would share some
    # (one object's terse prompts in the users' words repeat across scenes).
    pe = PromptEnhancerTrackConfig.from_cycle(config)
    free = grpo_prompts(pair_concepts(read_pairs(out / "pairs.jsonl")), pe, gate_prompts=[])
    assert {same_prompt_key(p) for p, _ in free} & gate_keys

    # (c) The cycle's candidate serves the GRPO'd enhancer (the round's output, exported from
    # the stage's run).
    assert candidate.enhancer == out / "enhancer"
    assert (candidate.enhancer / "model.safetensors").is_file()
