"""``flywheel convert``: diffusers checkpoint directories into ours and back, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from flywheel.cli.main import app
from model.convert import transformer as transformer_convert
from model.convert import vae as vae_convert
from model.convert.directory import read_component
from model.torchvision_compat import import_torchvision
from model.transformer import DiffusionTransformer, transformer_debug
from model.vae import ResidualVAE, vae_debug

runner = CliRunner()


def _diffusers() -> Any:
    import_torchvision()  # diffusers -> transformers -> torchvision
    import diffusers

    return diffusers


def _seeded(model: Any) -> Any:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _convert(*args: str) -> Any:
    return runner.invoke(app, ["convert", *args])


def test_vae_directory_round_trip(tmp_path: Path) -> None:
    diffusers = _diffusers()
    config = vae_debug()
    reference = _seeded(
        diffusers.AutoencoderKLQwenImage21(**vae_convert.config_to_diffusers(config))
    )
    reference.save_pretrained(tmp_path / "diffusers")

    result = _convert(
        "--from-diffusers", str(tmp_path / "diffusers"), "--out", str(tmp_path / "ours")
    )

    assert result.exit_code == 0, result.output
    assert "converted vae" in result.output
    name, ours_config, state = read_component(tmp_path / "ours")
    assert name == "vae"
    # diffusers spells out default latent statistics; otherwise the config is unchanged.
    assert ours_config == vae_convert.config_from_diffusers(vae_convert.config_to_diffusers(config))
    ours = ResidualVAE(ours_config).eval()
    ours.load_state_dict(state)
    latents = torch.randn(
        1, config.latent_channels, 2, 2, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected = reference.decode(latents[:, :, None]).sample[:, :, 0]
        assert (ours.decode(latents) - expected).abs().max() <= 1e-4

    back = _convert("--to-diffusers", str(tmp_path / "ours"), "--out", str(tmp_path / "back"))
    assert back.exit_code == 0, back.output
    reloaded = diffusers.AutoencoderKLQwenImage21.from_pretrained(tmp_path / "back")
    for key, tensor in reference.state_dict().items():
        if "time_conv" not in key:  # never applied to one frame: exported as zeros
            assert torch.equal(reloaded.state_dict()[key], tensor), key


def test_transformer_directory_round_trip_keeps_dtype_and_shards(tmp_path: Path) -> None:
    diffusers = _diffusers()
    config = transformer_debug()
    reference = _seeded(
        diffusers.QwenImage21Transformer2DModel(**transformer_convert.config_to_diffusers(config))
    ).to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "diffusers")

    result = _convert(
        "--from-diffusers", str(tmp_path / "diffusers"), "--out", str(tmp_path / "ours"),
        "--max-shard-size", "200KB",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    name, ours_config, state = read_component(tmp_path / "ours")
    assert name == "transformer"
    assert ours_config == config
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    DiffusionTransformer(ours_config).load_state_dict(state, strict=True)

    back = _convert("--to-diffusers", str(tmp_path / "ours"), "--out", str(tmp_path / "back"))
    assert back.exit_code == 0, back.output
    reloaded = diffusers.QwenImage21Transformer2DModel.from_pretrained(tmp_path / "back")
    for key, tensor in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key


def test_bad_invocations_exit_2_with_one_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    cases = [
        (["--out", str(tmp_path / "o")], "exactly one of"),
        (["--from-diffusers", str(src), "--to-diffusers", str(src), "--out", "o"], "exactly one"),
        (
            ["--from-diffusers", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
            "not a directory",
        ),
        (["--from-diffusers", str(src), "--out", str(busy)], "not an empty directory"),
        (["--from-diffusers", str(src), "--out", str(busy / "x")], "not an empty directory"),
        (["--from-diffusers", str(src), "--out", "o", "--max-shard-size", "abc"], "byte count"),
        (["--from-diffusers", str(src), "--out", str(tmp_path / "o")], "unsupported component"),
        (["--to-diffusers", str(src), "--out", str(tmp_path / "o2")], "not a flywheel-checkpoint"),
    ]
    for args, needle in cases:
        result = _convert(*args)
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1


def test_a_truncated_weights_file_is_a_clean_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLQwenImage21"}))
    (src / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    result = _convert("--from-diffusers", str(src), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "not a readable safetensors file" in result.stderr


@pytest.mark.parametrize("component", ["vae", "transformer"])
def test_invalid_config_in_our_checkpoint_is_refused(tmp_path: Path, component: str) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"format": "flywheel-checkpoint/1", "component": component, "config": {"x": 1}})
    )
    result = _convert("--to-diffusers", str(tmp_path), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2
    assert "invalid config" in result.stderr
