"""The cycle's configuration: one pydantic model, nested per track, whose ``dry_run`` the CLI
maps onto (a JSON file of it: ``flywheel cycle --config FILE``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoundSection(_Section):
    """What every track's round section holds besides its own fields."""

    steps: int = Field(default=1, ge=1)
    """The round's optimizer steps (its manifest's ``budget``; each track sets its default)."""
    settings: dict[str, JsonValue] = Field(default_factory=dict)
    """The recipe's settings, written into the round's manifest (``settings``) for the
    launcher: the in-process recipes' keys (``lr``, ``batch_size``, ``warmup_steps``, …; see
    the README's Launchers section), or whatever a team's trainer reads. ``seed`` is the
    cycle's."""


class PromptEnhancerRoundConfig(RoundSection):
    """The prompt-enhancer track's round."""

    steps: int = Field(default=200, ge=1)
    """PE SFT steps."""
    pairs_per_concept: int = Field(default=200, ge=1)
    """Reverse-engineered pairs per failing concept (the embedded world's pair builder)."""
    grpo_steps: int = Field(default=0, ge=0)
    """The embedded world's GRPO steps after the SFT (the cycle runs the stage when > 0),
    rewarded by the world's evaluator's verdicts on the frozen base generator's drawings of
    the rewrites — not the reward model, which judges the enhancer's gate — on prompts none of
    which the gate judges (0, the default: SFT only; no gain measured on held-out prompts)."""
    grpo_prompts_per_concept: int = Field(default=6, ge=1)
    """Users'-words prompts of new scenes per failing concept for the world's GRPO (none the
    gate judges)."""
    grpo_group_size: int = Field(default=8, ge=2)
    """Rewrites sampled per prompt in the world's GRPO."""


class GapRoundConfig(RoundSection):
    """The pretraining-gap track's round."""

    steps: int = Field(default=600, ge=1)
    """Continued-pretraining steps."""
    vae_steps: int = Field(default=300, ge=0)
    """VAE fine-tuning steps before it (0: none; the embedded world's recipe)."""
    replay: int = Field(default=1200, ge=1)
    """Corpus items replayed with the augmentation batch (against forgetting)."""
    batch_size: int = Field(default=16, ge=1)


class RLRoundConfig(RoundSection):
    """The RL track's round."""

    @model_validator(mode="before")
    @classmethod
    def _drop_rendered_pairs(cls, data: Any) -> Any:
        """Configs stored before the recalibration learned from people's pairs carry
        ``pairs_per_category`` (the world's rendered comparisons, gone): read and ignored."""
        if isinstance(data, dict) and "pairs_per_category" in data:
            return {k: v for k, v in data.items() if k != "pairs_per_category"}
        return data

    steps: int = Field(default=15, ge=1)
    """Optimizer steps (Flow-GRPO in the embedded world, one rollout each, ~11 s on two
    cores; the recipe a team's launcher runs). 30 took 5.4 minutes of the demo and moved its
    RL slice no more than 15 do: the base cannot draw the counts and relations it fails."""
    recalibration_steps: int = Field(default=40, ge=0)
    """The embedded world's reward recalibration before its Flow-GRPO: Bradley-Terry steps on
    the routed cases' preference pairs (0: the round is rewarded by the shipped reward)."""
    group_size: int = Field(default=8, ge=2)
    """Images per prompt in a GRPO group."""
    prompts_per_step: int = Field(default=4, ge=1)


class RegressionConfig(_Section):
    """The regression suite every candidate is judged on, and how much it may drop."""

    seeds: int = Field(default=2, ge=1)
    """Noise seeds the suite is run with."""
    cases: int | None = Field(default=None, ge=1)
    """Cases per skill (None: all of them; the world's standard suite)."""
    tolerance: float = Field(default=0.02, ge=0.0, le=1.0)
    """The gate's "regression flat": the candidate's score may drop at most this much."""


