"""The shipped world base (generator, reward model, prompt enhancer): made by the recipe, and
its known weaknesses fail where they are injected while their controls do better.

The margins are the measured ones with room (README, "The world's base model"); the
generations are seeded, so a run on one machine gives the same figures every time.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest

from flywheel.world.base_model import (
    BASE_ENHANCER,
    BASE_REWARD,
    load_world_enhancer,
    load_world_reward,
    world_base,
)
from flywheel.world.evaluation import BASE_MODEL
from flywheel.world.weaknesses import (
    RewardAgreement,
    WeaknessReport,
    measure_weaknesses,
    reward_agreement,
)
from model.pipeline import Generator

pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def report() -> WeaknessReport:
    generator = Generator.load(BASE_MODEL)
    enhancer = load_world_enhancer(BASE_ENHANCER)
    rare = world_base().rare_concepts()
    return measure_weaknesses(generator, enhancer=enhancer, rare=rare, per_concept=8)


@pytest.fixture(scope="module")
def agreement() -> RewardAgreement:
    return reward_agreement(load_world_reward(BASE_REWARD).score, per_skill=32)


def test_the_shipped_generator_is_the_recipe() -> None:
    recipe = world_base()
    config = Generator.load(BASE_MODEL).config
    assert config.transformer == recipe.transformer
    shipped_vae = asdict(config.vae)
    assert shipped_vae.pop("latents_mean") is not None
    assert shipped_vae.pop("latents_std") is not None
    expected_vae = asdict(recipe.vae)
    del expected_vae["latents_mean"], expected_vae["latents_std"]
    assert shipped_vae == expected_vae
    assert config.sampler == recipe.sampler
    assert (config.height, config.width) == (recipe.image_size, recipe.image_size)
    assert config.condition == "minilm"


def test_the_rare_colour_fails_where_the_common_ones_do_not(report: WeaknessReport) -> None:
    assert report.rare == ("purple",)
    assert report.rare_score <= 0.1
    assert report.common_score >= 0.3
    assert report.common_score - report.rare_score >= 0.25
    common = [score for name, score in report.colours.items() if name != "purple"]
    assert sum(score > report.rare_score for score in common) >= 5


def test_terse_prompts_are_not_expanded(report: WeaknessReport) -> None:
    assert report.enhancer_unchanged is not None
    assert report.enhancer_unchanged >= 0.95  # the base enhancer echoes terse prompts
    assert report.terse_prompt_score <= 0.15  # and the terse skill fails


def test_the_reward_sees_colour_and_prefers_more_copies(agreement: RewardAgreement) -> None:
    skills = agreement.skills
    assert skills["colour"] >= 0.9
    assert skills["count"] <= 0.3  # below chance: more copies than asked score higher
    assert skills["colour"] - skills["count"] >= 0.6
    assert skills["relation"] <= 0.6  # blind to places
