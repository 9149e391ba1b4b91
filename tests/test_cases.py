"""Signals -> failure cases against a real PostgreSQL (a fresh migrated database per test):
the per-source rules (SQL and Python agree), deduplication, image merges, links, reruns and
two collectors at once."""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import pytest
from qdrant_client import QdrantClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from flywheel.cases.near import CasePrompts
from flywheel.cases.repository import case_signal_ids
from flywheel.cases.rules import FailureRules, failure_condition, failure_reason
from flywheel.cases.service import (
    CollectReport,
    collect_failures,
    dedup_key,
    normalized_prompt,
    signal_skill,
)
from flywheel.cases.themes import (
    PROMPT_THEME,
    ThemeConfig,
    assign_themes,
    distinctive_words,
    evaluation_theme,
)
from flywheel.db.engine import session_factory
from flywheel.db.models import (
    CaseStatus,
    FailureCase,
    FailureCluster,
    Signal,
    SignalKind,
    SignalSource,
    Task,
)
from flywheel.signals.repository import NewSignal, insert_signals, model_version_id
from retrieval.embedding import TextEmbedder
from retrieval.store import QdrantConfig


def _signal(
    number: int, source: SignalSource, kind: SignalKind, prompt: str, **fields: Any
) -> NewSignal:
    payload = json.dumps({"n": number, "prompt": prompt}, sort_keys=True)
    return NewSignal(
        source=source,
        kind=kind,
        app="tests",
        event_id=f"event-{number}",
        task=Task.TEXT_TO_IMAGE,
        prompt=prompt,
        payload_json=payload,
        payload_sha256=hashlib.sha256(payload.encode()).hexdigest(),
        **fields,
    )


EVAL, FEEDBACK, MINING = SignalSource.EVALUATION, SignalSource.FEEDBACK, SignalSource.MINING
RED = "A picture with a white background showing a large red circle at the centre."


def _ingest(session: Session, rows: list[NewSignal], **options: Any) -> CollectReport:
    """Store ``rows``, then collect failures from them."""
    insert_signals(session, signals=rows)
    session.commit()
    return collect_failures(session, **options)


def _seed(session: Session) -> dict[str, int]:
    base = model_version_id(session, name="base")
    other = model_version_id(session, name="candidate")
    sample = SignalKind.EVALUATION_SAMPLE
    rows = [
        # Two evaluation failures of one prompt (spacing / case / full stop differ): one case.
        _signal(1, EVAL, sample, RED, passed=False, scores={"colour": 0.0, "overall": 0.0},
                model_version_id=base, image_sha256="a" * 64),
        _signal(2, EVAL, sample, RED.upper().rstrip(".") + "  ", passed=True,
                scores={"colour": 0.3, "overall": 0.3}, model_version_id=base),
        _signal(3, EVAL, sample, RED, passed=False, scores={"colour": 0.0, "overall": 0.0},
                model_version_id=other),  # another model version: another case
        _signal(4, EVAL, sample, "a blue square", passed=True,
                scores={"shape": 0.9, "overall": 0.9}, model_version_id=base),  # not a failure
        _signal(5, FEEDBACK, SignalKind.THUMBS, "a cat", thumbs_up=False, model_version_id=base),
        _signal(6, FEEDBACK, SignalKind.THUMBS, "a dog", thumbs_up=True, model_version_id=base),
        _signal(7, FEEDBACK, SignalKind.RATING, "a dog", rating=4, model_version_id=base),
        _signal(8, FEEDBACK, SignalKind.RATING, "a fox", rating=1, model_version_id=base),
        _signal(9, FEEDBACK, SignalKind.FLAGS, "a bird", flags=["artifact"], model_version_id=base),
        _signal(10, FEEDBACK, SignalKind.PAIRWISE, "a cow", model_version_id=base,
                chosen_image_uri="s3://a.png", rejected_image_uri="s3://b.png"),
        _signal(11, FEEDBACK, SignalKind.COMMENT, "a cow", comment="meh", model_version_id=base),
        _signal(12, MINING, SignalKind.MINING_HIT, "a red star", model_version_id=base),
        # Another prompt, the same image as signal 1: merged into its open case.
        _signal(13, FEEDBACK, SignalKind.THUMBS, "red circle", thumbs_up=False,
                model_version_id=base, image_sha256="a" * 64),
    ]  # fmt: skip
    stored = insert_signals(session, signals=rows)
    session.commit()
    return {row.event_id: row.id for row in stored}


