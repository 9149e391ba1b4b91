"""Few-step distillation of the generator: a 4-step student matches its 40-step teacher.

The teacher is a trained velocity model sampled the slow way: Euler on its ``N``-step
schedule (``N = 40`` by default), with true CFG when its guidance scale is not 1. The student
starts as a copy of the teacher and learns to reach the same image in ``K`` steps (4 by
default) with no guidance, by backpropagating through its whole ``K``-step sampling chain.
For conditions ``c`` from the training cache and one noise ``e ~ N(0, I)`` per sample::

    x0_teacher  = Euler_N(teacher, e, c)          no_grad; guided when the scale is not 1
    x0_student  = Euler_K(student, e, c)          with its graph, through all K steps
    loss        = mean((x0_student - x0_teacher) ** 2)                  ("mse")
               or mean_b(mean((x0_student - x0_teacher) ** 2) / ms_b)    ("relative")

where ``ms_b`` is the mean square of sample ``b``'s teacher output (each sample's error
relative to its size, so large-norm images do not dominate). The ``K``-step grid is the
teacher's own schedule rule (shift, dynamic shift, terminal stretch) evaluated at ``K``
steps, so the student runs exactly the sampler it replaces.

What distillation must beat is the teacher itself sampled naively in ``K`` steps on that
grid (with its guidance)::

    baseline_mse = mean((Euler_K(teacher, e, c) - x0_teacher) ** 2)

It is computed every step on the step's own noise (``K`` extra forward passes without a
graph, about a tenth of the teacher's cost), so each logged ``loss`` has its baseline next to
it. At initialisation, without guidance, the student is the teacher and ``loss`` equals
``baseline_mse`` exactly.

The latents of the cache only give the shape of the noise; the conditions are the cached
caption (or editing instruction) encodings, and an editing row's clean input latents are
given to teacher and student alike, as in flow-matching training. The teacher is frozen and
not part of the trained model: it is rebuilt from the configuration (its weights, or the
seeded initialisation) when a run resumes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from model.sampling import (
    SamplerConfig,
    Velocity,
    cfg_combine,
    config_sigmas,
    sample_euler,
    sample_few_step,
)
from model.transformer import DiffusionTransformer, TransformerConfig
from training.loop import LoopConfig, Objective, StepOutput
from training.pretrain import (
    DataConfig,
    build_transformer,
    cached_objective,
    check_cache,
    prepare_cache,
)

DistillLoss = Literal["mse", "relative"]
_LOSSES: tuple[DistillLoss, ...] = ("mse", "relative")


@dataclass(kw_only=True, slots=True)
class DistillConfig:
    """Few-step distillation of the transformer into a student that samples in few steps.

    The teacher's weights are ``init_from`` (as ``flywheel train --init`` sets it) or, when
    None, the seeded random initialisation of ``loop.seed``: the ``distill-debug`` recipe
    distils that random teacher unless ``--init`` names a trained run. The student starts
    from the teacher's weights, or from ``student_from``.
    """

    model: TransformerConfig
    """The transformer of teacher and student (``latent_channels`` and ``condition_dim``
    must match the cache)."""
    data: DataConfig
    """The training cache whose conditions are distilled (its latents only give the shape
    of the noise)."""
    init_from: Path | None = None
    """The teacher's weights (a run directory, its checkpoints/ or one checkpoint), which
    are also the student's start unless ``student_from`` is given; None: seeded random
    weights."""
    student_from: Path | None = None
    """The student's initial weights when not the teacher's (e.g. an earlier distillation
    run); None: a copy of the teacher."""
    teacher: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(steps=40, guidance_scale=4.0)
    )
    """The teacher's sampler: its ``steps`` (40) are the teacher's step count; its schedule
    also gives the student's grid; its guidance (true CFG against the all-zero condition
    when ``guidance_scale`` is not 1) is distilled into the unguided student."""
    student_steps: int = 4
    """Euler steps of the student (fewer than the teacher's)."""
    loss: DistillLoss = "mse"
    """"mse": mean squared error to the teacher's output; "relative": each sample's mean
    squared error divided by the mean square of its teacher output, averaged."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Steps, optimizer, checkpoints, seed and device."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        self.model.validate()
        self.data.validate()
        self.teacher.validate()
        self.loop.validate()
        if self.student_steps < 1:
            raise ValueError(f"DistillConfig.student_steps must be >= 1, got {self.student_steps}")
        if self.student_steps >= self.teacher.steps:
            raise ValueError(
                f"DistillConfig.student_steps ({self.student_steps}) must be fewer than the "
                f"teacher's steps ({self.teacher.steps})"
            )
        if self.loss not in _LOSSES:
            raise ValueError(f"DistillConfig.loss must be one of {_LOSSES}, got {self.loss!r}")


def student_sigmas(config: DistillConfig, seq_len: int) -> Tensor:
    """The student's grid (student_steps + 1,): the teacher's schedule at the student's steps."""
    return config_sigmas(replace(config.teacher, steps=config.student_steps), seq_len)


def distill_step(
    student: DiffusionTransformer,
    teacher: DiffusionTransformer,
    batch: dict[str, Any],
    *,
    config: DistillConfig,
    generator: torch.Generator,
) -> StepOutput:
    """The distillation loss of one batch of conditions; see the module docstring.

    ``batch`` holds ``latents`` (B, C, H, W) (only their shape is used), ``condition``
    (B, L, D), ``mask`` (B, L) bool and, for editing rows, ``input_latents`` (B, K, C, H, W),
    the clean input images both models read (a :class:`training.cache.CachedBatches` batch). The
    noise comes from ``generator`` (a CPU generator). The teacher runs under
    ``torch.no_grad``; the student's graph spans all of its steps.

    Metrics: ``loss``; ``student_mse``, the plain mean squared error to the teacher's output
    (``loss`` itself under "mse"); ``student_teacher_rmse``, its square root;
    ``baseline_mse``, the error of the teacher sampled in the student's steps (what the
    student must beat); ``teacher_ms``, the mean square of the teacher's output (a collapse
    of the target shows there).
    """
    parameter = next(student.parameters())
    device = parameter.device
    shape = batch["latents"].shape  # (B, C, H, W)
    condition = batch["condition"].to(device=device, dtype=parameter.dtype)  # (B, L, D)
    mask = batch["mask"].to(device)  # (B, L)
    inputs = batch.get("input_latents")  # (B, K, C, H, W) for editing rows, else None
    input_latents = (
        []
        if inputs is None
        else [inputs[:, k].to(device=device, dtype=torch.float32) for k in range(inputs.shape[1])]
    )  # K x (B, C, H, W): the clean input images, given to teacher and student alike
    noise = torch.randn(shape, generator=generator).to(device)  # (B, C, H, W)
    p = config.model.patch_size
    seq_len = (shape[2] // p) * (shape[3] // p)  # image tokens, for dynamic shifting
    grid = student_sigmas(config, seq_len)  # (K + 1,)

    def conditional(model: DiffusionTransformer) -> Velocity:
        return lambda x, t: model(x, t, condition, mask, input_latents=input_latents)

    null = torch.zeros_like(condition)  # (B, L, D): the unconditional branch of true CFG

    def unconditional(x: Tensor, t: Tensor) -> Tensor:
        v: Tensor = teacher(x, t, null, mask, input_latents=input_latents)  # (B, C, H, W)
        return v

    sampler = config.teacher
    guided = sampler.guidance_scale != 1.0

    def guided_teacher(x: Tensor, t: Tensor) -> Tensor:
        v: Tensor = teacher(x, t, condition, mask, input_latents=input_latents)  # (B, C, H, W)
        if not guided:
            return v
        return cfg_combine(
            v,
            unconditional(x, t),
            sampler.guidance_scale,
            renorm=sampler.cfg_renorm,
            channel_dim=sampler.channel_dim,
        )

    with torch.no_grad():
        x0_teacher = sample_euler(
            conditional(teacher),
            noise,
            sampler,
            uncond_velocity=unconditional if guided else None,
            seq_len=seq_len,
        )  # (B, C, H, W) float32
        x0_baseline = sample_few_step(guided_teacher, noise, grid)  # (B, C, H, W)

    x0_student = sample_few_step(conditional(student), noise, grid)  # (B, C, H, W), with graph
    per_sample = (x0_student - x0_teacher).square().mean(dim=(1, 2, 3))  # (B,)
    if config.loss == "relative":
        scale = x0_teacher.square().mean(dim=(1, 2, 3)).clamp_min(1e-8)  # (B,)
        loss = (per_sample / scale).mean()
    else:
        loss = per_sample.mean()

    with torch.no_grad():
        student_mse = float(per_sample.mean())
        metrics = {
            "loss": float(loss),
            "student_mse": student_mse,
            "student_teacher_rmse": math.sqrt(student_mse),
            "baseline_mse": float((x0_baseline - x0_teacher).square().mean()),
            "teacher_ms": float(x0_teacher.square().mean()),
        }
    return StepOutput(loss=loss, metrics=metrics)


def build_distill(config: DistillConfig, out: Path) -> Objective:
    """The distillation objective of ``config``; the teacher is frozen and not checkpointed."""
    cache = prepare_cache(config.data.cache_dir, config.data.synthetic, out)
    check_cache(cache, config.model)
    loop = config.loop
    teacher = build_transformer(
        config.model, seed=loop.seed, init_from=config.init_from, device=loop.device
    )
    teacher.requires_grad_(False).eval()
    if config.student_from is not None:
        student = build_transformer(
            config.model, seed=loop.seed, init_from=config.student_from, device=loop.device
        )
    else:
        student = copy.deepcopy(teacher).requires_grad_(True).train()

    def step(batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
        return distill_step(student, teacher, batch, config=config, generator=generator)

    return cached_objective(
        student, cache, batch_size=config.data.batch_size, seed=loop.seed, step=step
    )
