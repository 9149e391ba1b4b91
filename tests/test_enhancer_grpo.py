"""The prompt enhancer's GRPO stage of the world's enhancer round (after its SFT): rewarded by
a judge of the frozen base generator's drawings of the rewrites — the world's evaluator (the
cycle's) or its reward model — on prompts of new scenes that the gate never judges, and never
by a judge of the gate's verdicts on the enhancer (its cost in the cycle's plan too)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

import pytest
import torch

from flywheel.demo import FEEDBACK_BAND
from flywheel.tracks.routed import same_prompt_key
from flywheel.world.base_model import BASE_ENHANCER, BASE_REWARD, load_world_reward
from flywheel.world.benchmark import build_case, suite
from flywheel.world.evaluation import BASE_MODEL
from flywheel.world.evaluator import Evaluator, load_evaluator
from flywheel.world.loop.plan import SECONDS_PER_STEP, enhancer_round_plan
from flywheel.world.loop.prompt_enhancer import (
    EVALUATOR_NAME,
    WORLD_REWARD_NAME,
    EvaluatorRewriteReward,
    GRPOStageInputs,
    Pair,
    PromptEnhancerTrackConfig,
    WorldRewriteReward,
    check_gate_judges,
    check_grpo_seeds,
    enhancer_gate_judges,
    enhancer_grpo_round,
    enhancer_grpo_stage,
    enhancer_pairs,
    evaluator_rewrite_reward,
    failing_concepts,
    grpo_cases,
    grpo_prompts,
    kept_words,
    world_rewrite_reward,
)
from flywheel.world.loop.rounds import RoundOutput, run_enhancer_round
from flywheel.world.loop.slices import SliceCase, SliceJudges
from flywheel.world.scenes import captions
from flywheel.world.vocabulary import has_user_words, to_user_words
from model.reward import AlignmentReward
from training.pe_grpo import RewriteGroup, sample_rollout
from training.pe_sft import load_causal_lm, read_pairs, write_pairs

# A half-trained enhancer: SFT on pairs whose target is the captions' word half the time and
# the user's word the other half, so a group of rewrites holds both and GRPO has a signal.
TINY = PromptEnhancerTrackConfig(
    pairs_per_concept=24,
    steps=30,
    grpo_steps=12,
    grpo_prompts_per_concept=6,
    grpo_render_steps=8,
    grpo_lr=5e-4,
    grpo_kl=0.05,
    grpo_reward="world-reward",
    seed=1,
)
CONCEPTS = ["yellow"]  # the base draws "yellow" yellow, "golden" and "lemon" mostly not


def metrics(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def gate_slice(count: int) -> list[SliceCase]:
    """The enhancer's gate slice as the demo's cycle routes it: the app users' terse prompts of
    colour scenes, most in their own colour words (the demo's seed band)."""
    rng = random.Random(0)
    cases: list[SliceCase] = []
    k = 0
    while len(cases) < count:
        case = build_case("colour", k, band=FEEDBACK_BAND, case_id=f"fb/{k}")
        k += 1
        terse = captions(case.spec).terse
        worded = to_user_words(terse, rng)
        if has_user_words(worded):
            cases.append(SliceCase(case_id=k, prompt=worded, reference=terse, scene=case))
    return cases


@dataclass(frozen=True, slots=True)
class TinyRound:
    output: RoundOutput
    out: Path
    pairs: list[Pair]
    inputs: GRPOStageInputs


@pytest.fixture(scope="module")
def tiny_round(tmp_path_factory: pytest.TempPathFactory) -> TinyRound:
    out = tmp_path_factory.mktemp("pe")
    worded = [p for p in enhancer_pairs(CONCEPTS, TINY) if p[0] != p[1]]
    pairs = worded + [(user, user) for user, _ in worded]
    gate = [c.prompt for c in gate_slice(12)]
    inputs = GRPOStageInputs(generator=BASE_MODEL, reward=BASE_REWARD, gate_prompts=gate)
    output = run_enhancer_round(pairs, enhancer=BASE_ENHANCER, out=out, config=TINY, grpo=inputs)
    return TinyRound(output=output, out=out, pairs=pairs, inputs=inputs)


def _sampled_reward(run: Path, prompts: list[Pair], scorer: WorldRewriteReward) -> float:
    """Mean reward of a group of rewrites of each prompt sampled by the enhancer of ``run``
    (the same sampling and noise seeds for every run: the comparison is paired)."""
    config = enhancer_grpo_round(Path("-"), enhancer=BASE_ENHANCER, sft_run=run, config=TINY)
    policy, tokenizer = load_causal_lm(BASE_ENHANCER, init_from=run, device="cpu", trainable=False)
    groups = sample_rollout(
        policy,
        policy,
        tokenizer,
        None,
        prompts,
        config=config,
        generator=torch.Generator().manual_seed(0),
        scorer=scorer,
    )
    return fmean(float(g["rewards"].mean()) for g in groups)


def test_the_grpo_stage_raises_the_world_reward_of_rewrites_of_held_out_prompts(
    tiny_round: TinyRound,
) -> None:
    output, out = tiny_round.output, tiny_round.out
    summary = output.summary()["grpo"]
    assert isinstance(summary, dict)
    assert summary["steps"] == len(metrics(out / "grpo")) == TINY.grpo_steps
    assert summary["reward"] == WORLD_REWARD_NAME
    assert summary["prompts"] == len(read_pairs(out / "grpo_prompts.jsonl"))
    assert output.candidate == out / "enhancer"
    assert (output.candidate / "model.safetensors").is_file()
    # Prompts of the stage's kind that it did not train on (nor does the gate judge them):
    # the enhancer's rewrites of them score higher after the stage than after the SFT alone.
    trained = [p for p, _ in read_pairs(out / "grpo_prompts.jsonl")]
    held_out = grpo_prompts(
        CONCEPTS, TINY, gate_prompts=[*trained, *tiny_round.inputs.gate_prompts]
    )
    assert len(held_out) >= 3
    scorer = world_rewrite_reward(
        BASE_MODEL, BASE_REWARD, render_steps=TINY.grpo_render_steps, keep_weight=0.5
    )
    before = _sampled_reward(out / "run", held_out, scorer)
    after = _sampled_reward(out / "grpo", held_out, scorer)
    assert after > before + 0.05, (before, after)


def test_the_grpo_prompts_are_disjoint_from_the_gate_prompts_of_the_slice(
    tiny_round: TinyRound,
) -> None:
    trained = {same_prompt_key(p) for p, _ in read_pairs(tiny_round.out / "grpo_prompts.jsonl")}
    assert trained
    assert not trained & {same_prompt_key(p) for p in tiny_round.inputs.gate_prompts}
    # Built the way the cycle builds both: the slice's cases, their failing concepts, the
    # stage's prompts with the slice's held out. Without holding them out, prompts would
    # have been shared (the terse prompts of one object repeat across scenes).
    cases = gate_slice(24)
    concepts = failing_concepts(cases)
    config = PromptEnhancerTrackConfig(grpo_prompts_per_concept=8)
    held = grpo_prompts(concepts, config, gate_prompts=[c.prompt for c in cases])
    free = grpo_prompts(concepts, config, gate_prompts=[])
    keys = {same_prompt_key(c.prompt) for c in cases}
    assert held
    assert not {same_prompt_key(p) for p, _ in held} & keys
    assert {same_prompt_key(p) for p, _ in free} & keys
    assert all(has_user_words(p) and not has_user_words(t) for p, t in held)
    # Their scenes come from a band no suite, probe or slice case draws from.
    with pytest.raises(ValueError, match="drawn elsewhere"):
        check_grpo_seeds([suite("regression")[0].seed])
    with pytest.raises(ValueError, match="drawn elsewhere"):
        check_grpo_seeds([c.scene.seed for c in cases if c.scene is not None][:1])


def test_the_grpo_reward_is_the_world_reward_model_not_the_gates_evaluator(
    tiny_round: TinyRound,
) -> None:
    # The stage again on its finished run: it resumes at its last step, trains nothing, and
    # names what judged its rewrites.
    stage = enhancer_grpo_stage(
        tiny_round.pairs,
        enhancer=BASE_ENHANCER,
        sft_run=tiny_round.out / "run",
        out=tiny_round.out,
        config=TINY,
        inputs=tiny_round.inputs,
    )
    assert stage is not None
    assert (stage.result.resumed_from, stage.result.losses) == (TINY.grpo_steps, [])
    assert stage.figures["reward"] == WORLD_REWARD_NAME == stage.reward.name
    assert isinstance(stage.reward, WorldRewriteReward)
    assert isinstance(stage.reward.model, AlignmentReward)
    # The gate's judges, built as the cycle's evaluation builds them: other objects.
    judges = SliceJudges(evaluator=load_evaluator(), reward=load_world_reward(BASE_REWARD))
    gate_judge: object = judges.evaluator
    assert not isinstance(stage.reward.model, Evaluator)
    assert stage.reward.model is not gate_judge
    assert stage.reward is not gate_judge
    # The text term holds the user's other words; colour words are the image term's.
    assert kept_words("blue circle", "navy circle") == kept_words("circle", "navy circle") == 1.0
    assert kept_words("blue", "navy circle") == 0.0


# ---- the cycle's judge and checks (no training) -------------------------------------------------


def test_the_stage_refuses_a_reward_that_judges_the_enhancers_gate(tmp_path: Path) -> None:
    # The cycle's enhancer gate: app prompts without a scene, regenerated through the enhancer
    # and judged by the reward model's rank; cases with their scene are drawn without it.
    app = [SliceCase(case_id=1, prompt="a navy circle", reference="a blue circle")]
    probes = gate_slice(2)  # with their scene
    assert enhancer_gate_judges(app + probes) == {WORLD_REWARD_NAME}
    assert enhancer_gate_judges(probes) == set()
    check_gate_judges(EVALUATOR_NAME, enhancer_gate_judges(app))
    with pytest.raises(ValueError, match="also judges the enhancer's gate"):
        check_gate_judges(WORLD_REWARD_NAME, enhancer_gate_judges(app))
    # The stage checks it before anything else: nothing is written.
    pairs = [("a navy circle", "a blue circle")]
    inputs = GRPOStageInputs(
        generator=BASE_MODEL,
        reward=BASE_REWARD,
        gate_prompts=[c.prompt for c in app],
        gate_judges=frozenset(enhancer_gate_judges(app)),
    )
    with pytest.raises(ValueError, match="also judges the enhancer's gate"):
        enhancer_grpo_stage(
            pairs,
            enhancer=BASE_ENHANCER,
            sft_run=tmp_path / "run",
            out=tmp_path,
            config=PromptEnhancerTrackConfig(grpo_steps=2, grpo_reward="world-reward"),
            inputs=inputs,
        )
    assert list(tmp_path.iterdir()) == []
    assert PromptEnhancerTrackConfig().grpo_reward == "evaluator"


def test_the_stage_refuses_prompts_the_gate_judges_even_on_resume(tmp_path: Path) -> None:
    config = PromptEnhancerTrackConfig(grpo_steps=2, grpo_prompts_per_concept=3)
    pairs = [("a navy circle", "a blue circle")]
    cases = grpo_cases(["blue"], config, gate_prompts=[])
    assert cases
    for (prompt, intended), case in cases:  # each prompt with the scene it was made from
        assert captions(case.spec).terse == intended
        assert has_user_words(prompt)
    # A prompts file (a resumed stage's) holding a prompt the gate now judges.
    write_pairs(tmp_path / "grpo_prompts.jsonl", [pair for pair, _ in cases])
    gate = [cases[0][0][0].upper()]  # the same prompt (same_prompt_key)
    inputs = GRPOStageInputs(generator=BASE_MODEL, reward=BASE_REWARD, gate_prompts=gate)
    with pytest.raises(ValueError, match="GRPO prompts the gate judges"):
        enhancer_grpo_stage(
            pairs,
            enhancer=BASE_ENHANCER,
            sft_run=tmp_path / "run",
            out=tmp_path,
            config=config,
            inputs=inputs,
        )
    assert not (tmp_path / "grpo").exists()
    # Drawn afresh, the gate's prompt is left out.
    held = grpo_cases(["blue"], config, gate_prompts=gate)
    assert same_prompt_key(gate[0]) not in {same_prompt_key(p) for (p, _), _ in held}


def test_the_evaluator_judge_scores_each_rewrite_against_its_prompts_scene() -> None:
    config = PromptEnhancerTrackConfig(grpo_prompts_per_concept=2, grpo_render_steps=8)
    cases = grpo_cases(["yellow"], config, gate_prompts=[])
    scorer = evaluator_rewrite_reward(
        BASE_MODEL,
        {pair[0]: case for pair, case in cases},
        render_steps=config.grpo_render_steps,
        keep_weight=0.0,
    )
    assert isinstance(scorer, EvaluatorRewriteReward)
    assert scorer.name == EVALUATOR_NAME
    groups = [
        RewriteGroup(
            prompt=prompt,
            target=intended,
            rewrites=(intended, intended.replace("yellow", "blue"), intended),
            seed=seed,
        )
        for (prompt, intended), _ in cases
        for seed in (1, 2, 3)
    ]
    rewards = scorer(groups)
    assert [r.shape for r in rewards] == [(3,)] * len(groups)
    assert all(float(r[0]) == float(r[2]) for r in rewards)  # one noise a group
    assert all(0.0 <= float(x) <= 1.0 for r in rewards for x in r)
    # The intended colour is drawn right more often than another one.
    right = fmean(float(r[0]) for r in rewards)
    wrong = fmean(float(r[1]) for r in rewards)
    assert right > wrong, (right, wrong)
    with pytest.raises(KeyError, match="no scene"):
        scorer(
            [RewriteGroup(prompt="a lemon star", target="a yellow star", rewrites=("x",), seed=0)]
        )


def test_the_plans_estimate_of_the_enhancer_round_grows_with_its_grpo_steps() -> None:
    sft_only = enhancer_round_plan(PromptEnhancerTrackConfig(steps=200))
    assert sft_only.steps == {"pe_sft": 200}
    assert sft_only.estimated_seconds == pytest.approx(200 * SECONDS_PER_STEP["pe_sft"])
    estimates = []
    for grpo_steps in (4, 8):
        plan = enhancer_round_plan(PromptEnhancerTrackConfig(steps=200, grpo_steps=grpo_steps))
        assert plan.steps == {"pe_sft": 200, "pe_grpo": grpo_steps}
        assert plan.estimated_seconds is not None
        estimates.append(plan.estimated_seconds)
    assert sft_only.estimated_seconds is not None
    assert sft_only.estimated_seconds < estimates[0] < estimates[1]
    assert estimates[1] - sft_only.estimated_seconds == pytest.approx(
        8 * SECONDS_PER_STEP["pe_grpo"]
    )  # at the default rollout: the measured step
    bigger = enhancer_round_plan(
        PromptEnhancerTrackConfig(steps=200, grpo_steps=8, grpo_group_size=16)
    )
    assert bigger.estimated_seconds is not None
    assert bigger.estimated_seconds > estimates[1]  # twice the drawings a step
