"""Diffusion-DPO for the flow-matching generator, as one step function.

Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference
Optimization", 2023, eq. 14) replaces DPO's log-likelihood ratios by differences of denoising
errors. For a preference pair (winner ``x0_w``, loser ``x0_l``) under one condition, with ONE
noise ``e`` and ONE flow time ``t`` shared by the pair (the paper's ``x_t^w``, ``x_t^l`` come
from the same ``t`` and, in its reference implementation, the same noise)::

    x_t^k   = (1 - t) * x0_k + t * e                  k in {w, l}
    err_M^k = w(t) * mean((M(x_t^k, t, c) - (e - x0_k)) ** 2)     M in {policy, reference}
    d_k     = err_policy^k - err_reference^k          how much better the policy denoises k
    margin  = -(beta / 2) * (d_w - d_l)               the implicit reward margin of the pair
    loss    = -log sigmoid(margin)                    averaged over the batch

Conventions, and how they relate to the paper's ``-log sigmoid(-beta T w(lambda_t) (...))``:

* The errors are flow-matching velocity errors, mean over (C, H, W), not the paper's
  epsilon errors summed over pixels. For the straight path, ``e_hat = x_t + (1 - t) v_hat``,
  so the epsilon error is ``(1 - t)^2`` times the velocity error: a per-t weight, which the
  paper's ``w(lambda_t)`` absorbs (as in the Flow-DPO form of Liu et al. 2025, "Improving
  Video Generation with Human Feedback"). ``w(t)`` here is the flow config's loss weight.
* The factor is ``beta / 2`` with the errors as means (the reference implementation's
  ``scale_term = -0.5 * beta_dpo``); ``T`` and the pixel count are folded into ``beta``, hence
  its large default (5000, the paper's SDXL setting).
* When the policy equals the reference every ``d_k`` is 0, so the margin is 0 and the loss is
  exactly ``log 2``.

:func:`dpo_step` computes the loss of one batch (the caller runs backward and the optimizer)
and returns the objective's figures next to it. The reference runs without a graph.
:func:`evaluate_preferences` measures a policy on pairs it did not train on: its implicit
preference accuracy (the share of pairs whose margin is > 0) and its DPO loss, with no reward
model involved (a round's report figure).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from model.transformer import DiffusionTransformer, TransformerConfig
from training.flow_matching import FlowMatchingConfig, loss_weights, sample_timesteps
from training.loop import LoopConfig, Objective, StepOutput
from training.pretrain import build_transformer, cached_objective, check_cache, prepare_cache
from training.synthetic import SyntheticDataConfig


@dataclass(kw_only=True, slots=True)
class DPOConfig:
    """The Diffusion-DPO objective: its temperature and how flow times are drawn."""

    beta: float = 5000.0
    """Inverse temperature (> 0) of the implicit reward; multiplies half the error differences
    (per-element mean squared velocity errors), so ``T`` and the pixel count are folded in."""
    flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    """How the shared flow time t is sampled and the per-sample errors are weighted (w(t))."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.beta <= 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta}")
        self.flow.validate()


@dataclass(frozen=True, slots=True)
class PairErrors:
    """Per pair of a batch: the implicit reward margin and the policy's errors behind it."""

    margin: Tensor
    """``(B,)``: ``-(beta / 2) * (d_w - d_l)`` (> 0: the policy moved toward the winner)."""
    policy_winner: Tensor
    """``(B,)``: the policy's weighted flow-matching error on the winner."""
    policy_loser: Tensor
    """``(B,)``: the policy's weighted flow-matching error on the loser."""
    t: Tensor
    """``(B,)``: the flow time each pair was noised to."""


