"""Pretraining: the flow-matching loss falls, checkpoints resume exactly, the CLI runs recipes."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from flywheel.cli.main import app
from model.transformer import DiffusionTransformer, transformer_debug
from training.checkpoint import (
    LATEST_FILE,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    step_name,
)
from training.flow_matching import FlowMatchingConfig, flow_matching_step, sample_timesteps
from training.loop import METRICS_FILE, OptimizerConfig, TrainResult
from training.plot import PLOT_FILE
from training.pretrain import PretrainConfig, build_transformer
from training.recipes import RECIPES, pretrain_debug
from training.synthetic import build_synthetic_cache
from training.trainer import train

STEPS = 60  # pretrain-debug's max_steps
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pretrain-debug's synthetic cache, built once for the module."""
    synthetic = pretrain_debug().data.synthetic
    assert synthetic is not None
    path = tmp_path_factory.mktemp("data") / "cache"
    build_synthetic_cache(path, synthetic)
    return path


def _config(cache: Path) -> PretrainConfig:
    config = pretrain_debug()
    config.data.cache_dir = cache
    return config


def _metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult]:
    """An uninterrupted pretrain-debug run of STEPS steps."""
    out = tmp_path_factory.mktemp("reference")
    return out, train(_config(cache), out=out)


def test_loss_falls_and_metrics_are_written(reference: tuple[Path, TrainResult]) -> None:
    out, result = reference
    assert result.step == STEPS
    assert result.resumed_from is None
    assert len(result.losses) == STEPS
    first = sum(result.losses[:10]) / 10
    last = sum(result.losses[-10:]) / 10
    assert last < 0.4 * first, (first, last)

    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == result.losses
    for row in rows:
        assert {"t_mean", "target_ms", "prediction_ms", "grad_norm", "lr"} <= row.keys()
        assert 0 < row["t_mean"] < 1
        assert math.isfinite(row["loss"])
    assert rows[0]["lr"] < rows[-1]["lr"] == pretrain_debug().loop.optimizer.lr  # warm-up

    # Checkpoints every 20 steps and at the end; keep_checkpoints=2 keeps the newest two.
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [step_name(40), step_name(60)]
    assert result.checkpoint == latest_checkpoint(checkpoints) == checkpoints / step_name(60)


