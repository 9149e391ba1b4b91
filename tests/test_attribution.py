"""Attribution against the shipped base, a real PostgreSQL and qdrant-client local mode: the
users' vocabulary, the classifier measured on a held-out labeled set of the world's
weaknesses, routing of stored cases, human triage and overrides that become examples."""

from __future__ import annotations

import random
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from qdrant_client import QdrantClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from flywheel.attribution.classifier import (
    ClassifierConfig,
    NotEnoughExamplesError,
    TrackClassifier,
    decisive_rule,
    fit_classifier,
    measure,
)
from flywheel.attribution.evidence import Evidence
from flywheel.attribution.repository import open_cases
from flywheel.attribution.service import (
    CaseClosedError,
    CaseNotFoundError,
    attribute_open_cases,
    case_views,
    override_examples,
    override_route,
    routing_classifier,
)
from flywheel.cases.service import collect_failures
from flywheel.cli.main import app
from flywheel.db.engine import session_factory
from flywheel.db.models import (
    CaseRoute,
    CaseStatus,
    Decider,
    FailureCase,
    ReviewAudit,
    ReviewItem,
    ReviewKind,
    ReviewStatus,
    SignalKind,
    Track,
)
from flywheel.settings import get_settings
from flywheel.signals.repository import NewSignal, insert_signals, model_version_id
from flywheel.world.base_model import BASE_REWARD, load_world_enhancer
from flywheel.world.benchmark import build_case
from flywheel.world.evaluation import BASE_MODEL
from flywheel.world.lexicon import lexicon_rewrites
from flywheel.world.loop.attribution import (
    LabeledSetConfig,
    labeled_examples,
    read_examples,
    seed_examples,
    world_evidence_tools,
    world_scarcity,
)
from flywheel.world.loop.evidence import EvidenceTools
from flywheel.world.vocabulary import (
    USER_COLOURS,
    has_user_words,
    reference_rewrite,
    to_user_words,
)
from retrieval.embedding import TextEmbedder
from retrieval.store import QdrantConfig
from tests.helpers import probe_hit, stored_signal

PER_TRACK = 12


def test_users_words_and_the_reference_rewrite() -> None:
    rng = random.Random(0)
    caption = "A picture with a white background showing a large Red circle; a blue star."
    worded = to_user_words(caption, rng)
    assert has_user_words(worded)
    assert "Red" not in worded
    assert "blue" not in worded
    assert reference_rewrite(worded) == caption
    purple = "a purple hexagon"  # the rare colour has no user word: a data gap
    assert to_user_words(purple, rng) == purple
    assert not has_user_words(purple)
    assert set(USER_COLOURS) == {"red", "green", "blue", "yellow", "orange", "black"}


@pytest.fixture(scope="module")
def tools(offline: None) -> EvidenceTools:
    probe = world_scarcity(
        QdrantClient(location=":memory:"), QdrantConfig(), TextEmbedder(), corpus=600
    )
    return world_evidence_tools(BASE_MODEL, reward_dir=BASE_REWARD, scarcity=probe)


@pytest.fixture(scope="module")
def seeds(tools: EvidenceTools) -> list[tuple[Evidence, Track]]:
    return labeled_examples(tools, LabeledSetConfig(per_track=PER_TRACK, band=70_000_000))


