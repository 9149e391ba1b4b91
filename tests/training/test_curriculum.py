"""The pretraining curriculum and SFT: editing samples, resolution areas, the T2I : editing mix,
filters tightening per stage, each debug stage's loss falling, sft-debug from a pretrain run."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import nn
from typer.testing import CliRunner

from flywheel.cli.main import app
from model.condition import ConditionEncoder, minilm_condition
from training.cache import CachedBatches, ConsumerConfig
from training.curriculum import (
    DEBUG_CURATED,
    DEBUG_CURRICULUM,
    PRETRAIN_CURRICULUM,
    debug_synthetic,
)
from training.data import Sample, SampleFilter
from training.flow_matching import flow_matching_step
from training.loop import METRICS_FILE, StepOutput, TrainResult
from training.pretrain import PretrainConfig, build_transformer, cached_objective
from training.recipes import RECIPES, pretrain_debug
from training.synthetic import build_synthetic_cache, write_synthetic_dataset
from training.trainer import train

STAGES = ("curriculum-stage1-debug", "curriculum-stage2-debug", "curriculum-stage3-debug")
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The debug curriculum's cache (shapes and edits at 32 and 48 px), built once."""
    path = tmp_path_factory.mktemp("data") / "cache"
    build_synthetic_cache(path, debug_synthetic())
    return path