def test_the_sql_and_python_rules_agree(fresh_engine: Engine) -> None:
    with session_factory(fresh_engine)() as session:
        ids = _seed(session)
        for rules in (FailureRules(), FailureRules(evaluation_threshold=0.2, rating_at_most=4)):
            by_sql = set(session.scalars(select(Signal.id).where(failure_condition(rules))))
            by_python = {
                s.id
                for s in session.scalars(select(Signal))
                if failure_reason(s, rules) is not None
            }
            assert by_sql == by_python
        default = set(session.scalars(select(Signal.id).where(failure_condition(FailureRules()))))
        failing = {1, 2, 3, 5, 8, 9, 12, 13}
        assert default == {ids[f"event-{n}"] for n in failing}
        with pytest.raises(ValueError, match="rating_at_most"):
            FailureRules(rating_at_most=0).validate()


def test_failures_become_cases_once(fresh_engine: Engine) -> None:
    with session_factory(fresh_engine)() as session:
        ids = _seed(session)
        report = collect_failures(session, batch_size=3)
        assert report.signals_linked == 8
        assert report.cases_created == 6  # red circle x2 versions, cat, fox, bird, red star
        assert report.merged_by_image == 1
        assert report.reasons == {"evaluation": 3, "feedback": 4, "mining hit": 1}
        cases = session.scalars(select(FailureCase).order_by(FailureCase.id)).all()
        assert all(c.status == CaseStatus.OPEN for c in cases)
        red = cases[0]
        assert red.skill == "colour"
        assert red.signal_count == 3
        linked = [ids["event-1"], ids["event-2"], ids["event-13"]]
        assert case_signal_ids(session, case_id=red.id) == linked
        assert sum(c.signal_count for c in cases) == 8

        again = collect_failures(session)
        assert (again.signals_linked, again.cases_created) == (0, 0)

        base = model_version_id(session, name="base")
        later = _signal(20, FEEDBACK, SignalKind.RATING, "A  cat!", rating=2, model_version_id=base)
        report = _ingest(session, [later])
        assert (report.signals_linked, report.cases_created) == (1, 0)
        session.expire_all()
        cat = session.scalar(
            select(FailureCase).where(
                FailureCase.dedup_key == dedup_key(Task.TEXT_TO_IMAGE, "a cat", base)
            )
        )
        assert cat is not None
        assert cat.signal_count == 2


def test_two_collectors_at_once_link_each_signal_once(fresh_engine: Engine) -> None:
    with session_factory(fresh_engine)() as session:
        _seed(session)
    reports = []

    def run() -> None:
        with session_factory(fresh_engine)() as session:
            reports.append(collect_failures(session, batch_size=2))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r.signals_linked for r in reports) == 8
    assert sum(r.cases_created for r in reports) == 6  # a case found, not made, is not counted
    assert sum(r.merged_by_image for r in reports) == 1
    with session_factory(fresh_engine)() as session:
        cases = session.scalars(select(FailureCase)).all()
        assert len(cases) == 6
        assert sum(c.signal_count for c in cases) == 8


def test_prompts_normalize() -> None:
    assert normalized_prompt("  A  Red\tCircle. ") == "a red circle"
    assert dedup_key(Task.TEXT_TO_IMAGE, "A red circle!", 1) == dedup_key(
        Task.TEXT_TO_IMAGE, "a red circle", 1
    )
    assert dedup_key(Task.TEXT_TO_IMAGE, "a red circle", 1) != dedup_key(
        Task.IMAGE_EDITING, "a red circle", 1
    )


