"""Flow-matching samplers for a velocity model: Euler ODE, true CFG, Flow-GRPO SDE, few-step.

Convention (rectified flow, as in diffusers' ``FlowMatchEulerDiscreteScheduler`` and the
QwenImage pipelines):

- ``x_t = (1 - t) * x_0 + t * noise`` with ``noise ~ N(0, I)`` and ``t`` in ``[0, 1]``
  (diffusers calls ``t`` "sigma"). The model predicts the velocity ``v = noise - x_0``.
- The model is called with ``t = sigma`` in ``[0, 1]``: the QwenImage pipelines pass
  ``timestep / 1000``, which is the sigma itself. A :data:`Velocity` receives it as a
  ``(B,)`` tensor.
- Sampling integrates ``dx/dt = v`` from ``t = 1`` (noise) to ``t = 0`` (data) on a
  decreasing grid ``sigmas[0] = 1 > ... > sigmas[steps] = 0`` with Euler steps
  ``x <- x + (sigmas[i + 1] - sigmas[i]) * v``.
- Schedule (what the QwenImage pipelines hand the scheduler): the base grid
  ``linspace(1, 1 / steps, steps)``; each value ``s`` shifted to
  ``shift * s / (1 + (shift - 1) * s)``. Static shifting takes ``shift`` as given;
  dynamic shifting takes ``shift = exp(mu)`` with ``mu`` linear in the image sequence
  length (``mu = base_shift`` at ``base_seq_len``, ``max_shift`` at ``max_seq_len``), which
  is the scheduler's exponential time shift ``e^mu / (e^mu + 1/s - 1)`` written another way.
  An optional ``shift_terminal`` then stretches ``1 - s`` so that the last nonzero sigma
  equals ``shift_terminal``; a final ``0`` is appended.
- True CFG (QwenImage): ``v = v_u + scale * (v_c - v_u)``, then rescaled so that its norm
  over the channel dimension equals the conditional prediction's, per token
  (``cfg_renorm="token"``). The channel dimension depends on the layout: ``1`` for our
  transformer's ``(B, C, H, W)`` latents (``SamplerConfig.channel_dim``'s default), ``-1``
  for the packed ``(B, L, C)`` tokens of diffusers' pipeline. With ``patch_size = 1`` (a
  token is one latent pixel, as in Qwen-Image-2.1) both give the same guidance; with
  larger patches the per-pixel channel norm is finer than diffusers' per-token norm over a
  ``p x p x C`` patch. ``"sample"`` rescales per sample over all non-batch dims instead.
- SDE (Flow-GRPO): the reverse-time SDE with the same marginals as the ODE,
  ``dx = [v + sigma_t^2 / (2t) * (x + (1 - t) v)] dt + sigma_t dw`` with
  ``sigma_t = noise_level * sqrt(t / (1 - t))``, discretised by Euler-Maruyama with
  ``dt = t_next - t < 0``. At ``t = 1`` the ``1 - t`` under the root is replaced by
  ``1 - t_next`` (Flow-GRPO uses ``1 - sigmas[1]`` there, the same value on the first step).
  The per-step log-probability is the Gaussian log-density of the next state, averaged over
  the non-batch dims by default (Flow-GRPO) or summed (``reduce="sum"``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor], Tensor]
"""A velocity model: ``(x_t (B, ...), t (B,)) -> v (B, ...)`` with ``v = noise - x_0``."""

CfgRenorm = Literal["none", "token", "sample"]
LogProbReduce = Literal["mean", "sum"]
_CFG_RENORMS: tuple[CfgRenorm, ...] = ("none", "token", "sample")
_LOG_PROB_REDUCES: tuple[LogProbReduce, ...] = ("mean", "sum")


@dataclass(kw_only=True, slots=True)
class SamplerConfig:
    """How to sample a flow-matching model: schedule, guidance and SDE exploration.

    Defaults are Qwen-Image's scheduler config (dynamic shifting, base/max shift 0.5/0.9 at
    256/8192 image tokens, shift_terminal 0.02) and its pipeline's true CFG.
    """

    steps: int = 50
    """Number of integration steps (model evaluations per guidance branch)."""
    dynamic_shift: bool = True
    """Shift the schedule by the image sequence length (``mu``) instead of ``shift``."""
    shift: float = 1.0
    """Static timestep shift (> 0; 1 = no shift), used when ``dynamic_shift`` is False."""
    base_shift: float = 0.5
    """Dynamic shifting: ``mu`` at ``base_seq_len`` image tokens."""
    max_shift: float = 0.9
    """Dynamic shifting: ``mu`` at ``max_seq_len`` image tokens."""
    base_seq_len: int = 256
    """Dynamic shifting: image token count where ``mu = base_shift``."""
    max_seq_len: int = 8192
    """Dynamic shifting: image token count where ``mu = max_shift``."""
    shift_terminal: float | None = 0.02
    """Last nonzero sigma after stretching the shifted grid; None leaves the grid as is."""
    guidance_scale: float = 4.0
    """True-CFG scale ``s`` in ``v_u + s (v_c - v_u)``; 1 (or no unconditional model) = off."""
    cfg_renorm: CfgRenorm = "token"
    """Rescale the CFG prediction to the conditional norm: per token over ``channel_dim``
    (Qwen-Image), per sample over all non-batch dims, or not at all."""
    channel_dim: int = 1
    """The channel axis of the latents, over which ``cfg_renorm="token"`` takes its norms:
    1 for ``(B, C, H, W)`` latents as our transformer takes and returns them; -1 for packed
    ``(B, L, C)`` tokens as diffusers' QwenImage pipeline uses. Never 0 (the batch)."""
    noise_level: float = 0.7
    """SDE sampling: Flow-GRPO's ``a`` in ``sigma_t = a sqrt(t / (1 - t))`` (> 0)."""
    sde_window: tuple[int, int] | None = None
    """SDE sampling: step indices ``[start, stop)`` taken stochastically; the others are
    Euler ODE steps. None = every step is stochastic."""
    log_prob_reduce: LogProbReduce = "mean"
    """SDE sampling: reduce per-element log-densities over non-batch dims by mean or sum."""

    def validate(self) -> None:
        """Raise ValueError naming the first field with a value the samplers cannot use."""
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be finite and > 0, got {self.shift}")
        for name, value in (("base_shift", self.base_shift), ("max_shift", self.max_shift)):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if self.base_seq_len < 1:
            raise ValueError(f"base_seq_len must be >= 1, got {self.base_seq_len}")
        if self.max_seq_len <= self.base_seq_len:
            raise ValueError(
                f"max_seq_len must be > base_seq_len={self.base_seq_len}, got {self.max_seq_len}"
            )
        if self.shift_terminal is not None and not 0.0 <= self.shift_terminal < 1.0:
            raise ValueError(f"shift_terminal must be None or in [0, 1), got {self.shift_terminal}")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be finite and >= 0, got {self.guidance_scale}")
        if self.cfg_renorm not in _CFG_RENORMS:
            raise ValueError(f"cfg_renorm must be one of {_CFG_RENORMS}, got {self.cfg_renorm!r}")
        if self.channel_dim == 0:
            raise ValueError("channel_dim must not be 0, the batch dimension")
        if not (math.isfinite(self.noise_level) and self.noise_level > 0):
            raise ValueError(f"noise_level must be finite and > 0, got {self.noise_level}")
        if self.sde_window is not None:
            start, stop = self.sde_window
            if not 0 <= start < stop <= self.steps:
                raise ValueError(
                    f"sde_window must be (start, stop) with 0 <= start < stop <= steps="
                    f"{self.steps}, got {self.sde_window}"
                )
        if self.log_prob_reduce not in _LOG_PROB_REDUCES:
            raise ValueError(
                f"log_prob_reduce must be one of {_LOG_PROB_REDUCES}, got {self.log_prob_reduce!r}"
            )


