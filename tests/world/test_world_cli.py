"""`flywheel world render | corpus | suite`: what they write, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from flywheel.cli.main import app
from flywheel.world.benchmark import suite
from flywheel.world.corpus import read_specs
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