def test_near_duplicate_prompts_join_one_case(fresh_engine: Engine, offline: None) -> None:
    prompts = CasePrompts(
        client=QdrantClient(location=":memory:"),
        config=QdrantConfig(),
        embedder=TextEmbedder(),
    )
    thumbs = SignalKind.THUMBS
    with session_factory(fresh_engine)() as session:
        base = model_version_id(session, name="base")
        other = model_version_id(session, name="candidate")
        rows = [
            _signal(1, FEEDBACK, thumbs, RED, thumbs_up=False, model_version_id=base),
            _signal(2, FEEDBACK, thumbs, RED.replace("at the", "in the"), thumbs_up=False,
                    model_version_id=base),  # a paraphrase: the same case
            _signal(3, FEEDBACK, thumbs, RED.replace("red", "blue"), thumbs_up=False,
                    model_version_id=base),  # another colour: another case
            _signal(4, FEEDBACK, thumbs, RED.replace("at the", "in the"), thumbs_up=False,
                    model_version_id=other),  # another model version: another case
        ]  # fmt: skip
        report = _ingest(session, rows, prompts=prompts, batch_size=2)
        assert (report.signals_linked, report.cases_created, report.merged_by_prompt) == (4, 3, 1)
        red = session.scalar(select(FailureCase).order_by(FailureCase.id).limit(1))
        assert red is not None
        assert red.prompt == RED
        assert red.signal_count == 2
        # Stored after the commit, one point per case made.
        stored = prompts.client.scroll(prompts.collection(), limit=10)[0]
        assert sorted(int(p.id) for p in stored) == sorted(session.scalars(select(FailureCase.id)))
        # A fixed case takes no new near-duplicates.
        red.status = CaseStatus.FIXED
        session.commit()
        late = _signal(5, FEEDBACK, thumbs, RED + " ", thumbs_up=False, model_version_id=base)
        # The exact key still finds the fixed case: the same prompt on the same model.
        assert _ingest(session, [late], prompts=prompts).cases_created == 0
        paraphrase = _signal(6, FEEDBACK, thumbs, RED.replace("at the", "in the") + "!",
                             thumbs_up=False, model_version_id=base)  # fmt: skip
        again = _ingest(session, [paraphrase], prompts=prompts)
        # Its only near case is fixed: a new case (a fix is a new model version; failures of
        # the old one after the fix are new evidence, not the old case's).
        assert (again.cases_created, again.merged_by_prompt) == (1, 0)
    prompts.client.close()


def _verdicts(skill: str, asked: str, found: str) -> dict[str, Any]:
    element = {"kind": skill, "subject": "object 0", "asked": asked, "found": found}
    return {
        "benchmark": "flywheel-world",
        "skill": skill,
        "spec": {"elements": [{**element, "passed": False, "score": 0.0}]},
    }


