"""Condition encoder: the packaged MiniLM (no final norm) and tiny Qwen3 / Qwen3-VL / Qwen2.5-VL
decoders saved to disk, all loaded offline through the real local-path code, checked for shapes,
masks, the template drop (counted with the tokenizer, stated indexes checked), padding
invariance, the pre-final-norm correction, and that a caller's tokenizer is left unchanged."""

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
    qwen25_vl_condition,
    qwen_image_chat_template,
)
from model.prompt_enhancer import PAD_TOKEN, build_pe_debug, byte_level_tokenizer, pe_debug
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
        assert minilm.drop_index(task) == template.drop_index == len(prefix_ids) == 5
    # Left unstated, the same counts come from the tokenizer.
    config = dataclasses.replace(
        minilm.config,
        text_to_image=dataclasses.replace(minilm.config.text_to_image, drop_index=None),
        image_editing=dataclasses.replace(minilm.config.image_editing, drop_index=None),
    )
    counted = ConditionEncoder(config, minilm.model, minilm.tokenizer)
    assert counted.drop_index("text_to_image") == counted.drop_index("image_editing") == 5


def test_minilm_shapes_and_mask(minilm: ConditionEncoder) -> None:
    hidden, mask = minilm.encode(PROMPTS, task="text_to_image")
    template = minilm.config.text_to_image
    drop = minilm.drop_index("text_to_image")
    lengths = [
        len(minilm.tokenizer(template.render(p or " "))["input_ids"]) - drop for p in PROMPTS
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
    drop = minilm.drop_index("image_editing")
    batch = minilm.tokenizer([template.render(prompt)], return_tensors="pt")
    with torch.no_grad():
        states = minilm.model(**batch).last_hidden_state[0]
    assert mask.all()
    torch.testing.assert_close(hidden[0], states[drop:], rtol=0, atol=1e-6)

    # Dropping no text drops only [CLS]: the prefix stays in front of the same states.
    full = dataclasses.replace(
        minilm.config,
        image_editing=dataclasses.replace(template, dropped_text="", drop_index=None),
    )
    encoder = ConditionEncoder(full, minilm.model, minilm.tokenizer)
    assert encoder.drop_index("image_editing") == 1
    kept, _ = encoder.encode([prompt], task="image_editing")
    assert kept.shape[1] == hidden.shape[1] + drop - 1
    torch.testing.assert_close(kept[0], states[1:], rtol=0, atol=1e-6)


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
    for wrong in (4, 6):
        stated = dataclasses.replace(
            config, text_to_image=PromptTemplate(text="describe the image: {}", drop_index=wrong)
        )
        with pytest.raises(ConditionEncoderError, match=f"{wrong} does not match the 5 tokens"):
            ConditionEncoder(stated, minilm.model, minilm.tokenizer)
    mid_word = dataclasses.replace(
        config,
        text_to_image=PromptTemplate(
            text="describe the image: {}", dropped_text="describe the ima"
        ),
    )
    with pytest.raises(ConditionEncoderError, match="token boundary"):
        ConditionEncoder(mid_word, minilm.model, minilm.tokenizer)
    elsewhere = dataclasses.replace(
        config, text_to_image=PromptTemplate(text="describe the image: {}", dropped_text="the")
    )
    with pytest.raises(ConditionEncoderError, match="does not lead the prefix"):
        ConditionEncoder(elsewhere, minilm.model, minilm.tokenizer)
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


# With the byte tokenizer: <|im_start|>, the 7 bytes of "system\n", the 5 of "Draw.",
# <|im_end|>, "\n".
CHATML_SYSTEM_TURN = "<|im_start|>system\nDraw.<|im_end|>\n"
CHATML_SYSTEM_TOKENS = 1 + 7 + 5 + 1 + 1


def _chatml_config(path: Path) -> ConditionEncoderConfig:
    template = PromptTemplate(
        text=CHATML_SYSTEM_TURN + "<|im_start|>user\n{}<|im_end|>\n",
        dropped_text=CHATML_SYSTEM_TURN,
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
    drop = encoder.drop_index("text_to_image")
    hidden, mask = encoder.encode(prompts, task="text_to_image")
    batch = encoder.tokenizer(
        [encoder.config.text_to_image.render(p) for p in prompts],
        padding=True,
        padding_side=encoder.config.padding_side,
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
    assert encoder.drop_index("text_to_image") == CHATML_SYSTEM_TOKENS
    _check_pre_norm(encoder, PROMPTS[:2])


def test_a_callers_tokenizer_is_not_changed(offline: None, qwen3_dir: Path) -> None:
    encoder = ConditionEncoder.load(_chatml_config(qwen3_dir))
    assert encoder.tokenizer.pad_token == PAD_TOKEN  # loaded with its own pad token
    unpadded = byte_level_tokenizer()
    unpadded.pad_token = None
    padded_here = ConditionEncoder(_chatml_config(qwen3_dir), encoder.model, unpadded)
    assert unpadded.pad_token is None
    assert padded_here.tokenizer is not unpadded
    assert padded_here.tokenizer.pad_token == unpadded.eos_token
    # The copy pads with another token; padding is masked out, so the condition is the same.
    first, first_mask = encoder.encode(PROMPTS[:2], task="text_to_image")
    second, second_mask = padded_here.encode(PROMPTS[:2], task="text_to_image")
    assert torch.equal(first_mask, second_mask)
    torch.testing.assert_close(first, second, rtol=0, atol=1e-6)
    # A tokenizer that has a pad token is used as it is.
    assert ConditionEncoder(encoder.config, encoder.model, encoder.tokenizer).tokenizer is (
        encoder.tokenizer
    )


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


def _byte_tokens(text: str) -> int:
    """Tokens of ChatML ``text`` under the byte tokenizer: one per byte, one per special."""
    specials = ("<|im_start|>", "<|im_end|>")
    count = sum(text.count(s) for s in specials)
    return len(text.encode()) - sum(len(s) * text.count(s) for s in specials) + count


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
    # The system turn is dropped, counted byte by byte: the user turn's header stays.
    system_turn = encoder.config.text_to_image.dropped
    assert system_turn.endswith("<|im_end|>\n")
    assert encoder.drop_index("text_to_image") == _byte_tokens(system_turn)
    _check_pre_norm(encoder, PROMPTS[:2])
    # Left padding: the VL model's positions follow the mask, so a batch matches each alone.
    hidden, mask = encoder.encode(PROMPTS, task="image_editing")
    for prompt, row in zip(PROMPTS, _valid_rows(hidden, mask), strict=True):
        alone, _ = encoder.encode([prompt], task="image_editing")
        torch.testing.assert_close(row, alone[0], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def qwen25_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2.5-VL saved as Qwen2_5_VLForConditionalGeneration, with the byte tokenizer."""
    import_torchvision()
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = byte_level_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "bos_token_id": None,
            "eos_token_id": None,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [1, 1, 2],
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
            "window_size": 16,
            "fullatt_block_indexes": [0],
        },
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration(config)
    path = tmp_path_factory.mktemp("qwen25_vl")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_qwen25_vl_recipe_drops_the_counted_prefix_before_the_norm(
    offline: None, qwen25_vl_dir: Path
) -> None:
    recipe = qwen25_vl_condition(qwen25_vl_dir)
    assert recipe.text_to_image.drop_index is None  # counted at build, never hard-coded
    config = dataclasses.replace(recipe, dtype="float32")
    encoder = ConditionEncoder.load(config)
    assert type(encoder.model).__name__ == "Qwen2_5_VLModel"
    assert encoder.final_norm == "language_model.norm"
    assert encoder.config.padding_side == "right"
    # The whole prefix is dropped: system turn and the user turn's header.
    for task in ("text_to_image", "image_editing"):
        prefix = encoder.template(task).prefix
        assert prefix.endswith("<|im_start|>user\n")
        assert encoder.drop_index(task) == _byte_tokens(prefix)
    assert encoder.drop_index("image_editing") > encoder.drop_index("text_to_image")
    # A stated index is checked against the count.
    stated = dataclasses.replace(
        config,
        text_to_image=PromptTemplate(
            text=config.text_to_image.text, drop_index=encoder.drop_index("text_to_image")
        ),
    )
    assert ConditionEncoder(stated, encoder.model, encoder.tokenizer).drop_index(
        "text_to_image"
    ) == encoder.drop_index("text_to_image")
    qwen_image_34 = dataclasses.replace(
        config,
        text_to_image=PromptTemplate(
            text=qwen_image_chat_template("Draw the image:"), drop_index=34
        ),
    )
    with pytest.raises(ConditionEncoderError, match="34 does not match"):
        ConditionEncoder(qwen_image_34, encoder.model, encoder.tokenizer)
    _check_pre_norm(encoder, PROMPTS[:2])
    # Right padding: a causal model's valid positions do not see the padding after them.
    hidden, mask = encoder.encode(PROMPTS, task="image_editing")
    for prompt, row in zip(PROMPTS, _valid_rows(hidden, mask), strict=True):
        alone, _ = encoder.encode([prompt], task="image_editing")
        torch.testing.assert_close(row, alone[0], rtol=0, atol=1e-5)
