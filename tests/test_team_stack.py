"""The team's stack of the acid test (:mod:`tests.team_stack`), part by part: every table of
its project file a non-world adapter that ``flywheel doctor`` passes, its data shaped for the
tracks, its judge judging for real, and its trainer training rounds for real in its own
process through the command launcher."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from flywheel.adapters.base import AdapterContext
from flywheel.adapters.launchers import write_manifest
from flywheel.cli.main import app
from flywheel.media.filters import difference_hash
from flywheel.ports import PORTS, JudgeRequest, PortError, PortName, RoundManifest
from flywheel.project import PartSection, Project, build_part, read_project
from flywheel.settings import get_settings
from tests.team_stack import (
    COLOURS,
    ENHANCER_DIR,
    ENHANCER_SYSTEM_PROMPT,
    GENERATOR_DIR,
    NEAR_DUPLICATE_BITS,
    POOL_ITEMS,
    RARE_COLOUR,
    RARE_IN_POOL,
    RARE_IN_TRAIN,
    SIZE,
    TRAIN_ITEMS,
    JudgeServer,
    app_image,
    build_team_stack,
    trainer_main,
)

EXPECTED_ADAPTERS = {
    "generator": "diffusers",
    "judge": "http",
    "suites": "jsonl",
    "reward": "open_clip",
    "enhancer": "causal_lm",
    "corpus": "directory",
    "degrader": "rules",
    "launcher": "command",
}
BLOCK_WORLD = """\
import importlib.abc
import sys


class BlockWorld(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "flywheel.world" or name.startswith("flywheel.world."):
            raise ImportError(f"{name} may not be imported by a team's trainer")
        return None


sys.meta_path.insert(0, BlockWorld())
"""


@pytest.fixture(scope="module")
def judge() -> Iterator[JudgeServer]:
    with JudgeServer() as server:
        yield server
    assert server.errors == []


@pytest.fixture(scope="module")
def stack(offline: None, judge: JudgeServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_team_stack(tmp_path_factory.mktemp("team"), judge_url=judge.url)


@pytest.fixture(scope="module")
def project(stack: Path) -> Project:
    return read_project(stack)


@pytest.fixture
def no_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes started from here (the trainer) fail to import ``flywheel.world``."""
    site = tmp_path / "block-world"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_WORLD)
    monkeypatch.setenv("PYTHONPATH", str(site))


def _part(project: Project, port: PortName, **changes: Any) -> Any:
    """The part the project builds for ``port``, with settings of its section changed."""
    section = project.section(port)
    assert section is not None
    values = {"adapter": section.adapter, **section.settings(), **changes}
    changed = project.model_copy(update={port: PartSection.model_validate(values)})
    built = build_part(changed, port, AdapterContext(root=project.root, home=project.root))
    assert built is not None
    return built.part


def _manifest(directory: Path, **fields: Any) -> Path:
    values: dict[str, Any] = {
        "round_id": 1,
        "cycle_id": 1,
        "output_dir": "out",
        "work_dir": "work",
        **fields,
    }
    return write_manifest(directory / "manifest.json", RoundManifest.model_validate(values))


def _log(manifest: Path) -> str:
    return (manifest.parent / "work" / "launch.log").read_text()


# ---- the project file and doctor -------------------------------------------------------------


def test_every_table_of_the_team_project_names_a_non_world_adapter(project: Project) -> None:
    for port, adapter in EXPECTED_ADAPTERS.items():
        section = project.section(port)  # type: ignore[arg-type]
        assert section is not None
        assert section.adapter == adapter
    assert project.synthesizer is None
    assert not project.is_world
    assert [root.name for root in project.images.file_roots] == ["app-images"]
    assert (project.root / project.images.file_roots[0]).is_dir()
    assert project.filters.min_side <= SIZE


