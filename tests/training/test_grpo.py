"""Flow-GRPO: the reward rises, the clip and the KL behave, resume is exact."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import Tensor

from model.transformer import DiffusionTransformer, TransformerConfig
from training.checkpoint import load_model_weights
from training.grpo import (
    PALETTE,
    EncodedPrompts,
    GRPOConfig,
    GRPOPromptsConfig,
    GRPORewardConfig,
    Rollout,
    colour_reward,
    group_advantages,
    grpo_step,
    sample_rollout,
)
from training.loop import METRICS_FILE
from training.recipes import grpo_debug
from training.trainer import train

PROMPTS = ["a red square", "a blue circle"]
GROUP = 4


def _read_metrics(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


# ---- the step on a small hand-made setup (no condition encoder, no VAE) -------------------


def _small_config(*, clip_range: float = 1e-3, kl_beta: float = 0.0) -> GRPOConfig:
    """4 latent channels, a 16-d condition, 4 x 4 latents, 2 prompts x 4 samples."""
    config = grpo_debug()
    config.model = TransformerConfig(
        latent_channels=4,
        condition_dim=16,
        num_layers=1,
        num_heads=2,
        head_dim=16,
        rope_axes_dims=(4, 6, 6),
    )
    config.group_size, config.prompts_per_step = GROUP, len(PROMPTS)
    config.prompts = GRPOPromptsConfig(prompts=PROMPTS)
    config.clip_range, config.kl_beta = clip_range, kl_beta
    return config


def _prompts() -> EncodedPrompts:
    g = torch.Generator().manual_seed(0)
    condition = torch.randn(len(PROMPTS), 3, 16, generator=g)  # (K, L, D)
    return EncodedPrompts(
        texts=PROMPTS, condition=condition, mask=torch.ones(len(PROMPTS), 3, dtype=torch.bool)
    )


def _decode(latents: Tensor) -> Tensor:
    """A transparent stand-in for the VAE: the first 3 latent channels through a sigmoid."""
    return torch.sigmoid(latents[:, :3])  # (B, 3, h, w) in [0, 1]


def _setup(config: GRPOConfig) -> tuple[DiffusionTransformer, DiffusionTransformer, Rollout]:
    torch.manual_seed(0)
    policy = DiffusionTransformer(config.model)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    rollout = sample_rollout(
        policy,
        _prompts(),
        decode=_decode,
        reward=colour_reward,
        config=config,
        generator=torch.Generator().manual_seed(1),
    )
    return policy, reference, rollout


def _gradients(policy: DiffusionTransformer, rollout: Rollout, config: GRPOConfig) -> list[Tensor]:
    reference = copy.deepcopy(policy).requires_grad_(False)
    policy.zero_grad(set_to_none=True)
    out = grpo_step(policy, reference, rollout, prompts=_prompts(), config=config)
    torch.autograd.backward(out.loss)
    return [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in policy.parameters()
    ]


def test_rollout_groups_and_advantages() -> None:
    config = _small_config()
    _, _, rollout = _setup(config)
    start, stop = config.sampler.sde_window or (0, config.sampler.steps)
    n = GROUP * len(PROMPTS)
    assert rollout.latents.shape == (stop - start + 1, n, 4, 4, 4)
    assert rollout.old_log_probs.shape == (n, stop - start)
    # Each group shares one prompt; the advantages are normalized within it.
    groups = rollout.prompt_index.view(-1, GROUP)
    assert bool((groups == groups[:, :1]).all())
    assert sorted(groups[:, 0].tolist()) == list(range(len(PROMPTS)))
    advantages = rollout.advantages.view(-1, GROUP)
    assert torch.allclose(advantages.mean(dim=1), torch.zeros(len(PROMPTS)), atol=1e-5)
    assert torch.allclose(advantages.std(dim=1, correction=0), torch.ones(len(PROMPTS)), atol=0.01)
    assert torch.equal(
        group_advantages(torch.tensor([1.0, 1.0, 3.0, 5.0]), 2, clip=5.0),
        torch.tensor([0.0, 0.0, -1.0, 1.0]) / (1 + 1e-4),
    )


def test_first_update_has_ratio_one_and_the_clip_is_one_sided() -> None:
    config = _small_config(kl_beta=0.0, clip_range=1e-3)
    policy, reference, rollout = _setup(config)
    out = grpo_step(policy, reference, rollout, prompts=_prompts(), config=config)
    assert abs(out.metrics["ratio_mean"] - 1.0) < 1e-6
    assert out.metrics["clip_fraction"] == 0.0
    assert out.metrics["advantage_abs_mean"] > 0.5

    # Ratio 1: the clipped objective has the gradient of the unclipped one.
    clipped = _gradients(policy, rollout, config)
    unclipped = _gradients(policy, rollout, replace(config, clip_range=1e9))
    assert sum(float(g.abs().sum()) for g in clipped) > 0
    for a, b in zip(clipped, unclipped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)

    # Ratio e^0.5 > 1 + eps: no gradient where the advantage is positive (already pushed
    # past the clip), the full gradient where it is negative (the clip is one-sided).
    moved = replace(rollout, old_log_probs=rollout.old_log_probs - 0.5)
    positive = replace(moved, advantages=torch.ones_like(rollout.advantages))
    negative = replace(moved, advantages=-torch.ones_like(rollout.advantages))
    out = grpo_step(policy, reference, positive, prompts=_prompts(), config=config)
    assert out.metrics["clip_fraction"] == 1.0
    assert abs(out.metrics["ratio_mean"] - math.exp(0.5)) < 1e-4
    assert all(float(g.abs().max()) == 0.0 for g in _gradients(policy, positive, config))
    assert sum(float(g.abs().sum()) for g in _gradients(policy, negative, config)) > 0


def test_kl_is_zero_at_the_reference_and_grows_away_from_it() -> None:
    config = _small_config(kl_beta=1.0)
    policy, reference, rollout = _setup(config)
    out = grpo_step(policy, reference, rollout, prompts=_prompts(), config=config)
    assert out.metrics["kl"] == 0.0
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = grpo_step(policy, reference, rollout, prompts=_prompts(), config=config)
    assert out.metrics["kl"] > 0
    assert abs(out.metrics["loss"] - out.metrics["policy_loss"] - out.metrics["kl"]) < 1e-6


def test_colour_reward() -> None:
    red = torch.tensor(PALETTE["red"]).view(1, 3, 1, 1).expand(2, 3, 8, 8)
    scores = colour_reward(red, ["a red circle on a blue background", "a blue red circle"])
    assert scores[0].item() == pytest.approx(1.0)
    assert scores[1].item() < 0.7  # the first colour named is the target
    with pytest.raises(ValueError, match="names none"):
        colour_reward(red[:1], ["a circle"])
    with pytest.raises(ValueError, match="unknown rewards"):
        GRPORewardConfig(weights={"beauty": 1.0}).validate()


# ---- the grpo-debug recipe ----------------------------------------------------------------


@pytest.mark.usefixtures("offline")
def test_grpo_debug_raises_the_reward(tmp_path: Path) -> None:
    config = grpo_debug()
    result = train(config, out=tmp_path)
    rows = _read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, config.loop.max_steps + 1))
    rewards = [r["reward_mean"] for r in rows]
    k = 10
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    assert last > first + 0.03, rewards  # observed about 0.54 -> 0.61
    # A rollout's first update has ratio 1 and nothing clipped; its second is partly clipped.
    assert all(r["clip_fraction"] == 0.0 for r in rows[::2])
    assert all(abs(r["ratio_mean"] - 1) < 1e-6 for r in rows[::2])
    assert sum(r["clip_fraction"] for r in rows[1::2]) / len(rows[1::2]) > 0.1
    # The policy starts at the reference and moves away from it.
    assert rows[0]["kl"] == 0.0
    assert rows[-1]["kl"] > 0.01
    assert result.checkpoint is not None


def _resume_config() -> GRPOConfig:
    config = grpo_debug()
    config.group_size, config.prompts_per_step = 4, 2
    config.sampler.steps, config.sampler.sde_window = 4, (0, 2)
    config.loop.checkpoint_every = 100
    return config


@pytest.mark.usefixtures("offline")
def test_interrupted_run_resumes_exactly(tmp_path: Path) -> None:
    steps = 5
    straight = train(_resume_config(), out=tmp_path / "straight", max_steps=steps)
    # Killed after step 3: in the middle of the second rollout (2 updates per rollout).
    train(_resume_config(), out=tmp_path / "resumed", max_steps=3)
    resumed = train(_resume_config(), out=tmp_path / "resumed", max_steps=steps)
    assert resumed.resumed_from == 3
    assert resumed.losses == straight.losses[3:]
    assert _read_metrics(tmp_path / "resumed") == _read_metrics(tmp_path / "straight")
    weights = load_model_weights(tmp_path / "straight")
    for name, value in load_model_weights(tmp_path / "resumed").items():
        assert torch.equal(value, weights[name]), name


@pytest.mark.usefixtures("offline")
def test_alignment_reward_path(tmp_path: Path) -> None:
    config = _resume_config()
    config.reward.weights = {"alignment": 1.0}  # the open_clip reward model (debug CLIP)
    train(config, out=tmp_path, max_steps=1)
    (row,) = _read_metrics(tmp_path)
    assert row["reward_std"] > 0
    assert math.isfinite(row["reward_mean"])
    assert abs(row["reward_mean"]) <= 1.0  # a cosine similarity
    assert row["grad_norm"] > 0
