"""Review before training: a cycle's artefacts are decided before the rounds that use them.

On the team stack of the acid test (:mod:`tests.team_stack`; ``flywheel.world``
unimportable, as in :mod:`tests.test_stack_faults`), with a reviewer's routes to the
pretraining-gap and prompt-enhancer tracks: the first ``flywheel cycle`` stops at
``artefact-review`` with no round started; an edit the artefact does not take is refused
naming it; the enhancer pairs are rejected (their round is skipped, its cases routed again)
and the augmentation batch is approved with a retrieved item dropped, which the gap round
then does not train on. Around it, on rows written directly and on files of the tracks'
formats: the demo reviewer's approvals, every round rejected, and each track's edits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from flywheel.attribution.service import override_route
from flywheel.cases.service import collect_failures
from flywheel.cli.main import app
from flywheel.cycle.config import CycleConfig
from flywheel.cycle.flow import WAITING_FOR_REVIEW, CycleOutcome
from flywheel.cycle.registry import current_model
from flywheel.cycle.runner import run_cycle
from flywheel.cycle.stack_steps import MANIFEST_FILE, edited_data
from flywheel.cycle.steps import (
    ARTEFACT_REVIEW,
    AUTO_REVIEWER,
    add_round,
    close_without_rounds,
    cycle_dir,
    edit_round_data,
    review_artefacts,
)
from flywheel.db.engine import create_db_engine
from flywheel.db.models import (
    CaseStatus,
    Cycle,
    CycleStatus,
    FailureCase,
    ReviewItem,
    ReviewKind,
    ReviewStatus,
    RoundStatus,
    Track,
    TrainingRound,
)
from flywheel.ports import RewardAgreement, RoundManifest
from flywheel.review.edits import ArtefactEdits, EditVocabulary, check_edits
from flywheel.review.errors import EditError
from flywheel.review.service import approve, reject
from flywheel.settings import get_settings
from flywheel.tracks.edits import (
    edit_enhancer_pairs,
    edit_reward_data,
    enhancer_vocabulary,
    reward_vocabulary,
)
from flywheel.tracks.enhancer_data import EnhancerPair, EnhancerPairsArtefact
from flywheel.tracks.reward_data import RewardArtefact
from tests.team_stack import GENERATOR_DIR, TRAINER, JudgeServer, build_team_stack
from tests.test_own_stack import PROMPTS, post_feedback
from tests.test_own_stack import flywheel as flywheel_cli
from tests.test_stack_faults import COUNTING_TRAINER, LAUNCHES, world_forbidden
from training.data import read_dataset

CONFIG = {
    "min_cases": 2,
    "pretraining_gap": {"steps": 1, "replay": 8},
    "prompt_enhancer": {"steps": 3},
    "regression": {"seeds": 1},
}
"""Two small rounds: a gap round of one step and an enhancer round of three."""
TRACKS = (Track.PRETRAINING_GAP, Track.PROMPT_ENHANCER)


@dataclass(frozen=True, slots=True)
class Team:
    root: Path
    env: dict[str, str]
    engine: Engine
    home: Path


@pytest.fixture
def team(
    offline: None,
    tmp_path: Path,
    migrated_url: str,
    prefect_api: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Team]:
    """The team's stack (its trainer's launches counted), its model registered, a thumbs
    down on each gap and enhancer prompt, each case routed to its track by a reviewer."""
    with JudgeServer() as judge:
        project = build_team_stack(tmp_path / "team", judge_url=judge.url)
        root = project.parent
        counting = root / "counting_trainer.py"
        counting.write_text(COUNTING_TRAINER % (LAUNCHES, TRAINER))
        trainer = str((root / TRAINER).resolve())
        project.write_text(project.read_text().replace(trainer, str(counting.resolve())))
        home = tmp_path / "home"
        env = {
            "FLYWHEEL_DATABASE_URL": migrated_url,
            "FLYWHEEL_HOME": str(home),
            "FLYWHEEL_PROJECT": str(project),
            "FLYWHEEL_RATE_LIMIT": "off",
            "PREFECT_API_URL": prefect_api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HF_HUB_OFFLINE": "1",
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        settings = get_settings()
        registered = CliRunner().invoke(
            app, ["models", "register", "team-v1", "--generator", str(root / GENERATOR_DIR)]
        )
        assert registered.exit_code == 0, registered.output
        asked = {t: PROMPTS[t] for t in TRACKS}
        post_feedback(root, settings, asked)
        engine = create_db_engine(settings, pool_size=2)
        intended = {p: t for t, prompts in asked.items() for p in prompts}
        with Session(engine) as session:
            collect_failures(session)
            session.commit()
            for case in session.scalars(select(FailureCase)).all():
                override_route(
                    session, case_id=case.id, track=intended[case.prompt], reviewer="alice"
                )
        try:
            yield Team(root=root, env=env, engine=engine, home=home)
        finally:
            engine.dispose()
            get_settings.cache_clear()
        assert judge.errors == []


def _run(team: Team) -> CycleOutcome:
    with world_forbidden():
        outcome = run_cycle(CycleConfig.model_validate(CONFIG))
    assert isinstance(outcome, CycleOutcome)
    return outcome


def _launches(track_dir: Path) -> int:
    log = track_dir / LAUNCHES
    return len(log.read_text().splitlines()) if log.is_file() else 0


def test_a_rejected_artefacts_round_does_not_run_and_an_edited_artefacts_edits_reach_its_round(
    team: Team,
) -> None:
    # The first run builds both artefacts and stops before any round: nothing is decided.
    config = team.home / "cycle.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(CONFIG))
    first = flywheel_cli(team.env, "cycle", "--config", str(config))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "waits for review" in first.stdout, first.stdout
    with Session(team.engine) as session:
        (cycle,) = session.scalars(select(Cycle)).all()
        cycle_id = cycle.id
        assert cycle.status == CycleStatus.RUNNING
        note = (cycle.summary or {})["paused"]
        assert note["step"] == ARTEFACT_REVIEW
        rounds = {r.track: r for r in session.scalars(select(TrainingRound))}
        assert set(rounds) == set(TRACKS)
        assert all(
            r.status == RoundStatus.PENDING and r.started_at is None for r in rounds.values()
        )
        items = {
            i.training_round_id: i
            for i in session.scalars(select(ReviewItem).where(ReviewItem.cycle_id == cycle_id))
        }
        gap_item = items[rounds[Track.PRETRAINING_GAP].id]
        enhancer_item = items[rounds[Track.PROMPT_ENHANCER].id]
        assert sorted(note["review_items"]) == sorted([gap_item.id, enhancer_item.id])
        assert {i.status for i in items.values()} == {ReviewStatus.PENDING}
        assert {c.status for c in session.scalars(select(FailureCase))} == {CaseStatus.IN_ROUND}
        gap_artefact = dict(gap_item.artefact or {})
        enhancer_round_id = rounds[Track.PROMPT_ENHANCER].id
    for item in (gap_item, enhancer_item):
        assert f"review item {item.id}: {item.kind.value}" in first.stdout
    for track in TRACKS:
        directory = cycle_dir(team.home, cycle_id) / track.value
        assert not (directory / MANIFEST_FILE).exists()
        assert _launches(directory) == 0
    status = CliRunner().invoke(app, ["status", "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["cycles"][0]["status"] == WAITING_FOR_REVIEW

    # An edit the artefact does not take is refused at once, naming it (exit 2, one line).
    runner = CliRunner()
    for edits, needle in [
        ('{"shuffle": true}', "edits: unknown key 'shuffle' — augmentation_batch takes drop"),
        ('{"drop": ["no-such-item"]}', "edits.drop: 'no-such-item' names none of the"),
        ('{"weights": {"count": 0.0}}', "unknown key 'weights'"),
    ]:
        refused = runner.invoke(
            app,
            [
                "review",
                "approve",
                str(gap_item.id),
                "--by",
                "bob",
                "--reason",
                "x",
                "--edits",
                edits,
            ],
        )
        assert refused.exit_code == 2, refused.output
        assert needle in refused.output
        assert len(refused.output.strip().splitlines()) == 1, refused.output

    # Reject the enhancer pairs; approve the batch without one of its retrieved pool items.
    retrieved = [r["item"] for r in gap_artefact["retrieved"] if r["dropped_by"] is None]
    assert retrieved, gap_artefact["retrieved"]
    dropped = retrieved[0]
    reviewed_dataset = Path(gap_artefact["dataset_dir"])
    reviewed_ids = [s.id for s in read_dataset(reviewed_dataset, check_images=False)]
    assert f"retrieved/{dropped}" in reviewed_ids
    with Session(team.engine) as session:
        reject(session, item_id=enhancer_item.id, reviewer="bob", reason="echoes only")
        approve(
            session,
            item_id=gap_item.id,
            reviewer="carol",
            reason="a near-copy of a train image",
            edits={"drop": [dropped]},
        )

    resumed = _run(team)

    assert (resumed.cycle_id, resumed.resumed) == (cycle_id, True)
    assert resumed.status in (CycleStatus.REJECTED.value, CycleStatus.AWAITING_REVIEW.value)
    assert "paused" not in resumed.summary
    assert set(resumed.summary["evaluation"]["tracks"]) == {Track.PRETRAINING_GAP.value}
    artefacts = resumed.summary["artefacts"]
    assert artefacts[Track.PROMPT_ENHANCER.value]["decision"] == "rejected"
    assert artefacts[Track.PRETRAINING_GAP.value]["edits"] == {"drop": [dropped]}
    enhancer_dir = cycle_dir(team.home, cycle_id) / Track.PROMPT_ENHANCER.value
    gap_dir = cycle_dir(team.home, cycle_id) / Track.PRETRAINING_GAP.value
    with Session(team.engine) as session:
        rounds = {r.track: r for r in session.scalars(select(TrainingRound))}
        # The rejected artefact's round never ran; its cases wait for the next cycle.
        skipped = rounds[Track.PROMPT_ENHANCER]
        assert skipped.status == RoundStatus.SKIPPED
        assert skipped.started_at is None
        assert (skipped.metrics or {})["skipped"]["by"] == "bob"
        assert not (enhancer_dir / MANIFEST_FILE).exists()
        assert not (enhancer_dir / "candidate").exists()
        assert _launches(enhancer_dir) == 0
        cases = {c.prompt: c.status for c in session.scalars(select(FailureCase))}
        for prompt in PROMPTS[Track.PROMPT_ENHANCER]:
            assert cases[prompt] == CaseStatus.ROUTED
        # The approved one ran once, on the edited dataset: the dropped item is not in it.
        gap = rounds[Track.PRETRAINING_GAP]
        assert gap.status == RoundStatus.SUCCEEDED
        assert _launches(gap_dir) == 1
        data = gap.data_manifest or {}
        assert data["edits"]["applied"] == {"drop": [dropped]}
        assert (data["edits"]["by"], data["edits"]["item"]) == ("carol", gap_item.id)
        assert data["edits"]["reviewed_files"] == {"dataset": str(reviewed_dataset)}
        manifest = RoundManifest.model_validate_json((gap_dir / MANIFEST_FILE).read_text())
        trained_on = Path(manifest.artefacts["dataset"])
        assert trained_on == reviewed_dataset.with_name("dataset.edited")
        trained_ids = [s.id for s in read_dataset(trained_on)]
        assert trained_ids == [i for i in reviewed_ids if i != f"retrieved/{dropped}"]
        assert data["artefact"]["samples"] == len(trained_ids)
        # The reviewed files are as the reviewer saw them.
        assert [s.id for s in read_dataset(reviewed_dataset)] == reviewed_ids
        # Applying the edits again changes nothing (once per round).
        edit_round_data(session, gap.id, edited_data)
        session.refresh(gap)
        assert gap.data_manifest == data
        assert skipped.id == enhancer_round_id


def _pending_round(
    session: Session, *, auto_approve: bool, track: Track = Track.PROMPT_ENHANCER
) -> tuple[Cycle, TrainingRound, int, FailureCase]:
    """A running cycle with one pending round of one case and its artefact's review item,
    written directly."""
    base = current_model(session)
    cycle = Cycle(
        status=CycleStatus.RUNNING,
        base_model_version_id=base.version_id if base is not None else None,
        config=CycleConfig(auto_approve=auto_approve).model_dump(mode="json"),
        summary={},
    )
    session.add(cycle)
    session.flush()
    case = FailureCase(
        dedup_key=f"review-{cycle.id}",
        status=CaseStatus.ROUTED,
        task="text_to_image",
        prompt="a crimson square",
    )
    session.add(case)
    session.flush()
    round_ = TrainingRound(
        cycle_id=cycle.id, track=track, recipe="pe_sft", status=RoundStatus.PENDING, config={}
    )
    item_id = add_round(
        session,
        cycle,
        round_=round_,
        cases=[case],
        kind=ReviewKind.PROMPT_ENHANCER_DATA,
        title="pairs",
        artefact={"pairs": 2},
        editable=EditVocabulary(),
    )
    session.commit()
    return cycle, round_, item_id, case


def test_the_demo_reviewer_approves_artefacts_and_rejecting_every_one_leaves_nothing_to_train(
    fresh_engine: Engine,
) -> None:
    with Session(fresh_engine) as session:
        cycle, round_, item_id, case = _pending_round(session, auto_approve=True)
        assert case.status == CaseStatus.IN_ROUND
        review = review_artefacts(session, cycle)
        assert [w.item for w in review.auto_approved] == [item_id]
        assert review.rounds == [(Track.PROMPT_ENHANCER.value, round_.id)]
        assert review.waiting == []
        item = session.get(ReviewItem, item_id)
        assert item is not None
        assert (item.status, item.decided_by) == (ReviewStatus.APPROVED, AUTO_REVIEWER)
        again = review_artefacts(session, cycle)  # decided once: nothing approved twice
        assert again.auto_approved == []

        cycle, round_, item_id, case = _pending_round(session, auto_approve=False)
        waiting = review_artefacts(session, cycle)
        assert [w.item for w in waiting.waiting] == [item_id]
        assert waiting.rounds == []
        reject(session, item_id=item_id, reviewer="dana", reason="not worth a round")
        review = review_artefacts(session, cycle)
        assert (review.rounds, review.waiting) == ([], [])
        assert review.skipped == {Track.PROMPT_ENHANCER.value: round_.id}
        session.refresh(round_)
        session.refresh(case)
        assert round_.status == RoundStatus.SKIPPED
        assert case.status == CaseStatus.ROUTED
        assert close_without_rounds(session, cycle) == CycleStatus.NO_ROUNDS


def _pairs_artefact(directory: Path) -> EnhancerPairsArtefact:
    pairs = [
        EnhancerPair(prompt="violet square", target="a purple square on a grey background"),
        EnhancerPair(prompt="a red circle", target="a red circle"),
        EnhancerPair(prompt="violet square", target="a purple square, top left"),
        EnhancerPair(prompt="crimson triangle", target="a red triangle in the middle"),
    ]
    pairs_file = directory / "pairs.jsonl"
    pairs_file.write_text("".join(p.model_dump_json() + "\n" for p in pairs))
    return EnhancerPairsArtefact(
        themes=["colour"],
        pairs=4,
        degraded=3,
        echo=1,
        held_out=0,
        examples=pairs,
        pairs_file=str(pairs_file),
        source_items=["train-1", "train-2", "train-3"],
        echo_items=["train-4"],
        cases=[1, 2],
    )


def _reward_artefact(directory: Path) -> RewardArtefact:
    lines = [
        {"prompt": "a red circle", "chosen": "a.png", "rejected": "b.png", "source": "pairwise",
         "category": "colour", "case_id": 1},
        {"prompt": "two squares", "chosen": "c.png", "rejected": "d.png", "source": "thumbs",
         "category": "count", "case_id": 2},
        {"prompt": "three squares", "chosen": "e.png", "rejected": "f.png", "source": "thumbs",
         "category": "count", "case_id": 3},
    ]  # fmt: skip
    preferences = directory / "preferences.jsonl"
    preferences.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return RewardArtefact(
        preferences_file=str(preferences),
        pairs=3,
        by_source={"pairwise": 1, "thumbs": 2},
        comparisons={"colour": 1, "count": 2},
        agreement=RewardAgreement(agreement={"count": 0.5}, comparisons={"count": 2}),
        weights={"count": 0.0},
        unreadable=0,
        unreadable_images=[],
        dropped=0,
        cases=[1, 2, 3],
    )


def test_each_tracks_edits_are_checked_against_its_artefact_and_written_next_to_it(
    tmp_path: Path,
) -> None:
    # Enhancer pairs: by index or by prompt (every pair with it); dropping all is refused.
    pairs = _pairs_artefact(tmp_path)
    reviewed = Path(pairs.pairs_file).read_bytes()
    vocabulary = enhancer_vocabulary(pairs)
    edits = check_edits({"drop": [1, "violet square"]}, vocabulary, kind="prompt_enhancer_data")
    edited = edit_enhancer_pairs(pairs, edits)
    assert Path(edited.pairs_file) == tmp_path / "pairs.edited.jsonl"
    kept = [json.loads(line) for line in Path(edited.pairs_file).read_text().splitlines()]
    assert kept == [{"prompt": "crimson triangle", "target": "a red triangle in the middle"}]
    assert (edited.pairs, edited.degraded, edited.echo) == (1, 1, 0)
    assert Path(pairs.pairs_file).read_bytes() == reviewed
    assert json.loads((tmp_path / "artefact.edited.json").read_text())["pairs"] == 1
    for bad, needle in [
        ({"drop": [4]}, "index 4 is not one of the 4 prompt-enhancer pairs"),
        ({"drop": [0, 1, 2, 3]}, "leaving nothing to train on"),
        ({"drop": []}, "edits.drop: a non-empty list"),
        ({"weights": {"colour": 1.0}}, "unknown key 'weights'"),
    ]:
        with pytest.raises(EditError, match=needle):
            check_edits(bad, vocabulary, kind="prompt_enhancer_data")

    # Preference pairs by index, and the reward's weight per category in [0, 1].
    reward = _reward_artefact(tmp_path)
    vocabulary = reward_vocabulary(reward)
    assert vocabulary.weights == ["colour", "count"]
    edits = check_edits(
        {"drop": [0], "weights": {"count": 0.25}}, vocabulary, kind="reward_recalibration"
    )
    edited_reward = edit_reward_data(reward, edits)
    lines = Path(edited_reward.preferences_file).read_text().splitlines()
    assert [json.loads(line)["case_id"] for line in lines] == [2, 3]
    assert edited_reward.weights == {"count": 0.25}
    assert (edited_reward.pairs, edited_reward.comparisons) == (2, {"count": 2})
    assert edited_reward.cases == [2, 3]
    for bad, key in [
        ({"weights": {"count": 1.5}}, "weights.count"),
        ({"weights": {"style": 0.5}}, "weights.style"),
        ({"weights": {"count": True}}, "weights.count"),
    ]:
        with pytest.raises(EditError) as refused:
            check_edits(bad, vocabulary, kind="reward_recalibration")
        assert refused.value.key == key
    assert ArtefactEdits.model_validate(edits.model_dump()) == edits


def test_the_worlds_edits_drop_pairs_retrieved_scenes_and_prompts_with_their_preferences(
    tmp_path: Path,
) -> None:
    from flywheel.world.loop.edits import apply_edits, edit_vocabulary
    from training.pe_sft import read_pairs, write_pairs

    # The enhancer pairs: a new file next to the reviewed one; the counts follow.
    pairs = [("crimson square", "a red square"), ("a red square", "a red square")]
    pairs += [("navy circle", "a blue circle"), ("crimson square", "a red square, left")]
    reviewed = write_pairs(tmp_path / "pairs.jsonl", pairs)
    enhancer = {"concepts": ["red", "blue"], "pairs": 4, "pairs_file": str(reviewed)}
    vocabulary = edit_vocabulary(Track.PROMPT_ENHANCER, enhancer)
    edits = check_edits({"drop": ["crimson square"]}, vocabulary, kind="prompt_enhancer_data")
    edited = apply_edits(Track.PROMPT_ENHANCER, enhancer, edits)
    assert Path(edited["pairs_file"]) == tmp_path / "pairs.edited.jsonl"
    assert read_pairs(Path(edited["pairs_file"])) == [pairs[1], pairs[2]]
    assert (edited["pairs"], edited["user_worded"], edited["echo"]) == (2, 1, 1)
    assert read_pairs(reviewed) == pairs

    # The augmentation plan: retrieved scenes by key; replayed and synthesized ones stay.
    plan = {
        "concepts": ["purple"],
        "replay": 30,
        "retrieved": [{"key": "pool/17", "text": "a"}, {"key": "pool/23", "text": "b"}],
        "synthesized": {"purple": 5},
        "mixture_weight": 0.4,
    }
    gap = {"diagnosis": {}, "plan": plan}
    vocabulary = edit_vocabulary(Track.PRETRAINING_GAP, gap)
    assert vocabulary.drop is not None
    assert vocabulary.drop.kept_anyway == 35
    edits = check_edits({"drop": ["pool/17"]}, vocabulary, kind="augmentation_batch")
    edited = apply_edits(Track.PRETRAINING_GAP, gap, edits)
    assert [c["key"] for c in edited["plan"]["retrieved"]] == ["pool/23"]
    assert gap["plan"]["retrieved"] == plan["retrieved"]  # the reviewed plan is kept
    with pytest.raises(EditError, match="'pool/99' names none of the 2 retrieved pool scenes"):
        check_edits({"drop": ["pool/99"]}, vocabulary, kind="augmentation_batch")

    # The RL round: its prompts by index or text; the preference pairs under a dropped prompt
    # go with it (to a new file next to the reviewed one), and the counts follow.
    from flywheel.tracks.reward_data import PreferencePair
    from flywheel.world.loop.rl import PreferenceArtefact, read_preferences, write_preferences

    preference = [
        PreferencePair(
            prompt=prompt,
            chosen=f"file:///a/{k}.png",
            rejected=f"file:///b/{k}.png",
            source=source,
            category="wrong_color",
            case_id=k,
        )
        for k, (prompt, source) in enumerate(
            [
                ("three red squares", "pairwise"),
                ("two blue circles", "pairwise"),
                ("two blue circles", "thumbs"),
            ]
        )
    ]
    file = write_preferences(tmp_path / "preferences.jsonl", preference)
    artefact = PreferenceArtefact(
        preferences_file=str(file),
        pairs=3,
        by_source={"pairwise": 2, "thumbs": 1},
        categories={"wrong_color": 3},
        agreement={"pairwise": 0.5, "thumbs": 0.0},
    )
    rl = {
        "prompts": ["three red squares", "two blue circles"],
        "preferences": artefact.model_dump(mode="json"),
    }
    vocabulary = edit_vocabulary(Track.RL, rl)
    assert vocabulary.keys() == ["drop"]
    edits = check_edits({"drop": ["two blue circles"]}, vocabulary, kind="reward_recalibration")
    edited = apply_edits(Track.RL, rl, edits)
    assert edited["prompts"] == ["three red squares"]
    kept = PreferenceArtefact.model_validate(edited["preferences"])
    assert Path(kept.preferences_file) == tmp_path / "preferences.edited.jsonl"
    assert read_preferences(Path(kept.preferences_file)) == preference[:1]
    assert (kept.pairs, kept.by_source, kept.categories) == (1, {"pairwise": 1}, {"wrong_color": 1})
    assert read_preferences(file) == preference  # the reviewed pairs are kept
    with pytest.raises(EditError, match="unknown key 'weights'"):
        check_edits({"weights": {"count": 0.0}}, vocabulary, kind="reward_recalibration")
    with pytest.raises(EditError, match="leaving nothing to train on"):
        check_edits({"drop": [0, 1]}, vocabulary, kind="reward_recalibration")
