"""ResidualVAE on its own: shapes of the recipes, the non-parametric shortcuts on known inputs,
latent normalization, gradients, determinism and a safetensors round trip."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from model.convert.checkpoint import read_state_dict, write_checkpoint
from model.vae import (
    QWEN_IMAGE_21_LATENTS_MEAN,
    QWEN_IMAGE_21_LATENTS_STD,
    ChannelDuplicateUp,
    ResidualVAE,
    SpaceToChannelAverage,
    VAEConfig,
    patchify,
    unpatchify,
    vae_debug,
    vae_f8c16,
    vae_f16c64,
    with_opaque_alpha,
)


def _images(shape: tuple[int, ...], seed: int = 0) -> Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _model(config: VAEConfig, seed: int = 0) -> ResidualVAE:
    torch.manual_seed(seed)
    return ResidualVAE(config).eval()


# ---- shapes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "factor", "channels", "image_channels"),
    [(vae_f16c64, 16, 64, 4), (vae_f8c16, 8, 16, 3)],
)
def test_recipe_shapes(
    recipe: Callable[[], VAEConfig], factor: int, channels: int, image_channels: int
) -> None:
    config = recipe()
    assert config.spatial_factor == factor
    assert config.latent_channels == channels
    # The full-size models run on the meta device: shapes only, no memory, no compute.
    with torch.device("meta"):
        model = ResidualVAE(config)
        images = torch.empty(2, image_channels, 8 * factor, 4 * factor)
        posterior = model.encode(images)
        decoded = model.decode(posterior.mode())
    assert posterior.mean.shape == (2, channels, 8, 4)
    assert posterior.logvar.shape == (2, channels, 8, 4)
    assert decoded.shape == (2, image_channels, 8 * factor, 4 * factor)


def test_f16c64_carries_the_qwen_image_latent_statistics() -> None:
    assert len(QWEN_IMAGE_21_LATENTS_MEAN) == len(QWEN_IMAGE_21_LATENTS_STD) == 64
    assert vae_f16c64().latents_mean == QWEN_IMAGE_21_LATENTS_MEAN
    assert vae_f16c64().latents_std == QWEN_IMAGE_21_LATENTS_STD


def test_rgba_in_and_out() -> None:
    config = vae_debug()
    assert (config.in_channels, config.out_channels) == (4, 4)
    model = _model(config)
    rgb = _images((2, 3, 32, 16))
    rgba = with_opaque_alpha(rgb)
    assert rgba.shape == (2, 4, 32, 16)
    assert torch.equal(rgba[:, :3], rgb)
    assert torch.equal(rgba[:, 3], torch.ones(2, 32, 16))
    with torch.no_grad():
        reconstruction, posterior = model(rgba)
    assert posterior.mean.shape == (2, 8, 4, 2)
    assert reconstruction.shape == (2, 4, 32, 16)
    assert reconstruction.abs().max() <= 1.0  # clamped like the reference
    # Alpha matters: a transparent image encodes differently from the opaque one.
    transparent = torch.cat([rgb, -torch.ones(2, 1, 32, 16)], dim=1)
    with torch.no_grad():
        assert not torch.allclose(model.encode(transparent).mean, posterior.mean)


def test_bad_inputs_are_rejected() -> None:
    model = _model(vae_debug())
    with pytest.raises(ValueError, match=r"expected images \(B, 4, H, W\)"):
        model.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="not divisible by 8"):
        model.encode(torch.zeros(1, 4, 36, 32))
    with pytest.raises(ValueError, match=r"expected latents \(B, 8, h, w\)"):
        model.decode(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="temporal_downsample needs 3 entries"):
        ResidualVAE(dataclasses.replace(vae_debug(), temporal_downsample=(True,)))
    with pytest.raises(ValueError, match="latents_std must be positive"):
        ResidualVAE(dataclasses.replace(vae_debug(), latents_std=(0.0,) * 8))
    with pytest.raises(ValueError, match="must be divisible by 3"):
        SpaceToChannelAverage(4, 3, spatial_factor=2, temporal_factor=1)


# ---- the non-parametric shortcuts -------------------------------------------------------


def test_space_to_channel_average_at_equal_width_is_2x2_average_pooling() -> None:
    x = _images((2, 3, 6, 4))
    down = SpaceToChannelAverage(3, 3, spatial_factor=2, temporal_factor=1)
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2), rtol=0, atol=1e-6)


def test_space_to_channel_average_splits_patches_into_rows_when_widening() -> None:
    # C -> 2C: groups of two folded channels, i.e. output 2c averages the top row of
    # channel c's 2x2 patch, output 2c + 1 the bottom row.
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    out = SpaceToChannelAverage(2, 4, spatial_factor=2, temporal_factor=1)(x)
    for c in range(2):
        top = (x[0, c, 0::2, 0::2] + x[0, c, 0::2, 1::2]) / 2
        bottom = (x[0, c, 1::2, 0::2] + x[0, c, 1::2, 1::2]) / 2
        assert torch.equal(out[0, 2 * c], top)
        assert torch.equal(out[0, 2 * c + 1], bottom)
    # Narrowing C -> C/2 averages the patches of two neighbouring channels.
    narrow = SpaceToChannelAverage(2, 1, spatial_factor=2, temporal_factor=1)(x)
    torch.testing.assert_close(narrow[:, 0], F.avg_pool2d(x, 2).mean(dim=1), rtol=0, atol=1e-6)


def test_space_to_channel_average_counts_the_padded_frame_as_zeros() -> None:
    x = _images((1, 2, 4, 4))
    # Equal width, two frame slots: each group holds a channel's zero slot and its image slot.
    same = SpaceToChannelAverage(2, 2, spatial_factor=2, temporal_factor=2)(x)
    torch.testing.assert_close(same, F.avg_pool2d(x, 2) / 2, rtol=0, atol=1e-6)
    # Widening C -> 2C: output 2c averages channel c's zero slot, 2c + 1 its 2x2 patch.
    wide = SpaceToChannelAverage(2, 4, spatial_factor=2, temporal_factor=2)(x)
    assert torch.equal(wide[:, 0::2], torch.zeros(1, 2, 2, 2))
    torch.testing.assert_close(wide[:, 1::2], F.avg_pool2d(x, 2), rtol=0, atol=1e-6)


def test_channel_duplicate_up_at_equal_width_is_nearest_upsampling() -> None:
    x = _images((2, 3, 3, 5))
    up = ChannelDuplicateUp(3, 3, spatial_factor=2, temporal_factor=1)
    assert torch.equal(up(x), F.interpolate(x, scale_factor=2.0, mode="nearest"))
    # With a frame slot in front, every copy still comes from the same channel.
    up_t = ChannelDuplicateUp(3, 3, spatial_factor=2, temporal_factor=2)
    assert torch.equal(up_t(x), F.interpolate(x, scale_factor=2.0, mode="nearest"))


def test_channel_duplicate_up_when_narrowing() -> None:
    x = _images((1, 4, 2, 3))
    # 2C -> C: the copies of channels 2c and 2c + 1 fill the top and bottom rows of a patch.
    out = ChannelDuplicateUp(4, 2, spatial_factor=2, temporal_factor=1)(x)
    for c in range(2):
        for row in range(2):
            for col in range(2):
                assert torch.equal(out[0, c, row::2, col::2], x[0, 2 * c + row])
    # Two frame slots: the image keeps the last slot, which holds the odd channels' copies.
    last = ChannelDuplicateUp(4, 2, spatial_factor=2, temporal_factor=2)(x)
    assert torch.equal(last, F.interpolate(x[:, 1::2], scale_factor=2.0, mode="nearest"))


def test_shortcuts_are_parameter_free_and_down_then_up_is_identity_on_flat_patches() -> None:
    down = SpaceToChannelAverage(4, 8, spatial_factor=2, temporal_factor=1)
    up = ChannelDuplicateUp(8, 4, spatial_factor=2, temporal_factor=1)
    assert not list(down.parameters())
    assert not list(up.parameters())
    # An image constant on each 2x2 patch survives averaging down and duplicating up.
    flat = F.interpolate(_images((1, 4, 3, 3)), scale_factor=2.0, mode="nearest")
    assert torch.equal(up(down(flat)), flat)


def test_patchify_round_trip() -> None:
    x = _images((2, 3, 8, 6))
    patches = patchify(x, 2)
    assert patches.shape == (2, 12, 4, 3)
    # Channel c * 4 + column * 2 + row holds pixel (2i + row, 2j + column) of channel c.
    assert torch.equal(patches[:, 1 * 4 + 1 * 2 + 0], x[:, 1, 0::2, 1::2])
    assert torch.equal(unpatchify(patches, 2), x)


# ---- latents ----------------------------------------------------------------------------


def test_latent_normalization_round_trip() -> None:
    config = dataclasses.replace(
        vae_debug(),
        latents_mean=tuple(0.5 * i - 1 for i in range(8)),
        latents_std=tuple(1.0 + 0.25 * i for i in range(8)),
    )
    model = _model(config)
    latents = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(1))
    normalized = model.normalize_latents(latents)
    mean = torch.tensor(config.latents_mean).view(1, 8, 1, 1)
    std = torch.tensor(config.latents_std).view(1, 8, 1, 1)
    torch.testing.assert_close(normalized, (latents - mean) / std)
    torch.testing.assert_close(model.denormalize_latents(normalized), latents)
    # Statistics follow the config, not the state dict.
    assert "latents_mean" not in model.state_dict()
    # A bf16 model normalizes with exact (float32) statistics, rounding only the result.
    half = _model(config).to(torch.bfloat16)
    rounded = latents.to(torch.bfloat16)
    expected = ((rounded.float() - mean) / std).to(torch.bfloat16)
    assert torch.equal(half.normalize_latents(rounded), expected)
    # Default statistics are the identity.
    plain = _model(vae_debug())
    assert torch.equal(plain.normalize_latents(latents), latents)


def test_posterior_sampling() -> None:
    model = _model(vae_debug())
    with torch.no_grad():
        posterior = model.encode(_images((1, 4, 16, 16)))
        a = posterior.sample(torch.Generator().manual_seed(3))
        b = posterior.sample(torch.Generator().manual_seed(3))
        c = posterior.sample(torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(posterior.mode(), posterior.mean)
    noise = (a - posterior.mean) / posterior.std
    expected = torch.randn(a.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(noise, expected, rtol=1e-4, atol=1e-4)


# ---- training-facing properties ---------------------------------------------------------


def test_gradients_reach_every_parameter() -> None:
    model = _model(vae_debug()).train()
    images = _images((2, 4, 16, 16))
    reconstruction, posterior = model(
        images, sample_posterior=True, generator=torch.Generator().manual_seed(0), clamp=False
    )
    loss = (reconstruction - images).pow(2).mean() + posterior.mean.pow(2).mean()
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_seeded_determinism() -> None:
    images = _images((1, 4, 16, 24))
    a, b, c = _model(vae_debug(), seed=0), _model(vae_debug(), seed=0), _model(vae_debug(), seed=1)
    with torch.no_grad():
        out_a = a(images, sample_posterior=True, generator=torch.Generator().manual_seed(2))[0]
        out_b = b(images, sample_posterior=True, generator=torch.Generator().manual_seed(2))[0]
        out_c = c(images, sample_posterior=True, generator=torch.Generator().manual_seed(2))[0]
    assert torch.equal(out_a, out_b)
    assert not torch.allclose(out_a, out_c)


def test_safetensors_round_trip(tmp_path: Path) -> None:
    config = vae_debug()
    model = _model(config, seed=3)
    write_checkpoint(tmp_path, config=dataclasses.asdict(config), state_dict=model.state_dict())
    loaded = _model(config, seed=4)
    loaded.load_state_dict(read_state_dict(tmp_path))
    images = _images((1, 4, 16, 16), seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(images)[0], model(images)[0])
        assert torch.equal(loaded.encode(images).logvar, model.encode(images).logvar)
