"""diffusers ``QwenImage21Transformer2DModel`` <-> our ``DiffusionTransformer``: config and weights.

Both models hold the same tensors (every linear is bias-free; the condition norm's weight is
zero-centred in both); only the names differ. ``transformer_from_diffusers`` takes a diffusers
state dict and its config (``model.config`` or the checkpoint's ``config.json``) and returns our
config and state dict; ``transformer_to_diffusers`` goes back. Unknown, missing or misshapen
tensors and config values that one side cannot express raise ``ConversionError``.
``diffusers_inputs`` turns our forward's inputs into the diffusers model's (for comparisons).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from model.convert.checkpoint import ConversionError, check_shapes, listing
from model.transformer import TransformerConfig, to_tokens

# Per-block names: ours <- diffusers, under ``blocks.{i}.`` / ``transformer_blocks.{i}.``.
_BLOCK_NAMES: dict[str, str] = {
    "attn.q_proj.weight": "attn.to_q.weight",
    "attn.k_proj.weight": "attn.to_k.weight",
    "attn.v_proj.weight": "attn.to_v.weight",
    "attn.out_proj.weight": "attn.to_out.0.weight",
    "attn.q_norm": "attn.norm_q.weight",
    "attn.k_norm": "attn.norm_k.weight",
    "mlp.gate_proj.weight": "img_mlp.gate_layer.weight",
    "mlp.up_proj.weight": "img_mlp.proj.weight",
    "mlp.down_proj.weight": "img_mlp.out.weight",
}

# Names outside the blocks: ours <- diffusers.
_GLOBAL_NAMES: dict[str, str] = {
    "latent_in.weight": "img_in.weight",
    "condition_in.norm_weight": "txt_in.text_norm.weight",
    "condition_in.fc1.weight": "txt_in.in_layer.weight",
    "condition_in.fc2.weight": "txt_in.out_layer.weight",
    "time_embed.fc1.weight": "time_text_embed.timestep_embedder.linear_1.weight",
    "time_embed.fc2.weight": "time_text_embed.timestep_embedder.linear_2.weight",
    "modulation.weight": "modulation.1.weight",
    "final_modulation.weight": "norm_out.linear.weight",
    "latent_out.weight": "proj_out.weight",
}

# diffusers config keys we read; keys starting with "_" (class name, version) are metadata.
_DIFFUSERS_KEYS = frozenset(
    {
        "patch_size",
        "in_channels",
        "out_channels",
        "num_layers",
        "attention_head_dim",
        "num_attention_heads",
        "context_in_dim",
        "mlp_ratio",
        "axes_dims_rope",
        "eps",
        "causal_condition",
    }
)

# Latent tokens per image slot of diffusers' ``img_mask`` (its ``_IMG_TOKENS_PER_SLOT``).
_DIFFUSERS_SLOT_TOKENS = 4

# What diffusers' model fixes and ours makes configurable: TransformerConfig field -> value.
_DIFFUSERS_FIXED: dict[str, Any] = {
    "rope_theta": 10000.0,
    "timestep_features": 256,
    "timestep_scale": 1000.0,
    "block_causal": True,
    "tokens_per_image_slot": _DIFFUSERS_SLOT_TOKENS,
}


def config_from_diffusers(diffusers_config: Mapping[str, Any]) -> TransformerConfig:
    """Our config for a diffusers ``QwenImage21Transformer2DModel`` config (defaults filled in)."""
    unknown = sorted(
        k for k in diffusers_config if not k.startswith("_") and k not in _DIFFUSERS_KEYS
    )
    if unknown:
        raise ConversionError(f"unknown QwenImage21Transformer2DModel config keys: {unknown}")
    # diffusers' defaults are the published shape, which is TransformerConfig()'s.
    defaults = TransformerConfig()
    get = diffusers_config.get
    in_channels = int(get("in_channels", defaults.latent_channels))
    out_channels = get("out_channels", in_channels)
    out_channels = in_channels if out_channels is None else int(out_channels)
    if out_channels != in_channels:
        raise ConversionError(
            f"out_channels={out_channels} differs from in_channels={in_channels}; "
            "the model predicts a velocity shaped like its input latents"
        )
    config = TransformerConfig(
        latent_channels=in_channels,
        patch_size=int(get("patch_size", defaults.patch_size)),
        condition_dim=int(get("context_in_dim", defaults.condition_dim)),
        num_layers=int(get("num_layers", defaults.num_layers)),
        num_heads=int(get("num_attention_heads", defaults.num_heads)),
        head_dim=int(get("attention_head_dim", defaults.head_dim)),
        mlp_ratio=int(get("mlp_ratio", defaults.mlp_ratio)),
        rope_axes_dims=_axes(get("axes_dims_rope", defaults.rope_axes_dims)),
        eps=float(get("eps", defaults.eps)),
        causal_condition=bool(get("causal_condition", defaults.causal_condition)),
        **_DIFFUSERS_FIXED,
    )
    try:
        config.validate()
    except ValueError as error:
        raise ConversionError(f"invalid diffusers config: {error}") from error
    return config


def config_to_diffusers(config: TransformerConfig) -> dict[str, Any]:
    """The diffusers ``QwenImage21Transformer2DModel`` config (constructor kwargs) for ours."""
    for name, fixed in _DIFFUSERS_FIXED.items():
        value = getattr(config, name)
        if value != fixed:
            raise ConversionError(
                f"QwenImage21Transformer2DModel fixes {name}={fixed!r}; this config has {value!r}"
            )
    return {
        "patch_size": config.patch_size,
        "in_channels": config.latent_channels,
        "out_channels": config.latent_channels,
        "num_layers": config.num_layers,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "context_in_dim": config.condition_dim,
        "mlp_ratio": config.mlp_ratio,
        "axes_dims_rope": tuple(config.rope_axes_dims),
        "eps": config.eps,
        "causal_condition": config.causal_condition,
    }


def diffusers_inputs(
    latents: Tensor,
    timestep: Tensor,
    condition: Tensor,
    condition_mask: Tensor | None = None,
    *,
    input_latents: Sequence[Tensor] = (),
    image_slots: Tensor | None = None,
    patch_size: int = 1,
) -> dict[str, Any]:
    """Keyword arguments of ``QwenImage21Transformer2DModel.forward`` for our model's inputs.

    The arguments are those of ``DiffusionTransformer.forward`` (``patch_size`` is the model's).
    Images are packed as our :func:`~model.transformer.to_tokens` packs them, input images
    first, the target last. Without ``image_slots``, slots for the input images are appended
    after the condition (zero hidden states, which diffusers replaces by the image tokens), as
    our model places them. diffusers returns ``(out,)`` with ``out`` (B, N, C * p * p) over
    every image token: the target's prediction is ``from_tokens(out[:, -T:], H / p, W / p, p)``
    with ``T = H * W / p^2``.
    """
    p = patch_size
    batch = latents.shape[0]
    device = latents.device
    images = [*input_latents, latents]
    shapes = [(1, image.shape[2] // p, image.shape[3] // p) for image in images]
    input_tokens = sum(h * w for _, h, w in shapes[:-1])
    target_tokens = shapes[-1][1] * shapes[-1][2]
    slot = _DIFFUSERS_SLOT_TOKENS
    if input_tokens % slot or target_tokens % slot:
        raise ValueError(
            f"diffusers counts image tokens in slots of {slot}: the input images have "
            f"{input_tokens} tokens, the target {target_tokens}"
        )
    if image_slots is None:
        slots = input_tokens // slot
        padding = condition.new_zeros(batch, slots, condition.shape[2])  # (B, S, Dc)
        condition = torch.cat([condition, padding], dim=1)
        image_slots = torch.cat(
            [
                torch.zeros(condition.shape[1] - slots, dtype=torch.bool, device=device),
                torch.ones(slots, dtype=torch.bool, device=device),
            ]
        )
        if condition_mask is not None:
            condition_mask = torch.cat([condition_mask, condition_mask.new_ones(batch, slots)], 1)
    target_slots = torch.ones(target_tokens // slot, dtype=torch.bool, device=device)
    img_mask = torch.cat([image_slots.to(device=device, dtype=torch.bool), target_slots])
    return {
        "hidden_states": torch.cat([to_tokens(image, p) for image in images], dim=1),
        "encoder_hidden_states": condition,  # (B, Lc + S, Dc)
        "encoder_hidden_states_mask": condition_mask,  # (B, Lc + S) or None
        "timestep": timestep,  # (B,)
        "img_shapes": [shapes] * batch,
        "img_mask": img_mask[None].expand(batch, -1),  # (B, Lc + S + T / 4)
        "return_dict": False,
    }


def expected_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for ``config`` (what ``DiffusionTransformer`` holds)."""
    d = config.hidden_size
    features = config.latent_channels * config.patch_size**2
    mlp = config.mlp_ratio * d
    shapes: dict[str, tuple[int, ...]] = {
        "latent_in.weight": (d, features),
        "condition_in.norm_weight": (config.condition_dim,),
        "condition_in.fc1.weight": (d, config.condition_dim),
        "condition_in.fc2.weight": (d, d),
        "time_embed.fc1.weight": (d, config.timestep_features),
        "time_embed.fc2.weight": (d, d),
        "modulation.weight": (4 * d, d),
        "final_modulation.weight": (d, d),
        "latent_out.weight": (features, d),
    }
    block = {
        "attn.q_proj.weight": (d, d),
        "attn.k_proj.weight": (d, d),
        "attn.v_proj.weight": (d, d),
        "attn.out_proj.weight": (d, d),
        "attn.q_norm": (config.head_dim,),
        "attn.k_norm": (config.head_dim,),
        "mlp.gate_proj.weight": (mlp, d),
        "mlp.up_proj.weight": (mlp, d),
        "mlp.down_proj.weight": (d, mlp),
    }
    for i in range(config.num_layers):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    return shapes


def transformer_from_diffusers(
    state_dict: Mapping[str, Tensor], diffusers_config: Mapping[str, Any]
) -> tuple[TransformerConfig, dict[str, Tensor]]:
    """Our config and state dict from a diffusers ``QwenImage21Transformer2DModel``'s."""
    config = config_from_diffusers(diffusers_config)
    converted = _rename(state_dict, _to_ours, "QwenImage21Transformer2DModel")
    check_shapes(converted, expected_shapes(config), "converted diffusers state dict")
    return config, converted


def transformer_to_diffusers(
    state_dict: Mapping[str, Tensor], config: TransformerConfig
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A diffusers ``QwenImage21Transformer2DModel`` config and state dict from ours."""
    diffusers_config = config_to_diffusers(config)
    check_shapes(state_dict, expected_shapes(config), "DiffusionTransformer state dict")
    return diffusers_config, _rename(state_dict, _to_diffusers, "DiffusionTransformer")


# ---- helpers ----------------------------------------------------------------------------

_DIFFUSERS_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
_OUR_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_BLOCK_TO_OURS = {theirs: ours for ours, theirs in _BLOCK_NAMES.items()}
_GLOBAL_TO_OURS = {theirs: ours for ours, theirs in _GLOBAL_NAMES.items()}


def _to_ours(name: str) -> str | None:
    match = _DIFFUSERS_BLOCK.fullmatch(name)
    if match:
        ours = _BLOCK_TO_OURS.get(match.group(2))
        return None if ours is None else f"blocks.{match.group(1)}.{ours}"
    return _GLOBAL_TO_OURS.get(name)


def _to_diffusers(name: str) -> str | None:
    match = _OUR_BLOCK.fullmatch(name)
    if match:
        theirs = _BLOCK_NAMES.get(match.group(2))
        return None if theirs is None else f"transformer_blocks.{match.group(1)}.{theirs}"
    return _GLOBAL_NAMES.get(name)


def _rename(
    state_dict: Mapping[str, Tensor], rename: Callable[[str], str | None], what: str
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    unknown = []
    for name, tensor in state_dict.items():
        new = rename(name)
        if new is None:
            unknown.append(name)
        else:
            out[new] = tensor
    if unknown:
        raise ConversionError(f"unknown {what} keys: {listing(sorted(unknown))}")
    return out


def _axes(value: Any) -> tuple[int, int, int]:
    axes = tuple(int(v) for v in value)
    if len(axes) != 3:
        raise ConversionError(f"axes_dims_rope must have three entries, got {value!r}")
    return axes[0], axes[1], axes[2]
