"""The pretraining loop: AdamW on the flow-matching step, metrics, resumable checkpoints.

:func:`train` writes into an output directory::

    <out>/metrics.jsonl     one JSON object per optimizer step: ``step``, ``loss``, the
                            objective's figures (:func:`training.flow_matching.flow_matching_step`),
                            ``grad_norm``, ``lr``
    <out>/checkpoints/      :mod:`training.checkpoint` (every ``checkpoint_every`` steps, last step)
    <out>/cache/            the training cache, when the configuration generates one

When ``<out>/checkpoints`` holds a checkpoint, :func:`train` continues from it: weights,
optimizer, step, the noise generator and the data position are restored, and the metrics of
steps after the checkpoint (written by a run killed before its next checkpoint) are dropped,
so an interrupted and resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from model.transformer import DiffusionTransformer
from training.cache import DONE_FILE, MANIFEST_FILE, CachedBatches, ConsumerConfig, hash_seeds
from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.flow_matching import flow_matching_step
from training.io import atomic_write_text
from training.recipes import DataConfig, OptimizerConfig, PretrainConfig
from training.synthetic import build_synthetic_cache

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
CACHE_DIR = "cache"
NOISE_RNG = "noise"
"""Name of the noise / flow-time generator's state in a checkpoint."""


@dataclass(kw_only=True, slots=True)
class TrainResult:
    """What a :func:`train` call did."""

    step: int
    """Optimizer steps taken in total (this call's and those resumed from)."""
    resumed_from: int | None
    """Step of the checkpoint the call continued from; None: it started fresh."""
    losses: list[float]
    """Loss of each step this call ran, in order."""
    checkpoint: Path | None
    """The latest checkpoint when the call returned; None: none written."""
    metrics: Path
    """The metrics file (``<out>/metrics.jsonl``)."""
    seconds: float
    """Wall time of the call (data preparation included)."""


# ---- data -------------------------------------------------------------------------------


def prepare_cache(config: DataConfig, out: Path) -> Path:
    """The complete training cache of ``config``: the given one, or ``<out>/cache`` (built)."""
    if config.cache_dir is not None:
        cache = config.cache_dir
    else:
        assert config.synthetic is not None  # DataConfig.validate
        cache = out / CACHE_DIR
        if not (cache / DONE_FILE).is_file():
            build_synthetic_cache(cache, config.synthetic)
    if not (cache / DONE_FILE).is_file():
        raise FileNotFoundError(f"{cache}: not a complete training cache (no {DONE_FILE})")
    return cache


# ---- the loop ---------------------------------------------------------------------------


def _learning_rate(config: OptimizerConfig, step: int) -> float:
    """The learning rate of the step after ``step`` steps (linear warm-up, then constant)."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr


def _metric_step(line: str) -> int | None:
    """The step of a metrics line; None for a line that is not a complete record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:  # e.g. half written by a killed run
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the complete metrics of steps up to ``step`` (rewritten atomically)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        line_step = _metric_step(line)
        if line_step is not None and line_step <= step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


_NOT_IDENTITY = ("max_steps", "device", "log_every", "keep_checkpoints")
"""Configuration fields a resumed run may change (they do not change what is trained)."""


def _identity(config: PretrainConfig) -> dict[str, Any]:
    """What a checkpoint must have been trained with to be resumed under ``config``."""
    identity = {k: v for k, v in asdict(config).items() if k not in _NOT_IDENTITY}
    # As JSON reads it back: tuples as lists, paths as strings.
    loaded: dict[str, Any] = json.loads(json.dumps(identity, default=str))
    return loaded


