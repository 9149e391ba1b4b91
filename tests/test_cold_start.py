"""Attribution from a cold start: the rules that route cases before any labelled example
exists, the hand-over to the classifier once people have triaged enough, and the evidence a
team's stack gives through its ports — the world's generator, reward and enhancer, a real
HTTP judge that reads the prompt alone (the colour judge of ``tests/adapters``), a directory
corpus indexed into qdrant-client's local mode — routed in a real PostgreSQL database."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import JsonValue
from qdrant_client import QdrantClient
from sqlalchemy import Engine, select

from flywheel.adapters.base import AdapterContext
from flywheel.adapters.datasets import write_records
from flywheel.adapters.native import LocalReward
from flywheel.attribution.classifier import TrackClassifier
from flywheel.attribution.evidence import CaseView, Evidence, Rarity, ScarcityProbe
from flywheel.attribution.rules import (
    COLD_START_REF,
    REWARD,
    REWRITE,
    SCARCE,
    RuleRouter,
    RuleRouterConfig,
    cold_start_router,
)
from flywheel.attribution.service import (
    attribute_open_cases,
    case_views,
    override_examples,
    override_route,
)
from flywheel.attribution.stack_evidence import (
    corpus_scarcity,
    gather_stack_evidence,
    reward_ranks,
    tag_rarity,
)
from flywheel.cases.service import collect_failures
from flywheel.db.engine import session_factory
from flywheel.db.models import (
    CaseRoute,
    CaseStatus,
    Decider,
    FailureCase,
    ReviewItem,
    ReviewKind,
    Task,
    Track,
)
from flywheel.parts import Parts, build_parts
from flywheel.ports import CorpusItem, JudgeRequest
from flywheel.project import WORLD, WORLD_LAUNCHER, PartSection, Project
from flywheel.signals.repository import NewSignal, insert_signals, model_version_id
from model.reward import rank_matrix
from retrieval.embedding import TextEmbedder
from retrieval.store import QdrantConfig, collection_name
from tests.adapters.test_http_judge import ColourJudgeService
from tests.helpers import stored_signal

# ---- the rules on hand-built evidence --------------------------------------------------------


def evidence(**fields: object) -> Evidence:
    """A disliked case (a thumbs down) on which no rule fires; ``fields`` override."""
    row: dict[str, object] = {
        "rewritten_prompt": "a red circle",
        "rewrite_changed": False,
        "scored_by": "judge",
        "score_original": 0.3,
        "score_rewritten": 0.3,
        "rewrite_gain": 0.0,
        "rewrite_fixed": False,
        "scarcity": 0.5,
        "nearest_corpus": [],
        "concept_rarity": 1.0,
        "reward_rank": 0.3,
        "skill": None,
        "sources": {"feedback": 1},
        "negative_feedback": 1,
        "flags": [],
        "editing": False,
    }
    return Evidence.model_validate({**row, **fields})


FIXED = {"rewrite_changed": True, "rewrite_fixed": True, "score_rewritten": 0.9}


def test_a_rewrite_that_fixes_the_failure_routes_to_the_prompt_enhancer() -> None:
    (decision,) = RuleRouter().decide([evidence(**FIXED, rewrite_gain=0.6)])
    assert (decision.track, decision.rule) == (Track.PROMPT_ENHANCER, REWRITE)
    # Half-way from the threshold (0.2) to a full gain: half-way from 0.6 to 1.
    assert decision.confidence == pytest.approx(0.8)
    assert max(decision.probabilities, key=decision.probabilities.__getitem__) == (
        Track.PROMPT_ENHANCER.value
    )
    assert sum(decision.probabilities.values()) == pytest.approx(1.0)
    # A rewrite that gains but does not pass, or passes without gaining enough, or an
    # unchanged prompt, fixes nothing.
    unfixed, small, unchanged = RuleRouter().decide(
        [
            evidence(**{**FIXED, "rewrite_fixed": False}, rewrite_gain=0.6),
            evidence(**FIXED, rewrite_gain=0.15),
            evidence(**{**FIXED, "rewrite_changed": False}, rewrite_gain=0.6),
        ]
    )
    assert all(d.confidence < 0.6 for d in (unfixed, small, unchanged))
    assert (small.track, small.rule) == (Track.PROMPT_ENHANCER, REWRITE)  # the nearest rule


def test_a_concept_the_corpus_lacks_routes_to_the_pretraining_gap_by_rarity_or_by_density() -> None:
    router = RuleRouter()
    rare, sparse = router.decide(
        [evidence(concept_rarity=0.05), evidence(concept_rarity=None, scarcity=0.85)]
    )
    assert (rare.track, rare.rule) == (Track.PRETRAINING_GAP, SCARCE)
    assert rare.confidence == pytest.approx(0.6 + 0.4 * (0.25 - 0.05) / 0.25)
    assert (sparse.track, sparse.rule) == (Track.PRETRAINING_GAP, SCARCE)
    assert sparse.confidence == pytest.approx(0.6 + 0.4 * (0.85 - 0.7) / 0.3)


def test_a_reward_that_likes_what_people_disliked_routes_to_rl_and_only_then() -> None:
    router = RuleRouter()
    (disliked,) = router.decide([evidence(reward_rank=0.9)])
    assert (disliked.track, disliked.rule) == (Track.RL, REWARD)
    assert disliked.confidence == pytest.approx(0.6 + 0.4 * 0.3 / 0.4)
    # A failing evaluation, or a judge that scores the image under half, is a complaint too.
    for fields in (
        {"sources": {"evaluation": 1}, "negative_feedback": 0},
        {"sources": {}, "negative_feedback": 0, "score_original": 0.2},
    ):
        (decision,) = router.decide([evidence(reward_rank=0.9, **fields)])
        assert (decision.track, decision.confidence) == (Track.RL, disliked.confidence)
    # Nobody complained and the judge is content: the reward agrees with people, no rule.
    (content,) = router.decide(
        [evidence(reward_rank=0.9, sources={}, negative_feedback=0, score_original=0.9)]
    )
    assert content.confidence < 0.6


def test_when_several_rules_fire_the_strongest_margin_wins_with_lower_confidence() -> None:
    router = RuleRouter()
    alone, both, tie = router.decide(
        [
            evidence(concept_rarity=0.0),
            evidence(concept_rarity=0.0, reward_rank=0.7),
            # Margins 0.5 and 0.5: a tie keeps the rules' order and goes to a human.
            evidence(**FIXED, rewrite_gain=0.6, reward_rank=0.8),
        ]
    )
    assert alone.track == Track.PRETRAINING_GAP
    assert alone.confidence == pytest.approx(1.0)
    assert (both.track, both.rule) == (Track.PRETRAINING_GAP, SCARCE)
    # Margins 1 and 0.25: (1 - 0.25 - 0.1) / 0.9 of the way from 0.6 to 1.
    assert both.confidence == pytest.approx(0.6 + 0.4 * 0.65 / 0.9)
    assert both.confidence < alone.confidence
    assert (tie.track, tie.rule) == (Track.PROMPT_ENHANCER, REWRITE)
    assert tie.confidence < 0.6


def test_when_no_rule_fires_the_nearest_rules_track_waits_for_triage() -> None:
    router = RuleRouter()
    near_scarce, near_reward, nothing = router.decide(
        [
            evidence(scarcity=0.65),
            evidence(scarcity=0.1, reward_rank=0.55),
            evidence(scarcity=None, concept_rarity=None, reward_rank=0.0),
        ]
    )
    assert (near_scarce.track, near_scarce.rule) == (Track.PRETRAINING_GAP, SCARCE)
    assert (near_reward.track, near_reward.rule) == (Track.RL, REWARD)
    assert near_scarce.confidence == pytest.approx(0.6 * (1 - 0.05 / 0.7))
    assert all(0.0 <= d.confidence < 0.6 for d in (near_scarce, near_reward, nothing))
    assert nothing.confidence < near_reward.confidence


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("rewrite_gain", [0.05, 0.1, 0.15, 0.2, 0.6, 1.0]),
        ("concept_rarity", [1.5, 0.6, 0.3, 0.25, 0.1, 0.0]),
        ("scarcity", [0.1, 0.5, 0.69, 0.7, 0.8, 1.0]),
        ("reward_rank", [0.0, 0.3, 0.59, 0.6, 0.8, 1.0]),
    ],
)
def test_confidence_grows_with_how_far_the_evidence_is_past_the_threshold(
    field: str, values: list[float]
) -> None:
    # The other rules far off, so the nearest rule below the threshold is this one.
    fields = {"reward_rank": 0.0, "scarcity": 0.0, "concept_rarity": 1.5}
    if field == "rewrite_gain":
        fields.update(FIXED)
    decisions = RuleRouter().decide([evidence(**{**fields, field: v}) for v in values])
    confidences = [d.confidence for d in decisions]
    assert confidences == sorted(confidences)
    assert len(set(confidences)) == len(confidences)
    # Below the threshold the case waits for a human; from it on, the rule routes it.
    assert [c >= 0.6 for c in confidences] == [False, False, False, True, True, True]


def test_a_config_out_of_range_is_refused() -> None:
    for bad in (
        RuleRouterConfig(rewrite_gain=0.0),
        RuleRouterConfig(rarity_below=1.0),
        RuleRouterConfig(min_confidence=1.5),
        RuleRouterConfig(min_human_per_track=1),
    ):
        with pytest.raises(ValueError, match="RuleRouterConfig"):
            RuleRouter(config=bad)


# ---- the hand-over to the classifier ---------------------------------------------------------

KINDS: dict[Track, dict[str, Any]] = {
    Track.PROMPT_ENHANCER: {**FIXED, "rewrite_gain": 0.5},
    Track.PRETRAINING_GAP: {"concept_rarity": 0.05, "scarcity": 0.8},
    Track.RL: {"reward_rank": 0.9},
}


def _kind_of(prompt: str) -> Track:
    return next(t for t in Track if prompt.startswith(t.value))


def _stored_evidence(views: Sequence[CaseView]) -> list[Evidence]:
    """Evidence of the test's cases: the kind its prompt names, varied by its number."""
    out = []
    for view in views:
        number = int(view.prompt.rsplit(" ", 1)[1])
        wobble = (number % 5) / 50
        fields = {**KINDS[_kind_of(view.prompt)]}
        fields["score_original"] = 0.2 + wobble
        fields["reward_rank"] = fields.get("reward_rank", 0.3) - wobble
        out.append(evidence(**fields))
    return out


