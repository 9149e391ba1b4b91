"""`flywheel world render | corpus | suite | check | evaluator-train | evaluator-measure`:
what they write, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from flywheel.cli.main import app
from flywheel.world import evaluator_training
from flywheel.world.benchmark import suite
from flywheel.world.corpus import read_specs
from flywheel.world.evaluator import TRAIN_SEED_OFFSET, load_evaluator, measure_accuracy
from flywheel.world.evaluator_training import EvaluatorTrainConfig, train_evaluator
from flywheel.world.scenes import render, sample_scene
from training.data import read_dataset

runner = CliRunner()


def test_render_writes_the_scene_of_the_seed(tmp_path: Path) -> None:
    out = tmp_path / "scene.png"
    result = runner.invoke(
        app, ["world", "render", "--seed", "7", "--out", str(out), "--size", "96"]
    )
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.size == (96, 96)
        expected = render(sample_scene(7), 96, 96)
        assert image.convert("RGB").tobytes() == expected.tobytes()
    assert "terse:" in result.output
    bad = runner.invoke(app, ["world", "render", "--seed", "7", "--out", str(tmp_path / "x.jpg")])
    assert bad.exit_code == 2
    assert len(bad.output.strip().splitlines()) == 1


def test_corpus_and_suite(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    args = ["world", "corpus", "--out", str(out), "--count", "10", "--edit-fraction", "0.3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    samples = read_dataset(out)
    assert len(samples) == 10
    assert sum(s.is_editing for s in samples) == 3
    assert set(read_specs(out)) == {s.id for s in samples}
    again = runner.invoke(app, args)  # never overwrites a corpus
    assert again.exit_code == 2
    assert "exists" in again.output

    listed = runner.invoke(app, ["world", "suite", "regression", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [c["id"] for c in json.loads(listed.output)] == [c.id for c in suite("regression")]
    unknown = runner.invoke(app, ["world", "suite", "nope"])
    assert unknown.exit_code == 2
    assert "unknown suite" in unknown.output


def test_check_scores_an_image_against_a_scene(tmp_path: Path) -> None:
    scene = sample_scene(11)
    faithful, other = tmp_path / "faithful.png", tmp_path / "other.png"
    render(scene, 128, 128).save(faithful)
    render(sample_scene(12), 128, 128).save(other)
    spec = tmp_path / "spec.json"
    spec.write_text(scene.model_dump_json())

    good = runner.invoke(
        app, ["world", "check", "--image", str(faithful), "--seed", "11", "--json"]
    )
    assert good.exit_code == 0, good.output
    assert json.loads(good.output)["score"] == 1.0
    same = runner.invoke(app, ["world", "check", "--image", str(faithful), "--spec", str(spec)])
    assert same.exit_code == 0, same.output
    assert "score 1.000" in same.output
    bad = runner.invoke(app, ["world", "check", "--image", str(other), "--seed", "11", "--json"])
    assert bad.exit_code == 0, bad.output
    assert json.loads(bad.output)["score"] < 0.5

    (tmp_path / "junk.png").write_bytes(b"not a png")
    broken = {
        "both": ["--image", str(faithful), "--seed", "1", "--spec", str(spec)],
        "neither": ["--image", str(faithful)],
        "no image": ["--image", str(tmp_path / "missing.png"), "--seed", "1"],
        "junk image": ["--image", str(tmp_path / "junk.png"), "--seed", "1"],
        "junk spec": ["--image", str(faithful), "--spec", str(faithful)],
    }
    for why, args in broken.items():
        result = runner.invoke(app, ["world", "check", *args])
        assert result.exit_code == 2, (why, result.output)
        assert len(result.output.strip().splitlines()) == 1, (why, result.output)


def _one_line_refusal(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def _tiny() -> EvaluatorTrainConfig:
    """Few steps: what the command passes through, not how well the networks learn."""
    return EvaluatorTrainConfig(
        scenes=40, sheets=10, sizes=(64,), shape_steps=3, text_steps=3, text_batch=4
    )


def test_evaluator_train_writes_the_weights_its_options_ask_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evaluator_training, "EvaluatorTrainConfig", _tiny)
    out = tmp_path / "weights" / "evaluator.safetensors"
    args = ["--out", str(out), "--seed", "3", "--scenes", "12", "--no-progress"]
    result = runner.invoke(app, ["world", "evaluator-train", *args])
    assert result.exit_code == 0, result.output
    assert "component crops" in result.output
    assert result.output.strip().endswith(f"-> {out}")
    config = _tiny()
    config.scenes = 12
    expected, _ = train_evaluator(None, seed=3, config=config)
    loaded = load_evaluator(out)
    for mine, theirs in (
        (expected.shape_net, loaded.shape_net),
        (expected.text_net, loaded.text_net),
    ):
        for (name, a), b in zip(
            mine.state_dict().items(), theirs.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name

    assert "scenes >= 10" in _one_line_refusal(
        ["world", "evaluator-train", "--out", str(tmp_path / "x.safetensors"), "--scenes", "5"]
    )
    assert "a directory" in _one_line_refusal(["world", "evaluator-train", "--out", str(tmp_path)])


def test_evaluator_measure_prints_per_kind_accuracy_per_size(tmp_path: Path) -> None:
    args = ["world", "evaluator-measure", "--scenes", "3", "--size", "64", "--size", "96"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["64x64", "96x96"]
    scores = measure_accuracy(3, size=96)
    expected = ", ".join(f"{k} {v.accuracy:.4f} ({v.elements})" for k, v in scores.items())
    assert lines[1] == f"96x96: {expected}"

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign), metadata={"format": "something else"})
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not safetensors")
    measure = ["world", "evaluator-measure", "--scenes", "1", "--size", "64"]
    assert "no such file" in _one_line_refusal([*measure, "--weights", str(tmp_path / "none")])
    assert "retrain" in _one_line_refusal([*measure, "--weights", str(foreign)])
    assert str(junk) in _one_line_refusal([*measure, "--weights", str(junk)])
    too_many = ["world", "evaluator-measure", "--scenes", str(TRAIN_SEED_OFFSET + 1)]
    assert "held-out seeds" in _one_line_refusal(too_many)
