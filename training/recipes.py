"""Training configurations and the named recipes that build them.

A recipe is a typed function returning a :class:`PretrainConfig`; :data:`RECIPES` names them
for the command line (``flywheel train --list``). Nothing here builds or loads anything: the
trainer (:func:`training.trainer.train`) does, from the configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from model.condition import ConditionEncoderConfig, minilm_condition
from model.transformer import TransformerConfig, transformer_debug
from model.vae import VAEConfig, vae_debug
from training.flow_matching import FlowMatchingConfig


@dataclass(kw_only=True, slots=True)
class OptimizerConfig:
    """AdamW and its learning rate."""

    lr: float = 1e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's moment decay rates (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW's denominator epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay (per unit of learning rate)."""
    warmup_steps: int = 0
    """Steps of linear warm-up from lr / warmup_steps to lr; 0: constant lr from the start."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this; None: no clipping (the norm is still logged)."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("OptimizerConfig: lr, eps > 0 and weight_decay, warmup_steps >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"OptimizerConfig.betas must be in [0, 1), got {self.betas}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"OptimizerConfig.grad_clip must be > 0, got {self.grad_clip}")


@dataclass(kw_only=True, slots=True)
class SyntheticDataConfig:
    """A small generated dataset: solid backgrounds with one coloured shape, and captions.

    Written with :mod:`training.data` and encoded with :func:`training.cache.produce` (the VAE
    with seeded random weights, the condition encoder as configured).
    """

    images: int = 16
    """Number of images (and samples)."""
    size: int = 32
    """Side of the square images, in pixels (a multiple of the VAE's spatial factor)."""
    seed: int = 0
    """Seed of the colours and shapes and of the VAE's random weights."""
    vae: VAEConfig = field(default_factory=vae_debug)
    """The VAE that encodes the images (random weights)."""
    condition: ConditionEncoderConfig = field(default_factory=minilm_condition)
    """The condition encoder of the captions."""
    shard_size: int = 8
    """Samples per cache shard."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.images < 1 or self.shard_size < 1:
            raise ValueError("SyntheticDataConfig: images and shard_size must be >= 1")
        factor = self.vae.spatial_factor
        if self.size < 1 or self.size % factor:
            raise ValueError(
                f"SyntheticDataConfig.size must be a positive multiple of the VAE's spatial "
                f"factor {factor}, got {self.size}"
            )


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

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.cache_dir is None and self.synthetic is None:
            raise ValueError("DataConfig needs a cache_dir or a synthetic dataset to cache")
        if self.batch_size < 1:
            raise ValueError(f"DataConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.synthetic is not None:
            self.synthetic.validate()


@dataclass(kw_only=True, slots=True)
class PretrainConfig:
    """Text-to-image pretraining of the diffusion transformer with flow matching."""

    model: TransformerConfig
    """The transformer (``latent_channels`` and ``condition_dim`` must match the cache)."""
    flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    """Flow-time sampling and loss weighting."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW settings."""
    data: DataConfig
    """The training cache."""
    max_steps: int = 1000
    """Optimizer steps of a full run (``train(max_steps=...)`` overrides it)."""
    checkpoint_every: int = 500
    """Write a checkpoint every this many steps (and always at the last step)."""
    keep_checkpoints: int | None = 3
    """Checkpoints kept on disk (the newest); None: all."""
    log_every: int = 1
    """Refresh the progress display every this many steps (metrics are written every step)."""
    seed: int = 0
    """Seed of the model's initial weights, the noise and flow times, and the data order."""
    device: str = "cpu"
    """Torch device to train on ("cpu", "cuda", "cuda:1", ...)."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        self.model.validate()
        self.flow.validate()
        self.optimizer.validate()
        self.data.validate()
        if self.max_steps < 0 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("PretrainConfig: max_steps >= 0, checkpoint_every, log_every >= 1")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError("PretrainConfig.keep_checkpoints must be >= 1 or None")


# ---- recipes ----------------------------------------------------------------------------


def pretrain_debug() -> PretrainConfig:
    """CPU, well under a minute: the debug transformer on 16 generated 32 x 32 shape images."""
    synthetic = SyntheticDataConfig()
    model = transformer_debug()
    model.latent_channels = synthetic.vae.latent_channels
    return PretrainConfig(
        model=model,
        optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.01, warmup_steps=5),
        data=DataConfig(synthetic=synthetic, batch_size=4),
        max_steps=60,
        checkpoint_every=20,
        keep_checkpoints=2,
        seed=0,
    )


RECIPES: dict[str, Callable[[], PretrainConfig]] = {"pretrain-debug": pretrain_debug}
"""Recipes by the name the command line takes."""
