"""The dashboard, page by page, with Streamlit's AppTest against a real PostgreSQL seeded
with a small flywheel: signals with images, cases in clusters with routes and evidence,
triage items, a finished cycle with its rounds, an artefact waiting for review, and a case
whose prompt, cluster, route and review item are hostile (SQL, HTML, script, Markdown):
stored verbatim, shown verbatim; and the served app in headless Chromium (Debian's), whose
screenshots of every page are left in ``build/screenshots/``."""

from __future__ import annotations

import os
import re
import signal
import string
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
from PIL import Image
from sqlalchemy import Engine, select
from sqlalchemy import text as sql
from sqlalchemy.orm import Session
from streamlit.testing.v1 import AppTest

from dashboard.common import WORD_JOINER, code_span, literal
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
HOSTILE = (
    "'; DROP TABLE signals; -- <script>window.__pwned=1</script> "
    '<img src=x onerror="window.__pwned=1"> ![p](http://127.0.0.1:9/pixel.png) '
    "[c](javascript:window.__pwned=1) $x^2$ :red[red] **bold** \x1b[31m\t tab "
    "www.evil.example a@evil.example :streamlit: :material/home: :smile: -> x"
)
"""A prompt as a hostile product app might send it (no NUL: PostgreSQL cannot store one)."""
HOSTILE_REF = "eve` **x** ![r](http://127.0.0.1:9/pixel.png) ``"
"""A reviewer's name that would close a code span around it."""
SHOWN = [
    "signals; -- <script>window.__pwned=1</script>",
    "![p](http://127.0.0.1:9/pixel.png)",
    "**bold**",
    "www.evil.example a@evil.example :streamlit: :material/home: :smile: -> x",
]
"""Parts of ``HOSTILE`` that the browser must show as they are (word joiners aside)."""


