"""Reward recalibration from human labels: the world's reward, blind to counts, learns from
people's count preferences on some prompts and disagrees with them less on others, without
losing the colours it judged well; the exported directory loads as a reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flywheel.world.base_model import BASE_REWARD, load_world_reward
from flywheel.world.benchmark import BenchmarkCase, build_case
from flywheel.world.scenes import SceneSpec, render
from flywheel.world.weaknesses import (
    PROBE_BAND,
    NoRoomError,
    paired_probes,
    reward_agreement,
    wrong_scene,
)
from model.reward import AlignmentRewardConfig, alignment_reward_debug, build_alignment_reward
from training.checkpoint import load_model_weights
from training.data import Provenance, Sample, write_dataset
from training.loop import METRICS_FILE, LoopConfig, OptimizerConfig
from training.preference import PreferencePair, write_pairs
from training.recipes import reward_recalibration_debug
from training.reward_recalibration import (
    PREFERENCES_DIR,
    RewardRecalibrationConfig,
    export_recalibrated_reward,
    preference_agreement,
    trained_parameters,
)
from training.synthetic import SyntheticDataConfig, write_synthetic_dataset
from training.trainer import train

pytestmark = pytest.mark.usefixtures("offline")

TRAIN_BAND = PROBE_BAND + 2 * 10**8
"""The labelled pairs' seeds: apart from the probes' band (PROBE_BAND + 10**8), whose pairs
:func:`reward_agreement` holds out."""
TRAIN_PAIRS = 128
HELD_OUT_PAIRS = 64  # per skill
SOURCE = "simulated:count"


def _labelled_count_pairs(n: int) -> list[tuple[BenchmarkCase, SceneSpec]]:
    """``n`` count cases of the training band, each with the scene people reject: one copy
    too many (what the world's reward prefers)."""
    pairs: list[tuple[BenchmarkCase, SceneSpec]] = []
    k = 0
    while len(pairs) < n:
        case = build_case("count", k, band=TRAIN_BAND, case_id=f"labelled/count/{k}")
        k += 1
        try:
            pairs.append((case, wrong_scene(case)))
        except NoRoomError:
            continue
    return pairs


def _write_preferences(root: Path, pairs: list[tuple[BenchmarkCase, SceneSpec]]) -> None:
    """The pairs as a preference dataset (training.preference): the right render preferred."""
    (root / "images").mkdir(parents=True)
    samples: list[Sample] = []
    preferences: list[PreferencePair] = []
    for n, (case, wrong) in enumerate(pairs):
        for side, spec in (("chosen", case.spec), ("rejected", wrong)):
            image = f"images/{n:03d}-{side}.png"
            render(spec, 64, 64).save(root / image)
            samples.append(
                Sample(
                    id=f"{n:03d}-{side}",
                    image=image,
                    caption=case.prompt,
                    provenance=Provenance(
                        dataset="simulated-feedback", split="train", origin_uri=f"world:{case.id}"
                    ),
                )
            )
        preferences.append(
            PreferencePair(
                id=f"pair-{n:03d}",
                winner=f"{n:03d}-chosen",
                loser=f"{n:03d}-rejected",
                source=SOURCE,
            )
        )
    write_dataset(root, samples)
    write_pairs(root, preferences)


def test_recalibration_on_human_count_labels_lowers_held_out_disagreement(tmp_path: Path) -> None:
    labelled = _labelled_count_pairs(TRAIN_PAIRS)
    _write_preferences(tmp_path / "preferences", labelled)
    base = load_world_reward()
    before = reward_agreement(base.score, per_skill=HELD_OUT_PAIRS).skills
    on_labels_before = preference_agreement(base, tmp_path / "preferences")[SOURCE]

    config = RewardRecalibrationConfig(
        init_from=BASE_REWARD,
        preferences=tmp_path / "preferences",
        batch_size=16,
        loop=LoopConfig(
            optimizer=OptimizerConfig(lr=1e-2, warmup_steps=5),
            max_steps=60,
            checkpoint_every=60,
            keep_checkpoints=1,
            seed=0,
        ),
    )
    train(config, out=tmp_path / "run")
    exported = export_recalibrated_reward(tmp_path / "run", tmp_path / "reward", config)
    recalibrated = build_alignment_reward(
        AlignmentRewardConfig(architecture=f"local-dir:{exported}")
    )
    after = reward_agreement(recalibrated.score, per_skill=HELD_OUT_PAIRS).skills
    on_labels_after = preference_agreement(recalibrated, tmp_path / "preferences")[SOURCE]
    print(f"held-out agreement before {before}, after {after}")
    print(f"agreement on the labelled pairs {on_labels_before:.3f} -> {on_labels_after:.3f}")

    # The held-out probes answer other prompts than the labelled pairs.
    held_out_prompts = {c.prompt for c, _ in paired_probes("count", HELD_OUT_PAIRS)}
    assert held_out_prompts.isdisjoint(c.prompt for c, _ in labelled)
    # The bias: the world's reward prefers one copy too many (measured 0.19 agreement).
    assert before["count"] < 0.35
    # Disagreement with people on held-out count pairs falls (measured 0.81 -> 0.17).
    assert 1 - after["count"] < (1 - before["count"]) / 2
    assert after["count"] > 0.7
    assert on_labels_after > on_labels_before + 0.4
    # Colours, which people did not label and the reward judged well, hold (0.98 -> 1.00).
    assert before["colour"] > 0.9
    assert after["colour"] >= before["colour"] - 0.05

    rows = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    first, last = rows[:10], rows[-10:]
    assert sum(r["preference_loss"] for r in last) < sum(r["preference_loss"] for r in first)
    assert all(r["drift"] > 0 for r in rows[1:])


def test_only_the_towers_tops_train_and_the_temperature_never() -> None:
    reward = build_alignment_reward(alignment_reward_debug())
    assert set(trained_parameters(reward, 0)) == {
        "clip.visual.proj",
        "clip.visual.ln_post.weight",
        "clip.visual.ln_post.bias",
        "clip.text_projection",
        "clip.ln_final.weight",
        "clip.ln_final.bias",
    }
    frozen = {n for n, p in reward.named_parameters() if not p.requires_grad}
    assert "clip.token_embedding.weight" in frozen
    assert "clip.visual.conv1.weight" in frozen
    one = trained_parameters(reward, 1)  # the debug towers have one block each
    assert "clip.visual.transformer.resblocks.0.attn.in_proj_weight" in one
    assert "clip.transformer.resblocks.0.mlp.c_fc.weight" in one
    assert trained_parameters(reward, 5).keys() == one.keys()  # more blocks than there are
    everything = trained_parameters(reward, None)
    assert "clip.token_embedding.weight" in everything
    assert "clip.logit_scale" not in everything
    assert not reward.logit_scale.requires_grad


def test_config_is_validated(tmp_path: Path) -> None:
    config = reward_recalibration_debug()
    config.validate()
    with pytest.raises(ValueError, match="exactly one of preferences and synthetic"):
        RewardRecalibrationConfig().validate()
    with pytest.raises(ValueError, match="not a preference dataset"):
        RewardRecalibrationConfig(preferences=tmp_path).validate()
    with pytest.raises(ValueError, match="not a reward directory"):
        RewardRecalibrationConfig(synthetic=SyntheticDataConfig(), init_from=tmp_path).validate()
    for bad in ({"retain": -1.0}, {"anchor": float("nan")}, {"temperature": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RewardRecalibrationConfig(synthetic=SyntheticDataConfig(), **bad).validate()  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("recalibration") / "run"
    train(reward_recalibration_debug(), out=out)
    return out


def test_debug_recipe_learns_and_exports_a_loadable_reward(debug_run: Path, tmp_path: Path) -> None:
    config = reward_recalibration_debug()
    rows = [json.loads(line) for line in (debug_run / METRICS_FILE).read_text().splitlines()]
    first = sum(r["accuracy"] for r in rows[:10]) / 10
    last = sum(r["accuracy"] for r in rows[-10:]) / 10
    assert last > first + 0.1  # measured 0.58 -> 0.73
    exported = export_recalibrated_reward(debug_run, tmp_path / "reward", config)
    loaded = build_alignment_reward(AlignmentRewardConfig(architecture=f"local-dir:{exported}"))
    agreement = preference_agreement(loaded, debug_run / PREFERENCES_DIR)
    assert set(agreement) == {"synthetic:wrong-colour"}
    # The loaded reward is the trained one: same scores as the run's own weights.
    trained = build_alignment_reward(config.reward)
    trained.load_state_dict(load_model_weights(debug_run))
    images = torch.rand(2, 3, 32, 32)
    prompts = ["a red circle on a blue background", "a green square on a white background"]
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(images, prompts), trained.score(images, prompts))


def test_an_interrupted_recalibration_resumes_exactly(debug_run: Path, tmp_path: Path) -> None:
    config = reward_recalibration_debug()
    half = config.loop.max_steps // 2  # a checkpoint step of the recipe
    assert train(config, out=tmp_path, max_steps=half).step == half
    assert train(config, out=tmp_path).resumed_from == half
    resumed, straight = load_model_weights(tmp_path), load_model_weights(debug_run)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / METRICS_FILE).read_text().splitlines()
    ]
    expected = [
        json.loads(line)["loss"] for line in (debug_run / METRICS_FILE).read_text().splitlines()
    ]
    assert losses == expected


def test_pairs_without_a_prompt_to_score_are_refused(tmp_path: Path) -> None:
    samples = write_synthetic_dataset(tmp_path, SyntheticDataConfig(images=1, editing_images=1))
    edit = next(s for s in samples if s.is_editing)
    twin = edit.model_copy(update={"id": "edit-twin", "image": edit.input_images[0]})
    write_dataset(tmp_path, [*samples, twin])
    write_pairs(tmp_path, [PreferencePair(id="p", winner=edit.id, loser="edit-twin")])
    config = RewardRecalibrationConfig(preferences=tmp_path, batch_size=1)
    with pytest.raises(ValueError, match="not a captioned text-to-image pair"):
        train(config, out=tmp_path / "run")
