"""The acid test: a whole flywheel cycle on a team's own stack — feedback through the API,
mining, attribution from a cold start, every track, rounds launched from their manifests,
the gate — with a project file that names no world adapter, in processes where importing
``flywheel.world`` raises. The stack's tiny models have random weights (its base fails every
case), so the gate refuses the candidate and the cases go back to ``routed``.

The team's parts are real formats the test makes (:mod:`tests.team_stack`): a tiny seeded
diffusers pipeline, a causal-LM enhancer directory, an open_clip reward directory, a dataset
directory, JSONL suites, a judge served over HTTP and a trainer script the command launcher
runs in its own process — behind a wrapper that SIGKILLs the first attempt of the enhancer
round mid-way, so the cycle must retry the round and never take its half checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from flywheel.api.app import create_app
from flywheel.attribution.service import override_route
from flywheel.auth.service import create_api_key
from flywheel.db.engine import create_db_engine
from flywheel.db.models import (
    CaseStatus,
    Cycle,
    CycleStatus,
    FailureCase,
    ReviewItem,
    ReviewKind,
    RoundStatus,
    Scope,
    Track,
    TrainingRound,
    TrainingRoundCase,
)
from flywheel.ports import RoundManifest
from flywheel.settings import Settings, get_settings
from tests.helpers import approve_artefacts, auth, new_id
from tests.team_stack import GENERATOR_DIR, TRAINER, JudgeServer, app_image, build_team_stack

NO_WORLD = """
import importlib.abc, sys

