"""VAE training: reconstruction, perceptual and semantic-alignment losses, no discriminator.

The trained module is :class:`VAEWithAlignment`: the :class:`model.vae.ResidualVAE` and a 1x1
projection of its latents to the width of a frozen open_clip image tower's features (the
semantic teacher, VA-VAE style: Yao et al., "Reconstruction vs. Generation: Taming
Optimization Dilemma in Latent Diffusion Models", 2025). Per batch of images::

    x          images (B, C, H, W) in [-1, 1]                 (C = 4: RGBA, or 3: RGB)
    mu, sigma  = vae.encode(x)                                 (B, z, h, w) each
    z          = mu + sigma * eps, eps ~ N(0, 1)                (or mu, sample_posterior off)
    x_hat      = vae.decode(z, clamp=False)                     (B, C, H, W)

    L_rec  = mean |x_hat - x| + l2 * mean (x_hat - x)^2
    L_perc = 1/|S| sum_{l in S} mean_{h,w} || n(phi_l(x_hat)) - n(phi_l(x)) ||^2
    L_kl   = mean_{z,h,w} 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2)
    L_sem  = L_mcos + L_mdms
    loss   = w_rec L_rec + w_perc L_perc + w_kl L_kl + w_sem L_sem

Perceptual (LPIPS-style, without LPIPS's learned channel weights): ``phi_l`` are the feature
maps ``(B, D, h_l, w_l)`` after each block of the frozen open_clip image tower (its
``forward_intermediates``: the patch tokens of every transformer block of a ViT), ``n`` is
unit normalisation over channels at every position. With pretrained open_clip weights loaded
from a local path this is a genuine perceptual distance; with the random debug tower it is a
random-feature perceptual loss (still a useful, smooth image-structure distance, but no
claim about human perception). The tower reads the RGB channels mapped to [0, 1] and its own
preprocessing (resize, centre crop, normalisation); alpha is left to ``L_rec``.

Semantic alignment (VA-VAE's vision-foundation loss), with ``p = P z`` (the learned 1x1
projection, ``(B, D, h, w)``) and ``f`` the teacher's features of the clean image:

* ``target="patch"``: ``f`` is the last block's patch-feature map, resized (bilinear,
  antialiased) to the latent grid ``(h, w)``; ``i, j`` run over the ``h * w`` positions of
  one image::

      L_mcos = mean_{b,i} relu(1 - m1 - cos(p_bi, f_bi))
      L_mdms = mean_{b,i,j} relu(|cos(p_bi, p_bj) - cos(f_bi, f_bj)| - m2)

* ``target="pooled"``: ``p`` is averaged over the latent grid and ``f`` is the tower's pooled
  image embedding, ``(B, D)``; ``i, j`` run over the images of the batch.

The margins ``m1`` and ``m2`` stop pulling once a latent is close enough to its teacher, so
the reconstruction keeps room. VA-VAE's adaptive weight (the ratio of the gradient norms of
the reconstruction and alignment losses at the encoder's last layer) is not used: ``w_sem``
is fixed. There is no adversarial loss and no discriminator: the trained module holds the
VAE and the projection only.

Weights. The checkpoints hold the state dict of :class:`VAEWithAlignment`: the VAE's keys
prefixed ``vae.``, the projection's ``projection.``. :func:`export_vae_weights` strips the
prefix (a state dict that :class:`ResidualVAE` loads strictly) and :func:`save_vae_weights`
writes it as the safetensors file ``flywheel cache produce --vae-weights`` reads; on the
command line, ``flywheel vae export RUN OUT.safetensors``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from model.reward import (
    AlignmentReward,
    AlignmentRewardConfig,
    alignment_reward_debug,
    build_alignment_reward,
)
from model.vae import DiagonalGaussian, ResidualVAE, VAEConfig, vae_debug
from training.checkpoint import load_model_weights
from training.data import (
    SAMPLES_FILE,
    BucketConfig,
    image_to_tensor,
    load_image,
    read_dataset,
    resize_and_crop,
)
from training.loop import LoopConfig, Objective, OptimizerConfig, StepOutput, seeded
from training.synthetic import SyntheticDataConfig, write_synthetic_dataset

DATASET_DIR = "dataset"
"""Name of the generated dataset inside a run's output directory."""
VAE_PREFIX = "vae."
"""Prefix of the VAE's keys in :class:`VAEWithAlignment`'s state dict."""


