"""The generator directory and inference: save / load round trip, seeded, editing, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.condition import ConditionEncoder, minilm_condition
from model.pipeline import CONFIG_FILE, Generator, GeneratorConfig, GeneratorError
from model.sampling import SamplerConfig
from model.transformer import DiffusionTransformer, transformer_debug
from model.vae import ResidualVAE, vae_debug

pytestmark = pytest.mark.usefixtures("offline")


def _config(guidance_scale: float = 1.0) -> GeneratorConfig:
    transformer = transformer_debug()
    transformer.latent_channels = vae_debug().latent_channels
    return GeneratorConfig(
        transformer=transformer,
        vae=vae_debug(),
        height=32,
        width=32,
        sampler=SamplerConfig(steps=4, dynamic_shift=False, guidance_scale=guidance_scale),
    )


@pytest.fixture(scope="module")
def encoder() -> ConditionEncoder:
    return ConditionEncoder.load(minilm_condition())


def _generator(encoder: ConditionEncoder, guidance_scale: float = 1.0) -> Generator:
    config = _config(guidance_scale)
    torch.manual_seed(0)
    return Generator(
        config, DiffusionTransformer(config.transformer), ResidualVAE(config.vae), encoder
    )


def test_save_load_round_trip_and_seeded(encoder: ConditionEncoder, tmp_path: Path) -> None:
    generator = _generator(encoder, guidance_scale=1.0)
    images = generator.generate(["a red circle", "a blue square"], seed=3)
    assert images.shape == (2, 3, 32, 32)
    assert float(images.min()) >= 0
    assert float(images.max()) <= 1
    assert torch.equal(images, generator.generate(["a red circle", "a blue square"], seed=3))
    assert not torch.equal(images, generator.generate(["a red circle", "a blue square"], seed=4))

    loaded = Generator.load(generator.save(tmp_path / "gen"))
    assert loaded.config == generator.config
    assert torch.equal(images, loaded.generate(["a red circle", "a blue square"], seed=3))


def test_guidance_and_editing_change_the_output(encoder: ConditionEncoder) -> None:
    plain = _generator(encoder, guidance_scale=1.0)
    guided = _generator(encoder, guidance_scale=4.0)
    prompts = ["a red circle"]
    assert not torch.allclose(plain.generate(prompts), guided.generate(prompts))
    source = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    other = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    edited = plain.generate(["make it blue"], input_images=source)
    assert edited.shape == (1, 3, 32, 32)
    assert not torch.allclose(edited, plain.generate(["make it blue"], input_images=other))
    with pytest.raises(GeneratorError, match="input images for"):
        plain.generate(["a", "b"], input_images=source)


def test_bad_directories_and_configs(encoder: ConditionEncoder, tmp_path: Path) -> None:
    with pytest.raises(GeneratorError, match="not a generator directory"):
        Generator.load(tmp_path)
    saved = _generator(encoder).save(tmp_path / "gen")
    (saved / CONFIG_FILE).write_text('{"transformer": {"bogus": 1}}')
    with pytest.raises(GeneratorError, match="unknown fields"):
        Generator.load(saved)
    config = _config()
    config.height = 30
    with pytest.raises(GeneratorError, match="multiples of"):
        config.validate()
