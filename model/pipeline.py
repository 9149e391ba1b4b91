"""Inference of the generator: prompt -> condition -> sampled latents -> image, and editing.

A generator directory, written by :meth:`Generator.save` and read by :meth:`Generator.load`::

    <dir>/generator.json            the transformer, VAE and sampler configs, the condition
                                    encoder and the image size
    <dir>/transformer.safetensors   the diffusion transformer's weights
    <dir>/vae.safetensors           the VAE's weights

:meth:`Generator.generate` encodes the prompts (text-to-image template, or the editing one
when input images are given), integrates the flow ODE from seeded noise with the sampler
config (true CFG against the empty prompt when ``guidance_scale`` is not 1), and decodes.
Input images are encoded with the same VAE (posterior mean, normalized) and enter the
transformer as ``input_latents``. Images go in and come out as (N, 3, H, W) in [0, 1].
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.condition import (
    ConditionEncoder,
    ConditionEncoderConfig,
    ConditionTask,
    minilm_condition,
    qwen3_vl_condition,
    qwen25_vl_condition,
)
from model.sampling import SamplerConfig, Velocity, sample_euler
from model.transformer import DiffusionTransformer, TransformerConfig
from model.vae import ResidualVAE, VAEConfig

CONFIG_FILE = "generator.json"
TRANSFORMER_FILE = "transformer.safetensors"
VAE_FILE = "vae.safetensors"

ConditionName = Literal["minilm", "qwen25-vl", "qwen3-vl"]
_ConfigT = TypeVar("_ConfigT")


class GeneratorError(ValueError):
    """A generator directory or request that cannot be used as it is."""


@dataclass(kw_only=True, slots=True)
class GeneratorConfig:
    """What a generator is made of and how it samples."""

    transformer: TransformerConfig
    """The diffusion transformer (its ``latent_channels`` are the VAE's, its
    ``condition_dim`` the condition encoder's width)."""
    vae: VAEConfig
    """The VAE that decodes (and, for editing, encodes) images."""
    condition: ConditionName = "minilm"
    """The condition encoder: the packaged MiniLM, or a Qwen-VL model at ``condition_path``."""
    condition_path: str | None = None
    """Local directory of a Qwen-VL condition encoder."""
    height: int = 64
    """Image height in pixels (a multiple of the VAE's spatial factor times the patch size)."""
    width: int = 64
    """Image width in pixels."""
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(steps=20, dynamic_shift=False, guidance_scale=1.0)
    )
    """Steps, schedule and guidance of the ODE sampler."""

    def validate(self) -> None:
        """Raise :class:`GeneratorError` when the parts do not fit together."""
        self.transformer.validate()
        self.vae.validate()
        self.sampler.validate()
        if self.transformer.latent_channels != self.vae.latent_channels:
            raise GeneratorError(
                f"transformer reads {self.transformer.latent_channels}-channel latents, the "
                f"VAE makes {self.vae.latent_channels}"
            )
        step = self.vae.spatial_factor * self.transformer.patch_size
        if self.height % step or self.width % step or self.height < 1 or self.width < 1:
            raise GeneratorError(f"height and width must be positive multiples of {step}")
        if self.condition != "minilm" and self.condition_path is None:
            raise GeneratorError(f"condition {self.condition!r} needs condition_path")

    def condition_config(self) -> ConditionEncoderConfig:
        """The condition encoder's configuration."""
        if self.condition == "minilm":
            return minilm_condition()
        assert self.condition_path is not None  # validate()
        path = Path(self.condition_path)
        return (
            qwen25_vl_condition(path) if self.condition == "qwen25-vl" else qwen3_vl_condition(path)
        )


