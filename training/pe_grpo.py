"""Prompt-enhancer GRPO: reward rewrites by what the frozen generator makes of them.

For each of ``B`` terse prompts ``q`` (from :mod:`training.degradation` pairs, with the rich
caption ``c`` they came from), the policy samples ``G`` rewrites ``o_1..o_G`` (temperature
``tau``, at most ``max_new_tokens``, drawn with ``torch.multinomial`` on the loop's generator).
Each rewrite is scored through the frozen generator::

    image_j = VAE.decode(Euler_K(DiT(., t, MiniLM(o_j)), noise_q))    one noise per group
    r_j     = sum_k w_k * R_k(o_j)                            model.reward.combine_rewards

with the reward components ``R_k``:

``alignment``      the alignment reward model (open_clip) of ``image_j`` against ``c`` (or ``q``)
``coverage``       the fraction of the content words ``c`` has and ``q`` lacks that ``o_j`` has:
                   what a prompt enhancer is for, read off the text
``char_coverage``  the same, relaxed to letters: ``sum_a min(n_o(a), n_m(a)) / sum_a n_m(a)``
                   over letters ``a``, with ``n_m`` the letter counts of the missing words and
                   ``n_o`` those of the rewrite — a smooth version of ``coverage`` that a tiny
                   policy starting from random weights can climb (debug recipes weigh it;
                   letter soup games it, so it is a debug signal, not a production reward)
``length``         ``-|o_j| / max_new_tokens``, a length penalty

Group-normalised advantages, then the clipped policy gradient with a KL penalty to the frozen
reference (the initial policy), per token ``t`` of rewrite ``j`` (GRPO, Shao et al. 2024)::

    A_j     = (r_j - mean_G(r)) / (std_G(r) + eps)
    rho_jt  = exp(log pi_theta(o_jt | q, o_j<t) - log pi_old(o_jt | ...))
    kl_jt   = exp(log pi_ref - log pi_theta) - (log pi_ref - log pi_theta) - 1      (k3, >= 0)
    loss    = 1/(B G) sum_j 1/|o_j| sum_t [ -min(rho_jt A_j, clip(rho_jt, 1-eps_c, 1+eps_c) A_j)
                                            + beta kl_jt ]

Log-probabilities are of the tempered distribution (logits / tau) the rewrites were sampled
from; ``|o_j|`` counts the end-of-turn token when the rewrite has one. A rollout is reused for
``updates_per_rollout`` optimizer steps (``pi_old`` is the policy that sampled it, so the ratio
is 1 at its first use); it lives in the objective's data state, so resume is exact. At
initialisation the policy is the reference and the KL is exactly 0.

:func:`sample_rollout` samples and scores; :func:`pe_grpo_step` is the loss of one update.

A caller with its own judge of rewrites passes a :class:`RewriteScorer` to
:func:`build_pe_grpo` instead: the objective then builds no frozen generator nor reward model
of its config, draws one noise seed per group from the loop's generator, and hands every group
of a rollout to the scorer at once (the embedded world's enhancer round:
:mod:`flywheel.world.loop.prompt_enhancer`, the world's generator and its evaluator or reward
model).

On the debug scale the image path is real but nearly flat: with the seeded random transformer,
VAE and CLIP, two different rewrites move ``alignment`` by ~1e-5, so within a group it is close
to a constant and the text-side coverage terms carry what a tiny policy can learn. Point
``generator.init_from`` at a pretraining run and ``reward.alignment`` at trained CLIP weights
for an image term with signal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import Tensor, nn

from model.condition import ConditionEncoder, ConditionEncoderConfig, minilm_condition
from model.prompt_enhancer import DEFAULT_T2I_SYSTEM, PromptEnhancerModelConfig, pe_debug
from model.reward import (
    AlignmentReward,
    AlignmentRewardConfig,
    alignment_reward_debug,
    build_alignment_reward,
    combine_rewards,
)
from model.sampling import sample_few_step
from model.transformer import DiffusionTransformer, TransformerConfig, transformer_debug
from model.vae import ResidualVAE, VAEConfig, vae_debug
from training.loop import LoopConfig, Objective, StepOutput, seeded
from training.pe_sft import PromptPairsConfig, load_causal_lm, load_pairs, prepare_base, prompt_ids
from training.pretrain import build_transformer
from training.vae_training import load_vae_weights

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

REWARD_NAMES = ("alignment", "coverage", "char_coverage", "length")
"""The reward components :class:`PERewardConfig.weights` may weigh."""

_STOPWORDS = {
    *("a", "an", "the", "and", "or", "of", "in", "on", "at", "to", "with", "by", "for"),
    *("from", "into", "onto", "as", "is", "are", "be", "its", "it", "this", "that"),
    *("some", "several", "few"),
}


# ---- configuration ----------------------------------------------------------------------


def _debug_generator_transformer() -> TransformerConfig:
    config = transformer_debug()
    config.latent_channels = vae_debug().latent_channels
    return config


@dataclass(kw_only=True, slots=True)
class FrozenGeneratorConfig:
    """The frozen text-to-image generator that renders each rewrite."""

    transformer: TransformerConfig = field(default_factory=_debug_generator_transformer)
    """The diffusion transformer (``latent_channels`` = the VAE's, ``condition_dim`` = the
    condition encoder's width)."""
    init_from: Path | None = None
    """Its weights (a pretraining run, its checkpoints/ or one checkpoint); None: seeded."""
    seed: int = 0
    """Seed of the transformer's random weights when ``init_from`` is None."""
    vae: VAEConfig = field(default_factory=vae_debug)
    """The VAE that decodes the latents."""
    vae_init_from: Path | None = None
    """Its weights (a VAE training run or checkpoint, or a safetensors file of ResidualVAE
    weights); None: seeded random weights (``vae_seed``), as the synthetic caches are encoded
    with."""
    vae_seed: int = 0
    """Seed of the VAE's random weights when ``vae_init_from`` is None."""
    condition: ConditionEncoderConfig = field(default_factory=minilm_condition)
    """The condition encoder of the rewrites."""
    latent_size: int = 4
    """Side of the square latents (the image side is this times the VAE's spatial factor)."""
    steps: int = 4
    """Euler steps from noise to image."""
    shift: float = 1.0
    """Timestep shift of the Euler schedule (1: none)."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        self.transformer.validate()
        self.vae.validate()
        if self.transformer.latent_channels != self.vae.latent_channels:
            raise ValueError(
                f"FrozenGeneratorConfig: transformer latent_channels "
                f"{self.transformer.latent_channels} != VAE latent_channels "
                f"{self.vae.latent_channels}"
            )
        if self.latent_size < 1 or self.latent_size % self.transformer.patch_size:
            raise ValueError("FrozenGeneratorConfig.latent_size must be a multiple of patch_size")
        if self.steps < 1 or self.shift <= 0:
            raise ValueError("FrozenGeneratorConfig: steps >= 1 and shift > 0")


@dataclass(kw_only=True, slots=True)
class PERewardConfig:
    """How a rewrite (and the image the generator makes of it) is scored."""

    alignment: AlignmentRewardConfig = field(default_factory=alignment_reward_debug)
    """The alignment reward model (open_clip) scoring each image."""
    alignment_seed: int = 0
    """Seed of its random weights when its config names no checkpoint."""
    alignment_target: Literal["rich", "terse"] = "rich"
    """The text each image is aligned with: the rich caption the terse prompt came from, or
    the terse prompt itself."""
    weights: dict[str, float] = field(default_factory=lambda: {"alignment": 1.0, "coverage": 1.0})
    """Weight (>= 0) of each component in :data:`REWARD_NAMES`; absent ones weigh 0."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        unknown = sorted(set(self.weights) - set(REWARD_NAMES))
        if unknown:
            raise ValueError(f"PERewardConfig.weights: unknown components {unknown}")
        if any(w < 0 for w in self.weights.values()) or not sum(self.weights.values()) > 0:
            raise ValueError("PERewardConfig.weights must be >= 0 and not all 0")
        if self.alignment_target not in ("rich", "terse"):
            raise ValueError(f"PERewardConfig.alignment_target {self.alignment_target!r}")


@dataclass(kw_only=True, slots=True)
class RewritePolicyConfig:
    """Group sampling and the clipped, KL-regularised policy gradient."""

    prompts_per_step: int = 2
    """B: terse prompts per rollout."""
    group_size: int = 8
    """G: rewrites sampled per prompt (>= 2: advantages are relative to the group)."""
    max_new_tokens: int = 24
    """Most tokens per rewrite (the end-of-turn token included)."""
    temperature: float = 1.0
    """tau: sampling temperature (> 0); log-probabilities are of the tempered distribution."""
    updates_per_rollout: int = 2
    """Optimizer steps per rollout (1: on-policy, the ratio is always 1)."""
    clip_epsilon: float = 0.2
    """eps_c: the ratio is clipped to [1 - eps_c, 1 + eps_c]."""
    kl_coef: float = 0.02
    """beta: weight of the k3 KL to the reference."""
    advantage_eps: float = 1e-4
    """eps: added to the group's reward std."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.prompts_per_step < 1 or self.group_size < 2 or self.max_new_tokens < 1:
            raise ValueError(
                "RewritePolicyConfig: prompts_per_step >= 1, group_size >= 2, max_new_tokens >= 1"
            )
        if self.temperature <= 0 or self.updates_per_rollout < 1:
            raise ValueError("RewritePolicyConfig: temperature > 0 and updates_per_rollout >= 1")
        if not 0 < self.clip_epsilon < 1 or self.kl_coef < 0 or self.advantage_eps <= 0:
            raise ValueError(
                "RewritePolicyConfig: clip_epsilon in (0, 1), kl_coef >= 0, advantage_eps > 0"
            )


@dataclass(kw_only=True, slots=True)
class PEGRPOConfig:
    """GRPO of the prompt enhancer against the frozen generator and the reward models."""

    model: PromptEnhancerModelConfig | Path = field(default_factory=pe_debug)
    """A local model directory, or the architecture of a seeded random model (as in SFT)."""
    init_from: Path | None = None
    """Start from these weights (a PE SFT run, its checkpoints/ or one checkpoint); the
    reference is the same start, frozen. None: the weights of ``model``."""
    data: PromptPairsConfig = field(default_factory=PromptPairsConfig)
    """The (terse, rich) pairs: terse prompts to rewrite, rich captions to reward against."""
    system_prompt: str = DEFAULT_T2I_SYSTEM
    """The system instruction, as the enhancer's ``system_prompt_t2i`` at inference."""
    enable_thinking: bool | None = None
    """Passed to the chat template, as the enhancer's ``enable_thinking`` at inference."""
    grpo: RewritePolicyConfig = field(default_factory=RewritePolicyConfig)
    """Sampling and the policy-gradient objective."""
    generator: FrozenGeneratorConfig = field(default_factory=FrozenGeneratorConfig)
    """The frozen generator that renders the rewrites."""
    reward: PERewardConfig = field(default_factory=PERewardConfig)
    """The reward components and their weights."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Steps, optimizer, checkpoints, seed and device."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        self.data.validate()
        self.grpo.validate()
        self.generator.validate()
        self.reward.validate()
        self.loop.validate()
        if isinstance(self.model, Path) and not self.model.is_dir():
            raise ValueError(f"PEGRPOConfig.model {self.model} is not a local directory")


# ---- the frozen generator and the rewards ---------------------------------------------


@dataclass(kw_only=True, slots=True)
class FrozenGenerator:
    """The frozen parts that turn a rewrite into an image, and the alignment reward."""

    transformer: DiffusionTransformer
    """The diffusion transformer (velocity of normalized latents)."""
    vae: ResidualVAE
    """Decodes the sampled latents into images."""
    encoder: ConditionEncoder
    """Encodes each rewrite into the transformer's condition."""
    alignment: AlignmentReward
    """Scores each image against its target text."""
    config: FrozenGeneratorConfig
    """Latent size and Euler schedule of the rendering."""


def build_frozen_generator(
    config: FrozenGeneratorConfig, reward: PERewardConfig, *, device: str
) -> FrozenGenerator:
    """The generator and reward model of the configs, seeded or loaded, frozen, in eval mode."""
    transformer = build_transformer(  # weights that do not fit: a one-line CheckpointError
        config.transformer, seed=config.seed, init_from=config.init_from, device=device
    )
    vae = seeded(config.vae_seed, lambda: ResidualVAE(config.vae))
    if config.vae_init_from is not None:
        vae.load_state_dict(load_vae_weights(config.vae_init_from))
    alignment = seeded(reward.alignment_seed, lambda: build_alignment_reward(reward.alignment))
    encoder = ConditionEncoder.load(config.condition, device=device)
    if encoder.hidden_size != config.transformer.condition_dim:
        raise ValueError(
            f"the condition encoder is {encoder.hidden_size}-d, the transformer reads "
            f"condition_dim={config.transformer.condition_dim}"
        )
    parts: list[nn.Module] = [transformer, vae, alignment]
    for part in parts:
        part.to(torch.device(device)).eval().requires_grad_(False)
    return FrozenGenerator(
        transformer=transformer, vae=vae, encoder=encoder, alignment=alignment, config=config
    )


@torch.no_grad()
def render_images(frozen: FrozenGenerator, prompts: Sequence[str], noise: Tensor) -> Tensor:
    """Images ``(N, 3, H, W)`` in [0, 1] the frozen generator makes of ``prompts`` from
    ``noise`` (N, C, h, w): condition encoder, Euler steps, VAE decode."""
    device = noise.device
    condition, mask = frozen.encoder.encode(list(prompts), task="text_to_image")  # (N, L, D)
    condition, mask = condition.to(device), mask.to(device)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        out: Tensor = frozen.transformer(x, t, condition, mask)  # (N, C, h, w)
        return out

    latents = sample_few_step(
        velocity, noise, steps=frozen.config.steps, shift=frozen.config.shift
    )  # (N, C, h, w), normalized
    decoded = frozen.vae.decode(frozen.vae.denormalize_latents(latents))  # (N, C_img, H, W)
    return ((decoded[:, :3] + 1) / 2).clamp(0, 1)


def content_words(text: str) -> set[str]:
    """Lower-case words of ``text`` (quoted text included) that carry content: not stopwords,
    at least 3 characters or digits."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {w for w in words if w not in _STOPWORDS and (len(w) >= 3 or w.isdigit())}


def coverage(rewrite: str, terse: str, rich: str) -> float:
    """The fraction of ``rich``'s content words missing from ``terse`` that ``rewrite`` has
    (1 when nothing is missing)."""
    missing = content_words(rich) - content_words(terse)
    if not missing:
        return 1.0
    return len(missing & content_words(rewrite)) / len(missing)


def char_coverage(rewrite: str, terse: str, rich: str) -> float:
    """:func:`coverage` relaxed to letters: how much of the missing words' letter counts the
    rewrite's letter counts cover (1 when nothing is missing)."""
    missing = content_words(rich) - content_words(terse)
    need: dict[str, int] = {}
    for char in "".join(sorted(missing)):
        need[char] = need.get(char, 0) + 1
    if not need:
        return 1.0
    have: dict[str, int] = {}
    for char in rewrite.lower():
        have[char] = have.get(char, 0) + 1
    return sum(min(have.get(c, 0), n) for c, n in need.items()) / sum(need.values())


def reward_components(
    frozen: FrozenGenerator,
    rewrites: Sequence[str],
    *,
    terse: str,
    rich: str,
    rewrite_tokens: Tensor,
    noise: Tensor,
    config: PERewardConfig,
    max_new_tokens: int,
) -> dict[str, Tensor]:
    """Every weighted component for the ``G`` rewrites of one terse prompt, each ``(G,)``.

    The image path (render and align) runs only when ``alignment`` is weighted; ``noise``
    (1, C, h, w) is shared by the group.
    """
    weighted = {name for name, w in config.weights.items() if w > 0}
    count = len(rewrites)
    components: dict[str, Tensor] = {}
    if "alignment" in weighted:
        images = render_images(frozen, rewrites, noise.expand(count, -1, -1, -1))  # (G, 3, H, W)
        target = rich if config.alignment_target == "rich" else terse
        with torch.no_grad():
            components["alignment"] = frozen.alignment.score(images, [target] * count).float().cpu()
    if "coverage" in weighted:
        components["coverage"] = torch.tensor([coverage(o, terse, rich) for o in rewrites])
    if "char_coverage" in weighted:
        components["char_coverage"] = torch.tensor(
            [char_coverage(o, terse, rich) for o in rewrites]
        )
    if "length" in weighted:
        components["length"] = -rewrite_tokens.float() / max_new_tokens
    return components


# ---- a caller's own scorer --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RewriteGroup:
    """The rewrites sampled for one prompt, as a :class:`RewriteScorer` receives them."""

    prompt: str
    """What the policy rewrote (the pair's first side)."""
    target: str
    """What the rewrites should mean (the pair's second side: the intended caption)."""
    rewrites: tuple[str, ...]
    """The ``G`` sampled rewrites, decoded."""
    seed: int
    """The group's noise seed (drawn from the loop's generator: resume stays exact); every
    rewrite of the group is drawn from the same noise."""


class RewriteScorer(Protocol):
    """Scores the groups of a rollout: per group its rewards ``(G,)``, higher is better."""

    @property
    def name(self) -> str:
        """What judges the rewrites (recorded with the round's figures)."""
        ...

    def __call__(self, groups: Sequence[RewriteGroup]) -> list[Tensor]: ...


# ---- sampling ---------------------------------------------------------------------------


@torch.no_grad()
def sample_rewrites(
    policy: nn.Module,
    prompt: list[int],
    *,
    config: RewritePolicyConfig,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """``G`` sampled continuations of ``prompt``: tokens (G, N) (``pad_id`` after the end) and
    their mask (G, N), True up to and including each rewrite's end-of-turn token."""
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    count = config.group_size
    ids = torch.tensor(prompt, device=device)[None].expand(count, -1)  # (G, P)
    out = policy(input_ids=ids, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]  # (G, V)
    done = torch.zeros(count, dtype=torch.bool)  # (G,)
    tokens: list[Tensor] = []
    valid: list[Tensor] = []
    for _ in range(config.max_new_tokens):
        probs = torch.softmax(logits.float().cpu() / config.temperature, dim=-1)  # (G, V)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (G,)
        valid.append(~done)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        done = done | (token == eos_id)
        if bool(done.all()):
            break
        out = policy(input_ids=token[:, None].to(device), past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    policy.train(was_training)
    return torch.stack(tokens, dim=1), torch.stack(valid, dim=1)  # (G, N) each


def token_logprobs(
    model: nn.Module, sequence: Tensor, prompt_length: int, temperature: float
) -> Tensor:
    """Log-probabilities (G, N) of the tokens after ``prompt_length`` in ``sequence`` (G, P + N)
    under ``model``'s tempered distribution."""
    device = next(model.parameters()).device
    sequence = sequence.to(device)
    logits = model(input_ids=sequence).logits[:, prompt_length - 1 : -1]  # (G, N, V)
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)  # (G, N, V)
    return logprobs.gather(-1, sequence[:, prompt_length:, None]).squeeze(-1)  # (G, N)


def sample_rollout(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    frozen: FrozenGenerator | None,
    pairs: Sequence[tuple[str, str]],
    *,
    config: PEGRPOConfig,
    generator: torch.Generator,
    scorer: RewriteScorer | None = None,
) -> list[dict[str, Any]]:
    """One rollout: per ``(terse, rich)`` pair a group of scored rewrites with everything the
    updates need (tensors on the CPU): ``sequence`` (G, P + N), ``prompt_length``, ``mask``
    (G, N), ``old_logprobs`` and ``ref_logprobs`` (G, N), ``rewards`` and ``advantages`` (G,),
    and the reward ``components`` (name -> (G,); none when ``scorer`` scored the rewrites).

    The rewrites are scored by ``scorer`` when given (all groups in one call), else by
    ``frozen`` and ``config.reward``."""
    if frozen is None and scorer is None:
        raise ValueError("sample_rollout needs the frozen generator or a scorer")
    grpo = config.grpo
    eos_id, pad_id = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    latent_shape = (
        1,
        config.generator.transformer.latent_channels,
        config.generator.latent_size,
        config.generator.latent_size,
    )
    sampled = []
    for terse, rich in pairs:
        prompt = prompt_ids(
            tokenizer,
            terse,
            system_prompt=config.system_prompt,
            enable_thinking=config.enable_thinking,
        )
        tokens, mask = sample_rewrites(
            policy, prompt, config=grpo, eos_id=eos_id, pad_id=pad_id, generator=generator
        )  # (G, N) each
        if scorer is None:
            noise = torch.randn(latent_shape, generator=generator)  # (1, C, h, w): the group's
            seed = 0
        else:
            noise = torch.empty(0)
            seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
        lengths = mask.sum(dim=1)  # (G,)
        rewrites = [
            tokenizer.decode(row[:n], skip_special_tokens=True).strip()
            for row, n in zip(tokens.tolist(), lengths.tolist(), strict=True)
        ]
        sampled.append((terse, rich, prompt, tokens, mask, lengths, rewrites, noise, seed))
    if scorer is not None:
        scored = scorer(
            [
                RewriteGroup(prompt=terse, target=rich, rewrites=tuple(rewrites), seed=seed)
                for terse, rich, _, _, _, _, rewrites, _, seed in sampled
            ]
        )
        if len(scored) != len(sampled) or any(r.shape != (grpo.group_size,) for r in scored):
            raise ValueError(f"the scorer {scorer.name!r} must give ({grpo.group_size},) a group")
        scores: list[tuple[Tensor, dict[str, Tensor]]] = [(r.float().cpu(), {}) for r in scored]
    else:
        assert frozen is not None
        scores = []
        for terse, rich, _, _, _, lengths, rewrites, noise, _ in sampled:
            components = reward_components(
                frozen,
                rewrites,
                terse=terse,
                rich=rich,
                rewrite_tokens=lengths,
                noise=noise.to(frozen.vae.from_latents.weight.device),
                config=config.reward,
                max_new_tokens=grpo.max_new_tokens,
            )
            rewards = combine_rewards(
                components, ["default"] * len(rewrites), {"default": config.reward.weights}
            )  # (G,)
            scores.append((rewards, components))
    groups = []
    for (_, _, prompt, tokens, mask, _, rewrites, _, _), (rewards, components) in zip(
        sampled, scores, strict=True
    ):
        advantages = (rewards - rewards.mean()) / (rewards.std() + grpo.advantage_eps)  # (G,)
        sequence = torch.cat([torch.tensor(prompt)[None].expand(len(rewrites), -1), tokens], 1)
        with torch.no_grad():
            old = token_logprobs(policy, sequence, len(prompt), grpo.temperature).cpu()
            ref = token_logprobs(reference, sequence, len(prompt), grpo.temperature).cpu()
        groups.append(
            {
                "sequence": sequence,
                "prompt_length": len(prompt),
                "mask": mask,
                "old_logprobs": old,
                "ref_logprobs": ref,
                "rewards": rewards,
                "advantages": advantages,
                "components": components,
            }
        )
    return groups


# ---- the objective ----------------------------------------------------------------------


def pe_grpo_step(
    policy: nn.Module, rollout: Sequence[dict[str, Any]], *, config: RewritePolicyConfig
) -> StepOutput:
    """The GRPO loss of one update on ``rollout`` (from :func:`sample_rollout`); see the module
    docstring.

    Metrics: ``loss``; ``reward_mean`` and ``reward_std`` of the rollout's rewards;
    ``reward_<name>``, each component's mean; ``kl``, the mean k3 KL per rewrite token;
    ``clip_fraction``, the fraction of rewrite tokens whose ratio lies outside the clip range;
    ``rewrite_tokens``, the mean rewrite length in tokens.
    """
    device = next(policy.parameters()).device
    total = torch.zeros((), device=device)
    kl_sum = clipped = tokens = 0.0
    count = 0
    for group in rollout:
        # The rollout lives on the CPU (it is checkpointed); the loss stays on the policy's
        # device, so backward does not cross devices.
        mask = group["mask"].float().to(device)  # (G, N)
        logprobs = token_logprobs(
            policy, group["sequence"], group["prompt_length"], config.temperature
        )  # (G, N)
        ratio = torch.exp(logprobs - group["old_logprobs"].to(device))  # (G, N)
        advantages = group["advantages"][:, None].to(device)  # (G, 1)
        clipped_ratio = ratio.clamp(1 - config.clip_epsilon, 1 + config.clip_epsilon)
        surrogate = torch.minimum(ratio * advantages, clipped_ratio * advantages)  # (G, N)
        log_ref_ratio = group["ref_logprobs"].to(device) - logprobs  # (G, N)
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # (G, N)
        per_token = -surrogate + config.kl_coef * kl  # (G, N)
        lengths = mask.sum(dim=1).clamp(min=1)  # (G,)
        total = total + ((per_token * mask).sum(dim=1) / lengths).sum()
        with torch.no_grad():
            kl_sum += float((kl * mask).sum())
            outside = (ratio - 1).abs() > config.clip_epsilon
            clipped += float((outside.float() * mask).sum())
            tokens += float(mask.sum())
        count += mask.shape[0]
    loss = total / count
    rewards = torch.cat([g["rewards"] for g in rollout])  # (B G,)
    names = sorted({name for g in rollout for name in g["components"]})
    metrics = {
        "loss": float(loss.detach()),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        **{
            f"reward_{name}": float(torch.cat([g["components"][name] for g in rollout]).mean())
            for name in names
        },
        "kl": kl_sum / max(tokens, 1.0),
        "clip_fraction": clipped / max(tokens, 1.0),
        "rewrite_tokens": tokens / count,
    }
    return StepOutput(loss=loss, metrics=metrics)


def build_pe_grpo(
    config: PEGRPOConfig, out: Path, *, scorer: RewriteScorer | None = None
) -> Objective:
    """The GRPO objective of ``config``: the policy LM, its frozen reference, the frozen
    generator and reward model (or ``scorer``, which then judges every rewrite and the config's
    generator and reward are not built), and a rollout buffer in the data state."""
    device = config.loop.device
    base = prepare_base(config.model, out)
    policy, tokenizer = load_causal_lm(
        base, init_from=config.init_from, device=device, trainable=True
    )
    reference, _ = load_causal_lm(base, init_from=config.init_from, device=device, trainable=False)
    frozen = (
        build_frozen_generator(config.generator, config.reward, device=device)
        if scorer is None
        else None
    )
    pairs = load_pairs(config.data)
    state: dict[str, Any] = {"rollout": None, "uses": 0}

    def step(generator: torch.Generator) -> StepOutput:
        if state["rollout"] is None or state["uses"] >= config.grpo.updates_per_rollout:
            index = torch.randint(len(pairs), (config.grpo.prompts_per_step,), generator=generator)
            state["rollout"] = sample_rollout(
                policy,
                reference,
                tokenizer,
                frozen,
                [pairs[i] for i in index.tolist()],
                config=config,
                generator=generator,
                scorer=scorer,
            )
            state["uses"] = 0
        state["uses"] += 1
        return pe_grpo_step(policy, state["rollout"], config=config.grpo)

    def data_state() -> dict[str, Any]:
        return dict(state)

    def load_data_state(loaded: dict[str, Any]) -> None:
        state.update(rollout=loaded.get("rollout"), uses=int(loaded.get("uses", 0)))

    return Objective(
        model=policy, step=step, data_state=data_state, load_data_state=load_data_state
    )
