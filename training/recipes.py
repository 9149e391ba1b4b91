"""The named training recipes: typed functions that return a configuration.

:data:`RECIPES` names them for the command line (``flywheel train --list``). Nothing here builds
or loads anything: :func:`training.trainer.train` does, from the configuration.
"""

from __future__ import annotations

from collections.abc import Callable

from model.reward import alignment_reward_debug
from model.sampling import SamplerConfig, flow_grpo_sampler
from model.transformer import transformer_debug
from training.alignment import AlignmentTrainConfig
from training.curriculum import (
    curriculum_stage1_debug,
    curriculum_stage2_debug,
    curriculum_stage3_debug,
    pretrain_stage1,
    pretrain_stage2,
    pretrain_stage3,
    sft_debug,
)
from training.distill import DistillConfig
from training.dpo import DPOConfig, DPOTrainConfig, PreferenceDataConfig
from training.grpo import GRPOConfig, GRPOPromptsConfig
from training.loop import LoopConfig, OptimizerConfig
from training.pe_grpo import PEGRPOConfig, PERewardConfig, RewritePolicyConfig
from training.pe_sft import DEBUG_SYSTEM_PROMPT, PESFTConfig
from training.pretrain import DataConfig, PretrainConfig
from training.reward_recalibration import RewardRecalibrationConfig
from training.synthetic import SyntheticDataConfig
from training.trainer import TrainConfig
from training.vae_training import vae_debug_recipe


def pretrain_debug() -> PretrainConfig:
    """Flow-matching pretraining, CPU, ~10 s: the debug transformer on 16 generated shapes."""
    synthetic = SyntheticDataConfig()
    model = transformer_debug()
    model.latent_channels = synthetic.vae.latent_channels
    return PretrainConfig(
        model=model,
        data=DataConfig(synthetic=synthetic, batch_size=4),
        loop=LoopConfig(
            optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.01, warmup_steps=5),
            max_steps=60,
            checkpoint_every=20,
            keep_checkpoints=2,
            seed=0,
        ),
    )


def dpo_debug() -> DPOTrainConfig:
    """Diffusion-DPO, CPU, ~10 s: right vs wrong-colour shape pairs; implicit accuracy rises.

    beta is far below the SDXL setting (5000): the 16 x 16 x 4 debug latents have few
    elements, so their mean errors move much more per step.
    """
    synthetic = SyntheticDataConfig()
    model = transformer_debug()
    model.latent_channels = synthetic.vae.latent_channels
    return DPOTrainConfig(
        model=model,
        dpo=DPOConfig(beta=500.0),
        data=PreferenceDataConfig(synthetic=synthetic, batch_size=8),
        loop=LoopConfig(
            optimizer=OptimizerConfig(lr=1e-3, warmup_steps=2),
            max_steps=100,
            checkpoint_every=50,
            keep_checkpoints=2,
            seed=0,
        ),
    )


def distill_debug() -> DistillConfig:
    """Few-step distillation, CPU, ~10 s: a 4-step student matches the 40-step teacher.

    The teacher is the seeded random transformer unless ``--init`` names a trained run (e.g.
    a pretrain-debug output); no guidance, as the debug teacher never saw a null prompt.
    """
    synthetic = SyntheticDataConfig()
    model = transformer_debug()
    model.latent_channels = synthetic.vae.latent_channels
    return DistillConfig(
        model=model,
        data=DataConfig(synthetic=synthetic, batch_size=4),
        teacher=SamplerConfig(steps=40, guidance_scale=1.0),
        student_steps=4,
        loop=LoopConfig(
            optimizer=OptimizerConfig(lr=1e-3, warmup_steps=2),
            max_steps=60,
            checkpoint_every=20,
            keep_checkpoints=2,
            seed=0,
        ),
    )


def pe_sft_debug() -> PESFTConfig:
    """Prompt-enhancer SFT, CPU, ~15 s: a tiny random LM learns terse -> rich rewrites; loss falls.

    Pairs are degraded captions of the generated corpus; the short debug system prompt
    (training.pe_sft.DEBUG_SYSTEM_PROMPT) keeps steps cheap. Export a run with
    training.pe_sft.export_enhancer for the PromptEnhancer.
    """
    return PESFTConfig(
        system_prompt=DEBUG_SYSTEM_PROMPT,
        batch_size=8,
        max_length=512,
        loop=LoopConfig(
            optimizer=OptimizerConfig(lr=3e-3, warmup_steps=5),
            max_steps=80,
            checkpoint_every=40,
            keep_checkpoints=2,
            seed=0,
        ),
    )


