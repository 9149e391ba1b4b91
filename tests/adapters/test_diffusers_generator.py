"""The ``diffusers`` generator adapter on tiny Qwen-Image pipelines built here, and the
conversion of a Qwen-Image-2.1 pipeline into a generator directory of ours.

Two pipelines with seeded random weights are built once and saved with ``save_pretrained``:
a ``QwenImagePipeline`` (text-to-image only: its call takes no ``image``) with a tiny
Qwen2.5-VL text encoder, and a ``QwenImage21Pipeline`` (text-to-image and editing) with a
tiny Qwen3-VL one, both with a byte-level tokenizer that needs no download. Everything loads
offline from those directories through the adapter's real loading code.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor

from flywheel.adapters.base import AdapterContext
from flywheel.adapters.diffusers_generator import (
    GENERATOR,
    DiffusersGenerator,
    DiffusersGeneratorSettings,
)
from flywheel.ports import ImageGenerator, PortError
from flywheel.project import adapter_for, build_part, read_project
from model.condition import ConditionEncoder
from model.convert.checkpoint import ConversionError
from model.convert.pipeline import convert_pipeline
from model.convert.transformer import config_to_diffusers as transformer_to_diffusers
from model.convert.vae import config_to_diffusers as vae_to_diffusers
from model.pipeline import Generator
from model.prompt_enhancer import byte_level_tokenizer
from model.torchvision_compat import import_torchvision
from model.transformer import TransformerConfig
from model.vae import VAEConfig

SIZE = 32
"""QwenImage21Pipeline's sizes are multiples of 32."""
SMALL = 16
"""The tiny QwenImagePipeline's images (multiples of its VAE's 4x times the 2x2 packing)."""
PROMPTS = ["a red cube", "two blue spheres on grass", "a cat"]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# ChatML over structured messages, as the Qwen-VL processors' templates render them.
PROCESSOR_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% else %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _seeded(model: Any, std: float) -> Any:
    """``model`` with every parameter drawn from N(0, std²) (seeded), in eval mode."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(std * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _qwen_image(path: Path) -> Path:
    """A tiny QwenImagePipeline (MMDiT, Qwen2.5-VL text encoder) saved at ``path``."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = byte_level_tokenizer()
    text = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "bos_token_id": None,
            "eos_token_id": None,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
        },
        vocab_size=len(tokenizer),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipeline = QwenImagePipeline(
            transformer=QwenImageTransformer2DModel(
                patch_size=2,
                in_channels=16,
                out_channels=4,
                num_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=16,
                guidance_embeds=False,
                axes_dims_rope=(8, 4, 4),
            ),
            vae=AutoencoderKLQwenImage(
                base_dim=8,
                z_dim=4,
                dim_mult=[1, 2, 2],
                num_res_blocks=1,
                temperal_downsample=[False, True],
                latents_mean=[0.0] * 4,
                latents_std=[1.0] * 4,
            ),
            scheduler=FlowMatchEulerDiscreteScheduler(),
            text_encoder=Qwen2_5_VLForConditionalGeneration(text).eval(),
            tokenizer=tokenizer,
        )
    pipeline.save_pretrained(path)
    return path


