"""The residual image VAE of Qwen-Image-2.1: f16c64, non-parametric shortcuts, no discriminator.

An image ``(B, C_img, H, W)`` in ``[-1, 1]`` (RGBA by default: the alpha channel is a fourth
image channel) becomes a diagonal Gaussian over latents ``(B, z, H / f, W / f)``; ``f`` is
``patch_size * 2 ** (len(width_multipliers) - 1)`` (16 in the f16c64 recipe, 8 in f8c16).

Encoder: optional patchify (space-to-channel by ``patch_size``), a 3x3 conv, then one stage
per width multiplier. A stage runs ``blocks_per_stage`` residual blocks (RMS norm, SiLU,
3x3 conv, twice), then, except in the last stage, a stride-2 conv; around the whole stage
sits a *non-parametric shortcut*: space-to-channel averaging, i.e. every 2x2 pixel patch is
folded into channels and groups of consecutive channels are averaged down to the stage's
output width. A middle block (residual, single-head spatial self-attention, residual), RMS
norm, SiLU and a 3x3 conv give ``2 z`` channels; a 1x1 conv gives the moments (mean and
log-variance).

Decoder: a 1x1 conv, a 3x3 conv, the middle block, one stage per multiplier (in reverse):
``blocks_per_stage + 1`` residual blocks, then, except in the last stage, nearest 2x upsampling
and a 3x3 conv, with the mirrored shortcut around the stage: channel duplication, i.e. every
input channel is repeated and the copies unfold into a 2x2 pixel patch. RMS norm, SiLU, a 3x3
conv, optional unpatchify; the output is clamped to ``[-1, 1]`` unless asked otherwise.

The frame axis. diffusers' ``AutoencoderKLQwenImage21`` is shaped for video ``(B, C, T, H,
W)`` but accepts a single frame only (``T = 1``; its convolutions fold the frame axis away).
This model takes images ``(B, C, H, W)``: it equals the reference on ``x[:, :, None]``. The
reference's stages that would halve time (``temporal_downsample``) still shape the shortcuts
of a single frame, and this model keeps that math: the shortcut treats the image as the
last frame of a causal window of ``2`` frames whose earlier frame is zero padding, so going
down half of its channel groups average zeros, and going up it keeps the copies that belong to
the last frame. The reference's temporal convolutions never run on a single frame; this model
has none (``model/convert/vae.py`` drops them and writes zeros back).

Numerics and parameter layout match diffusers 0.42 ``AutoencoderKLQwenImage21`` (the
residual variant, ``is_residual=True``); ``model/convert/vae.py`` maps configs and weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---- configuration ----------------------------------------------------------------------

# Per-channel statistics of the Qwen-Image-2.1 f16c64 latents (diffusers' defaults for
# AutoencoderKLQwenImage21): normalized latents are ``(z - mean) / std``.
QWEN_IMAGE_21_LATENTS_MEAN: tuple[float, ...] = (
    0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722,
    1.8873, -1.7177, -0.6510, 0.2732, 0.7562, -0.6163, -1.0277, 3.8363,
    2.0210, 0.0472, 0.9320, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464,
    -0.5236, 1.2826, 3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955,
    -0.0342, -1.0265, -0.7636, 3.0555, 0.0746, -3.0751, -0.1076, 1.7376,
    -1.0914, -1.9435, -0.2784, -1.3680, 0.4809, -0.4433, 0.3764, 0.5729,
    -2.0595, 1.0960, -1.3260, -2.0211, -5.0179, 0.5275, 4.0162, 1.8505,
    0.3026, 1.9373, 1.4937, 0.2632, 0.5547, -1.7121, -0.1562, 0.0304,
)  # fmt: skip
QWEN_IMAGE_21_LATENTS_STD: tuple[float, ...] = (
    3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.7910,
    3.0785, 3.6500, 3.9308, 3.0904, 2.8778, 3.7675, 3.7320, 5.0756,
    3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.9454, 3.0988, 4.2489,
    3.4896, 3.8513, 3.9323, 3.4719, 3.7498, 4.2830, 3.5694, 4.2467,
    3.9037, 3.2947, 5.0770, 3.5075, 3.2700, 3.4767, 2.8063, 5.1125,
    3.5327, 4.7833, 3.1286, 4.1819, 3.8527, 3.8312, 3.5605, 4.3875,
    3.9624, 4.0168, 3.5643, 4.0550, 5.5614, 4.2963, 4.4080, 3.4959,
    3.8747, 3.7608, 3.5735, 3.1490, 3.7662, 3.6746, 3.4563, 3.8161,
)  # fmt: skip

# Bounds of the log-variance, as diffusers' DiagonalGaussianDistribution clamps it.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


@dataclass(kw_only=True, slots=True)
class VAEConfig:
    """Shape of the residual VAE. The defaults are the Qwen-Image-2.1 f16c64 VAE."""

    in_channels: int = 4
    """C_img: channels of the input images (4: RGBA, 3: RGB), before patchify."""
    out_channels: int = 4
    """Channels of the decoded images, after unpatchify."""
    latent_channels: int = 64
    """z: channels of the latents (the Gaussian has ``2 z`` moment channels)."""
    encoder_width: int = 96
    """Channels of the encoder's first conv; stage i outputs ``encoder_width * multiplier i``."""
    decoder_width: int = 144
    """As ``encoder_width``, for the decoder (its stages run the multipliers in reverse)."""
    width_multipliers: tuple[int, ...] = (1, 2, 4, 8, 8)
    """One entry per stage; every stage but the last halves the resolution."""
    blocks_per_stage: int = 2
    """Residual blocks per encoder stage; decoder stages have one more."""
    temporal_downsample: tuple[bool, ...] = (False, True, True, True)
    """Per down stage (``len(width_multipliers) - 1`` entries): whether the reference halves
    time there. On a single frame it only changes the shortcuts (see the module docstring);
    the decoder mirrors it in reverse."""
    patch_size: int = 1
    """p: images are folded p x p into channels before the encoder (and unfolded after the
    decoder); 1 in Qwen-Image-2.1."""
    dropout: float = 0.0
    """Dropout probability inside every residual block (between the two convs)."""
    latents_mean: tuple[float, ...] | None = None
    """Per-channel latent mean (z entries) for ``normalize_latents``; None: zeros."""
    latents_std: tuple[float, ...] | None = None
    """Per-channel latent standard deviation (z entries, > 0); None: ones."""

    @property
    def num_stages(self) -> int:
        """Stages of the encoder (and of the decoder)."""
        return len(self.width_multipliers)

    @property
    def spatial_factor(self) -> int:
        """f: pixels per latent pixel along each side."""
        return self.patch_size * (1 << (self.num_stages - 1))

    def validate(self) -> None:
        """Raise ``ValueError`` when the fields are inconsistent."""
        positive = {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.latent_channels,
            "encoder_width": self.encoder_width,
            "decoder_width": self.decoder_width,
            "blocks_per_stage": self.blocks_per_stage,
            "patch_size": self.patch_size,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"VAEConfig.{name} must be >= 1, got {value}")
        if not self.width_multipliers or any(m < 1 for m in self.width_multipliers):
            raise ValueError(
                f"VAEConfig.width_multipliers must be positive, got {self.width_multipliers}"
            )
        if len(self.temporal_downsample) != self.num_stages - 1:
            raise ValueError(
                f"VAEConfig.temporal_downsample needs {self.num_stages - 1} entries (one per "
                f"down stage), got {len(self.temporal_downsample)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VAEConfig.dropout must be in [0, 1), got {self.dropout}")
        for name, stats in (("latents_mean", self.latents_mean), ("latents_std", self.latents_std)):
            if stats is not None and len(stats) != self.latent_channels:
                raise ValueError(
                    f"VAEConfig.{name} needs latent_channels={self.latent_channels} entries, "
                    f"got {len(stats)}"
                )
        if self.latents_std is not None and any(s <= 0 for s in self.latents_std):
            raise ValueError("VAEConfig.latents_std must be positive")