# ---- configuration ----------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class VAELossConfig:
    """Weights and margins of the VAE losses (see the module docstring)."""

    reconstruction: float = 1.0
    """w_rec: weight of the pixel reconstruction loss."""
    l2: float = 0.0
    """Weight of the mean squared error inside L_rec, next to the L1 term (0: L1 only)."""
    perceptual: float = 0.1
    """w_perc: weight of the perceptual distance in the teacher's feature maps (0: off)."""
    kl: float = 1e-6
    """w_kl: weight of the KL divergence to N(0, 1), per latent element (a mean, as L_rec)."""
    semantic: float = 0.1
    """w_sem: weight of the semantic alignment loss L_mcos + L_mdms (0: off)."""
    cos_margin: float = 0.5
    """m1: L_mcos stops pulling once cos(p, f) exceeds 1 - m1."""
    distance_margin: float = 0.25
    """m2: L_mdms ignores similarity-matrix differences below m2."""
    target: Literal["patch", "pooled"] = "patch"
    """Align every latent position to the teacher's last patch features ("patch"), or the
    averaged latent to the pooled image embedding ("pooled")."""
    sample_posterior: bool = True
    """Decode (and project) a posterior sample; False: the posterior mean."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        weights = (self.reconstruction, self.l2, self.perceptual, self.kl, self.semantic)
        if any(w < 0 for w in weights):
            raise ValueError("VAELossConfig: loss weights must be >= 0")
        if self.reconstruction == 0 and self.l2 == 0:
            raise ValueError("VAELossConfig: a reconstruction loss (L1 or L2) is needed")
        if not 0 <= self.cos_margin <= 2 or not 0 <= self.distance_margin <= 2:
            raise ValueError("VAELossConfig: margins must be in [0, 2]")
        if self.target not in ("patch", "pooled"):
            raise ValueError(f"VAELossConfig.target must be patch or pooled, got {self.target!r}")


@dataclass(kw_only=True, slots=True)
class VAEDataConfig:
    """The training images: a dataset directory or a generated one, bucketed, cropped."""

    dataset: Path | None = None
    """A dataset directory (:mod:`training.data`); its target images are trained on."""
    synthetic: SyntheticDataConfig | None = None
    """When ``dataset`` is None: generated into ``<out>/dataset`` (its VAE field is unused)."""
    buckets: BucketConfig = field(
        default_factory=lambda: BucketConfig(target_area=384 * 384, multiple_of=32)
    )
    """Every image is resized and centre-cropped to its resolution bucket first."""
    crop_size: int = 256
    """Side of the square training crops (random position in the bucketed image); a
    multiple of the VAE's spatial factor, at most the shorter side of every bucket."""
    batch_size: int = 8
    """Images per optimizer step."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        if self.dataset is None and self.synthetic is None:
            raise ValueError("VAEDataConfig needs a dataset directory or a synthetic dataset")
        if self.batch_size < 1 or self.crop_size < 1:
            raise ValueError("VAEDataConfig: batch_size and crop_size must be >= 1")
        shortest = min(min(bucket) for bucket in self.buckets.buckets())
        if self.crop_size > shortest:
            raise ValueError(
                f"VAEDataConfig.crop_size {self.crop_size} exceeds the shortest bucket side "
                f"{shortest}"
            )
        if self.synthetic is not None and (self.synthetic.images < 1 or self.synthetic.size < 1):
            raise ValueError("VAEDataConfig.synthetic: images and size must be >= 1")


@dataclass(kw_only=True, slots=True)
class VAETrainConfig:
    """Training of the residual VAE with a semantic alignment head."""

    vae: VAEConfig = field(default_factory=vae_debug)
    """The VAE architecture."""
    init_from: Path | None = None
    """Start from these weights: a ``.safetensors`` file of ResidualVAE weights (e.g.
    converted Qwen-Image weights; the projection starts fresh), or a VAE training run /
    checkpoint (VAE and projection); None: seeded random weights."""
    data: VAEDataConfig
    """The training images."""
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    """Loss weights and margins."""
    teacher: AlignmentRewardConfig = field(default_factory=alignment_reward_debug)
    """The frozen open_clip model whose image tower gives the perceptual and semantic
    features: local pretrained weights in production (``alignment_reward_pretrained``),
    random seeded weights (``loop.seed``) when it names no checkpoint."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Steps, optimizer, checkpoints, seed and device."""

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        self.vae.validate()
        self.data.validate()
        self.loss.validate()
        self.loop.validate()
        f = self.vae.spatial_factor
        if self.data.crop_size % f:
            raise ValueError(
                f"VAEDataConfig.crop_size {self.data.crop_size} is not a multiple of the VAE's "
                f"spatial factor {f}"
            )
        if self.vae.out_channels != self.vae.in_channels:
            raise ValueError("VAE training needs out_channels == in_channels")
        if self.vae.in_channels not in (3, 4):
            raise ValueError("VAE training reads RGB (3) or RGBA (4) images")


