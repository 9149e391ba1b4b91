"""Our DiffusionTransformer against diffusers' QwenImage21Transformer2DModel, in fp32.

Tiny reference models with seeded random weights (every parameter, norms included) are
converted with ``model.convert.transformer`` and must agree to 1e-4 on text-to-image and
editing inputs. The weights must survive ours -> diffusers -> ours unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import Tensor

from model.convert.checkpoint import ConversionError
from model.convert.transformer import (
    config_from_diffusers,
    config_to_diffusers,
    diffusers_inputs,
    transformer_from_diffusers,
    transformer_to_diffusers,
)
from model.torchvision_compat import import_torchvision
from model.transformer import DiffusionTransformer, TransformerConfig, from_tokens

TOLERANCE = 1e-4
CONDITION_DIM = 24
CHANNELS = 16


def _diffusers_class() -> Any:
    # diffusers imports transformers, which imports torchvision: see model/torchvision_compat.
    import_torchvision()
    from diffusers import QwenImage21Transformer2DModel

    return QwenImage21Transformer2DModel


def _reference(seed: int = 0, **overrides: Any) -> Any:
    """A tiny diffusers model with every parameter drawn from a seeded generator."""
    kwargs: dict[str, Any] = {
        "patch_size": 1,
        "in_channels": CHANNELS,
        "out_channels": CHANNELS,
        "num_layers": 2,
        "attention_head_dim": 32,
        "num_attention_heads": 2,
        "context_in_dim": CONDITION_DIM,
        "mlp_ratio": 3,
        "axes_dims_rope": (8, 12, 12),
        "eps": 1e-6,
        "causal_condition": True,
    }
    kwargs.update(overrides)
    model = _diffusers_class()(**kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            # Norm weights around their neutral value, linears at a fan-in scale.
            if parameter.ndim == 1:
                noise = 0.3 * torch.randn(parameter.shape, generator=generator)
                parameter.copy_(parameter + noise)
            else:
                std = parameter.shape[-1] ** -0.5
                parameter.copy_(std * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _ours(reference: Any) -> DiffusionTransformer:
    config, state = transformer_from_diffusers(reference.state_dict(), dict(reference.config))
    model = DiffusionTransformer(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _run_reference(
    reference: Any,
    latents: Tensor,
    timestep: Tensor,
    condition: Tensor,
    *,
    input_latents: Sequence[Tensor] = (),
    image_slots: Tensor | None = None,
    condition_mask: Tensor | None = None,
) -> Tensor:
    """diffusers' forward on our inputs; images without slots get slots after the condition."""
    p = reference.config.patch_size
    kwargs = diffusers_inputs(
        latents,
        timestep,
        condition,
        condition_mask,
        input_latents=input_latents,
        image_slots=image_slots,
        patch_size=p,
    )
    with torch.no_grad():
        out = reference(**kwargs)[0]  # (B, N, C p p): every image's tokens, the target last
    height, width = latents.shape[2] // p, latents.shape[3] // p
    return from_tokens(out[:, -height * width :], height, width, p)


def _inputs(
    batch: int, condition_length: int, size: tuple[int, int], seed: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, CHANNELS, *size, generator=generator)
    timestep = torch.rand(batch, generator=generator)
    condition = torch.randn(batch, condition_length, CONDITION_DIM, generator=generator)
    return latents, timestep, condition


def _max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


@pytest.mark.parametrize(
    ("overrides", "size"),
    [
        pytest.param({}, (4, 6), id="causal-condition"),
        pytest.param({"causal_condition": False}, (6, 4), id="shared-timestep"),
        pytest.param({"patch_size": 2}, (8, 12), id="patch-2"),
    ],
)
def test_text_to_image_parity(overrides: dict[str, Any], size: tuple[int, int]) -> None:
    reference = _reference(**overrides)
    ours = _ours(reference)
    latents, timestep, condition = _inputs(2, 7, size)

    expected = _run_reference(reference, latents, timestep, condition)
    with torch.no_grad():
        got = ours(latents, timestep, condition)

    assert expected.abs().max() > 0.1  # the comparison is not between two near-zero tensors
    assert _max_diff(got, expected) <= TOLERANCE


def test_editing_parity_with_interleaved_image_slots() -> None:
    """Two input images whose tokens replace encoder image slots between text runs."""
    reference = _reference(seed=3)
    ours = _ours(reference)
    generator = torch.Generator().manual_seed(4)
    first = torch.randn(2, CHANNELS, 4, 4, generator=generator)  # 16 tokens = 4 slots
    second = torch.randn(2, CHANNELS, 2, 6, generator=generator)  # 12 tokens = 3 slots
    # 3 text, 4 slots, 2 text, 3 slots, 5 text
    slots = torch.tensor([0] * 3 + [1] * 4 + [0] * 2 + [1] * 3 + [0] * 5, dtype=torch.bool)
    latents, timestep, condition = _inputs(2, slots.numel(), (4, 6), seed=5)

    expected = _run_reference(
        reference, latents, timestep, condition, input_latents=[first, second], image_slots=slots
    )
    with torch.no_grad():
        got = ours(latents, timestep, condition, input_latents=[first, second], image_slots=slots)

    assert expected.abs().max() > 0.1
    assert _max_diff(got, expected) <= TOLERANCE
    # The input images matter: without them the prediction changes.
    with torch.no_grad():
        alone = ours(latents, timestep, condition[:, ~slots])
    assert _max_diff(alone, expected) > 1e-2


