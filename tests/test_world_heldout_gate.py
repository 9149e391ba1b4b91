"""The embedded world's gate judges held-out prompts: each track's routed cases are split by
failure theme, the round trains on one side and the gate judges the other — at the slice's
own noise seed and at fresh ones — so no gate prompt is one a round trained on.

The split on synthetic cases (fast), then one real cycle of a tiny world, its steps called
in-process against a real PostgreSQL (no Prefect: the flow's steps in its order)."""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path

import pytest
from qdrant_client import QdrantClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from flywheel.attribution.service import override_route
from flywheel.cycle import steps
from flywheel.cycle.config import CycleConfig
from flywheel.cycle.verdicts import TrackEvaluation
from flywheel.db.engine import session_factory
from flywheel.db.models import (
    CaseRoute,
    Cycle,
    FailureCase,
    Track,
    TrainingRound,
    TrainingRoundCase,
)
from flywheel.signals.repository import insert_signals, model_version_id
from flywheel.tracks.routed import same_prompt_key
from flywheel.world.benchmark import build_case
from flywheel.world.loop import steps as world_steps
from flywheel.world.loop.backend import shipped_base
from flywheel.world.loop.gate import (
    SEED_STRIDE,
    case_keys,
    case_theme,
    gate_seeds,
    group_theme,
    prompt_groups,
    split_by_theme,
)
from flywheel.world.loop.plan import case_slices
from flywheel.world.loop.prompt_enhancer import PromptEnhancerTrackConfig, enhancer_pairs
from flywheel.world.loop.slices import SliceCase
from retrieval.embedding import TextEmbedder
from retrieval.store import QdrantConfig
from tests.helpers import (
    TINY_CYCLE,
    approve_artefacts,
    colour_complaints,
    count_preferences,
    probe_hit,
)
from training.pe_sft import read_pairs

BAND = 95_000_000


def _case(case_id: int, theme: str | None, prompt: str | None = None) -> SliceCase:
    text = prompt or f"prompt number {case_id}"
    return SliceCase(case_id=case_id, prompt=text, reference=text, theme=theme)


def _themes(cases: list[SliceCase]) -> dict[str, list[SliceCase]]:
    out: dict[str, list[SliceCase]] = defaultdict(list)
    for case in cases:
        assert case.theme is not None
        out[case.theme].append(case)
    return out


# ---- the split, on synthetic cases -------------------------------------------------------------


def test_every_theme_of_two_cases_or_more_lands_on_both_sides_and_the_sides_are_disjoint() -> None:
    sizes = {"colour: purple": 5, "count: 3": 2, "prompts: crimson": 3, "count: 4": 7}
    cases = [
        _case(100 * t + k, theme)
        for t, (theme, size) in enumerate(sizes.items())
        for k in range(size)
    ]
    for seed in range(5):
        split = split_by_theme(cases, gate_share=0.5, seed=seed)
        train = {c.case_id for c in split.train if c.case_id is not None}
        gate = {c.case_id for c in split.gate if c.case_id is not None}
        assert not train & gate
        assert train | gate == {c.case_id for c in cases}
        for theme, members in _themes(cases).items():
            ids = {c.case_id for c in members if c.case_id is not None}
            assert ids & train, (seed, theme)
            assert ids & gate, (seed, theme)
            assert sorted(ids & gate) == split.themes[theme]["gate"]
        recorded = split.record()
        assert recorded["gate_cases"] == sorted(gate)
        assert recorded["train_cases"] == sorted(train)


def test_the_gate_share_sets_each_themes_gate_side_and_the_split_ignores_case_order() -> None:
    cases = [_case(k, "count: 4") for k in range(10)] + [
        _case(50 + k, "colour: red") for k in (0, 1)
    ]
    split = split_by_theme(cases, gate_share=0.3, seed=0)
    by_theme = {t: len(v["gate"]) for t, v in split.themes.items()}
    assert by_theme == {"count: 4": 3, "colour: red": 1}
    shuffled = list(cases)
    random.Random(3).shuffle(shuffled)
    again = split_by_theme(shuffled, gate_share=0.3, seed=0)
    assert {c.case_id for c in again.gate} == {c.case_id for c in split.gate}
    other = split_by_theme(cases, gate_share=0.3, seed=7)
    assert len(other.gate) == len(split.gate)


def test_cases_of_the_same_prompt_stay_on_one_side_even_across_themes() -> None:
    cases = [
        _case(1, "prompts: violet", "A violet triangle."),
        _case(2, "prompts: violet", "violet triangle"),
        SliceCase(case_id=3, prompt="lilac triangle", reference="Violet triangle", theme="other"),
        _case(4, "prompts: violet", "a mauve circle"),
        _case(5, "prompts: violet", "a plum square"),
        _case(6, "prompts: violet", "a lilac star"),
    ]
    for seed in range(8):
        split = split_by_theme(cases, seed=seed)
        sides = {c.case_id: "gate" for c in split.gate} | {c.case_id: "train" for c in split.train}
        assert sides[1] == sides[2] == sides[3], seed
        train_keys = {k for c in split.train for k in case_keys(c)}
        assert not train_keys & split.gate_keys(), seed
        assert split.gate
        assert split.train