def _identity_differences(stored: Any, current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields where ``stored`` and ``current`` differ."""
    if not isinstance(stored, dict):
        return [prefix or "identity"]
    names: list[str] = []
    for key in sorted(set(stored) | set(current)):
        name = f"{prefix}{key}"
        mine, theirs = current.get(key), stored.get(key)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            names += _identity_differences(theirs, mine, f"{name}.")
        elif mine != theirs or (key in stored) != (key in current):
            names.append(name)
    return names


def _check_cache(cache: Path, config: PretrainConfig) -> None:
    manifest = json.loads((cache / MANIFEST_FILE).read_text())
    if manifest["latent_channels"] != config.model.latent_channels:
        raise ValueError(
            f"{cache} holds {manifest['latent_channels']}-channel latents, the model reads "
            f"latent_channels={config.model.latent_channels}"
        )
    if manifest["hidden_size"] != config.model.condition_dim:
        raise ValueError(
            f"{cache} holds {manifest['hidden_size']}-d conditions, the model reads "
            f"condition_dim={config.model.condition_dim}"
        )


def train(
    config: PretrainConfig,
    *,
    out: Path,
    max_steps: int | None = None,
    progress: bool = False,
) -> TrainResult:
    """Pretrain ``config.model`` into ``out`` up to ``max_steps`` (default ``config.max_steps``).

    Resumes from ``out/checkpoints`` when it holds a checkpoint (a run already at or past
    ``max_steps`` returns at once). See the module docstring for what is written.
    """
    started = time.monotonic()
    config.validate()
    total = config.max_steps if max_steps is None else max_steps
    if total < 0:
        raise ValueError(f"max_steps must be >= 0, got {total}")
    out.mkdir(parents=True, exist_ok=True)
    cache = prepare_cache(config.data, out)
    _check_cache(cache, config)
    device = torch.device(config.device)

    with torch.random.fork_rng(devices=[]):  # seeded weights, the global RNG left alone
        torch.manual_seed(config.seed)
        model = DiffusionTransformer(config.model)
    model.to(device).train()
    opt = config.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay
    )
    generator = torch.Generator().manual_seed(hash_seeds(config.seed, 1))
    identity = _identity(config)

    step, resumed_from, data_state = 0, None, None
    checkpoint_dir = out / CHECKPOINT_DIR
    loaded = load_checkpoint(checkpoint_dir)
    if loaded is not None:
        differences = _identity_differences(loaded.extra.get("identity"), identity)
        if differences:
            raise CheckpointError(
                f"{loaded.path} was written by a run with another configuration (differs in "
                f"{', '.join(differences)}); use a new output directory"
            )
        model.load_state_dict(loaded.model)
        optimizer.load_state_dict(loaded.optimizer)
        generator.set_state(loaded.rng[NOISE_RNG])
        step = resumed_from = loaded.step
        data_state = loaded.data
    metrics_path = out / METRICS_FILE
    _truncate_metrics(metrics_path, step)

    batches = CachedBatches(
        cache,
        ConsumerConfig(batch_size=config.data.batch_size, seed=config.seed, epochs=None),
        data_state,
    )
    stream = iter(batches)
    losses: list[float] = []
    latest = loaded.path if loaded is not None else None

    def checkpoint() -> None:
        nonlocal latest
        latest = save_checkpoint(
            checkpoint_dir,
            step=step,
            model=model,
            optimizer=optimizer,
            rng={NOISE_RNG: generator.get_state()},
            data=batches.state_dict(),
            extra={"identity": identity},
            keep=config.keep_checkpoints,
        )

    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    display = Progress(*columns, console=Console(stderr=True), disable=not progress)
    with display, metrics_path.open("a") as metrics_file:
        task = display.add_task("train", total=total, completed=min(step, total), loss="-")
        while step < total:
            lr = _learning_rate(opt, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(stream)
            result = flow_matching_step(model, batch, config=config.flow, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(result.loss)
            max_norm = opt.grad_clip if opt.grad_clip is not None else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            loss = result.metrics["loss"]
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise ValueError(
                    f"step {step + 1}: loss {loss} or gradient norm {grad_norm} is not finite; "
                    "stopped before the step was taken or checkpointed"
                )
            optimizer.step()
            step += 1

            record: dict[str, Any] = {"step": step, **result.metrics}
            record.update(grad_norm=grad_norm, lr=lr)
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            losses.append(result.metrics["loss"])
            if step % config.log_every == 0 or step == total:
                display.update(task, completed=step, loss=f"{result.metrics['loss']:.4f}")
            if step % config.checkpoint_every == 0 or step == total:
                checkpoint()

    return TrainResult(
        step=step,
        resumed_from=resumed_from,
        losses=losses,
        checkpoint=latest,
        metrics=metrics_path,
        seconds=time.monotonic() - started,
    )