def pair_margins(
    policy: DiffusionTransformer,
    reference: DiffusionTransformer,
    batch: dict[str, Any],
    *,
    config: DPOConfig,
    generator: torch.Generator,
) -> PairErrors:
    """The implicit reward margin of every pair of ``batch`` (see the module docstring), with
    the policy's graph; the reference runs under ``torch.no_grad``. ``batch`` as
    :func:`dpo_step` reads it; noise and times come from ``generator`` (a CPU generator) and
    are shared by the winner and the loser of a pair."""
    parameter = next(policy.parameters())
    device = parameter.device
    winner = batch["winner_latents"].to(device=device, dtype=torch.float32)  # (B, C, H, W)
    loser = batch["loser_latents"].to(device=device, dtype=torch.float32)  # (B, C, H, W)
    if winner.shape != loser.shape:
        raise ValueError(
            f"winner_latents {tuple(winner.shape)} and loser_latents {tuple(loser.shape)} differ"
        )
    b = winner.shape[0]
    condition = batch["condition"].to(device=device, dtype=parameter.dtype)  # (B, L, D)
    mask = batch["mask"].to(device)  # (B, L)

    # One noise and one t per pair, shared by its winner and loser.
    noise = torch.randn(winner.shape, generator=generator).to(device)  # (B, C, H, W)
    t = sample_timesteps(b, config.flow, generator).to(device)  # (B,)

    # Winners first, losers second: one forward of 2B samples per model.
    x0 = torch.cat([winner, loser])  # (2B, C, H, W)
    noise2 = torch.cat([noise, noise])  # (2B, C, H, W)
    t2 = torch.cat([t, t])  # (2B,)
    t_ = t2[:, None, None, None]  # (2B, 1, 1, 1)
    x_t = (1 - t_) * x0 + t_ * noise2  # (2B, C, H, W)
    target = noise2 - x0  # (2B, C, H, W)
    condition2 = torch.cat([condition, condition])  # (2B, L, D)
    mask2 = torch.cat([mask, mask])  # (2B, L)
    weights = loss_weights(t2, config.flow)  # (2B,)

    prediction = policy(x_t, t2, condition2, mask2).float()  # (2B, C, H, W)
    policy_error = weights * F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    with torch.no_grad():
        reference_prediction = reference(x_t, t2, condition2, mask2).float()  # (2B, C, H, W)
        reference_error = weights * (reference_prediction - target).square().mean(dim=(1, 2, 3))

    policy_w, policy_l = policy_error.chunk(2)  # (B,) each
    reference_w, reference_l = reference_error.chunk(2)  # (B,) each
    margin = -0.5 * config.beta * ((policy_w - reference_w) - (policy_l - reference_l))  # (B,)
    return PairErrors(margin=margin, policy_winner=policy_w, policy_loser=policy_l, t=t)


def dpo_step(
    policy: DiffusionTransformer,
    reference: DiffusionTransformer,
    batch: dict[str, Any],
    *,
    config: DPOConfig,
    generator: torch.Generator,
) -> StepOutput:
    """The Diffusion-DPO loss of one batch of preference pairs; see the module docstring.

    ``batch`` holds ``winner_latents`` and ``loser_latents`` (B, C, H, W), ``condition``
    (B, L, D) and ``mask`` (B, L) bool, pair ``i`` sharing condition ``i`` (a batch of a
    preference cache, :mod:`training.preference`). Noise and
    times come from ``generator`` (a CPU generator) and are shared by the winner and the loser
    of a pair. ``reference`` (the frozen initial policy) runs under ``torch.no_grad``.

    Metrics: ``loss``; ``accuracy``, the fraction of pairs whose implicit reward margin is
    > 0, i.e. ``d_w < d_l`` (a tie, as at initialisation, counts one half); ``reward_margin``,
    the mean margin; ``t_mean``; ``policy_error_winner`` / ``policy_error_loser``, the policy's
    mean weighted flow-matching errors (a collapse of both shows as growth).
    """
    pairs = pair_margins(policy, reference, batch, config=config, generator=generator)
    margin = pairs.margin  # (B,)
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()  # (B,)
        metrics = {
            "loss": float(loss),
            "accuracy": float(accuracy.mean()),
            "reward_margin": float(margin.mean()),
            "t_mean": float(pairs.t.mean()),
            "policy_error_winner": float(pairs.policy_winner.mean()),
            "policy_error_loser": float(pairs.policy_loser.mean()),
        }
    return StepOutput(loss=loss, metrics=metrics)


@dataclass(frozen=True, slots=True)
class PreferenceEvaluation:
    """A policy measured on preference pairs against its reference (no reward model)."""

    accuracy: float
    """The implicit preference accuracy: the share of pairs whose margin, averaged over the
    draws, is > 0 (a tie counts half: 0.5 when the policy is its reference)."""
    loss: float
    """The Diffusion-DPO loss, mean over pairs and draws (log 2 when the policy is its
    reference)."""
    margin: float
    """The mean implicit reward margin."""
    pairs: int
    """Pairs measured."""