def vae_debug_recipe() -> VAETrainConfig:
    """VAE training, CPU, ~10 s: the debug VAE on 16 generated shapes, debug CLIP teacher."""
    return VAETrainConfig(
        vae=vae_debug(),
        data=VAEDataConfig(
            synthetic=SyntheticDataConfig(images=16, size=32),
            buckets=BucketConfig(target_area=32 * 32, aspect_ratios=(1.0,), multiple_of=8),
            crop_size=32,
            batch_size=8,
        ),
        loss=VAELossConfig(l2=1.0, perceptual=0.1, semantic=0.5, kl=1e-6),
        teacher=alignment_reward_debug(),
        loop=LoopConfig(
            optimizer=OptimizerConfig(lr=1e-3, betas=(0.5, 0.9), warmup_steps=5),
            max_steps=60,
            checkpoint_every=30,
            keep_checkpoints=2,
            seed=0,
        ),
    )


# ---- the modules ------------------------------------------------------------------------


class VAEWithAlignment(nn.Module):
    """The trained module: the VAE and the 1x1 projection of its latents to teacher width.

    State dict keys: ``vae.*`` (exactly a :class:`ResidualVAE`'s, prefixed) and
    ``projection.*``.
    """

    def __init__(self, config: VAEConfig, feature_dim: int) -> None:
        super().__init__()
        self.vae = ResidualVAE(config)
        self.projection = nn.Conv2d(config.latent_channels, feature_dim, 1)


