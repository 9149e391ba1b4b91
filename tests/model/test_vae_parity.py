"""Our ResidualVAE against diffusers' AutoencoderKLQwenImage21, in fp32.

Tiny reference models with seeded random weights (every parameter, norms and the unused
``time_conv`` included) are converted with ``model.convert.vae`` and must agree to 1e-4 on
encode (posterior mean and log-variance, and a seeded posterior sample) and decode. The
reference is video-shaped and takes one frame: it runs on ``images[:, :, None]``. Weights
must survive ours -> diffusers -> ours unchanged, and checkpoint directories written by
either side must load on the other.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from model.convert.checkpoint import ConversionError
from model.convert.vae import (
    config_from_diffusers,
    config_to_diffusers,
    diffusers_expected_shapes,
    load_diffusers_vae,
    save_diffusers_vae,
    vae_from_diffusers,
    vae_to_diffusers,
)
from model.torchvision_compat import import_torchvision
from model.vae import ResidualVAE, VAEConfig, vae_f8c16, vae_f16c64

TOLERANCE = 1e-4

# Tiny configs covering the reference's config surface: f16 RGBA with latent stats, f8 RGB
# with temporal stages first, and patchify (p = 2). Images are (B, C, H, W).
CASES: dict[str, tuple[VAEConfig, tuple[int, int, int, int]]] = {
    "f16-rgba": (
        VAEConfig(
            in_channels=4,
            out_channels=4,
            latent_channels=8,
            encoder_width=8,
            decoder_width=12,
            width_multipliers=(1, 2, 2, 4, 4),
            blocks_per_stage=2,
            temporal_downsample=(False, True, True, True),
            latents_mean=tuple(0.1 * i for i in range(8)),
            latents_std=tuple(1.0 + 0.2 * i for i in range(8)),
        ),
        (2, 4, 64, 32),
    ),
    "f8-rgb": (
        VAEConfig(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            encoder_width=4,
            decoder_width=8,
            width_multipliers=(1, 2, 4, 4),
            blocks_per_stage=1,
            temporal_downsample=(True, True, False),
        ),
        (1, 3, 24, 40),
    ),
    "patch2": (
        VAEConfig(
            in_channels=3,
            out_channels=4,
            latent_channels=4,
            encoder_width=8,
            decoder_width=8,
            width_multipliers=(1, 2, 2),
            blocks_per_stage=1,
            temporal_downsample=(False, True),
            patch_size=2,
        ),
        (1, 3, 32, 16),
    ),
}


def _diffusers_class() -> Any:
    # diffusers imports transformers, which imports torchvision: see model/torchvision_compat.
    import_torchvision()
    from diffusers import AutoencoderKLQwenImage21

    return AutoencoderKLQwenImage21


def _reference(config: VAEConfig, seed: int = 0) -> Any:
    """A diffusers model for ``config`` with every parameter drawn from a seeded generator."""
    model = _diffusers_class()(**config_to_diffusers(config)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("gamma"):  # RMS norm weights around their neutral value
                parameter.copy_(1.0 + 0.2 * noise)
            elif parameter.dim() > 1:  # convs at a fan-in scale
                parameter.copy_(noise / parameter[0].numel() ** 0.5)
            else:
                parameter.copy_(0.1 * noise)
    return model


def _ours_from(reference: Any) -> ResidualVAE:
    config, state = vae_from_diffusers(reference.state_dict(), dict(reference.config))
    model = ResidualVAE(config).eval()
    model.load_state_dict(state)
    return model


def _explicit_stats(config: VAEConfig) -> VAEConfig:
    """``config`` as it comes back from diffusers: latent statistics always spelled out."""
    z = config.latent_channels
    return dataclasses.replace(
        config,
        latents_mean=config.latents_mean or (0.0,) * z,
        latents_std=config.latents_std or (1.0,) * z,
    )


def _images(shape: tuple[int, int, int, int], seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) * 2 - 1


def _max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_encode_parity(case: str) -> None:
    config, shape = CASES[case]
    reference = _reference(config)
    ours = _ours_from(reference)
    assert ours.config == _explicit_stats(config)
    images = _images(shape)
    with torch.no_grad():
        theirs = reference.encode(images[:, :, None]).latent_dist
        posterior = ours.encode(images)
        their_sample = theirs.sample(generator=torch.Generator().manual_seed(7))
        our_sample = posterior.sample(torch.Generator().manual_seed(7))
    f = config.spatial_factor
    assert posterior.mean.shape == (shape[0], config.latent_channels, shape[2] // f, shape[3] // f)
    assert _max_diff(posterior.mean, theirs.mean[:, :, 0]) <= TOLERANCE
    assert _max_diff(posterior.logvar, theirs.logvar[:, :, 0]) <= TOLERANCE
    assert _max_diff(our_sample, their_sample[:, :, 0]) <= TOLERANCE
    # The check is not vacuous: the moments vary.
    assert posterior.mean.std() > 0.05
    assert posterior.logvar.std() > 0.05


@pytest.mark.parametrize("case", list(CASES))
def test_decode_parity(case: str) -> None:
    config, shape = CASES[case]
    reference = _reference(config)
    ours = _ours_from(reference)
    f = config.spatial_factor
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(
        shape[0], config.latent_channels, shape[2] // f, shape[3] // f, generator=generator
    )
    with torch.no_grad():
        theirs = reference.decode(latents[:, :, None]).sample[:, :, 0]
        decoded = ours.decode(latents)
    assert decoded.shape == (shape[0], config.out_channels, shape[2], shape[3])
    assert _max_diff(decoded, theirs) <= TOLERANCE
    # Both clamp to [-1, 1]; most pixels must lie inside, or the comparison says little.
    assert (theirs.abs() < 1).float().mean() > 0.5


def test_autoencode_parity() -> None:
    config, shape = CASES["f16-rgba"]
    reference = _reference(config, seed=3)
    ours = _ours_from(reference)
    images = _images(shape, seed=4)
    with torch.no_grad():
        theirs = reference(images[:, :, None]).sample[:, :, 0]
        reconstruction, _ = ours(images)
    assert _max_diff(reconstruction, theirs) <= TOLERANCE


def test_state_dict_round_trip_parity() -> None:
    """ours -> diffusers (loads strictly into the reference) -> ours, bit for bit."""
    config = CASES["f16-rgba"][0]
    torch.manual_seed(5)
    ours = ResidualVAE(config).eval()
    diffusers_config, diffusers_state = vae_to_diffusers(ours.state_dict(), config)
    reference = _diffusers_class()(**diffusers_config).eval()
    reference.load_state_dict(diffusers_state, strict=True)
    back_config, back = vae_from_diffusers(reference.state_dict(), dict(reference.config))
    assert back_config == config
    assert back.keys() == ours.state_dict().keys()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back[name], tensor), name
    # The zeroed time_conv tensors are never applied: the reference decodes as we do.
    latents = torch.randn(
        1, config.latent_channels, 4, 2, generator=torch.Generator().manual_seed(6)
    )
    with torch.no_grad():
        assert (
            _max_diff(ours.decode(latents), reference.decode(latents[:, :, None]).sample[:, :, 0])
            <= TOLERANCE
        )


def test_checkpoint_directories_parity(tmp_path: Path) -> None:
    config, shape = CASES["patch2"]
    reference = _reference(config, seed=8)
    reference.save_pretrained(tmp_path / "theirs")
    ours = load_diffusers_vae(tmp_path / "theirs").eval()
    images = _images(shape, seed=9)
    with torch.no_grad():
        mean = reference.encode(images[:, :, None]).latent_dist.mean[:, :, 0]
        assert _max_diff(ours.encode(images).mean, mean) <= TOLERANCE

    save_diffusers_vae(ours, tmp_path / "ours")
    reloaded = _diffusers_class().from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (
            _max_diff(reloaded.encode(images[:, :, None]).latent_dist.mean[:, :, 0], mean)
            <= TOLERANCE
        )


def test_recipes_match_the_reference() -> None:
    """f16c64 is diffusers' default config; the f16c64 and f8c16 key layouts match diffusers'."""
    defaults = {
        name: p.default
        for name, p in inspect.signature(_diffusers_class().__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    assert config_from_diffusers(defaults) == vae_f16c64()
    assert config_from_diffusers({}) == vae_f16c64()
    for config in (vae_f16c64(), vae_f8c16()):
        with torch.device("meta"):
            reference = _diffusers_class()(**config_to_diffusers(config))
        theirs = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
        assert theirs == diffusers_expected_shapes(config)


def test_conversion_errors_name_the_problem() -> None:
    config, _ = CASES["f8-rgb"]
    torch.manual_seed(0)
    _, state = vae_to_diffusers(ResidualVAE(config).state_dict(), config)
    diffusers_config = config_to_diffusers(config)

    missing = dict(state)
    del missing["decoder.up_blocks.1.upsampler.time_conv.weight"]
    with pytest.raises(
        ConversionError, match=r"missing decoder\.up_blocks\.1\.upsampler\.time_conv\.weight"
    ):
        vae_from_diffusers(missing, diffusers_config)

    extra = {**state, "encoder.extra.weight": torch.zeros(1)}
    with pytest.raises(ConversionError, match=r"unexpected encoder\.extra\.weight"):
        vae_from_diffusers(extra, diffusers_config)

    wrong = {**state, "quant_conv.weight": torch.zeros(8, 8, 3, 3)}
    with pytest.raises(
        ConversionError, match=r"quant_conv\.weight: \(8, 8, 3, 3\) != \(8, 8, 1, 1\)"
    ):
        vae_from_diffusers(wrong, diffusers_config)

    ours = dict(ResidualVAE(config).state_dict())
    del ours["to_moments.bias"]
    with pytest.raises(ConversionError, match=r"missing to_moments\.bias"):
        vae_to_diffusers(ours, config)

    with pytest.raises(ConversionError, match=r"unknown .* config keys: \['z_channels'\]"):
        config_from_diffusers({**diffusers_config, "z_channels": 4})
    with pytest.raises(ConversionError, match="is_residual=False"):
        config_from_diffusers({**diffusers_config, "is_residual": False})
    with pytest.raises(ConversionError, match=r"in_channels=3 is not divisible by patch_size\^2=4"):
        config_from_diffusers({**diffusers_config, "patch_size": 2})
    with pytest.raises(ConversionError, match="temporal_downsample needs 3 entries"):
        config_from_diffusers({**diffusers_config, "temperal_downsample": [True]})
    # Metadata keys and the residual variant's unused attn_scales are accepted.
    relaxed = {**diffusers_config, "_class_name": "AutoencoderKLQwenImage21", "attn_scales": [0.5]}
    assert config_from_diffusers(relaxed) == _explicit_stats(config)