def qwen_image_sampler() -> SamplerConfig:
    """Qwen-Image inference: 50 steps, dynamic shift, true CFG 4.0 with per-token renorm
    over the channels of ``(B, C, H, W)`` latents (``channel_dim=1``)."""
    return SamplerConfig()


def flow_grpo_sampler() -> SamplerConfig:
    """Flow-GRPO rollouts: 10 SDE steps at noise level 0.7, same schedule and guidance."""
    return SamplerConfig(steps=10, noise_level=0.7)


# ----------------------------------------------------------------------------- schedule


def shift_mu(
    seq_len: int,
    *,
    base_shift: float = 0.5,
    max_shift: float = 0.9,
    base_seq_len: int = 256,
    max_seq_len: int = 8192,
) -> float:
    """Dynamic-shift ``mu`` for ``seq_len`` image tokens: linear through the two anchors."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


def flow_sigmas(
    steps: int,
    *,
    shift: float | None = None,
    mu: float | None = None,
    shift_terminal: float | None = None,
) -> Tensor:
    """The sampling grid ``(steps + 1,)`` float32, from 1 down to a final 0.

    Pass at most one of ``shift`` (static) and ``mu`` (dynamic, ``shift = exp(mu)``); neither
    means no shift. See the module docstring for the exact construction.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift is not None and mu is not None:
        raise ValueError("pass either shift or mu, not both")
    factor = math.exp(mu) if mu is not None else (1.0 if shift is None else shift)
    if factor <= 0:
        raise ValueError(f"shift must be > 0, got {factor}")
    base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)  # (steps,)
    sigmas = factor * base / (1.0 + (factor - 1.0) * base)
    if shift_terminal is not None:
        if not 0.0 <= shift_terminal < 1.0:
            raise ValueError(f"shift_terminal must be in [0, 1), got {shift_terminal}")
        one_minus = 1.0 - sigmas
        last = float(one_minus[-1])
        if last > 0.0:  # a one-step grid is just [1]: nothing to stretch
            sigmas = 1.0 - one_minus * ((1.0 - shift_terminal) / last)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def config_sigmas(config: SamplerConfig, seq_len: int | None = None) -> Tensor:
    """The grid ``(steps + 1,)`` for ``config``; ``seq_len`` (image tokens) for dynamic shift."""
    config.validate()
    if config.dynamic_shift:
        if seq_len is None:
            raise ValueError("dynamic_shift needs seq_len, the number of image tokens")
        mu = shift_mu(
            seq_len,
            base_shift=config.base_shift,
            max_shift=config.max_shift,
            base_seq_len=config.base_seq_len,
            max_seq_len=config.max_seq_len,
        )
        return flow_sigmas(config.steps, mu=mu, shift_terminal=config.shift_terminal)
    return flow_sigmas(config.steps, shift=config.shift, shift_terminal=config.shift_terminal)