class NoWorld(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "flywheel.world" or name.startswith("flywheel.world."):
            raise ImportError(f"{name}: the world is not to be imported in this process")
        return None

sys.meta_path.insert(0, NoWorld())
from flywheel.cli.main import app
app()
"""
"""``flywheel`` in a process of its own where importing the embedded world raises."""

PROMPTS: dict[Track, list[str]] = {
    Track.PRETRAINING_GAP: [
        "a purple circle",
        "a purple square at the top",
        "a purple triangle on grey",
        "two purple squares",
    ],
    Track.PROMPT_ENHANCER: [
        "crimson square",
        "scarlet circle",
        "crimson triangle please",
        "a scarlet square",
    ],
    Track.RL: [
        "a red circle at the bottom left",
        "a blue square at the top right",
        "a green triangle in the middle",
        "a yellow circle at the top left",
    ],
}
"""What the simulated users asked, by the track a human reviewer routes it to."""

CONFIG = {
    "min_cases": 2,
    "prompt_enhancer": {"steps": 3},
    "pretraining_gap": {"steps": 2, "replay": 12},
    "rl": {"steps": 2},
    "regression": {"seeds": 1},
}


FLAKY_TRAINER = """
import json, os, signal, sys
from pathlib import Path

manifest = Path(sys.argv[sys.argv.index("--manifest") + 1])
round_ = json.loads(manifest.read_text())
work, out = Path(round_["work_dir"]), Path(round_["output_dir"])
marker = work / "killed-once"
if round_["recipe"] == "pe_sft" and not marker.exists():
    # The first attempt of the enhancer round dies mid-way, half a checkpoint written.
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text("")
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.safetensors").write_bytes(b"half")
    print("step 1 of the first attempt: killed", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
trainer = Path(__file__).with_name(%r)
os.execv(sys.executable, [sys.executable, str(trainer), "--manifest", str(manifest)])
"""
"""The team's trainer behind a wrapper whose first enhancer round is SIGKILLed mid-way."""


def flywheel(
    env: dict[str, str], *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``flywheel ARGS`` with the world forbidden; output captured."""
    return subprocess.run(
        [sys.executable, "-c", NO_WORLD, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def team(
    tmp_path: Path, migrated_url: str, prefect_api: str
) -> Iterator[tuple[Path, dict[str, str], JudgeServer]]:
    """The team's stack, its judge served, the environment of every flywheel process."""
    with JudgeServer() as judge:
        project = build_team_stack(tmp_path / "team", judge_url=judge.url)
        flaky = project.parent / "flaky_trainer.py"
        flaky.write_text(FLAKY_TRAINER % TRAINER)
        text = project.read_text()
        trainer = str((project.parent / TRAINER).resolve())
        assert trainer in text
        project.write_text(text.replace(trainer, str(flaky.resolve())))
        env = {
            "FLYWHEEL_DATABASE_URL": migrated_url,
            "FLYWHEEL_HOME": str(tmp_path / "home"),
            "FLYWHEEL_PROJECT": str(project),
            "FLYWHEEL_RATE_LIMIT": "off",
            "PREFECT_API_URL": prefect_api,
            "PREFECT_HOME": os.environ.get("PREFECT_HOME", str(tmp_path / "prefect")),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HF_HUB_OFFLINE": "1",
        }
        yield project, env, judge


def post_feedback(
    root: Path, settings: Settings, prompts: dict[Track, list[str]] | None = None
) -> None:
    """The product app's users: a thumbs down on each prompt (of :data:`PROMPTS`, or
    ``prompts``), a thumbs up and a pairwise preference on the RL prompts."""
    engine = create_db_engine(settings, pool_size=1)
    with Session(engine) as session:
        key = create_api_key(session, app="team-app", scopes=[Scope.INGEST]).secret
        session.commit()
    engine.dispose()
    events: list[dict[str, object]] = []
    for track, asked in (PROMPTS if prompts is None else prompts).items():
        for k, prompt in enumerate(asked):
            wrong = "orange" if "green" in prompt else "green"  # not what was asked for
            bad = app_image(root, f"{track.value}-{k}-bad", wrong)
            events.append(
                {
                    "kind": "thumbs",
                    "event_id": new_id(),
                    "prompt": prompt,
                    "image": {"uri": bad},
                    "model_version": "team-v1",
                    "value": "down",
                }
            )
            if track == Track.RL:
                colour = prompt.split()[1]
                good = app_image(root, f"{track.value}-{k}-good", colour)
                events += [
                    {
                        "kind": "thumbs",
                        "event_id": new_id(),
                        "prompt": prompt,
                        "image": {"uri": good},
                        "model_version": "team-v1",
                        "value": "up",
                    },
                    {
                        "kind": "pairwise",
                        "event_id": new_id(),
                        "prompt": prompt,
                        "image": None,
                        "chosen": {"uri": good},
                        "rejected": {"uri": bad},
                        "model_version": "team-v1",
                    },
                ]
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/feedback/batch", json={"events": events}, headers=auth(key))
        assert response.status_code in (200, 201, 207), response.text


def test_a_whole_cycle_runs_on_a_teams_stack_with_the_world_forbidden(
    team: tuple[Path, dict[str, str], JudgeServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    project, env, judge = team
    root = project.parent
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    settings = get_settings()

    # The team's serving model, registered from its own pipeline directory.
    registered = flywheel(
        env, "models", "register", "team-v1", "--generator", str(root / GENERATOR_DIR)
    )
    assert registered.returncode == 0, registered.stderr[-2000:]

    # Feedback through the API, then the reward scan (Celery, eager) with the team's reward.
    post_feedback(root, settings)
    scan = flywheel(env, "mine", "scan", "--json")
    assert scan.returncode == 0, scan.stderr[-2000:]
    assert json.loads(scan.stdout.strip().splitlines()[-1])["miner"] == "scan"

    # Cycle 1 at a cold start: attribution by rule (evidence from the ports); nothing trains.
    config = root / "cycle.json"
    config.write_text(json.dumps({**CONFIG, "min_cases": 1000}))
    first = flywheel(env, "cycle", "--config", str(config), "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    outcome = json.loads(first.stdout.strip().splitlines()[-1])
    assert outcome["status"] == "no_rounds"
    assert outcome["summary"]["attribution"]["router"] == "RuleRouter"

    # A reviewer routes the cases (the human decisions the classifier will later learn from).
    engine = create_db_engine(settings, pool_size=2)
    intended = {p: t for t, prompts in PROMPTS.items() for p in prompts}
    with Session(engine) as session:
        cases = session.scalars(select(FailureCase)).all()
        assert {c.prompt for c in cases} >= set(intended)
        for case in cases:
            if case.prompt in intended and case.status in (
                CaseStatus.ROUTED,
                CaseStatus.AWAITING_TRIAGE,
                CaseStatus.OPEN,
            ):
                override_route(
                    session, case_id=case.id, track=intended[case.prompt], reviewer="alice"
                )

    # The plan first: what cycle 2 would build and train, nothing written.
    config.write_text(json.dumps(CONFIG))
    with Session(engine) as session:
        cycles_before = len(session.scalars(select(Cycle)).all())
        statuses_before = {c.id: c.status for c in session.scalars(select(FailureCase))}
    planned = flywheel(env, "cycle", "--dry-run", "--config", str(config), "--json")
    assert planned.returncode == 0, planned.stderr[-3000:]
    plan = json.loads(planned.stdout.strip().splitlines()[-1])
    assert plan["model"] == "team-v1"
    recipes = {t["track"]: (t["round"] or {}).get("recipe") for t in plan["tracks"]}
    assert recipes == {
        "pretraining_gap": "continued_pretraining",
        "rl": "diffusion_dpo",
        "prompt_enhancer": "pe_sft",
    }, plan["tracks"]
    with Session(engine) as session:
        assert len(session.scalars(select(Cycle)).all()) == cycles_before
        assert {c.id: c.status for c in session.scalars(select(FailureCase))} == statuses_before

    # Cycle 2: every track's artefact, reviewed before its round (the run waits for it), its
    # round launched from its manifest, the gate.
    requests_before = judge.requests
    waiting = flywheel(env, "cycle", "--config", str(config), "--json")
    assert waiting.returncode == 0, waiting.stderr[-4000:]
    assert json.loads(waiting.stdout.strip().splitlines()[-1])["status"] == "waiting_for_review"
    assert len(approve_artefacts(engine)) == len(Track)
    second = flywheel(env, "cycle", "--config", str(config), "--json")
    assert second.returncode == 0, second.stderr[-4000:]
    outcome = json.loads(second.stdout.strip().splitlines()[-1])
    summary = outcome["summary"]
    assert set(summary["tracks"]) == {t.value for t in Track}
    assert all(t["round"] is not None for t in summary["tracks"].values()), summary["tracks"]
    assert judge.requests > requests_before  # the gate's verdicts came from the HTTP judge
    assert summary["evaluation"]["regression"]["judged_by"] == "judge"
    # The gate counts the judge's verdicts on the held-out cases, base against candidate.
    gate = summary["gate"]
    fixed = sum(
        t["failures_before"] - t["failures_after"] for t in summary["evaluation"]["tracks"].values()
    )
    assert gate["fixed"] == fixed
    assert all(t["cases"] >= 1 for t in summary["evaluation"]["tracks"].values())
    # The team's base serves a tiny enhancer with random weights that rewrites every prompt to
    # an empty one, so the base fails every case; a few steps of tiny random models fix none of
    # the gate's: the gate refuses the candidate. (A promotion needs a stack whose base draws
    # what it is asked: a trained VAE, generator and enhancer.)
    evaluation = summary["evaluation"]
    assert all(t["failures_before"] == t["cases"] for t in evaluation["tracks"].values())
    assert evaluation["regression"]["score_before"] == 0.0
    assert gate["passed"] is False, gate
    assert outcome["status"] == "rejected"

    home = Path(env["FLYWHEEL_HOME"])
    cycle_dir = home / "cycles" / str(outcome["cycle_id"])
    with Session(engine) as session:
        rounds = {
            r.track: r
            for r in session.scalars(
                select(TrainingRound).where(TrainingRound.cycle_id == outcome["cycle_id"])
            )
        }
        assert set(rounds) == set(Track)
        for track, round_ in rounds.items():
            assert round_.status == RoundStatus.SUCCEEDED, round_.metrics
            manifest = RoundManifest.model_validate_json(
                (cycle_dir / track.value / "manifest.json").read_text()
            )
            assert manifest.round_id == round_.id
            # The round ran as its own process: the trainer's log, its metrics, its output.
            log = (Path(manifest.work_dir) / "launch.log").read_text()
            assert "step" in log
            metrics = json.loads((Path(manifest.output_dir) / "metrics.json").read_text())
            assert metrics["steps"] >= 1
            assert (Path(manifest.output_dir) / ".flywheel-round-done").is_file()
        # The enhancer round's first process died mid-round: its half checkpoint was moved
        # aside (never taken for one), and the retried launch finished the round.
        pe_manifest = RoundManifest.model_validate_json(
            (cycle_dir / Track.PROMPT_ENHANCER.value / "manifest.json").read_text()
        )
        assert (Path(pe_manifest.work_dir) / "killed-once").is_file()
        failed = list(Path(pe_manifest.output_dir).parent.glob("candidate.failed-*"))
        assert len(failed) == 1
        assert (failed[0] / "model.safetensors").read_bytes() == b"half"
        assert (Path(pe_manifest.output_dir) / "model.safetensors").read_bytes() != b"half"
        # Every track's artefact on disk, in its documented format.
        pe = rounds[Track.PROMPT_ENHANCER].data_manifest
        assert isinstance(pe, dict)
        pairs = [json.loads(line) for line in Path(pe["files"]["pairs"]).read_text().splitlines()]
        assert pairs
        assert all(set(p) >= {"prompt", "target"} for p in pairs)
        gap = rounds[Track.PRETRAINING_GAP].data_manifest
        assert isinstance(gap, dict)
        dataset = Path(gap["files"]["dataset"])
        samples = [
            json.loads(line) for line in (dataset / "samples.jsonl").read_text().splitlines()
        ]
        assert any(s["provenance"]["split"] == "pool" for s in samples)
        assert "purple" in " ".join(gap["artefact"]["diagnosis"]["scarce"])
        assert sum(gap["artefact"]["filters"]["dropped"].values()) >= 0
        rl = rounds[Track.RL].data_manifest
        assert isinstance(rl, dict)
        preferences = [
            json.loads(line) for line in Path(rl["files"]["preferences"]).read_text().splitlines()
        ]
        assert preferences
        assert all(set(p) >= {"prompt", "chosen", "rejected"} for p in preferences)
        cycle = session.get(Cycle, outcome["cycle_id"])
        assert cycle is not None
        assert cycle.candidate_model_version_id is not None
        promotion = session.scalars(
            select(ReviewItem).where(
                ReviewItem.kind == ReviewKind.MODEL_PROMOTION,
                ReviewItem.cycle_id == cycle.id,
            )
        ).first()

    shown = flywheel(env, "models", "show", f"cycle-{outcome['cycle_id']}")
    assert shown.returncode == 0, shown.stderr[-2000:]
    # Refused by the gate: no promotion item, the round cases back to routed for the next
    # cycle, the candidate registered but not serving.
    assert promotion is None
    assert "no failure fixed" in " ".join(gate["reasons"])
    with Session(engine) as session:
        round_cases = session.scalars(
            select(FailureCase)
            .join(TrainingRoundCase, TrainingRoundCase.case_id == FailureCase.id)
            .join(TrainingRound, TrainingRound.id == TrainingRoundCase.training_round_id)
            .where(TrainingRound.cycle_id == cycle.id)
        ).all()
        assert {c.prompt for c in round_cases} == set(intended)
        assert {c.status for c in round_cases} == {CaseStatus.ROUTED}
        rejected = session.get(Cycle, cycle.id)
        assert rejected is not None
        assert rejected.status == CycleStatus.REJECTED
    listed = flywheel(env, "models", "list")
    assert listed.returncode == 0, listed.stderr[-2000:]
    serving = [line for line in listed.stdout.splitlines() if " yes " in line]
    assert len(serving) == 1, listed.stdout
    assert "team-v1" in serving[0]
    assert f"cycle-{cycle.id}" not in serving[0]
    engine.dispose()
