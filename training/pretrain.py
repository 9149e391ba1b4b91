"""Flow-matching training of the generator (pretraining and SFT) from a pre-encoded cache.

:class:`PretrainConfig` names the transformer, the flow-time sampling, the cache and the loop;
:func:`build_pretrain` turns it into an :class:`training.loop.Objective` whose step is
:func:`training.flow_matching.flow_matching_step` on the next cached batch.

What a run reads of the cache is :class:`DataConfig`'s: one bucket area (``target_area``, the
stage's resolution), the rows a :class:`training.data.SampleFilter` accepts, and the mix of
text-to-image and editing batches. With ``edit_fraction`` set the objective keeps two streams,
one over the text-to-image shards and one over the editing shards, and each step draws
``u ~ U(0, 1)`` from the loop's generator and takes its batch from the editing stream when
``u < edit_fraction``: the share of editing steps is ``edit_fraction`` in expectation, and a
resumed run draws the same choices (both streams' positions are in the data state). The
pretraining curriculum (:mod:`training.curriculum`) is a sequence of such configurations, each
starting from the previous stage's weights. Supervised fine-tuning is the same objective
started from a trained checkpoint (``init_from``) on the curated subset (the strictest filter),
with a smaller learning rate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.condition import ConditionTask
from model.transformer import DiffusionTransformer, TransformerConfig
from training.cache import DONE_FILE, MANIFEST_FILE, CachedBatches, CacheError, ConsumerConfig
from training.checkpoint import CheckpointError, load_model_weights
from training.data import SampleFilter
from training.flow_matching import FlowMatchingConfig, flow_matching_step
from training.loop import LoopConfig, Objective, StepOutput, seeded
from training.synthetic import SyntheticDataConfig, build_synthetic_cache

CACHE_DIR = "cache"
"""Name of the cache a run generates inside its output directory."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the pre-encoded training cache comes from and how it is read."""

    cache_dir: Path | None = None
    """An existing cache (:mod:`training.cache`); None: ``<out>/cache``, built from
    ``synthetic`` when it is not there yet."""
    synthetic: SyntheticDataConfig | None = None
    """The generated dataset to cache when ``cache_dir`` is None."""
    batch_size: int = 8
    """Samples per optimizer step (a shard's last batch may hold fewer)."""
    target_area: int | None = None
    """Train on the shards of this bucket target area only (the stage's resolution; the
    cache must hold it); None: every area."""
    edit_fraction: float | None = None
    """Share of steps whose batch comes from the editing shards, drawn per step; None: one
    stream over every shard (the cache's own mix)."""
    filter: SampleFilter = field(default_factory=SampleFilter)
    """The rows trained on (applied by the consumer); the default keeps every row."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.cache_dir is None and self.synthetic is None:
            raise ValueError("DataConfig needs a cache_dir or a synthetic dataset to cache")
        if self.batch_size < 1:
            raise ValueError(f"DataConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.target_area is not None and self.target_area < 1:
            raise ValueError(f"DataConfig.target_area must be >= 1, got {self.target_area}")
        if self.edit_fraction is not None and not 0 <= self.edit_fraction <= 1:
            raise ValueError(
                f"DataConfig.edit_fraction must be in [0, 1] or None, got {self.edit_fraction}"
            )
        self.filter.validate()
        if self.synthetic is not None:
            self.synthetic.validate()


def prepare_cache(
    cache_dir: Path | None,
    synthetic: SyntheticDataConfig | None,
    out: Path,
    *,
    kind: str = "samples",
) -> Path:
    """The complete cache a run reads: ``cache_dir``, or ``<out>/cache`` built from
    ``synthetic`` (a preference dataset when ``kind`` is "preferences").

    Raises :class:`training.cache.CacheError` for an incomplete cache or one of another kind.
    """
    if cache_dir is not None:
        cache = cache_dir
    else:
        assert synthetic is not None  # the data configs' validate()
        cache = out / CACHE_DIR
        if not (cache / DONE_FILE).is_file():
            build_synthetic_cache(cache, synthetic, preferences=kind == "preferences")
    if not (cache / DONE_FILE).is_file():
        raise CacheError(f"{cache}: not a complete training cache (no {DONE_FILE})")
    found = json.loads((cache / MANIFEST_FILE).read_text()).get("kind", "samples")
    if found != kind:
        raise CacheError(f"{cache} is a {found!r} cache; this objective reads a {kind!r} cache")
    return cache


def check_cache(cache: Path, model: TransformerConfig, *, target_area: int | None = None) -> None:
    """Raise ``ValueError`` when the cache's latents or conditions do not fit ``model``, or it
    has no shards for ``target_area`` (when given)."""
    manifest = json.loads((cache / MANIFEST_FILE).read_text())
    if manifest["latent_channels"] != model.latent_channels:
        raise ValueError(
            f"{cache} holds {manifest['latent_channels']}-channel latents, the model reads "
            f"latent_channels={model.latent_channels}"
        )
    if manifest["hidden_size"] != model.condition_dim:
        raise ValueError(
            f"{cache} holds {manifest['hidden_size']}-d conditions, the model reads "
            f"condition_dim={model.condition_dim}"
        )
    areas = manifest.get("areas", [manifest["buckets"]["target_area"]])
    if target_area is not None and target_area not in areas:
        raise ValueError(
            f"{cache} holds bucket areas {areas}, not the target_area {target_area} trained on"
        )


def cached_objective(
    model: nn.Module,
    cache: Path,
    *,
    batch_size: int,
    seed: int,
    step: Callable[[dict[str, Any], torch.Generator], StepOutput],
    sample_filter: SampleFilter | None = None,
    target_area: int | None = None,
    edit_fraction: float | None = None,
) -> Objective:
    """An objective whose every step is ``step`` on the next batch of ``cache``.

    The batches never end (epoch after epoch, reshuffled by ``seed``), restricted to
    ``target_area`` and ``sample_filter`` when given; the data state is the consumer's position
    (:class:`training.cache.CachedBatches`). With ``edit_fraction``, two streams (text-to-image
    and editing shards): each step draws from ``generator`` which one gives its batch (see the
    module docstring), adds the figure ``editing`` (1 or 0), and the data state holds both
    positions by task.
    """

    def consumer(task: ConditionTask | None) -> CachedBatches:
        config = ConsumerConfig(
            batch_size=batch_size,
            seed=seed,
            epochs=None,
            task=task,
            target_area=target_area,
            filter=sample_filter if sample_filter is not None else SampleFilter(),
        )
        return CachedBatches(cache, config)

    if edit_fraction is None:
        batches = consumer(None)
        stream = iter(batches)

        def objective_step(generator: torch.Generator) -> StepOutput:
            return step(next(stream), generator)

        def load_data_state(state: dict[str, Any]) -> None:
            nonlocal stream
            batches.load_state_dict(state)
            stream = iter(batches)

        return Objective(
            model=model,
            step=objective_step,
            data_state=batches.state_dict,
            load_data_state=load_data_state,
        )

    fraction = edit_fraction
    tasks: tuple[ConditionTask, ConditionTask] = ("text_to_image", "image_editing")
    mixed = {task: consumer(task) for task in tasks}
    streams = {task: iter(batches) for task, batches in mixed.items()}  # lazy: read when drawn

    def mixed_step(generator: torch.Generator) -> StepOutput:
        editing = float(torch.rand((), generator=generator)) < fraction
        output = step(next(streams["image_editing" if editing else "text_to_image"]), generator)
        output.metrics["editing"] = float(editing)
        return output

    def mixed_state() -> dict[str, Any]:
        return {task: batches.state_dict() for task, batches in mixed.items()}

    def load_mixed_state(state: dict[str, Any]) -> None:
        for task, batches in mixed.items():
            batches.load_state_dict(state[task])
            streams[task] = iter(batches)

    return Objective(
        model=model, step=mixed_step, data_state=mixed_state, load_data_state=load_mixed_state
    )


def build_transformer(
    config: TransformerConfig, *, seed: int, init_from: Path | None, device: str
) -> DiffusionTransformer:
    """The transformer: seeded random weights, or those of the run / checkpoint ``init_from``."""
    model = seeded(seed, lambda: DiffusionTransformer(config))
    if init_from is not None:
        try:
            model.load_state_dict(load_model_weights(init_from))
        except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
            reason = str(exc).strip().splitlines()
            raise CheckpointError(
                f"{init_from}: weights do not fit the configured transformer "
                f"({reason[1].strip() if len(reason) > 1 else reason[0]})"
            ) from exc
    return model.to(torch.device(device))


@dataclass(kw_only=True, slots=True)
class PretrainConfig:
    """Flow-matching training of the diffusion transformer (pretraining, or SFT from a run)."""

    model: TransformerConfig
    """The transformer (``latent_channels`` and ``condition_dim`` must match the cache)."""
    flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    """Flow-time sampling and loss weighting."""
    data: DataConfig
    """The training cache."""
    init_from: Path | None = None
    """Start from these weights (a run directory, its checkpoints/ or one checkpoint);
    None: seeded random weights."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Steps, optimizer, checkpoints, seed and device."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        self.model.validate()
        self.flow.validate()
        self.data.validate()
        self.loop.validate()


def build_pretrain(config: PretrainConfig, out: Path) -> Objective:
    """The flow-matching objective of ``config`` (its cache built under ``out`` if needed)."""
    cache = prepare_cache(config.data.cache_dir, config.data.synthetic, out)
    check_cache(cache, config.model, target_area=config.data.target_area)
    model = build_transformer(
        config.model, seed=config.loop.seed, init_from=config.init_from, device=config.loop.device
    )

    def step(batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
        return flow_matching_step(model, batch, config=config.flow, generator=generator)

    data = config.data
    return cached_objective(
        model,
        cache,
        batch_size=data.batch_size,
        seed=config.loop.seed,
        step=step,
        sample_filter=data.filter,
        target_area=data.target_area,
        edit_fraction=data.edit_fraction,
    )
