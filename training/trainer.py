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
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from model.condition import ConditionEncoder
from model.transformer import DiffusionTransformer
from model.vae import ResidualVAE
from training.cache import (
    DONE_FILE,
    MANIFEST_FILE,
    CachedBatches,
    ConsumerConfig,
    ProducerConfig,
    hash_seeds,
    produce,
)
from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.data import BucketConfig, Provenance, Sample, write_dataset
from training.flow_matching import flow_matching_step
from training.recipes import DataConfig, OptimizerConfig, PretrainConfig, SyntheticDataConfig

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

_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
_SHAPES = ("circle", "square", "triangle")


def write_synthetic_dataset(directory: Path, config: SyntheticDataConfig) -> list[Sample]:
    """Write ``config.images`` shape images and their captions as a dataset at ``directory``."""
    generator = torch.Generator().manual_seed(config.seed)
    names = list(_COLOURS)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    size = config.size
    for n in range(config.images):
        bg, fg = (int(i) for i in torch.randperm(len(names), generator=generator)[:2])
        shape = _SHAPES[int(torch.randint(len(_SHAPES), (1,), generator=generator))]
        image = Image.new("RGB", (size, size), _COLOURS[names[bg]])
        draw = ImageDraw.Draw(image)
        lo, hi = size // 5, size - size // 5
        if shape == "circle":
            draw.ellipse((lo, lo, hi, hi), fill=_COLOURS[names[fg]])
        elif shape == "square":
            draw.rectangle((lo, lo, hi, hi), fill=_COLOURS[names[fg]])
        else:
            draw.polygon([(size // 2, lo), (hi, hi), (lo, hi)], fill=_COLOURS[names[fg]])
        image.save(directory / f"images/{n}.png")
        samples.append(
            Sample(
                id=f"synthetic-{n}",
                image=f"images/{n}.png",
                caption=f"a {names[fg]} {shape} on a {names[bg]} background",
                provenance=Provenance(
                    dataset="synthetic-shapes", split="train", origin_uri=f"synthetic:{n}"
                ),
            )
        )
    write_dataset(directory, samples)
    return samples


def build_synthetic_cache(cache_dir: Path, config: SyntheticDataConfig) -> None:
    """Generate the dataset and encode it into ``cache_dir`` (built aside, moved in place)."""
    work = cache_dir.with_name(f".{cache_dir.name}.tmp")
    if work.exists():  # left by a run killed while building
        shutil.rmtree(work)
    write_synthetic_dataset(work / "dataset", config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        vae = ResidualVAE(config.vae).eval()
    encoder = ConditionEncoder.load(config.condition)
    buckets = BucketConfig(
        target_area=config.size * config.size,
        aspect_ratios=(1.0,),
        multiple_of=config.vae.spatial_factor,
    )
    produce(
        work / "dataset",
        work / "cache",
        vae=vae,
        encoder=encoder,
        config=ProducerConfig(buckets=buckets, shard_size=config.shard_size),
    )
    os.replace(work / "cache", cache_dir)
    shutil.rmtree(work)


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


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the metrics of steps up to ``step`` (rewritten atomically)."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


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
    identity = {"seed": config.seed, "model": asdict(config.model)}
    identity = json.loads(json.dumps(identity))  # tuples as JSON reads them back

    step, resumed_from, data_state = 0, None, None
    checkpoint_dir = out / CHECKPOINT_DIR
    loaded = load_checkpoint(checkpoint_dir)
    if loaded is not None:
        if loaded.extra.get("identity") != identity:
            raise CheckpointError(
                f"{loaded.path} was written by a run of another model or seed; "
                "use a new output directory"
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
