"""Contrastive training of the alignment reward: it learns, repeats are positives, and the
exported open_clip directory loads back as the same reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.reward import AlignmentRewardConfig, alignment_reward_debug, build_alignment_reward
from training.alignment import (
    DATASET_DIR,
    AlignmentTrainConfig,
    alignment_step,
    export_alignment_weights,
    load_captioned,
)
from training.checkpoint import CheckpointError, load_model_weights
from training.recipes import alignment_debug
from training.trainer import train

pytestmark = pytest.mark.usefixtures("offline")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("alignment")
    train(alignment_debug(), out=out)
    return out


def _metrics(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_contrastive_training_learns(run: Path) -> None:
    rows = _metrics(run)
    first, last = rows[:10], rows[-10:]
    assert sum(r["loss"] for r in last) < 0.5 * sum(r["loss"] for r in first)
    accuracy_first = sum(r["accuracy"] for r in first) / 10
    accuracy_last = sum(r["accuracy"] for r in last) / 10
    assert accuracy_last > accuracy_first + 0.4  # observed ~0.3 -> ~0.9


def test_repeated_captions_are_positives() -> None:
    torch.manual_seed(0)
    reward = build_alignment_reward(alignment_reward_debug())
    images = torch.rand(4, 3, 32, 32)
    captions = ["a red circle", "a red circle", "a blue square", "a green star"]
    tokens = reward.tokenize(captions)
    loss = alignment_step(reward, images, tokens, captions).loss
    # Swapping the two identical captions changes nothing: they are the same positive.
    swapped = [1, 0, 2, 3]
    again = alignment_step(reward, images[swapped], tokens, captions).loss
    torch.testing.assert_close(loss, again)
    # Swapping two different ones does.
    other = alignment_step(reward, images[[0, 1, 3, 2]], tokens, captions).loss
    assert not torch.allclose(loss, other)


def test_export_loads_as_an_open_clip_local_dir(run: Path, tmp_path: Path) -> None:
    config = alignment_debug()
    towers = config.reward.architecture
    assert not isinstance(towers, str)
    directory = export_alignment_weights(run, tmp_path / "reward", towers)
    loaded = build_alignment_reward(AlignmentRewardConfig(architecture=f"local-dir:{directory}"))
    trained = build_alignment_reward(config.reward)
    trained.load_state_dict(load_model_weights(run))
    images, captions = load_captioned(run / DATASET_DIR)
    batch = images[:8].float() / 255
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.score(batch, captions[:8]), trained.eval().score(batch, captions[:8])
        )
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        export_alignment_weights(run / "nothing", tmp_path / "x", towers)


def test_config_needs_one_data_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of dataset and synthetic"):
        AlignmentTrainConfig().validate()
    with pytest.raises(ValueError, match="is not a directory"):
        AlignmentTrainConfig(dataset=tmp_path / "missing").validate()
