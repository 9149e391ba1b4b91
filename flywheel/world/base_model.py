"""The world's base generator: the embedded default model, made by the project's own recipes.

:func:`build_world_base` runs :class:`WorldBaseConfig` stage by stage into one directory::

    <out>/corpus/       the world corpus (flywheel.world.corpus): rich captions, no text,
                        the rare concepts of ``rare_colours`` / ``rare_shapes`` (the
                        pretraining gap), a share of empty captions (the unconditional
                        prompt CFG needs)
    <out>/pool/         the candidate pool: another corpus (seed + 1, split "pool") in
                        which the rare concepts are common; never trained on here
    <out>/vae/          VAE training run (training.vae_training): reconstruction + KL
    <out>/cache/        training cache (training.cache): normalized posterior means and the
                        MiniLM conditions, with the latent statistics measured after the
                        VAE is trained (training.vae_training.latent_statistics)
    <out>/transformer/  flow-matching run (training.pretrain) of the diffusion transformer
    <out>/generator-pretrained/
                        the pretrained generator directory (model.pipeline); when it is
                        there, every stage above is done and skipped
    <out>/reward-corpus/, reward-run/, reward/
                        the reward model: a corpus with terse captions (seed + 2), its
                        colours drawn in the world's reward shades, its contrastive
                        training (training.alignment), the open_clip local directory;
                        :data:`BASE_REWARD` is the shipped copy
    <out>/enhancer-pairs.jsonl, enhancer-run/, enhancer/
                        the prompt enhancer: (terse, terse) pairs of new scenes, its
                        SFT (training.pe_sft) from a seeded tiny LM, the local model
                        directory; :data:`BASE_ENHANCER` is the shipped copy
    <out>/alignment-run/
                        the alignment stage (:class:`WorldAlignmentConfig`): Flow-GRPO of
                        the pretrained transformer against the reward model
    <out>/generator/    the generator directory (the aligned one; the pretrained one when
                        the stage has 0 steps): what ``flywheel eval`` and the cycle load;
                        :data:`BASE_MODEL` is the shipped copy

A world file (:mod:`flywheel.world.definition`) says what a build makes rare, its reward's
caption kind and its scenes: :func:`world_base_config` turns one into a config, and
``build_world_base(..., world=)`` records it as ``<out>/world.toml`` and
``<out>/generator/world.toml`` (:func:`flywheel.world.definition.world_of` reads it back).

Every stage is skipped when its output is complete and the training runs resume from their
checkpoints, so an interrupted build continues where it stopped. The same seed gives the
same model on the same machine and torch build.

The corpus and the enhancer make the weaknesses: a rare colour (purple, in 0.17 % of the
scenes) is drawn badly; captions are always the rich ones, so terse prompts fall outside what
the transformer has seen, and the enhancer was taught to give a prompt back as it is (it does
not yet expand terse prompts: the prompt-enhancer track's SFT teaches it); the reward model
learns from terse captions, which never say how many or where, and prefers the shade its
corpus drew a colour in (``reward_shades``): the alignment stage, as the end of a production
recipe, teaches the generator whatever the reward prefers wrongly. No text is rendered in the
corpus: legible glyphs are beyond a model of this size and budget, so both text skills are
expected to fail.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from flywheel.world.corpus import (
    CAPTION_KINDS,
    CaptionKind,
    read_info,
    reweighted,
    scene_seeds,
    write_world_corpus,
)
from flywheel.world.definition import (
    WORLD_FILE,
    WorldDefinition,
    WorldFileError,
    load_world,
    write_world,
)
from flywheel.world.evaluation import BASE_MODEL
from flywheel.world.scenes import COLOURS, SceneConfig, captions, sample_scene
from model.condition import ConditionEncoder, minilm_condition
from model.pipeline import (
    CONFIG_FILE,
    TRANSFORMER_FILE,
    VAE_FILE,
    Generator,
    GeneratorConfig,
    config_from_json,
)
from model.prompt_enhancer import (
    PromptEnhancer,
    PromptEnhancerConfig,
    PromptEnhancerModelConfig,
    pe_debug,
)
from model.reward import (
    AlignmentReward,
    AlignmentRewardConfig,
    ClipTowersConfig,
    build_alignment_reward,
    debug_towers,
)
from model.sampling import SamplerConfig
from model.transformer import DiffusionTransformer, TransformerConfig
from model.vae import ResidualVAE, VAEConfig
from training.alignment import CONFIG_FILE as REWARD_CONFIG_FILE
from training.alignment import AlignmentTrainConfig, export_alignment_weights
from training.cache import DONE_FILE, ProducerConfig, produce
from training.checkpoint import load_model_weights
from training.data import SAMPLES_FILE, BucketConfig
from training.flow_matching import FlowMatchingConfig
from training.grpo import GRPOConfig, GRPOPromptsConfig, GRPORewardConfig
from training.loop import LoopConfig, OptimizerConfig, round_loop
from training.pe_sft import (
    DEBUG_SYSTEM_PROMPT,
    PESFTConfig,
    PromptPairsConfig,
    export_enhancer,
    write_pairs,
)
from training.pretrain import DataConfig, PretrainConfig
from training.trainer import train
from training.vae_training import (
    VAEDataConfig,
    VAELossConfig,
    VAETrainConfig,
    export_vae_weights,
    latent_statistics,
)

CORPUS_DIR, POOL_DIR, VAE_DIR, CACHE_DIR, TRANSFORMER_DIR, GENERATOR_DIR = (
    "corpus", "pool", "vae", "cache", "transformer", "generator",
)  # fmt: skip
PRETRAINED_DIR, ALIGNMENT_RUN_DIR = "generator-pretrained", "alignment-run"
REWARD_CORPUS_DIR, REWARD_RUN_DIR, REWARD_DIR = "reward-corpus", "reward-run", "reward"
ENHANCER_PAIRS_FILE, ENHANCER_RUN_DIR, ENHANCER_DIR = (
    "enhancer-pairs.jsonl", "enhancer-run", "enhancer",
)  # fmt: skip
BASE_PRETRAINED = BASE_MODEL.with_name("world-base-pretrained")
"""The shipped base's generator before its alignment stage (the control of the weakness the
alignment stage caused)."""
BASE_REWARD = BASE_MODEL.with_name("world-reward")
"""The shipped reward model (an open_clip local directory), made with :data:`BASE_MODEL`."""
BASE_ENHANCER = BASE_MODEL.with_name("world-enhancer")
"""The shipped prompt enhancer (a local causal-LM directory), made with :data:`BASE_MODEL`."""


def world_reward_towers() -> ClipTowersConfig:
    """The world reward model's CLIP: 64 px images in 8 px patches, 3 image blocks 96 wide,
    3 text blocks 64 wide (the open_clip vocabulary of 49,408 tokens is most of its weights)."""
    return ClipTowersConfig(
        embed_dim=64,
        image_size=64,
        patch_size=8,
        vision_width=96,
        vision_layers=3,
        vision_head_width=32,
        context_length=64,
        text_width=64,
        text_heads=2,
        text_layers=3,
        mlp_ratio=2.0,
    )


def world_reward_loop(steps: int) -> LoopConfig:
    """The reward model's schedule: AdamW 2e-3, cosine over ``steps`` after 50 warm-up steps."""
    warmup = min(50, steps // 4)
    return LoopConfig(
        optimizer=OptimizerConfig(
            lr=2e-3, warmup_steps=warmup, decay_steps=steps - warmup, weight_decay=0.1
        ),
        max_steps=steps,
        checkpoint_every=steps,
        keep_checkpoints=1,
        log_every=10,
    )


def world_enhancer_loop(steps: int) -> LoopConfig:
    """The enhancer's schedule: AdamW 3e-3, cosine over ``steps`` after 20 warm-up steps."""
    warmup = min(20, steps // 4)
    return LoopConfig(
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=warmup, decay_steps=steps - warmup),
        max_steps=steps,
        checkpoint_every=steps,
        keep_checkpoints=1,
        log_every=10,
    )


@dataclass(kw_only=True, slots=True)
class WorldAlignmentConfig:
    """The recipe's last stage: Flow-GRPO (:mod:`training.grpo`) of the pretrained
    transformer against the world's reward model, as a production model's recipe ends with an
    alignment stage against its reward. Whatever the reward prefers wrongly (its shade bias,
    :attr:`WorldBaseConfig.reward_shades`) the generator learns here."""

    steps: int = 100
    """Optimizer steps (0: no alignment stage; the generator is the pretrained one). One
    rollout per step: 100 steps take 10-14 min on 2 cores."""
    lr: float = 5e-4
    """Peak learning rate (5 warm-up steps, cosine decay). Tuning runs on the shipped base
    with the default world's reward drawn with yellow as ``[245, 150, 30]``, yellow's colour
    score on terse prompts after (17 probes): 40 steps at 3e-4 with the KL at 0.04, 0.88 ->
    0.94 (nothing learned); 40 at 1e-3 without KL, 0.59 but green 0.71 -> 0.12 (the policy
    drifted everywhere); these settings, 0.53 — and on 24 probes a colour, yellow 0.83 ->
    0.54 but green 0.62 -> 0.33 and orange 0.71 -> 0.42 as well: not yet a weakness on the
    shaded colour alone, so no shipped world uses the stage."""
    kl_beta: float = 0.01
    """Weight of the KL to the pretrained transformer."""
    clip_range: float = 1e-3
    """PPO's ratio clip (one update per rollout: the ratio is 1 at the update)."""
    prompts: int = 256
    """Distinct terse captions of new scenes (seed + 4) the rollouts draw from."""
    group_size: int = 6
    """Samples per prompt in a rollout (GRPO's group)."""
    prompts_per_step: int = 4
    """Prompts per rollout."""
    sampler_steps: int = 8
    """Sampling steps of a rollout (every one stochastic and trained)."""
    noise_level: float = 0.7
    """The rollout SDE's noise level (Flow-GRPO's)."""
    seed: int = 0
    """Seed of the rollouts' noise."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.steps < 0 or self.lr <= 0 or self.sampler_steps < 2:
            raise ValueError("WorldAlignmentConfig: steps >= 0, lr > 0, sampler_steps >= 2")
        if self.group_size < 2 or not 1 <= self.prompts_per_step <= self.prompts:
            raise ValueError(
                "WorldAlignmentConfig: group_size >= 2, 1 <= prompts_per_step <= prompts"
            )


@dataclass(kw_only=True, slots=True)
class WorldBaseConfig:
    """The recipe of the world's base generator (see the module docstring for the stages)."""

    scenes: int = 6000
    """Text-to-image samples in the training corpus."""
    seed: int = 0
    """Seed of the corpus' scenes (the pool's are drawn with seed + 1, the reward corpus'
    with seed + 2, the enhancer's prompts with seed + 3); the training stages' seeds are their
    loops'."""
    image_size: int = 64
    """Side of the corpus images and of the generated ones, pixels."""
    scene: SceneConfig = field(default_factory=lambda: SceneConfig(text_probability=0.0))
    """What the corpus' scenes hold (before the rare concepts are applied)."""
    rare_colours: dict[str, float] = field(default_factory=lambda: {"purple": 0.01})
    """Colours made rare in the corpus: their weight relative to a common colour's 1 (0.01:
    purple in 0.17 % of the scenes)."""
    rare_shapes: dict[str, float] = field(default_factory=dict)
    """Shapes made rare in the corpus: their weight relative to a common shape's 1."""
    caption_dropout: float = 0.1
    """Share of corpus samples with an empty caption (the unconditional prompt)."""
    pool_scenes: int = 2000
    """Samples in the candidate pool (what the pretraining-gap track retrieves from; not
    trained on)."""
    pool_colours: dict[str, float] = field(default_factory=lambda: {"purple": 3.0})
    """Colour weights of the pool: the corpus' rare colours are common there."""
    pool_shapes: dict[str, float] = field(default_factory=dict)
    """Shape weights of the pool (the corpus' rare shapes made common there)."""
    vae: VAEConfig
    """The VAE (RGB; its latent statistics are filled in after training)."""
    vae_loss: VAELossConfig = field(
        default_factory=lambda: VAELossConfig(l2=1.0, perceptual=0.0, semantic=0.0, kl=1e-6)
    )
    """VAE losses: flat-colour scenes need no perceptual or semantic term."""
    vae_batch_size: int = 16
    """Images per VAE step."""
    vae_loop: LoopConfig
    """VAE steps and optimizer."""
    transformer: TransformerConfig
    """The diffusion transformer (``latent_channels`` = the VAE's; MiniLM's 384-d conditions)."""
    flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    """Flow-time sampling of the transformer's training."""
    batch_size: int = 32
    """Samples per transformer step."""
    transformer_loop: LoopConfig
    """Transformer steps and optimizer."""
    reward_scenes: int = 6000
    """Samples in the reward model's corpus (its own seed: seed + 2)."""
    reward_caption: CaptionKind = "terse"
    """The captions the reward model learns from. Terse ones name the kinds, never how many
    or where: the reward is blind to count and relation (its bias, which human feedback on
    wrong counts and places contradicts)."""
    reward_shades: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    """Colour -> the RGB the reward model's corpus draws it in instead of the palette's (its
    shade bias: the reward prefers that shade under the colour's name, and the alignment
    stage teaches it to the generator)."""
    reward_towers: ClipTowersConfig = field(default_factory=world_reward_towers)
    """The reward model's CLIP."""
    reward_batch_size: int = 128
    """Image-caption pairs per contrastive step."""
    reward_loop: LoopConfig = field(default_factory=lambda: world_reward_loop(400))
    """Reward model steps and optimizer."""
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(steps=20, dynamic_shift=False, guidance_scale=3.0)
    )
    """How the generator samples (steps, classifier-free guidance)."""
    enhancer: PromptEnhancerModelConfig = field(default_factory=pe_debug)
    """The prompt enhancer's causal LM (seeded random start, byte-level vocabulary)."""
    enhancer_prompts: int = 1000
    """Distinct terse captions the enhancer learns to give back as they are: of scenes drawn
    with ``scene`` (every colour and shape as common as the others; seed + 3), so that the
    enhancer echoes the corpus' rare concepts too."""
    enhancer_batch_size: int = 16
    """Pairs per enhancer SFT step."""
    enhancer_loop: LoopConfig = field(default_factory=lambda: world_enhancer_loop(600))
    """Enhancer steps and optimizer."""
    alignment: WorldAlignmentConfig = field(default_factory=WorldAlignmentConfig)
    """The last stage: the generator aligned to the reward model."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.scenes < 1 or self.pool_scenes < 1:
            raise ValueError("WorldBaseConfig: scenes and pool_scenes must be >= 1")
        self.corpus_scenes().validate()
        self.pool_scenes_config().validate()
        if self.vae.in_channels != 3 or self.vae.out_channels != 3:
            raise ValueError("WorldBaseConfig.vae must read and write RGB (3 channels)")
        if self.transformer.latent_channels != self.vae.latent_channels:
            raise ValueError(
                f"the transformer reads {self.transformer.latent_channels}-channel latents, "
                f"the VAE makes {self.vae.latent_channels}"
            )
        step = self.vae.spatial_factor * self.transformer.patch_size
        if self.image_size % step:
            raise ValueError(f"WorldBaseConfig.image_size must be a multiple of {step}")
        if self.vae_batch_size < 1 or self.batch_size < 1:
            raise ValueError("WorldBaseConfig: batch sizes must be >= 1")
        self.vae_stage(Path(CORPUS_DIR)).validate()
        self.transformer_stage(Path(CACHE_DIR)).validate()
        if self.reward_scenes < 2 or self.reward_batch_size < 2:
            raise ValueError("WorldBaseConfig: reward_scenes and reward_batch_size must be >= 2")
        if self.reward_caption not in CAPTION_KINDS:
            raise ValueError(f"WorldBaseConfig.reward_caption must be one of {CAPTION_KINDS}")
        self.reward_loop.validate()
        self.sampler.validate()
        if self.enhancer_prompts < 1 or self.enhancer_batch_size < 1:
            raise ValueError("WorldBaseConfig: enhancer_prompts and enhancer_batch_size >= 1")
        self.enhancer_loop.validate()
        self.alignment.validate()
        for colour, rgb in self.reward_shades.items():
            if colour not in COLOURS or len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise ValueError(f"WorldBaseConfig.reward_shades: {colour}: {rgb} is no shade")

    def corpus_scenes(self) -> SceneConfig:
        """The scene config the corpus is drawn with: ``scene`` with the rare concepts."""
        return reweighted(self.scene, shapes=self.rare_shapes, colours=self.rare_colours)

    def pool_scenes_config(self) -> SceneConfig:
        """The scene config of the candidate pool: ``scene`` with the pool's weights."""
        return reweighted(self.scene, shapes=self.pool_shapes, colours=self.pool_colours)

    def rare_concepts(self) -> tuple[str, ...]:
        """The names of the corpus' rare colours and shapes."""
        return (*self.rare_colours, *self.rare_shapes)

    def buckets(self) -> BucketConfig:
        """The one square bucket every stage reads."""
        size = self.image_size
        return BucketConfig(target_area=size * size, aspect_ratios=(1.0,), multiple_of=8)

    def vae_stage(self, corpus: Path) -> VAETrainConfig:
        """The VAE training of the corpus at ``corpus``."""
        return VAETrainConfig(
            vae=self.vae,
            data=VAEDataConfig(
                dataset=corpus,
                buckets=self.buckets(),
                crop_size=self.image_size,
                batch_size=self.vae_batch_size,
            ),
            loss=self.vae_loss,
            loop=self.vae_loop,
        )

    def reward_stage(self, corpus: Path) -> AlignmentTrainConfig:
        """The contrastive training of the reward model on the corpus at ``corpus``."""
        return AlignmentTrainConfig(
            reward=AlignmentRewardConfig(architecture=self.reward_towers),
            dataset=corpus,
            batch_size=self.reward_batch_size,
            loop=self.reward_loop,
        )

    def enhancer_stage(self, pairs: Path) -> PESFTConfig:
        """The SFT of the prompt enhancer on the pairs file ``pairs``."""
        return PESFTConfig(
            model=self.enhancer,
            data=PromptPairsConfig(pairs=pairs),
            system_prompt=DEBUG_SYSTEM_PROMPT,
            batch_size=self.enhancer_batch_size,
            max_length=256,
            loop=self.enhancer_loop,
        )

    def alignment_stage(self, generator: Path, reward: Path) -> GRPOConfig:
        """Flow-GRPO of the generator directory ``generator``'s transformer against the
        reward model directory ``reward``, on terse captions of new scenes (seed + 4)."""
        stage = self.alignment
        return reward_grpo(
            config_from_json((generator / CONFIG_FILE).read_text(encoding="utf-8")),
            generator,
            reward=reward,
            prompts=terse_prompts(self.scene, seed=self.seed + 4, count=stage.prompts),
            steps=max(stage.steps, 1),
            lr=stage.lr,
            kl_beta=stage.kl_beta,
            clip_range=stage.clip_range,
            group_size=stage.group_size,
            prompts_per_step=stage.prompts_per_step,
            sampler_steps=stage.sampler_steps,
            noise_level=stage.noise_level,
            seed=stage.seed,
        )

    def transformer_stage(self, cache: Path) -> PretrainConfig:
        """The flow-matching training of the transformer on the cache at ``cache``."""
        return PretrainConfig(
            model=self.transformer,
            flow=self.flow,
            data=DataConfig(cache_dir=cache, batch_size=self.batch_size),
            loop=self.transformer_loop,
        )