class GateConfig(_Section):
    """What each track's routed cases hold out for the gate: cases no round trains on, only
    judged (base against candidate)."""

    share: float = Field(default=0.5, gt=0.0, lt=1.0)
    """Share of each track's routed cases held out (in the embedded world per failure theme;
    on a team's stack over the track's cases): a track's two cases or more give each side at
    least one."""
    extra_seeds: int = Field(default=2, ge=0)
    """Noise seeds, besides the slice's own, that the embedded world's gate judges every case
    at (fresh draws of the held-out prompts: a slice's ``n`` is its gate cases times
    ``1 + extra_seeds``). A team's stack judges its gate share at one seed."""


class WorldIndexConfig(_Section):
    """What the embedded world indexes and seeds attribution with (a team's stack reads its
    corpus and its reviewers' decisions instead)."""

    corpus: int = Field(default=1500, ge=10)
    """Corpus captions indexed for scarcity and the gap diagnosis."""
    pool: int = Field(default=2000, ge=10)
    """Pool captions indexed for retrieval."""
    labeled_per_track: int = Field(default=24, ge=2)
    """Seed labeled examples per track (the classifier's start)."""


_LEGACY = {
    "pe_steps": ("prompt_enhancer", "steps"),
    "pe_pairs_per_concept": ("prompt_enhancer", "pairs_per_concept"),
    "gap_steps": ("pretraining_gap", "steps"),
    "gap_vae_steps": ("pretraining_gap", "vae_steps"),
    "gap_replay": ("pretraining_gap", "replay"),
    "gap_batch_size": ("pretraining_gap", "batch_size"),
    "rl_steps": ("rl", "steps"),
    "rl_pairs_per_category": ("rl", "pairs_per_category"),  # dropped by RLRoundConfig
    "rl_group_size": ("rl", "group_size"),
    "rl_prompts_per_step": ("rl", "prompts_per_step"),
    "regression_seeds": ("regression", "seeds"),
    "regression_cases": ("regression", "cases"),
    "regression_tolerance": ("regression", "tolerance"),
    "corpus": ("world", "corpus"),
    "pool": ("world", "pool"),
    "labeled_per_track": ("world", "labeled_per_track"),
}
"""The flat fields of configs stored before the sections (cycle rows, config files) and the
section field each now is."""


class CycleConfig(BaseModel):
    """What one cycle does and how big its rounds are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dry_run: bool = False
    """Plan only: print what would happen, write nothing."""
    auto_approve: bool = False
    """Approve the final review without a human (the demo only; said so on screen)."""
    min_confidence: float = Field(default=0.6, ge=0.0, le=1.0)
    """Routes below this wait for human triage."""
    min_cases: int = Field(default=2, ge=1)
    """A track with fewer routed cases gets no round this cycle."""
    prompt_enhancer: PromptEnhancerRoundConfig = PromptEnhancerRoundConfig()
    pretraining_gap: GapRoundConfig = GapRoundConfig()
    rl: RLRoundConfig = RLRoundConfig()
    regression: RegressionConfig = RegressionConfig()
    gate: GateConfig = GateConfig()
    world: WorldIndexConfig = WorldIndexConfig()
    review_wait_seconds: int = Field(default=0, ge=0, le=7 * 86_400)
    """0: the flow ends when the cycle waits for its final review (the decision finishes
    the cycle on its own). Above 0: the flow run pauses (Prefect) for up to this long,
    holding the cycle lock, and the reviewer's decision resumes it."""
    seed: int = 0
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?|mps)$")
    """Where a project's models run during the cycle (the embedded world: always the CPU)."""

    def round_section(self, track: str) -> RoundSection:
        """The section of the track named ``track`` (a ``Track`` value: the sections are
        named after the tracks)."""
        section = getattr(self, track, None)
        if not isinstance(section, RoundSection):
            raise KeyError(f"no round section for track {track!r}")
        return section

    @model_validator(mode="before")
    @classmethod
    def _nest_legacy_fields(cls, data: Any) -> Any:
        """Read a config stored with the flat fields (``gap_steps``, ``regression_seeds``, …)
        into its sections."""
        if not isinstance(data, dict) or not any(key in data for key in _LEGACY):
            return data
        nested: dict[str, Any] = {k: v for k, v in data.items() if k not in _LEGACY}
        for key, (section, field) in _LEGACY.items():
            if key in data:
                current = nested.get(section)
                values = current.model_dump() if isinstance(current, BaseModel) else current
                nested[section] = {**(values or {}), field: data[key]}
        return nested
