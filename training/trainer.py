"""``train(config, out=...)``: the one entry point for every objective (CLI and Prefect flows).

Each configuration type has a builder in its objective's module that turns it into an
:class:`training.loop.Objective`; :func:`train` validates the configuration, builds the
objective and runs :func:`training.loop.run_loop` (metrics, checkpoints, resume; see there).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from training.alignment import AlignmentTrainConfig, build_alignment_training
from training.distill import DistillConfig, build_distill
from training.dpo import DPOTrainConfig, build_dpo
from training.grpo import GRPOConfig, build_grpo
from training.loop import NOT_IDENTITY, Objective, TrainResult, run_loop
from training.pe_grpo import PEGRPOConfig, build_pe_grpo
from training.pe_sft import PESFTConfig, build_pe_sft
from training.pretrain import PretrainConfig, build_pretrain
from training.reward_recalibration import RewardRecalibrationConfig, build_reward_recalibration
from training.vae_training import VAETrainConfig, build_vae_training

TrainConfig = (
    PretrainConfig
    | DPOTrainConfig
    | DistillConfig
    | PESFTConfig
    | PEGRPOConfig
    | VAETrainConfig
    | GRPOConfig
    | AlignmentTrainConfig
    | RewardRecalibrationConfig
)
"""Every configuration :func:`train` takes."""

_BUILDERS: dict[type[Any], Callable[[Any, Path], Objective]] = {
    PESFTConfig: build_pe_sft,
    PEGRPOConfig: build_pe_grpo,
    DistillConfig: build_distill,
    PretrainConfig: build_pretrain,
    DPOTrainConfig: build_dpo,
    GRPOConfig: build_grpo,
    VAETrainConfig: build_vae_training,
    AlignmentTrainConfig: build_alignment_training,
    RewardRecalibrationConfig: build_reward_recalibration,
}
"""The builder of each configuration type's objective."""


def identity(config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must have been trained with to be resumed under ``config``."""
    fields = asdict(config)
    fields["loop"] = {k: v for k, v in fields["loop"].items() if k not in NOT_IDENTITY}
    fields["objective"] = type(config).__name__
    # As JSON reads it back: tuples as lists, paths as strings.
    loaded: dict[str, Any] = json.loads(json.dumps(fields, default=str))
    return loaded


def train(
    config: TrainConfig,
    *,
    out: Path,
    max_steps: int | None = None,
    progress: bool = False,
    name: str = "train",
) -> TrainResult:
    """Train ``config`` into ``out`` up to ``max_steps`` (default ``config.loop.max_steps``).

    Resumes from ``out/checkpoints`` when it holds a checkpoint of the same configuration.
    Raises ``ValueError`` for an invalid configuration or data, ``CheckpointError`` for a
    checkpoint that cannot be resumed.
    """
    started = time.monotonic()
    builder = _BUILDERS.get(type(config))
    if builder is None:
        raise TypeError(f"no objective for a {type(config).__name__}")
    config.validate()
    if max_steps is not None and max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    out.mkdir(parents=True, exist_ok=True)
    objective = builder(config, out)
    return run_loop(
        objective,
        loop=config.loop,
        identity=identity(config),
        out=out,
        name=name,
        max_steps=max_steps,
        progress=progress,
        started=started,
    )