def evaluate_preferences(
    policy: DiffusionTransformer,
    reference: DiffusionTransformer,
    batches: Iterable[dict[str, Any]],
    *,
    config: DPOConfig,
    draws: int = 4,
    seed: int = 0,
) -> PreferenceEvaluation:
    """The reward-free (implicit, DPO) preference accuracy and loss of ``policy`` on
    ``batches`` (e.g. a held-out preference cache read once): per pair, the implicit reward
    margin over ``draws`` draws of shared noise and flow time; the pair counts as right when
    their mean is > 0 — the policy, relative to ``reference``, denoises the preferred image
    better than the rejected one. The draws come from a generator seeded with ``seed``: two
    policies measured on the same batches with the same seed see the same noise and times.
    No gradients; the policy's mode is restored."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    generator = torch.Generator().manual_seed(seed)
    was_training = policy.training
    policy.eval()
    margins: list[Tensor] = []
    try:
        with torch.no_grad():
            for batch in batches:
                margins.append(
                    torch.stack(
                        [
                            pair_margins(
                                policy, reference, batch, config=config, generator=generator
                            ).margin
                            for _ in range(draws)
                        ],
                        dim=1,
                    )
                )  # (B, draws)
    finally:
        policy.train(was_training)
    if not margins:
        raise ValueError("no preference pairs to measure")
    margin = torch.cat(margins).cpu()  # (N, draws)
    mean = margin.mean(dim=1)  # (N,)
    right = (mean > 0).float() + 0.5 * (mean == 0).float()  # (N,)
    return PreferenceEvaluation(
        accuracy=float(right.mean()),
        loss=float(-F.logsigmoid(margin).mean()),
        margin=float(margin.mean()),
        pairs=margin.shape[0],
    )


# ---- training run -----------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class PreferenceDataConfig:
    """Where the preference cache (:mod:`training.preference`) comes from and how it is read."""

    cache_dir: Path | None = None
    """An existing preference cache; None: ``<out>/cache``, built from ``synthetic``."""
    synthetic: SyntheticDataConfig | None = None
    """The generated scenes whose right-vs-wrong-colour pairs are cached when ``cache_dir``
    is None."""
    batch_size: int = 8
    """Pairs per optimizer step (a shard's last batch may hold fewer)."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.cache_dir is None and self.synthetic is None:
            raise ValueError("PreferenceDataConfig needs a cache_dir or a synthetic dataset")
        if self.batch_size < 1:
            raise ValueError(f"PreferenceDataConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.synthetic is not None:
            self.synthetic.validate()


@dataclass(kw_only=True, slots=True)
class DPOTrainConfig:
    """Diffusion-DPO of the transformer on a preference cache, against its initial weights."""

    model: TransformerConfig
    """The transformer (``latent_channels`` and ``condition_dim`` must match the cache)."""
    dpo: DPOConfig = field(default_factory=DPOConfig)
    """The objective's beta and flow-time sampling."""
    data: PreferenceDataConfig
    """The preference cache."""
    init_from: Path | None = None
    """The policy's initial weights, which are also the frozen reference (a run directory,
    its checkpoints/ or one checkpoint); None: seeded random weights."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Steps, optimizer, checkpoints, seed and device."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        self.model.validate()
        self.dpo.validate()
        self.data.validate()
        self.loop.validate()


def build_dpo(config: DPOTrainConfig, out: Path) -> Objective:
    """The Diffusion-DPO objective of ``config``; the reference is the policy's initial copy."""
    data = config.data
    cache = prepare_cache(data.cache_dir, data.synthetic, out, kind="preferences")
    check_cache(cache, config.model)
    loop = config.loop
    policy = build_transformer(
        config.model, seed=loop.seed, init_from=config.init_from, device=loop.device
    )
    reference = build_transformer(
        config.model, seed=loop.seed, init_from=config.init_from, device=loop.device
    )
    reference.requires_grad_(False).eval()

    def step(batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
        return dpo_step(policy, reference, batch, config=config.dpo, generator=generator)

    return cached_objective(
        policy, cache, batch_size=config.data.batch_size, seed=loop.seed, step=step
    )