# ----------------------------------------------------------------------------- guidance


def cfg_combine(
    v_cond: Tensor,
    v_uncond: Tensor,
    scale: float,
    *,
    renorm: CfgRenorm = "token",
    channel_dim: int = 1,
) -> Tensor:
    """True CFG ``v_u + scale (v_c - v_u)``, optionally rescaled to the conditional norm.

    ``renorm="token"`` is Qwen-Image's: one norm per token (latent position) over the
    channels, ``channel_dim`` -- 1 for ``(B, C, H, W)`` latents, -1 for packed ``(B, L, C)``
    tokens. ``"sample"``: one norm per sample over all non-batch dims.
    """
    if renorm not in _CFG_RENORMS:
        raise ValueError(f"renorm must be one of {_CFG_RENORMS}, got {renorm!r}")
    combined = v_uncond + scale * (v_cond - v_uncond)
    if renorm == "none":
        return combined
    if renorm == "token":
        if not -v_cond.ndim <= channel_dim < v_cond.ndim or channel_dim % v_cond.ndim == 0:
            raise ValueError(
                f"channel_dim must be a non-batch dim of a {v_cond.ndim}-d tensor, "
                f"got {channel_dim}"
            )
        dims: tuple[int, ...] = (channel_dim,)
    else:
        dims = tuple(range(1, v_cond.ndim))
    # (B, 1, H, W) for "token" on (B, C, H, W); (B, 1, ..., 1) for "sample"
    cond_norm = torch.linalg.vector_norm(v_cond, dim=dims, keepdim=True)
    comb_norm = torch.linalg.vector_norm(combined, dim=dims, keepdim=True)
    ratio = torch.where(comb_norm > 0, cond_norm / comb_norm, torch.ones_like(comb_norm))
    return combined * ratio


def _predict(
    velocity: Velocity,
    uncond_velocity: Velocity | None,
    x: Tensor,
    t: float,
    config: SamplerConfig,
) -> Tensor:
    """The (guided) velocity at ``x`` (B, ...) and time ``t``, in ``x``'s dtype."""
    t_batch = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)  # (B,)
    v = velocity(x, t_batch).to(x.dtype)
    if uncond_velocity is None or config.guidance_scale == 1.0:
        return v
    v_u = uncond_velocity(x, t_batch).to(x.dtype)
    return cfg_combine(
        v, v_u, config.guidance_scale, renorm=config.cfg_renorm, channel_dim=config.channel_dim
    )