def test_a_theme_of_one_prompt_trains_unless_no_theme_has_two() -> None:
    singles = [_case(k, f"count: {k}") for k in range(1, 7)]
    mixed = split_by_theme([*singles, _case(20, "colour: red"), _case(21, "colour: red")])
    assert {c.case_id for c in mixed.train} >= set(range(1, 7))
    assert len(mixed.gate) == 1
    assert mixed.gate[0].theme == "colour: red"
    alone = split_by_theme(singles, seed=0)  # no theme of two: split together
    assert len(alone.gate) == 3
    assert len(alone.train) == 3
    lone = split_by_theme([_case(1, "count: 1")], seed=0)
    assert ([c.case_id for c in lone.train], lone.gate) == ([1], [])
    unthemed = SliceCase(case_id=9, prompt="a red star", reference="a red star")
    assert split_by_theme([unthemed, _case(10, None)]).themes.keys() == {"(no theme)"}


def test_the_gate_judges_its_own_seed_then_fresh_ones() -> None:
    assert gate_seeds(1000, 0) == [1000]
    assert gate_seeds(1000, 2) == [1000, 1000 + SEED_STRIDE, 1000 + 2 * SEED_STRIDE]
    figures = TrackEvaluation.model_validate(
        {
            "cases": 4,
            "seeds": 3,
            "failures_before": 6,
            "failures_after": 3,
            "failure_rate_before": 0.5,
            "failure_rate_after": 0.25,
        }
    )
    assert figures.n == 12
    assert figures.interval_before[0] < 0.5 < figures.interval_before[1]


def test_enhancer_pairs_leave_out_the_gate_prompts_and_keep_their_count() -> None:
    config = PromptEnhancerTrackConfig(pairs_per_concept=20, steps=1, seed=1)
    pairs = enhancer_pairs(["blue", "red"], config)
    held = {same_prompt_key(t) for pair in pairs[:10] for t in pair}
    kept = enhancer_pairs(["blue", "red"], config, held_out=held)
    assert not {same_prompt_key(t) for pair in kept for t in pair} & held
    worded = [p for p, o in kept if p != o]
    assert len(worded) == len([p for p, o in pairs if p != o]) == 40


# ---- a real cycle of the embedded world ---------------------------------------------------------


@pytest.fixture
def engine(scratch_engine: Engine) -> Engine:
    """The scratch database and a scratch home for this process (``scratch_engine``)."""
    return scratch_engine


def _store_failures(engine: Engine, images: Path) -> dict[str, Track]:
    """Probe hits the base fails (purple: a corpus gap; counts: RL) and users' feedback naming
    colours in words the captions never use (the prompt enhancer's); prompt -> its track."""
    rng = random.Random(11)
    with session_factory(engine)() as session:
        version = model_version_id(session, name="world-base")
        colours = [build_case("colour", k, band=BAND, case_id=f"c/{k}") for k in range(80)]
        purple = [c for c in colours if c.focus == "purple"][:4]
        worded = [c for c in colours if c.focus in ("red", "blue")][:8]
        counts = [build_case("count", k, band=BAND, case_id=f"n/{k}") for k in range(6)]
        rows = [probe_hit(n, c, version) for n, c in enumerate(purple + counts)]
        rows += count_preferences(counts, images, version=version)  # the RL track's pairs
        user, complaints = colour_complaints(worded, rng, version=version)
        rows += complaints
        insert_signals(session, signals=rows)
        session.commit()
    truth = dict.fromkeys((c.prompt for c in purple), Track.PRETRAINING_GAP)
    truth |= dict.fromkeys((c.prompt for c in counts), Track.RL)
    truth |= dict.fromkeys(user, Track.PROMPT_ENHANCER)
    return truth


def _training_prompts(round_: TrainingRound) -> set[str]:
    """Every prompt the round trained on, as :func:`same_prompt_key` s."""
    data = round_.data_manifest if isinstance(round_.data_manifest, dict) else {}
    if round_.track == Track.PROMPT_ENHANCER:
        texts = [t for pair in read_pairs(Path(data["pairs_file"])) for t in pair]
    elif round_.track == Track.RL:
        texts = list(data["prompts"])
    else:
        texts = [str(c["text"]) for c in data["plan"]["retrieved"] if c.get("text")]
    return {same_prompt_key(t) for t in texts}