def test_classifier_meets_the_goal_on_a_held_out_labeled_set(
    tools: EvidenceTools, seeds: list[tuple[Evidence, Track]]
) -> None:
    assert Counter(t for _, t in seeds) == dict.fromkeys(Track, PER_TRACK)
    by_track = {t: [e for e, label in seeds if label == t] for t in Track}
    # The evidence points the way the weaknesses were injected — measured, not defined: the
    # general lexicon knows most users' words (not ebony), and nothing in the captions' words.
    changed = [e.rewrite_changed for e in by_track[Track.PROMPT_ENHANCER]]
    assert sum(changed) >= 0.75 * len(changed)
    assert not any(
        e.rewrite_changed for t in (Track.RL, Track.PRETRAINING_GAP) for e in by_track[t]
    )

    def mean(cases: list[Evidence], field: str) -> float:
        return float(sum(getattr(e, field) for e in cases)) / len(cases)

    assert mean(by_track[Track.PROMPT_ENHANCER], "rewrite_gain") > 0.15
    gap = by_track[Track.PRETRAINING_GAP]
    # The rare colour's word is rare in the corpus index's own text; the rl colour cases'
    # words are ordinary.
    assert all(e.term_rarity is not None and e.term_rarity < 0.1 for e in gap)
    ordinary = [e for e in by_track[Track.RL] if e.skill == "colour" or "wrong_color" in e.flags]
    assert ordinary
    assert statistics.median(e.term_rarity or 0.0 for e in ordinary) > 0.5
    # The reward cannot see counts or relations: their slices disagree with the evaluator.
    blind = [e for e in by_track[Track.RL] if e.skill in ("count", "relation")]
    assert blind
    assert mean(blind, "slice_disagreement") > mean(gap, "slice_disagreement") + 0.1
    held_out = labeled_examples(
        tools, LabeledSetConfig(per_track=PER_TRACK, band=80_000_000, seed=1)
    )
    classifier = fit_classifier(seeds)
    decisions = classifier.decide([e for e, _ in held_out])
    metrics = measure(decisions, [t for _, t in held_out])
    assert metrics.cases == 3 * PER_TRACK
    assert metrics.macro_f1 >= 0.8, metrics
    assert all(0.0 <= d.confidence <= 1.0 for d in decisions)
    assert all(abs(sum(d.probabilities.values()) - 1.0) < 1e-6 for d in decisions)


def test_too_few_examples_and_the_rewrite_rule(seeds: list[tuple[Evidence, Track]]) -> None:
    only_two_tracks = [(e, t) for e, t in seeds if t != Track.RL]
    with pytest.raises(NotEnoughExamplesError, match="rl"):
        fit_classifier(only_two_tracks)
    fixed = next(e for e, t in seeds if t == Track.PROMPT_ENHANCER)
    fixed = fixed.model_copy(update={"rewrite_fixed": True, "rewrite_gain": 0.8})
    config = ClassifierConfig()
    assert decisive_rule(fixed, config) is not None
    assert decisive_rule(fixed.model_copy(update={"rewrite_gain": 0.2}), config) is None
    decision = fit_classifier(seeds).decide([fixed])[0]
    assert (decision.track, decision.confidence) == (Track.PROMPT_ENHANCER, 1.0)
    assert decision.rule is not None


def test_seed_examples_are_built_once(
    tools: EvidenceTools, tmp_path: Path, seeds: list[tuple[Evidence, Track]]
) -> None:
    config = LabeledSetConfig(per_track=2, band=90_000_000)

    def cached() -> list[tuple[Evidence, Track]]:
        return seed_examples(
            tools,
            generator_dir=BASE_MODEL,
            reward_dir=BASE_REWARD,
            directory=tmp_path,
            config=config,
        )

    first = cached()
    (path,) = tmp_path.glob("labeled-*.jsonl")
    assert read_examples(path) == first
    written = path.stat().st_mtime_ns
    again = cached()
    assert again == first
    assert path.stat().st_mtime_ns == written  # read back, not built again
    path.write_text('{"track": "rl"}\n')
    with pytest.raises(ValueError, match=r":1: not a labeled example"):
        read_examples(path)


# ---- stored cases ----------------------------------------------------------------------------


def _complaint(number: int, prompt: str, version: int, flag: str, **fields: Any) -> NewSignal:
    return stored_signal(
        f"fb-{number}",
        prompt,
        kind=SignalKind.FLAGS,
        flags=[flag],
        model_version_id=version,
        **fields,
    )