def test_the_rules_route_until_every_track_has_enough_human_decisions_then_the_classifier_does(
    fresh_engine: Engine,
) -> None:
    per_track = RuleRouterConfig().min_human_per_track
    assert per_track == 8
    with session_factory(fresh_engine)() as session:
        version = model_version_id(session, name="team-v1")
        prompts = [f"{t.value} case number {n}" for t in Track for n in range(per_track)]
        insert_signals(
            session,
            signals=[
                stored_signal(f"fb-{n}", p, thumbs_up=False, model_version_id=version)
                for n, p in enumerate(prompts)
            ],
        )
        session.commit()
        assert collect_failures(session).cases_created == len(prompts)
        assert isinstance(cold_start_router(session), RuleRouter)
        report = attribute_open_cases(session, gather=_stored_evidence, classifier=RuleRouter())
        assert report.cases == len(prompts)
        assert sum(report.routed.values()) == report.by_rule == len(prompts)
        cases = session.scalars(select(FailureCase).order_by(FailureCase.id)).all()

        def decide(numbers: range, tracks: Sequence[Track] = tuple(Track)) -> None:
            """A person routes the cases of ``tracks`` numbered in ``numbers``, rightly."""
            for case in cases:
                track = _kind_of(case.prompt)
                if track in tracks and int(case.prompt.rsplit(" ", 1)[1]) in numbers:
                    override_route(session, case_id=case.id, track=track, reviewer="alice")

        decide(range(per_track - 1))
        router = cold_start_router(session)
        assert isinstance(router, RuleRouter)
        assert router.human_decisions == dict.fromkeys((t.value for t in Track), per_track - 1)
        assert router.examples == {}
        # Two tracks with enough are not enough: every track needs its share.
        decide(range(per_track - 1, per_track), [Track.RL, Track.PRETRAINING_GAP])
        assert isinstance(cold_start_router(session), RuleRouter)
        decide(range(per_track - 1, per_track), [Track.PROMPT_ENHANCER])
        assert len(override_examples(session)) == 3 * per_track
        classifier = cold_start_router(session, RuleRouterConfig(min_confidence=0.5))
        assert isinstance(classifier, TrackClassifier)
        assert classifier.examples == dict.fromkeys((t.value for t in Track), per_track)
        assert classifier.config.min_confidence == 0.5
        fresh = [evidence(**KINDS[t]) for t in Track]
        assert [d.track for d in classifier.decide(fresh)] == list(Track)
        # A higher bar keeps the rules.
        assert isinstance(
            cold_start_router(session, RuleRouterConfig(min_human_per_track=9)), RuleRouter
        )