def _rows(cache: Path) -> Iterator[tuple[int, str, dict[str, Any], list[str]]]:
    """(area, id, filter row, tensor names) of every cached row."""
    for shard in sorted(cache.glob("*/shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            metadata, names = handle.metadata(), list(handle.keys())
        ids, rows = json.loads(metadata["ids"]), json.loads(metadata["rows"])
        for sample_id, row in zip(ids, rows, strict=True):
            yield int(metadata["area"]), sample_id, row, names


def _recipe(name: str, cache: Path, init: Path | None = None) -> PretrainConfig:
    config = RECIPES[name]()
    assert isinstance(config, PretrainConfig)
    config.data.cache_dir = cache
    config.init_from = init
    return config


def _eval_loss(config: PretrainConfig, cache: Path, init: Path | None) -> float:
    """Flow-matching loss of ``init``'s weights on the config's selection (area, filter), over
    both tasks, with fixed noise and times: the same draws for every weights compared."""
    model = build_transformer(config.model, seed=0, init_from=init, device="cpu")
    selection = ConsumerConfig(
        batch_size=8, seed=0, epochs=4, target_area=config.data.target_area,
        filter=config.data.filter,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(123)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in CachedBatches(cache, selection):
            step = flow_matching_step(model, batch, config=config.flow, generator=generator)
            total += float(step.loss) * len(batch["ids"])
            count += len(batch["ids"])
    return total / count


@pytest.fixture(scope="module")
def chain(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainResult]:
    """The three debug stages, each started from the previous one's weights."""
    root = tmp_path_factory.mktemp("chain")
    results: dict[str, TrainResult] = {}
    init = None
    for name in STAGES:
        results[name] = train(_recipe(name, cache, init), out=root / name)
        init = root / name
    return results


# ---- the data ---------------------------------------------------------------------------


def test_editing_samples_and_resolution_areas_in_the_cache(cache: Path, tmp_path: Path) -> None:
    synthetic = debug_synthetic()
    rows = list(_rows(cache))
    small, large = 32 * 32, 48 * 48
    assert json.loads((cache / "manifest.json").read_text())["areas"] == [small, large]
    # Every sample at 32², those drawn at 48 px at 48² too (no upsampling to 48²).
    total = synthetic.images + synthetic.editing_images
    assert len([r for r in rows if r[0] == small]) == total
    assert [r[2]["width"] for r in rows if r[0] == large] == [48] * (total // 2)
    for _, sample_id, row, names in rows:
        assert row["editing"] == sample_id.startswith("synthetic-edit-") == (row["inputs"] == 1)
        assert ("input_latents" in names) == row["editing"]  # shards group by input count

    samples = {s.id: s for s in write_synthetic_dataset(tmp_path, synthetic)}
    encoder = ConditionEncoder.load(minilm_condition())
    batches = list(CachedBatches(cache, ConsumerConfig(batch_size=4, task="image_editing")))
    assert {b["bucket"] for b in batches} == {(32, 32), (48, 48)}
    batch = next(b for b in batches if b["bucket"] == (48, 48))
    b, z = len(batch["ids"]), synthetic.vae.latent_channels
    assert batch["latents"].shape == (b, z, 6, 6)
    assert batch["input_latents"].shape == (b, 1, z, 6, 6)  # (B, K, z, h, w), the target's
    for n, sample_id in enumerate(batch["ids"]):
        sample: Sample = samples[sample_id]
        assert sample.instruction is not None
        assert sample.instruction.startswith("make the ")
        # The condition is the instruction under the editing template, not the T2I one.
        hidden, mask = encoder.encode([sample.instruction], task="image_editing")
        length = int(mask.sum())
        assert int(batch["mask"][n].sum()) == length
        torch.testing.assert_close(
            batch["condition"][n, :length], hidden[0, :length], atol=1e-5, rtol=1e-5
        )
        text, _ = encoder.encode([sample.instruction], task="text_to_image")
        assert not torch.allclose(text[0, :length], hidden[0, :length], atol=1e-3)
    # Inputs and targets differ only in the shape's colour: close, not equal.
    gap = (batch["input_latents"][:, 0] - batch["latents"]).abs().mean()
    assert 0 < float(gap) < float(batch["latents"].abs().mean())

    # The flow-matching step feeds the inputs to the transformer: other inputs, another loss.
    config = _recipe(STAGES[0], cache)
    model = build_transformer(config.model, seed=0, init_from=None, device="cpu")
    blank = {**batch, "input_latents": torch.zeros_like(batch["input_latents"])}
    with torch.no_grad():
        steps = [flow_matching_step(model, b, config=config.flow, generator=torch.Generator())
                 for b in (batch, blank)]  # fmt: skip
    assert float(steps[0].loss) != float(steps[1].loss)


def test_filters_tighten_stage_by_stage(cache: Path) -> None:
    # The debug stages on the cached rows (every sample is at the 32² area).
    rows = [(i, row) for area, i, row, _ in _rows(cache) if area == 32 * 32]
    filters = [stage.filter for stage in DEBUG_CURRICULUM] + [DEBUG_CURATED]
    kept = [{i for i, row in rows if f.accepts(row)} for f in filters]
    assert len(kept[0]) == len(rows)
    for looser, stricter in itertools.pairwise(kept):
        assert stricter < looser  # a strict subset: each stage drops something
    assert len(kept[-1]) >= 12  # the curated subset still has data
    # The real stages on rows of every size and annotation.
    grid = [
        {"dataset": "web", "editing": False, "inputs": 0, "width": side, "height": side,
         "annotation": {"image_type": "photograph", "style": "realistic", "language": None,
                        "watermarks": ["w"] * marks, "abnormal_element": abnormal}}
        for side in (300, 600, 1400) for marks in (0, 1) for abnormal in (None, "QR code")
    ]  # fmt: skip
    real = [{n for n, row in enumerate(grid) if s.filter.accepts(row)} for s in PRETRAIN_CURRICULUM]
    assert real[0] > real[1] > real[2] == {8}  # 1400 px, no watermark, nothing abnormal
    for stages in (DEBUG_CURRICULUM, PRETRAIN_CURRICULUM):
        assert [s.edit_fraction for s in stages] == [0.1, 0.2, 0.3]  # 9:1 -> 8:2 -> 7:3
        areas = [s.target_area for s in stages]
        assert areas == sorted(areas)
        assert areas[0] < areas[-1]
    for name in ("pretrain-stage1", "pretrain-stage2", "pretrain-stage3"):
        config = RECIPES[name]()
        assert isinstance(config, PretrainConfig)
        assert config.data.cache_dir is None  # comes from --data
        assert config.loop.device == "cuda"
    assert "--init" in (RECIPES["pretrain-stage2"].__doc__ or "")


# ---- the T2I : editing mix ----------------------------------------------------------------


def _recording_objective(cache: Path, fraction: float, seen: list[dict[str, Any]]) -> Any:
    def step(batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
        seen.append(batch)
        return StepOutput(loss=torch.zeros(()), metrics={})

    return cached_objective(
        nn.Linear(1, 1), cache, batch_size=4, seed=0, step=step, edit_fraction=fraction,
        sample_filter=SampleFilter(max_watermarks=0), target_area=32 * 32,
    )  # fmt: skip


def test_mixing_ratio_follows_edit_fraction_and_resumes(cache: Path) -> None:
    seen: list[dict[str, Any]] = []
    objective = _recording_objective(cache, 0.3, seen)
    generator = torch.Generator().manual_seed(7)
    steps = 1200
    editing = [objective.step(generator).metrics["editing"] for _ in range(steps)]
    # Each step's choice is the generator's next uniform draw below the fraction.
    draws = torch.rand(steps, generator=torch.Generator().manual_seed(7))
    assert editing == [float(u < 0.3) for u in draws.tolist()]
    assert abs(sum(editing) / steps - 0.3) < 0.04  # 3 sd of a binomial share
    for batch, chosen in zip(seen, editing, strict=True):
        assert ("input_latents" in batch) == bool(chosen)
        assert batch["bucket"] == (32, 32)

    # Resume: both streams' positions and the generator give the same next batches.
    state = json.loads(json.dumps(objective.data_state()))
    assert set(state) == {"text_to_image", "image_editing"}
    ahead = [objective.step(generator).metrics["editing"] for _ in range(200)]
    again: list[dict[str, Any]] = []
    resumed = _recording_objective(cache, 0.3, again)
    resumed.load_data_state(state)
    replay = torch.Generator().manual_seed(7)
    torch.rand(steps, generator=replay)  # where the first run's generator was
    assert [resumed.step(replay).metrics["editing"] for _ in range(200)] == ahead
    assert [b["ids"] for b in again] == [b["ids"] for b in seen[steps:]]

    for fraction in (0.0, 1.0):
        objective = _recording_objective(cache, fraction, [])
        assert {objective.step(generator).metrics["editing"] for _ in range(50)} == {fraction}


# ---- the debug stages and SFT --------------------------------------------------------------


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


def test_each_debug_stage_loss_falls(cache: Path, chain: dict[str, TrainResult]) -> None:
    init = None
    for number, name in enumerate(STAGES, start=1):
        result = chain[name]
        config = _recipe(name, cache, init)
        assert result.step == config.loop.max_steps
        before = _eval_loss(config, cache, init)
        out = result.metrics.parent
        after = _eval_loss(config, cache, out)
        # From random weights the loss collapses; later stages start from a trained model at a
        # new resolution or on cleaner data, and still improve on it.
        assert after < (0.2 if number == 1 else 0.85) * before, (name, before, after)
        share = sum(r["editing"] for r in _metrics(out)) / result.step
        assert abs(share - DEBUG_CURRICULUM[number - 1].edit_fraction) < 0.15, (name, share)
        init = out


def test_a_stage_resumes_exactly(
    cache: Path, chain: dict[str, TrainResult], tmp_path: Path
) -> None:
    """Stage 2 (two streams, a filter, another area) stopped at step 9 and resumed."""
    stage1 = chain[STAGES[0]].metrics.parent
    reference = chain[STAGES[1]].losses
    first = train(_recipe(STAGES[1], cache, stage1), out=tmp_path, max_steps=9)
    assert first.losses == reference[:9]
    resumed = train(_recipe(STAGES[1], cache, stage1), out=tmp_path, max_steps=18)
    assert resumed.resumed_from == 9
    assert resumed.losses == reference[9:18]


def test_sft_debug_from_a_pretrain_run(cache: Path, tmp_path: Path) -> None:
    pretrained = tmp_path / "pretrain"
    train(pretrain_debug(), out=pretrained, max_steps=30)
    sft = tmp_path / "sft"
    result = train(_recipe("sft-debug", cache, pretrained), out=sft)  # --init, --data
    assert not (sft / "cache").exists()  # read the given cache

    config = _recipe("sft-debug", cache)
    random = _eval_loss(config, cache, None)
    before = _eval_loss(config, cache, pretrained)
    after = _eval_loss(config, cache, sft)
    assert before < 0.5 * random  # it starts from the pretrained weights...
    assert after < 0.75 * before  # ...and fits the curated data
    rows = {i: row for area, i, row, _ in _rows(cache) if area == 48 * 48}
    curated = {
        i for i, row in rows.items()
        if not row["annotation"]["watermarks"] and row["annotation"]["abnormal_element"] is None
        and row["annotation"]["image_type"] != "icon"
    }  # fmt: skip
    selection = ConsumerConfig(
        batch_size=4, target_area=config.data.target_area, filter=config.data.filter
    )
    assert sorted(i for b in CachedBatches(cache, selection) for i in b["ids"]) == sorted(curated)
    assert result.step == len(_metrics(sft)) == config.loop.max_steps
    assert config.loop.optimizer.lr < min(stage.lr for stage in DEBUG_CURRICULUM)


def test_cli_data_flag(cache: Path, tmp_path: Path) -> None:
    listed = runner.invoke(app, ["train", "--list"])
    for name in (*STAGES, "sft-debug", "pretrain-stage1", "pretrain-stage2", "pretrain-stage3"):
        assert f"{name}: " in listed.output

    def one_line_error(*args: str) -> str:
        result = runner.invoke(app, ["train", *args, "--out", str(tmp_path / "x")])
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1
        return result.output

    assert "give --data DIR" in one_line_error("pretrain-stage1")
    assert "no such directory" in one_line_error("pretrain-stage1", "--data", str(tmp_path / "n"))
    # The real stages read f16c64 latents and 4096-d conditions, not the debug cache's.
    assert "8-channel latents" in one_line_error("pretrain-stage2", "--data", str(cache))
    # A stage's area must be in the cache.
    small = tmp_path / "small"
    shutil.copytree(cache, small)
    manifest = json.loads((small / "manifest.json").read_text())
    (small / "manifest.json").write_text(json.dumps({**manifest, "areas": [32 * 32]}))
    assert "not the target_area 2304" in one_line_error(
        "curriculum-stage2-debug", "--data", str(small)
    )
    assert not (tmp_path / "x" / "checkpoints").exists()
    incomplete = tmp_path / "incomplete"
    shutil.copytree(cache, incomplete)
    (incomplete / "DONE").unlink()
    assert "not a complete training cache" in one_line_error(
        "curriculum-stage1-debug", "--data", str(incomplete)
    )

    out = tmp_path / "debug"
    args = ["train", "curriculum-stage1-debug", "--data", str(cache), "--max-steps", "2"]
    ran = runner.invoke(app, [*args, "--out", str(out), "--no-progress"])
    assert ran.exit_code == 0, ran.output
    assert not (out / "cache").exists()
    assert [r["step"] for r in _metrics(out)] == [1, 2]