def _seed(session: Session, images: Path) -> dict[str, int]:
    version = model_version_id(session, name="world-base")
    uris = []
    for k in range(3):
        image = torch.zeros(3, 16, 16)
        image[k] = 1.0
        uri, _ = store_png(image, images)
        uris.append(uri)
    prompts = [f"a crimson square {k}" for k in range(3)] + [HOSTILE]
    stored = insert_signals(
        session,
        signals=[
            stored_signal(
                f"fb-{k}",
                prompt,
                kind=SignalKind.FLAGS,
                flags=["wrong_color"],
                comment=f"comment {prompt}",
                model_version_id=version,
                image_uri=uris[k % 3],
            )
            for k, prompt in enumerate(prompts)
        ],
    )
    red = FailureCluster(label="colour: red")
    theme = FailureCluster(label=f"theme {HOSTILE}")
    session.add_all([red, theme])
    session.flush()
    cases, routes = [], []
    for k, (prompt, event) in enumerate(zip(prompts, stored, strict=True)):
        hostile = prompt == HOSTILE  # the newest case: the one awaiting triage
        case = FailureCase(
            dedup_key=f"case-{k}",
            cluster_id=theme.id if hostile else red.id,
            status=CaseStatus.AWAITING_TRIAGE if hostile else CaseStatus.ROUTED,
            task="text_to_image",
            prompt=prompt,
            image_uri=uris[k % 3],
            model_version_id=version,
            signal_count=1,
        )
        session.add(case)
        session.flush()
        session.add(CaseSignal(case_id=case.id, signal_id=event.id))
        route = CaseRoute(
            case_id=case.id,
            track=Track.PROMPT_ENHANCER,
            confidence=0.45 if hostile else 0.9,
            evidence={
                "features": {
                    "rewritten_prompt": f"rewritten {HOSTILE}" if hostile else f"a red square {k}",
                    "rewrite_gain": 0.4,
                    "scarcity": 0.55,
                    "concept_rarity": 1.1,
                    "reward_rank": 0.2,
                    "nearest_corpus": [f"caption {HOSTILE}"]
                    if hostile
                    else ["a red square", "a red circle"],
                },
                "probabilities": {"rl": 0.1, "pretraining_gap": 0.2, "prompt_enhancer": 0.7},
                "rule": None,
            },
            decided_by=Decider.MODEL,
            decider_ref="classifier:72-examples",
        )
        session.add(route)
        cases.append(case)
        routes.append(route)
    session.flush()
    hostile_case = cases[-1]
    session.add(  # an override by a reviewer with a hostile name and reason
        CaseRoute(
            case_id=hostile_case.id,
            track=Track.RL,
            confidence=1.0,
            evidence={
                "overrides_route": routes[-1].id,
                "features": routes[-1].evidence["features"],
                "model_track": "prompt_enhancer",
            },
            decided_by=Decider.HUMAN,
            decider_ref=HOSTILE_REF,
            reason=f"reason {HOSTILE}",
        )
    )
    triage = repository.add_triage_item(
        session,
        case=hostile_case,
        title=f"Route case: {HOSTILE}",
        artefact={
            "case_id": hostile_case.id,
            "prompt": hostile_case.prompt,
            "features": {"rewritten_prompt": f"rewritten {HOSTILE}"},
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
    session.add_all(
        TrainingRoundCase(training_round_id=round_.id, case_id=c.id) for c in cases[1:3]
    )
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
    return {"triage": triage.id, "batch": batch.id, "cycle": cycle.id, "case": hostile_case.id}


@pytest.fixture
def seeded(
    fresh_engine: Engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[tuple[Engine, dict[str, int]]]:
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", fresh_engine.url.render_as_string(False))
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    with Session(fresh_engine) as session:  # images under the home: the policy reads them
        ids = _seed(session, tmp_path / "home" / "images")
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
    assert metrics["Open cases"] == "4"
    assert metrics["Waiting for review"] == "2"

    triage = _app("triage")
    assert triage.title[0].value == "Triage"
    table = triage.dataframe[0].value
    assert table["case"].tolist() == sorted(table["case"].tolist(), reverse=True)  # newest first
    assert len(table) == 4
    assert any(m.label == "Rewrite gain" for m in triage.metric)
    # Filter to the cases awaiting triage: only the hostile one remains.
    triage.selectbox[1].set_value("awaiting_triage").run()
    assert triage.dataframe[0].value["case"].tolist() == [ids["case"]]

    clusters = _app("clusters")
    labels = clusters.dataframe[0].value["label"].tolist()
    assert sorted(labels) == ["colour: red", f"theme {HOSTILE}"]  # a table shows it as is

    cycles = _app("cycles")
    assert "Cycle" in cycles.markdown[0].value
    rounds = cycles.dataframe[0].value
    assert rounds["track"].tolist() == ["prompt_enhancer"]
    assert rounds["after"].tolist() == [0.5]

    review = _app("review")
    assert any("Sign in" in i.value for i in review.info)


def test_literal_escapes_markdown_and_shows_control_characters() -> None:
    assert literal("**x** $y$ [a](javascript:b) <script>") == (
        rf"\*\*x\*\* \$y\$ \[a\]\(javascript\:{WORD_JOINER}b\) \<script\>"
    )
    assert literal("![i](u) # h|~`&amp; a: b") == r"\!\[i\]\(u\) \# h\|\~\`\&amp\; a\: b"
    # Where Streamlit rewrites parsed text (links, icons, dashes), a word joiner stops it.
    assert literal("http://w :red[r] a@b.c WWW.x -- a->b").split(WORD_JOINER) == [
        r"http\:",
        r"\/\/w \:",
        r"red\[r\] a\@",
        r"b\.c WWW",
        r"\.x \-",
        r"\- a\-",
        r"\>b",
    ]
    # Control characters (tab aside) and bidi overrides show as their Python escapes.
    assert literal("a\nb\x1b[0m\tc\u202ed\\") == "a\\\\nb\\\\x1b\\[0m\tc\\\\u202ed\\\\"
    assert (literal(0.5), literal(None), literal("été 3")) == (r"0\.5", "None", "été 3")
    # Take out every escape pair: no punctuation nor control character is left.
    rest = re.sub(r"\\.", "", literal(HOSTILE))
    assert not set(rest) & set(string.punctuation)
    assert all(c in ("\t", WORD_JOINER) or c.isprintable() for c in rest)
    # A code span's fence is longer than any run of backticks inside.
    assert code_span("a`b``c") == "``` a`b``c ```"
    assert code_span("x\ny") == "` x\\ny `"
    # Streamlit turns ":material/" into an icon's name before it parses, code or not.
    assert code_span(":material/home:") == f"` :{WORD_JOINER}material/home: `"


def test_image_uris_that_are_not_images_are_named_not_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dashboard.common import image_to_show, literal

    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))  # the images' root
    monkeypatch.chdir(tmp_path)  # no project file: the embedded world's image policy
    monkeypatch.delenv("FLYWHEEL_PROJECT", raising=False)
    get_settings.cache_clear()
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    real = tmp_path / "real.png"
    Image.new("RGB", (4, 4)).save(real)
    shown = image_to_show(real.as_uri())
    assert isinstance(shown, Image.Image)
    assert shown.size == (4, 4)
    for uri in (text.as_uri(), truncated.as_uri(), tmp_path.as_uri(), "file:///no/such.png"):
        assert isinstance(image_to_show(uri), str), uri

    def draw(uri: str) -> None:
        from dashboard.common import show_image

        show_image(uri, caption="hostile")

    drawn = AppTest.from_function(draw, args=(text.as_uri(),)).run()
    get_settings.cache_clear()
    assert not drawn.exception
    assert [c.value for c in drawn.caption] == [
        literal(
            f"hostile: image not shown: {text.as_uri()} is not an image that can be read "
            "(not PNG, JPEG, WEBP, GIF, BMP or TIFF)"
        )
    ]


def test_hostile_strings_are_stored_verbatim(seeded: tuple[Engine, dict[str, int]]) -> None:
    engine, ids = seeded
    with engine.connect() as connection:

        def row(query: str) -> tuple[object, ...]:
            return tuple(connection.execute(sql(query), ids).one())

        assert row("select count(*) from signals") == (4,)  # nothing was dropped
        assert row("select prompt, comment from signals where event_id = 'fb-3'") == (
            HOSTILE,
            f"comment {HOSTILE}",
        )
        assert row(  # byte for byte
            "select convert_to(c.prompt, 'UTF8'), convert_to(k.label, 'UTF8') from "
            "failure_cases c join failure_clusters k on k.id = c.cluster_id where c.id = :case"
        ) == (HOSTILE.encode(), f"theme {HOSTILE}".encode())
        assert row(
            "select evidence #>> '{features,rewritten_prompt}', "
            "evidence #>> '{features,nearest_corpus,0}' "
            "from case_routes where case_id = :case order by id limit 1"
        ) == (f"rewritten {HOSTILE}", f"caption {HOSTILE}")
        assert row(
            "select decider_ref, reason from case_routes where case_id = :case "
            "order by id desc limit 1"
        ) == (HOSTILE_REF, f"reason {HOSTILE}")
        assert row("select title, artefact->>'prompt' from review_items where id = :triage") == (
            f"Route case: {HOSTILE}",
            HOSTILE,
        )


def test_hostile_strings_render_escaped(seeded: tuple[Engine, dict[str, int]]) -> None:
    engine, ids = seeded
    triage = _app("triage", reviewer="alice")  # the newest case, the hostile one, is shown
    shown = [m.value for m in triage.markdown]
    captions = [c.value for c in triage.caption]
    assert literal(HOSTILE) in shown
    image = rf"\!\[p\]\(http\:{WORD_JOINER}\/\/127\.0\.0\.1\:{WORD_JOINER}9\/pixel\.png\)"
    assert any(r"\*\*bold\*\*" in m and image in m for m in shown)
    route = next(m for m in shown if m.startswith("**Route**"))
    assert route == (
        f"**Route**: rl (1.00) by human {code_span(HOSTILE_REF)} — {literal(f'reason {HOSTILE}')}"
    )
    assert f"rewritten: {literal(f'rewritten {HOSTILE}')}" in captions
    assert f"Nearest corpus captions: {literal(f'caption {HOSTILE}')}" in captions
    assert f"Earlier routes: prompt_enhancer by {literal('classifier:72-examples')}" in captions

    clusters = _app("clusters")
    shown += [m.value for m in clusters.markdown]
    assert any(m.startswith(f"**{literal(f'theme {HOSTILE}')}** — 1 cases") for m in shown)

    review = _app("review", reviewer="alice")
    next(b for b in review.button if b.label == "Claim").click().run()
    assert not review.exception, [e.value for e in review.exception]
    shown += [m.value for m in review.markdown]
    assert literal(f"Route case: {HOSTILE}") in shown
    assert f"**Prompt**: {literal(HOSTILE)}" in shown
    assert f"Rewritten: {literal(f'rewritten {HOSTILE}')}" in shown
    for value in (*shown, *captions):  # nothing of the hostile strings is left as Markdown
        assert not any(part in value for part in SHOWN), value

    # A reviewer's hostile reason for an override is stored as typed.
    why = next(t for t in triage.text_input if t.label == "Why")
    why.input(f"why {HOSTILE}")
    next(b for b in triage.button if b.label == "Route it").click().run()
    assert not triage.exception, [e.value for e in triage.exception]
    assert [s.value for s in triage.success] == [f"Case {ids['case']} routed to rl by alice."]
    with Session(engine) as session:
        reason = session.scalars(
            select(CaseRoute.reason)
            .where(CaseRoute.case_id == ids["case"])
            .order_by(CaseRoute.id.desc())
        ).first()
    assert reason == f"why {HOSTILE}"


def test_a_signal_naming_an_image_the_policy_refuses_is_stored_and_triage_says_why(
    seeded: tuple[Engine, dict[str, int]], tmp_path: Path
) -> None:
    engine, ids = seeded
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (4, 4), "red").save(outside)  # an image, but under no root
    refused = {
        outside.as_uri(): "is outside the allowed roots",
        "file:///etc/passwd": "is outside the allowed roots",
        "https://169.254.169.254/x.png": ": host 169.254.169.254 is not an allowed https host",
    }
    with Session(engine) as session:  # an app's feedback on the case awaiting triage
        stored = insert_signals(
            session,
            signals=[
                stored_signal(f"far-{k}", HOSTILE, kind=SignalKind.FLAGS, image_uri=uri)
                for k, uri in enumerate(refused)
            ],
        )
        session.add_all(CaseSignal(case_id=ids["case"], signal_id=s.id) for s in stored)
        session.commit()
        uris = session.scalars(
            sql("select image_uri from signals where event_id like 'far-%' order by id")
        )
        assert list(uris) == list(refused)  # stored as sent
    triage = _app("triage", reviewer="alice")
    captions = [c.value for c in triage.caption]
    for row, (uri, why) in zip(stored, refused.items(), strict=True):
        line = literal(f"#{row.id}: image not shown: {uri}{'' if why[0] == ':' else ' '}{why}")
        assert any(line in caption for caption in captions), (line, captions)
    assert len(triage.get("image")) == 1  # the case's own image, under the home


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