def world_base() -> WorldBaseConfig:
    """The shipped base generator: 64 x 64 images, f4 VAE, 1.5 M-parameter transformer; no
    alignment stage (a world file's ``recipe.alignment_steps`` adds it: the shipped base
    predates it)."""
    return WorldBaseConfig(
        alignment=WorldAlignmentConfig(steps=0),
        vae=VAEConfig(
            in_channels=3,
            out_channels=3,
            latent_channels=8,
            encoder_width=48,
            decoder_width=64,
            width_multipliers=(1,),
            blocks_per_stage=1,
            temporal_downsample=(),
            patch_size=4,
        ),
        vae_loop=LoopConfig(
            optimizer=OptimizerConfig(
                lr=2e-3, betas=(0.5, 0.9), warmup_steps=50, decay_steps=950, grad_clip=None
            ),
            max_steps=1000,
            checkpoint_every=500,
            keep_checkpoints=1,
            log_every=10,
        ),
        transformer=TransformerConfig(
            latent_channels=8,
            patch_size=2,
            condition_dim=384,
            num_layers=6,
            num_heads=4,
            head_dim=32,
            rope_axes_dims=(8, 12, 12),
        ),
        batch_size=16,  # more, smaller steps learn faster in a fixed budget than batch 32
        transformer_loop=LoopConfig(
            optimizer=OptimizerConfig(lr=1e-3, warmup_steps=100, decay_steps=3100),
            max_steps=3200,
            checkpoint_every=800,
            keep_checkpoints=4,
            log_every=10,
        ),
    )


