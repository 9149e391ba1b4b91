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

The round's second stage is GRPO (:func:`enhancer_grpo_stage`, the Qwen-Image report's PE
RL): on users'-words prompts of *new* scenes of the failing concepts (:func:`grpo_cases`:
their own seed band, none a prompt of the gate's slice nor of the regression suite), the
SFT'd enhancer samples a group of rewrites per prompt, the frozen round-base generator draws
each (a group from one noise) and a judge scores each drawing against what the prompt was
made from, its scene or its caption (``grpo_reward``):

``"evaluator"`` (the default; the world's cycle) — :class:`EvaluatorRewriteReward`, named
    ``world-evaluator``: the world's evaluator's verdict (its score on the scene's skill
    elements) on each drawing, the Qwen-Image-2.0 report's judge of rewrites.
``"world-reward"`` — :class:`WorldRewriteReward`: the world's reward model's alignment of
    each drawing with the intended caption.

Why the evaluator in the cycle: a training round's reward is never the judge of its gate, and
the gate judges prompts no round trained on. The world's gate (:class:`~flywheel.world.loop.
slices.SliceJudges`) judges the enhancer's verdicts — the slice cases *without* a scene (an
app's prompts, regenerated through the enhancer) — by the world reward model's rank; the
cases *with* a scene are drawn by the generator alone (no enhancer: nothing the stage learns
reaches them) and judged by the evaluator. So the reward model would be the judge of the
enhancer's gate, the evaluator is not: :func:`check_gate_judges` raises when the stage's
reward is a judge of the gate cases the enhancer rewrites (:func:`enhancer_gate_judges`),
and :func:`check_held_out` when a stage prompt is one the gate (or the regression suite, or
a scenario) judges.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from flywheel.cycle.config import CycleConfig
from flywheel.tracks.routed import same_prompt_key
from flywheel.world.base_model import load_world_reward, world_enhancer_loop
from flywheel.world.benchmark import BenchmarkCase, build_case, suite, suite_names
from flywheel.world.corpus import scene_seeds
from flywheel.world.loop.slices import SliceCase
from flywheel.world.scenes import (
    COLOURS,
    CORPUS_SEED_LIMIT,
    SceneConfig,
    captions,
    sample_scene,
)
from flywheel.world.vocabulary import DEFAULT_VOCABULARY, Vocabulary
from flywheel.world.weaknesses import PROBE_BAND
from model.pipeline import Generator
from model.reward import AlignmentReward
from training.loop import LoopConfig, OptimizerConfig, TrainResult, run_loop
from training.pe_grpo import PEGRPOConfig, RewriteGroup, RewritePolicyConfig, build_pe_grpo
from training.pe_sft import (
    DEBUG_SYSTEM_PROMPT,
    PESFTConfig,
    PromptPairsConfig,
    read_pairs,
    write_pairs,
)
from training.trainer import identity

if TYPE_CHECKING:
    from flywheel.world.definition import WorldDefinition
    from flywheel.world.evaluator import Evaluator

Pair = tuple[str, str]

GRPO_BAND = CORPUS_SEED_LIMIT + 4 * 10**10
"""Seed band of the GRPO stage's scenes (:func:`~flywheel.world.benchmark.build_case`'s
colour builder): above every corpus seed (the pairs' scenes, the base's corpus, and the
demo's, miners' and attribution's probe bands all lie below the limit) and between the suites'
bands (limit + 10¹⁰, + 2·10¹⁰) and the weakness probes' (limit + 3·10¹⁰) — checked by
:func:`check_grpo_seeds`."""
WORLD_REWARD_NAME = "world-reward"
"""The world's reward model as a judge of rewrites (:class:`WorldRewriteReward`), and as the
gate's judge of the slice cases without a scene."""
EVALUATOR_NAME = "world-evaluator"
"""The world's evaluator as a judge of rewrites (:class:`EvaluatorRewriteReward`, the cycle's
GRPO reward), and as the gate's judge of the slice cases with a scene."""
GRPOReward = Literal["evaluator", "world-reward"]


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
    grpo_steps: int = 0
    """GRPO steps after the SFT (0: the round is SFT only)."""
    grpo_prompts_per_concept: int = 6
    """Users'-words prompts of new scenes per failing concept the GRPO stage trains on (fewer
    when the concept's distinct prompts not held out for the gate run out)."""
    grpo_prompts_per_step: int = 2
    """Prompts per GRPO rollout."""
    grpo_group_size: int = 8
    """Rewrites sampled per prompt (the group the advantages are relative to)."""
    grpo_updates_per_rollout: int = 2
    """Optimizer steps per rollout (the rollout's images are drawn once)."""
    grpo_lr: float = 2e-4
    """GRPO's AdamW learning rate (constant after 2 warm-up steps)."""
    grpo_kl: float = 0.1
    """Weight of the KL to the SFT'd enhancer (the GRPO reference)."""
    grpo_temperature: float = 1.0
    """Sampling temperature of the rewrites."""
    grpo_max_new_tokens: int = 32
    """Most bytes of a rewrite (a terse prompt takes under 20)."""
    grpo_render_steps: int | None = None
    """Sampler steps of the frozen generator's drawings (None: its own, as the gate draws)."""
    grpo_keep_weight: float = 0.5
    """Weight of the reward's text term, the share of the user's other words a rewrite keeps
    (:class:`WorldRewriteReward`; 0: the image term alone)."""
    grpo_band: int = GRPO_BAND
    """Seed band of the GRPO stage's scenes (see :data:`GRPO_BAND`)."""
    grpo_reward: GRPOReward = "evaluator"
    """What judges the rewrites' drawings: the world's evaluator against the prompt's scene
    (:class:`EvaluatorRewriteReward`), or the world's reward model against its intended
    caption (:class:`WorldRewriteReward`; see the module docstring for why the cycle's gate
    refuses it)."""

    @classmethod
    def from_cycle(cls, config: CycleConfig) -> PromptEnhancerTrackConfig:
        """The track's config from a cycle's (its ``prompt_enhancer`` section and seed)."""
        section = config.prompt_enhancer
        return cls(
            steps=section.steps,
            pairs_per_concept=section.pairs_per_concept,
            grpo_steps=section.grpo_steps,
            grpo_prompts_per_concept=section.grpo_prompts_per_concept,
            grpo_group_size=section.grpo_group_size,
            seed=config.seed,
        )

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.pairs_per_concept < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("PromptEnhancerTrackConfig: pairs, steps and batch size >= 1")
        if not 0.0 <= self.echo_share <= 4.0:
            raise ValueError("PromptEnhancerTrackConfig.echo_share must be in [0, 4]")
        if self.target not in ("terse", "rich"):
            raise ValueError("PromptEnhancerTrackConfig.target: terse or rich")
        if self.grpo_steps < 0 or self.grpo_prompts_per_concept < 1:
            raise ValueError("PromptEnhancerTrackConfig: grpo_steps >= 0, grpo prompts >= 1")
        if self.grpo_prompts_per_step < 1 or self.grpo_group_size < 2:
            raise ValueError("PromptEnhancerTrackConfig: grpo prompts a step >= 1, group >= 2")
        if self.grpo_updates_per_rollout < 1 or self.grpo_max_new_tokens < 1:
            raise ValueError("PromptEnhancerTrackConfig: grpo updates and new tokens >= 1")
        if not self.grpo_lr > 0 or self.grpo_kl < 0 or not self.grpo_temperature > 0:
            raise ValueError("PromptEnhancerTrackConfig: grpo_lr > 0, kl >= 0, temperature > 0")
        if self.grpo_keep_weight < 0:
            raise ValueError("PromptEnhancerTrackConfig.grpo_keep_weight must be >= 0")
        if self.grpo_render_steps is not None and self.grpo_render_steps < 1:
            raise ValueError("PromptEnhancerTrackConfig.grpo_render_steps must be >= 1")
        if self.grpo_band < CORPUS_SEED_LIMIT:
            raise ValueError("PromptEnhancerTrackConfig.grpo_band lies among corpus seeds")
        if self.grpo_reward not in ("evaluator", "world-reward"):
            raise ValueError(f"PromptEnhancerTrackConfig.grpo_reward {self.grpo_reward!r}")


def world_vocabulary(world: WorldDefinition | None = None) -> Vocabulary:
    """The users' words of ``world`` (None: the default world's,
    :data:`~flywheel.world.vocabulary.DEFAULT_VOCABULARY`)."""
    return DEFAULT_VOCABULARY if world is None else world.user_vocabulary()


def _check_concepts(concepts: Collection[str], vocabulary: Vocabulary) -> None:
    unknown = set(concepts) - set(vocabulary.colours)
    if unknown:
        raise ValueError(
            f"concepts must be some of {sorted(vocabulary.colours)}, got {sorted(concepts)}"
        )


def failing_concepts(
    cases: Sequence[SliceCase], *, world: WorldDefinition | None = None
) -> list[str]:
    """The caption colours the routed prompts name in the users' words of ``world`` (None:
    the default world; sorted)."""
    vocabulary = world_vocabulary(world)
    return sorted({colour for case in cases for colour in vocabulary.renamed_colours(case.prompt)})


_PAIR_SCENES = SceneConfig(max_kinds=1, count_probability=0.0, text_probability=0.0)


def enhancer_pairs(
    concepts: Sequence[str],
    config: PromptEnhancerTrackConfig,
    *,
    held_out: Collection[str] = (),
    world: WorldDefinition | None = None,
) -> list[Pair]:
    """(user prompt, caption) pairs for ``concepts`` plus echo pairs, shuffled; none whose
    prompt or caption is one of ``held_out`` (the :func:`same_prompt_key` of each of the
    gate's prompts and references: the gate judges no input or target of the round). The user
    prompts are in the users' words of ``world`` (None: the default world)."""
    config.validate()
    held = set(held_out)
    vocabulary = world_vocabulary(world)
    if not concepts:
        raise ValueError(f"concepts must be some of {sorted(vocabulary.colours)}, got []")
    _check_concepts(concepts, vocabulary)
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
        if {same_prompt_key(caption.terse), same_prompt_key(output)} & held:
            continue
        if colour in wanted and wanted[colour] > 0:
            user = vocabulary.to_user_words(caption.terse, rng)
            if vocabulary.has_user_words(user) and same_prompt_key(user) not in held:
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


# ---- the GRPO stage ---------------------------------------------------------------------


def pair_concepts(pairs: Sequence[Pair], *, world: WorldDefinition | None = None) -> list[str]:
    """The caption colours the pairs' inputs name in the users' words of ``world`` (None: the
    default world; the round's failing concepts, read back from its pairs; sorted)."""
    vocabulary = world_vocabulary(world)
    return sorted({colour for prompt, _ in pairs for colour in vocabulary.renamed_colours(prompt)})


def check_grpo_seeds(seeds: Sequence[int]) -> None:
    """Raise ``ValueError`` unless every seed lies above the corpus seeds (so below-limit probe
    bands — the demo's, the miners', attribution's — cannot hold it), outside the weakness
    probes' bands, and is the seed of no case of any benchmark suite (the regression suite's
    included)."""
    suites = {case.seed for name in suite_names() for case in suite(name)}
    probes = range(PROBE_BAND, PROBE_BAND + 2 * 10**8)
    clash = sorted(s for s in seeds if s < CORPUS_SEED_LIMIT or s in probes or s in suites)
    if clash:
        raise ValueError(f"GRPO scene seeds {clash[:4]} are also drawn elsewhere")


def grpo_cases(
    concepts: Sequence[str],
    config: PromptEnhancerTrackConfig,
    *,
    gate_prompts: Sequence[str],
    world: WorldDefinition | None = None,
) -> list[tuple[Pair, BenchmarkCase]]:
    """(users'-words prompt, intended caption) pairs of new scenes showing ``concepts``, each
    with its scene: the colour builder's cases of each concept from ``config.grpo_band``, their
    terse caption (what the generator draws well) put in the users' words. Distinct prompts
    only, and none that is one of ``gate_prompts`` (:func:`same_prompt_key`): the stage trains
    on no prompt the gate judges. The users' words are those of ``world`` (None: the default
    world). Raises ``ValueError`` when a prompt or seed clashes."""
    config.validate()
    vocabulary = world_vocabulary(world)
    _check_concepts(concepts, vocabulary)
    held = {same_prompt_key(p) for p in gate_prompts}
    rng = random.Random(config.seed)
    colours = list(COLOURS)
    out: list[tuple[Pair, BenchmarkCase]] = []
    for concept in sorted(concepts):
        taken: set[str] = set()
        for draw in range(40 * config.grpo_prompts_per_concept):
            if len(taken) == config.grpo_prompts_per_concept:
                break
            k = colours.index(concept) + len(colours) * draw
            case = build_case("colour", k, band=config.grpo_band, case_id=f"pe-grpo/{k}")
            intended = captions(case.spec).terse
            prompt = vocabulary.to_user_words(intended, rng)
            key = same_prompt_key(prompt)
            if not vocabulary.has_user_words(prompt) or key in held or key in taken:
                continue
            taken.add(key)
            out.append(((prompt, intended), case))
    check_grpo_seeds([case.seed for _, case in out])
    check_held_out([pair for pair, _ in out], gate_prompts=gate_prompts)
    return out


def grpo_prompts(
    concepts: Sequence[str],
    config: PromptEnhancerTrackConfig,
    *,
    gate_prompts: Sequence[str],
    world: WorldDefinition | None = None,
) -> list[Pair]:
    """The pairs of :func:`grpo_cases` (without their scenes)."""
    cases = grpo_cases(concepts, config, gate_prompts=gate_prompts, world=world)
    return [pair for pair, _ in cases]


def check_held_out(pairs: Sequence[Pair], *, gate_prompts: Sequence[str]) -> None:
    """Raise ``ValueError`` when a pair's prompt is one of ``gate_prompts``."""
    held = {same_prompt_key(p) for p in gate_prompts}
    shared = sorted({prompt for prompt, _ in pairs if same_prompt_key(prompt) in held})
    if shared:
        raise ValueError(f"GRPO prompts the gate judges: {shared[:4]}")


def enhancer_gate_judges(cases: Sequence[SliceCase]) -> set[str]:
    """The judges of the gate's verdicts that a candidate enhancer can change: a slice case
    without a scene is regenerated through the enhancer and judged by the world's reward model
    (:func:`~flywheel.world.loop.slices.failure_rate`); one with its scene is drawn by the
    generator alone, whatever the enhancer."""
    return {WORLD_REWARD_NAME for case in cases if case.scene is None}


def check_gate_judges(reward: str, gate_judges: Collection[str]) -> None:
    """Raise ``ValueError`` when the stage's reward ``reward`` is one of ``gate_judges`` (a
    training round's reward is never the judge of its gate)."""
    if reward in gate_judges:
        raise ValueError(
            f"the GRPO stage's reward {reward!r} also judges the enhancer's gate "
            f"({sorted(gate_judges)}); rewarding with it would train on the gate's judge"
        )


def kept_words(rewrite: str, prompt: str, *, vocabulary: Vocabulary = DEFAULT_VOCABULARY) -> float:
    """The share of ``prompt``'s words, its users' colour words (``vocabulary``'s) aside, that
    ``rewrite`` has (1 when there are none)."""
    wanted = [w for w in same_prompt_key(prompt).split() if not vocabulary.has_user_words(w)]
    if not wanted:
        return 1.0
    have = set(same_prompt_key(rewrite).split())
    return sum(w in have for w in wanted) / len(wanted)


@dataclass(kw_only=True, slots=True)
class WorldRewriteReward:
    """The GRPO stage's judge of rewrites: the frozen round-base generator draws each rewrite
    (every rewrite of a group from the group's noise; equal rewrites once), and the world's
    reward model scores each image against the group's intended caption (raw alignment
    score), plus ``keep_weight`` times :func:`kept_words` of the rewrite and the user's
    prompt. Not the evaluator that judges the gate's scene cases.

    The text term is there because the image term cannot see what the generator cannot draw:
    the base draws colours as blobs, no shapes, so "blue" scores as "blue circle" and, on the
    image term alone, GRPO learns to drop the shape (measured: a half-trained enhancer's
    held-out rewrites 22 % → 0 % right while the image reward rose 0.23 → 0.50)."""

    generator: Generator
    """The frozen generator (the round's base; never trained here)."""
    model: AlignmentReward
    """The world's reward model (``world-reward``)."""
    keep_weight: float = 0.5
    """Weight of :func:`kept_words` (0: the image term alone)."""
    vocabulary: Vocabulary = DEFAULT_VOCABULARY
    """The users' words :func:`kept_words` leaves aside (the base's world's)."""
    name: str = WORLD_REWARD_NAME

    @torch.no_grad()
    def __call__(self, groups: Sequence[RewriteGroup]) -> list[Tensor]:
        """Per group its rewrites' rewards ``(G,)``: all groups' images in one batch."""
        images, owners, slots = draw_groups(self.generator, groups)  # (M, 3, H, W)
        scores = self.model.score(images, [groups[g].target for g in owners]).float().cpu()
        return [
            scores[torch.tensor(slot)]
            + self.keep_weight * kept_share(group, vocabulary=self.vocabulary)
            for group, slot in zip(groups, slots, strict=True)
        ]


@dataclass(kw_only=True, slots=True)
class EvaluatorRewriteReward:
    """The GRPO stage's judge of rewrites in the cycle: the frozen round-base generator draws
    each rewrite (as :class:`WorldRewriteReward`), and the world's evaluator gives its verdict
    on each drawing against the scene the group's prompt was made from — its score on the
    scene's skill elements (:func:`~flywheel.world.evaluation.score_case`; the colour
    builder's scenes: the object's colour) — plus ``keep_weight`` times :func:`kept_words`
    (the colour score cannot see the shape the base does not draw either). Not the world
    reward model that judges the enhancer's gate (:func:`enhancer_gate_judges`)."""

    generator: Generator
    """The frozen generator (the round's base; never trained here)."""
    evaluator: Evaluator
    """The world's evaluator."""
    scenes: Mapping[str, BenchmarkCase]
    """Each stage prompt's scene (a group's ``prompt``: the pair's first side)."""
    keep_weight: float = 0.5
    """Weight of :func:`kept_words` (0: the verdict alone)."""
    vocabulary: Vocabulary = DEFAULT_VOCABULARY
    """The users' words :func:`kept_words` leaves aside (the base's world's)."""
    name: str = EVALUATOR_NAME

    @torch.no_grad()
    def __call__(self, groups: Sequence[RewriteGroup]) -> list[Tensor]:
        """Per group its rewrites' rewards ``(G,)``: all groups' images in one batch."""
        from flywheel.world.evaluation import score_case

        missing = sorted({g.prompt for g in groups} - set(self.scenes))
        if missing:
            raise KeyError(f"no scene for the GRPO prompts {missing[:4]}")
        images, owners, slots = draw_groups(self.generator, groups)  # (M, 3, H, W)
        scores = torch.tensor(
            [
                score_case(self.scenes[groups[g].prompt], image, evaluator=self.evaluator).score
                for g, image in zip(owners, images, strict=True)
            ]
        )  # (M,)
        return [
            scores[torch.tensor(slot)]
            + self.keep_weight * kept_share(group, vocabulary=self.vocabulary)
            for group, slot in zip(groups, slots, strict=True)
        ]


def kept_share(group: RewriteGroup, *, vocabulary: Vocabulary = DEFAULT_VOCABULARY) -> Tensor:
    """:func:`kept_words` of each rewrite of ``group`` and its prompt, ``(G,)``."""
    return torch.tensor(
        [kept_words(r, group.prompt, vocabulary=vocabulary) for r in group.rewrites]
    )


@torch.no_grad()
def draw_groups(
    generator: Generator, groups: Sequence[RewriteGroup]
) -> tuple[Tensor, list[int], list[list[int]]]:
    """The generator's drawings of every distinct rewrite of each group, all in one batch,
    every rewrite of a group from the group's noise: images ``(M, 3, H, W)`` on the CPU, the
    group each image is of, and per group the image index of each of its rewrites."""
    config = generator.config
    f = config.vae.spatial_factor
    shape = (1, config.vae.latent_channels, config.height // f, config.width // f)
    prompts: list[str] = []
    owners: list[int] = []
    noises: list[Tensor] = []
    slots: list[list[int]] = []
    for g, group in enumerate(groups):
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(group.seed))
        index: dict[str, int] = {}
        for rewrite in group.rewrites:
            if rewrite not in index:
                index[rewrite] = len(prompts)
                prompts.append(rewrite)
                owners.append(g)
                noises.append(noise)
        slots.append([index[r] for r in group.rewrites])
    images = generator.generate(prompts, noise=torch.cat(noises)).cpu()  # (M, 3, H, W)
    return images, owners, slots


def _render_generator(generator: Path, render_steps: int | None) -> Generator:
    loaded = Generator.load(generator)
    if render_steps is not None:
        config = replace(loaded.config, sampler=replace(loaded.config.sampler, steps=render_steps))
        loaded = Generator(config, loaded.transformer, loaded.vae, loaded.encoder)
    return loaded


def world_rewrite_reward(
    generator: Path,
    reward: Path,
    *,
    render_steps: int | None = None,
    keep_weight: float = 0.5,
    world: WorldDefinition | None = None,
) -> WorldRewriteReward:
    """The reward-model judge from the round base's generator and reward directories, the
    generator drawing with ``render_steps`` sampler steps (None: its own); the users' words of
    ``world`` (None: the default world) left aside by its text term."""
    return WorldRewriteReward(
        generator=_render_generator(generator, render_steps),
        model=load_world_reward(reward),
        keep_weight=keep_weight,
        vocabulary=world_vocabulary(world),
    )


def evaluator_rewrite_reward(
    generator: Path,
    scenes: Mapping[str, BenchmarkCase],
    *,
    render_steps: int | None = None,
    keep_weight: float = 0.5,
    world: WorldDefinition | None = None,
) -> EvaluatorRewriteReward:
    """The evaluator judge of the stage prompts' ``scenes`` from the round base's generator
    directory, the generator drawing with ``render_steps`` sampler steps (None: its own); the
    users' words of ``world`` (None: the default world) left aside by its text term."""
    from flywheel.world.evaluator import load_evaluator

    return EvaluatorRewriteReward(
        generator=_render_generator(generator, render_steps),
        evaluator=load_evaluator(),
        scenes=dict(scenes),
        keep_weight=keep_weight,
        vocabulary=world_vocabulary(world),
    )


RewriteJudge = WorldRewriteReward | EvaluatorRewriteReward


@dataclass(kw_only=True, slots=True)
class GRPOStageInputs:
    """What the GRPO stage needs from the cycle besides the round's pairs."""

    generator: Path
    """The round base's generator directory (frozen: it draws the rewrites)."""
    reward: Path
    """The round base's reward model directory (the ``world-reward`` judge's model)."""
    gate_prompts: Sequence[str]
    """What the gate judges the round on — the prompts and references of its held-out slice,
    and the regression suite's and scenarios' prompts — held out of the stage."""
    gate_judges: frozenset[str] = field(default_factory=frozenset)
    """The judges of the gate's verdicts the enhancer can change (:func:`enhancer_gate_judges`):
    the stage refuses a reward among them (:func:`check_gate_judges`)."""


@dataclass(kw_only=True, slots=True)
class GRPOStage:
    """A finished GRPO stage: its training call and its figures."""

    result: TrainResult
    run: Path
    """The stage's run directory (its checkpoints and ``metrics.jsonl``)."""
    reward: RewriteJudge
    """What judged the rewrites."""
    figures: dict[str, object]
    """What the round's summary records of it (see :func:`grpo_figures`)."""


def enhancer_grpo_round(
    prompts: Path, *, enhancer: Path, sft_run: Path, config: PromptEnhancerTrackConfig
) -> PEGRPOConfig:
    """The GRPO stage's config: the enhancer ``enhancer`` with the SFT run's weights (also the
    frozen reference), on the (prompt, intended caption) pairs file ``prompts``."""
    config.validate()
    steps = config.grpo_steps
    return PEGRPOConfig(
        model=enhancer,
        init_from=sft_run,
        data=PromptPairsConfig(pairs=prompts),
        system_prompt=DEBUG_SYSTEM_PROMPT,
        grpo=RewritePolicyConfig(
            prompts_per_step=config.grpo_prompts_per_step,
            group_size=config.grpo_group_size,
            max_new_tokens=config.grpo_max_new_tokens,
            temperature=config.grpo_temperature,
            updates_per_rollout=config.grpo_updates_per_rollout,
            kl_coef=config.grpo_kl,
        ),
        loop=LoopConfig(
            optimizer=OptimizerConfig(lr=config.grpo_lr, warmup_steps=max(0, min(2, steps - 1))),
            max_steps=steps,
            seed=config.seed,
            checkpoint_every=max(1, config.grpo_updates_per_rollout),
            keep_checkpoints=1,
            log_every=max(1, steps),
        ),
    )


def grpo_figures(
    run: Path, *, reward: str, prompts: int, held_out: int, window: int = 4
) -> dict[str, object]:
    """The GRPO stage's figures from its metrics: the reward's name, steps, the mean reward of
    the first and last ``window`` steps and per step (``rewards``), the prompts trained on and
    the gate prompts held out."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rewards = [float(r["reward_mean"]) for r in rows if "reward_mean" in r]
    return {
        "reward": reward,
        "rewards": [round(r, 4) for r in rewards],
        "reward_first": fmean(rewards[:window]) if rewards else None,
        "reward_last": fmean(rewards[-window:]) if rewards else None,
        "steps": len(rewards),
        "prompts": prompts,
        "gate_prompts_held_out": held_out,
    }


def enhancer_grpo_stage(
    pairs: Sequence[Pair],
    *,
    enhancer: Path,
    sft_run: Path,
    out: Path,
    config: PromptEnhancerTrackConfig,
    inputs: GRPOStageInputs,
    progress: bool = False,
    world: WorldDefinition | None = None,
) -> GRPOStage | None:
    """GRPO of the SFT'd enhancer (``enhancer`` with ``sft_run``'s weights) on the round's
    failing concepts (read from ``pairs``), rewarded by ``config.grpo_reward``'s judge; its run
    under ``out/grpo``, resumed from its checkpoints. None: no prompt is left once the gate's
    are held out. Raises ``ValueError`` when the reward is one of ``inputs.gate_judges`` or a
    stage prompt is one of ``inputs.gate_prompts``. The users' words are those of ``world``
    (the base's; None: the default world)."""
    judge = EVALUATOR_NAME if config.grpo_reward == "evaluator" else WORLD_REWARD_NAME
    check_gate_judges(judge, inputs.gate_judges)
    prompts_file = out / "grpo_prompts.jsonl"
    cases = grpo_cases(
        pair_concepts(pairs, world=world), config, gate_prompts=inputs.gate_prompts, world=world
    )
    if prompts_file.is_file():
        prompts = read_pairs(prompts_file)
        check_held_out(prompts, gate_prompts=inputs.gate_prompts)
        if prompts != [pair for pair, _ in cases]:
            raise ValueError(f"{prompts_file} is not the stage's prompts for its gate and config")
    else:
        prompts = [pair for pair, _ in cases]
        if not prompts:
            return None
        write_pairs(prompts_file, prompts)
    grpo = enhancer_grpo_round(prompts_file, enhancer=enhancer, sft_run=sft_run, config=config)
    grpo.validate()
    run = out / "grpo"
    run.mkdir(parents=True, exist_ok=True)
    scorer: RewriteJudge
    if config.grpo_reward == "evaluator":
        scorer = evaluator_rewrite_reward(
            inputs.generator,
            {pair[0]: case for pair, case in cases},
            render_steps=config.grpo_render_steps,
            keep_weight=config.grpo_keep_weight,
            world=world,
        )
    else:
        scorer = world_rewrite_reward(
            inputs.generator,
            inputs.reward,
            render_steps=config.grpo_render_steps,
            keep_weight=config.grpo_keep_weight,
            world=world,
        )
    result = run_loop(
        build_pe_grpo(grpo, run, scorer=scorer),
        loop=grpo.loop,
        identity=identity(grpo),
        out=run,
        name="prompt-enhancer GRPO",
        progress=progress,
        started=time.monotonic(),
    )
    figures = grpo_figures(
        run,
        reward=scorer.name,
        prompts=len(prompts),
        held_out=len({same_prompt_key(p) for p in inputs.gate_prompts}),
    )
    return GRPOStage(result=result, run=run, reward=scorer, figures=figures)
