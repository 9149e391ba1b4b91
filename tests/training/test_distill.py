"""Few-step distillation: the student starts as the teacher and beats naive 4-step sampling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from model.sampling import SamplerConfig
from training.cache import CachedBatches, ConsumerConfig
from training.checkpoint import LATEST_FILE, step_name
from training.distill import DistillConfig, distill_step, student_sigmas
from training.loop import METRICS_FILE, TrainResult
from training.pretrain import CACHE_DIR, build_transformer
from training.recipes import distill_debug, pretrain_debug
from training.synthetic import SyntheticDataConfig, build_synthetic_cache
from training.trainer import train

TEACHER_STEPS = 30  # pretraining steps of the teacher (a random teacher is nearly linear)
K = 10  # steps averaged at each end of the distillation run
pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly pretrained teacher (pretrain-debug for TEACHER_STEPS steps) and its cache."""
    out = tmp_path_factory.mktemp("teacher")
    train(pretrain_debug(), out=out, max_steps=TEACHER_STEPS)
    return out


def _config(teacher_run: Path, **loop: Any) -> DistillConfig:
    """distill-debug, distilling the pretrained teacher on its cache."""
    config = distill_debug()
    config.init_from = teacher_run
    config.data.cache_dir = teacher_run / CACHE_DIR
    for name, value in loop.items():
        setattr(config.loop, name, value)
    return config


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows)


def test_student_beats_naive_few_step_sampling(teacher_run: Path, tmp_path: Path) -> None:
    config = _config(teacher_run)
    result = train(config, out=tmp_path)
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, config.loop.max_steps + 1))
    assert result.losses == [r["loss"] for r in rows]

    # Step 1 runs the initial student, the teacher itself: its error is the baseline's.
    assert rows[0]["loss"] == pytest.approx(rows[0]["baseline_mse"], rel=1e-5)
    assert rows[0]["baseline_mse"] > 1e-4  # 4 steps really miss the 40-step output

    first, last = rows[:K], rows[-K:]
    losses = [r["loss"] for r in rows]
    assert _mean(last, "loss") < 0.4 * _mean(first, "loss"), losses
    # On the same noise, the 4-step student is far closer to the teacher than the teacher's
    # own 4-step samples are.
    assert _mean(last, "loss") < 0.3 * _mean(last, "baseline_mse"), losses
    assert all(r["teacher_ms"] > 0 for r in rows)


def _batch(teacher_run: Path) -> dict[str, Any]:
    batches = CachedBatches(teacher_run / CACHE_DIR, ConsumerConfig(batch_size=4))
    batch: dict[str, Any] = next(iter(batches))
    return batch


def test_initial_student_is_the_teacher(teacher_run: Path) -> None:
    config = _config(teacher_run)
    config.validate()
    teacher = build_transformer(config.model, seed=0, init_from=teacher_run, device="cpu")
    student = build_transformer(config.model, seed=0, init_from=teacher_run, device="cpu")
    teacher.eval()
    teacher.requires_grad_(True)  # even trainable, the teacher must stay out of the graph
    batch = _batch(teacher_run)
    out = distill_step(
        student, teacher, batch, config=config, generator=torch.Generator().manual_seed(1)
    )
    metrics = out.metrics
    assert metrics["loss"] == pytest.approx(metrics["baseline_mse"], rel=1e-5)
    assert metrics["loss"] == metrics["student_mse"]
    assert metrics["student_teacher_rmse"] == pytest.approx(metrics["loss"] ** 0.5)
    assert metrics["baseline_mse"] > 1e-4
    torch.autograd.backward(out.loss)
    assert all(p.grad is None for p in teacher.parameters())
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0

    # The student's grid: 4 decreasing steps from noise (1) to data (0).
    grid = student_sigmas(config, seq_len=16)
    assert grid.shape == (config.student_steps + 1,)
    assert float(grid[0]) == 1.0
    assert float(grid[-1]) == 0.0
    assert bool((grid[1:] < grid[:-1]).all())

    # Guidance changes the teacher's target; the unguided student at init no longer equals
    # the guided 4-step teacher.
    config.teacher = SamplerConfig(steps=40, guidance_scale=4.0)
    guided = distill_step(
        student, teacher, batch, config=config, generator=torch.Generator().manual_seed(1)
    ).metrics
    assert abs(guided["teacher_ms"] - metrics["teacher_ms"]) > 1e-4
    assert abs(guided["loss"] - guided["baseline_mse"]) > 1e-6