def world_base_debug() -> WorldBaseConfig:
    """The same recipe at toy size (tests, ~1 min on 2 cores): 32 x 32, a few steps."""
    return WorldBaseConfig(
        scenes=48,
        pool_scenes=24,
        image_size=32,
        vae=VAEConfig(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            encoder_width=16,
            decoder_width=16,
            width_multipliers=(1,),
            blocks_per_stage=1,
            temporal_downsample=(),
            patch_size=4,
        ),
        vae_batch_size=8,
        vae_loop=LoopConfig(
            optimizer=OptimizerConfig(lr=2e-3, betas=(0.5, 0.9), warmup_steps=2),
            max_steps=30,
            checkpoint_every=30,
            keep_checkpoints=1,
        ),
        transformer=TransformerConfig(
            latent_channels=4,
            patch_size=2,
            condition_dim=384,
            num_layers=2,
            num_heads=2,
            head_dim=16,
            rope_axes_dims=(4, 6, 6),
        ),
        batch_size=8,
        transformer_loop=LoopConfig(
            optimizer=OptimizerConfig(lr=1e-3, warmup_steps=2),
            max_steps=40,
            checkpoint_every=40,
            keep_checkpoints=1,
        ),
        reward_scenes=48,
        reward_towers=replace(debug_towers(), context_length=32),  # terse captions fit in 32
        reward_batch_size=16,
        reward_loop=world_reward_loop(40),
        sampler=SamplerConfig(steps=4, dynamic_shift=False, guidance_scale=3.0),
        enhancer_prompts=24,
        enhancer_batch_size=4,
        enhancer_loop=world_enhancer_loop(20),
        alignment=WorldAlignmentConfig(
            steps=2, prompts=8, group_size=2, prompts_per_step=2, sampler_steps=2
        ),
    )


