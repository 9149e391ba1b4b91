"""The rectified-flow (flow-matching) objective of the generator, as one step function.

With clean latents ``x0``, Gaussian noise ``e`` and a flow time ``t`` in (0, 1) per sample::

    x_t = (1 - t) * x0 + t * e          the straight path from data (t = 0) to noise (t = 1)
    v   = e - x0                        its velocity, d x_t / d t: the regression target
    loss = mean(w(t) * (model(x_t, t, condition) - v) ** 2)

``t`` is drawn logit-normal: ``sigmoid(n)`` with ``n ~ N(mean, std)`` (SD3's "lognorm"
sampling), which puts most samples at intermediate noise levels. An optional shift
``s`` maps it to ``s t / (1 + (s - 1) t)``, moving samples towards noise for larger images.
The per-sample weight ``w(t)`` is 1 by default.

Editing samples carry the clean latents of their input images (``input_latents``); they enter
the transformer's sequence before the noisy target, unnoised, so the model learns the velocity
of the target given the instruction and the inputs. Text-to-image batches have none.

:func:`flow_matching_step` computes the loss of one batch (the caller runs backward and the
optimizer) and returns the objective's own figures next to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from model.transformer import DiffusionTransformer
from training.loop import StepOutput


@dataclass(kw_only=True, slots=True)
class FlowMatchingConfig:
    """How flow times are sampled and the per-sample loss is weighted."""

    logit_mean: float = 0.0
    """Mean of the normal whose sigmoid is the flow time t (0: centred on t = 0.5)."""
    logit_std: float = 1.0
    """Standard deviation of that normal (> 0); larger spreads t towards 0 and 1."""
    shift: float = 1.0
    """Time shift s > 0: t -> s t / (1 + (s - 1) t); 1 leaves t as sampled, > 1 adds noise."""
    weighting: Literal["none", "cosmap"] = "none"
    """Per-sample loss weight: "none" (1) or SD3's "cosmap" (2 / (pi (1 - 2t + 2t^2)))."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.logit_std <= 0:
            raise ValueError(f"FlowMatchingConfig.logit_std must be > 0, got {self.logit_std}")
        if self.shift <= 0:
            raise ValueError(f"FlowMatchingConfig.shift must be > 0, got {self.shift}")
        if self.weighting not in ("none", "cosmap"):
            raise ValueError(f"FlowMatchingConfig.weighting {self.weighting!r} is unknown")


def sample_timesteps(batch: int, config: FlowMatchingConfig, generator: torch.Generator) -> Tensor:
    """(batch,) flow times in (0, 1): logit-normal, then shifted; drawn on the CPU."""
    normal = torch.randn(batch, generator=generator)  # (B,)
    t = torch.sigmoid(normal * config.logit_std + config.logit_mean)
    if config.shift != 1.0:
        t = config.shift * t / (1 + (config.shift - 1) * t)
    return t


def loss_weights(t: Tensor, config: FlowMatchingConfig) -> Tensor:
    """(B,) per-sample loss weights for flow times ``t`` (B,)."""
    if config.weighting == "cosmap":
        return 2 / (torch.pi * (1 - 2 * t + 2 * t**2))
    return torch.ones_like(t)


def flow_matching_step(
    model: DiffusionTransformer,
    batch: dict[str, Any],
    *,
    config: FlowMatchingConfig,
    generator: torch.Generator,
) -> StepOutput:
    """The flow-matching loss of one batch of cached latents; see the module docstring.

    ``batch`` holds ``latents`` (B, C, H, W), ``condition`` (B, L, D), ``mask`` (B, L) bool and,
    for editing samples, ``input_latents`` (B, K, C, H, W), the clean inputs (a
    :class:`training.cache.CachedBatches` batch). Noise and times come from ``generator``
    (a CPU generator, so that a run is reproducible and resumable on any device); they are
    moved to the model's device.
    """
    parameter = next(model.parameters())
    device = parameter.device
    x0 = batch["latents"].to(device=device, dtype=torch.float32)  # (B, C, H, W)
    condition = batch["condition"].to(device=device, dtype=parameter.dtype)  # (B, L, D)
    mask = batch["mask"].to(device)  # (B, L)
    inputs = batch.get("input_latents")  # (B, K, C, H, W) or None
    input_latents = (
        []
        if inputs is None
        else [inputs[:, k].to(device=device, dtype=torch.float32) for k in range(inputs.shape[1])]
    )  # K x (B, C, H, W)
    noise = torch.randn(x0.shape, generator=generator).to(device)  # (B, C, H, W)
    t = sample_timesteps(x0.shape[0], config, generator).to(device)  # (B,)

    t_ = t[:, None, None, None]  # (B, 1, 1, 1)
    x_t = (1 - t_) * x0 + t_ * noise  # (B, C, H, W)
    target = noise - x0  # (B, C, H, W)

    prediction = model(x_t, t, condition, mask, input_latents=input_latents).float()  # (B, C, H, W)
    per_sample = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))  # (B,)
    loss = (loss_weights(t, config) * per_sample).mean()

    with torch.no_grad():
        metrics = {
            "loss": float(loss),
            "t_mean": float(t.mean()),
            "target_ms": float(target.square().mean()),
            "prediction_ms": float(prediction.square().mean()),
        }
    return StepOutput(loss=loss, metrics=metrics)
