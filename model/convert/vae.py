"""diffusers ``AutoencoderKLQwenImage21`` <-> our ``ResidualVAE``: config and weights.

Both hold the same tensors under other names, with three layout differences: RMS-norm
weights are ``(C,)`` here and ``(C, 1, 1, 1)`` (``(C, 1, 1)`` in attention) there; the
attention projections are linears here and 1x1 convs there; and diffusers' resamplers carry
a 1x1 ``time_conv`` that only acts on frames after the first, which its model never sees (it
accepts one frame). ``vae_from_diffusers`` checks and drops those ``time_conv`` tensors;
``vae_to_diffusers`` writes zeros for them. Only the residual variant (``is_residual=True``)
exists here. Unknown, missing or misshapen tensors and config values that one side cannot
express raise ``ConversionError``.

``load_diffusers_vae`` / ``save_diffusers_vae`` read and write a diffusers checkpoint
directory (``config.json`` + ``diffusion_pytorch_model.safetensors``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.convert.checkpoint import (
    DIFFUSERS_WEIGHTS_NAME,
    ConversionError,
    StateDict,
    check_shapes,
    read_config,
    read_state_dict,
    write_checkpoint,
)
from model.vae import (
    QWEN_IMAGE_21_LATENTS_MEAN,
    QWEN_IMAGE_21_LATENTS_STD,
    ChannelRMSNorm,
    ResidualVAE,
    VAEConfig,
)

DIFFUSERS_CLASS = "AutoencoderKLQwenImage21"


# diffusers config keys we read; keys starting with "_" (class name, version) are metadata.
_DIFFUSERS_KEYS = frozenset(
    {
        "base_dim",
        "decoder_base_dim",
        "z_dim",
        "dim_mult",
        "num_res_blocks",
        "attn_scales",  # read by the non-residual variant only: no effect here
        "temperal_downsample",
        "dropout",
        "latents_mean",
        "latents_std",
        "is_residual",
        "in_channels",
        "out_channels",
        "patch_size",
        "scale_factor_temporal",  # metadata (tiling), derived from the fields above
        "scale_factor_spatial",
    }
)

# Module-path renames, ours -> diffusers, applied in order to a parameter's module path.
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^encoder\.stages\.(\d+)\.blocks\.", r"encoder.down_blocks.\1.resnets."),
        (
            r"^encoder\.stages\.(\d+)\.downsample\.conv$",
            r"encoder.down_blocks.\1.downsampler.resample.1",
        ),
        (r"^decoder\.stages\.(\d+)\.blocks\.", r"decoder.up_blocks.\1.resnets."),
        (
            r"^decoder\.stages\.(\d+)\.upsample\.conv$",
            r"decoder.up_blocks.\1.upsampler.resample.1",
        ),
        (r"\.middle\.block1\b", ".mid_block.resnets.0"),
        (r"\.middle\.block2\b", ".mid_block.resnets.1"),
        (r"\.middle\.attention\b", ".mid_block.attentions.0"),
        (r"\.attentions\.0\.qkv$", ".attentions.0.to_qkv"),
        (r"\.attentions\.0\.out$", ".attentions.0.proj"),
        (r"\.skip$", ".conv_shortcut"),
        (r"^to_moments$", "quant_conv"),
        (r"^from_latents$", "post_quant_conv"),
    )
)


@dataclass(frozen=True, slots=True)
class _Tensor:
    """One tensor as both sides name and shape it."""

    ours: str
    theirs: str
    our_shape: tuple[int, ...]
    their_shape: tuple[int, ...]


# ---- config -----------------------------------------------------------------------------


def config_from_diffusers(diffusers_config: Mapping[str, Any]) -> VAEConfig:
    """Our config for a diffusers ``AutoencoderKLQwenImage21`` config (its defaults filled in)."""
    unknown = sorted(
        k for k in diffusers_config if not k.startswith("_") and k not in _DIFFUSERS_KEYS
    )
    if unknown:
        raise ConversionError(f"unknown {DIFFUSERS_CLASS} config keys: {unknown}")
    get = diffusers_config.get
    if not bool(get("is_residual", True)):
        raise ConversionError(
            f"{DIFFUSERS_CLASS} with is_residual=False (the Wan-2.1 layout, no shortcuts) "
            "is not supported; only the residual variant is"
        )
    patch = get("patch_size")
    patch_size = 1 if patch is None else int(patch)
    if patch_size < 1:
        raise ConversionError(f"patch_size must be >= 1 or None, got {patch}")
    base_dim = int(get("base_dim", 96))
    decoder_base_dim = get("decoder_base_dim", 144)
    channels: dict[str, int] = {}
    for key in ("in_channels", "out_channels"):
        value = int(get(key, 4))
        if value % patch_size**2:
            raise ConversionError(f"{key}={value} is not divisible by patch_size^2={patch_size**2}")
        channels[key] = value // patch_size**2
    config = VAEConfig(
        in_channels=channels["in_channels"],
        out_channels=channels["out_channels"],
        latent_channels=int(get("z_dim", 64)),
        encoder_width=base_dim,
        decoder_width=base_dim if decoder_base_dim is None else int(decoder_base_dim),
        width_multipliers=tuple(int(m) for m in get("dim_mult", (1, 2, 4, 8, 8))),
        blocks_per_stage=int(get("num_res_blocks", 2)),
        temporal_downsample=tuple(
            bool(t) for t in get("temperal_downsample", (False, True, True, True))
        ),
        patch_size=patch_size,
        dropout=float(get("dropout", 0.0)),
        latents_mean=_floats(get("latents_mean", QWEN_IMAGE_21_LATENTS_MEAN)),
        latents_std=_floats(get("latents_std", QWEN_IMAGE_21_LATENTS_STD)),
    )
    try:
        config.validate()
    except ValueError as error:
        raise ConversionError(f"invalid {DIFFUSERS_CLASS} config: {error}") from error
    return config


def config_to_diffusers(config: VAEConfig) -> dict[str, Any]:
    """The diffusers ``AutoencoderKLQwenImage21`` config (constructor kwargs) for ours."""
    config.validate()
    z = config.latent_channels
    p2 = config.patch_size**2
    return {
        "base_dim": config.encoder_width,
        "decoder_base_dim": config.decoder_width,
        "z_dim": z,
        "dim_mult": list(config.width_multipliers),
        "num_res_blocks": config.blocks_per_stage,
        "attn_scales": [],
        "temperal_downsample": list(config.temporal_downsample),
        "dropout": config.dropout,
        "latents_mean": list(config.latents_mean or (0.0,) * z),
        "latents_std": list(config.latents_std or (1.0,) * z),
        "is_residual": True,
        "in_channels": config.in_channels * p2,
        "out_channels": config.out_channels * p2,
        "patch_size": None if config.patch_size == 1 else config.patch_size,
        "scale_factor_temporal": 2 ** sum(config.temporal_downsample),
        "scale_factor_spatial": config.spatial_factor,
    }


# ---- weights ----------------------------------------------------------------------------


def expected_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for ``config`` (what ``ResidualVAE`` holds)."""
    return {t.ours: t.our_shape for t in _tensors(config)}