def test_editing_rows_give_their_inputs_to_teacher_and_student(
    teacher_run: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    build_synthetic_cache(cache, SyntheticDataConfig(images=2, editing_images=2))
    batch = next(iter(CachedBatches(cache, ConsumerConfig(batch_size=4, task="image_editing"))))
    assert "input_latents" in batch
    config = _config(teacher_run)
    teacher = build_transformer(config.model, seed=0, init_from=teacher_run, device="cpu")
    student = build_transformer(config.model, seed=0, init_from=teacher_run, device="cpu")
    teacher.requires_grad_(False).eval()

    def metrics(b: dict[str, Any]) -> dict[str, float]:
        generator = torch.Generator().manual_seed(1)
        return distill_step(student, teacher, b, config=config, generator=generator).metrics

    given = metrics(batch)
    blank = metrics({**batch, "input_latents": torch.zeros_like(batch["input_latents"])})
    # The teacher's target depends on the input images; the initial student still equals it.
    assert abs(given["teacher_ms"] - blank["teacher_ms"]) > 1e-6
    assert given["loss"] == pytest.approx(given["baseline_mse"], rel=1e-5)


def test_config_validates(teacher_run: Path) -> None:
    config = _config(teacher_run)
    config.student_steps = 40
    with pytest.raises(ValueError, match="fewer than the teacher"):
        config.validate()
    config.student_steps = 0
    with pytest.raises(ValueError, match="student_steps"):
        config.validate()
    config = _config(teacher_run)
    config.loss = "l1"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="loss"):
        config.validate()


def test_relative_loss_is_scaled_by_the_teacher_output(teacher_run: Path) -> None:
    config = _config(teacher_run)
    config.loss = "relative"
    teacher = build_transformer(config.model, seed=0, init_from=teacher_run, device="cpu")
    student = build_transformer(config.model, seed=3, init_from=None, device="cpu")
    teacher.requires_grad_(False).eval()
    out = distill_step(
        student, teacher, _batch(teacher_run), config=config, generator=torch.Generator()
    ).metrics
    # Each sample's error in units of its teacher output's mean square: near the batch-wide
    # ratio (per-sample scales differ), far from the absolute error.
    ratio = out["student_mse"] / out["teacher_ms"]
    assert 0.2 * ratio < out["loss"] < 5 * ratio
    assert out["loss"] != out["student_mse"]


def test_killed_run_resumes_exactly(teacher_run: Path, tmp_path: Path) -> None:
    steps = 6
    config = _config(teacher_run, max_steps=steps, checkpoint_every=2)
    reference_out = tmp_path / "reference"
    reference: TrainResult = train(config, out=reference_out)

    out = tmp_path / "killed"
    first = train(config, out=out, max_steps=5)
    assert first.losses == reference.losses[:5]
    # Killed after step 5 but before its checkpoint: `latest` at step 4, a half-written line.
    checkpoints = out / "checkpoints"
    shutil.rmtree(checkpoints / step_name(5))
    (checkpoints / LATEST_FILE).write_text(step_name(4))
    with (out / METRICS_FILE).open("a") as metrics:
        metrics.write('{"step": 6, "lo')

    resumed = train(config, out=out)
    assert resumed.resumed_from == 4
    assert resumed.losses == reference.losses[4:]
    assert [r["step"] for r in _metrics(out)] == list(range(1, steps + 1))
    ours = load_file(str(checkpoints / step_name(steps) / "model.safetensors"))
    theirs = load_file(str(reference_out / "checkpoints" / step_name(steps) / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
