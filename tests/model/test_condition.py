"""Condition encoder: the packaged MiniLM (no final norm) and tiny Qwen3 / Qwen3-VL decoders
saved to disk, all loaded offline through the real local-path code, checked for shapes, masks,
the template drop, padding invariance and the pre-final-norm correction."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from model.condition import (
    ConditionEncoder,
    ConditionEncoderConfig,
    ConditionEncoderError,
    PromptTemplate,
    minilm_condition,
    qwen3_vl_condition,
)
from model.prompt_enhancer import build_pe_debug, byte_level_tokenizer, pe_debug
from model.torchvision_compat import import_torchvision

PROMPTS = [
    "a cat",
    "a red fox asleep beside a mossy stone in soft morning light",
    "",
    "a neon sign that says 'OPEN' above a door",
]


@pytest.fixture(scope="module")
def minilm(offline: None) -> ConditionEncoder:
    return ConditionEncoder.load(minilm_condition())


def _valid_rows(hidden: Tensor, mask: Tensor) -> list[Tensor]:
    return [h[m] for h, m in zip(hidden, mask, strict=True)]


def test_minilm_has_no_final_norm_and_its_drop_index_is_the_template_prefix(
    minilm: ConditionEncoder,
) -> None:
    assert minilm.final_norm is None
    assert minilm.hidden_size == 384
    for task in ("text_to_image", "image_editing"):
        template = minilm.template(task)
        # [CLS] + the prefix's word pieces, without the trailing [SEP].
        prefix_ids = minilm.tokenizer(template.prefix.strip())["input_ids"][:-1]
        assert template.drop_index == len(prefix_ids)


def test_minilm_shapes_and_mask(minilm: ConditionEncoder) -> None:
    hidden, mask = minilm.encode(PROMPTS, task="text_to_image")
    template = minilm.config.text_to_image
    lengths = [
        len(minilm.tokenizer(template.render(p or " "))["input_ids"]) - template.drop_index
        for p in PROMPTS
    ]
    assert mask.dtype == torch.bool
    assert hidden.dtype == torch.float32
    assert hidden.shape == (len(PROMPTS), max(lengths), 384)
    assert mask.sum(dim=1).tolist() == lengths
    # Right-padded: each row's valid positions come first, padding is zero.
    for row, n in zip(mask, lengths, strict=True):
        assert row[:n].all()
        assert not row[n:].any()
    assert torch.all(hidden[~mask] == 0)
    assert torch.all(hidden[mask].abs().sum(dim=-1) > 0)


def test_minilm_returns_last_hidden_state_past_the_drop(minilm: ConditionEncoder) -> None:
    """No final norm: the condition is BERT's last_hidden_state with the prefix removed."""
    prompt = PROMPTS[1]
    hidden, mask = minilm.encode([prompt], task="image_editing")
    template = minilm.config.image_editing
    batch = minilm.tokenizer([template.render(prompt)], return_tensors="pt")
    with torch.no_grad():
        reference = minilm.model(**batch).last_hidden_state[0, template.drop_index :]
    assert mask.all()
    torch.testing.assert_close(hidden[0], reference, rtol=0, atol=1e-6)

    # The same encoder with drop index 0 keeps the prefix in front of the same states.
    full = dataclasses.replace(
        minilm.config, image_editing=dataclasses.replace(template, drop_index=0)
    )
    kept, _ = ConditionEncoder(full, minilm.model, minilm.tokenizer).encode(
        [prompt], task="image_editing"
    )
    assert kept.shape[1] == hidden.shape[1] + template.drop_index
    torch.testing.assert_close(kept[0, template.drop_index :], hidden[0], rtol=0, atol=1e-6)


def test_minilm_valid_positions_do_not_depend_on_batch_padding(minilm: ConditionEncoder) -> None:
    hidden, mask = minilm.encode(PROMPTS, task="text_to_image")
    for prompt, row in zip(PROMPTS, _valid_rows(hidden, mask), strict=True):
        alone, alone_mask = minilm.encode([prompt], task="text_to_image")
        assert alone_mask.all()
        torch.testing.assert_close(row, alone[0], rtol=0, atol=1e-5)


def test_minilm_is_deterministic_and_tasks_differ(minilm: ConditionEncoder) -> None:
    first, first_mask = minilm.encode(PROMPTS, task="text_to_image")
    second, second_mask = minilm.encode(PROMPTS, task="text_to_image")
    assert torch.equal(first, second)
    assert torch.equal(first_mask, second_mask)
    editing, _ = minilm.encode(PROMPTS[:1], task="image_editing")
    assert not torch.allclose(editing[0], first[0, : editing.shape[1]])
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.model.parameters())


def test_max_length_cuts_the_prompt(minilm: ConditionEncoder) -> None:
    short = dataclasses.replace(minilm.config, max_length=6)
    encoder = ConditionEncoder(short, minilm.model, minilm.tokenizer)
    hidden, mask = encoder.encode([PROMPTS[1], PROMPTS[0]], task="text_to_image")
    assert hidden.shape == (2, 6, 384)
    assert mask.sum(dim=1).tolist() == [6, 3]  # "a cat" + [SEP] fits


