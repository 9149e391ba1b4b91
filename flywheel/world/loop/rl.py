"""The RL track: reward weights recalibrated where the reward disagrees with people, then a
Flow-GRPO round against the recalibrated reward.

1. **Recalibration.** For each category (skill) of the routed cases, every available reward
   is asked to prefer the right of two renders (the intended scene vs one that differs in
   exactly that skill: :func:`flywheel.world.weaknesses.paired_probes`) — the labelled
   comparisons humans provide in production. A reward's weight in that category becomes its
   agreement above chance, ``max(0, agreement - 0.5)``, normalized over the rewards; a
   category where none beats chance keeps its weights. On the shipped base the alignment
   reward prefers the wrong count 84 % of the time: its count weight goes to 0 and the
   verifier (the world's object counter and locator, as GenEval's detector serves
   Flow-GRPO) takes it.
2. **Preference pairs**: the routed cases' pairwise feedback (chosen / rejected images) is
   counted into the artefact; the round samples its own groups (GRPO's advantages are the
   group-relative preferences).
3. **The round**: Flow-GRPO (``training.grpo``) from the generator's transformer on the
   routed prompts that carry their intended scene, rewarded by the recalibrated
   per-category mix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from flywheel.cycle.config import CycleConfig
from flywheel.world.benchmark import BenchmarkCase
from flywheel.world.evaluation import image_tensor, score_case
from flywheel.world.evaluator import Evaluator
from flywheel.world.loop.slices import SliceCase
from flywheel.world.scenes import render
from flywheel.world.weaknesses import paired_probes
from model.pipeline import Generator
from model.reward import AlignmentReward, MultiReward, MultiRewardConfig
from training.grpo import GRPOConfig, GRPOPromptsConfig, GRPORewardConfig
from training.loop import round_loop

RewardFn = Callable[[Tensor, Sequence[str]], Tensor]

ALIGNMENT = "alignment"
VERIFIER = "verifier"


@dataclass(kw_only=True, slots=True)
class RLTrackConfig:
    """How the track recalibrates and trains."""

    pairs_per_category: int = 32
    """Labelled comparisons per category for the recalibration."""
    steps: int = 20
    """Flow-GRPO optimizer steps."""
    lr: float = 3e-4
    group_size: int = 8
    prompts_per_step: int = 4
    sampler_steps: int = 10
    seed: int = 0

    @classmethod
    def from_cycle(cls, config: CycleConfig) -> RLTrackConfig:
        """The track's config from a cycle's (its ``rl`` section and seed)."""
        section = config.rl
        return cls(
            steps=section.steps,
            pairs_per_category=section.pairs_per_category,
            group_size=section.group_size,
            prompts_per_step=section.prompts_per_step,
            seed=config.seed,
        )

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.pairs_per_category < 1 or self.steps < 1 or self.sampler_steps < 2:
            raise ValueError("RLTrackConfig: pairs >= 1, steps >= 1, sampler_steps >= 2")
        if self.group_size < 2 or self.prompts_per_step < 1 or self.lr <= 0:
            raise ValueError("RLTrackConfig: group_size >= 2, prompts_per_step >= 1, lr > 0")


def verifier_reward(scenes: Mapping[str, BenchmarkCase], evaluator: Evaluator) -> RewardFn:
    """The verifiable reward: the evaluator's score of each image on its prompt's scene, on
    the scene's skill elements (a prompt without a known scene scores 0)."""

    def reward(images: Tensor, prompts: Sequence[str]) -> Tensor:
        scores = [
            score_case(scenes[p], image, evaluator=evaluator).score if p in scenes else 0.0
            for image, p in zip(images, prompts, strict=True)
        ]
        return torch.tensor(scores, dtype=torch.float32)

    return reward