def test_flywheel_doctor_passes_every_part_of_the_team_stack(
    stack: Path, judge: JudgeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    asked = judge.requests
    try:
        result = CliRunner().invoke(app, ["doctor", "--project", str(stack)])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    states: dict[str, list[str]] = {}
    for line in result.output.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if len(cells) == 4 and cells[0] in PORTS:
            states[cells[0]] = cells[1:3]
    for port, adapter in EXPECTED_ADAPTERS.items():
        assert states[port] == [adapter, "ok"], result.output
    assert states["synthesizer"] == ["-", "ok"]
    assert "generated one 32x32 image" in result.output
    assert "suites: standard 12, regression 8" in result.output
    assert "failed" not in result.output
    assert judge.requests == asked + 1  # doctor judged its one image at the service


# ---- the data --------------------------------------------------------------------------------


def test_the_corpus_makes_purple_rare_in_train_and_plentiful_in_the_pool(
    project: Project,
) -> None:
    corpus = _part(project, "corpus")
    train, pool = list(corpus.items("train")), list(corpus.items("pool"))
    assert (len(train), len(pool)) == (TRAIN_ITEMS, POOL_ITEMS)
    rare = f"colour:{RARE_COLOUR}"
    assert sum(rare in item.tags for item in train) == RARE_IN_TRAIN
    assert sum(rare in item.tags for item in pool) == RARE_IN_POOL
    first = train[0]
    assert first.rich_caption.startswith("A picture with a ")
    assert first.raw_caption in first.rich_caption
    assert {tag.split(":")[0] for tag in first.tags} == {"colour", "shape"}
    # 32x32 images, none a near-duplicate of another (the filter chain's hash).
    hashes = []
    for item in [*train, *pool]:
        image = corpus.image(item)
        assert tuple(image.shape) == (3, SIZE, SIZE)
        hashes.append(difference_hash(image))
    assert all(
        (a ^ b).bit_count() > NEAR_DUPLICATE_BITS
        for k, a in enumerate(hashes)
        for b in hashes[k + 1 :]
    )
    degraded = _part(project, "degrader").degrade(
        ["A picture with a grey background showing a large purple circle at the top left."],
        seed=0,
    )
    assert degraded == ["a violet circle"]


def _pixels(uri: str) -> torch.Tensor:
    with Image.open(uri.removeprefix("file://")) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def test_the_judge_passes_the_colour_an_image_shows_and_fails_the_others(
    stack: Path, project: Project, judge: JudgeServer
) -> None:
    service = _part(project, "judge")
    uris = {colour: app_image(stack.parent, f"judged-{colour}", colour) for colour in COLOURS}
    assert all(uri.startswith(f"file://{stack.parent}/app-images/") for uri in uris.values())
    requests = [
        JudgeRequest(
            prompt=f"a {colour} shape",
            image=_pixels(uri),
            spec={"elements": [f"a {other} shape" for other in COLOURS]},
        )
        for colour, uri in uris.items()
    ]
    verdicts = service.judge(requests)
    for colour, verdict in zip(COLOURS, verdicts, strict=True):
        passed = {e.element: e.passed for e in verdict.elements}
        assert passed == {f"a {other} shape": other == colour for other in COLOURS}
        assert all(0 <= e.score <= 1 for e in verdict.elements)
    # The users' words: violet is purple; no spec: the prompt is the element.
    violet = app_image(stack.parent, "judged-violet", "violet")
    (verdict,) = service.judge([JudgeRequest(prompt="a violet square", image=_pixels(violet))])
    assert verdict.passed
    (grey,) = service.judge([JudgeRequest(prompt="a red square", image=torch.full((3, 8, 8), 0.5))])
    assert not grey.passed
    assert grey.elements[0].reason == "no shape found"


# ---- the trainer -----------------------------------------------------------------------------


def test_the_trainer_runs_a_pe_sft_round_and_writes_an_enhancer_that_loads(
    stack: Path, project: Project, tmp_path: Path, no_world: None
) -> None:
    from training.pe_sft import DEBUG_SYSTEM_PROMPT, write_pairs

    assert ENHANCER_SYSTEM_PROMPT == DEBUG_SYSTEM_PROMPT  # what the enhancer serves with
    corpus = _part(project, "corpus")
    pairs = [(item.raw_caption, item.rich_caption) for item in corpus.items("train")]
    write_pairs(tmp_path / "pairs.jsonl", pairs)
    manifest = _manifest(
        tmp_path,
        track="prompt_enhancer",
        recipe="pe_sft",
        base_checkpoint=str(stack.parent / ENHANCER_DIR),
        artefacts={"pairs": "pairs.jsonl"},
        budget={"pe_sft": 8},
        settings={"seed": 0},  # the trainer's own defaults for its enhancer do the rest
    )
    result = _part(project, "launcher").launch(manifest)
    assert result.checkpoint == tmp_path / "out"
    metrics = result.metrics
    assert metrics["steps"] == 8
    assert metrics["loss_last_mean"] < metrics["loss_first_mean"] - 0.5
    assert json.loads((result.checkpoint / "metrics.json").read_text()) == metrics
    log = _log(manifest)
    assert "pe_sft step 1/8 loss" in log
    assert "pe_sft step 8/8 loss" in log
    enhancer = _part(project, "enhancer", path=str(result.checkpoint))
    (rewrite,) = enhancer.enhance(["red square"])
    assert isinstance(rewrite, str)


def _dataset(project: Project, out: Path) -> Path:
    """The corpus' train split as a :mod:`training.data` dataset (what a continued-pretraining
    round reads)."""
    from training.data import Provenance, Sample, write_dataset

    corpus = _part(project, "corpus")
    samples = []
    for item in corpus.items("train"):
        source = Path(item.image.removeprefix("file://"))
        (out / "images").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out / "images" / source.name)
        samples.append(
            Sample(
                id=item.id,
                image=f"images/{source.name}",
                caption=item.rich_caption,
                provenance=Provenance(dataset="team-shapes", split="train", origin_uri=item.image),
            )
        )
    write_dataset(out, samples)
    return out


