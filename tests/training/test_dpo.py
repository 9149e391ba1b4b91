"""Diffusion-DPO: log 2 at initialisation, a frozen reference, shared noise, learned preferences."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from model.transformer import DiffusionTransformer, TransformerConfig
from training.dpo import DPOConfig, dpo_step

CONDITIONS = 4  # distinct synthetic prompts
LENGTH = 3  # condition tokens per prompt
SIZE = 8  # latent height and width
BATCH = 8
BETA = 200.0  # errors are per-element means of ~2, so small margins need a large beta
LR = 1e-3  # AdamW learning rate of the preference run
STEPS = 30  # optimizer steps of the preference run


def _transformer_config() -> TransformerConfig:
    """transformer_debug()'s shape, narrowed: 4 latent channels, a 16-d condition."""
    return TransformerConfig(
        latent_channels=4,
        condition_dim=16,
        num_layers=2,
        num_heads=2,
        head_dim=16,
        rope_axes_dims=(4, 6, 6),
    )


def _models(seed: int = 0) -> tuple[DiffusionTransformer, DiffusionTransformer]:
    """A random policy and its frozen copy as the reference."""
    torch.manual_seed(seed)
    policy = DiffusionTransformer(_transformer_config())
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    return policy, reference


class _Preferences:
    """Per condition a fixed winner pattern and a different loser pattern."""

    def __init__(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        shape = (CONDITIONS, 4, SIZE, SIZE)
        self.conditions = torch.randn(CONDITIONS, LENGTH, 16, generator=g)  # (K, L, D)
        self.winners = torch.randn(shape, generator=g)  # (K, C, H, W)
        self.losers = torch.randn(shape, generator=g)  # (K, C, H, W)
        self.generator = g

    def batch(self) -> dict[str, torch.Tensor]:
        index = torch.randint(CONDITIONS, (BATCH,), generator=self.generator)  # (B,)
        return {
            "winner_latents": self.winners[index],
            "loser_latents": self.losers[index],
            "condition": self.conditions[index],
            "condition_mask": torch.ones(BATCH, LENGTH, dtype=torch.bool),
        }


def test_initial_loss_is_log2_and_reference_gets_no_gradient() -> None:
    policy, reference = _models()
    reference.requires_grad_(True)  # even trainable, the reference must stay out of the graph
    batch = _Preferences(seed=1).batch()
    out = dpo_step(
        policy, reference, batch, config=DPOConfig(), generator=torch.Generator().manual_seed(2)
    )
    assert abs(out.loss.item() - math.log(2)) < 1e-6
    assert out.metrics["reward_margin"] == 0.0
    assert out.metrics["accuracy"] == 0.5  # every pair ties
    assert 0 < out.metrics["t_mean"] < 1
    torch.autograd.backward(out.loss)
    assert all(p.grad is None for p in reference.parameters())
    grads = [p.grad for p in policy.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_shared_noise_gives_zero_margin_for_identical_pairs() -> None:
    policy, reference = _models()
    with torch.no_grad():  # move the policy away from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prefs = _Preferences(seed=3)
    batch = prefs.batch()
    batch["loser_latents"] = batch["winner_latents"].clone()
    config = DPOConfig(beta=100.0)
    out = dpo_step(policy, reference, batch, config=config, generator=torch.Generator())
    frozen = dpo_step(reference, reference, batch, config=config, generator=torch.Generator())
    # The policy really differs from the reference on these inputs...
    assert abs(out.metrics["policy_error_winner"] - frozen.metrics["policy_error_winner"]) > 1e-4
    # ...yet winner and loser see the same x_t, so their errors and the margin are equal.
    assert out.metrics["policy_error_winner"] == out.metrics["policy_error_loser"]
    assert abs(out.metrics["reward_margin"]) < 1e-6
    assert abs(out.loss.item() - math.log(2)) < 1e-6

    # Distinct pairs do move the margin once the policy differs from the reference.
    generator = torch.Generator()
    distinct = dpo_step(policy, reference, prefs.batch(), config=config, generator=generator)
    assert abs(distinct.metrics["reward_margin"]) > 1e-3


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0.0).validate()


def test_preferences_are_learned() -> None:
    policy, reference = _models(seed=4)
    prefs = _Preferences(seed=5)
    config = DPOConfig(beta=BETA)
    config.validate()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.0)
    generator = torch.Generator().manual_seed(6)
    history: list[dict[str, float]] = []
    for _ in range(STEPS):
        out = dpo_step(policy, reference, prefs.batch(), config=config, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(out.loss)
        optimizer.step()
        history.append(out.metrics)
    first, last = history[0], history[-10:]
    last_accuracy = sum(m["accuracy"] for m in last) / len(last)
    last_loss = sum(m["loss"] for m in last) / len(last)
    assert first["accuracy"] == 0.5
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert last_accuracy > 0.8, [m["accuracy"] for m in history]
    assert last_loss < math.log(2) - 0.1, [m["loss"] for m in history]
    assert all(p.grad is None for p in reference.parameters())