def _state_dtype(x: Tensor) -> torch.dtype:
    """Integrate in float32 at least (the scheduler upcasts too); keep float64 if given."""
    return torch.promote_types(x.dtype, torch.float32)


# ----------------------------------------------------------------------------- ODE


def euler_step(x: Tensor, v: Tensor, t: float, t_next: float) -> Tensor:
    """One Euler step of ``dx/dt = v`` from ``t`` to ``t_next``."""
    return x + (t_next - t) * v


def _euler(noise: Tensor, sigmas: Tensor, predict: Callable[[Tensor, float], Tensor]) -> Tensor:
    """Euler from ``noise`` along ``sigmas`` with ``predict(x, t) -> v``."""
    x = noise.to(_state_dtype(noise))
    grid = [float(s) for s in sigmas]
    for t, t_next in itertools.pairwise(grid):
        x = euler_step(x, predict(x, t), t, t_next)
    return x


def sample_euler(
    velocity: Velocity,
    noise: Tensor,
    config: SamplerConfig,
    *,
    uncond_velocity: Velocity | None = None,
    seq_len: int | None = None,
) -> Tensor:
    """Integrate the ODE from ``noise`` (B, ...) at t = 1 to x_0 (B, ...) at t = 0.

    ``velocity`` is the conditional model; ``uncond_velocity`` (e.g. the same model on the
    negative prompt) turns on true CFG with ``config.guidance_scale`` unless that is 1.
    ``seq_len`` is the image token count, needed for dynamic shifting. The state is kept in
    float32 (float64 if ``noise`` is); the result has that dtype. Gradients are not
    disabled: wrap the call in ``torch.no_grad()`` for inference. Raises ValueError on an
    invalid ``config`` (see :meth:`SamplerConfig.validate`).
    """
    config.validate()
    sigmas = config_sigmas(config, seq_len)

    def predict(x: Tensor, t: float) -> Tensor:
        return _predict(velocity, uncond_velocity, x, t, config)

    return _euler(noise, sigmas, predict)


def sample_few_step(
    velocity: Velocity,
    noise: Tensor,
    sigmas: Tensor | Sequence[float] | None = None,
    *,
    steps: int = 4,
    shift: float = 1.0,
) -> Tensor:
    """Euler on a short schedule for a distilled student, no guidance: x_0 (B, ...).

    ``sigmas`` is the final decreasing grid starting at ``t <= 1`` (a trailing 0 is appended
    when missing); without it, ``flow_sigmas(steps, shift=shift)``.
    """
    if sigmas is None:
        grid = flow_sigmas(steps, shift=shift)
    else:
        grid = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        if grid.numel() == 0 or float(grid[-1]) != 0.0:
            grid = torch.cat([grid, grid.new_zeros(1)])
        if float(grid[0]) > 1.0 or bool((grid[1:] >= grid[:-1]).any()):
            raise ValueError(f"sigmas must decrease strictly from <= 1, got {grid.tolist()}")

    def predict(x: Tensor, t: float) -> Tensor:
        t_batch = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)  # (B,)
        return velocity(x, t_batch).to(x.dtype)

    return _euler(noise, grid, predict)


# ----------------------------------------------------------------------------- SDE


class SdeStep(NamedTuple):
    """One SDE transition ``x_t -> x_next`` and its Gaussian log-probability."""

    x_next: Tensor
    """(B, ...) the sampled (or given) next state."""
    log_prob: Tensor
    """(B,) log N(x_next; mean, std^2) reduced over non-batch dims (mean or sum)."""
    mean: Tensor
    """(B, ...) mean of the transition."""
    std: Tensor
    """(B, 1, ..., 1) standard deviation of the transition, ``sigma_t sqrt(t - t_next)``."""


