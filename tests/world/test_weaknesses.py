"""The probes behind `flywheel world weaknesses`: drawn apart from the suites, and a wrong
render is wrong in exactly what its skill asks for."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor
from typer.testing import CliRunner

from flywheel.cli.main import app
from flywheel.world.base_model import shipped_base_of
from flywheel.world.benchmark import Skill, suite
from flywheel.world.evaluation import score_case
from flywheel.world.scenes import COLOURS, render
from flywheel.world.weaknesses import (
    PROBE_BAND,
    REWARD_SKILLS,
    NoRoomError,
    paired_probes,
    probes,
    reward_agreement,
    wrong_scene,
)
from model.reward import RewardFn


@pytest.mark.parametrize("skill", REWARD_SKILLS)
def test_a_wrong_render_fails_only_its_skill(skill: Skill) -> None:
    for case, wrong_spec in paired_probes(skill, 6):
        right = score_case(case, render(case.spec, 128, 128))
        wrong = score_case(case, render(wrong_spec, 128, 128))
        assert right.passed
        assert not wrong.passed
        if skill in ("shape", "relation"):  # the objects are all there, in their colours
            assert all(e.passed for e in wrong.evaluation.elements if e.kind == "colour")
        if skill == "count":  # one copy more, of the same kind and size
            assert len(wrong_spec.objects) == len(case.spec.objects) + 1
            assert len({(o.shape, o.colour, o.size) for o in wrong_spec.objects}) == 1


def test_a_full_canvas_has_no_count_pair() -> None:
    crowded = [case for case, _ in paired_probes("count", 16)]
    drawn = probes("count", len(crowded) + 8, band=PROBE_BAND + 10**8)
    skipped = [case for case in drawn if case.id not in {c.id for c in crowded}]
    assert skipped  # some three-large-copies canvases have no room
    with pytest.raises(NoRoomError):
        wrong_scene(skipped[0])


def test_probes_are_new_to_the_suites() -> None:
    seeds = {case.seed for name in ("standard", "regression") for case in suite(name)}
    drawn = [
        case.seed
        for skill in ("shape", "terse", *REWARD_SKILLS)
        for case in probes(skill, 8, band=PROBE_BAND)
    ]
    assert not seeds & set(drawn)
    assert all(seed >= PROBE_BAND for seed in drawn)


def test_only_the_paired_skills_have_wrong_scenes() -> None:
    case = probes("terse", 1, band=PROBE_BAND)[0]
    with pytest.raises(ValueError, match="no wrong image for a 'terse' case"):
        wrong_scene(case)


def test_the_shade_agreement_says_which_render_a_reward_prefers() -> None:
    # A reward that scores how close the image's mean is to the shade prefers the shade
    # (agreement 0); one that scores closeness to the palette's yellow prefers it (1).
    shade = (245, 150, 30)

    def closeness(target: tuple[int, int, int]) -> RewardFn:
        rgb = torch.tensor(target, dtype=torch.float32) / 255  # (3,)

        def reward(images: Tensor, prompts: Sequence[str]) -> Tensor:
            del prompts
            pixels = images.flatten(2)  # (B, 3, H*W)
            dark = (pixels - rgb[None, :, None]).abs().sum(dim=1)  # (B, H*W)
            return -dark.min(dim=1).values  # the pixel nearest the target

        return reward

    for target, expected in ((shade, 0.0), (COLOURS["yellow"], 1.0)):
        agreement = reward_agreement(closeness(target), per_skill=4, shades={"yellow": shade})
        assert agreement.shades == {"yellow": expected}


def test_the_weaknesses_cli_measures_the_rare_concepts_of_the_model_s_world() -> None:
    """The other world's shipped base: its rare colour and shape unless --rare says others."""
    other = shipped_base_of("other")
    assert other is not None
    args = ["world", "weaknesses", "--model", str(other.generator), "--reward", str(other.reward)]
    args += ["--enhancer", str(other.enhancer), "--per-concept", "1", "--per-skill", "1", "--json"]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["generator"]["rare"] == ["green", "star"]
    result = runner.invoke(app, [*args, "--rare", "purple"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["generator"]["rare"] == ["purple"]