def _transformer(pipeline: Path) -> dict[str, torch.Tensor]:
    return load_file(str(pipeline / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_the_trainer_runs_a_continued_pretraining_round_and_writes_a_pipeline_that_generates(
    stack: Path, project: Project, tmp_path: Path, no_world: None
) -> None:
    base = stack.parent / GENERATOR_DIR
    _dataset(project, tmp_path / "dataset")
    manifest = _manifest(
        tmp_path,
        track="pretraining_gap",
        recipe="continued_pretraining",
        base_checkpoint=str(base),
        artefacts={"dataset": "dataset"},
        budget={"continued_pretraining": 10},
        settings={"lr": 1e-3, "batch_size": 8, "seed": 0},
    )
    result = _part(project, "launcher").launch(manifest)
    metrics = result.metrics
    assert metrics["recipe"] == "continued_pretraining"
    assert metrics["objective"] == "flow_matching"
    assert metrics["steps"] == 10
    assert metrics["samples"] == TRAIN_ITEMS
    assert metrics["eval_loss_after"] < 0.9 * metrics["eval_loss_before"]
    assert metrics["loss_last"] < metrics["loss_first"]
    log = _log(manifest)
    assert "continued_pretraining step 10/10 loss" in log
    # A whole pipeline the diffusers adapter serves; its transformer moved, the rest did not.
    assert (result.checkpoint / "model_index.json").is_file()
    before, after = _transformer(base), _transformer(result.checkpoint)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    generator = _part(project, "generator", path=str(result.checkpoint))
    images = generator.generate(["a purple circle on a grey background"], seed=0)
    assert tuple(images.shape) == (1, 3, SIZE, SIZE)


def test_the_trainer_runs_a_diffusion_dpo_round_on_preference_pairs(
    stack: Path, project: Project, tmp_path: Path, no_world: None
) -> None:
    corpus = _part(project, "corpus")
    items = list(corpus.items("train"))[:12]
    lines: list[dict[str, Any]] = [
        {
            "prompt": item.rich_caption,
            "chosen": item.image,
            "rejected": other.image,
            "source": "pairwise",
            "category": "default",
            "case_id": number,
        }
        for number, (item, other) in enumerate(zip(items, items[1:] + items[:1], strict=True))
    ]
    # A pair whose image is not on this trainer's disk is left out, not fatal.
    lines.append({**lines[0], "rejected": "s3://team-images/elsewhere.png"})
    (tmp_path / "preferences.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    manifest = _manifest(
        tmp_path,
        track="rl",
        recipe="diffusion_dpo",
        base_checkpoint=str(stack.parent / GENERATOR_DIR),
        artefacts={"preferences": "preferences.jsonl"},
        budget={"diffusion_dpo": 6},
        settings={"lr": 1e-3, "batch_size": 6},
    )
    result = _part(project, "launcher").launch(manifest)
    metrics = result.metrics
    assert metrics["objective"] == "diffusion_dpo"
    assert metrics["samples"] == 12
    assert metrics["skipped"] == 1
    # The model starts as its reference: the loss is log 2, then the pairs pull it down.
    assert abs(metrics["eval_loss_before"] - np.log(2)) < 1e-6
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert (result.checkpoint / "transformer").is_dir()


def test_a_manifest_the_trainer_cannot_run_fails_the_round_with_its_one_line_error(
    stack: Path, project: Project, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _manifest(
        tmp_path,
        track="rl",
        recipe="flow_grpo",
        base_checkpoint=str(stack.parent / GENERATOR_DIR),
        artefacts={},
        budget={"flow_grpo": 2},
    )
    with pytest.raises(PortError) as failed:
        _part(project, "launcher").launch(manifest)
    message = str(failed.value)
    assert "exited with code 2" in message
    assert "last line: trainer: error: recipe 'flow_grpo' is not trained here" in message
    # Read by the trainer itself (the launcher checks a manifest before it runs one).
    (tmp_path / "broken.json").write_text("{not json")
    missing = _manifest(
        tmp_path / "missing",
        track="pretraining_gap",
        recipe="continued_pretraining",
        base_checkpoint="base",
        artefacts={},
        budget={"continued_pretraining": 2},
    )
    for path, expected in [
        (tmp_path / "broken.json", "broken.json: not a round manifest ((file): Invalid JSON"),
        (tmp_path / "nowhere.json", "nowhere.json: cannot be read"),
        (missing, "a continued_pretraining round needs artefacts['dataset']"),
    ]:
        assert trainer_main(["--manifest", str(path)]) == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("trainer: error: ")
        assert expected in lines[0]
    assert trainer_main([]) == 2
    assert "usage" in capsys.readouterr().err
