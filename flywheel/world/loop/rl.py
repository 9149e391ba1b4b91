"""The RL track in the world: the reward recalibrated from people's preferences, then
Flow-GRPO against the recalibrated reward — never against the judge that gates.

1. **Preference pairs** (the reviewed artefact): the routed train cases' own feedback
   (:func:`flywheel.tracks.reward_data.preference_pairs`: pairwise feedback as it stands, a
   liked and a disliked image of one prompt or theme). Nothing is rendered by the world: the
   pairs are the served model's images as the users judged them. The artefact shows how
   often the shipped reward prefers what people preferred, per source.
2. **Recalibration** (the round's first stage): Bradley-Terry fine-tuning of the world's reward
   on the reviewed pairs (:mod:`training.reward_recalibration`: the towers' projections only,
   the initial reward's image-to-prompt distributions retained, an L2-SP anchor). The pairs
   of every fourth prompt (by a stable hash) are held out: the reward's agreement with people
   on them, before and after, is the round's measure of the recalibration.
3. **Flow-GRPO** (``training.grpo``) of the generator's transformer on the round's prompts,
   rewarded by the recalibrated reward alone. The evaluator that judges the gate is not part
   of it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from sqlalchemy.orm import Session

from flywheel.adapters.generator_rounds import preference_dataset
from flywheel.cycle import repository
from flywheel.cycle.config import CycleConfig
from flywheel.cycle.stack_steps import routed_cases
from flywheel.tracks.reward_data import PreferencePair, preference_pairs
from flywheel.tracks.routed import RoutedCase, same_prompt_key
from flywheel.world.base_model import load_world_reward, reward_grpo
from flywheel.world.loop.slices import SliceCase
from model.pipeline import Generator
from model.reward import AlignmentRewardConfig
from training.grpo import GRPOConfig
from training.io import atomic_write_text
from training.loop import TrainResult, round_loop
from training.reward_recalibration import (
    LOCAL_DIR,
    RewardRecalibrationConfig,
    export_recalibrated_reward,
    preference_agreement,
)
from training.trainer import train

PREFERENCES_FILE = "preferences.jsonl"
"""The artefact's preference pairs (one :class:`PreferencePair` a line)."""
CHECK_EVERY = 4
"""One prompt in this many (by a stable hash) holds its pairs out of the recalibration."""


@dataclass(kw_only=True, slots=True)
class RecalibrationConfig:
    """The Bradley-Terry fine-tuning of the world's reward on people's preference pairs."""

    steps: int = 40
    """Optimizer steps (0: the round trains against the shipped reward as it is)."""
    lr: float = 1e-2
    """Peak learning rate (the projections only are trained)."""
    batch_size: int = 16
    """Pairs per step (fewer when there are fewer pairs)."""


@dataclass(kw_only=True, slots=True)
class RLTrackConfig:
    """How the track recalibrates the reward and trains the generator against it."""

    steps: int = 15
    """Flow-GRPO optimizer steps (one rollout each)."""
    lr: float = 5e-4
    """Peak learning rate; with the KL and clip below, the settings of the base recipe's
    alignment stage (which measured them)."""
    kl_beta: float = 0.01
    """Weight of the KL to the round's starting transformer."""
    clip_range: float = 1e-3
    """PPO's ratio clip."""
    group_size: int = 8
    prompts_per_step: int = 4
    sampler_steps: int = 8
    seed: int = 0
    recalibration: RecalibrationConfig = field(default_factory=RecalibrationConfig)
    """The reward's recalibration before the GRPO steps."""

    @classmethod
    def from_cycle(cls, config: CycleConfig) -> RLTrackConfig:
        """The track's config from a cycle's (its ``rl`` section and seed)."""
        section = config.rl
        return cls(
            steps=section.steps,
            group_size=section.group_size,
            prompts_per_step=section.prompts_per_step,
            seed=config.seed,
            recalibration=RecalibrationConfig(steps=section.recalibration_steps),
        )

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.steps < 1 or self.sampler_steps < 2 or self.lr <= 0:
            raise ValueError("RLTrackConfig: steps >= 1, sampler_steps >= 2, lr > 0")
        if self.group_size < 2 or self.prompts_per_step < 1:
            raise ValueError("RLTrackConfig: group_size >= 2, prompts_per_step >= 1")
        recalibration = self.recalibration
        if recalibration.steps < 0 or recalibration.lr <= 0 or recalibration.batch_size < 1:
            raise ValueError("RLTrackConfig.recalibration: steps >= 0, lr > 0, batch_size >= 1")


