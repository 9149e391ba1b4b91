"""The dashboard, page by page, with Streamlit's AppTest against a real PostgreSQL seeded
with a small flywheel: signals with images, cases in clusters with routes and evidence,
triage items, a finished cycle with its rounds, an artefact waiting for review; and the
served app in headless Chromium (Debian's), whose screenshots of every page are left in
``build/screenshots/``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import torch
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from streamlit.testing.v1 import AppTest

from flywheel.auth.service import create_api_key
from flywheel.db.models import (
    CaseRoute,
    CaseSignal,
    CaseStatus,
    Cycle,
    CycleStatus,
    Decider,
    FailureCase,
    FailureCluster,
    ReviewItem,
    ReviewKind,
    ReviewStatus,
    RoundStatus,
    Scope,
    SignalKind,
    Track,
    TrainingRound,
    TrainingRoundCase,
)
from flywheel.mining.miners import store_png
from flywheel.review import repository
from flywheel.settings import get_settings
from flywheel.signals.repository import insert_signals, model_version_id
from tests.helpers import free_port, stored_signal

if TYPE_CHECKING:
    from playwright.sync_api import Page

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")


def _seed(session: Session, images: Path) -> dict[str, int]:
    version = model_version_id(session, name="world-base")
    uris = []
    for k in range(3):
        image = torch.zeros(3, 16, 16)
        image[k] = 1.0
        uri, _ = store_png(image, images)
        uris.append(uri)
    stored = insert_signals(
        session,
        signals=[
            stored_signal(
                f"fb-{k}",
                f"a crimson square {k}",
                kind=SignalKind.FLAGS,
                flags=["wrong_color"],
                model_version_id=version,
                image_uri=uris[k],
            )
            for k in range(3)
        ],
    )
    cluster = FailureCluster(label="colour: red")
    session.add(cluster)
    session.flush()
    cases = []
    for k, event in enumerate(stored):
        case = FailureCase(
            dedup_key=f"case-{k}",
            cluster_id=cluster.id,
            status=CaseStatus.AWAITING_TRIAGE if k == 0 else CaseStatus.ROUTED,
            task="text_to_image",
            prompt=f"a crimson square {k}",
            image_uri=uris[k],
            model_version_id=version,
            signal_count=1,
        )
        session.add(case)
        session.flush()
        session.add(CaseSignal(case_id=case.id, signal_id=event.id))
        session.add(
            CaseRoute(
                case_id=case.id,
                track=Track.PROMPT_ENHANCER,
                confidence=0.45 if k == 0 else 0.9,
                evidence={
                    "features": {
                        "rewritten_prompt": f"a red square {k}",
                        "rewrite_gain": 0.4,
                        "scarcity": 0.55,
                        "concept_rarity": 1.1,
                        "reward_rank": 0.2,
                        "nearest_corpus": ["a red square", "a red circle"],
                    },
                    "probabilities": {"rl": 0.1, "pretraining_gap": 0.2, "prompt_enhancer": 0.7},
                    "rule": None,
                },
                decided_by=Decider.MODEL,
                decider_ref="classifier:72-examples",
            )
        )
        cases.append(case)
    session.flush()
    triage = repository.add_triage_item(
        session,
        case=cases[0],
        title="Route case: prompt_enhancer? (0.45)",
        artefact={
            "case_id": cases[0].id,
            "prompt": cases[0].prompt,
            "features": {"rewritten_prompt": "a red square 0"},
            "probabilities": {"rl": 0.2, "pretraining_gap": 0.35, "prompt_enhancer": 0.45},
        },
    )
    cycle = Cycle(
        status=CycleStatus.PROMOTED,
        config={},
        summary={
            "evaluation": {
                "tracks": {
                    "prompt_enhancer": {
                        "cases": 2,
                        "failure_rate_before": 1.0,
                        "failure_rate_after": 0.5,
                        "failures_before": 2,
                        "failures_after": 1,
                    }
                },
                "regression": {"score_before": 0.10, "score_after": 0.11, "cases": 8, "seeds": 1},
            },
            "gate": {"passed": True, "fixed": 1, "reasons": [], "regression_delta": 0.01},
            "outcome": {"decision": "approved", "by": "carol", "fixed_cases": 1},
        },
        finished_at=datetime.now(UTC),
    )
    session.add(cycle)
    session.flush()
    round_ = TrainingRound(
        cycle_id=cycle.id,
        track=Track.PROMPT_ENHANCER,
        recipe="pe_sft",
        status=RoundStatus.SUCCEEDED,
        config={"steps": 200},
        data_manifest={"concepts": ["red"], "pairs": 300, "user_worded": 200, "echo": 100},
        metrics={"stages": {"sft": {"steps": 200, "first_loss": 0.4, "last_loss": 0.01}}},
        evaluation={"before": {"failure_rate": 1.0}, "after": {"failure_rate": 0.5}},
    )
    session.add(round_)
    session.flush()
    session.add_all(TrainingRoundCase(training_round_id=round_.id, case_id=c.id) for c in cases[1:])
    batch = repository.add_item(
        session,
        kind=ReviewKind.PROMPT_ENHANCER_DATA,
        title="Prompt-enhancer pairs for red: 300 pairs from 2 cases",
        artefact={
            "track": "prompt_enhancer",
            "concepts": ["red"],
            "pairs": 300,
            "user_worded": 200,
            "echo": 100,
            "examples": [["crimson square", "red square"]],
        },
        actor="cycle",
        cycle_id=cycle.id,
        training_round_id=round_.id,
    )
    session.commit()
    return {"triage": triage.id, "batch": batch.id, "cycle": cycle.id, "case": cases[0].id}


@pytest.fixture
def seeded(
    fresh_engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[tuple[Engine, dict[str, int]]]:
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", fresh_engine.url.render_as_string(False))
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    with Session(fresh_engine) as session:
        ids = _seed(session, tmp_path / "images")
    yield fresh_engine, ids
    get_settings.cache_clear()


def _app(page: str | None = None, *, reviewer: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    if reviewer:
        at.session_state["reviewer"] = reviewer
    at.run()
    if page is not None:
        at.switch_page(f"pages/{page}.py")
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_every_page_renders_the_seeded_flywheel(seeded: tuple[Engine, dict[str, int]]) -> None:
    _, ids = seeded
    overview = _app()
    assert overview.title[0].value == "Overview"
    metrics = {m.label: m.value for m in overview.metric}
    assert metrics["Open cases"] == "3"
    assert metrics["Waiting for review"] == "2"

    triage = _app("triage")
    assert triage.title[0].value == "Triage"
    table = triage.dataframe[0].value
    assert table["case"].tolist() == sorted(table["case"].tolist(), reverse=True)  # newest first
    assert len(table) == 3
    assert any(m.label == "Rewrite gain" for m in triage.metric)
    # Filter to the cases awaiting triage: only the first remains.
    triage.selectbox[1].set_value("awaiting_triage").run()
    assert triage.dataframe[0].value["case"].tolist() == [ids["case"]]

    clusters = _app("clusters")
    assert clusters.dataframe[0].value["label"].tolist() == ["colour: red"]

    cycles = _app("cycles")
    assert "Cycle" in cycles.markdown[0].value
    rounds = cycles.dataframe[0].value
    assert rounds["track"].tolist() == ["prompt_enhancer"]
    assert rounds["after"].tolist() == [0.5]

    review = _app("review")
    assert any("Sign in" in i.value for i in review.info)


def test_sign_in_with_a_review_key(seeded: tuple[Engine, dict[str, int]]) -> None:
    engine, _ = seeded
    with Session(engine) as session:
        good = create_api_key(session, app="alice", scopes=[Scope.REVIEW]).secret
        wrong = create_api_key(session, app="web", scopes=[Scope.INGEST]).secret
        session.commit()
    at = _app()
    at.sidebar.text_input[0].input(wrong)
    at.sidebar.button[0].click().run()
    assert any("neither the review nor the triage scope" in e.value for e in at.error)
    at.sidebar.text_input[0].input(good)
    at.sidebar.button[0].click().run()
    assert at.session_state["reviewer"] == "alice"
    assert any("Signed in as **alice**" in m.value for m in at.sidebar.markdown)


def test_claim_then_decide_in_the_review_queue(seeded: tuple[Engine, dict[str, int]]) -> None:
    engine, ids = seeded
    at = _app("review", reviewer="alice")
    claim = next(b for b in at.button if b.label == "Claim")
    claim.click().run()
    assert not at.exception
    # The oldest waiting item is the triage item: route its case.
    assert any(f"#{ids['triage']}" in h.value for h in at.subheader)
    at.radio[0].set_value("approve")
    at.selectbox[1].set_value("prompt_enhancer")
    at.text_input[0].input("the users' colour words")
    next(b for b in at.button if b.label == "Submit").click().run()
    assert not at.exception, [e.value for e in at.exception]
    with Session(engine) as session:
        item = session.get(ReviewItem, ids["triage"])
        assert item is not None
        assert (item.status, item.decided_by) == (ReviewStatus.APPROVED, "alice")
        case = session.get(FailureCase, ids["case"])
        assert case is not None
        assert case.status == CaseStatus.ROUTED
        route = session.scalars(
            select(CaseRoute).where(CaseRoute.case_id == ids["case"]).order_by(CaseRoute.id.desc())
        ).first()
        assert route is not None
        assert (route.decided_by, route.decider_ref) == (Decider.HUMAN, "alice")
    # Next: the enhancer data; rejected with a reason.
    next(b for b in at.button if b.label == "Claim").click().run()
    assert any(f"#{ids['batch']}" in h.value for h in at.subheader)
    at.radio[0].set_value("reject")
    at.text_input[0].input("pairs look wrong")
    next(b for b in at.button if b.label == "Submit").click().run()
    with Session(engine) as session:
        batch = session.get(ReviewItem, ids["batch"])
        assert batch is not None
        assert (batch.status, batch.decision_reason) == (ReviewStatus.REJECTED, "pairs look wrong")


SCREENSHOTS = Path(__file__).resolve().parent.parent / "build" / "screenshots"
"""Where the browser test leaves each page's screenshot for a person to look at."""
CHROMIUM = Path("/usr/bin/chromium")
_BROWSER_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _settle(page: Page) -> str:
    """Wait until the script has run and the page's text stops changing; the text."""
    page.wait_for_selector("[data-testid=stApp][data-test-script-state=notRunning]")
    text, still = "", 0
    for _ in range(120):
        page.wait_for_timeout(250)
        now: str = page.inner_text("[data-testid=stMain]")
        still = still + 1 if now == text else 0
        text = now
        if still >= 4 and text.strip():
            return text
    return text


