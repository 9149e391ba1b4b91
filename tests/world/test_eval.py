"""`flywheel eval`: a generator runs a suite, the evaluator scores it, the run lands in Postgres
as evaluation signals (the same service as ``POST /v1/evaluations``), images on disk."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch
from PIL import Image
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from flywheel.cli.main import app
from flywheel.db.models import EvaluationRun, Signal, SignalSource
from flywheel.settings import get_settings
from flywheel.world.benchmark import SKILLS, suite
from flywheel.world.evaluation import score_case, summarize_cases
from flywheel.world.scenes import render
from model.condition import ConditionEncoder, minilm_condition
from model.pipeline import Generator, GeneratorConfig
from model.sampling import SamplerConfig
from model.transformer import DiffusionTransformer, transformer_debug
from model.vae import ResidualVAE, vae_debug

pytestmark = pytest.mark.usefixtures("offline")

runner = CliRunner()


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny seeded random generator at 32 x 32 (its images are what they are: noise)."""
    transformer = transformer_debug()
    transformer.latent_channels = vae_debug().latent_channels
    config = GeneratorConfig(
        transformer=transformer,
        vae=vae_debug(),
        height=32,
        width=32,
        sampler=SamplerConfig(steps=2, dynamic_shift=False, guidance_scale=1.0),
    )
    torch.manual_seed(0)
    generator = Generator(
        config,
        DiffusionTransformer(config.transformer),
        ResidualVAE(config.vae),
        ConditionEncoder.load(minilm_condition()),
    )
    return generator.save(tmp_path_factory.mktemp("models") / "tiny-random")


@pytest.fixture
def cli_env(
    create_database: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A fresh (unmigrated) database and FLYWHEEL_HOME for the CLI."""
    url = create_database()
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", url)
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()


def _file(uri: str) -> Path:
    parsed = urlparse(uri)
    assert parsed.scheme == "file"
    return Path(unquote(parsed.path))


def test_eval_writes_one_signal_per_case_and_prints_skills(
    generator_dir: Path, cli_env: str, tmp_path: Path
) -> None:
    args = ["eval", "--model", str(generator_dir), "--suite", "regression", "--json"]
    result = runner.invoke(app, [*args, "--no-progress", "--run-id", "nightly-1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    cases = suite("regression")
    assert list(report["skills"]) == list(SKILLS)
    for skill in SKILLS:
        entry = report["skills"][skill]
        assert entry["n"] == 4
        assert 0.0 <= entry["score"] <= 1.0
        assert 0.0 <= entry["pass_rate"] <= entry["score"] + 1e-9
    assert report["model_version"] == "tiny-random"
    assert report["run_id"] == "nightly-1"

    engine = create_engine(cli_env)
    with Session(engine) as session:
        run = session.scalars(
            select(EvaluationRun).where(EvaluationRun.run_id == "nightly-1")
        ).one()
        assert (run.suite, run.sample_count) == ("regression", len(cases))
        rows = list(session.scalars(select(Signal).where(Signal.evaluation_run_id == run.id)))
    engine.dispose()
    assert len(rows) == len(cases)
    by_case: dict[str, Signal] = {}
    for row in rows:
        assert row.details is not None
        by_case[row.details["spec"]["case"]["id"]] = row
    assert set(by_case) == {c.id for c in cases}
    latin_scores = []
    for case in cases:
        row = by_case[case.id]
        details, scores, uri = row.details, row.scores, row.image_uri
        assert details is not None
        assert scores is not None
        assert uri is not None
        assert row.source == SignalSource.EVALUATION
        assert row.prompt == case.prompt
        assert details["skill"] == case.skill
        assert set(scores) == {case.skill, "overall"}
        image = _file(uri)
        assert hashlib.sha256(image.read_bytes()).hexdigest() == row.image_sha256
        assert image.is_relative_to(tmp_path / "home" / "eval")
        if case.skill == "editing":
            assert row.input_images is not None
            (source,) = row.input_images
            assert isinstance(source, dict)
            assert _file(str(source["uri"])).is_file()
        # the stored verdict is the evaluator's verdict on the stored image
        with Image.open(image) as opened:
            verdict = score_case(case, opened.convert("RGB"))
        assert verdict.passed == row.passed
        assert verdict.score == pytest.approx(scores[case.skill], abs=1e-6)
        if case.skill == "text-latin":
            latin_scores.append(scores[case.skill])
    assert report["skills"]["text-latin"]["score"] == pytest.approx(sum(latin_scores) / 4)

    # the same run id again with other results is refused; a new run id is a new run
    replay = runner.invoke(app, [*args, "--no-progress", "--run-id", "nightly-1", "--seed", "5"])
    assert replay.exit_code == 2
    assert "nightly-1" in replay.output
    table = runner.invoke(app, ["eval", "--model", str(generator_dir), "--suite", "regression"])
    assert table.exit_code == 0, table.output
    assert "terse" in table.output
    engine = create_engine(cli_env)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(EvaluationRun)).scalar() == 2
    engine.dispose()


def test_faithful_images_score_full_marks() -> None:
    """The scoring path on the suite's own renders: every non-editing case passes."""
    cases = [c for c in suite("regression") if c.skill != "editing"]
    results = [score_case(c, render(c.spec, 128, 128)) for c in cases]
    assert all(r.passed and r.score == 1.0 for r in results), [
        r.case.id for r in results if not r.passed
    ]
    skills = summarize_cases(results)
    assert {s.pass_rate for s in skills.values()} == {1.0}


@pytest.mark.parametrize(
    ("args", "needle", "code"),
    [
        (["--suite", "nope"], "unknown suite", 2),
        (["--model", "/nonexistent/model"], "not a generator directory", 2),
        (["--run-id", "has spaces"], "--run-id", 2),
        (["--model-version", "x" * 201], "--model-version", 2),
    ],
)
def test_bad_input_exits_with_one_line(
    generator_dir: Path, cli_env: str, args: list[str], needle: str, code: int
) -> None:
    full = (
        ["eval", "--model", str(generator_dir), *args] if "--model" not in args else ["eval", *args]
    )
    result = runner.invoke(app, full)
    assert result.exit_code == code, result.output
    assert needle in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_unreachable_database_exits_1(generator_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    get_settings.cache_clear()
    try:
        result = runner.invoke(app, ["eval", "--model", str(generator_dir)])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1, result.output
    assert "unreachable" in result.output