class PreferenceArtefact(BaseModel):
    """The reviewed artefact: people's preference pairs and the shipped reward's agreement."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preferences_file: str
    """Path of ``preferences.jsonl``."""
    pairs: int
    by_source: dict[str, int]
    """``pairwise`` / ``thumbs`` / ``rating`` -> pairs."""
    categories: dict[str, int]
    """category (a flag, the theme, ``default``) -> pairs."""
    agreement: dict[str, float]
    """Per source: the share of pairs whose preferred image the shipped reward scores
    higher (the reward's disagreement with people is what recalibration corrects)."""


class RecalibrationResult(BaseModel):
    """What the round's recalibration did, in the round's summary."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reward: str
    """The recalibrated reward's directory (an open_clip local directory)."""
    train_pairs: int
    check_pairs: int
    """Pairs held out of the recalibration (every fourth prompt's)."""
    before: dict[str, float]
    """On the held-out pairs, per source: the shipped reward's agreement with people."""
    after: dict[str, float]
    """The same, of the recalibrated reward."""


def held_out(prompt: str) -> bool:
    """Whether ``prompt``'s pairs are held out of the recalibration (a stable hash)."""
    digest = hashlib.sha256(prompt.encode()).digest()
    return int.from_bytes(digest[:4], "big") % CHECK_EVERY == 0


def write_preferences(path: Path, pairs: Sequence[PreferencePair]) -> Path:
    """``pairs`` as a preferences file (atomically)."""
    atomic_write_text(path, "".join(p.model_dump_json() + "\n" for p in pairs))
    return path


def read_preferences(path: Path) -> list[PreferencePair]:
    """The pairs of a preferences file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [PreferencePair.model_validate_json(line) for line in lines if line.strip()]


def preference_cases(
    session: Session, cases: Sequence[SliceCase], *, every_gate: set[str]
) -> list[RoutedCase]:
    """Whose feedback the reward learns from: people's preferences are the reward's, whichever
    track a compared prompt's case went to — the routed train ``cases`` and every case whose
    prompt people compared two images of, none a gate's prompt (``every_gate``: every
    track's gate keys, :func:`~flywheel.tracks.routed.same_prompt_key`)."""
    ids = {c.case_id for c in cases if c.case_id is not None}
    ids |= set(repository.compared_case_ids(session))
    routed = {
        r.case_id: r
        for pairs in routed_cases(session, case_ids=sorted(ids)).values()
        for r, _ in pairs
        if not {same_prompt_key(r.prompt), same_prompt_key(r.reference)} & every_gate
    }
    return [routed[k] for k in sorted(routed)]


def tally(pairs: Sequence[PreferencePair]) -> tuple[dict[str, int], dict[str, int]]:
    """Pairs per source and per category."""
    by_source = Counter(p.source for p in pairs)
    categories = Counter(p.category for p in pairs)
    return dict(sorted(by_source.items())), dict(sorted(categories.items()))


def preference_artefact(
    cases: Sequence[RoutedCase], *, reward: Path, out: Path, seed: int = 0
) -> PreferenceArtefact | str:
    """The routed ``cases``' preference pairs written to ``out/preferences.jsonl``, with the
    shipped ``reward``'s agreement with them; or why there is none."""
    pairs = preference_pairs(cases, seed=seed)
    if not pairs:
        return (
            f"no preference pair in the feedback of {len(cases)} routed case(s) (pairwise "
            "feedback, or a liked and a disliked image of one prompt or theme)"
        )
    out.mkdir(parents=True, exist_ok=True)
    file = write_preferences(out / PREFERENCES_FILE, pairs)
    dataset, _, _ = preference_dataset(file, out / "shipped-agreement")
    agreement = preference_agreement(load_world_reward(reward).eval(), dataset)
    by_source, categories = tally(pairs)
    return PreferenceArtefact(
        preferences_file=str(file),
        pairs=len(pairs),
        by_source=by_source,
        categories=categories,
        agreement=agreement,
    )


def recalibrate(
    preferences: Path, *, reward: Path, out: Path, config: RLTrackConfig
) -> tuple[RecalibrationResult, TrainResult | None]:
    """Bradley-Terry fine-tuning of ``reward`` on the pairs of ``preferences`` but the held-out
    prompts' (:func:`held_out`), into ``out``; the held-out pairs measure it before and
    after. With no pair left to train on (or 0 steps), the reward is the shipped one (and
    there is no training call)."""
    pairs = read_preferences(preferences)
    check = [p for p in pairs if held_out(p.prompt)]
    learn = [p for p in pairs if not held_out(p.prompt)]
    out.mkdir(parents=True, exist_ok=True)
    steps = config.recalibration.steps if learn else 0
    recalibrated = reward
    run: TrainResult | None = None
    if steps > 0:
        file = write_preferences(out / "train.jsonl", learn)
        dataset, trained, _ = preference_dataset(file, out / "train")
        settings = RewardRecalibrationConfig(
            reward=AlignmentRewardConfig(architecture=f"{LOCAL_DIR}{reward}"),
            preferences=dataset,
            batch_size=min(config.recalibration.batch_size, trained),
            loop=round_loop(steps, lr=config.recalibration.lr, seed=config.seed, warmup=5),
        )
        run = train(settings, out=out / "run", name="reward recalibration")
        recalibrated = export_recalibrated_reward(out / "run", out / "reward", settings)
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    if check:
        file = write_preferences(out / "check.jsonl", check)
        dataset, _, _ = preference_dataset(file, out / "check")
        before = preference_agreement(load_world_reward(reward).eval(), dataset)
        after = preference_agreement(load_world_reward(recalibrated).eval(), dataset)
    result = RecalibrationResult(
        reward=str(recalibrated),
        train_pairs=len(learn),
        check_pairs=len(check),
        before=before,
        after=after,
    )
    atomic_write_text(out / "recalibration.json", json.dumps(result.model_dump()) + "\n")
    return result, run


def rl_round(
    prompts: Sequence[str],
    *,
    generator: Generator,
    directory: Path,
    reward: Path,
    config: RLTrackConfig,
) -> GRPOConfig:
    """Flow-GRPO from the generator at ``directory`` on ``prompts``, rewarded by the reward
    model directory ``reward`` (the recalibrated one)."""
    config.validate()
    distinct = sorted(set(prompts))
    if not distinct:
        raise ValueError("the RL round needs prompts")
    return reward_grpo(
        generator.config,
        directory,
        reward=reward,
        prompts=distinct,
        steps=config.steps,
        lr=config.lr,
        kl_beta=config.kl_beta,
        clip_range=config.clip_range,
        group_size=config.group_size,
        prompts_per_step=min(config.prompts_per_step, len(distinct)),
        sampler_steps=config.sampler_steps,
        noise_level=0.7,
        seed=config.seed,
    )