def test_killed_run_resumes_to_the_same_losses_and_weights(
    cache: Path, reference: tuple[Path, TrainResult], tmp_path: Path
) -> None:
    ref_out, ref = reference
    first = train(_config(cache), out=tmp_path, max_steps=25)
    assert first.step == 25
    assert first.losses == ref.losses[:25]

    # The state a run leaves when killed after step 25 but before its step-25 checkpoint:
    # metrics up to 25, `latest` at step 20.
    checkpoints = tmp_path / "checkpoints"
    shutil.rmtree(checkpoints / step_name(25))
    (checkpoints / LATEST_FILE).write_text(step_name(20))
    with (tmp_path / METRICS_FILE).open("a") as metrics:  # killed while writing step 26's
        metrics.write('{"step": 26, "loss": 0.')

    resumed = train(_config(cache), out=tmp_path)
    assert resumed.resumed_from == 20
    assert resumed.step == STEPS
    assert len(resumed.losses) == STEPS - 20
    for got, want in zip(resumed.losses, ref.losses[20:], strict=True):
        assert abs(got - want) <= 1e-6
    assert [r["step"] for r in _metrics(tmp_path)] == list(range(1, STEPS + 1))

    ours = load_file(str(checkpoints / step_name(STEPS) / "model.safetensors"))
    theirs = load_file(str(ref_out / "checkpoints" / step_name(STEPS) / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert torch.allclose(tensor, theirs[name], rtol=0, atol=1e-6), name

    # At max_steps already: nothing to do, nothing written.
    done = train(_config(cache), out=tmp_path)
    assert done.step == STEPS
    assert done.losses == []
    assert done.resumed_from == STEPS


def test_resume_refuses_another_seed(cache: Path, tmp_path: Path) -> None:
    train(_config(cache), out=tmp_path, max_steps=2)
    other = _config(cache)
    other.loop.seed = 1
    with pytest.raises(CheckpointError, match=r"another configuration .*loop\.seed"):
        train(other, out=tmp_path, max_steps=4)


def test_resume_refuses_another_learning_rate(cache: Path, tmp_path: Path) -> None:
    train(_config(cache), out=tmp_path, max_steps=2)
    other = _config(cache)
    other.loop.optimizer.lr *= 2
    with pytest.raises(CheckpointError, match=r"differs in loop\.optimizer\.lr\)"):
        train(other, out=tmp_path, max_steps=4)
    # What does not change the training may change: more steps, another log interval.
    same = _config(cache)
    same.loop.log_every = 3
    same.loop.keep_checkpoints = None
    assert train(same, out=tmp_path, max_steps=3).resumed_from == 2


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    config = transformer_debug()
    config.latent_channels = 8
    torch.manual_seed(0)
    model = DiffusionTransformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    generator = torch.Generator().manual_seed(3)
    batch = {
        "latents": torch.randn(2, 8, 2, 2),
        "condition": torch.randn(2, 3, 384),
        "mask": torch.tensor([[True, True, False], [True, True, True]]),
    }
    step = flow_matching_step(model, batch, config=FlowMatchingConfig(), generator=generator)
    torch.autograd.backward(step.loss)
    optimizer.step()
    data = {"epoch": 1, "shard": 0, "offset": 4, "order": "shuffled", "bucket": "32x32"}
    path = save_checkpoint(
        tmp_path,
        step=1,
        model=model,
        optimizer=optimizer,
        rng={"noise": generator.get_state()},
        data=data,
        extra={"note": "x"},
    )
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert loaded.path == path
    assert loaded.step == 1
    assert loaded.data == data
    assert loaded.extra == {"note": "x"}
    assert torch.equal(loaded.rng["noise"], generator.get_state())
    want = optimizer.state_dict()
    assert loaded.optimizer["param_groups"] == want["param_groups"]  # betas stay a tuple
    assert loaded.optimizer["state"].keys() == want["state"].keys()
    for index, state in want["state"].items():
        for name, value in state.items():
            assert torch.equal(loaded.optimizer["state"][index][name], value)
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model[name], value)
    with pytest.raises(CheckpointError, match="already the latest"):
        save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer, rng={}, data=data)
    assert load_checkpoint(tmp_path / "empty") is None


def test_logit_normal_timesteps() -> None:
    generator = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, FlowMatchingConfig(logit_mean=1.0, logit_std=0.5), generator)
    assert float(t.min()) > 0
    assert float(t.max()) < 1
    logits = torch.logit(t)
    assert abs(float(logits.mean()) - 1.0) < 0.02
    assert abs(float(logits.std()) - 0.5) < 0.02
    shifted = sample_timesteps(
        20000, FlowMatchingConfig(shift=3.0), torch.Generator().manual_seed(0)
    )
    assert float(shifted.mean()) > 0.6  # shift > 1 moves times towards noise


def test_cli_lists_and_runs_a_recipe(tmp_path: Path) -> None:
    listed = runner.invoke(app, ["train", "--list"])
    assert listed.exit_code == 0, listed.output
    assert "pretrain-debug" in RECIPES
    assert "pretrain-debug" in listed.output

    unknown = runner.invoke(app, ["train", "no-such-recipe", "--out", str(tmp_path)])
    assert unknown.exit_code == 2
    assert "no-such-recipe" in unknown.output
    assert len(unknown.output.strip().splitlines()) == 1

    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "pretrain-debug", "--max-steps", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "step 3" in result.output
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]
    assert latest_checkpoint(out / "checkpoints") == out / "checkpoints" / step_name(3)
    assert (out / "cache" / "DONE").is_file()
    with Image.open(out / PLOT_FILE) as plot:  # the training curves
        assert plot.format == "PNG"
        assert plot.width > 400
    assert "curves in" in result.output

    # A damaged latest checkpoint: one line, exit code 2 (bad input), nothing trained.
    (out / "checkpoints" / step_name(3) / "model.safetensors").write_bytes(b"\x00" * 16)
    damaged = runner.invoke(app, ["train", "pretrain-debug", "--max-steps", "4", "--out", str(out)])
    assert damaged.exit_code == 2, damaged.output
    assert len(damaged.output.strip().splitlines()) == 1
    assert "unreadable checkpoint" in damaged.output
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]