def test_templates_are_checked(minilm: ConditionEncoder) -> None:
    config = minilm.config
    too_far = dataclasses.replace(
        config, text_to_image=PromptTemplate(text="describe the image: {}", drop_index=6)
    )
    with pytest.raises(ConditionEncoderError, match="reaches into the prompt"):
        ConditionEncoder(too_far, minilm.model, minilm.tokenizer)
    no_slot = dataclasses.replace(
        config, image_editing=PromptTemplate(text="edit the image", drop_index=1)
    )
    with pytest.raises(ConditionEncoderError, match="exactly one"):
        ConditionEncoder(no_slot, minilm.model, minilm.tokenizer)
    too_long = dataclasses.replace(config, max_length=510)
    with pytest.raises(ConditionEncoderError, match="exceeds the tokenizer's limit"):
        ConditionEncoder(too_long, minilm.model, minilm.tokenizer)


def test_a_missing_directory_is_refused_before_any_hub_lookup(tmp_path: Path) -> None:
    config = dataclasses.replace(minilm_condition(), path=tmp_path / "absent")
    with pytest.raises(ConditionEncoderError, match="not a local directory"):
        ConditionEncoder.load(config)


# --- decoders: the final norm's input, not transformers' hidden_states[-1] ---------------------


def _chatml_config(path: Path) -> ConditionEncoderConfig:
    template = PromptTemplate(
        text="<|im_start|>system\nDraw.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n", drop_index=9
    )
    return ConditionEncoderConfig(
        path=path, text_to_image=template, image_editing=template, padding_side="left"
    )


def _without_final_norm(path: Path, norm: str) -> Any:
    """A second copy of the model whose final norm is the identity: last_hidden_state is then
    the last layer's output, computed without hooks."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    parent, _, name = norm.rpartition(".")
    setattr(model.get_submodule(parent), name, nn.Identity())
    return model


def _check_pre_norm(encoder: ConditionEncoder, prompts: list[str]) -> None:
    """The returned states are the final norm's input; transformers' hidden_states[-1] is its
    output, which differs, and the norm maps ours onto it."""
    assert encoder.final_norm is not None
    drop = encoder.config.text_to_image.drop_index
    hidden, mask = encoder.encode(prompts, task="text_to_image")
    batch = encoder.tokenizer(
        [encoder.config.text_to_image.render(p) for p in prompts],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    valid = batch["attention_mask"].bool()
    bare = _without_final_norm(encoder.config.path, encoder.final_norm)
    norm = encoder.model.get_submodule(encoder.final_norm)
    with torch.no_grad():
        pre_norm = bare(**batch).last_hidden_state
        reported = encoder.model(**batch, output_hidden_states=True).hidden_states[-1]
    for i, row in enumerate(_valid_rows(hidden, mask)):
        expected = pre_norm[i][valid[i]][drop:]
        torch.testing.assert_close(row, expected, rtol=0, atol=1e-6)
        after_norm = reported[i][valid[i]][drop:]
        assert (row - after_norm).abs().max() > 0.1
        with torch.no_grad():
            torch.testing.assert_close(norm(row), after_norm, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pe_debug(tmp_path_factory.mktemp("qwen3"), pe_debug())


def test_qwen3_decoder_returns_the_final_norm_input(offline: None, qwen3_dir: Path) -> None:
    encoder = ConditionEncoder.load(_chatml_config(qwen3_dir))
    # AutoModel gives the base Qwen3Model, whose final RMSNorm is `norm`.
    assert type(encoder.model).__name__ == "Qwen3Model"
    assert encoder.final_norm == "norm"
    _check_pre_norm(encoder, PROMPTS[:2])


def test_qwen3_final_norm_can_be_named(offline: None, qwen3_dir: Path) -> None:
    named = dataclasses.replace(_chatml_config(qwen3_dir), final_norm=None)
    encoder = ConditionEncoder.load(named)
    assert encoder.final_norm is None
    hidden, mask = encoder.encode(PROMPTS[:1], task="text_to_image")
    auto = ConditionEncoder(_chatml_config(qwen3_dir), encoder.model, encoder.tokenizer)
    pre, _ = auto.encode(PROMPTS[:1], task="text_to_image")
    # None takes last_hidden_state, i.e. after the norm: not what "auto" returns.
    assert mask.all()
    assert (hidden - pre).abs().max() > 0.1


@pytest.fixture(scope="module")
def qwen3_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-VL saved as Qwen3VLForConditionalGeneration, with the byte tokenizer."""
    import_torchvision()
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = byte_level_tokenizer()
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
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
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 1,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        },
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen3VLForConditionalGeneration(config)
    path = tmp_path_factory.mktemp("qwen3_vl")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_qwen3_vl_recipe_reads_the_language_model_before_its_norm(
    offline: None, qwen3_vl_dir: Path
) -> None:
    config = dataclasses.replace(qwen3_vl_condition(qwen3_vl_dir), dtype="float32")
    encoder = ConditionEncoder.load(config)
    assert encoder.final_norm == "language_model.norm"
    assert encoder.config.padding_side == "left"
    _check_pre_norm(encoder, PROMPTS[:2])
    # Left padding: the VL model's positions follow the mask, so a batch matches each alone.
    hidden, mask = encoder.encode(PROMPTS, task="image_editing")
    for prompt, row in zip(PROMPTS, _valid_rows(hidden, mask), strict=True):
        alone, _ = encoder.encode([prompt], task="image_editing")
        torch.testing.assert_close(row, alone[0], rtol=0, atol=1e-5)