@pytest.mark.timeout(300)
def test_screenshots_of_every_page_in_chromium(
    seeded: tuple[Engine, dict[str, int]], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():
        pytest.fail("Debian's chromium is missing: apt-get install chromium (make test does)")
    engine, ids = seeded
    with Session(engine) as session:
        key = create_api_key(session, app="alice", scopes=[Scope.REVIEW]).secret
        session.commit()
    port = free_port()
    log = (tmp_path / "streamlit.log").open("wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            APP,
            "--server.port",
            str(port),
            "--server.headless",
            "true",
            "--browser.gatherUsageStats",
            "false",
        ],
        env={**os.environ},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/_stcore/health", timeout=1).text == "ok":
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail((tmp_path / "streamlit.log").read_text()[-3000:])
            time.sleep(0.2)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        expected = {
            "overview": ["Overview", "Signals per day", "Routing mix"],
            "triage": ["Triage", "a crimson square", "Rewrite gain"],
            "clusters": ["Clusters", "colour: red"],
            "cycles": ["Cycles", "prompt_enhancer", "Gate"],
        }
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=_BROWSER_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            for name, words in expected.items():
                page.goto(f"{base}/{'' if name == 'overview' else name}")
                text = _settle(page)
                for word in words:
                    assert word in text, (name, word, text[:500])
                shot = SCREENSHOTS / f"{name}.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
            # Sign in through the sidebar, open the queue, claim the oldest item.
            page.goto(f"{base}/review")
            _settle(page)
            page.get_by_label("API key (review scope)").fill(key)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_selector("text=Signed in as")
            page.get_by_role("button", name="Claim").click()
            text = _settle(page)
            assert f"#{ids['triage']}" in text, text[:500]
            page.screenshot(path=str(SCREENSHOTS / "review.png"), full_page=True)
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    with Session(engine) as session:
        item = session.get(ReviewItem, ids["triage"])
        assert item is not None
        assert (item.status, item.claimed_by) == (ReviewStatus.CLAIMED, "alice")