def _qwen_image_21(path: Path) -> Path:
    """A tiny QwenImage21Pipeline (our architecture, Qwen3-VL text encoder) saved at ``path``.

    A vision patch of 16 pixels merged 2x2 gives one ``<|image_pad|>`` per 32x32 tile: the
    four 16x-downsampled latent tokens diffusers' transformer puts in one image slot."""
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer = byte_level_tokenizer()
    tokenizer.add_tokens(VISION_TOKENS, special_tokens=True)
    start, end, image, video = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            patch_size=16,
            merge_size=2,
            temporal_patch_size=1,
            size={"shortest_edge": SIZE * SIZE, "longest_edge": 4 * SIZE * SIZE},
        ),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=1),
        chat_template=PROCESSOR_TEMPLATE,
    )
    text = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 512,
            "bos_token_id": None,
            "eos_token_id": None,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [1, 1, 2],
                "mrope_interleaved": True,
            },
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": 32,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 1,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )
    transformer = TransformerConfig(
        latent_channels=8,
        condition_dim=32,
        num_layers=1,
        num_heads=2,
        head_dim=32,
        rope_axes_dims=(8, 12, 12),
    )
    vae = VAEConfig(
        in_channels=4,
        out_channels=4,
        latent_channels=8,
        encoder_width=8,
        decoder_width=8,
        width_multipliers=(1, 2, 2, 2, 2),
        blocks_per_stage=1,
        temporal_downsample=(False, True, True, True),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipeline = QwenImage21Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(
                use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, shift_terminal=0.02
            ),
            vae=AutoencoderKLQwenImage21(**vae_to_diffusers(vae)).eval(),
            text_encoder=Qwen3VLForConditionalGeneration(text).eval(),
            processor=processor,
            # Every weight random (none left at a zero init): the prompt shapes the image.
            transformer=_seeded(
                QwenImage21Transformer2DModel(**transformer_to_diffusers(transformer)), 0.05
            ),
        )
    pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen_image_dir(offline: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import_torchvision()
    return _qwen_image(tmp_path_factory.mktemp("qwen_image"))


@pytest.fixture(scope="module")
def qwen_image_21_dir(offline: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import_torchvision()
    return _qwen_image_21(tmp_path_factory.mktemp("qwen_image_21"))


def _context(root: Path) -> AdapterContext:
    return AdapterContext(root=root, home=root / "home")


def _build(path: Path, **settings: Any) -> DiffusersGenerator:
    values: dict[str, Any] = {
        "path": path,
        "height": SMALL,
        "width": SMALL,
        "num_inference_steps": 2,
        "dtype": "float32",
        **settings,
    }
    generator = GENERATOR.build(DiffusersGeneratorSettings(**values), _context(path.parent))
    assert isinstance(generator, DiffusersGenerator)
    return generator


@pytest.fixture(scope="module")
def qwen_image(qwen_image_dir: Path) -> DiffusersGenerator:
    return _build(qwen_image_dir, batch_size=2)


@pytest.fixture(scope="module")
def qwen_image_21(qwen_image_21_dir: Path) -> DiffusersGenerator:
    # The pipeline sizes condition images (and its default output) from output_resolution.
    return _build(
        qwen_image_21_dir, height=None, width=None, call_kwargs={"output_resolution": SIZE}
    )


def _inputs(count: int, size: int = SIZE) -> Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(7))


def _one_line_port_error(build: Any) -> str:
    with pytest.raises(PortError) as caught:
        build()
    assert caught.value.port == "generator"
    message = str(caught.value)
    assert "\n" not in message
    assert len(message) < 400
    return message


# ---- text-to-image ---------------------------------------------------------------------------


def test_images_come_back_n_3_h_w_in_the_unit_range_on_the_cpu(
    qwen_image: DiffusersGenerator, qwen_image_dir: Path
) -> None:
    assert isinstance(qwen_image, ImageGenerator)
    assert qwen_image.checkpoint == qwen_image_dir
    assert type(qwen_image.pipeline).__name__ == "QwenImagePipeline"
    images = qwen_image.generate(PROMPTS[:2], seed=0)
    assert images.shape == (2, 3, SMALL, SMALL)
    assert images.dtype == torch.float32
    assert images.device.type == "cpu"
    assert 0 <= float(images.min()) <= float(images.max()) <= 1
    assert float(images.std()) > 0


def test_the_same_seed_gives_the_same_images_and_another_seed_different_ones(
    qwen_image: DiffusersGenerator,
) -> None:
    first = qwen_image.generate(PROMPTS[:2], seed=11)
    assert torch.equal(first, qwen_image.generate(PROMPTS[:2], seed=11))
    assert (first - qwen_image.generate(PROMPTS[:2], seed=12)).abs().max() > 1e-3


def test_batches_split_the_prompts_and_batch_b_is_drawn_with_seed_plus_b(
    qwen_image: DiffusersGenerator,
) -> None:
    images = qwen_image.generate(PROMPTS, seed=5)  # batches [0, 1] (seed 5) and [2] (seed 6)
    assert images.shape == (3, 3, SMALL, SMALL)
    assert torch.equal(images[:2], qwen_image.generate(PROMPTS[:2], seed=5))
    assert torch.equal(images[2:], qwen_image.generate(PROMPTS[2:], seed=6))


def test_settings_reach_the_call_and_what_it_does_not_take_is_refused(
    qwen_image_dir: Path,
) -> None:
    wider = _build(qwen_image_dir, width=2 * SMALL, negative_prompt=" ", true_cfg_scale=2.0)
    assert wider.generate(PROMPTS[:1], seed=0).shape == (1, 3, SMALL, 2 * SMALL)
    message = _one_line_port_error(
        lambda: _build(qwen_image_dir, call_kwargs={"no_such_argument": 1})
    )
    assert "QwenImagePipeline's call takes no no_such_argument" in message
    with pytest.raises(ValidationError, match="set by the adapter"):
        DiffusersGeneratorSettings(path=qwen_image_dir, call_kwargs={"generator": 1})
    with pytest.raises(ValidationError, match="use the setting"):
        DiffusersGeneratorSettings(path=qwen_image_dir, call_kwargs={"height": 64})


def test_the_project_file_builds_it_by_name_with_a_relative_path(qwen_image_dir: Path) -> None:
    assert adapter_for("generator", "diffusers") is GENERATOR
    project_file = qwen_image_dir.parent / "flywheel.toml"
    sections = "\n".join(
        f'[{port}]\nadapter = "world"'
        for port in ("judge", "suites", "reward", "enhancer", "corpus", "degrader")
    )
    project_file.write_text(
        f'[generator]\nadapter = "diffusers"\npath = "{qwen_image_dir.name}"\n'
        f'height = {SMALL}\nwidth = {SMALL}\nnum_inference_steps = 1\ndtype = "float32"\n'
        f"batch_size = 2\ncall_kwargs = {{ max_sequence_length = 64 }}\n"
        f'{sections}\n[launcher]\nadapter = "in_process"\n'
    )
    project = read_project(project_file)
    built = build_part(project, "generator", _context(project.root))
    assert built is not None
    assert built.part.checkpoint == qwen_image_dir
    assert built.part.generate(PROMPTS[:1], seed=0).shape == (1, 3, SMALL, SMALL)


# ---- directories that are not pipelines -------------------------------------------------------


def test_a_missing_directory_is_a_one_line_port_error(tmp_path: Path) -> None:
    message = _one_line_port_error(lambda: _build(tmp_path / "nowhere"))
    assert message.endswith("nowhere: no such directory")


def test_a_directory_without_model_index_is_a_one_line_port_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    message = _one_line_port_error(lambda: _build(tmp_path / "empty"))
    assert "not a diffusers pipeline directory (no model_index.json)" in message


def test_a_corrupt_weights_file_is_a_one_line_port_error(
    qwen_image_dir: Path, tmp_path: Path
) -> None:
    broken = shutil.copytree(qwen_image_dir, tmp_path / "broken")
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10" * 64)
    message = _one_line_port_error(lambda: _build(broken))
    assert "broken: does not load" in message


# ---- editing ---------------------------------------------------------------------------------


def test_editing_with_a_pipeline_that_does_not_edit_is_refused(
    qwen_image: DiffusersGenerator,
) -> None:
    assert not qwen_image.edits
    message = _one_line_port_error(
        lambda: qwen_image.generate(PROMPTS[:2], seed=0, input_images=_inputs(2, SMALL))
    )
    assert message.endswith(f"{qwen_image.checkpoint}: QwenImagePipeline does not edit images")


def test_an_edit_pipeline_edits_each_image_as_its_own_seeded_call(
    qwen_image_21: DiffusersGenerator,
) -> None:
    assert qwen_image_21.edits
    inputs = _inputs(2)
    edited = qwen_image_21.generate(PROMPTS[:2], seed=3, input_images=inputs)
    assert edited.shape == (2, 3, SIZE, SIZE)
    assert 0 <= float(edited.min()) <= float(edited.max()) <= 1
    # Edit i is drawn with seed + i, whatever comes before it: the same call, the same image.
    second = qwen_image_21.generate(PROMPTS[1:2], seed=4, input_images=inputs[1:])
    assert torch.equal(edited[1:], second)
    # The input image reaches the output (weakly, through these random weights).
    other = qwen_image_21.generate(PROMPTS[1:2], seed=4, input_images=1 - inputs[1:])
    assert not torch.equal(other, second)
    mismatched = _one_line_port_error(
        lambda: qwen_image_21.generate(PROMPTS[:2], seed=0, input_images=inputs[:1])
    )
    assert "1 input images for 2 prompts" in mismatched


# ---- conversion into a generator directory of ours --------------------------------------------


def test_a_qwen_image_21_pipeline_converts_to_a_generator_sampling_the_same_images(
    qwen_image_21_dir: Path, qwen_image_21: DiffusersGenerator, tmp_path: Path
) -> None:
    out = convert_pipeline(qwen_image_21_dir, tmp_path / "ours", height=SIZE, width=SIZE, steps=2)
    loaded = Generator.load(out)  # the real loading path: bfloat16 Qwen3-VL condition
    assert loaded.config.condition == "qwen3-vl"
    assert loaded.config.sampler.steps == 2
    assert loaded.generate(PROMPTS[:1], seed=0).shape == (1, 3, SIZE, SIZE)
    # In float32 throughout, text-to-image matches the pipeline's (one prompt per call:
    # diffusers' batches of prompts of different lengths are not padding-invariant).
    encoder = ConditionEncoder.load(
        dataclasses.replace(loaded.config.condition_config(), dtype="float32")
    )
    ours = Generator(loaded.config, loaded.transformer, loaded.vae, encoder)
    images = [ours.generate([prompt], seed=9) for prompt in PROMPTS[:2]]
    for prompt, image in zip(PROMPTS[:2], images, strict=True):
        assert (image - qwen_image_21.generate([prompt], seed=9)).abs().max() <= 1e-5
    # Not vacuous: another prompt moves the image by far more than that.
    assert (images[0] - images[1]).abs().max() > 1e-4


def test_other_pipelines_and_busy_output_directories_do_not_convert(
    qwen_image_dir: Path, qwen_image_21_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConversionError, match="a QwenImagePipeline converts to nothing here"):
        convert_pipeline(qwen_image_dir, tmp_path / "out")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory"):
        convert_pipeline(qwen_image_21_dir, busy)
    karras = shutil.copytree(qwen_image_21_dir, tmp_path / "karras")
    scheduler = karras / "scheduler" / "scheduler_config.json"
    scheduler.write_text(
        json.dumps({**json.loads(scheduler.read_text()), "use_karras_sigmas": True})
    )
    with pytest.raises(ConversionError, match="use_karras_sigmas=True has no counterpart"):
        convert_pipeline(karras, tmp_path / "out")


def test_flywheel_convert_turns_a_whole_pipeline_into_a_generator_directory(
    qwen_image_21_dir: Path, qwen_image_dir: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from flywheel.cli.main import app
    from model.pipeline import Generator

    out = tmp_path / "generator"
    args = ["convert", "--from-diffusers", str(qwen_image_21_dir), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--height", str(SIZE), "--width", str(SIZE)])
    assert result.exit_code == 0, result.output
    assert Generator.load(out).config.height == SIZE
    refused = CliRunner().invoke(
        app, ["convert", "--from-diffusers", str(qwen_image_dir), "--out", str(tmp_path / "x")]
    )
    assert refused.exit_code == 2
    assert "Traceback" not in refused.output