def vae_f16c64() -> VAEConfig:
    """Qwen-Image-2.1's VAE: RGBA, 16x downsampling, 64 latent channels, its latent stats."""
    return VAEConfig(latents_mean=QWEN_IMAGE_21_LATENTS_MEAN, latents_std=QWEN_IMAGE_21_LATENTS_STD)


def vae_f8c16() -> VAEConfig:
    """The same family at Qwen-Image-1's latent shape: RGB, 8x downsampling, 16 channels.

    No pretrained weights exist for it; its latent statistics start at zero mean, unit std.
    """
    return VAEConfig(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        encoder_width=96,
        decoder_width=96,
        width_multipliers=(1, 2, 4, 4),
        temporal_downsample=(False, True, True),
    )


def vae_debug() -> VAEConfig:
    """CPU-tiny: RGBA, 8x downsampling, 8 latent channels, widths 8 / 12, one block per stage."""
    return VAEConfig(
        in_channels=4,
        out_channels=4,
        latent_channels=8,
        encoder_width=8,
        decoder_width=12,
        width_multipliers=(1, 2, 2, 2),
        blocks_per_stage=1,
        temporal_downsample=(False, True, True),
    )


# ---- latent distribution ----------------------------------------------------------------


@dataclass(slots=True)
class DiagonalGaussian:
    """The encoder's posterior: independent Gaussians per latent element."""

    mean: Tensor
    """(B, z, h, w)"""
    logvar: Tensor
    """(B, z, h, w), clamped to [LOGVAR_MIN, LOGVAR_MAX]"""

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)  # (B, z, h, w)

    def mode(self) -> Tensor:
        """The most likely latents: the mean."""
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """``mean + std * eps`` with ``eps ~ N(0, 1)`` drawn from ``generator``."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise


# ---- building blocks --------------------------------------------------------------------


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels of ``(B, C, H, W)``: ``x / ||x||_C * sqrt(C) * weight``.

    Computed in fp32 (half-precision inputs are upcast, the result cast back); no epsilon
    beyond the 1e-12 floor of the norm.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = channels**0.5
        self.weight = nn.Parameter(torch.ones(channels))  # (C,)

    def forward(self, x: Tensor) -> Tensor:
        normed = F.normalize(x.float(), dim=1).to(x.dtype)  # (B, C, H, W)
        out: Tensor = normed * self.scale * self.weight.view(-1, 1, 1)
        return out


class ResidualBlock(nn.Module):
    """``conv2(drop(silu(norm2(conv1(silu(norm1(x))))))) + skip(x)``, skip 1x1 if widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = ChannelRMSNorm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip: nn.Module = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        out: Tensor = h + self.skip(x)
        return out


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over the H * W pixels, pre-norm, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = ChannelRMSNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = self.qkv(tokens).unsqueeze(1).chunk(3, dim=-1)  # 3 x (B, 1, H*W, C)
        attended = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, H*W, C)
        out = self.out(attended).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        result: Tensor = x + out
        return result