def _per_sample(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` (scalar or (B,)) as a (B, 1, ..., 1) tensor in ``x``'s dtype and device."""
    tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if tt.ndim == 0:
        tt = tt.expand(x.shape[0])
    if tt.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or of shape ({x.shape[0]},), got {tuple(tt.shape)}")
    return tt.reshape(-1, *([1] * (x.ndim - 1)))


def sde_step(
    x_t: Tensor,
    v: Tensor,
    t: Tensor | float,
    t_next: Tensor | float,
    *,
    noise_level: float,
    generator: torch.Generator | None = None,
    x_next: Tensor | None = None,
    reduce: LogProbReduce = "mean",
) -> SdeStep:
    """Flow-GRPO's SDE step from ``t`` to ``t_next < t`` given the velocity ``v`` at ``x_t``.

    Samples ``x_next`` with ``generator`` unless it is given, in which case only its
    log-probability under the transition is evaluated (re-scoring a rollout under new
    parameters: gradients reach ``log_prob`` through ``v``, not through ``x_next``).
    ``t`` and ``t_next`` are floats or (B,) tensors. Computed in float32 at least.
    """
    if noise_level <= 0:
        raise ValueError(f"noise_level must be > 0 for a stochastic step, got {noise_level}")
    if reduce not in _LOG_PROB_REDUCES:
        raise ValueError(f"reduce must be one of {_LOG_PROB_REDUCES}, got {reduce!r}")
    dtype = _state_dtype(x_t)
    x = x_t.to(dtype)
    v = v.to(dtype)
    t_b = _per_sample(t, x)  # (B, 1, ..., 1)
    t_next_b = _per_sample(t_next, x)
    dt = t_next_b - t_b  # < 0
    # sigma_t^2 = a^2 t / (1 - t); at t = 1 the denominator is taken at t_next instead.
    denom = torch.where(t_b >= 1.0, 1.0 - t_next_b, 1.0 - t_b)
    sigma_sq = noise_level**2 * t_b / denom
    drift = v + sigma_sq / (2.0 * t_b) * (x + (1.0 - t_b) * v)
    mean = x + drift * dt  # (B, ...)
    std = torch.sqrt(sigma_sq * -dt)  # (B, 1, ..., 1)
    if x_next is None:
        eps = torch.randn(x.shape, generator=generator, dtype=dtype, device=x.device)
        x_next = mean + std * eps
    x_next = x_next.to(dtype)
    target = x_next.detach()
    log_density = (
        -((target - mean) ** 2) / (2.0 * std**2) - torch.log(std) - 0.5 * math.log(2.0 * math.pi)
    )  # (B, ...)
    dims = tuple(range(1, x.ndim))
    log_prob = log_density.mean(dim=dims) if reduce == "mean" else log_density.sum(dim=dims)
    return SdeStep(x_next=x_next, log_prob=log_prob, mean=mean, std=std)


@dataclass(kw_only=True, slots=True)
class SdeTrajectory:
    """A rollout of :func:`sample_sde`, enough to re-score every step under new parameters."""

    latents: Tensor
    """(steps + 1, B, ...) the state at each sigma: ``latents[0]`` the noise, ``[-1]`` x_0."""
    log_probs: Tensor
    """(B, steps) log-probability of ``latents[i + 1]`` given ``latents[i]``; 0 on ODE steps."""
    sigmas: Tensor
    """(steps + 1,) the grid: step ``i`` goes from ``sigmas[i]`` to ``sigmas[i + 1]``."""
    stochastic: Tensor
    """(steps,) bool, which steps were SDE steps (the others deterministic Euler)."""


def sample_sde(
    velocity: Velocity,
    noise: Tensor,
    config: SamplerConfig,
    *,
    uncond_velocity: Velocity | None = None,
    seq_len: int | None = None,
    generator: torch.Generator | None = None,
) -> SdeTrajectory:
    """Roll out the SDE from ``noise`` (B, ...) with per-step log-probabilities.

    Steps inside ``config.sde_window`` (all when None) are :func:`sde_step` with
    ``config.noise_level``; the others are Euler steps. Guidance and schedule as in
    :func:`sample_euler`. Raises ValueError on an invalid ``config``.
    """
    config.validate()
    sigmas = config_sigmas(config, seq_len)
    steps = config.steps
    start, stop = config.sde_window if config.sde_window is not None else (0, steps)
    stochastic = torch.zeros(steps, dtype=torch.bool)
    stochastic[start:stop] = True
    x = noise.to(_state_dtype(noise))
    latents = [x]
    log_probs = []
    for i in range(steps):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        v = _predict(velocity, uncond_velocity, x, t, config)
        if stochastic[i]:
            step = sde_step(
                x,
                v,
                t,
                t_next,
                noise_level=config.noise_level,
                generator=generator,
                reduce=config.log_prob_reduce,
            )
            x, log_prob = step.x_next, step.log_prob
        else:
            x, log_prob = euler_step(x, v, t, t_next), x.new_zeros(x.shape[0])
        latents.append(x)
        log_probs.append(log_prob)
    return SdeTrajectory(
        latents=torch.stack(latents),
        log_probs=torch.stack(log_probs, dim=1),
        sigmas=sigmas,
        stochastic=stochastic,
    )
