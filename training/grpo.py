"""Flow-GRPO for the diffusion transformer: SDE rollouts, group advantages, clipped ratio, KL.

Flow-GRPO (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL") turns
the deterministic flow sampler into an SDE with the same marginals
(:func:`model.sampling.sde_step`), so every sampling step ``x_i -> x_{i+1}`` inside the SDE
window is a Gaussian transition ``N(mu_theta(x_i, t_i, c), s_i^2 I)`` with a log-probability.

**Rollout** (no graph). ``P`` prompts are drawn per rollout (``prompts_per_step``), each
sampled ``G`` times (``group_size``) from its own noise with the current policy ``pi_old``;
the final latents are decoded by the frozen VAE and scored by the reward ``R``::

    x_0 ... x_T       SDE inside the window, Euler outside; noise and SDE draws from the
                      loop's CPU generator
    r_j   = R(decode(x_T^j), prompt_j)
    A_j   = clip((r_j - mean_G(r)) / (std_G(r) + 1e-4), -A_max, A_max)   within each group
    lp_old[j, i] = log N(x_{i+1}^j; mu_old(x_i^j), s_i^2)      mean over (C, H, W)

(``std_G`` is the population standard deviation of the group's rewards.) ``lp_old`` is
computed by the same re-scoring pass as the update below, so at a rollout's first update the
ratio is exactly 1.

**Update** (:func:`grpo_step`). Over every stored transition ``(j, i)`` of the window::

    ratio    = exp(lp_theta[j, i] - lp_old[j, i])
    surr     = max(-A_j * ratio, -A_j * clip(ratio, 1 - eps, 1 + eps))     (PPO's clip)
    kl[j, i] = mean_(C,H,W) (mu_theta - mu_ref)^2 / (2 s_i^2)
    loss     = mean_(j, i) surr + beta * mean_(j, i) kl

``kl`` is the KL divergence between the policy's and the frozen reference's Gaussian
transitions (same variance), per element; at initialisation (policy = reference) it is 0. A
rollout is reused for ``updates_per_rollout`` optimizer steps: at its first update the ratio
is 1 and the clip is inactive; afterwards ratios that left ``[1 - eps, 1 + eps]`` in the
direction the advantage favours get no gradient. The rollout buffer (the window's latents,
``lp_old``, advantages, rewards, prompt indices) and the position in it are the objective's
data state, so an interrupted run resumes exactly.

**Rewards.** Any reward callable ``R(images (B, 3, H, W) in [0, 1], prompts) -> (B,)`` (the
convention of :mod:`model.reward`) works: the configured ones are a weighted sum of named
rewards (:data:`REWARD_NAMES`), and :func:`build_grpo` takes an explicit callable too.
``"alignment"`` is the open_clip alignment reward of :mod:`model.reward`. ``"colour"`` is
the debug reward (:func:`colour_reward`): how close the image's pixels are to the first
colour named in the prompt (the shape's colour in the synthetic captions), ``1 - mean |pixel
- target|``. It is transparent and learnable by the tiny debug transformer through a
random-weight VAE in a few dozen CPU steps, which a random-weight CLIP is not (its score is
noise); it is for the debug recipe and tests, not a model of image quality.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.condition import ConditionEncoder, ConditionEncoderConfig, minilm_condition
from model.reward import (
    AlignmentRewardConfig,
    RewardFn,
    alignment_reward_debug,
    build_alignment_reward,
)
from model.sampling import (
    SamplerConfig,
    cfg_combine,
    config_sigmas,
    euler_step,
    flow_grpo_sampler,
    sde_step,
)
from model.transformer import DiffusionTransformer, TransformerConfig
from model.vae import ResidualVAE, VAEConfig, vae_debug
from training.data import read_dataset
from training.loop import LoopConfig, Objective, StepOutput, seeded
from training.pretrain import build_transformer
from training.synthetic import SyntheticDataConfig, write_synthetic_dataset
from training.vae_training import load_vae_weights

REWARD_NAMES = ("colour", "alignment")
"""The rewards :attr:`GRPORewardConfig.weights` may weigh."""

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (220 / 255, 40 / 255, 40 / 255),
    "green": (40 / 255, 180 / 255, 60 / 255),
    "blue": (40 / 255, 70 / 255, 220 / 255),
    "yellow": (240 / 255, 220 / 255, 40 / 255),
    "white": (250 / 255, 250 / 255, 250 / 255),
    "black": (15 / 255, 15 / 255, 15 / 255),
}
"""The colours :func:`colour_reward` knows, RGB in [0, 1] (those the synthetic shapes use)."""

ADVANTAGE_EPS = 1e-4
"""Added to the group's reward standard deviation before dividing (Flow-GRPO's value)."""


# ---- configuration ----------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class GRPOPromptsConfig:
    """The prompts rollouts are drawn from, and how they are encoded (once, at build)."""

    prompts: list[str] = field(default_factory=list)
    """Prompts given explicitly."""
    dataset: Path | None = None
    """A dataset directory (:mod:`training.data`) whose captions are added."""
    synthetic: SyntheticDataConfig | None = None
    """A generated shapes dataset whose captions are added ("a red circle on a blue
    background", ...)."""
    condition: ConditionEncoderConfig = field(default_factory=minilm_condition)
    """The condition encoder of the prompts (text-to-image template)."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if not self.prompts and self.dataset is None and self.synthetic is None:
            raise ValueError("GRPOPromptsConfig needs prompts, a dataset or a synthetic dataset")
        if self.synthetic is not None:
            self.synthetic.validate()


@dataclass(kw_only=True, slots=True)
class GRPORewardConfig:
    """How a rollout's final latents are decoded and scored."""

    weights: dict[str, float] = field(default_factory=lambda: {"colour": 1.0})
    """Weight of each named reward (:data:`REWARD_NAMES`) in the total; 0 leaves one out."""
    vae: VAEConfig = field(default_factory=vae_debug)
    """The VAE that decodes the latents (frozen)."""
    vae_init_from: Path | None = None
    """Its weights (a VAE training run, its checkpoints/ or one checkpoint, or a safetensors
    file of ResidualVAE weights); None: seeded random weights (``vae_seed``), as the synthetic
    caches are encoded with."""
    vae_seed: int = 0
    """Seed of the VAE's random weights when ``vae_init_from`` is None."""
    alignment: AlignmentRewardConfig = field(default_factory=alignment_reward_debug)
    """The alignment reward model, when ``"alignment"`` is weighed (frozen)."""
    alignment_seed: int = 0
    """Seed of its random weights when its config names no checkpoint."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        self.vae.validate()
        unknown = sorted(set(self.weights) - set(REWARD_NAMES))
        if unknown:
            raise ValueError(f"GRPORewardConfig.weights: unknown rewards {unknown}")
        if any(w < 0 for w in self.weights.values()) or not any(self.weights.values()):
            raise ValueError("GRPORewardConfig.weights must be >= 0 with one > 0")


def _grpo_sampler() -> SamplerConfig:
    sampler = flow_grpo_sampler()
    sampler.sde_window = (0, sampler.steps - 1)
    return sampler


@dataclass(kw_only=True, slots=True)
class GRPOConfig:
    """Flow-GRPO of the transformer against its initial weights; see the module docstring."""

    model: TransformerConfig
    """The transformer (``latent_channels`` = the VAE's, ``condition_dim`` = the condition
    encoder's width)."""
    init_from: Path | None = None
    """The policy's initial weights, which are also the frozen reference (a run directory,
    its checkpoints/ or one checkpoint); None: seeded random weights."""
    prompts: GRPOPromptsConfig
    """Where the prompts come from."""
    latent_size: tuple[int, int] = (4, 4)
    """(h, w) of the sampled latents (the images are the VAE's spatial factor larger)."""
    group_size: int = 8
    """G: samples per prompt in a rollout; advantages are normalized within each group."""
    prompts_per_step: int = 4
    """P: distinct prompts per rollout (at most the number of prompts); a rollout holds
    ``P * G`` samples."""
    sampler: SamplerConfig = field(default_factory=_grpo_sampler)
    """The rollout sampler: schedule, guidance (true CFG against the all-zero condition when
    ``guidance_scale`` is not 1), ``noise_level`` and ``sde_window`` (the steps that are
    stochastic and trained; None: all). The default is :func:`flow_grpo_sampler` with the
    last step (to t = 0, the smallest noise) deterministic."""
    clip_range: float = 1e-4
    """eps: the ratio is clipped to ``[1 - eps, 1 + eps]`` (Flow-GRPO's 1e-4: per-element mean
    log-probabilities move little, so the ratio stays close to 1)."""
    kl_beta: float = 0.04
    """beta: weight of the KL to the reference (Flow-GRPO's 0.04); 0: no KL term."""
    advantage_clip: float = 5.0
    """A_max: advantages are clipped to ``[-A_max, A_max]``."""
    updates_per_rollout: int = 2
    """Optimizer steps that reuse one rollout before the next is sampled."""
    reward: GRPORewardConfig = field(default_factory=GRPORewardConfig)
    """The decoder and the rewards."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Steps, optimizer, checkpoints, seed and device."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        self.model.validate()
        self.prompts.validate()
        self.sampler.validate()
        self.reward.validate()
        self.loop.validate()
        if self.model.latent_channels != self.reward.vae.latent_channels:
            raise ValueError(
                f"GRPOConfig: the transformer's latent_channels {self.model.latent_channels} "
                f"!= the VAE's {self.reward.vae.latent_channels}"
            )
        h, w = self.latent_size
        p = self.model.patch_size
        if h < 1 or w < 1 or h % p or w % p:
            raise ValueError(
                f"GRPOConfig.latent_size must be positive multiples of patch_size {p}, "
                f"got {self.latent_size}"
            )
        if self.group_size < 2:
            raise ValueError(f"GRPOConfig.group_size must be >= 2, got {self.group_size}")
        if self.prompts_per_step < 1 or self.updates_per_rollout < 1:
            raise ValueError("GRPOConfig: prompts_per_step and updates_per_rollout must be >= 1")
        if self.clip_range <= 0 or self.kl_beta < 0 or self.advantage_clip <= 0:
            raise ValueError("GRPOConfig: clip_range > 0, kl_beta >= 0, advantage_clip > 0")


# ---- prompts, decoder and rewards -------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class EncodedPrompts:
    """The prompt pool, encoded once."""

    texts: list[str]
    """K prompts."""
    condition: Tensor
    """(K, L, D) the condition encoder's states, zero-padded."""
    mask: Tensor
    """(K, L) bool, True on real tokens."""


def load_prompts(config: GRPOPromptsConfig) -> list[str]:
    """The prompts of ``config``: the explicit ones, then dataset and synthetic captions
    (duplicates dropped, first occurrence kept)."""
    texts = list(config.prompts)
    if config.dataset is not None:
        texts += [s.caption for s in read_dataset(config.dataset, check_images=False)]
    if config.synthetic is not None:
        with tempfile.TemporaryDirectory() as tmp:
            texts += [s.caption for s in write_synthetic_dataset(Path(tmp), config.synthetic)]
    texts = list(dict.fromkeys(t for t in texts if t))
    if not texts:
        raise ValueError("GRPO: no prompts (the dataset has no captions)")
    return texts


def encode_prompts(config: GRPOPromptsConfig, *, device: str) -> EncodedPrompts:
    """Load the prompts and encode them with the condition encoder (which is then dropped)."""
    texts = load_prompts(config)
    encoder = ConditionEncoder.load(config.condition, device=device)
    condition, mask = encoder.encode(texts, task="text_to_image")  # (K, L, D), (K, L)
    return EncodedPrompts(texts=texts, condition=condition.float(), mask=mask)


def colour_reward(images: Tensor, prompts: Sequence[str]) -> Tensor:
    """The debug reward: ``1 - mean |pixel - target|`` over pixels and RGB, ``(B,)``.

    ``images`` (B, 3, H, W) in [0, 1]; the target is the first :data:`PALETTE` colour named in
    the prompt (1: every pixel exactly that colour). Raises ``ValueError`` for a prompt that
    names none.
    """
    targets = []
    for prompt in prompts:
        named = re.findall(r"[a-z]+", prompt.lower())
        colour = next((w for w in named if w in PALETTE), None)
        if colour is None:
            raise ValueError(f"colour reward: {prompt!r} names none of {sorted(PALETTE)}")
        targets.append(PALETTE[colour])
    target = torch.tensor(targets, dtype=images.dtype, device=images.device)  # (B, 3)
    distance = (images - target[:, :, None, None]).abs()  # (B, 3, H, W)
    return 1.0 - distance.mean(dim=(1, 2, 3))


def build_decoder(config: GRPORewardConfig, *, device: str) -> Callable[[Tensor], Tensor]:
    """The frozen VAE as ``latents (B, C, h, w), normalized -> images (B, 3, H, W) in [0, 1]``."""
    vae = seeded(config.vae_seed, lambda: ResidualVAE(config.vae))
    if config.vae_init_from is not None:
        vae.load_state_dict(load_vae_weights(config.vae_init_from))
    vae.to(torch.device(device)).eval().requires_grad_(False)

    def decode(latents: Tensor) -> Tensor:
        with torch.no_grad():
            images = vae.decode(vae.denormalize_latents(latents))  # (B, C_img, H, W)
        return ((images[:, :3].float() + 1) / 2).clamp(0, 1)

    return decode


def build_reward(config: GRPORewardConfig, *, device: str) -> RewardFn:
    """The weighted sum of the configured rewards, ``(images, prompts) -> (B,)`` (frozen)."""
    rewards: dict[str, RewardFn] = {}
    weights = {name: w for name, w in config.weights.items() if w > 0}
    if "colour" in weights:
        rewards["colour"] = colour_reward
    if "alignment" in weights:
        alignment = seeded(config.alignment_seed, lambda: build_alignment_reward(config.alignment))
        alignment.to(torch.device(device)).eval().requires_grad_(False)
        rewards["alignment"] = alignment.score

    def reward(images: Tensor, prompts: Sequence[str]) -> Tensor:
        with torch.no_grad():
            parts = [weights[name] * fn(images, prompts).float() for name, fn in rewards.items()]
        return torch.stack(parts).sum(dim=0)  # (B,)

    return reward


# ---- rollouts ---------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class Rollout:
    """One rollout of ``N = P * G`` samples: what every update on it re-scores."""

    latents: Tensor
    """(S + 1, N, C, h, w) the states at the SDE window's sigmas ``start .. stop``: step ``s``
    of the window goes from ``latents[s]`` to ``latents[s + 1]``."""
    old_log_probs: Tensor
    """(N, S) log-probability of each window transition under the sampling policy."""
    rewards: Tensor
    """(N,) the reward of each sample's image."""
    advantages: Tensor
    """(N,) group-normalized, clipped advantages."""
    prompt_index: Tensor
    """(N,) int64 index into the prompt pool; samples ``g * G .. (g + 1) * G - 1`` share one."""

    def state_dict(self) -> dict[str, Tensor]:
        """The tensors, for the objective's data state."""
        return {
            "latents": self.latents,
            "old_log_probs": self.old_log_probs,
            "rewards": self.rewards,
            "advantages": self.advantages,
            "prompt_index": self.prompt_index,
        }

    @classmethod
    def from_state(cls, state: dict[str, Tensor], *, device: torch.device) -> Rollout:
        """The inverse of :meth:`state_dict`, on ``device``."""
        return cls(**{name: value.to(device) for name, value in state.items()})


def group_advantages(rewards: Tensor, group_size: int, *, clip: float) -> Tensor:
    """``(r - mean_G) / (std_G + 1e-4)`` within consecutive groups of ``group_size``, clipped
    to ``[-clip, clip]``: (N,) from (N,)."""
    groups = rewards.float().view(-1, group_size)  # (P, G)
    mean = groups.mean(dim=1, keepdim=True)  # (P, 1)
    std = groups.std(dim=1, keepdim=True, correction=0)  # (P, 1)
    return ((groups - mean) / (std + ADVANTAGE_EPS)).clamp(-clip, clip).flatten()


def _window(config: GRPOConfig) -> tuple[int, int]:
    return config.sampler.sde_window or (0, config.sampler.steps)


def _sigmas(config: GRPOConfig) -> Tensor:
    h, w = config.latent_size
    p = config.model.patch_size
    return config_sigmas(config.sampler, (h // p) * (w // p))  # (steps + 1,)


def _velocity(
    model: DiffusionTransformer,
    x: Tensor,
    t: Tensor,
    condition: Tensor,
    mask: Tensor,
    *,
    sampler: SamplerConfig,
) -> Tensor:
    """The (guided) velocity ``(B, C, h, w)`` at ``x`` (B, C, h, w), ``t`` (B,)."""
    v: Tensor = model(x, t, condition, mask).float()
    if sampler.guidance_scale == 1.0:
        return v
    v_uncond = model(x, t, torch.zeros_like(condition), mask).float()
    return cfg_combine(
        v,
        v_uncond,
        sampler.guidance_scale,
        renorm=sampler.cfg_renorm,
        channel_dim=sampler.channel_dim,
    )


def _transitions(
    model: DiffusionTransformer,
    latents: Tensor,
    prompt_index: Tensor,
    prompts: EncodedPrompts,
    config: GRPOConfig,
) -> tuple[Tensor, Tensor, Tensor]:
    """Every window transition of ``latents`` (S + 1, N, C, h, w) under ``model`` at once:
    ``(log_probs (N, S), means (S, N, C, h, w), stds (S, N, 1, 1, 1))``."""
    s, n = latents.shape[0] - 1, latents.shape[1]
    start, stop = _window(config)
    sigmas = _sigmas(config).to(latents.device)
    t = sigmas[start:stop].repeat_interleave(n)  # (S * N,), step-major
    t_next = sigmas[start + 1 : stop + 1].repeat_interleave(n)  # (S * N,)
    x = latents[:-1].flatten(0, 1)  # (S * N, C, h, w)
    condition = prompts.condition[prompt_index].repeat(s, 1, 1)  # (S * N, L, D)
    mask = prompts.mask[prompt_index].repeat(s, 1)  # (S * N, L)
    v = _velocity(model, x, t, condition, mask, sampler=config.sampler)  # (S * N, C, h, w)
    step = sde_step(
        x,
        v,
        t,
        t_next,
        noise_level=config.sampler.noise_level,
        x_next=latents[1:].flatten(0, 1),
        reduce=config.sampler.log_prob_reduce,
    )
    shape = (s, n, *latents.shape[2:])
    return step.log_prob.view(s, n).T, step.mean.view(shape), step.std.view(s, n, 1, 1, 1)


@torch.no_grad()
def sample_rollout(
    policy: DiffusionTransformer,
    prompts: EncodedPrompts,
    *,
    decode: Callable[[Tensor], Tensor],
    reward: RewardFn,
    config: GRPOConfig,
    generator: torch.Generator,
) -> Rollout:
    """Sample ``P`` prompts ``G`` times each with the SDE sampler, score and re-score them.

    Every random number (prompt choice, noise, SDE draws) comes from ``generator`` (CPU).
    """
    device = prompts.condition.device
    k, p, g = len(prompts.texts), config.prompts_per_step, config.group_size
    chosen = torch.randperm(k, generator=generator)[:p]  # (P,)
    prompt_index = chosen.repeat_interleave(g).to(device)  # (N,)
    n = prompt_index.shape[0]
    condition, mask = prompts.condition[prompt_index], prompts.mask[prompt_index]  # (N, L, D)
    shape = (n, config.model.latent_channels, *config.latent_size)
    sigmas = _sigmas(config)
    start, stop = _window(config)
    sampler = config.sampler

    x = torch.randn(shape, generator=generator).to(device)  # (N, C, h, w)
    window = [x] if start == 0 else []
    for i in range(sampler.steps):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        t_batch = torch.full((n,), t, device=device)  # (N,)
        v = _velocity(policy, x, t_batch, condition, mask, sampler=sampler)  # (N, C, h, w)
        if start <= i < stop:
            # The transition's mean and std (x_next=x only fills the unused log-prob), then
            # a draw from the CPU generator, so any device samples the same numbers.
            gauss = sde_step(x, v, t, t_next, noise_level=sampler.noise_level, x_next=x)
            eps = torch.randn(shape, generator=generator).to(device)  # (N, C, h, w)
            x = gauss.mean + gauss.std * eps
        else:
            x = euler_step(x, v, t, t_next)
        if start <= i + 1 <= stop:
            window.append(x)
    latents = torch.stack(window)  # (S + 1, N, C, h, w)
    rewards = reward(decode(x), [prompts.texts[int(j)] for j in prompt_index]).float()  # (N,)
    advantages = group_advantages(rewards, g, clip=config.advantage_clip)  # (N,)
    old_log_probs, _, _ = _transitions(policy, latents, prompt_index, prompts, config)
    return Rollout(
        latents=latents,
        old_log_probs=old_log_probs,
        rewards=rewards,
        advantages=advantages,
        prompt_index=prompt_index,
    )


# ---- the update -------------------------------------------------------------------------


def grpo_step(
    policy: DiffusionTransformer,
    reference: DiffusionTransformer,
    rollout: Rollout,
    *,
    prompts: EncodedPrompts,
    config: GRPOConfig,
) -> StepOutput:
    """The Flow-GRPO loss of one update on ``rollout``; see the module docstring.

    The stored window transitions are re-scored under ``policy`` (with its graph) and
    ``reference`` (frozen, no graph) with :func:`model.sampling.sde_step` given the stored next
    states; ``prompts`` is the pool ``rollout.prompt_index`` points into.

    Metrics: ``loss``; ``policy_loss`` and ``kl`` (its two terms, ``kl`` before ``kl_beta``);
    ``reward_mean`` / ``reward_std`` of the rollout's rewards; ``clip_fraction``, the fraction
    of transitions whose ratio is outside ``[1 - eps, 1 + eps]``; ``ratio_mean``;
    ``advantage_abs_mean``.
    """
    new_log_probs, mean, std = _transitions(
        policy, rollout.latents, rollout.prompt_index, prompts, config
    )  # (N, S), (S, N, C, h, w), (S, N, 1, 1, 1)
    with torch.no_grad():
        _, ref_mean, _ = _transitions(
            reference, rollout.latents, rollout.prompt_index, prompts, config
        )  # (S, N, C, h, w)

    advantages = rollout.advantages[:, None]  # (N, 1)
    ratio = torch.exp(new_log_probs - rollout.old_log_probs)  # (N, S)
    eps = config.clip_range
    unclipped = -advantages * ratio  # (N, S)
    clipped = -advantages * ratio.clamp(1 - eps, 1 + eps)  # (N, S)
    policy_loss = torch.maximum(unclipped, clipped).mean()

    dims = tuple(range(2, mean.ndim))
    kl_per = (mean - ref_mean).square().mean(dim=dims) / (2 * std.flatten(1) ** 2)  # (S, N)
    kl = kl_per.mean()
    loss = policy_loss + config.kl_beta * kl

    with torch.no_grad():
        metrics = {
            "loss": float(loss),
            "policy_loss": float(policy_loss),
            "kl": float(kl),
            "reward_mean": float(rollout.rewards.mean()),
            "reward_std": float(rollout.rewards.std(correction=0)),
            "clip_fraction": float(((ratio - 1).abs() > eps).float().mean()),
            "ratio_mean": float(ratio.mean()),
            "advantage_abs_mean": float(rollout.advantages.abs().mean()),
        }
    return StepOutput(loss=loss, metrics=metrics)


# ---- training run -----------------------------------------------------------------------


def build_grpo(config: GRPOConfig, out: Path, *, reward: RewardFn | None = None) -> Objective:
    """The Flow-GRPO objective of ``config``: the policy, its frozen reference and rewards.

    ``reward`` replaces the configured rewards (any ``(images in [0, 1], prompts) -> (B,)``
    callable). A rollout is sampled at the first step and every ``updates_per_rollout``
    steps after; the buffer and the position in it are the data state. ``out`` is unused
    (nothing is cached).
    """
    del out
    loop = config.loop
    prompts = encode_prompts(config.prompts, device=loop.device)
    k = len(prompts.texts)
    if config.prompts_per_step > k:
        raise ValueError(f"GRPOConfig.prompts_per_step {config.prompts_per_step} > {k} prompts")
    if prompts.condition.shape[-1] != config.model.condition_dim:
        raise ValueError(
            f"the condition encoder is {prompts.condition.shape[-1]}-d, the transformer reads "
            f"condition_dim={config.model.condition_dim}"
        )
    policy = build_transformer(
        config.model, seed=loop.seed, init_from=config.init_from, device=loop.device
    )
    reference = build_transformer(
        config.model, seed=loop.seed, init_from=config.init_from, device=loop.device
    )
    reference.requires_grad_(False).eval()
    decode = build_decoder(config.reward, device=loop.device)
    score = reward if reward is not None else build_reward(config.reward, device=loop.device)
    device = torch.device(loop.device)
    rollout: Rollout | None = None
    updates = 0  # updates taken on `rollout`

    def step(generator: torch.Generator) -> StepOutput:
        nonlocal rollout, updates
        if rollout is None or updates >= config.updates_per_rollout:
            rollout = sample_rollout(
                policy, prompts, decode=decode, reward=score, config=config, generator=generator
            )
            updates = 0
        updates += 1
        return grpo_step(policy, reference, rollout, prompts=prompts, config=config)

    def data_state() -> dict[str, Any]:
        if rollout is None:
            return {}
        return {"rollout": rollout.state_dict(), "updates": updates}

    def load_data_state(state: dict[str, Any]) -> None:
        nonlocal rollout, updates
        if "rollout" in state:
            rollout = Rollout.from_state(state["rollout"], device=device)
            updates = int(state["updates"])

    return Objective(
        model=policy, step=step, data_state=data_state, load_data_state=load_data_state
    )
