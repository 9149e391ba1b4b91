"""Recalibration of the alignment reward from human preferences (Bradley-Terry fine-tuning).

The reward (:class:`model.reward.AlignmentReward`, an open_clip CLIP whose score is the scaled
cosine of an image and its prompt) is fine-tuned on preference pairs in the format of
:mod:`training.preference` (a dataset directory with ``samples.jsonl`` and ``pairs.jsonl``,
both images of a pair answering the same prompt) — the pairs people made, e.g. the RL track's
``preferences.jsonl`` once its images are fetched into such a directory. For pair ``i``, with
``r(x, c)`` the reward's score of image ``x`` under prompt ``c``::

    logit_i = T * (r(x_w, c) - r(x_l, c))              the preferred image's lead
    p_x     = softmax_j(T * r(x, c_j))                  image x over the batch's prompts
    loss    = mean_i -log sigmoid(logit_i)              Bradley-Terry
            + retain * mean_x KL(p0_x || p_x)           the initial reward's p0 (distillation)
            + anchor * sum_k ||theta_k - theta_k^0||^2  L2-SP: pulled toward the initial weights

``T`` is the CLIP's own learned temperature ``exp(logit_scale)`` (the factor its contrastive
logits use; frozen here) unless configured. Only the top of each tower trains: the last
``trainable_blocks`` residual blocks (none by default) of the image and of the text
transformer, their final norms and their projections; the patch embedding, the lower blocks
and the token embedding (most of the weights) stay as they are.

Human labels cover few attributes (a count, a relation); three things keep what the reward
already judged well (colours, shapes) from drifting with them: the frozen lower layers, the
anchor, and the retention term — a distillation of the initial reward's image-to-prompt
distributions over each batch (every image of the batch against every prompt in it, as in
CLIP's contrastive logits; the initial reward's embeddings of every pair are computed once,
when the objective is built). It keeps which prompt each image fits best, and leaves free a
shift of all of one image's scores, which is what lowering a rejected image under its prompt
needs.

The reward learns what the labels show, no more: on the world's count pairs, where the
rejected image always has one copy too many, the recalibrated reward learns to prefer fewer
copies (see the README's recipe table for the figures), not to read the number.

:func:`export_recalibrated_reward` writes the recalibrated CLIP as an open_clip local directory
(``open_clip_config.json`` + ``open_clip_model.safetensors``), which
``build_alignment_reward(AlignmentRewardConfig(architecture="local-dir:<dir>"))`` loads;
:func:`preference_agreement` measures a reward on a preference dataset (the share of pairs whose
preferred image it scores higher, per pair source).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

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
from training.alignment import CONFIG_FILE, WEIGHTS_FILE, export_alignment_weights
from training.checkpoint import load_model_weights
from training.data import load_image, read_dataset
from training.loop import LoopConfig, Objective, StepOutput, seeded
from training.preference import PAIRS_FILE, read_pairs
from training.synthetic import SyntheticDataConfig, write_synthetic_preferences

PREFERENCES_DIR = "preferences"
"""Where generated preference pairs are written inside the run directory."""
LOCAL_DIR = "local-dir:"
"""open_clip's prefix of a local model directory (:class:`AlignmentRewardConfig`)."""
_CLIP_PREFIX = "clip."
_NO_SOURCE = "unspecified"