def diffusers_expected_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    """diffusers' parameter names and shapes for ``config``, its unused ``time_conv`` included."""
    shapes = {t.theirs: t.their_shape for t in _tensors(config)}
    shapes.update(_time_convs(config))
    return shapes


def vae_from_diffusers(
    state_dict: Mapping[str, Tensor], diffusers_config: Mapping[str, Any]
) -> tuple[VAEConfig, StateDict]:
    """Our config and state dict from a diffusers ``AutoencoderKLQwenImage21``'s."""
    config = config_from_diffusers(diffusers_config)
    check_shapes(state_dict, diffusers_expected_shapes(config), f"{DIFFUSERS_CLASS} state dict")
    converted = {t.ours: state_dict[t.theirs].reshape(t.our_shape) for t in _tensors(config)}
    return config, converted


def vae_to_diffusers(
    state_dict: Mapping[str, Tensor], config: VAEConfig
) -> tuple[dict[str, Any], StateDict]:
    """A diffusers ``AutoencoderKLQwenImage21`` config and state dict from ours.

    The ``time_conv`` tensors diffusers declares but never applies to a single frame are zeros
    (in the dtype and on the device of ``to_moments.weight``).
    """
    diffusers_config = config_to_diffusers(config)
    check_shapes(state_dict, expected_shapes(config), "ResidualVAE state dict")
    converted = {t.theirs: state_dict[t.ours].reshape(t.their_shape) for t in _tensors(config)}
    like = state_dict["to_moments.weight"]
    for name, shape in _time_convs(config).items():
        converted[name] = torch.zeros(shape, dtype=like.dtype, device=like.device)
    return diffusers_config, converted


