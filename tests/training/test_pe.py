"""Prompt-enhancer training: degradation operators, SFT on (terse -> rich), export, GRPO."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from statistics import mean
from typing import Any

import pytest
import torch

from model.prompt_enhancer import PromptEnhancer, PromptEnhancerConfig, build_pe_debug
from training.checkpoint import load_checkpoint, load_model_weights
from training.degradation import (
    OPERATORS,
    CorpusConfig,
    DegradationConfig,
    build_pairs,
    casual,
    degrade,
    rich_caption_corpus,
    tidy,
)
from training.pe_grpo import (
    PEGRPOConfig,
    build_frozen_generator,
    char_coverage,
    coverage,
    reward_components,
)
from training.pe_sft import (
    DEBUG_SYSTEM_PROMPT,
    IGNORE_INDEX,
    PromptPairsConfig,
    collate,
    encode_pair,
    export_enhancer,
    load_causal_lm,
    load_pairs,
    pe_sft_step,
    prompt_ids,
    read_pairs,
    render_prompt,
    write_pairs,
)
from training.recipes import pe_grpo_debug, pe_sft_debug
from training.trainer import train

CAPTION = (
    "Three weathered wooden red boats resting in a small harbor on the left side of the frame, "
    'lit by warm golden-hour sunlight, with a small sign reading "OPEN 24 HOURS" in the upper '
    "right corner, in the style of a detailed watercolor painting."
)
SFT_STEPS = 40
GRPO_STEPS = 30


def _apply(op: str, caption: str = CAPTION, seed: int = 0) -> str:
    return degrade(caption, ops=[op], generator=torch.Generator().manual_seed(seed))


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- degradation ------------------------------------------------------------------------


def test_lighting_drops_the_lighting_clause_only() -> None:
    out = _apply("lighting")
    for gone in ("sunlight", "golden-hour", "lit by"):
        assert gone not in out
    assert out.startswith("Three weathered wooden red boats resting in a small harbor")
    assert '"OPEN 24 HOURS"' in out
    assert "watercolor" in out


def test_texture_drops_materials() -> None:
    out = _apply("texture")
    assert "weathered" not in out
    assert "wooden" not in out
    assert out.startswith("Three red boats resting in a small harbor")


def test_layout_drops_positions_but_not_quotes() -> None:
    out = _apply("layout")
    for gone in ("left side", "upper right corner", "frame"):
        assert gone not in out
    assert "small harbor," in out
    assert '"OPEN 24 HOURS"' in out
    assert _apply("layout", 'A sign reading "ON THE LEFT SIDE", centered') == (
        'A sign reading "ON THE LEFT SIDE"'
    )


def test_count_becomes_vague_and_quoted_digits_stay() -> None:
    outs = {_apply("count", seed=s).split(" boats")[0] for s in range(12)}
    assert outs <= {"some weathered wooden red", "several weathered wooden red",
                    "a few weathered wooden red", "weathered wooden red"}  # fmt: skip
    assert len(outs) > 1  # the generator picks the vague word
    assert all('"OPEN 24 HOURS"' in _apply("count", seed=s) for s in range(4))
    assert _apply("count", "A single glossy cat next to 4 dogs") in {
        "a glossy cat next to some dogs", "a glossy cat next to several dogs",
        "a glossy cat next to a few dogs", "a glossy cat next to dogs",
    }  # fmt: skip


def test_quote_removes_the_text_both_ways() -> None:
    outs = {_apply("quote", seed=s) for s in range(8)}
    assert all("OPEN" not in out and '"' not in out for out in outs)
    phrase = CAPTION.replace(' reading "OPEN 24 HOURS"', "")
    replaced = CAPTION.replace('"OPEN 24 HOURS"', "some text")
    assert outs == {phrase, replaced}


def test_style_and_colour() -> None:
    styled = _apply("style")
    assert "watercolor" not in styled
    assert "painting" not in styled
    assert styled.endswith("in the upper right corner")
    coloured = _apply("colour", 'A red cat and a blue vase with a sign reading "RED"')
    assert coloured == 'A cat and a vase with a sign reading "RED"'


def test_tidy_casual_and_determinism() -> None:
    assert tidy("a  wooden orange cat ,, in a harbor ,") == "a wooden orange cat, in a harbor"
    assert _apply("texture", "A wooden orange cat") == "An orange cat"
    assert casual("A cat on a mat.") == "a cat on a mat"
    assert casual('"OPEN" sign') == '"OPEN" sign'
    ops = list(OPERATORS)
    first = degrade(CAPTION, ops=ops, generator=torch.Generator().manual_seed(3))
    again = degrade(CAPTION, ops=ops, generator=torch.Generator().manual_seed(3))
    assert first == again
    assert first.startswith("boats resting in a small harbor") or " boats resting" in first
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(CAPTION, ops=["blur"], generator=torch.Generator())


def test_corpus_and_pairs() -> None:
    corpus = rich_caption_corpus(CorpusConfig(size=30, seed=1))
    assert corpus == rich_caption_corpus(CorpusConfig(size=30, seed=1))
    assert len(set(corpus)) == 30
    assert sum('"' in c for c in corpus) >= 10
    pairs = build_pairs(corpus, config=DegradationConfig(), generator=torch.Generator())
    again = build_pairs(corpus, config=DegradationConfig(), generator=torch.Generator())
    assert pairs == again
    assert len(pairs) == 30
    for terse, rich in pairs:
        assert len(terse) < len(rich)
        assert terse[0].islower()
        assert not terse.endswith(".")


def test_a_pairs_file_is_used_as_given(tmp_path: Path) -> None:
    pairs = [("red circle", "A large red circle."), ("ciel « bleu »", "Un ciel « bleu ».")]
    path = write_pairs(tmp_path / "pairs.jsonl", pairs)
    config = PromptPairsConfig(pairs=path)
    config.validate()
    assert load_pairs(config) == pairs
    with pytest.raises(ValueError, match="is not a file"):
        PromptPairsConfig(pairs=tmp_path / "missing.jsonl").validate()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"prompt": "a"}\n', "pairs.jsonl:1: want"),
        ('{"prompt": "a", "target": "b"}\nnot json\n', "pairs.jsonl:2: not JSON"),
        ('{"prompt": "", "target": "b"}\n', "pairs.jsonl:1: want"),
        ("[1, 2]\n", "pairs.jsonl:1: want"),
        ("\n", "no pairs"),
    ],
)
def test_a_bad_pairs_file_is_refused_with_its_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_pairs(path)


# ---- SFT --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def debug_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pe_debug(tmp_path_factory.mktemp("pe-base"))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pe-sft")
    train(pe_sft_debug(), out=out, max_steps=SFT_STEPS)  # half the recipe's steps
    return out


def test_sft_loss_falls_and_accuracy_rises(sft_run: Path) -> None:
    metrics = _metrics(sft_run)
    assert len(metrics) == SFT_STEPS
    assert abs(metrics[0]["loss"] - math.log(259)) < 0.1  # a random byte-level model
    first, last = metrics[:5], metrics[-5:]
    assert mean(m["loss"] for m in last) < mean(m["loss"] for m in first) - 1.2
    assert mean(m["token_accuracy"] for m in last) > mean(m["token_accuracy"] for m in first) + 0.1


def test_training_renders_what_the_enhancer_reads(debug_base: Path) -> None:
    enhancer = PromptEnhancer.load(
        PromptEnhancerConfig(path=debug_base, system_prompt_t2i=DEBUG_SYSTEM_PROMPT)
    )
    for prompt in ("a red boat", 'a sign reading "HI"'):
        rendered = render_prompt(enhancer.tokenizer, prompt, system_prompt=DEBUG_SYSTEM_PROMPT)
        assert rendered == enhancer._render(prompt, "text_to_image")


def test_prompt_tokens_get_no_loss(debug_base: Path) -> None:
    model, tokenizer = load_causal_lm(debug_base, init_from=None, device="cpu", trainable=True)
    terse, rich = "a red boat", "Three weathered red boats in a harbor at dusk."
    ids, labels = encode_pair(
        tokenizer, terse, rich, system_prompt=DEBUG_SYSTEM_PROMPT, max_length=512
    )
    prompt = len(prompt_ids(tokenizer, terse, system_prompt=DEBUG_SYSTEM_PROMPT))
    assert labels[:prompt] == [IGNORE_INDEX] * prompt
    assert tokenizer.decode(labels[prompt:]) == rich + "<|im_end|>"

    # Gradients reach only the logits that predict target tokens.
    captured: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        output.retain_grad()
        captured.append(output)

    handle = model.lm_head.register_forward_hook(keep)
    out = pe_sft_step(model, collate([(ids, labels)], int(tokenizer.pad_token_id)))
    handle.remove()
    torch.autograd.backward(out.loss)
    grad = captured[0].grad
    assert grad is not None
    per_position = grad[0].abs().sum(dim=-1)  # (T,)
    assert float(per_position[: prompt - 1].abs().max()) == 0.0
    assert bool((per_position[prompt - 1 : -1] > 0).all())
    assert out.metrics["tokens"] == len(labels) - prompt


def _lowercase_fraction(text: str) -> float:
    return sum(c.islower() or c == " " for c in text) / max(len(text), 1)


def test_export_loads_in_the_prompt_enhancer(sft_run: Path, tmp_path: Path) -> None:
    exported = export_enhancer(sft_run, tmp_path / "enhancer")

    def sampled(path: Path) -> str:
        config = PromptEnhancerConfig(
            path=path,
            system_prompt_t2i=DEBUG_SYSTEM_PROMPT,
            max_new_tokens=48,
            do_sample=True,
            seed=0,
        )
        enhancer = PromptEnhancer.load(config)
        return "".join(r.text for r in enhancer.rewrite(["a red boat", "two owls", "a cat"]))

    loaded = PromptEnhancer.load(PromptEnhancerConfig(path=exported)).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in load_model_weights(sft_run).items())
    trained, base = sampled(exported), sampled(sft_run / "enhancer_base")
    # Trained on captions, the rewrites are mostly lower-case words; the random base's are not.
    assert len(trained) > 40
    assert _lowercase_fraction(trained) > 0.7 > 0.4 > _lowercase_fraction(base)


# ---- GRPO -------------------------------------------------------------------------------


def _grpo_config() -> PEGRPOConfig:
    config = pe_grpo_debug()
    # A checkpoint after step 29, which samples a rollout that step 30 reuses.
    config.loop.checkpoint_every = GRPO_STEPS - 1
    config.loop.keep_checkpoints = None
    return config


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory: pytest.TempPathFactory, offline: None) -> Path:
    out = tmp_path_factory.mktemp("pe-grpo")
    train(_grpo_config(), out=out, max_steps=GRPO_STEPS)
    return out


def test_grpo_reward_rises_from_zero_kl(grpo_run: Path) -> None:
    metrics = _metrics(grpo_run)
    assert len(metrics) == GRPO_STEPS
    assert metrics[0]["kl"] == 0.0  # the policy is the reference
    assert metrics[0]["clip_fraction"] == 0.0
    assert metrics[-1]["kl"] > 0
    assert any(m["clip_fraction"] > 0 for m in metrics[1::2])  # reused rollouts get clipped
    assert all(math.isfinite(m["reward_alignment"]) for m in metrics)
    assert all(0 < m["rewrite_tokens"] <= 24 for m in metrics)
    first, last = metrics[:8], metrics[-8:]
    assert mean(m["reward_mean"] for m in last) > mean(m["reward_mean"] for m in first) + 0.04
    assert mean(m["reward_char_coverage"] for m in last) > (
        mean(m["reward_char_coverage"] for m in first) + 0.06
    )


def test_grpo_resumes_exactly_mid_rollout(grpo_run: Path, tmp_path: Path) -> None:
    # Step 29 sampled a rollout that step 30 reuses: it must come back from the checkpoint.
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(grpo_run / "checkpoints" / "step-00000029", checkpoints / "step-00000029")
    (checkpoints / "latest").write_text("step-00000029")
    loaded = load_checkpoint(checkpoints)
    assert loaded is not None
    assert loaded.data["uses"] == 1
    assert loaded.data["rollout"][0]["sequence"].shape[0] == 8
    train(_grpo_config(), out=tmp_path, max_steps=GRPO_STEPS)
    resumed = _metrics(tmp_path)[-1]
    original = _metrics(grpo_run)[-1]
    assert resumed["step"] == original["step"] == GRPO_STEPS
    assert resumed["loss"] == pytest.approx(original["loss"], rel=1e-5, abs=1e-7)
    assert resumed["reward_mean"] == original["reward_mean"]


def test_the_image_path_is_in_the_reward(offline: None) -> None:
    config = _grpo_config()
    frozen = build_frozen_generator(config.generator, config.reward, device="cpu")
    noise = torch.randn(1, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    rewrites = ["a red boat in a harbor", "a blue owl at night", "a red boat in a harbor"]
    scores = reward_components(
        frozen,
        rewrites,
        terse="a boat",
        rich="Three red boats in a small harbor at dusk.",
        rewrite_tokens=torch.tensor([22, 19, 22]),
        noise=noise,
        config=config.reward,
        max_new_tokens=24,
    )
    alignment = scores["alignment"]
    # The same rewrite renders the same image, another rewrite another one. With the random
    # debug generator and CLIP the image term moves only ~1e-5 between rewrites: real, tiny.
    assert abs(float(alignment[0] - alignment[2])) < 1e-6
    assert abs(float(alignment[0] - alignment[1])) > 5e-6
    assert coverage("three boats in a small harbor", "a boat", "Three red boats in a harbor.") == (
        pytest.approx(3 / 4)  # missing: three, red, boats, harbor
    )
    assert char_coverage("", "a boat", "red boats") == 0.0
    assert char_coverage("red boats", "a boat", "red boats") == 1.0
