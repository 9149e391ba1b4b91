"""The named training recipes: typed functions that return a configuration.

:data:`RECIPES` names them for the command line (``flywheel train --list``). Nothing here builds
or loads anything: :func:`training.trainer.train` does, from the configuration.
"""

from __future__ import annotations

from collections.abc import Callable

from model.transformer import transformer_debug
from training.dpo import DPOConfig, DPOTrainConfig, PreferenceDataConfig
from training.loop import LoopConfig, OptimizerConfig
from training.pretrain import DataConfig, PretrainConfig
from training.synthetic import SyntheticDataConfig
from training.trainer import TrainConfig


def pretrain_debug() -> PretrainConfig:
    """Flow-matching pretraining, CPU, ~10 s: the debug transformer on 16 generated shapes."""
    synthetic = SyntheticDataConfig()
    model = transformer_debug()
    model.latent_channels = synthetic.vae.latent_channels
    return PretrainConfig(
        model=model,
        data=DataConfig(synthetic=synthetic, batch_size=4),
        loop=LoopConfig(
            optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.01, warmup_steps=5),
            max_steps=60,
            checkpoint_every=20,
            keep_checkpoints=2,
            seed=0,
        ),
    )


def dpo_debug() -> DPOTrainConfig:
    """Diffusion-DPO, CPU, ~10 s: right vs wrong-colour shape pairs; implicit accuracy rises.

    beta is far below the SDXL setting (5000): the 16 x 16 x 4 debug latents have few
    elements, so their mean errors move much more per step.
    """
    synthetic = SyntheticDataConfig()
    model = transformer_debug()
    model.latent_channels = synthetic.vae.latent_channels
    return DPOTrainConfig(
        model=model,
        dpo=DPOConfig(beta=500.0),
        data=PreferenceDataConfig(synthetic=synthetic, batch_size=8),
        loop=LoopConfig(
            optimizer=OptimizerConfig(lr=1e-3, warmup_steps=2),
            max_steps=100,
            checkpoint_every=50,
            keep_checkpoints=2,
            seed=0,
        ),
    )


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "pretrain-debug": pretrain_debug,
    "dpo-debug": dpo_debug,
}
"""Recipes by the name the command line takes."""