def test_cases_get_readable_themes(fresh_engine: Engine, offline: None) -> None:
    embedder = TextEmbedder()
    sample, thumbs = SignalKind.EVALUATION_SAMPLE, SignalKind.THUMBS
    failed = {"passed": False, "scores": {"overall": 0.0}}
    with session_factory(fresh_engine)() as session:
        base = model_version_id(session, name="base")
        rows = [
            _signal(1, EVAL, sample, RED.replace("red", "purple"), model_version_id=base,
                    details=_verdicts("colour", "purple", "blue"), **failed),
            _signal(2, EVAL, sample, "A picture with a grey background showing a purple star.",
                    model_version_id=base, details=_verdicts("colour", "purple", "red"), **failed),
            _signal(3, EVAL, sample, "three large red stars", model_version_id=base,
                    details=_verdicts("count", "3", "4"), **failed),
            _signal(4, FEEDBACK, thumbs, "a cat wearing a tall hat", thumbs_up=False,
                    model_version_id=base),
            _signal(5, FEEDBACK, thumbs, "a cat in a hat", thumbs_up=False, model_version_id=base),
            _signal(6, FEEDBACK, thumbs, "a sunset over the calm sea", thumbs_up=False,
                    model_version_id=base),
            _signal(7, FEEDBACK, thumbs, "sunset above a quiet sea", thumbs_up=False,
                    model_version_id=base),
        ]  # fmt: skip
        _ingest(session, rows)
        report = assign_themes(session, embedder=embedder)
        assert report.cases_themed == 7
        assert report.labels["colour: purple"] == 2
        assert report.labels["count: 3"] == 1
        prompt_labels = {k: v for k, v in report.labels.items() if k.startswith(PROMPT_THEME)}
        assert sorted(prompt_labels.values()) == [2, 2]
        cat = next(k for k in prompt_labels if "cat" in k)
        assert "hat" in cat
        assert any("sunset" in k or "sea" in k for k in prompt_labels if k != cat)
        assert report.clusters_created == 4

        assert assign_themes(session, embedder=embedder).cases_themed == 0
        later = _signal(8, FEEDBACK, thumbs, "a grey cat with a hat", thumbs_up=False,
                        model_version_id=base)  # fmt: skip
        _ingest(session, [later])
        again = assign_themes(session, embedder=embedder)
        assert again.labels == {cat: 1}  # joins the cat theme
        assert again.clusters_created == 0
        assert session.scalar(select(func.count()).select_from(FailureCluster)) == 4


def test_theme_helpers() -> None:
    assert evaluation_theme(_verdicts("shape", "star", "circle")) == "shape: star"
    assert evaluation_theme({"skill": "colour", "spec": {"elements": []}}) is None
    assert evaluation_theme(None) is None  # type: ignore[arg-type]
    words = distinctive_words(
        ["a cat in a hat", "a cat with a hat"],
        ["a cat in a hat", "a cat with a hat", "a dog in a park", "a hat on a dog"],
        2,
    )
    assert words == ["cat", "hat"]
    with pytest.raises(ValueError, match="similarity"):
        ThemeConfig(similarity=1.0).validate()


def test_the_skill_comes_from_the_details() -> None:
    signal = Signal(
        scores={"text-latin": 0.2, "ocr": 0.1, "overall": 0.2}, details={"skill": "text-latin"}
    )
    assert signal_skill(signal) == "text-latin"
    assert signal_skill(Signal(scores={"colour": 0.0, "overall": 0.0})) == "colour"
    assert signal_skill(Signal(scores={"a": 0.0, "b": 0.0})) is None  # which one: unknown


def test_a_fixed_prompt_theme_label_is_reused(fresh_engine: Engine, offline: None) -> None:
    embedder = TextEmbedder()
    thumbs = SignalKind.THUMBS
    with session_factory(fresh_engine)() as session:
        base = model_version_id(session, name="base")
        first = [
            _signal(1, FEEDBACK, thumbs, "a cat in a hat", thumbs_up=False, model_version_id=base),
            _signal(2, FEEDBACK, thumbs, "a cat wearing a hat", thumbs_up=False,
                    model_version_id=base),
        ]  # fmt: skip
        _ingest(session, first)
        (label,) = assign_themes(session, embedder=embedder).labels
        for case in session.scalars(select(FailureCase)):
            case.status = CaseStatus.FIXED
        session.commit()
        later = [
            _signal(3, FEEDBACK, thumbs, "the cat wearing the hat", thumbs_up=False,
                    model_version_id=base),
            _signal(4, FEEDBACK, thumbs, "one cat wearing one hat", thumbs_up=False,
                    model_version_id=base),
        ]  # fmt: skip
        _ingest(session, later)
        again = assign_themes(session, embedder=embedder)
        assert again.cases_themed == 2
        assert again.labels == {label: 2}  # the fixed theme's label, its cluster reused
        assert again.clusters_created == 0
        labels = list(session.scalars(select(FailureCluster.label)))
        assert len(labels) == len(set(labels))  # no label twice
        assert assign_themes(session, embedder=embedder).cases_themed == 0