RECIPES = {"world-base": world_base, "world-base-debug": world_base_debug}
"""The base-model recipes by name (``flywheel world base --recipe``, a world file's
``recipe.name``)."""


def world_base_config(world: WorldDefinition) -> WorldBaseConfig:
    """The recipe ``world.recipe`` names, with the world's seed, scenes, rare concepts, pool,
    reward captions and recipe overrides."""
    config = RECIPES[world.recipe.name]()
    config.seed = world.seed
    config.scene = world.scene.scene_config()
    config.rare_colours = dict(world.rare.colours)
    config.rare_shapes = dict(world.rare.shapes)
    config.pool_colours = dict(world.pool.colours)
    config.pool_shapes = dict(world.pool.shapes)
    config.reward_caption = world.reward.caption
    config.reward_shades = world.reward.shade_map()
    recipe = world.recipe
    if recipe.alignment_steps is not None:
        config.alignment = replace(config.alignment, steps=recipe.alignment_steps)
    if recipe.scenes is not None:
        config.scenes = recipe.scenes
    if recipe.pool_scenes is not None:
        config.pool_scenes = recipe.pool_scenes
    if recipe.reward_scenes is not None:
        config.reward_scenes = recipe.reward_scenes
    if recipe.transformer_steps is not None:
        config.transformer_loop = _with_steps(config.transformer_loop, recipe.transformer_steps)
    config.validate()
    return config


