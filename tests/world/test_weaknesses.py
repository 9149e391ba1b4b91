"""The probes behind `flywheel world weaknesses`: drawn apart from the suites, and a wrong
render is wrong in exactly what its skill asks for."""

from __future__ import annotations

import pytest

from flywheel.world.benchmark import Skill, suite
from flywheel.world.evaluation import score_case
from flywheel.world.scenes import render
from flywheel.world.weaknesses import PROBE_BAND, REWARD_SKILLS, probes, wrong_scene


@pytest.mark.parametrize("skill", REWARD_SKILLS)
def test_a_wrong_render_fails_only_its_skill(skill: Skill) -> None:
    for case in probes(skill, 4, band=PROBE_BAND + 10**8):
        right = score_case(case, render(case.spec, 128, 128))
        wrong = score_case(case, render(wrong_scene(case), 128, 128))
        assert right.passed
        assert not wrong.passed
        if skill in ("shape", "relation"):  # the objects are all there, in their colours
            assert all(e.passed for e in wrong.evaluation.elements if e.kind == "colour")


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