def load_diffusers_vae(directory: Path) -> ResidualVAE:
    """Our VAE from a diffusers ``AutoencoderKLQwenImage21`` checkpoint directory (fp32)."""
    diffusers_config = read_config(directory)
    name = diffusers_config.get("_class_name", DIFFUSERS_CLASS)
    if name != DIFFUSERS_CLASS:
        raise ConversionError(f"{directory}: a {name} checkpoint, not {DIFFUSERS_CLASS}")
    config, state = vae_from_diffusers(read_state_dict(directory), diffusers_config)
    model = ResidualVAE(config)
    model.load_state_dict(state)
    return model


def save_diffusers_vae(model: ResidualVAE, directory: Path) -> list[Path]:
    """Write ``model`` as a diffusers ``AutoencoderKLQwenImage21`` checkpoint; the files written."""
    diffusers_config, state = vae_to_diffusers(model.state_dict(), model.config)
    return write_checkpoint(
        directory,
        config={"_class_name": DIFFUSERS_CLASS, **diffusers_config},
        state_dict=state,
        weights_name=DIFFUSERS_WEIGHTS_NAME,
    )


# ---- helpers ----------------------------------------------------------------------------


def _meta_model(config: VAEConfig) -> ResidualVAE:
    # Names and shapes only: no memory, no initialisation cost.
    with torch.device("meta"):
        return ResidualVAE(config)


def _tensors(config: VAEConfig) -> list[_Tensor]:
    tensors = []
    for module_name, module in _meta_model(config).named_modules():
        theirs_module = module_name
        for pattern, replacement in _RENAMES:
            theirs_module = pattern.sub(replacement, theirs_module)
        for param_name, param in module.named_parameters(recurse=False):
            our_shape = tuple(param.shape)
            their_param, their_shape = param_name, our_shape
            if isinstance(module, ChannelRMSNorm):
                # (C,) here; (C, 1, 1) in diffusers' attention, (C, 1, 1, 1) elsewhere.
                their_param = "gamma"
                in_attention = module_name.endswith(".attention.norm")
                their_shape = (*our_shape, 1, 1) if in_attention else (*our_shape, 1, 1, 1)
            elif isinstance(module, nn.Linear) and param_name == "weight":
                their_shape = (*our_shape, 1, 1)  # a 1x1 conv there
            tensors.append(
                _Tensor(
                    ours=f"{module_name}.{param_name}",
                    theirs=f"{theirs_module}.{their_param}",
                    our_shape=our_shape,
                    their_shape=their_shape,
                )
            )
    return tensors


def _time_convs(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    """diffusers' ``time_conv`` tensors: 1x1 convs of the resamplers of temporal stages."""
    shapes: dict[str, tuple[int, ...]] = {}
    mults = config.width_multipliers
    for i, temporal in enumerate(config.temporal_downsample):
        if temporal:  # encoder stage i: C -> C
            c = config.encoder_width * mults[i]
            name = f"encoder.down_blocks.{i}.downsampler.time_conv"
            shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c, c, 1, 1), (c,)
    for i, temporal in enumerate(reversed(config.temporal_downsample)):
        if temporal:  # decoder stage i: C -> 2 C (two frames out of one)
            c = config.decoder_width * mults[::-1][i]
            name = f"decoder.up_blocks.{i}.upsampler.time_conv"
            shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (2 * c, c, 1, 1), (2 * c,)
    return shapes


def _floats(value: Any) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value)
