"""Diffusion-DPO: log 2 at initialisation, a frozen reference, shared noise, learned preferences."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from model.transformer import DiffusionTransformer, TransformerConfig
from training.cache import CachedBatches, CacheError, ConsumerConfig
from training.data import DatasetError
from training.dpo import DPOConfig, dpo_step
from training.loop import METRICS_FILE
from training.preference import PAIRS_FILE, PreferencePair, read_pairs, write_pairs
from training.recipes import dpo_debug
from training.synthetic import (
    SyntheticDataConfig,
    build_synthetic_cache,
    write_synthetic_preferences,
)
from training.trainer import train

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
            "mask": torch.ones(BATCH, LENGTH, dtype=torch.bool),
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


# ---- the preference cache and the dpo-debug recipe ----------------------------------------


def _read_metrics(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


@pytest.mark.usefixtures("offline")
def test_dpo_debug_learns_the_preferences(tmp_path: Path) -> None:
    config = dpo_debug()
    result = train(config, out=tmp_path)
    rows = _read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, config.loop.max_steps + 1))
    assert rows[0]["accuracy"] == 0.5
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6
    last = rows[-10:]
    accuracy = sum(r["accuracy"] for r in last) / len(last)
    loss = sum(r["loss"] for r in last) / len(last)
    assert accuracy > 0.8, [r["accuracy"] for r in rows]
    assert loss < math.log(2) - 0.1, [r["loss"] for r in rows]
    assert result.checkpoint is not None

    # The cache is a preference cache: the two sides differ, their prompt is one.
    batch = next(iter(CachedBatches(tmp_path / "cache", ConsumerConfig(batch_size=4))))
    assert batch["winner_latents"].shape == batch["loser_latents"].shape
    assert not torch.equal(batch["winner_latents"], batch["loser_latents"])
    assert batch["condition"].shape[:2] == batch["mask"].shape
    assert all(i.startswith("pair-") for i in batch["ids"])

    # DPO refuses a cache of plain samples, with a one-line reason.
    plain = dpo_debug()
    plain.data.cache_dir = tmp_path / "plain"
    assert plain.data.synthetic is not None
    build_synthetic_cache(plain.data.cache_dir, plain.data.synthetic)
    with pytest.raises(CacheError, match="reads a 'preferences' cache"):
        train(plain, out=tmp_path / "other")


def _pair_dataset(root: Path) -> None:
    write_synthetic_preferences(root, SyntheticDataConfig(images=2))


def test_pairs_are_validated_against_the_samples(tmp_path: Path) -> None:
    _pair_dataset(tmp_path)
    pairs = read_pairs(tmp_path)
    assert [p.id for p in pairs] == ["pair-0", "pair-1"]
    assert all(p.winner.endswith("-winner") and p.loser.endswith("-loser") for p in pairs)

    with pytest.raises(DatasetError, match="unknown sample 'nope'"):
        write_pairs(tmp_path, [PreferencePair(id="x", winner="nope", loser=pairs[0].loser)])
    with pytest.raises(DatasetError, match="different prompts"):
        write_pairs(
            tmp_path, [PreferencePair(id="x", winner=pairs[0].winner, loser=pairs[1].loser)]
        )
    with pytest.raises(DatasetError, match="same winner and loser"):
        write_pairs(
            tmp_path, [PreferencePair(id="x", winner=pairs[0].winner, loser=pairs[0].winner)]
        )

    lines = (tmp_path / PAIRS_FILE).read_text().splitlines()
    (tmp_path / PAIRS_FILE).write_text(lines[0] + '\n{"id": "p", "winner": "a"}\n')
    with pytest.raises(DatasetError, match=rf"{PAIRS_FILE}:2: invalid pair: loser"):
        read_pairs(tmp_path)