class MiddleBlock(nn.Module):
    """Residual block, self-attention, residual block, all at one width."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block1 = ResidualBlock(channels, channels, dropout)
        self.attention = SpatialSelfAttention(channels)
        self.block2 = ResidualBlock(channels, channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.block2(self.attention(self.block1(x)))  # (B, C, H, W)
        return out


class SpaceToChannelAverage(nn.Module):
    """Non-parametric down shortcut: fold s x s patches into channels, average channel groups.

    ``(B, C_in, H, W) -> (B, C_out, H / s, W / s)``. The folded tensor has ``C_in * t * s * s``
    channels ordered (input channel, frame slot, row offset, column offset); output channel
    ``o`` is the mean of folded channels ``[o * g, (o + 1) * g)`` with ``g = C_in * t * s * s /
    C_out``. With ``t > 1`` the image is the last of ``t`` frame slots and the earlier slots
    are zeros (a causal window padded at its start), so they count in the means as zeros.
    """

    def __init__(
        self, in_channels: int, out_channels: int, spatial_factor: int, temporal_factor: int
    ) -> None:
        super().__init__()
        folded = in_channels * temporal_factor * spatial_factor**2
        if folded % out_channels:
            raise ValueError(
                f"space-to-channel averaging: {in_channels} channels x {temporal_factor} frame "
                f"slots x {spatial_factor}^2 must be divisible by {out_channels}"
            )
        self.out_channels = out_channels
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        s, t = self.spatial_factor, self.temporal_factor
        if h % s or w % s:
            raise ValueError(f"space-to-channel averaging: {h}x{w} is not divisible by {s}")
        x = x.view(b, c, h // s, s, w // s, s).permute(0, 1, 3, 5, 2, 4)  # (B, C, s, s, h, w)
        x = x.reshape(b, c, 1, s * s, h // s, w // s)  # (B, C, 1, s*s, h, w)
        if t > 1:
            padding = x.new_zeros(b, c, t - 1, s * s, h // s, w // s)
            x = torch.cat([padding, x], dim=2)  # (B, C, t, s*s, h, w)
        x = x.reshape(b, self.out_channels, -1, h // s, w // s)  # (B, C_out, g, h, w)
        return x.mean(dim=2)  # (B, C_out, h, w)


class ChannelDuplicateUp(nn.Module):
    """Non-parametric up shortcut: repeat channels, unfold the copies into s x s patches.

    ``(B, C_in, H, W) -> (B, C_out, H * s, W * s)``. Each input channel is repeated ``r =
    C_out * t * s * s / C_in`` times; the ``C_out * t * s * s`` copies are ordered (output
    channel, frame slot, row offset, column offset), and the image keeps the last frame slot
    (``t > 1`` is the mirror of ``SpaceToChannelAverage``'s zero-padded causal window).
    """

    def __init__(
        self, in_channels: int, out_channels: int, spatial_factor: int, temporal_factor: int
    ) -> None:
        super().__init__()
        unfolded = out_channels * temporal_factor * spatial_factor**2
        if unfolded % in_channels:
            raise ValueError(
                f"channel duplication: {out_channels} channels x {temporal_factor} frame slots "
                f"x {spatial_factor}^2 must be divisible by {in_channels}"
            )
        self.out_channels = out_channels
        self.spatial_factor = spatial_factor
        self.temporal_factor = temporal_factor
        self.repeats = unfolded // in_channels

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        s, t, c = self.spatial_factor, self.temporal_factor, self.out_channels
        x = x.repeat_interleave(self.repeats, dim=1)  # (B, C_out*t*s*s, H, W)
        x = x.view(b, c, t, s, s, h, w)[:, :, t - 1]  # (B, C_out, s, s, H, W)
        return x.permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * s, w * s)  # (B, C_out, H*s, W*s)


class Downsample(nn.Module):
    """Halve the resolution: pad one zero row/column at the bottom/right, 3x3 conv, stride 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H, W) -> (B, C, H/2, W/2)
        return out


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour 2x (in fp32), then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        up = F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)
        out: Tensor = self.conv(up)  # (B, C, H, W) -> (B, C, 2H, 2W)
        return out