def _store_failures(session: Session) -> dict[str, Track]:
    """Failures of each weakness as they arrive: probe hits (purple; counts and relations)
    and user complaints in the users' words. Returns the known track by prompt."""
    version = model_version_id(session, name="world-base")
    rng = random.Random(3)
    colours = [build_case("colour", k, band=95_000_000, case_id=f"c/{k}") for k in range(28)]
    purple = [c for c in colours if c.focus == "purple"][:4]
    worded = [c for c in colours if c.focus != "purple"][:4]
    composed = [
        build_case(skill, k, band=95_000_000, case_id=f"{skill}/{k}")
        for skill in ("count", "relation")
        for k in range(2)
    ]
    rows, truth = [], {}
    for n, case in enumerate(purple + composed):
        rows.append(probe_hit(n, case, version))
        truth[case.prompt] = Track.PRETRAINING_GAP if case in purple else Track.RL
    for n, case in enumerate(worded):
        prompt = to_user_words(case.prompt, rng)
        rows.append(_complaint(100 + n, prompt, version, "wrong_color"))
        truth[prompt] = Track.PROMPT_ENHANCER
    insert_signals(session, signals=rows)
    session.commit()
    collect_failures(session)
    return truth


def test_routes_stored_cases_with_evidence(
    fresh_engine: Engine, tools: EvidenceTools, seeds: list[tuple[Evidence, Track]]
) -> None:
    with session_factory(fresh_engine)() as session:
        truth = _store_failures(session)
        classifier = routing_classifier(session, seeds, ClassifierConfig())
        report = attribute_open_cases(session, gather=tools, classifier=classifier, batch_size=5)
        assert report.cases == len(truth) == 12
        routes = session.scalars(select(CaseRoute)).all()
        cases = {c.id: c for c in session.scalars(select(FailureCase))}
        routed = [r for r in routes if cases[r.case_id].status == CaseStatus.ROUTED]
        # What the classifier routes it routes right; weak or conflicting evidence (a
        # confidence below 0.6) waits for a human instead.
        assert sum(report.routed.values()) == len(routed) >= 3
        assert report.awaiting_triage == 12 - len(routed)
        wrong = [
            (cases[r.case_id].prompt[:60], r.track, truth[cases[r.case_id].prompt])
            for r in routed
            if truth[cases[r.case_id].prompt] != r.track
        ]
        assert len(wrong) <= 1, wrong
        for route in routes:
            assert route.decided_by == Decider.MODEL
            assert set(route.evidence) == {"features", "probabilities", "rule"}
            Evidence.model_validate(route.evidence["features"])
        assert {c.status for c in cases.values()} <= {
            CaseStatus.ROUTED,
            CaseStatus.AWAITING_TRIAGE,
        }
        # Routed and waiting cases are not routed again.
        again = attribute_open_cases(session, gather=tools, classifier=classifier)
        assert again.cases == 0


def test_the_rewrite_test_draws_what_the_model_was_given(
    fresh_engine: Engine, tools: EvidenceTools
) -> None:
    """Users type in their own words; the shipped enhancer serves some of them in another
    colour. The complaints carry both, and the rewrite test reproduces the failure from the
    served prompt against the lexicon's rewrite of what the user typed."""
    typed = ["azure circle", "emerald triangle", "golden square", "jade circle", "red square"]
    served = load_world_enhancer().enhance(typed)
    assert served[-1] == typed[-1]  # what the enhancer gets right, served as typed
    with session_factory(fresh_engine)() as session:
        version = model_version_id(session, name="world-base")
        insert_signals(
            session,
            signals=[
                _complaint(
                    n,
                    prompt,
                    version,
                    "wrong_color",
                    details={"served_prompt": given} if given != prompt else None,
                )
                for n, (prompt, given) in enumerate(zip(typed, served, strict=True))
            ],
        )
        session.commit()
        collect_failures(session)
        views = case_views(session, open_cases(session))
    assert {v.prompt: v.served_prompt for v in views} == {
        p: (s if s != p else None) for p, s in zip(typed, served, strict=True)
    }
    evidence = tools(views)
    for view, found in zip(views, evidence, strict=True):
        rewrite = lexicon_rewrites([view.prompt])[0]
        assert found.rewritten_prompt == rewrite
        assert found.rewrite_changed == (rewrite != (view.served_prompt or view.prompt))
    wrong = [e for e in evidence if e.rewrite_changed]
    assert len(wrong) == 4, [(v.prompt, v.served_prompt) for v in views]
    # The colour asked for beats the served one under the user's request.
    assert statistics.mean(e.rewrite_gain for e in wrong) > 0.2, [e.rewrite_gain for e in wrong]