# ---- a team's stack --------------------------------------------------------------------------

COMMON = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.1, 0.1, 0.9)}
SHAPES = ("circle", "square", "star", "triangle")
SIZES = ("", "small", "large", "tiny", "big", "little", "huge", "bright")


def _corpus(directory: Path) -> None:
    """A dataset directory of terse captions (a size, a colour, a shape): the common colours
    eight times in every shape (32 train items each), purple once in train and four times in
    the pool, teal only in the pool; polka dots (a two-word value) on a few."""
    directory.mkdir()
    items = []
    sized = [(size, shape) for shape in SHAPES for size in SIZES]
    palette = [(c, size, shape, "train") for c in COMMON for size, shape in sized]
    palette += [("purple", "small", "circle", "train")]
    palette += [("purple", size, shape, "pool") for size, shape in sized[::8]]
    palette += [("teal", "small", "star", "pool")]
    for n, (colour, size, shape, split) in enumerate(palette):
        rgb = COMMON.get(colour, (0.5, 0.1, 0.6))
        name = f"{n:03d}.png"
        Image.new("RGB", (8, 8), tuple(int(v * 255) for v in rgb)).save(directory / name)
        tags = [f"colour:{colour}", f"shape:{shape}"]
        dotted = n % 6 == 0
        if dotted:
            tags.append("texture:polka_dot")
        caption = " ".join(w for w in (size, colour, shape) if w)
        items.append(
            CorpusItem(
                id=f"item-{n}",
                image=name,
                rich_caption=caption + (" with polka dots" if dotted else ""),
                raw_caption=f"{colour} {shape}",
                tags=tags,
                split=split,
            )
        )
    write_records(directory, items)


