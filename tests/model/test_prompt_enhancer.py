"""Prompt enhancer: the tiny debug model written to disk and loaded offline through the real
local-path loader; length limits, left-padded batches, greedy and seeded determinism, and a
caller's tokenizer left unchanged."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.hf_loading import load_tokenizer
from model.prompt_enhancer import (
    IM_END,
    PAD_TOKEN,
    PromptEnhancer,
    PromptEnhancerConfig,
    PromptEnhancerError,
    build_pe_debug,
    byte_level_tokenizer,
    pe_debug,
    pe_debug_enhancer,
)

PROMPTS = [
    "a cat",
    "a red fox asleep beside a mossy stone in soft morning light",
    "a neon sign that says 'OPEN' above a door",
]


@pytest.fixture(scope="module")
def pe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A wider init than pe_debug's 0.02, whose greedy output barely depends on the input:
    # here different prompts continue differently, so batching mistakes show.
    spec = dataclasses.replace(pe_debug(), initializer_range=0.2)
    return build_pe_debug(tmp_path_factory.mktemp("pe"), spec)


@pytest.fixture(scope="module")
def enhancer(offline: None, pe_dir: Path) -> PromptEnhancer:
    config = dataclasses.replace(pe_debug_enhancer(pe_dir), max_new_tokens=12)
    return PromptEnhancer.load(config)


def _with(enhancer: PromptEnhancer, **changes: object) -> PromptEnhancer:
    """The loaded model and tokenizer under another config."""
    config = dataclasses.replace(enhancer.config, **changes)  # type: ignore[arg-type]
    return PromptEnhancer(config, enhancer.model, enhancer.tokenizer)


def test_byte_level_tokenizer_round_trips_and_renders_chatml() -> None:
    tokenizer = byte_level_tokenizer()
    assert len(tokenizer) == 259
    text = "Café 'OPEN' — 你好\n\ttabs"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode())
    assert tokenizer.decode(ids) == text
    rendered = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert (
        rendered
        == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.convert_tokens_to_ids(IM_END) == tokenizer.eos_token_id == 258


def test_build_writes_a_seeded_loadable_directory(tmp_path: Path) -> None:
    state = torch.random.get_rng_state()
    first = build_pe_debug(tmp_path / "a")
    second = build_pe_debug(tmp_path / "b")
    other = build_pe_debug(tmp_path / "c", dataclasses.replace(pe_debug(), seed=1))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (first / name).is_file()
    config = json.loads((first / "config.json").read_text())
    assert config["model_type"] == "qwen3"
    assert config["num_hidden_layers"] == 2
    assert config["hidden_size"] == 64
    assert config["vocab_size"] == 259
    a, b, c = (load_file(p / "model.safetensors") for p in (first, second, other))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_loads_through_the_local_path(enhancer: PromptEnhancer, pe_dir: Path) -> None:
    assert type(enhancer.model).__name__ == "Qwen3ForCausalLM"
    assert enhancer.eos_ids == [258]
    assert not enhancer.model.training
    missing = PromptEnhancerConfig(path=pe_dir / "absent")
    with pytest.raises(PromptEnhancerError, match="not a local directory"):
        PromptEnhancer.load(missing)


def test_max_new_tokens_is_respected(enhancer: PromptEnhancer) -> None:
    for limit in (1, 5):
        rewrites = _with(enhancer, max_new_tokens=limit).rewrite(PROMPTS)
        assert [r.new_tokens for r in rewrites] == [limit] * len(PROMPTS)
        assert all(not r.truncated for r in rewrites)


def test_long_prompts_are_cut_to_max_input_tokens(enhancer: PromptEnhancer) -> None:
    short = enhancer.rewrite(PROMPTS[:1])[0]
    limit = short.input_tokens + 40
    capped = _with(enhancer, max_input_tokens=limit)
    long_prompt = PROMPTS[1] * 10
    rewrites = capped.rewrite([PROMPTS[0], long_prompt])
    assert not rewrites[0].truncated
    assert rewrites[0].input_tokens == short.input_tokens
    # Byte-level: the prompt is cut to exactly the room left by the template.
    assert rewrites[1].truncated
    assert rewrites[1].input_tokens == limit
    # A cut prompt generates as if its prefix had been given.
    prefix = long_prompt[: 40 + len(PROMPTS[0])]
    assert capped.rewrite([prefix])[0] == dataclasses.replace(rewrites[1], truncated=False)


def test_a_template_longer_than_the_input_limit_is_refused(enhancer: PromptEnhancer) -> None:
    with pytest.raises(PromptEnhancerError, match="template alone"):
        _with(enhancer, max_input_tokens=20)
    with pytest.raises(PromptEnhancerError, match="positions"):
        _with(enhancer, max_input_tokens=2000, max_new_tokens=100)


def test_greedy_batches_match_single_prompts(enhancer: PromptEnhancer) -> None:
    batched = enhancer.rewrite(PROMPTS)
    assert len({r.text for r in batched}) == len(PROMPTS)  # the prompts continue differently
    for prompt, rewrite in zip(PROMPTS, batched, strict=True):
        assert enhancer.rewrite([prompt]) == [rewrite]
    assert _with(enhancer, batch_size=2).rewrite(PROMPTS) == batched
    assert enhancer.rewrite(PROMPTS) == batched
    assert enhancer.enhance(PROMPTS) == [r.text for r in batched]
    editing = enhancer.rewrite(PROMPTS, task="image_editing")
    assert [r.input_tokens for r in editing] != [r.input_tokens for r in batched]


def test_seeded_sampling_is_deterministic(enhancer: PromptEnhancer) -> None:
    sampler = _with(enhancer, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, seed=3)
    state = torch.random.get_rng_state()
    first = sampler.rewrite(PROMPTS)
    assert sampler.rewrite(PROMPTS) == first
    assert sampler.rewrite(PROMPTS, seed=3) == first
    assert sampler.rewrite(PROMPTS, seed=4) != first
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first != enhancer.rewrite(PROMPTS)  # sampling, not greedy


def test_a_callers_tokenizer_is_not_changed(
    offline: None, enhancer: PromptEnhancer, tmp_path: Path
) -> None:
    unpadded = byte_level_tokenizer()
    unpadded.pad_token = None
    padded_here = PromptEnhancer(enhancer.config, enhancer.model, unpadded)
    assert unpadded.pad_token is None
    assert padded_here.tokenizer.pad_token == IM_END
    assert PromptEnhancer(enhancer.config, enhancer.model, enhancer.tokenizer).tokenizer is (
        enhancer.tokenizer
    )
    # Left padding is masked out: another pad token rewrites the batch the same way.
    assert padded_here.rewrite(PROMPTS) == enhancer.rewrite(PROMPTS)
    # A tokenizer loaded from a directory is ours: its pad token is set in place.
    unpadded.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == IM_END
    assert enhancer.tokenizer.pad_token == PAD_TOKEN  # the debug tokenizer keeps its own
