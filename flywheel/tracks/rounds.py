"""The training round of each track: data in, a candidate model directory out.

Every round writes under its own directory and resumes there: a round killed mid-way
starts again from its latest checkpoint (``training.trainer``'s resume), and a stage that
finished (the dataset, the cache, the VAE) is not redone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from flywheel.tracks.pretraining_gap import (
    AugmentationPlan,
    GapTrackConfig,
    transformer_round,
    vae_round,
    write_round_dataset,
)
from flywheel.tracks.prompt_enhancer import Pair, PromptEnhancerTrackConfig, enhancer_round
from flywheel.tracks.rl import RewardFn, RLTrackConfig, rl_round
from flywheel.tracks.slices import SliceCase
from flywheel.world.base_model import WorldBaseConfig
from model.pipeline import Generator
from training.cache import DONE_FILE, ProducerConfig, produce
from training.checkpoint import load_model_weights
from training.data import SAMPLES_FILE
from training.grpo import build_grpo
from training.loop import run_loop
from training.pe_sft import export_enhancer, write_pairs
from training.trainer import identity, train
from training.vae_training import export_vae_weights

ENHANCER_DIR = "enhancer"
GENERATOR_DIR = "generator"


def run_enhancer_round(
    pairs: Sequence[Pair],
    *,
    enhancer: Path,
    out: Path,
    config: PromptEnhancerTrackConfig,
    progress: bool = False,
) -> Path:
    """PE SFT of ``enhancer`` on ``pairs``; the candidate enhancer directory."""
    out.mkdir(parents=True, exist_ok=True)
    pairs_file = out / "pairs.jsonl"
    if not pairs_file.is_file():
        write_pairs(pairs_file, list(pairs))
    run = out / "run"
    train(
        enhancer_round(pairs_file, enhancer=enhancer, config=config),
        out=run,
        progress=progress,
        name="prompt-enhancer round",
    )
    return export_enhancer(run, out / ENHANCER_DIR)


def run_gap_round(
    plan: AugmentationPlan,
    *,
    generator: Path,
    out: Path,
    base: WorldBaseConfig,
    config: GapTrackConfig,
    progress: bool = False,
) -> Path:
    """Dataset, VAE fine-tuning, re-encoded cache, continued pretraining; the candidate
    generator directory."""
    dataset = out / "data"
    if not (dataset / SAMPLES_FILE).is_file():
        write_round_dataset(plan, dataset, base=base, config=config)
    candidate = Generator.load(generator)
    if config.vae_steps > 0:
        train(
            vae_round(dataset, generator=generator, base=base, config=config),
            out=out / "vae",
            progress=progress,
            name="VAE round",
        )
        candidate.vae.load_state_dict(export_vae_weights(out / "vae"))
    cache = out / "cache"
    if not (cache / DONE_FILE).is_file():
        produce(
            dataset,
            cache,
            vae=candidate.vae,
            encoder=candidate.encoder,
            config=ProducerConfig(buckets=base.buckets(), shard_size=256, batch_size=64),
        )
    train(
        transformer_round(cache, generator=generator, base=base, config=config),
        out=out / "transformer",
        progress=progress,
        name="continued pretraining",
    )
    candidate.transformer.load_state_dict(load_model_weights(out / "transformer"))
    return candidate.save(out / GENERATOR_DIR)


def run_rl_round(
    cases: Sequence[SliceCase],
    *,
    generator: Path,
    reward: RewardFn,
    out: Path,
    config: RLTrackConfig,
    progress: bool = False,
) -> Path:
    """Flow-GRPO of the generator's transformer against ``reward``; the candidate generator
    directory."""
    candidate = Generator.load(generator)
    grpo = rl_round(cases, generator=candidate, directory=generator, config=config)
    grpo.validate()
    run = out / "run"
    run.mkdir(parents=True, exist_ok=True)
    run_loop(
        build_grpo(grpo, run, reward=reward),
        loop=grpo.loop,
        identity=identity(grpo),
        out=run,
        name="RL round",
        progress=progress,
        started=time.monotonic(),
    )
    candidate.transformer.load_state_dict(load_model_weights(run))
    return candidate.save(out / GENERATOR_DIR)
