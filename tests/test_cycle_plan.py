"""The cycle's plan (``--dry-run``) against a real PostgreSQL: it runs collect, themes and
attribution for real, plans every track — and leaves the database and the home directory
exactly as they were."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text
from typer.testing import CliRunner

from flywheel.cli.main import app
from flywheel.cycle.config import CycleConfig, WorldIndexConfig
from flywheel.db.engine import session_factory
from flywheel.db.models import Base, SignalKind
from flywheel.settings import get_settings
from flywheel.signals.repository import insert_signals, model_version_id
from flywheel.world.benchmark import build_case
from flywheel.world.loop.plan import plan_cycle
from flywheel.world.scenes import captions
from flywheel.world.vocabulary import to_user_words
from tests.helpers import probe_hit, stored_signal

BAND = 96_000_000


def _counts(fresh_engine: Engine) -> dict[str, int]:
    with fresh_engine.connect() as connection:
        return {
            name: int(connection.scalar(select(func.count()).select_from(text(name))) or 0)
            for name in Base.metadata.tables
        }


def test_a_dry_run_plans_every_track_and_writes_nothing(
    fresh_engine: Engine, tmp_path: Path, offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(5)
    with session_factory(fresh_engine)() as session:
        version = model_version_id(session, name="world-base")
        colours = [build_case("colour", k, band=BAND, case_id=f"c/{k}") for k in range(35)]
        purple = [c for c in colours if c.focus == "purple"][:4]
        worded = [c for c in colours if c.focus != "purple"][:4]
        counts = [build_case("count", k, band=BAND, case_id=f"n/{k}") for k in range(4)]
        rows = [probe_hit(n, c, version) for n, c in enumerate(purple + counts)]
        rows += [
            stored_signal(
                f"fb-{n}",
                to_user_words(captions(c.spec).terse, rng),
                kind=SignalKind.FLAGS,
                flags=["wrong_color"],
                model_version_id=version,
            )
            for n, c in enumerate(worded)
        ]
        # People compared two images of each count prompt: the RL track's preference pairs
        # (not failures: no case of their own).
        rows += [
            stored_signal(
                f"pw-{n}",
                c.prompt,
                kind=SignalKind.PAIRWISE,
                chosen_image_uri=f"file:///app/{n}-a.png",
                rejected_image_uri=f"file:///app/{n}-b.png",
                model_version_id=version,
            )
            for n, c in enumerate(counts)
        ]
        insert_signals(session, signals=rows)
        session.commit()
    before = _counts(fresh_engine)
    home = tmp_path / "home"
    home.mkdir()
    config = CycleConfig(
        dry_run=True,
        world=WorldIndexConfig(labeled_per_track=3, corpus=300, pool=300),
        min_cases=1,
        min_confidence=0.0,
    )
    plan = plan_cycle(fresh_engine, config=config, home=home)
    assert plan.model == "world-base"
    assert (plan.signals_collected, plan.cases_created) == (12, 12)
    assert sum(plan.routed.values()) == 12
    tracks = {t.track: t for t in plan.tracks}
    assert sum(t.cases for t in plan.tracks) == 12
    assert tracks["prompt_enhancer"].data["concepts"]
    gap_data = tracks["pretraining_gap"].data
    assert gap_data["scarce"] == ["purple"]
    # As the cycle builds it: from the train side of the split by theme (the gate holds at
    # least one case of the track); a gap round only where a train case asks for a scarce
    # concept.
    gate_cases, scarce_in_train = gap_data["gate_cases"], gap_data["scarce_in_train"]
    assert isinstance(gate_cases, int)
    assert gate_cases >= 1
    assert isinstance(scarce_in_train, list)
    assert set(scarce_in_train) <= {"purple"}
    assert (tracks["pretraining_gap"].round is None) == (not scarce_in_train)
    for track in plan.tracks:
        train, gate = track.data["train_cases"], track.data["gate_cases"]
        assert isinstance(train, int)
        assert isinstance(gate, int)
        assert train + gate == track.cases
    planned = [t for t in plan.tracks if t.round is not None]
    assert planned
    estimates = {t.track: t.round.estimated_seconds for t in planned if t.round}
    assert all(e is not None and e > 0 for e in estimates.values()), estimates
    # The RL round learns from the pairwise feedback on its train side's prompts.
    rl_data = tracks["rl"].data
    assert rl_data["preference_pairs"] == rl_data["train_cases"]
    assert tracks["rl"].round is not None
    assert tracks["rl"].round.steps == {"reward_recalibration": 40, "flow_grpo": 15}
    # Flow-GRPO (an image group per prompt and step) costs more than the enhancer's SFT.
    rl, pe = estimates["rl"], estimates["prompt_enhancer"]
    assert rl is not None
    assert pe is not None
    assert rl > pe
    assert plan.estimated_seconds == pytest.approx(sum(e or 0.0 for e in estimates.values()))
    assert plan.estimated_seconds > 0
    # Nothing persisted: not a row, not a file.
    assert _counts(fresh_engine) == before
    assert list(home.iterdir()) == []

    # The same through the CLI: `flywheel cycle --dry-run` prints the plan, writes nothing.
    config_file = tmp_path / "cycle.json"
    config_file.write_text(config.model_dump_json(exclude={"dry_run"}))
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", fresh_engine.url.render_as_string(False))
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["cycle", "--dry-run", "--config", str(config_file)])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "nothing was written" in out
    assert "pretraining_gap" in out
    assert "prompt_enhancer" in out
    assert "estimated training time" in out
    assert _counts(fresh_engine) == before
    assert list(home.iterdir()) == []
