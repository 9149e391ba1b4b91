"""Contrastive training of the alignment reward (an open_clip CLIP) on captioned images.

The trained module is the :class:`model.reward.AlignmentReward` (its CLIP's weights and
learned temperature). Each step draws ``batch_size`` samples of a dataset
(:mod:`training.data`; text-to-image samples with a non-empty caption) and minimises the
symmetric contrastive loss over the batch's image-caption similarity matrix, with every
sample whose caption is the same string counted as a positive (captions repeat in
procedural data; counting a repeat as a negative would push apart what is identical)::

    s_ij   = exp(logit_scale) * <f(image_i), g(caption_j)>        (B, B), unit embeddings
    P_ij   = [caption_i == caption_j] / #{k : caption_i == caption_k}  (rows sum to 1)
    loss   = 1/2 * ( CE(s, P) + CE(s^T, P) )                      soft-target cross-entropy

:func:`export_alignment_weights` writes the CLIP's weights in open_clip's own layout
(``open_clip_config.json`` + ``open_clip_model.safetensors``), so that
``AlignmentRewardConfig(architecture="local-dir:<dir>")`` loads the trained reward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from model.reward import (
    AlignmentReward,
    AlignmentRewardConfig,
    ClipTowersConfig,
    alignment_reward_debug,
    build_alignment_reward,
)
from training.checkpoint import load_model_weights
from training.data import SAMPLES_FILE, load_image, read_dataset
from training.loop import LoopConfig, Objective, StepOutput, seeded
from training.synthetic import SyntheticDataConfig, write_synthetic_dataset

DATASET_DIR = "dataset"
"""Where a generated dataset is written inside the run directory."""
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
_CLIP_PREFIX = "clip."


@dataclass(kw_only=True, slots=True)
class AlignmentTrainConfig:
    """Contrastive training of the alignment reward on a captioned dataset."""

    reward: AlignmentRewardConfig = field(default_factory=alignment_reward_debug)
    """The CLIP: custom towers (seeded random weights, or ``checkpoint``) or a local model."""
    dataset: Path | None = None
    """A dataset directory (:mod:`training.data`): its text-to-image samples with a caption."""
    synthetic: SyntheticDataConfig | None = None
    """When ``dataset`` is None: generated into ``<out>/dataset``."""
    batch_size: int = 64
    """Samples per step (drawn without replacement within a step)."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Steps, optimizer, checkpoints, seed and device."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        self.loop.validate()
        if self.batch_size < 2:
            raise ValueError(f"AlignmentTrainConfig.batch_size must be >= 2, got {self.batch_size}")
        if (self.dataset is None) == (self.synthetic is None):
            raise ValueError("AlignmentTrainConfig needs exactly one of dataset and synthetic")
        if self.dataset is not None and not self.dataset.is_dir():
            raise ValueError(f"AlignmentTrainConfig.dataset {self.dataset} is not a directory")
        if self.synthetic is not None:
            self.synthetic.validate()


def alignment_step(
    reward: AlignmentReward, images: Tensor, tokens: Tensor, captions: list[str]
) -> StepOutput:
    """The contrastive loss of one batch; see the module docstring.

    ``images`` (B, 3, H, W) in [0, 1], ``tokens`` (B, L) their captions' ids, ``captions`` the
    strings (equal strings are positives of each other). Metrics: ``loss``; ``accuracy``, the
    share of images whose most similar caption in the batch is one of theirs;
    ``logit_scale``, the temperature's exp.
    """
    image_emb = reward.encode_image(images)  # (B, D)
    text_emb = reward.encode_text(tokens)  # (B, D)
    scale = reward.logit_scale.exp()
    logits = scale * image_emb @ text_emb.T  # (B, B)
    codes = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([codes[c] for c in captions], device=logits.device)  # (B,)
    same = (ids[:, None] == ids[None, :]).float()  # (B, B), symmetric
    targets = same / same.sum(dim=1, keepdim=True)  # (B, B), rows sum to 1
    loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    with torch.no_grad():
        best = logits.argmax(dim=1)  # (B,)
        accuracy = same[torch.arange(len(captions)), best].mean()
        metrics = {
            "loss": float(loss),
            "accuracy": float(accuracy),
            "logit_scale": float(scale),
        }
    return StepOutput(loss=loss, metrics=metrics)


def load_captioned(dataset: Path) -> tuple[Tensor, list[str]]:
    """The text-to-image samples of ``dataset`` with a caption: images (N, 3, H, W) uint8,
    as stored (every target image must have the same size), and their captions."""
    samples = [s for s in read_dataset(dataset) if not s.is_editing and s.caption]
    if len(samples) < 2:
        raise ValueError(f"{dataset}: fewer than 2 captioned text-to-image samples")
    arrays = [np.array(load_image(dataset / s.image, channels=3)) for s in samples]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"{dataset}: target images differ in size; resize them first")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, [s.caption for s in samples]


def build_alignment_training(config: AlignmentTrainConfig, out: Path) -> Objective:
    """The contrastive objective of ``config`` (its dataset generated under ``out`` if needed)."""
    dataset = config.dataset
    if dataset is None:
        assert config.synthetic is not None  # validate()
        dataset = out / DATASET_DIR
        if not (dataset / SAMPLES_FILE).is_file():  # samples.jsonl is written last
            write_synthetic_dataset(dataset, config.synthetic)
    reward = seeded(config.loop.seed, lambda: build_alignment_reward(config.reward))
    reward = reward.train().to(torch.device(config.loop.device))
    images, captions = load_captioned(dataset)
    if config.batch_size > len(captions):
        raise ValueError(
            f"batch_size {config.batch_size} exceeds the {len(captions)} captioned samples"
        )
    tokens = reward.tokenize(captions).cpu()  # (N, L)

    def step(generator: torch.Generator) -> StepOutput:
        pick = torch.randperm(len(captions), generator=generator)[: config.batch_size]
        device = reward.mean.device
        batch = images[pick].to(device).float() / 255.0  # (B, 3, H, W) in [0, 1]
        return alignment_step(
            reward, batch, tokens[pick].to(device), [captions[int(i)] for i in pick]
        )

    return Objective(model=reward, step=step)


def export_alignment_weights(run: str | Path, out: str | Path, towers: ClipTowersConfig) -> Path:
    """Write the CLIP of an alignment run (its latest checkpoint) as an open_clip local
    directory ``out`` (``open_clip_config.json``, ``open_clip_model.safetensors``) of the
    custom ``towers`` it was trained with; returns ``out``."""
    weights = load_model_weights(run)
    clip = {
        k.removeprefix(_CLIP_PREFIX): v.contiguous()
        for k, v in weights.items()
        if k.startswith(_CLIP_PREFIX)
    }
    if not clip:
        raise ValueError(f"{run}: no {_CLIP_PREFIX}* weights (not an alignment run)")
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    save_file(clip, str(target / WEIGHTS_FILE))
    preprocess: dict[str, Any] = {}
    (target / CONFIG_FILE).write_text(
        json.dumps({"model_cfg": towers.open_clip_model_cfg(), "preprocess_cfg": preprocess}) + "\n"
    )
    return target