def _with_steps(loop: LoopConfig, steps: int) -> LoopConfig:
    """``loop`` run for ``steps``: its warm-up at most a quarter of them, its cosine decay (if
    any) over the rest, a checkpoint at least at the end."""
    warmup = min(loop.optimizer.warmup_steps, steps // 4)
    decay = None if loop.optimizer.decay_steps is None else max(1, steps - warmup)
    optimizer = replace(loop.optimizer, warmup_steps=warmup, decay_steps=decay)
    return replace(
        loop,
        optimizer=optimizer,
        max_steps=steps,
        checkpoint_every=min(loop.checkpoint_every, steps),
    )


def _world_fields(config: WorldBaseConfig) -> tuple[object, ...]:
    """What a world file sets in a config, apart from its recipe."""
    return (
        config.seed,
        config.scene,
        config.rare_colours,
        config.rare_shapes,
        config.pool_colours,
        config.pool_shapes,
        config.reward_caption,
        config.reward_shades,
    )


def _record_world(world: WorldDefinition, config: WorldBaseConfig, root: Path) -> None:
    """Write ``world`` into the build directory ``root``, after checking that ``config`` is
    its config and that ``root`` holds no build of another world."""
    if _world_fields(config) != _world_fields(world_base_config(world)):
        raise ValueError(f"the config is not the one of world {world.name!r}")
    if (root / WORLD_FILE).is_file():
        try:
            before = load_world(root / WORLD_FILE)
        except WorldFileError as exc:
            raise ValueError(f"{root} holds an unreadable {WORLD_FILE}: {exc}") from exc
        if before.model_copy(update={"recipe": world.recipe}) != world:
            raise ValueError(
                f"{root} holds a build of world {before.name!r}; build into a new directory"
            )
    write_world(world, root)


def build_world_base(
    config: WorldBaseConfig,
    out: str | Path,
    *,
    world: WorldDefinition | None = None,
    progress: bool = False,
) -> Path:
    """Run every stage of ``config`` into ``out``; returns the generator directory. With
    ``world`` (whose config ``config`` must be, recipe aside), the world file is written into
    ``out`` and into the generator directory; a directory built from another world is
    refused."""
    config.validate()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if world is not None:
        _record_world(world, config, root)
    console = Console(stderr=True, quiet=not progress)

    pretrained = root / PRETRAINED_DIR
    if (pretrained / CONFIG_FILE).is_file():  # written last: the pretraining is done
        console.log(f"pretrained generator: {pretrained} (done)")
        generator = Generator.load(pretrained)
    else:
        generator = _pretrain(config, root, console, progress=progress)
        generator.save(pretrained)
        console.log(f"pretrained generator: {pretrained}")

    reward_corpus = root / REWARD_CORPUS_DIR
    _write_corpus_once(
        reward_corpus,
        console,
        count=config.reward_scenes,
        config=config.corpus_scenes(),
        seed=config.seed + 2,
        size=config.image_size,
        caption=config.reward_caption,
        shades=config.reward_shades,
        progress=progress,
    )
    console.log("reward model")
    train(
        config.reward_stage(reward_corpus),
        out=root / REWARD_RUN_DIR,
        progress=progress,
        name="world reward",
    )
    reward = export_alignment_weights(
        root / REWARD_RUN_DIR, root / REWARD_DIR, config.reward_towers
    )
    console.log(f"reward model: {reward}")

    pairs = root / ENHANCER_PAIRS_FILE
    if not pairs.is_file():
        prompts = terse_prompts(config.scene, seed=config.seed + 3, count=config.enhancer_prompts)
        write_pairs(pairs, [(p, p) for p in prompts])
    console.log("prompt enhancer")
    train(
        config.enhancer_stage(pairs),
        out=root / ENHANCER_RUN_DIR,
        progress=progress,
        name="world enhancer",
    )
    enhancer = export_enhancer(root / ENHANCER_RUN_DIR, root / ENHANCER_DIR)
    console.log(f"prompt enhancer: {enhancer}")

    if config.alignment.steps > 0:
        console.log("alignment: Flow-GRPO against the reward model")
        stage = config.alignment_stage(pretrained, reward)
        train(stage, out=root / ALIGNMENT_RUN_DIR, progress=progress, name="world alignment")
        generator.transformer.load_state_dict(load_model_weights(root / ALIGNMENT_RUN_DIR))
    target = generator.save(root / GENERATOR_DIR)
    if world is not None:
        write_world(world, target)
    console.log(f"generator: {target}")
    return target


def _pretrain(
    config: WorldBaseConfig, root: Path, console: Console, *, progress: bool
) -> Generator:
    """The corpora, the VAE, the training cache and the transformer's flow-matching
    pretraining under ``root``: the pretrained generator."""
    corpus = root / CORPUS_DIR
    _write_corpus_once(
        corpus,
        console,
        count=config.scenes,
        config=config.corpus_scenes(),
        seed=config.seed,
        size=config.image_size,
        caption="rich",
        caption_dropout=config.caption_dropout,
        progress=progress,
    )
    _write_corpus_once(
        root / POOL_DIR,
        console,
        count=config.pool_scenes,
        config=config.pool_scenes_config(),
        seed=config.seed + 1,
        size=config.image_size,
        caption="rich",
        split="pool",
        progress=progress,
    )

    console.log("VAE")
    vae_stage = config.vae_stage(corpus)
    train(vae_stage, out=root / VAE_DIR, progress=progress, name="world VAE")
    vae = ResidualVAE(config.vae)
    vae.load_state_dict(export_vae_weights(root / VAE_DIR))
    size = (config.image_size, config.image_size)
    mean, std = latent_statistics(vae.eval(), corpus, size=size)
    vae_config = replace(config.vae, latents_mean=mean, latents_std=std)
    vae_config.validate()
    vae.config = vae_config  # the statistics are read from the config: no new weights
    vae.requires_grad_(False)

    cache = root / CACHE_DIR
    encoder = ConditionEncoder.load(minilm_condition())
    if not (cache / DONE_FILE).is_file():
        console.log("training cache: latents and conditions")
        if cache.exists():
            shutil.rmtree(cache)
        produce(
            corpus,
            cache,
            vae=vae,
            encoder=encoder,
            config=ProducerConfig(buckets=config.buckets(), shard_size=256, batch_size=64),
        )

    console.log("transformer")
    train(
        config.transformer_stage(cache),
        out=root / TRANSFORMER_DIR,
        progress=progress,
        name="world transformer",
    )
    transformer = DiffusionTransformer(config.transformer)
    transformer.load_state_dict(load_model_weights(root / TRANSFORMER_DIR))

    generator_config = GeneratorConfig(
        transformer=config.transformer,
        vae=vae_config,
        condition="minilm",
        height=config.image_size,
        width=config.image_size,
        sampler=config.sampler,
    )
    return Generator(generator_config, transformer, vae, encoder)


def reward_grpo(
    gen: GeneratorConfig,
    directory: Path,
    *,
    reward: Path,
    prompts: list[str],
    steps: int,
    lr: float,
    kl_beta: float,
    clip_range: float,
    group_size: int,
    prompts_per_step: int,
    sampler_steps: int,
    noise_level: float,
    seed: int,
) -> GRPOConfig:
    """Flow-GRPO of the transformer of the generator directory ``directory`` (config
    ``gen``) on ``prompts``, rewarded by the reward model directory ``reward`` alone (an
    open_clip local directory): one update per rollout, every sampling step stochastic, 5
    warm-up steps then a cosine decay. What the recipe's alignment stage and the world's RL
    round both run."""
    factor = gen.vae.spatial_factor
    return GRPOConfig(
        model=gen.transformer,
        init_from=directory / TRANSFORMER_FILE,
        prompts=GRPOPromptsConfig(prompts=prompts),
        latent_size=(gen.height // factor, gen.width // factor),
        group_size=group_size,
        prompts_per_step=prompts_per_step,
        sampler=replace(
            gen.sampler,
            steps=sampler_steps,
            noise_level=noise_level,
            sde_window=(0, sampler_steps - 1),
        ),
        kl_beta=kl_beta,
        clip_range=clip_range,
        updates_per_rollout=1,
        reward=GRPORewardConfig(
            weights={"alignment": 1.0},
            vae=gen.vae,
            vae_init_from=directory / VAE_FILE,
            alignment=AlignmentRewardConfig(architecture=f"local-dir:{reward}"),
        ),
        loop=round_loop(steps, lr=lr, seed=seed, warmup=5),
    )


def terse_prompts(scene: SceneConfig, *, seed: int, count: int) -> list[str]:
    """``count`` distinct terse captions of scenes drawn with ``scene`` from the seeds of a
    corpus of ``seed`` (:func:`flywheel.world.corpus.scene_seeds`), in seed order."""
    distinct: dict[str, None] = {}
    batch = count
    while len(distinct) < count:
        batch *= 2
        if batch > 64 * count:
            raise ValueError(f"the scenes have {len(distinct)} terse captions, not {count}")
        for scene_seed in scene_seeds(seed, batch):
            distinct[captions(sample_scene(scene_seed, scene)).terse] = None
            if len(distinct) == count:
                break
    return list(distinct)


def _write_corpus_once(directory: Path, console: Console, *, count: int, **options: Any) -> None:
    """``write_world_corpus(directory, count=count, **options)`` unless a complete corpus of
    ``count`` samples is there (an interrupted write is started again); another corpus there
    is refused."""
    if (directory / SAMPLES_FILE).is_file():
        if read_info(directory).count != count:
            raise ValueError(f"{directory} holds another corpus; build into a new directory")
        return
    console.log(f"{directory.name}: {count} scenes")
    if directory.exists():
        shutil.rmtree(directory)
    write_world_corpus(directory, count=count, **options)


SHIPPED_WORLDS_DIR = BASE_MODEL.parent
"""Where another world's shipped base lives: ``<this>/<world name>/`` (a build's
``generator/``, ``reward/``, ``enhancer/`` and ``world.toml``); the default world's is
:data:`BASE_MODEL`, :data:`BASE_REWARD`, :data:`BASE_ENHANCER`."""


@dataclass(frozen=True, slots=True)
class ShippedBase:
    """Where a world's shipped base model lives."""

    generator: Path
    reward: Path
    enhancer: Path


def shipped_base_of(world: str) -> ShippedBase | None:
    """The shipped base of the world named ``world`` (None: none ships)."""
    if world == "default":
        return ShippedBase(generator=BASE_MODEL, reward=BASE_REWARD, enhancer=BASE_ENHANCER)
    root = SHIPPED_WORLDS_DIR / world
    if not (root / GENERATOR_DIR / CONFIG_FILE).is_file():
        return None
    return ShippedBase(
        generator=root / GENERATOR_DIR, reward=root / REWARD_DIR, enhancer=root / ENHANCER_DIR
    )


def ship_world(build: str | Path, world: WorldDefinition) -> tuple[Path, Path, Path]:
    """:func:`ship` a build of ``world`` to where its base ships (the default world's to the
    package's base; another's to ``SHIPPED_WORLDS_DIR/<name>/``, with its ``world.toml``)."""
    if world.name == "default":
        return ship(build)
    root = SHIPPED_WORLDS_DIR / world.name
    root.mkdir(parents=True, exist_ok=True)
    shipped = ship(
        build,
        generator_to=root / GENERATOR_DIR,
        reward_to=root / REWARD_DIR,
        enhancer_to=root / ENHANCER_DIR,
        pretrained_to=root / PRETRAINED_DIR,
    )
    shutil.copyfile(Path(build) / WORLD_FILE, root / WORLD_FILE)
    return shipped


def ship(
    build: str | Path,
    *,
    generator_to: Path = BASE_MODEL,
    reward_to: Path = BASE_REWARD,
    enhancer_to: Path = BASE_ENHANCER,
    pretrained_to: Path = BASE_PRETRAINED,
) -> tuple[Path, Path, Path]:
    """Copy a finished build's generator, reward model and prompt enhancer to where they ship
    (by default the package's :data:`BASE_MODEL`, :data:`BASE_REWARD`, :data:`BASE_ENHANCER`)
    and, when the generator was aligned, its pretrained generator (:data:`BASE_PRETRAINED`);
    returns the three targets."""
    root = Path(build)
    generator, reward, enhancer = root / GENERATOR_DIR, root / REWARD_DIR, root / ENHANCER_DIR
    if not (generator / CONFIG_FILE).is_file():
        raise ValueError(f"{root}: no finished generator (no {GENERATOR_DIR}/{CONFIG_FILE})")
    if not (reward / REWARD_CONFIG_FILE).is_file():
        raise ValueError(f"{root}: no finished reward model (no {REWARD_DIR}/{REWARD_CONFIG_FILE})")
    if not (enhancer / "config.json").is_file():
        raise ValueError(f"{root}: no finished prompt enhancer (no {ENHANCER_DIR}/config.json)")
    if (root / ALIGNMENT_RUN_DIR).is_dir():
        _replace_dir(root / PRETRAINED_DIR, pretrained_to)
    return (
        _replace_dir(generator, generator_to),
        _replace_dir(reward, reward_to),
        _replace_dir(enhancer, enhancer_to),
    )


def _replace_dir(source: Path, destination: Path) -> Path:
    staging = destination.with_name(destination.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(source, staging)
    if destination.exists():
        shutil.rmtree(destination)
    staging.rename(destination)
    return destination


def load_world_reward(directory: str | Path = BASE_REWARD) -> AlignmentReward:
    """The world's reward model from a directory :func:`ship` (or a build) wrote."""
    root = Path(directory)
    if not (root / REWARD_CONFIG_FILE).is_file():
        raise ValueError(f"{root}: not a reward model directory (no {REWARD_CONFIG_FILE})")
    return build_alignment_reward(AlignmentRewardConfig(architecture=f"local-dir:{root}"))


def world_enhancer_config(directory: str | Path = BASE_ENHANCER) -> PromptEnhancerConfig:
    """How the world's prompt enhancer rewrites: greedy, with the system prompt it was trained
    with (``training.pe_sft.DEBUG_SYSTEM_PROMPT``)."""
    return PromptEnhancerConfig(
        path=Path(directory),
        system_prompt_t2i=DEBUG_SYSTEM_PROMPT,
        max_input_tokens=384,  # the default editing instruction's template takes 271
        max_new_tokens=256,
        batch_size=32,
    )


def load_world_enhancer(directory: str | Path = BASE_ENHANCER) -> PromptEnhancer:
    """The world's prompt enhancer from a directory :func:`ship` (or a build) wrote."""
    root = Path(directory)
    if not (root / "config.json").is_file():
        raise ValueError(f"{root}: not a prompt enhancer directory (no config.json)")
    return PromptEnhancer.load(world_enhancer_config(root))
