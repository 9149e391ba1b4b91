"""The cycle's configuration: one pydantic model whose ``dry_run`` the CLI maps onto."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # the world's track configs: imported only when the world's steps ask
    from flywheel.tracks.pretraining_gap import GapTrackConfig
    from flywheel.tracks.prompt_enhancer import PromptEnhancerTrackConfig
    from flywheel.tracks.rl import RLTrackConfig


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
    labeled_per_track: int = Field(default=24, ge=2)
    """Seed labeled examples per track (the classifier's start)."""
    corpus: int = Field(default=1500, ge=10)
    """Corpus captions indexed for scarcity and the gap diagnosis."""
    pool: int = Field(default=2000, ge=10)
    """Pool captions indexed for retrieval."""
    pe_steps: int = Field(default=200, ge=1)
    """PE SFT steps of the prompt-enhancer round."""
    pe_pairs_per_concept: int = Field(default=200, ge=1)
    """Reverse-engineered pairs per failing concept."""
    gap_steps: int = Field(default=600, ge=1)
    """Continued-pretraining steps of the gap round."""
    gap_vae_steps: int = Field(default=300, ge=0)
    """VAE fine-tuning steps before it (0: none)."""
    gap_replay: int = Field(default=1200, ge=1)
    """Corpus scenes replayed in the gap round."""
    gap_batch_size: int = Field(default=16, ge=1)
    rl_steps: int = Field(default=6, ge=1)
    """Flow-GRPO steps of the RL round."""
    rl_pairs_per_category: int = Field(default=32, ge=1)
    """Labelled comparisons per category for the reward recalibration."""
    rl_group_size: int = Field(default=8, ge=2)
    rl_prompts_per_step: int = Field(default=4, ge=1)
    regression_seeds: int = Field(default=2, ge=1)
    """Noise seeds the regression suite (the world's standard suite) is run with."""
    regression_cases: int | None = Field(default=None, ge=1)
    """Cases per skill of the regression suite (None: all of them)."""
    regression_tolerance: float = Field(default=0.02, ge=0.0, le=1.0)
    """The gate's "regression flat": the candidate's score may drop at most this much."""
    review_wait_seconds: int = Field(default=0, ge=0, le=7 * 86_400)
    """0: the flow ends when the cycle waits for its final review (the decision finishes
    the cycle on its own). Above 0: the flow run pauses (Prefect) for up to this long,
    holding the cycle lock, and the reviewer's decision resumes it."""
    seed: int = 0
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?|mps)$")
    """Where a project's models run during the cycle (the embedded world: always the CPU)."""

    def prompt_enhancer(self) -> PromptEnhancerTrackConfig:
        from flywheel.tracks.prompt_enhancer import PromptEnhancerTrackConfig

        return PromptEnhancerTrackConfig(
            steps=self.pe_steps, pairs_per_concept=self.pe_pairs_per_concept, seed=self.seed
        )

    def pretraining_gap(self) -> GapTrackConfig:
        from flywheel.tracks.pretraining_gap import GapTrackConfig

        return GapTrackConfig(
            steps=self.gap_steps,
            vae_steps=self.gap_vae_steps,
            replay=self.gap_replay,
            batch_size=self.gap_batch_size,
            seed=self.seed,
        )

    def rl(self) -> RLTrackConfig:
        from flywheel.tracks.rl import RLTrackConfig

        return RLTrackConfig(
            steps=self.rl_steps,
            pairs_per_category=self.rl_pairs_per_category,
            group_size=self.rl_group_size,
            prompts_per_step=self.rl_prompts_per_step,
            seed=self.seed,
        )