class EncoderStage(nn.Module):
    """Residual blocks, then an optional stride-2 conv; a space-to-channel average around it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_blocks: int,
        downsample: bool,
        temporal: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.shortcut = SpaceToChannelAverage(
            in_channels,
            out_channels,
            spatial_factor=2 if downsample else 1,
            temporal_factor=2 if temporal else 1,
        )
        self.blocks = nn.ModuleList(
            ResidualBlock(out_channels if j else in_channels, out_channels, dropout)
            for j in range(num_blocks)
        )
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C_in, H, W) -> (B, C_out, H / 2, W / 2) (or H, W in the last stage)
        h = x
        for block in self.blocks:
            h = block(h)
        if self.downsample is not None:
            h = self.downsample(h)
        out: Tensor = h + self.shortcut(x)
        return out


class DecoderStage(nn.Module):
    """Residual blocks, then an optional 2x upsampling; a channel duplication around it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_blocks: int,
        upsample: bool,
        temporal: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ResidualBlock(out_channels if j else in_channels, out_channels, dropout)
            for j in range(num_blocks)
        )
        self.upsample = Upsample(out_channels) if upsample else None
        self.shortcut = (
            ChannelDuplicateUp(
                in_channels, out_channels, spatial_factor=2, temporal_factor=2 if temporal else 1
            )
            if upsample
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C_in, H, W) -> (B, C_out, 2H, 2W) (or H, W in the last stage)
        h = x
        for block in self.blocks:
            h = block(h)
        if self.upsample is not None:
            h = self.upsample(h)
        if self.shortcut is not None:
            h = h + self.shortcut(x)
        return h


