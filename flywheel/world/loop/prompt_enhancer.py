"""The prompt-enhancer track: training pairs for the failing concepts, then a PE SFT round.

The routed cases say which concepts the users name in words the generator does not know
(in the world: caption colours said otherwise, :mod:`flywheel.world.vocabulary`). The
pairs are *reverse-engineered* from scenes that show those concepts: each scene's caption
is what the generator draws well (the output), the same caption in the users' words is what
a user types (the input). Echo pairs (a caption to itself) keep prompts the generator
already understands unchanged. The routed prompts themselves are not trained on: the slice
they form stays a fair test of the round.

``target="terse"`` pairs a terse user prompt with the terse caption (the vocabulary fixed);
``"rich"`` with the scene's rich caption (vocabulary fixed and details added). Measured on
the shipped base (48 terse user-worded colour probes, 200 steps): terse 0.83 → 0.33
failure rate, rich 0.83 → 0.47 — the rich target invents sizes and places the scene does
not have.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from flywheel.cycle.config import CycleConfig
from flywheel.world.base_model import world_enhancer_loop
from flywheel.world.corpus import scene_seeds
from flywheel.world.loop.slices import SliceCase
from flywheel.world.scenes import COLOURS, SceneConfig, captions, sample_scene
from flywheel.world.vocabulary import (
    USER_COLOURS,
    has_user_words,
    renamed_colours,
    to_user_words,
)
from training.pe_sft import DEBUG_SYSTEM_PROMPT, PESFTConfig, PromptPairsConfig

Pair = tuple[str, str]


@dataclass(kw_only=True, slots=True)
class PromptEnhancerTrackConfig:
    """What the track builds and trains."""

    pairs_per_concept: int = 200
    """User-worded pairs per failing concept."""
    echo_share: float = 0.5
    """Echo pairs, as a share of the user-worded ones."""
    target: Literal["terse", "rich"] = "terse"
    """The output side of a pair (see the module docstring)."""
    scene_seed: int = 11
    """Corpus seed of the scenes the pairs are reverse-engineered from."""
    steps: int = 200
    """PE SFT steps of the round."""
    batch_size: int = 16
    seed: int = 0

    @classmethod
    def from_cycle(cls, config: CycleConfig) -> PromptEnhancerTrackConfig:
        """The track's config from a cycle's (its ``prompt_enhancer`` section and seed)."""
        section = config.prompt_enhancer
        return cls(
            steps=section.steps, pairs_per_concept=section.pairs_per_concept, seed=config.seed
        )

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.pairs_per_concept < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("PromptEnhancerTrackConfig: pairs, steps and batch size >= 1")
        if not 0.0 <= self.echo_share <= 4.0:
            raise ValueError("PromptEnhancerTrackConfig.echo_share must be in [0, 4]")
        if self.target not in ("terse", "rich"):
            raise ValueError("PromptEnhancerTrackConfig.target: terse or rich")


def failing_concepts(cases: Sequence[SliceCase]) -> list[str]:
    """The caption colours the routed prompts name in the users' words (sorted)."""
    return sorted({colour for case in cases for colour in renamed_colours(case.prompt)})


_PAIR_SCENES = SceneConfig(max_kinds=1, count_probability=0.0, text_probability=0.0)


def enhancer_pairs(concepts: Sequence[str], config: PromptEnhancerTrackConfig) -> list[Pair]:
    """(user prompt, caption) pairs for ``concepts`` plus echo pairs, shuffled."""
    config.validate()
    unknown = set(concepts) - set(USER_COLOURS)
    if unknown or not concepts:
        raise ValueError(f"concepts must be some of {sorted(USER_COLOURS)}, got {sorted(concepts)}")
    rng = random.Random(config.seed)
    wanted = dict.fromkeys(concepts, config.pairs_per_concept)
    pairs: list[Pair] = []
    echoes: list[Pair] = []
    batch = 4 * config.pairs_per_concept * len(COLOURS)
    for scene_seed in scene_seeds(config.scene_seed, batch):
        scene = sample_scene(scene_seed, _PAIR_SCENES)
        caption = captions(scene)
        output = caption.terse if config.target == "terse" else caption.rich
        colour = scene.objects[0].colour if scene.objects else None
        if colour in wanted and wanted[colour] > 0:
            user = to_user_words(caption.terse, rng)
            if has_user_words(user):
                pairs.append((user, output))
                wanted[colour] -= 1
        elif len(echoes) < config.echo_share * config.pairs_per_concept * len(concepts):
            echoes.append((caption.terse, output))
        if not any(wanted.values()) and len(echoes) >= config.echo_share * len(pairs):
            break
    short = {c: n for c, n in wanted.items() if n}
    if short:
        raise ValueError(f"not enough scenes for {short} more pairs; raise the scene batch")
    everything = pairs + echoes
    rng.shuffle(everything)
    return everything


def enhancer_round(
    pairs: Path, *, enhancer: Path, config: PromptEnhancerTrackConfig
) -> PESFTConfig:
    """The PE SFT round on the pairs file ``pairs``, from the enhancer directory
    ``enhancer``."""
    config.validate()
    return PESFTConfig(
        model=enhancer,
        data=PromptPairsConfig(pairs=pairs),
        system_prompt=DEBUG_SYSTEM_PROMPT,
        batch_size=config.batch_size,
        max_length=512 if config.target == "rich" else 256,
        loop=world_enhancer_loop(config.steps),
    )