@pytest.mark.parametrize("causal_condition", [True, False])
def test_editing_parity_with_images_after_the_condition(causal_condition: bool) -> None:
    reference = _reference(seed=6, causal_condition=causal_condition)
    ours = _ours(reference)
    generator = torch.Generator().manual_seed(7)
    inputs = [torch.randn(1, CHANNELS, 6, 4, generator=generator)]
    latents, timestep, condition = _inputs(1, 9, (4, 4), seed=8)

    expected = _run_reference(reference, latents, timestep, condition, input_latents=inputs)
    with torch.no_grad():
        got = ours(latents, timestep, condition, input_latents=inputs)

    assert expected.abs().max() > 0.1
    assert _max_diff(got, expected) <= TOLERANCE


@pytest.mark.parametrize("editing", [False, True], ids=["text-to-image", "editing"])
def test_padded_batch_parity_with_each_sample_alone(editing: bool) -> None:
    """A right-padded batch equals diffusers run on each sample unpadded.

    (diffusers itself counts the padding into the target's rotary positions, so its padded
    batch differs from its per-sample results; ours does not.)
    """
    reference = _reference(seed=9)
    ours = _ours(reference)
    latents, timestep, condition = _inputs(3, 10, (4, 4), seed=10)
    lengths = [10, 6, 3]
    mask = torch.arange(10)[None] < torch.tensor(lengths)[:, None]  # (3, 10)
    generator = torch.Generator().manual_seed(11)
    inputs = [torch.randn(3, CHANNELS, 4, 2, generator=generator)] if editing else []
    # Editing: one text token, the input image's two slots, the text, then the padding.
    slots = torch.tensor([0, 1, 1] + [0] * 7, dtype=torch.bool) if editing else None

    with torch.no_grad():
        got = ours(latents, timestep, condition, mask, input_latents=inputs, image_slots=slots)
    for i, length in enumerate(lengths):
        sample_inputs = [image[i : i + 1] for image in inputs]
        expected = _run_reference(
            reference,
            latents[i : i + 1],
            timestep[i : i + 1],
            condition[i : i + 1, :length],
            input_latents=sample_inputs,
            image_slots=None if slots is None else slots[:length],
        )
        assert _max_diff(got[i : i + 1], expected) <= TOLERANCE


def test_state_dict_round_trip_ours_diffusers_ours() -> None:
    reference = _reference(seed=12)
    config, state = transformer_from_diffusers(reference.state_dict(), dict(reference.config))
    model = DiffusionTransformer(config)
    model.load_state_dict(state)
    ours_state = model.state_dict()

    diffusers_config, diffusers_state = transformer_to_diffusers(ours_state, config)
    rebuilt = _diffusers_class()(**diffusers_config)
    rebuilt.load_state_dict(diffusers_state, strict=True)  # every diffusers tensor is covered
    back_config, back_state = transformer_from_diffusers(rebuilt.state_dict(), dict(rebuilt.config))

    assert back_config == config
    assert back_state.keys() == ours_state.keys()
    for name, tensor in ours_state.items():
        assert torch.equal(back_state[name], tensor), name
    assert config_from_diffusers(config_to_diffusers(config)) == config


def test_conversion_errors_name_the_keys() -> None:
    reference = _reference(seed=13)
    state = dict(reference.state_dict())
    diffusers_config = dict(reference.config)

    extra = {**state, "transformer_blocks.0.attn.add_q_proj.weight": torch.zeros(1)}
    with pytest.raises(ConversionError, match=r"unknown .*add_q_proj"):
        transformer_from_diffusers(extra, diffusers_config)

    missing = {k: v for k, v in state.items() if k != "transformer_blocks.1.img_mlp.out.weight"}
    with pytest.raises(ConversionError, match=r"missing blocks\.1\.mlp\.down_proj\.weight"):
        transformer_from_diffusers(missing, diffusers_config)

    with pytest.raises(ConversionError, match="unknown QwenImage21Transformer2DModel config"):
        transformer_from_diffusers(state, {**diffusers_config, "guidance_embeds": True})

    with pytest.raises(ConversionError, match="wrong shapes"):
        transformer_from_diffusers(state, {**diffusers_config, "context_in_dim": 32})

    config = TransformerConfig(
        latent_channels=CHANNELS,
        condition_dim=CONDITION_DIM,
        num_layers=1,
        num_heads=2,
        head_dim=32,
        rope_axes_dims=(8, 12, 12),
        block_causal=False,
    )
    with pytest.raises(ConversionError, match="block_causal"):
        transformer_to_diffusers(DiffusionTransformer(config).state_dict(), config)