def _build(cls: type[_ConfigT], values: dict[str, Any]) -> _ConfigT:
    """A flat config dataclass from its JSON form (lists back to tuples)."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(values) - names
    if unknown:
        raise GeneratorError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def config_from_json(text: str) -> GeneratorConfig:
    """The :class:`GeneratorConfig` of a ``generator.json``."""
    try:
        raw = json.loads(text)
        return GeneratorConfig(
            transformer=_build(TransformerConfig, raw.pop("transformer")),
            vae=_build(VAEConfig, raw.pop("vae")),
            sampler=_build(SamplerConfig, raw.pop("sampler")),
            **raw,
        )
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise GeneratorError(f"{CONFIG_FILE}: not a generator config ({exc})") from exc


class Generator:
    """A transformer, a VAE and a condition encoder that turn prompts into images."""

    def __init__(
        self,
        config: GeneratorConfig,
        transformer: DiffusionTransformer,
        vae: ResidualVAE,
        encoder: ConditionEncoder,
    ) -> None:
        config.validate()
        if encoder.hidden_size != config.transformer.condition_dim:
            raise GeneratorError(
                f"the condition encoder is {encoder.hidden_size}-d, the transformer reads "
                f"condition_dim={config.transformer.condition_dim}"
            )
        self.config = config
        self.transformer = transformer.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.encoder = encoder

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, device: str = "cpu") -> Generator:
        """The generator saved in ``directory`` (never a hub)."""
        root = Path(directory)
        if not (root / CONFIG_FILE).is_file():
            raise GeneratorError(f"{root}: not a generator directory (no {CONFIG_FILE})")
        config = config_from_json((root / CONFIG_FILE).read_text())
        config.validate()
        transformer = DiffusionTransformer(config.transformer)
        vae = ResidualVAE(config.vae)
        try:
            transformer.load_state_dict(load_file(str(root / TRANSFORMER_FILE)))
            vae.load_state_dict(load_file(str(root / VAE_FILE)))
        except (RuntimeError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0]
            raise GeneratorError(f"{root}: weights do not load ({reason})") from exc
        encoder = ConditionEncoder.load(config.condition_config(), device=device)
        return cls(config, transformer.to(device), vae.to(device), encoder)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the generator directory (config and weights); returns it."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.transformer.state_dict().items()}
        save_file(state, str(root / TRANSFORMER_FILE))
        vae_state = {k: v.detach().cpu().contiguous() for k, v in self.vae.state_dict().items()}
        save_file(vae_state, str(root / VAE_FILE))
        (root / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=1) + "\n")
        return root

    def _encode_prompts(self, prompts: list[str], *, editing: bool) -> tuple[Tensor, Tensor]:
        task: ConditionTask = "image_editing" if editing else "text_to_image"
        hidden, mask = self.encoder.encode(prompts, task=task)  # (N, L, D), (N, L)
        dtype = next(self.transformer.parameters()).dtype
        return hidden.to(self.device, dtype), mask.to(self.device)

    def encode_images(self, images: Tensor) -> Tensor:
        """Normalized latents (N, z, h, w) of images (N, 3, H, W) in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise GeneratorError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32) * 2 - 1  # (N, 3, H, W) in [-1, 1]
        if self.config.vae.in_channels == 4:  # RGBA: opaque
            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        latents: Tensor = self.vae.normalize_latents(self.vae.encode(x).mean)
        return latents

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        *,
        seed: int = 0,
        input_images: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Images (N, 3, H, W) in [0, 1] for ``prompts``; with ``input_images`` (N, 3, H, W)
        in [0, 1] the prompts are editing instructions applied to them. One seed, one noise:
        the same call gives the same images. ``noise`` (N, z, h, w), when given, is the
        starting noise instead of the seed's (prompts drawn from one noise, as a GRPO group)."""
        if not prompts:
            raise GeneratorError("no prompts")
        config = self.config
        editing = input_images is not None
        condition, mask = self._encode_prompts(list(prompts), editing=editing)
        inputs: list[Tensor] = []
        if input_images is not None:
            if input_images.shape[0] != len(prompts):
                raise GeneratorError(
                    f"{input_images.shape[0]} input images for {len(prompts)} prompts"
                )
            inputs = [self.encode_images(input_images)]
        f = config.vae.spatial_factor
        shape = (len(prompts), config.vae.latent_channels, config.height // f, config.width // f)
        if noise is None:
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        elif tuple(noise.shape) != shape:
            raise GeneratorError(f"noise of shape {tuple(noise.shape)}, the prompts need {shape}")
        noise = noise.to(self.device)  # (N, z, h, w)

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            out: Tensor = self.transformer(x, t, condition, mask, input_latents=inputs)
            return out

        uncond: Velocity | None = None
        if config.sampler.guidance_scale != 1.0:
            empty, empty_mask = self._encode_prompts([""] * len(prompts), editing=editing)

            def unconditional(x: Tensor, t: Tensor) -> Tensor:
                out: Tensor = self.transformer(x, t, empty, empty_mask, input_latents=inputs)
                return out

            uncond = unconditional

        p = config.transformer.patch_size
        seq_len = (shape[2] // p) * (shape[3] // p)
        latents = sample_euler(
            velocity, noise, config.sampler, uncond_velocity=uncond, seq_len=seq_len
        )
        decoded = self.vae.decode(self.vae.denormalize_latents(latents))  # (N, C, H, W)
        return ((decoded[:, :3].float() + 1) / 2).clamp(0, 1)