class Stack:
    """A team's stack, built as its project file would build it, with its corpus indexed."""

    def __init__(
        self, parts: Parts, probe: ScarcityProbe, rarity: Rarity, judge: ColourJudgeService
    ):
        self.parts = parts
        self.probe = probe
        self.rarity = rarity
        self.judge = judge

    def gather(self, views: Sequence[CaseView], seed: int = 0) -> list[Evidence]:
        return gather_stack_evidence(
            views, self.parts, scarcity=self.probe, rarity=self.rarity, seed=seed
        )


@pytest.fixture(scope="module")
def stack(offline: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("team")
    _corpus(root / "corpus")
    service = ColourJudgeService()
    thread = threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    world = PartSection(adapter=WORLD)
    project = Project(
        generator=world,
        judge=PartSection(adapter="http", url=service.url("/judge"), retries=0),
        suites=world,
        reward=world,
        enhancer=world,
        corpus=PartSection(adapter="directory", path=str(root / "corpus"), name="team"),
        degrader=world,
        launcher=PartSection(adapter=WORLD_LAUNCHER),
    )
    parts = build_parts(project, AdapterContext(root=root, home=root / "home"))
    client, qdrant = QdrantClient(location=":memory:"), QdrantConfig()
    probe = corpus_scarcity(parts, client, qdrant, TextEmbedder())
    rarity = tag_rarity(client, collection_name(qdrant, "prompts"))
    yield Stack(parts, probe, rarity, service)
    service.shutdown()
    service.server_close()
    thread.join(5)
    assert service.state.errors == []


def test_tag_rarity_reads_the_corpus_tags_named_in_a_prompt(stack: Stack) -> None:
    purple, teal, red, dots, nothing, plural = stack.rarity(
        [
            "a purple circle",
            "a teal star",
            "Two RED squares",
            "a green star with polka dots",
            "a picture",
            "stars",
        ]
    )
    # purple: 1 train item against the colours' median of 32; teal, only in the pool, is a
    # colour the corpus knows but never trained on.
    assert purple == pytest.approx(1 / 32)
    assert teal == 0.0
    assert red == pytest.approx(1.0)
    # polka dots: the only texture (its own median), and the rarest named is still green.
    assert dots == pytest.approx(1.0)
    assert nothing is None
    assert plural == pytest.approx(1.0)  # shape:star, named in the plural


def test_evidence_on_a_teams_stack_is_computed_through_its_ports(stack: Stack) -> None:
    parts = stack.parts
    spec: dict[str, JsonValue] = {"elements": ["a red square"]}
    views = [
        CaseView(case_id=1, task=Task.TEXT_TO_IMAGE, prompt="a purple circle", negative_feedback=1),
        CaseView(case_id=2, task=Task.TEXT_TO_IMAGE, prompt="a red square", spec=spec),
        CaseView(
            case_id=3, task=Task.TEXT_TO_IMAGE, prompt="two blue stars", flags=("wrong_count",)
        ),
        # What the user typed, and what the app's enhancer served the model instead.
        CaseView(
            case_id=4,
            task=Task.TEXT_TO_IMAGE,
            prompt="a crimson triangle",
            served_prompt="a green triangle",
        ),
        CaseView(case_id=5, task=Task.IMAGE_EDITING, prompt="make the circle green"),
    ]
    served = [v.served_prompt or v.prompt for v in views[:4]]
    found = stack.gather(views, seed=3)
    assert len(found) == len(views)
    drawn, editing = found[:4], found[4]
    # The rewrite test, re-done through the ports: the enhancer's rewrite of what was typed,
    # the generator's images of it and of what the model was given (the failure as served)
    # with one seed, the judge's verdicts against what was asked.
    rewritten = parts.enhancer.enhance([v.prompt for v in views[:4]])
    assert [e.rewritten_prompt for e in drawn] == rewritten
    assert rewritten[3] != served[3]  # the enhancer reads crimson otherwise than the app did
    images = parts.generator.generate(served, seed=3)
    verdicts = parts.judge.judge(
        [
            JudgeRequest(prompt=v.prompt, image=image, spec=v.spec)
            for v, image in zip(views[:4], images, strict=True)
        ]
    )
    assert [e.score_original for e in drawn] == pytest.approx([v.score for v in verdicts])
    ranks = reward_ranks(parts.reward, images, rewritten)
    assert [e.reward_rank for e in drawn] == pytest.approx(ranks)
    # The port-generic rank is the model stack's rank matrix diagonal, for any reward.
    assert isinstance(parts.reward, LocalReward)
    assert ranks == pytest.approx(rank_matrix(parts.reward.model, images, rewritten).diagonal())
    assert reward_ranks(parts.reward, images[:1], rewritten[:1]) == [0.5]
    redrawn = parts.generator.generate(rewritten, seed=3)
    again = parts.judge.judge(
        [
            JudgeRequest(prompt=v.prompt, image=image, spec=v.spec)
            for v, image in zip(views[:4], redrawn, strict=True)
        ]
    )
    captions = {item.rich_caption for item in parts.corpus.items("train")}
    for e, given, verdict in zip(drawn, served, again, strict=True):
        assert e.scored_by == "judge"
        assert 0.0 <= e.reward_rank <= 1.0
        assert e.rewrite_changed == (e.rewritten_prompt != given)
        if e.rewrite_changed:
            assert e.score_rewritten == pytest.approx(verdict.score)
            assert e.rewrite_gain == pytest.approx(e.score_rewritten - e.score_original)
            assert e.rewrite_fixed == verdict.passed
        else:
            assert (e.score_rewritten, e.rewrite_gain, e.rewrite_fixed) == (
                e.score_original,
                0.0,
                False,
            )
        assert e.scarcity is not None
        assert 0.0 <= e.scarcity <= 1.0
        assert e.nearest_corpus
        assert set(e.nearest_corpus) <= captions
    # The spec went to the judge with its case; the others were judged on the prompt alone.
    items = [item for _, body in stack.judge.state.bodies for item in body["items"]]
    assert {item["prompt"] for item in items if item["spec"] == spec} == {"a red square"}
    # The corpus, asked about the rewritten prompts: purple is rare by its tags.
    assert [e.concept_rarity for e in drawn] == stack.rarity([e.rewritten_prompt for e in drawn])
    assert "purple" in drawn[0].rewritten_prompt
    assert drawn[0].concept_rarity == pytest.approx(1 / 32)
    # Editing: nothing drawn, the rewrite test skipped, the instruction kept.
    assert editing.editing
    assert editing.scored_by == "none"
    assert (editing.rewritten_prompt, editing.rewrite_changed) == (views[4].prompt, False)
    assert editing.reward_rank == 0.5


def _complaint(number: int, prompt: str, version: int, **fields: Any) -> NewSignal:
    return stored_signal(
        f"team-{number}", prompt, thumbs_up=False, model_version_id=version, **fields
    )


def test_the_rules_route_a_teams_stored_cases_and_send_the_unsure_to_triage(
    fresh_engine: Engine, stack: Stack
) -> None:
    prompts = [
        "a purple circle",
        "a purple square",
        "a red star",
        "a small red star",
        "a red circle",
        "a large red circle",
        "a blue square",
        "a photo",
    ]
    spec = {"elements": ["a red star"]}
    world_form = {"case": {"prompt": "a photo"}}
    with session_factory(fresh_engine)() as session:
        version = model_version_id(session, name="team-v1")
        rows = [_complaint(n, p, version) for n, p in enumerate(prompts)]
        rows[2] = _complaint(2, prompts[2], version, details={"spec": spec})
        rows[7] = _complaint(7, prompts[7], version, details={"spec": world_form})
        insert_signals(session, signals=rows)
        session.commit()
        collect_failures(session)
        cases = session.scalars(select(FailureCase).order_by(FailureCase.id)).all()
        views = {v.prompt: v for v in case_views(session, cases)}
        assert views["a red star"].spec == spec
        assert views["a photo"].spec is None  # the world's form is a scene, not a spec
        report = attribute_open_cases(
            session, gather=stack.gather, classifier=RuleRouter(), batch_size=16
        )
        assert report.cases == len(cases) == len(prompts)
        routes = session.scalars(select(CaseRoute)).all()
        assert len(routes) == len(cases)
        statuses = {c.id: c.status for c in session.scalars(select(FailureCase))}
        prompt_of = {c.id: c.prompt for c in cases}
        items = session.scalars(select(ReviewItem)).all()
        assert {i.kind for i in items} == {ReviewKind.TRIAGE_CASE}
        triaged = {i.case_id for i in items}
        assert report.awaiting_triage == len(triaged) == len(items) > 0
        assert sum(report.routed.values()) == report.by_rule == len(cases) - len(items) > 0
        for route in routes:
            assert (route.decided_by, route.decider_ref) == (Decider.MODEL, COLD_START_REF)
            assert route.reason in (REWRITE, SCARCE, REWARD)
            assert route.evidence["rule"] == route.reason
            assert Evidence.model_validate(route.evidence["features"]).scored_by == "judge"
            routed = route.confidence >= 0.6
            assert statuses[route.case_id] == (
                CaseStatus.ROUTED if routed else CaseStatus.AWAITING_TRIAGE
            )
            assert (route.case_id in triaged) != routed
        purple = [r for r in routes if "purple" in prompt_of[r.case_id]]
        assert {(r.track, r.reason) for r in purple} == {(Track.PRETRAINING_GAP, SCARCE)}
        assert all(r.confidence >= 0.6 for r in purple)
