"""The training round of each track: data in, a candidate model directory out.

Every round writes under its own directory and resumes there: a round killed mid-way
starts again from its latest checkpoint (``training.trainer``'s resume), and a stage that
finished (the dataset, the cache, the VAE) is not redone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flywheel.world.base_model import WorldBaseConfig
from flywheel.world.loop.pretraining_gap import (
    AugmentationPlan,
    GapTrackConfig,
    transformer_round,
    vae_round,
    write_round_dataset,
)
from flywheel.world.loop.prompt_enhancer import (
    GRPOStageInputs,
    Pair,
    PromptEnhancerTrackConfig,
    enhancer_grpo_stage,
    enhancer_round,
)
from flywheel.world.loop.rl import RLTrackConfig, rl_round
from model.pipeline import Generator
from training.cache import DONE_FILE, ProducerConfig, produce
from training.checkpoint import load_model_weights
from training.data import SAMPLES_FILE
from training.loop import TrainResult
from training.pe_sft import export_enhancer, write_pairs
from training.trainer import train
from training.vae_training import export_vae_weights

if TYPE_CHECKING:
    from flywheel.world.definition import WorldDefinition

ENHANCER_DIR = "enhancer"
GENERATOR_DIR = "generator"


@dataclass(kw_only=True, slots=True)
class RoundOutput:
    """A finished round: its candidate component and how each training stage went."""

    candidate: Path
    """The candidate directory (a generator or a prompt enhancer)."""
    stages: dict[str, TrainResult] = field(default_factory=dict)
    """Stage name (``sft``, ``vae``, ``transformer``, ``grpo``) -> its training call."""
    figures: dict[str, dict[str, object]] = field(default_factory=dict)
    """Stage name -> the stage's own JSON-able figures (the enhancer's GRPO: its reward)."""

    def summary(self) -> dict[str, object]:
        """JSON-able figures per stage: steps, where it resumed from, first and last loss,
        and the stage's own figures."""
        return {
            name: {
                "steps": r.step,
                "resumed_from": r.resumed_from,
                "first_loss": r.losses[0] if r.losses else None,
                "last_loss": r.losses[-1] if r.losses else None,
                "seconds": round(r.seconds, 2),
                **self.figures.get(name, {}),
            }
            for name, r in self.stages.items()
        }


def run_enhancer_round(
    pairs: Sequence[Pair],
    *,
    enhancer: Path,
    out: Path,
    config: PromptEnhancerTrackConfig,
    progress: bool = False,
    grpo: GRPOStageInputs | None = None,
    world: WorldDefinition | None = None,
) -> RoundOutput:
    """PE SFT of ``enhancer`` on ``pairs``, then (given ``grpo`` and ``config.grpo_steps`` >
    0) its GRPO against the world's reward on new scenes' prompts, in the users' words of
    ``world`` (the base's; None: the default world); the candidate enhancer directory."""
    out.mkdir(parents=True, exist_ok=True)
    pairs_file = out / "pairs.jsonl"
    if not pairs_file.is_file():
        write_pairs(pairs_file, list(pairs))
    run = out / "run"
    result = train(
        enhancer_round(pairs_file, enhancer=enhancer, config=config),
        out=run,
        progress=progress,
        name="prompt-enhancer round",
    )
    output = RoundOutput(candidate=run, stages={"sft": result})
    if grpo is not None and config.grpo_steps > 0:
        stage = enhancer_grpo_stage(
            pairs,
            enhancer=enhancer,
            sft_run=run,
            out=out,
            config=config,
            inputs=grpo,
            progress=progress,
            world=world,
        )
        if stage is not None:
            output.stages["grpo"], output.figures["grpo"] = stage.result, stage.figures
            run = stage.run
    output.candidate = export_enhancer(run, out / ENHANCER_DIR)
    return output


def run_gap_round(
    plan: AugmentationPlan,
    *,
    generator: Path,
    out: Path,
    base: WorldBaseConfig,
    config: GapTrackConfig,
    progress: bool = False,
) -> RoundOutput:
    """Dataset, VAE fine-tuning, re-encoded cache, continued pretraining; the candidate
    generator directory."""
    dataset = out / "data"
    if not (dataset / SAMPLES_FILE).is_file():
        write_round_dataset(plan, dataset, base=base, config=config)
    candidate = Generator.load(generator)
    stages: dict[str, TrainResult] = {}
    if config.vae_steps > 0:
        stages["vae"] = train(
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
    stages["transformer"] = train(
        transformer_round(cache, generator=generator, base=base, config=config),
        out=out / "transformer",
        progress=progress,
        name="continued pretraining",
    )
    candidate.transformer.load_state_dict(load_model_weights(out / "transformer"))
    return RoundOutput(candidate=candidate.save(out / GENERATOR_DIR), stages=stages)


def run_rl_round(
    prompts: Sequence[str],
    *,
    generator: Path,
    reward: Path,
    out: Path,
    config: RLTrackConfig,
    progress: bool = False,
) -> RoundOutput:
    """Flow-GRPO of the generator's transformer on ``prompts`` against the reward model
    directory ``reward`` (the recalibrated one); the candidate generator directory."""
    candidate = Generator.load(generator)
    grpo = rl_round(prompts, generator=candidate, directory=generator, reward=reward, config=config)
    grpo.validate()
    run = out / "run"
    result = train(grpo, out=run, progress=progress, name="RL round")
    candidate.transformer.load_state_dict(load_model_weights(run))
    return RoundOutput(candidate=candidate.save(out / GENERATOR_DIR), stages={"grpo": result})