class Recalibration(BaseModel):
    """The reviewed artefact: agreement per category and reward, and the new weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    agreement: dict[str, dict[str, float]]
    """category -> reward -> share of labelled comparisons it gets right."""
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    pairs: int
    """Labelled comparisons per category."""


def recalibrate(
    categories: Sequence[str],
    *,
    reward: AlignmentReward,
    evaluator: Evaluator,
    weights: MultiRewardConfig,
    config: RLTrackConfig,
    size: int = 64,
) -> Recalibration:
    """Measure each reward's agreement on ``categories`` and derive their new weights."""
    config.validate()
    agreement: dict[str, dict[str, float]] = {}
    after: dict[str, dict[str, float]] = {}
    for category in sorted(set(categories)):
        pairs = paired_probes(category, config.pairs_per_category)  # type: ignore[arg-type]
        scenes = {case.prompt: case for case, _ in pairs}
        prompts = [case.prompt for case, _ in pairs]
        right = torch.stack([image_tensor(render(c.spec, size, size)) for c, _ in pairs])
        wrong = torch.stack([image_tensor(render(w, size, size)) for _, w in pairs])
        judges: dict[str, RewardFn] = {
            ALIGNMENT: reward.score,
            VERIFIER: verifier_reward(scenes, evaluator),
        }
        row = {}
        for name, judge in judges.items():
            with torch.no_grad():
                row[name] = float((judge(right, prompts) > judge(wrong, prompts)).float().mean())
        agreement[category] = row
        above = {name: max(0.0, share - 0.5) for name, share in row.items()}
        if sum(above.values()) > 0:
            after[category] = {n: v / sum(above.values()) for n, v in above.items()}
    before = {k: dict(v) for k, v in weights.weights.items()}
    return Recalibration(
        agreement=agreement,
        before=before,
        after={**before, **after},
        pairs=config.pairs_per_category,
    )


def default_weights() -> MultiRewardConfig:
    """Before any recalibration: the alignment reward alone, in every category."""
    return MultiRewardConfig(weights={"default": {ALIGNMENT: 1.0, VERIFIER: 0.0}})


def round_reward(
    recalibration: Recalibration,
    *,
    scenes: Mapping[str, BenchmarkCase],
    reward: AlignmentReward,
    evaluator: Evaluator,
) -> RewardFn:
    """The recalibrated per-category reward (a prompt's category: its scene's skill)."""
    multi = MultiReward(
        MultiRewardConfig(weights=recalibration.after),
        {ALIGNMENT: reward.score, VERIFIER: verifier_reward(scenes, evaluator)},
    )

    def total(images: Tensor, prompts: Sequence[str]) -> Tensor:
        categories = [scenes[p].skill if p in scenes else "default" for p in prompts]
        with torch.no_grad():
            return multi(images, prompts, categories).total

    return total


def rl_round(
    cases: Sequence[SliceCase], *, generator: Generator, directory: Path, config: RLTrackConfig
) -> GRPOConfig:
    """Flow-GRPO from the generator at ``directory`` on the routed prompts with a scene."""
    config.validate()
    prompts = sorted({c.prompt for c in cases if c.scene is not None})
    if not prompts:
        raise ValueError("the RL round needs routed cases that carry their intended scene")
    gen = generator.config
    factor = gen.vae.spatial_factor
    sampler = replace(
        gen.sampler,
        steps=config.sampler_steps,
        noise_level=0.7,
        sde_window=(0, config.sampler_steps - 1),
    )
    root = directory
    return GRPOConfig(
        model=gen.transformer,
        init_from=root / "transformer.safetensors",
        prompts=GRPOPromptsConfig(prompts=prompts),
        latent_size=(gen.height // factor, gen.width // factor),
        group_size=config.group_size,
        prompts_per_step=min(config.prompts_per_step, len(prompts)),
        sampler=sampler,
        reward=GRPORewardConfig(vae=gen.vae, vae_init_from=root / "vae.safetensors"),
        loop=round_loop(config.steps, lr=config.lr, seed=config.seed, warmup=5),
    )