class ClipFeatures(nn.Module):
    """A frozen open_clip image tower as a feature network.

    ``forward(images)`` with images ``(B, C, H, W)`` in [-1, 1] (RGB or RGBA; alpha is not
    read) returns the feature map after every block, ``(B, D_l, h_l, w_l)`` each (for a
    ViT: the patch tokens, prefix tokens dropped), and the pooled image embedding
    ``(B, E)``. Gradients flow to the images, never to the tower.
    """

    def __init__(self, reward: AlignmentReward) -> None:
        super().__init__()
        self.reward = reward.requires_grad_(False).eval()

    def forward(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        rgb = (images[:, :3].float() + 1.0) / 2.0  # (B, 3, H, W) in [0, 1]
        pixels = self.reward.preprocess(rgb)  # (B, 3, S, S), normalized
        visual = cast(Any, self.reward.clip).visual
        out = visual.forward_intermediates(pixels, indices=None, output_fmt="NCHW")
        maps: list[Tensor] = list(out["image_intermediates"])  # each (B, D_l, h_l, w_l)
        pooled: Tensor = out["image_features"]  # (B, E)
        return maps, pooled

    def feature_dim(self, target: Literal["patch", "pooled"]) -> int:
        """Width D of the semantic target: the last map's channels, or the embedding's."""
        size = self.reward.image_size
        probe = torch.zeros(1, 3, *size, device=self.reward.mean.device)  # (1, 3, S, S)
        with torch.no_grad():
            maps, pooled = self(probe)
        return int(maps[-1].shape[1] if target == "patch" else pooled.shape[1])


def build_teacher(config: AlignmentRewardConfig, *, seed: int, device: str) -> ClipFeatures:
    """The frozen feature network of ``config`` (random weights seeded by ``seed`` if none)."""
    reward = seeded(seed, lambda: build_alignment_reward(config))
    return ClipFeatures(reward).to(torch.device(device))


# ---- the step ---------------------------------------------------------------------------


def _cosine_matrix(x: Tensor) -> Tensor:
    """``(G, N, D)`` -> pairwise cosine similarities ``(G, N, N)`` within each group."""
    unit = F.normalize(x, dim=-1)
    return unit @ unit.transpose(1, 2)


def semantic_alignment(
    projected: Tensor, features: Tensor, *, cos_margin: float, distance_margin: float
) -> tuple[Tensor, Tensor]:
    """VA-VAE's ``L_mcos + L_mdms`` between ``(G, N, D)`` projections and teacher features.

    ``N`` runs over what is compared inside a group (latent positions of one image, or the
    images of a batch with ``G = 1``). Returns the loss (0-d) and the mean cosine (0-d).
    """
    cos = F.cosine_similarity(projected, features, dim=-1)  # (G, N)
    margin_cos = F.relu(1.0 - cos_margin - cos).mean()
    difference = (_cosine_matrix(projected) - _cosine_matrix(features)).abs()  # (G, N, N)
    margin_distance = F.relu(difference - distance_margin).mean()
    return margin_cos + margin_distance, cos.mean()


def perceptual_distance(fake: Sequence[Tensor], real: Sequence[Tensor]) -> Tensor:
    """``(B,)``: mean over layers of the position-mean squared distance of unit features."""
    per_layer = [
        (F.normalize(a, dim=1) - F.normalize(b, dim=1)).square().sum(dim=1).mean(dim=(1, 2))
        for a, b in zip(fake, real, strict=True)
    ]  # each (B,)
    return torch.stack(per_layer).mean(dim=0)


def psnr(reconstruction: Tensor, images: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2): ``(B,)``."""
    mse = (reconstruction.clamp(-1.0, 1.0) - images).square().flatten(1).mean(dim=1)  # (B,)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-10))


def kl_divergence(posterior: DiagonalGaussian) -> Tensor:
    """Mean over latent elements of KL(N(mu, sigma^2) || N(0, 1)), 0-d."""
    mean, logvar = posterior.mean, posterior.logvar  # (B, z, h, w) each
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


def vae_step(
    model: VAEWithAlignment,
    teacher: ClipFeatures,
    batch: dict[str, Tensor],
    *,
    config: VAELossConfig,
    generator: torch.Generator,
) -> StepOutput:
    """The VAE loss of one batch; see the module docstring.

    ``batch["images"]`` is ``(B, C, H, W)`` in [-1, 1], square (the teacher centre-crops
    what it reads, so only square images keep its patch grid on the latent grid). The
    posterior noise comes from ``generator`` (a CPU generator); the teacher runs without a
    graph on the clean images and with one (to the pixels) on the reconstructions.

    Metrics: ``loss``; ``recon_l1`` (mean absolute error); ``psnr`` (dB, of the clamped
    reconstruction); ``kl`` (L_kl); unless both teacher weights are 0 (then the teacher is
    not run at all): ``perceptual`` (L_perc), ``semantic`` (mean cosine between projected
    latents and teacher features; with ``semantic=0`` the projection is untrained, so it
    stays near its random value) and ``semantic_loss`` (L_mcos + L_mdms).
    """
    device = next(model.parameters()).device
    images = batch["images"].to(device=device, dtype=torch.float32)  # (B, C, H, W)
    posterior = model.vae.encode(images)  # (B, z, h, w) moments
    if config.sample_posterior:
        noise = torch.randn(posterior.mean.shape, generator=generator).to(device)
        latents = posterior.mean + posterior.std * noise  # (B, z, h, w)
    else:
        latents = posterior.mean
    reconstruction = model.vae.decode(latents, clamp=False)  # (B, C, H, W)

    error = reconstruction - images  # (B, C, H, W)
    recon_l1 = error.abs().mean()
    loss = config.reconstruction * recon_l1 + config.l2 * error.square().mean()
    kl = kl_divergence(posterior)
    loss = loss + config.kl * kl

    metrics: dict[str, float] = {}
    if config.perceptual > 0 or config.semantic > 0:
        loss = loss + _teacher_losses(
            model, teacher, images, reconstruction, latents, config, metrics
        )
    with torch.no_grad():
        metrics["loss"] = float(loss)
        metrics["recon_l1"] = float(recon_l1)
        metrics["psnr"] = float(psnr(reconstruction, images).mean())
        metrics["kl"] = float(kl)
    return StepOutput(loss=loss, metrics=metrics)


def _teacher_losses(
    model: VAEWithAlignment,
    teacher: ClipFeatures,
    images: Tensor,
    reconstruction: Tensor,
    latents: Tensor,
    config: VAELossConfig,
    metrics: dict[str, float],
) -> Tensor:
    """w_perc L_perc + w_sem L_sem of one batch; adds ``perceptual``, ``semantic`` and
    ``semantic_loss`` to ``metrics``."""
    loss = torch.zeros((), device=images.device)
    with torch.no_grad():
        real_maps, real_pooled = teacher(images)  # [(B, D_l, h_l, w_l)], (B, E)
    perceptual = torch.zeros((), device=images.device)
    if config.perceptual > 0:
        fake_maps, _ = teacher(reconstruction)
        perceptual = perceptual_distance(fake_maps, real_maps).mean()
        loss = loss + config.perceptual * perceptual

    projected = model.projection(latents)  # (B, D, h, w)
    if config.target == "patch":
        target = real_maps[-1]  # (B, D, h_t, w_t)
        if target.shape[-2:] != projected.shape[-2:]:
            target = F.interpolate(
                target, size=projected.shape[-2:], mode="bilinear", antialias=True
            )  # (B, D, h, w)
        grouped = projected.flatten(2).transpose(1, 2)  # (B, h*w, D)
        features = target.flatten(2).transpose(1, 2)  # (B, h*w, D)
    else:
        grouped = projected.mean(dim=(2, 3))[None]  # (1, B, D)
        features = real_pooled[None]  # (1, B, D)
    semantic_loss, semantic = semantic_alignment(
        grouped,
        features.detach(),
        cos_margin=config.cos_margin,
        distance_margin=config.distance_margin,
    )
    if config.semantic > 0:
        loss = loss + config.semantic * semantic_loss
    metrics["perceptual"] = float(perceptual.detach())
    metrics["semantic"] = float(semantic.detach())
    metrics["semantic_loss"] = float(semantic_loss.detach())
    return loss


# ---- data -------------------------------------------------------------------------------


def prepare_dataset(config: VAEDataConfig, out: Path) -> Path:
    """The dataset directory of ``config``: the given one, or ``<out>/dataset`` (generated)."""
    if config.dataset is not None:
        return config.dataset
    assert config.synthetic is not None  # VAEDataConfig.validate
    directory = out / DATASET_DIR
    if not (directory / SAMPLES_FILE).is_file():  # samples.jsonl is written last
        write_synthetic_dataset(directory, config.synthetic)
    return directory


class ImageCrops:
    """Random square crops of a dataset's bucketed target images, in shuffled epochs.

    The order of each epoch and the crop positions are drawn from the step's generator; the
    position in the epoch is :meth:`state_dict` (for exact resume).
    """

    def __init__(self, directory: Path, config: VAEDataConfig, *, channels: int) -> None:
        self.directory = directory
        self.config = config
        self.channels = channels
        self.paths = [directory / sample.image for sample in read_dataset(directory)]
        if not self.paths:
            raise ValueError(f"{directory}: the dataset holds no samples")
        self.order = torch.zeros(0, dtype=torch.int64)  # (N,) the epoch's permutation
        self.position = 0

    def _image(self, index: int, generator: torch.Generator) -> Tensor:
        image = load_image(self.paths[index], channels=self.channels)
        bucketed = resize_and_crop(image, self.config.buckets.assign_bucket(*image.size))
        pixels = image_to_tensor(bucketed)  # (C, H_b, W_b)
        size = self.config.crop_size
        top = int(torch.randint(pixels.shape[1] - size + 1, (1,), generator=generator))
        left = int(torch.randint(pixels.shape[2] - size + 1, (1,), generator=generator))
        return pixels[:, top : top + size, left : left + size]  # (C, S, S)

    def next_batch(self, generator: torch.Generator) -> dict[str, Tensor]:
        """``{"images": (B, C, S, S)}`` in [-1, 1]; a new permutation starts each epoch."""
        picks: list[int] = []
        while len(picks) < self.config.batch_size:
            if self.position >= len(self.order):
                self.order = torch.randperm(len(self.paths), generator=generator)
                self.position = 0
            picks.append(int(self.order[self.position]))
            self.position += 1
        return {"images": torch.stack([self._image(i, generator) for i in picks])}

    def state_dict(self) -> dict[str, Any]:
        """The epoch's permutation and the position in it."""
        return {"order": self.order.clone(), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from what :meth:`state_dict` returned."""
        self.order = state["order"].to(torch.int64)
        self.position = int(state["position"])


# ---- weights ----------------------------------------------------------------------------


def export_vae_weights(path: str | Path) -> dict[str, Tensor]:
    """The ResidualVAE state dict of a VAE training run, its checkpoints/ or one checkpoint.

    The ``vae.`` prefix is stripped and the projection dropped: the result loads into a
    :class:`ResidualVAE` of the run's configuration with ``strict=True``.
    """
    weights = load_model_weights(path)
    vae = {k.removeprefix(VAE_PREFIX): v for k, v in weights.items() if k.startswith(VAE_PREFIX)}
    if not vae:
        raise ValueError(f"{path}: no {VAE_PREFIX}* weights (not a VAE training run)")
    return vae


def load_vae_weights(path: str | Path) -> dict[str, Tensor]:
    """ResidualVAE weights from ``path``: a ``.safetensors`` file of them (what
    :func:`save_vae_weights` writes, ``--vae-weights``), or a VAE training run, its
    checkpoints/ or one checkpoint (:func:`export_vae_weights`)."""
    source = Path(path)
    if source.is_file():
        return load_file(str(source))
    return export_vae_weights(source)


def save_vae_weights(run: str | Path, out: str | Path) -> Path:
    """Write :func:`export_vae_weights` of ``run`` as a safetensors file (``--vae-weights``)."""
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in export_vae_weights(run).items()}, str(target))
    return target


def latent_statistics(
    vae: ResidualVAE, dataset: str | Path, *, size: tuple[int, int], batch_size: int = 64
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the posterior means of ``dataset``'s target
    images (resized and centre-cropped to ``size`` = (width, height)): the values of
    ``VAEConfig.latents_mean`` / ``latents_std`` that make the latents a transformer is
    trained on zero-mean and unit-variance per channel (measured after the VAE is trained)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    root = Path(dataset)
    paths = [root / sample.image for sample in read_dataset(root)]
    device = next(vae.parameters()).device
    channels = vae.config.in_channels
    total = torch.zeros(vae.config.latent_channels, dtype=torch.float64)
    squares = torch.zeros_like(total)
    count = 0
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            images = torch.stack(
                [
                    image_to_tensor(resize_and_crop(load_image(p, channels=channels), size))
                    for p in paths[start : start + batch_size]
                ]
            )  # (b, C, H, W)
            mean = vae.encode(images.to(device)).mean.double().cpu()  # (b, z, h, w)
            total += mean.sum(dim=(0, 2, 3))
            squares += mean.square().sum(dim=(0, 2, 3))
            count += mean.shape[0] * mean.shape[2] * mean.shape[3]
    average = total / count
    std = (squares / count - average.square()).clamp_min(1e-12).sqrt()
    return tuple(average.tolist()), tuple(std.tolist())


def build_vae_model(config: VAETrainConfig, feature_dim: int) -> VAEWithAlignment:
    """The trained module: seeded random weights, then ``init_from`` if given."""
    model = seeded(config.loop.seed, lambda: VAEWithAlignment(config.vae, feature_dim))
    source = config.init_from
    if source is not None:
        if source.is_file():  # plain ResidualVAE weights
            model.vae.load_state_dict(load_file(str(source)), strict=True)
        else:  # a VAE training run: the VAE and its projection
            model.load_state_dict(load_model_weights(source), strict=True)
    return model.to(torch.device(config.loop.device))


def build_vae_training(config: VAETrainConfig, out: Path) -> Objective:
    """The VAE objective of ``config`` (its dataset generated under ``out`` if needed)."""
    teacher = build_teacher(config.teacher, seed=config.loop.seed, device=config.loop.device)
    model = build_vae_model(config, teacher.feature_dim(config.loss.target))
    crops = ImageCrops(
        prepare_dataset(config.data, out), config.data, channels=config.vae.in_channels
    )

    def step(generator: torch.Generator) -> StepOutput:
        batch = crops.next_batch(generator)
        return vae_step(model, teacher, batch, config=config.loss, generator=generator)

    return Objective(
        model=model, step=step, data_state=crops.state_dict, load_data_state=crops.load_state_dict
    )
