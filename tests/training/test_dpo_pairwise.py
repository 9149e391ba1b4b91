"""Diffusion-DPO on pairwise feedback: pairs made as the team's RL track makes them (a
chosen and a rejected image of one prompt) move a tiny seeded generator toward the preferred
images of prompts it never trained on — its reward-free preference accuracy rises — and the
DPO loss falls."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from flywheel.tracks.reward_data import PreferencePair as FeedbackPair
from flywheel.tracks.reward_data import preference_pairs
from flywheel.tracks.routed import CaseFeedback, RoutedCase
from model.condition import ConditionEncoder
from model.transformer import transformer_debug
from model.vae import ResidualVAE
from training.cache import CachedBatches, ConsumerConfig, ProducerConfig
from training.checkpoint import load_model_weights
from training.data import BucketConfig, Provenance, Sample, read_dataset, write_dataset
from training.dpo import (
    DPOConfig,
    DPOTrainConfig,
    PreferenceDataConfig,
    PreferenceEvaluation,
    evaluate_preferences,
)
from training.io import local_path
from training.loop import METRICS_FILE, LoopConfig, OptimizerConfig
from training.preference import PreferencePair, produce_preferences, read_pairs, write_pairs
from training.pretrain import DataConfig, PretrainConfig, build_transformer
from training.synthetic import SyntheticDataConfig, write_synthetic_preferences
from training.trainer import train

pytestmark = pytest.mark.usefixtures("offline")

SYNTHETIC = SyntheticDataConfig()
"""The images' size, VAE and condition encoder (the debug recipes')."""
TRAIN_SCENES = 128  # 64 distinct prompts of the 90 the generated scenes can have
HELD_OUT_SCENES = 128  # before the pairs of a prompt the training pairs have are dropped
PRETRAIN_STEPS = 60
BETA = 200.0  # few latent elements (4 x 4 x 8), so their mean errors move much per step
STEPS = 40


def _app_images(root: Path, scenes: int, seed: int) -> list[RoutedCase]:
    """Cases of an app whose users compared two images of their prompt and chose the one with
    the colour they asked for (images written under ``root``)."""
    write_synthetic_preferences(root, SyntheticDataConfig(images=scenes, seed=seed))
    samples = {s.id: s for s in read_dataset(root)}
    cases = []
    for number, pair in enumerate(read_pairs(root, samples.values())):
        chosen, rejected = samples[pair.winner], samples[pair.loser]
        feedback = CaseFeedback(
            kind="pairwise",
            chosen_image_uri=(root / chosen.image).resolve().as_uri(),
            rejected_image_uri=(root / rejected.image).resolve().as_uri(),
        )
        prompt = chosen.caption
        cases.append(
            RoutedCase(case_id=number, prompt=prompt, reference=prompt, feedback=(feedback,))
        )
    return cases


def _preference_dataset(pairs: list[FeedbackPair], root: Path) -> Path:
    """The track's pairs (image URIs on this disk) as a training.preference dataset."""
    (root / "images").mkdir(parents=True)
    samples: list[Sample] = []
    training_pairs: list[PreferencePair] = []
    for number, pair in enumerate(pairs):
        for side, uri in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            image = f"images/{number:03d}-{side}.png"
            source = local_path(uri)
            assert source is not None  # the app's images are on this disk
            shutil.copyfile(source, root / image)
            samples.append(
                Sample(
                    id=f"{number:03d}-{side}",
                    image=image,
                    caption=pair.prompt,
                    provenance=Provenance(dataset="feedback", split="train", origin_uri=uri),
                )
            )
        training_pairs.append(
            PreferencePair(
                id=f"pair-{number:03d}",
                winner=f"{number:03d}-chosen",
                loser=f"{number:03d}-rejected",
                source=f"feedback:{pair.source}",
            )
        )
    write_dataset(root, samples)
    write_pairs(root, training_pairs)
    return root