@pytest.mark.timeout(900)
def test_a_world_cycle_trains_on_one_side_of_each_theme_and_gates_on_the_other(
    engine: Engine, tmp_path: Path, offline: None
) -> None:
    truth = _store_failures(engine, tmp_path / "app")
    home = tmp_path / "home"
    config = CycleConfig.model_validate(
        TINY_CYCLE
        | {
            "prompt_enhancer": {"steps": 20, "pairs_per_concept": 20},
            "pretraining_gap": TINY_CYCLE["pretraining_gap"] | {"steps": 4},
            "gate": {"share": 0.5, "extra_seeds": 2},
        }
    )
    client, qdrant, embedder = QdrantClient(location=":memory:"), QdrantConfig(), TextEmbedder()
    indexes = {"client": client, "qdrant": qdrant, "embedder": embedder}
    with Session(engine) as session:
        cycle, resumed = steps.open_cycle(session, config=config, shipped=shipped_base())
        assert not resumed
        world_steps.attribute(session, cycle, home=home, **indexes)  # type: ignore[arg-type]
        for case in session.scalars(select(FailureCase)).all():  # a reviewer's corrections
            route = session.scalars(
                select(CaseRoute).where(CaseRoute.case_id == case.id).order_by(CaseRoute.id.desc())
            ).first()
            if route is None or route.track != truth[case.prompt]:
                override_route(session, case_id=case.id, track=truth[case.prompt], reviewer="al")
        prepared = world_steps.prepare_rounds(session, cycle, home=home, **indexes)  # type: ignore[arg-type]
        cycle_id = cycle.id
    client.close()
    assert approve_artefacts(engine)
    with Session(engine) as session:
        rounds = session.scalars(
            select(TrainingRound).where(TrainingRound.cycle_id == cycle_id)
        ).all()
        assert {r.track for r in rounds} == set(Track), prepared
        for round_ in rounds:
            world_steps.run_round(session, round_.id, home=home)
        finished = session.get(Cycle, cycle_id)
        assert finished is not None
        steps.register_candidate(session, finished)
        evaluation = world_steps.evaluate(session, finished)

        stratified = 0  # themes of two prompts or more, all rounds together
        trained_on = set().union(*(_training_prompts(r) for r in rounds))
        trained_on.discard("")
        for round_ in rounds:
            session.refresh(round_)
            data = round_.data_manifest or {}
            assert isinstance(data, dict)
            train, gate = set(data["train_cases"]), set(data["gate_cases"])
            all_ids = set(
                session.scalars(
                    select(TrainingRoundCase.case_id).where(
                        TrainingRoundCase.training_round_id == round_.id
                    )
                )
            )
            # (a) the sides are disjoint and cover the round's cases; no gate prompt (nor its
            # reference) is one any round trained on, nor a train case's prompt.
            assert gate, round_.track
            assert train, round_.track
            assert not train & gate, round_.track
            assert train | gate == all_ids
            gate_cases = case_slices(session, case_ids=sorted(gate))
            train_cases = case_slices(session, case_ids=sorted(train))
            gate_keys = {k for c in gate_cases for k in case_keys(c)}
            assert not gate_keys & trained_on, (round_.track, gate_keys & trained_on)
            assert not gate_keys & {k for c in train_cases for k in case_keys(c)}
            if round_.track == Track.RL:
                assert {same_prompt_key(p) for p in data["prompts"]} <= {
                    same_prompt_key(c.prompt) for c in train_cases
                }
            if round_.track == Track.PRETRAINING_GAP:
                asked = {w for c in train_cases for w in c.reference.casefold().split()}
                assert set(data["plan"]["concepts"]) <= asked  # from the train side alone
            # (b) every theme with two prompts or more (cases that share a prompt or a
            # reference are one prompt) is on both sides; each prompt on one side.
            by_theme: dict[str, list[list[SliceCase]]] = defaultdict(list)
            for group in prompt_groups(gate_cases + train_cases):
                sides = {c.case_id in gate for c in group}
                assert len(sides) == 1, (round_.track, [c.prompt for c in group])
                by_theme[group_theme(group)].append(group)
            for theme, groups in by_theme.items():
                if len(groups) >= 2:
                    stratified += 1
                    sides = {c.case_id in gate for group in groups for c in group}
                    assert sides == {True, False}, (round_.track, theme)
            themed = {case_theme(c) for c in gate_cases + train_cases}
            assert {t for t, s in data["themes"].items() if s["gate"]} <= themed
            # (c) the gate's figures are over its held-out cases at every seed judged.
            figures = evaluation.tracks[round_.track.value]
            judged = (round_.evaluation or {})["gate"]
            assert judged["cases"] == sorted(gate)
            assert judged["seeds"] == gate_seeds(1000, 2)
            assert figures.cases == len(gate)
            assert figures.seeds == 3
            assert figures.n == len(gate) * 3 == len(judged["judged"])
            assert figures.failures_before == len(judged["failed_before"])
            assert figures.failure_rate_after == len(judged["failed_after"]) / figures.n
            assert {c for c, _ in judged["failed_before"]} <= gate
            # the whole slice at its own seed: which cases the candidate fixed
            assert len((round_.evaluation or {})["slice"]) == len(all_ids)
        assert stratified >= 2  # the tiny world's purple and its users' colour words at least