@dataclass(kw_only=True, slots=True)
class RewardRecalibrationConfig:
    """Bradley-Terry fine-tuning of the alignment reward on preference pairs."""

    reward: AlignmentRewardConfig = field(default_factory=alignment_reward_debug)
    """The reward to recalibrate: custom towers (seeded random weights, or ``checkpoint``) or a
    local open_clip directory (``architecture="local-dir:<dir>"``, e.g. the world's reward)."""
    init_from: Path | None = None
    """A reward directory (open_clip local layout, what :func:`export_recalibrated_reward` and
    ``training.alignment.export_alignment_weights`` write) recalibrated instead of ``reward``'s
    weights (``flywheel train --init`` sets it); None: ``reward`` as configured."""
    preferences: Path | None = None
    """A preference dataset (:mod:`training.preference`): text-to-image pairs with a caption."""
    synthetic: SyntheticDataConfig | None = None
    """When ``preferences`` is None: right- vs wrong-colour pairs generated into
    ``<out>/preferences``."""
    trainable_blocks: int | None = 0
    """Residual blocks trained in each tower, counted from the top, with both towers' final
    norms and projections; 0: the final norms and projections only (the world's reward
    recalibrated on count pairs, in tuning runs: with the top block trained too, its colour
    agreement fell from 0.98 to 0.81; with the projections only and ``retain`` it stayed at
    0.94 to 1.00); None: every weight (the temperature excepted)."""
    retain: float = 10.0
    """Weight (>= 0) of the distillation of the initial reward's image-to-prompt distributions
    over each batch (see the module docstring); 0: none."""
    anchor: float = 0.01
    """Weight (>= 0) of the pull toward the initial weights, ``anchor * sum ||theta -
    theta0||^2`` over the trained tensors (L2-SP); 0: none."""
    temperature: float | None = None
    """The Bradley-Terry logit per unit of score difference (> 0); None: the CLIP's learned
    ``exp(logit_scale)``."""
    batch_size: int = 32
    """Pairs per step (drawn without replacement within a step)."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Steps, optimizer, checkpoints, seed and device. Leave the optimizer's weight decay at 0:
    it pulls toward zero, ``anchor`` toward the reward being recalibrated."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        self.loop.validate()
        if (self.preferences is None) == (self.synthetic is None):
            raise ValueError(
                "RewardRecalibrationConfig needs exactly one of preferences and synthetic"
            )
        if self.preferences is not None and not (self.preferences / PAIRS_FILE).is_file():
            raise ValueError(
                f"RewardRecalibrationConfig.preferences {self.preferences}: no {PAIRS_FILE} "
                "(not a preference dataset)"
            )
        if self.synthetic is not None:
            self.synthetic.validate()
        if self.init_from is not None and not (self.init_from / CONFIG_FILE).is_file():
            raise ValueError(
                f"RewardRecalibrationConfig.init_from {self.init_from}: no {CONFIG_FILE} "
                "(not a reward directory)"
            )
        if self.trainable_blocks is not None and self.trainable_blocks < 0:
            raise ValueError(
                "RewardRecalibrationConfig.trainable_blocks must be >= 0 or None, got "
                f"{self.trainable_blocks}"
            )
        for name, weight in (("retain", self.retain), ("anchor", self.anchor)):
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"RewardRecalibrationConfig.{name} must be >= 0, got {weight}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(
                f"RewardRecalibrationConfig.temperature must be > 0, got {self.temperature}"
            )
        if self.batch_size < 1:
            raise ValueError(
                f"RewardRecalibrationConfig.batch_size must be >= 1, got {self.batch_size}"
            )

    def reward_config(self) -> AlignmentRewardConfig:
        """The reward that is recalibrated: ``init_from`` when given, else ``reward``."""
        if self.init_from is None:
            return self.reward
        return AlignmentRewardConfig(
            architecture=f"{LOCAL_DIR}{self.init_from}",
            tokenizer=self.reward.tokenizer,
            scale=self.reward.scale,
        )


@dataclass(frozen=True, slots=True)
class PreferenceImages:
    """The pairs of a preference dataset, read into memory."""

    winners: list[Tensor]
    """Preferred images, ``(3, H, W)`` uint8 each, as stored (sizes may differ)."""
    losers: list[Tensor]
    """The other image of each pair, ``(3, H, W)`` uint8."""
    prompts: list[str]
    """The prompt both images of a pair answer (the winner's caption)."""
    sources: list[str]
    """Each pair's ``source`` (``"unspecified"`` when it has none)."""


def read_preference_images(directory: Path) -> PreferenceImages:
    """The text-to-image pairs of the preference dataset at ``directory`` (pairs validated by
    :func:`training.preference.read_pairs`); ``ValueError`` for an editing pair or a pair
    without a caption: the alignment reward scores an image against a prompt."""
    samples = {s.id: s for s in read_dataset(directory)}
    pairs = read_pairs(directory, samples.values())
    images: dict[str, Tensor] = {}

    def image(sample_id: str) -> Tensor:
        if sample_id not in images:
            pixels = np.array(load_image(directory / samples[sample_id].image, channels=3))
            images[sample_id] = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        return images[sample_id]

    winners, losers, prompts, sources = [], [], [], []
    for pair in pairs:
        winner = samples[pair.winner]
        if winner.is_editing or not winner.caption:
            raise ValueError(
                f"{directory}: pair {pair.id!r} is not a captioned text-to-image pair; the "
                "alignment reward scores an image against its prompt"
            )
        winners.append(image(pair.winner))
        losers.append(image(pair.loser))
        prompts.append(winner.caption)
        sources.append(pair.source or _NO_SOURCE)
    return PreferenceImages(winners=winners, losers=losers, prompts=prompts, sources=sources)


def preprocessed(reward: AlignmentReward, images: list[Tensor]) -> Tensor:
    """uint8 ``(3, H, W)`` images (sizes may differ) -> the image tower's input ``(B, 3, h,
    w)`` (:meth:`AlignmentReward.preprocess`, one by one, then batched)."""
    device = reward.mean.device
    return torch.cat(
        [reward.preprocess(image[None].to(device).float() / 255.0) for image in images]
    )


def trained_parameters(reward: AlignmentReward, blocks: int | None) -> dict[str, Tensor]:
    """Name -> parameter of what recalibration trains (see
    :attr:`RewardRecalibrationConfig.trainable_blocks`); the rest, and the temperature, get
    ``requires_grad=False``."""
    named = dict(reward.named_parameters())
    if blocks is None:
        chosen = {n for n in named if not n.endswith("logit_scale")}
    else:
        prefixes = ["clip.visual.ln_post.", "clip.ln_final."]
        for tower in ("clip.visual.transformer.resblocks.", "clip.transformer.resblocks."):
            layers = {
                int(n.removeprefix(tower).split(".")[0]) for n in named if n.startswith(tower)
            }
            top = sorted(layers)[max(0, len(layers) - blocks) :] if blocks else []
            prefixes += [f"{tower}{i}." for i in top]
        heads = {"clip.visual.proj", "clip.text_projection"}
        chosen = {n for n in named if n in heads or n.startswith(tuple(prefixes))}
    for name, parameter in named.items():
        parameter.requires_grad_(name in chosen)
    return {n: named[n] for n in named if n in chosen}


@dataclass(frozen=True, slots=True)
class PairEmbeddings:
    """A reward's unit embeddings of every pair of a :class:`PreferenceImages`."""

    winners: Tensor
    """``(N, D)``, the preferred images."""
    losers: Tensor
    """``(N, D)``, the other images."""
    prompts: Tensor
    """``(N, D)``, the shared prompts."""


def embed_pairs(
    reward: AlignmentReward, data: PreferenceImages, *, batch_size: int = 64
) -> PairEmbeddings:
    """``reward``'s embeddings of every pair of ``data``, without gradients, on the CPU."""
    winners, losers, prompts = [], [], []
    with torch.no_grad():
        for start in range(0, len(data.prompts), batch_size):
            chunk = slice(start, start + batch_size)
            winners.append(reward.encode_preprocessed(preprocessed(reward, data.winners[chunk])))
            losers.append(reward.encode_preprocessed(preprocessed(reward, data.losers[chunk])))
            prompts.append(reward.encode_text(reward.tokenize(data.prompts[chunk])))
    return PairEmbeddings(
        winners=torch.cat(winners).cpu(),
        losers=torch.cat(losers).cpu(),
        prompts=torch.cat(prompts).cpu(),
    )


def bradley_terry_step(
    reward: AlignmentReward,
    winners: Tensor,
    losers: Tensor,
    tokens: Tensor,
    *,
    initial_similarity: Tensor | None,
    temperature: Tensor,
    retain: float,
    anchor: float,
    initial: dict[str, Tensor],
    trained: dict[str, Tensor],
) -> StepOutput:
    """The recalibration loss of one batch; see the module docstring.

    ``winners`` and ``losers`` ``(B, 3, h, w)`` are preprocessed images, ``tokens`` ``(B, L)``
    their shared prompts; ``initial_similarity`` ``(2B, B)`` the initial reward's scores of
    the winners then the losers against every prompt of the batch (None when ``retain`` is
    0); ``trained`` the parameters trained and ``initial`` their starting values. Metrics:
    ``loss``; ``preference_loss`` (the Bradley-Terry term); ``retain_loss`` (the mean KL);
    ``accuracy``, the share of pairs whose preferred image scores higher (a tie counts half);
    ``margin``, the mean score lead of the preferred image; ``drift``, ``||theta - theta0|| /
    ||theta0||`` over the trained tensors.
    """
    b = winners.shape[0]
    images = torch.cat([winners, losers])  # (2B, 3, h, w)
    text = reward.encode_text(tokens)  # (B, D)
    similarity = reward.scale * reward.encode_preprocessed(images) @ text.T  # (2B, B)
    # Winner i and loser i under prompt i: the diagonals of the two halves.
    lead = similarity[:b].diagonal() - similarity[b:].diagonal()  # (B,)
    preference_loss = -F.logsigmoid(temperature * lead).mean()
    retain_loss = torch.zeros((), device=lead.device)
    if initial_similarity is not None and retain > 0:
        target = F.log_softmax(temperature * initial_similarity, dim=1)  # (2B, B)
        current = F.log_softmax(temperature * similarity, dim=1)  # (2B, B)
        retain_loss = F.kl_div(current, target, reduction="batchmean", log_target=True)
    distance = sum(
        ((trained[n] - initial[n]).square().sum() for n in trained),
        start=torch.zeros((), device=lead.device),
    )
    loss = preference_loss + retain * retain_loss + anchor * distance
    with torch.no_grad():
        accuracy = (lead > 0).float() + 0.5 * (lead == 0).float()  # (B,)
        norm = sum(float(v.square().sum()) for v in initial.values())
        metrics = {
            "loss": float(loss),
            "preference_loss": float(preference_loss),
            "retain_loss": float(retain_loss),
            "accuracy": float(accuracy.mean()),
            "margin": float(lead.mean()),
            "drift": math.sqrt(float(distance) / norm) if norm > 0 else 0.0,
        }
    return StepOutput(loss=loss, metrics=metrics)


def build_reward_recalibration(config: RewardRecalibrationConfig, out: Path) -> Objective:
    """The recalibration objective of ``config`` (its pairs generated under ``out`` if
    needed). The initial reward's embeddings of every pair are computed once, here: the
    retention targets of every batch come from them (no frozen copy of the reward is kept)."""
    preferences = config.preferences
    if preferences is None:
        assert config.synthetic is not None  # validate()
        preferences = out / PREFERENCES_DIR
        if not (preferences / PAIRS_FILE).is_file():  # pairs.jsonl is written last
            write_synthetic_preferences(preferences, config.synthetic)
    reward_config = config.reward_config()
    reward = seeded(config.loop.seed, lambda: build_alignment_reward(reward_config))
    reward = reward.to(torch.device(config.loop.device))
    trained = trained_parameters(reward, config.trainable_blocks)
    if not trained:
        raise ValueError("RewardRecalibrationConfig: nothing to train")
    initial = {n: p.detach().clone() for n, p in trained.items()}
    data = read_preference_images(preferences)
    pairs = len(data.prompts)
    if config.batch_size > pairs:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {pairs} preference pairs")
    tokens = reward.tokenize(data.prompts).cpu()  # (N, L)
    device = reward.mean.device
    before = embed_pairs(reward.eval(), data) if config.retain > 0 else None
    temperature = (
        reward.logit_scale.detach().exp()
        if config.temperature is None
        else torch.tensor(config.temperature, device=device)
    )

    def step(generator: torch.Generator) -> StepOutput:
        pick = [int(i) for i in torch.randperm(pairs, generator=generator)[: config.batch_size]]
        initial_similarity = None
        if before is not None:
            images = torch.cat([before.winners[pick], before.losers[pick]])  # (2B, D)
            initial_similarity = (reward.scale * images @ before.prompts[pick].T).to(device)
        return bradley_terry_step(
            reward,
            preprocessed(reward, [data.winners[i] for i in pick]),
            preprocessed(reward, [data.losers[i] for i in pick]),
            tokens[pick].to(device),
            initial_similarity=initial_similarity,
            temperature=temperature,
            retain=config.retain,
            anchor=config.anchor,
            initial=initial,
            trained=trained,
        )

    return Objective(model=reward, step=step)


def preference_agreement(
    reward: AlignmentReward, directory: Path, *, batch_size: int = 64
) -> dict[str, float]:
    """Per pair source (``"unspecified"`` for pairs without one): the share of the preference
    dataset's pairs at ``directory`` whose preferred image ``reward`` scores strictly
    higher."""
    data = read_preference_images(directory)
    embeddings = embed_pairs(reward, data, batch_size=batch_size)
    lead = ((embeddings.winners - embeddings.losers) * embeddings.prompts).sum(dim=-1)  # (N,)
    wins: dict[str, int] = {}
    counts: dict[str, int] = {}
    for source, value in zip(data.sources, lead.tolist(), strict=True):
        counts[source] = counts.get(source, 0) + 1
        wins[source] = wins.get(source, 0) + int(value * reward.scale > 0)
    return {source: wins[source] / counts[source] for source in sorted(counts)}


def export_recalibrated_reward(
    run: str | Path, out: str | Path, config: RewardRecalibrationConfig
) -> Path:
    """Write the reward of a recalibration ``run`` (its latest checkpoint) as an open_clip
    local directory ``out`` that ``AlignmentRewardConfig(architecture="local-dir:<out>")``
    loads; returns ``out``. The architecture is the recalibrated reward's: its custom towers,
    or its local directory's ``open_clip_config.json`` (copied)."""
    architecture = config.reward_config().architecture
    if isinstance(architecture, ClipTowersConfig):
        return export_alignment_weights(run, out, architecture)
    if not architecture.startswith(LOCAL_DIR):
        raise ValueError(
            f"{architecture!r}: only custom towers and {LOCAL_DIR} rewards are exported"
        )
    source = Path(architecture.removeprefix(LOCAL_DIR))
    weights = load_model_weights(run)
    clip = {
        k.removeprefix(_CLIP_PREFIX): v.contiguous()
        for k, v in weights.items()
        if k.startswith(_CLIP_PREFIX)
    }
    if not clip:
        raise ValueError(f"{run}: no {_CLIP_PREFIX}* weights (not a reward run)")
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    save_file(clip, str(target / WEIGHTS_FILE))
    model_config = json.loads((source / CONFIG_FILE).read_text(encoding="utf-8"))
    (target / CONFIG_FILE).write_text(json.dumps(model_config) + "\n", encoding="utf-8")
    return target