def _encode(datasets: list[Path]) -> list[Path]:
    """Each preference dataset encoded into ``<dataset>-cache`` with the debug VAE (seeded)
    and MiniLM conditions."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SYNTHETIC.seed)
        vae = ResidualVAE(SYNTHETIC.vae).eval()
    encoder = ConditionEncoder.load(SYNTHETIC.condition)
    buckets = BucketConfig(
        target_area=SYNTHETIC.size**2,
        aspect_ratios=(1.0,),
        multiple_of=SYNTHETIC.vae.spatial_factor,
    )
    caches = []
    for data in datasets:
        cache = data.with_name(f"{data.name}-cache")
        config = ProducerConfig(buckets=buckets, shard_size=64)
        produce_preferences(data, cache, vae=vae, encoder=encoder, config=config)
        caches.append(cache)
    return caches


def test_dpo_on_pairwise_feedback_moves_the_generator_toward_held_out_preferred_images(
    tmp_path: Path,
) -> None:
    train_pairs = preference_pairs(_app_images(tmp_path / "app-train", TRAIN_SCENES, seed=0))
    trained_prompts = {p.prompt for p in train_pairs}
    held_out_pairs = [
        p
        for p in preference_pairs(_app_images(tmp_path / "app-held-out", HELD_OUT_SCENES, seed=1))
        if p.prompt not in trained_prompts
    ]
    assert {p.source for p in train_pairs} == {"pairwise"}
    assert len(train_pairs) == TRAIN_SCENES
    assert len(held_out_pairs) >= 16
    train_cache, held_out_cache = _encode(
        [
            _preference_dataset(train_pairs, tmp_path / "train"),
            _preference_dataset(held_out_pairs, tmp_path / "held-out"),
        ]
    )

    # The tiny generator: the debug transformer, briefly pretrained on other generated scenes
    # (DPO from random weights is dominated by learning to denoise at all).
    model = transformer_debug()
    model.latent_channels = SYNTHETIC.vae.latent_channels
    pretrain = PretrainConfig(
        model=model,
        data=DataConfig(synthetic=SyntheticDataConfig(images=64, seed=7), batch_size=8),
        loop=LoopConfig(
            optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.01, warmup_steps=5),
            max_steps=PRETRAIN_STEPS,
            checkpoint_every=PRETRAIN_STEPS,
            keep_checkpoints=1,
            seed=0,
        ),
    )
    train(pretrain, out=tmp_path / "pretrain")
    config = DPOTrainConfig(
        model=model,
        dpo=DPOConfig(beta=BETA),
        data=PreferenceDataConfig(cache_dir=train_cache, batch_size=16),
        init_from=tmp_path / "pretrain",
        loop=LoopConfig(
            optimizer=OptimizerConfig(lr=5e-4, warmup_steps=2),
            max_steps=STEPS,
            checkpoint_every=STEPS,
            keep_checkpoints=1,
            seed=0,
        ),
    )
    train(config, out=tmp_path / "dpo")

    reference = build_transformer(model, seed=0, init_from=tmp_path / "pretrain", device="cpu")
    reference.requires_grad_(False).eval()
    policy = build_transformer(model, seed=0, init_from=tmp_path / "pretrain", device="cpu")

    def measured() -> PreferenceEvaluation:
        batches = CachedBatches(held_out_cache, ConsumerConfig(batch_size=64, epochs=1))
        return evaluate_preferences(policy, reference, batches, config=config.dpo, draws=8)

    before = measured()
    policy.load_state_dict(load_model_weights(tmp_path / "dpo"))
    after = measured()
    rows = [json.loads(line) for line in (tmp_path / "dpo" / METRICS_FILE).read_text().splitlines()]
    first, last = rows[:10], rows[-10:]
    print(
        f"held-out pairs ({after.pairs}): implicit accuracy {before.accuracy:.3f} -> "
        f"{after.accuracy:.3f}, DPO loss {before.loss:.4f} -> {after.loss:.4f}; training "
        f"batches, first vs last 10 steps: loss {sum(r['loss'] for r in first) / 10:.4f} -> "
        f"{sum(r['loss'] for r in last) / 10:.4f}, accuracy "
        f"{sum(r['accuracy'] for r in first) / 10:.3f} -> "
        f"{sum(r['accuracy'] for r in last) / 10:.3f}"
    )

    # The policy starts as its reference: every margin is 0, a tie, and the loss is log 2.
    assert before.accuracy == 0.5
    assert abs(before.loss - math.log(2)) < 1e-6
    assert after.pairs == len(held_out_pairs)
    # Held-out prompts: the preferred images gain on the rejected ones (measured 0.50 -> 0.77).
    assert after.accuracy >= 0.65
    assert after.margin > 0
    # The DPO loss fell: on the held-out pairs (0.693 -> 0.567) and along the run.
    assert after.loss < math.log(2) - 0.05
    assert sum(r["loss"] for r in last) < sum(r["loss"] for r in first)