def test_non_finite_loss_stops_before_the_checkpoint(cache: Path, tmp_path: Path) -> None:
    poisoned = tmp_path / "cache"
    shutil.copytree(cache, poisoned)
    for shard in sorted(poisoned.glob("*/shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(shard))
        tensors["latents"] = torch.full_like(tensors["latents"], math.nan)
        save_file(tensors, str(shard), metadata=metadata)
    config = _config(poisoned)
    with pytest.raises(ValueError, match="step 1: loss nan"):
        train(config, out=tmp_path / "run", max_steps=2)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints") is None


def test_synthetic_config_is_validated() -> None:
    config = pretrain_debug()
    assert config.data.synthetic is not None
    config.data.synthetic.size = 30  # not a multiple of the debug VAE's factor
    with pytest.raises(ValueError, match="multiple of the VAE's spatial factor"):
        config.validate()
    config.data.synthetic.size = 32
    config.data.synthetic.images = 0
    with pytest.raises(ValueError, match="images"):
        config.validate()


def test_init_from_a_run(tmp_path: Path) -> None:
    first = tmp_path / "pretrain"
    ran = runner.invoke(app, ["train", "pretrain-debug", "--max-steps", "2", "--out", str(first)])
    assert ran.exit_code == 0, ran.output
    trained = load_checkpoint(first / "checkpoints")
    assert trained is not None

    # Any of the three forms of --init names the same weights.
    config = pretrain_debug().model
    for path in (first, first / "checkpoints", trained.path):
        model = build_transformer(config, seed=5, init_from=path, device="cpu")
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in trained.model.items())

    second = tmp_path / "dpo"
    args = ["train", "dpo-debug", "--max-steps", "1", "--out", str(second), "--init", str(first)]
    assert runner.invoke(app, args).exit_code == 0

    missing = runner.invoke(app, [*args[:-1], str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert "no such file" in missing.output
    small = pretrain_debug().model
    small.num_layers = 1
    with pytest.raises(CheckpointError, match="do not fit the configured transformer"):
        build_transformer(small, seed=0, init_from=first, device="cpu")
    empty = runner.invoke(app, [*args[:-3], str(tmp_path / "x"), "--init", str(tmp_path)])
    assert empty.exit_code == 2
    assert "no checkpoint here" in empty.output


def test_learning_rate_schedule() -> None:
    constant = OptimizerConfig(lr=1.0, warmup_steps=4)
    assert [constant.learning_rate(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = OptimizerConfig(lr=1.0, warmup_steps=2, decay_steps=10, min_lr_ratio=0.1)
    rates = [cosine.learning_rate(s) for s in range(16)]
    assert rates[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in itertools.pairwise(rates[2:13]))  # decays...
    assert rates[7] == pytest.approx(0.55)  # ...through the midpoint...
    assert rates[12:] == [pytest.approx(0.1)] * 4  # ...to its floor, and stays
    with pytest.raises(ValueError, match="decay_steps"):
        OptimizerConfig(decay_steps=0).validate()


def test_checkpoint_of_tied_weights(tmp_path: Path) -> None:
    """An LM's tied embeddings and head share memory; the checkpoint stores both, equal."""
    embedding, head = torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False)
    head.weight = embedding.weight
    model = torch.nn.Sequential(embedding, head)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, step=1, model=model, optimizer=optimizer, rng={}, data={})
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    assert torch.equal(loaded.model["0.weight"], loaded.model["1.weight"])
    assert torch.equal(loaded.model["0.weight"], embedding.weight.detach())