class Encoder(nn.Module):
    """Patchified image ``(B, C_img * p * p, H, W)`` -> ``(B, 2 z, H / 2^(n-1), W / 2^(n-1))``."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        n = config.num_stages
        widths = [config.encoder_width * m for m in (1, *config.width_multipliers)]
        self.conv_in = nn.Conv2d(config.in_channels * config.patch_size**2, widths[0], 3, padding=1)
        self.stages = nn.ModuleList(
            EncoderStage(
                widths[i],
                widths[i + 1],
                num_blocks=config.blocks_per_stage,
                downsample=i < n - 1,
                temporal=i < n - 1 and config.temporal_downsample[i],
                dropout=config.dropout,
            )
            for i in range(n)
        )
        self.middle = MiddleBlock(widths[-1], config.dropout)
        self.norm_out = ChannelRMSNorm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)  # (B, W_0, H, W)
        for stage in self.stages:
            x = stage(x)  # (B, W_i, H / 2^i, W / 2^i)
        x = self.middle(x)
        out: Tensor = self.conv_out(F.silu(self.norm_out(x)))  # (B, 2z, h, w)
        return out


class Decoder(nn.Module):
    """Latents ``(B, z, h, w)`` -> patchified image ``(B, C_img * p * p, h * 2^(n-1), ...)``."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        n = config.num_stages
        multipliers = (config.width_multipliers[-1], *reversed(config.width_multipliers))
        widths = [config.decoder_width * m for m in multipliers]
        temporal = tuple(reversed(config.temporal_downsample))
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.middle = MiddleBlock(widths[0], config.dropout)
        self.stages = nn.ModuleList(
            DecoderStage(
                widths[i],
                widths[i + 1],
                num_blocks=config.blocks_per_stage + 1,
                upsample=i < n - 1,
                temporal=i < n - 1 and temporal[i],
                dropout=config.dropout,
            )
            for i in range(n)
        )
        self.norm_out = ChannelRMSNorm(widths[-1])
        self.conv_out = nn.Conv2d(
            widths[-1], config.out_channels * config.patch_size**2, 3, padding=1
        )

    def forward(self, z: Tensor) -> Tensor:
        x = self.middle(self.conv_in(z))  # (B, W_0, h, w)
        for stage in self.stages:
            x = stage(x)  # (B, W_i, h * 2^i, w * 2^i)
        out: Tensor = self.conv_out(F.silu(self.norm_out(x)))  # (B, C_out * p * p, H/p, W/p)
        return out


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """``(B, C, H, W) -> (B, C * p * p, H / p, W / p)``; channels ordered (c, column, row)."""
    if patch_size == 1:
        return x
    b, c, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch_size={p}")
    x = x.view(b, c, h // p, p, w // p, p).permute(0, 1, 5, 3, 2, 4)  # (B, C, p_w, p_h, h, w)
    return x.reshape(b, c * p * p, h // p, w // p)


def unpatchify(x: Tensor, patch_size: int) -> Tensor:
    """The inverse of :func:`patchify`."""
    if patch_size == 1:
        return x
    b, cpp, h, w = x.shape
    p = patch_size
    x = x.view(b, cpp // (p * p), p, p, h, w).permute(0, 1, 4, 3, 5, 2)  # (B, C, h, p_h, w, p_w)
    return x.reshape(b, cpp // (p * p), h * p, w * p)


# ---- the model --------------------------------------------------------------------------


class ResidualVAE(nn.Module):
    """Images in ``[-1, 1]`` <-> latents; see the module docstring."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        z = config.latent_channels
        self.encoder = Encoder(config)
        self.to_moments = nn.Conv2d(2 * z, 2 * z, 1)
        self.from_latents = nn.Conv2d(z, z, 1)
        self.decoder = Decoder(config)

    def encode(self, images: Tensor) -> DiagonalGaussian:
        """Images ``(B, C_img, H, W)`` in [-1, 1] -> posterior over ``(B, z, H / f, W / f)``.

        H and W must be multiples of ``config.spatial_factor`` (f).
        """
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected images (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}"
            )
        f = self.config.spatial_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"image size {images.shape[2]}x{images.shape[3]} is not divisible by {f}"
            )
        moments = self.to_moments(self.encoder(patchify(images, self.config.patch_size)))
        mean, logvar = moments.chunk(2, dim=1)  # 2 x (B, z, h, w)
        return DiagonalGaussian(mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))

    def decode(self, latents: Tensor, *, clamp: bool = True) -> Tensor:
        """``(B, z, h, w)`` raw (not normalized) latents -> images ``(B, C_out, h*f, w*f)``.

        ``clamp``: clamp to [-1, 1] as the reference does; pass False for training losses.
        """
        if latents.dim() != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"expected latents (B, {self.config.latent_channels}, h, w), "
                f"got {tuple(latents.shape)}"
            )
        images = unpatchify(self.decoder(self.from_latents(latents)), self.config.patch_size)
        return images.clamp(-1.0, 1.0) if clamp else images

    def forward(
        self,
        images: Tensor,
        *,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
        clamp: bool = True,
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Autoencode: ``(reconstruction (B, C_out, H, W), posterior)``.

        Decodes a posterior sample (drawn from ``generator``) or, by default, its mean.
        """
        posterior = self.encode(images)
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(latents, clamp=clamp), posterior

    def _latent_stats(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        # float32 from the config, not the buffers: a bf16 model would round the statistics.
        z = self.config.latent_channels
        mean = self.config.latents_mean or (0.0,) * z
        std = self.config.latents_std or (1.0,) * z
        device = latents.device
        return (
            torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1),
        )  # (1, z, 1, 1) each

    def normalize_latents(self, latents: Tensor) -> Tensor:
        """Raw latents ``(B, z, h, w)`` -> the diffusion model's space: ``(z - mean) / std``.

        Computed in float32, returned in the dtype of ``latents``.
        """
        mean, std = self._latent_stats(latents)
        return ((latents.float() - mean) / std).to(latents.dtype)

    def denormalize_latents(self, latents: Tensor) -> Tensor:
        """The inverse of :meth:`normalize_latents`: ``z * std + mean`` (in float32)."""
        mean, std = self._latent_stats(latents)
        return (latents.float() * std + mean).to(latents.dtype)


def with_opaque_alpha(images: Tensor) -> Tensor:
    """RGB ``(B, 3, H, W)`` in [-1, 1] -> RGBA ``(B, 4, H, W)`` with alpha 1 (opaque).

    The RGBA VAE reads all four channels; RGB inputs are made opaque RGBA first, as
    diffusers' Qwen-Image-2.1 pipeline does.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images (B, 3, H, W), got {tuple(images.shape)}")
    alpha = images.new_ones(images.shape[0], 1, *images.shape[2:])  # (B, 1, H, W)
    return torch.cat([images, alpha], dim=1)