def test_triage_and_overrides_become_examples(
    fresh_engine: Engine, tools: EvidenceTools, seeds: list[tuple[Evidence, Track]]
) -> None:
    with session_factory(fresh_engine)() as session:
        truth = _store_failures(session)
        strict = routing_classifier(session, seeds, ClassifierConfig(min_confidence=1.0))
        assert sum(strict.examples.values()) == len(seeds)
        report = attribute_open_cases(session, gather=tools, classifier=strict)
        # Only decisive rules reach confidence 1: the rest wait for a human.
        assert report.awaiting_triage == report.cases - report.by_rule > 0
        items = session.scalars(select(ReviewItem).order_by(ReviewItem.id)).all()
        assert len(items) == report.awaiting_triage
        assert {i.kind for i in items} == {ReviewKind.TRIAGE_CASE}
        item = items[0]
        assert item.case_id is not None
        case = session.get(FailureCase, item.case_id)
        assert case is not None
        assert case.status == CaseStatus.AWAITING_TRIAGE
        track = truth[case.prompt]
        route = override_route(
            session, case_id=case.id, track=track, reviewer="alice", reason="looked at it"
        )
        assert (route.decided_by, route.decider_ref, route.track) == (Decider.HUMAN, "alice", track)
        session.refresh(item)
        status = session.scalar(select(FailureCase.status).where(FailureCase.id == case.id))
        assert status == CaseStatus.ROUTED
        assert (item.status, item.decided_by) == (ReviewStatus.APPROVED, "alice")
        assert item.edits == {"track": track.value}
        actions = session.scalars(
            select(ReviewAudit.action).where(ReviewAudit.review_item_id == item.id)
        ).all()
        assert list(actions) == ["created", "approved"]
        # The override is a labeled example of the next fit.
        examples = override_examples(session)
        assert [t for _, t in examples] == [track]
        assert examples[0][0] == Evidence.model_validate(
            session.scalars(
                select(CaseRoute.evidence).where(
                    CaseRoute.case_id == case.id, CaseRoute.decided_by == Decider.MODEL
                )
            ).one()["features"]
        )
        refit: TrackClassifier = routing_classifier(session, seeds)
        assert sum(refit.examples.values()) == len(seeds) + 1
        # A closed case keeps its route; an unknown one is an error.
        case.status = CaseStatus.FIXED
        session.commit()
        with pytest.raises(CaseClosedError, match="fixed"):
            override_route(session, case_id=case.id, track=Track.RL, reviewer="bob")
        with pytest.raises(CaseNotFoundError):
            override_route(session, case_id=10**9, track=Track.RL, reviewer="bob")
        assert len(items) >= 2
        with pytest.raises(ValueError, match="named"):
            override_route(session, case_id=items[1].case_id or 0, track=Track.RL, reviewer=" ")


def test_cli_override_refuses_bad_input(migrated_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", migrated_url)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        result = runner.invoke(app, ["attribution", "override", "1", "--track", "x", "--by", "a"])
        assert result.exit_code == 2
        assert "--track 'x'" in result.output
        result = runner.invoke(app, ["attribution", "override", "7", "--track", "rl", "--by", "a"])
        assert result.exit_code == 2
        assert "no failure case 7" in result.output
    finally:
        get_settings.cache_clear()