def pe_grpo_debug() -> PEGRPOConfig:
    """Prompt-enhancer GRPO, CPU, ~20 s: rewrites scored through the frozen generator; reward rises.

    Each rewrite is rendered by the frozen debug generator and scored with CLIP alignment plus
    content coverage. Starts from the seeded random LM unless ``--init`` names a pe-sft-debug
    run. The debug generator and CLIP are random (the image term moves ~1e-5 between
    rewrites), so the text-side coverage terms carry the learnable signal. From a trained
    init, lower the learning rate (e.g. 1e-3): 1e-2 is tuned for the random start.
    """
    return PEGRPOConfig(
        system_prompt=DEBUG_SYSTEM_PROMPT,
        grpo=RewritePolicyConfig(prompts_per_step=2, group_size=8, max_new_tokens=24, kl_coef=0.05),
        reward=PERewardConfig(weights={"alignment": 0.5, "coverage": 1.0, "char_coverage": 1.0}),
        loop=LoopConfig(
            optimizer=OptimizerConfig(lr=1e-2, warmup_steps=5),
            max_steps=40,
            checkpoint_every=20,
            keep_checkpoints=2,
            seed=0,
        ),
    )


def alignment_debug() -> AlignmentTrainConfig:
    """Alignment reward (contrastive CLIP), CPU, ~10 s: the debug towers on 32 generated
    shapes with their captions; in-batch retrieval accuracy rises."""
    return AlignmentTrainConfig(
        reward=alignment_reward_debug(),
        synthetic=SyntheticDataConfig(images=32, size=32),
        batch_size=16,
        loop=LoopConfig(
            optimizer=OptimizerConfig(lr=2e-3, warmup_steps=5),
            max_steps=80,
            checkpoint_every=40,
            keep_checkpoints=2,
            seed=0,
        ),
    )


def reward_recalibration_debug() -> RewardRecalibrationConfig:
    """Reward recalibration (Bradley-Terry on preference pairs), CPU, ~10 s: the debug CLIP's
    projections on 32 right- vs wrong-colour pairs; its agreement with the pairs rises.

    ``--init DIR`` recalibrates a reward directory instead (an open_clip local directory, e.g.
    ``flywheel/world/weights/world-reward``), with the same schedule; pass
    ``preferences=`` a preference dataset for real labels, and write the result with
    ``training.reward_recalibration.export_recalibrated_reward``.
    """
    return RewardRecalibrationConfig(
        reward=alignment_reward_debug(),
        synthetic=SyntheticDataConfig(images=32, size=32),
        batch_size=16,
        loop=LoopConfig(
            optimizer=OptimizerConfig(lr=1e-2, warmup_steps=5),
            max_steps=40,
            checkpoint_every=20,
            keep_checkpoints=2,
            seed=0,
        ),
    )


def grpo_debug() -> GRPOConfig:
    """Flow-GRPO, CPU, ~15 s: the debug transformer learns the colour reward; reward rises.

    Prompts are the captions of 4 generated shapes (all 4 in every rollout, 8 samples each);
    the debug reward (training.grpo.colour_reward) is how close the decoded pixels are to the
    colour the caption names for the shape, through the seeded random VAE. 8 sampling steps,
    the first 3 stochastic (the ones trained); the clip range is 10x Flow-GRPO's so that the
    second update of a rollout is only partly clipped.
    """
    synthetic = SyntheticDataConfig(images=4)
    model = transformer_debug()
    model.latent_channels = synthetic.vae.latent_channels
    sampler = flow_grpo_sampler()  # noise level 0.7, Qwen-Image's schedule
    sampler.steps, sampler.sde_window = 8, (0, 3)
    sampler.guidance_scale = 1.0  # the debug transformer never saw a null prompt
    return GRPOConfig(
        model=model,
        prompts=GRPOPromptsConfig(synthetic=synthetic),
        latent_size=(4, 4),
        group_size=8,
        prompts_per_step=4,
        sampler=sampler,
        clip_range=1e-3,
        kl_beta=0.01,
        updates_per_rollout=2,
        loop=LoopConfig(
            optimizer=OptimizerConfig(lr=3e-3),
            max_steps=40,
            checkpoint_every=20,
            keep_checkpoints=2,
            seed=0,
        ),
    )


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    # Pretraining: the debug recipe, the curriculum on CPU, the curriculum at scale (--data).
    "pretrain-debug": pretrain_debug,
    "curriculum-stage1-debug": curriculum_stage1_debug,
    "curriculum-stage2-debug": curriculum_stage2_debug,
    "curriculum-stage3-debug": curriculum_stage3_debug,
    "pretrain-stage1": pretrain_stage1,
    "pretrain-stage2": pretrain_stage2,
    "pretrain-stage3": pretrain_stage3,
    "vae-debug": vae_debug_recipe,
    # Reward models.
    "alignment-debug": alignment_debug,
    "reward-recalibration-debug": reward_recalibration_debug,
    # Post-training of the generator.
    "sft-debug": sft_debug,
    "dpo-debug": dpo_debug,
    "grpo-debug": grpo_debug,
    "distill-debug": distill_debug,
    # The prompt enhancer.
    "pe-sft-debug": pe_sft_debug,
    "pe-grpo-debug": pe_grpo_debug,
}
"""Recipes by the name the command line takes."""