def _harmless(page: Page) -> None:
    """No script of the hostile strings ran, no image of theirs loads, no link of theirs shows."""
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img[src*='127.0.0.1:9/']").count() == 0
    assert page.locator("a[href^='javascript:' i]").count() == 0
    links = page.locator("[data-testid=stMain] a[href]:not([href^='#'])")
    assert links.count() == 0, links.evaluate_all("links => links.map(a => a.href)")


def _settle(page: Page) -> str:
    """Wait until the script has run and the page's text stops changing; the text (without
    ``literal``'s invisible word joiners)."""
    page.wait_for_selector("[data-testid=stApp][data-test-script-state=notRunning]")
    text, still = "", 0
    for _ in range(120):
        page.wait_for_timeout(250)
        now: str = page.inner_text("[data-testid=stMain]")
        still = still + 1 if now == text else 0
        text = now
        if still >= 4 and text.strip():
            break
    return text.replace(WORD_JOINER, "")


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
            "triage": ["Triage", "Rewrite gain", "Earlier routes", *SHOWN],  # the hostile case
            "clusters": ["Clusters", "colour: red", *SHOWN],
            "cycles": ["Cycles", "prompt_enhancer", "Gate"],
        }
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=_BROWSER_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            for name, words in expected.items():
                page.goto(f"{base}/{'' if name == 'overview' else name}")
                text = _settle(page)
                for word in words:
                    assert word in text, (name, word, text[:500])
                _harmless(page)
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
            for word in SHOWN:
                assert word in text, ("review", word, text[:500])
            _harmless(page)
            page.screenshot(path=str(SCREENSHOTS / "review.png"), full_page=True)
            browser.close()
        assert not [url for url in requested if "127.0.0.1:9/" in url or url.endswith("/x")]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    with Session(engine) as session:
        item = session.get(ReviewItem, ids["triage"])
        assert item is not None
        assert (item.status, item.claimed_by) == (ReviewStatus.CLAIMED, "alice")
