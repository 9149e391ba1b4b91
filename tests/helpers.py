"""Helpers the tests share: request bodies, auth headers, a live API process."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from flywheel.db.models import (
    ReviewItem,
    ReviewKind,
    ReviewStatus,
    SignalKind,
    SignalSource,
    Task,
)
from flywheel.settings import Settings
from flywheel.signals.repository import NewSignal
from flywheel.signals.service import canonical_json

if TYPE_CHECKING:
    from flywheel.world.benchmark import BenchmarkCase


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_id(prefix: str = "evt") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def thumbs_event(**overrides: object) -> dict[str, object]:
    event: dict[str, object] = {
        "kind": "thumbs",
        "event_id": new_id(),
        "prompt": "a red circle left of a blue square",
        "image": {"uri": "s3://bucket/img.png"},
        "model_version": "base-v0",
        "value": "down",
    }
    event.update(overrides)
    return event


def stored_signal(
    event_id: str,
    prompt: str,
    *,
    source: SignalSource = SignalSource.FEEDBACK,
    kind: SignalKind = SignalKind.THUMBS,
    app: str = "web",
    **fields: Any,
) -> NewSignal:
    """A text-to-image signal to insert directly (its payload: the event id and prompt)."""
    payload_json, digest = canonical_json({"event_id": event_id, "prompt": prompt})
    return NewSignal(
        source=source,
        kind=kind,
        app=app,
        event_id=event_id,
        task=Task.TEXT_TO_IMAGE,
        prompt=prompt,
        payload_json=payload_json,
        payload_sha256=digest,
        **fields,
    )


def probe_hit(number: int, case: BenchmarkCase, version: int) -> NewSignal:
    """A probe miner's hit carrying its intended scene, as the miner stores it."""
    return stored_signal(
        f"hit-{number}",
        case.prompt,
        source=SignalSource.MINING,
        kind=SignalKind.MINING_HIT,
        app="miner",
        passed=False,
        scores={case.skill: 0.0},
        details={"skill": case.skill, "spec": {"case": case.model_dump(mode="json")}},
        model_version_id=version,
    )


def colour_complaints(
    cases: Sequence[BenchmarkCase], rng: random.Random, *, version: int
) -> tuple[list[str], list[NewSignal]]:
    """Users' complaints about ``cases``: each one's terse caption in the users' words (once
    per distinct prompt), flagged ``wrong_color`` — the prompts and the signals to insert."""
    from flywheel.world.scenes import captions
    from flywheel.world.vocabulary import to_user_words

    prompts = list(dict.fromkeys(to_user_words(captions(c.spec).terse, rng) for c in cases))
    rows = [
        stored_signal(
            f"fb-{n}", prompt, kind=SignalKind.FLAGS, flags=["wrong_color"],
            model_version_id=version,
        )
        for n, prompt in enumerate(prompts)
    ]  # fmt: skip
    return prompts, rows


def count_preferences(
    cases: Sequence[BenchmarkCase], directory: Path, *, version: int
) -> list[NewSignal]:
    """People's pairwise feedback on count ``cases``: the right count chosen over one copy
    too many (both images written as PNGs under ``directory``, as an app stores them): what
    the world's RL track recalibrates its reward on."""
    from flywheel.world.scenes import render
    from flywheel.world.weaknesses import wrong_scene

    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, case in enumerate(cases):
        uris = []
        for side, spec in (("chosen", case.spec), ("rejected", wrong_scene(case))):
            path = directory / f"{n}-{side}.png"
            render(spec, 64, 64).save(path)
            uris.append(path.as_uri())
        rows.append(
            stored_signal(
                f"pw-{n}",
                case.prompt,
                kind=SignalKind.PAIRWISE,
                chosen_image_uri=uris[0],
                rejected_image_uri=uris[1],
                model_version_id=version,
            )
        )
    return rows


FLYWHEEL_CLI = [sys.executable, "-c", "from flywheel.cli.main import app; app()"]
"""``flywheel`` in a process of its own (Prefect's log handlers bind to the process'
streams: a flow run inside ``CliRunner`` would leave them writing to a closed one)."""


def run_flywheel(
    env: dict[str, str], *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``flywheel ARGS`` with ``env`` over this process' environment; output captured."""
    return subprocess.run(
        [*FLYWHEEL_CLI, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ApiProcess:
    """``flywheel serve`` in a child process, as an operator runs it."""

    def __init__(self, settings: Settings, *, log: Path, port: int | None = None) -> None:
        assert settings.database_url is not None
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "FLYWHEEL_DATABASE_URL": settings.database_url,
            "FLYWHEEL_HOME": str(settings.home),
            "FLYWHEEL_RATE_LIMIT": settings.rate_limit,
        }
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            [
                *FLYWHEEL_CLI,
                "serve",
                "--port",
                str(self.port),
                "--no-migrate",
            ],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"API exited early; see {log}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"API did not become ready; see {log}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


TINY_CYCLE: dict[str, Any] = {
    "min_cases": 2,
    "min_confidence": 0.0,
    "world": {"labeled_per_track": 3, "corpus": 300, "pool": 300},
    "prompt_enhancer": {"steps": 120, "pairs_per_concept": 60},
    "pretraining_gap": {"steps": 60, "vae_steps": 2, "replay": 30, "batch_size": 4},
    "rl": {"steps": 1, "recalibration_steps": 2, "group_size": 2, "prompts_per_step": 1},
    "regression": {"seeds": 1, "cases": 1, "tolerance": 1.0},
}
"""A cycle of about a minute on two cores. The regression gate is opened (tolerance 1):
one case per skill is too few for a two-point gate (``test_cycle.py::test_the_gate``
covers the gate)."""


def approve_artefacts(engine: Engine, *, reviewer: str = "carol") -> list[int]:
    """Approve, as they are, the artefact items waiting for a decision — what a reviewer does
    before a cycle's rounds train (tests whose cycles must train call it); their ids."""
    from flywheel.review.service import approve

    kinds = (
        ReviewKind.AUGMENTATION_BATCH,
        ReviewKind.REWARD_RECALIBRATION,
        ReviewKind.PROMPT_ENHANCER_DATA,
    )
    with Session(engine) as session:
        waiting = session.scalars(
            select(ReviewItem.id)
            .where(
                ReviewItem.kind.in_(kinds),
                ReviewItem.status.in_((ReviewStatus.PENDING, ReviewStatus.CLAIMED)),
            )
            .order_by(ReviewItem.id)
        ).all()
        for item_id in waiting:
            approve(session, item_id=item_id, reviewer=reviewer, reason="reviewed before training")
    return list(waiting)
