"""The VLM judge on a tiny LLaVA (CLIP vision tower, Qwen2 language model) that the tests
build with seeded random weights and ``save_pretrained`` into a temporary directory: a
byte-level tokenizer with an ``<image>`` token and a ChatML template, a CLIP image processor
of 32 x 32 pixels; everything offline."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from flywheel.adapters.base import AdapterContext
from flywheel.adapters.vlm_judge import JUDGE, VlmJudge, VlmJudgeSettings, to_pil
from flywheel.ports import Judge, JudgeRequest, PortError
from flywheel.project import adapter_for
from model.prompt_enhancer import byte_level_tokenizer
from model.torchvision_compat import import_torchvision

IMAGE_TOKEN = "<image>"
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_llava(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny random LLaVA and its processor to ``directory``."""
    import_torchvision()
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
    )

    tokenizer = byte_level_tokenizer()
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token
        chat_template=TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        ),
        text_config=Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=16,  # (32 / 8)^2 patches
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_tiny_qwen2_vl(directory: Path, *, seed: int = 0) -> Path:
    """Write a tiny random Qwen2-VL (the family of production judges) and its processor."""
    import_torchvision()
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = byte_level_tokenizer()
    vision = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
    tokenizer.add_tokens(vision, special_tokens=True)
    start, image, end, video = tokenizer.convert_tokens_to_ids(vision)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=TEMPLATE.replace(IMAGE_TOKEN, "".join(vision[:3])),
    )
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [2, 3, 3],  # half the head dimension, 16 / 2
                "rope_theta": 10000.0,
            },
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def make_judge(model_dir: Path) -> Callable[..., VlmJudge]:
    def make(**settings: Any) -> VlmJudge:
        context = AdapterContext(root=model_dir.parent, home=model_dir.parent)
        judge: VlmJudge = JUDGE.build(VlmJudgeSettings(path=model_dir, **settings), context)
        return judge

    return make


def picture(seed: int) -> torch.Tensor:
    return torch.rand(3, 24, 40, generator=torch.Generator().manual_seed(seed))


def requests() -> list[JudgeRequest]:
    return [
        JudgeRequest(
            prompt="a red circle and two cats",
            image=picture(0),
            spec={"elements": ["a red circle", "two cats"], "skill": "count"},
        ),
        JudgeRequest(prompt="a blue square", image=picture(1)),
        JudgeRequest(
            prompt="a sign",
            image=picture(2),
            spec={"elements": [{"element": "the text OPEN", "question": "Does it read OPEN?"}]},
        ),
    ]


def one_line_port_error(call: Callable[[], object]) -> str:
    with pytest.raises(PortError) as caught:
        call()
    assert caught.value.port == "judge"
    assert "\n" not in str(caught.value)
    return str(caught.value)


def reference_scores(model_dir: Path, cases: list[tuple[torch.Tensor, str]]) -> list[float]:
    """P(yes) / (P(yes) + P(no)) of each (image, question), computed here straight from the
    saved model, one at a time: the first bytes of the answers are "Y", "y" against "N",
    "n"."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), local_files_only=True)
    ids = processor.tokenizer.convert_tokens_to_ids
    scores = []
    for image, question in cases:
        text = f"<|im_start|>user\n{IMAGE_TOKEN}{question}<|im_end|>\n<|im_start|>assistant\n"
        inputs = processor(images=[to_pil(image)], text=[text], return_tensors="pt")
        with torch.no_grad():
            probabilities = model(**inputs).logits[0, -1].softmax(-1)
        p_yes = probabilities[ids(["Y", "y"])].sum()
        p_no = probabilities[ids(["N", "n"])].sum()
        scores.append(float(p_yes / (p_yes + p_no)))
    return scores


def test_the_judge_loads_from_a_local_directory_and_gives_a_verdict_per_spec_element(
    make_judge: Callable[..., VlmJudge], model_dir: Path
) -> None:
    judge = make_judge()
    assert isinstance(judge, Judge)
    assert judge.checkpoint == model_dir

    verdicts = judge.judge(requests())

    assert [[e.element for e in v.elements] for v in verdicts] == [
        ["a red circle", "two cats"],
        ["a blue square"],
        ["the text OPEN"],
    ]
    for element in (e for v in verdicts for e in v.elements):
        assert 0.0 <= element.score <= 1.0
        assert element.passed == (element.score >= 0.5)
        assert element.reason.startswith("P(yes)=")
    assert judge.judge([]) == []


def test_scores_are_p_yes_against_p_no_at_the_next_token_for_the_question_asked(
    make_judge: Callable[..., VlmJudge], model_dir: Path
) -> None:
    first, second, third = make_judge(question="Is {element} in view? Say yes or no.").judge(
        requests()
    )

    expected = reference_scores(
        model_dir,
        [
            (picture(0), "Is a red circle in view? Say yes or no."),
            (picture(1), "Is a blue square in view? Say yes or no."),
            (picture(2), "Does it read OPEN?"),
        ],
    )
    actual = [first.elements[0].score, second.elements[0].score, third.elements[0].score]
    assert actual == pytest.approx(expected, abs=1e-5)
    assert len(set(actual)) == 3  # the image and the question both matter


def test_an_element_passes_when_its_score_reaches_the_threshold(
    make_judge: Callable[..., VlmJudge],
) -> None:
    scores = sorted(e.score for v in make_judge().judge(requests()) for e in v.elements)
    middle = (scores[1] + scores[2]) / 2

    verdicts = make_judge(threshold=middle).judge(requests())

    elements = [e for v in verdicts for e in v.elements]
    assert sum(e.passed for e in elements) == 2
    assert all(e.passed == (e.score >= middle) for e in elements)
    assert all(v.passed for v in make_judge(threshold=0.0).judge(requests()))
    assert not any(v.passed for v in make_judge(threshold=1.0).judge(requests()))


def test_the_same_requests_give_the_same_verdicts_whatever_the_batch_size(
    make_judge: Callable[..., VlmJudge],
) -> None:
    judge = make_judge(batch_size=4)
    once, again = judge.judge(requests()), judge.judge(requests())
    one_by_one = make_judge(batch_size=1).judge(requests())

    assert once == again
    scores = [e.score for v in once for e in v.elements]
    assert [e.score for v in one_by_one for e in v.elements] == pytest.approx(scores, abs=1e-5)


def test_a_qwen2_vl_directory_is_judged_too_and_the_same_batched_or_one_by_one(
    tmp_path: Path,
) -> None:
    directory = build_tiny_qwen2_vl(tmp_path / "tiny-qwen2-vl")
    context = AdapterContext(root=tmp_path, home=tmp_path)

    def scores(batch_size: int) -> list[tuple[str, float]]:
        settings = VlmJudgeSettings(path=directory, batch_size=batch_size)
        verdicts = JUDGE.build(settings, context).judge(requests())
        return [(e.element, e.score) for v in verdicts for e in v.elements]

    batched, one_by_one = scores(4), scores(1)

    assert [e for e, _ in batched] == ["a red circle", "two cats", "a blue square", "the text OPEN"]
    assert all(0.0 <= s <= 1.0 for _, s in batched)
    assert [s for _, s in one_by_one] == pytest.approx([s for _, s in batched], abs=1e-5)


def test_a_missing_directory_or_one_without_a_vlm_is_a_port_error_with_a_one_line_reason(
    tmp_path: Path, model_dir: Path
) -> None:
    context = AdapterContext(root=tmp_path, home=tmp_path)

    def build(path: str) -> Callable[[], object]:
        return lambda: JUDGE.build(VlmJudgeSettings(path=Path(path)), context)

    missing = one_line_port_error(build("nowhere"))
    assert missing == f"judge: vlm {tmp_path / 'nowhere'}: not a local directory"

    (tmp_path / "empty").mkdir()
    empty = one_line_port_error(build("empty"))
    assert empty.endswith("empty: not a model directory (no config.json)")

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json", encoding="utf-8")
    assert "broken: cannot load its processor (" in one_line_port_error(build("broken"))

    from transformers import Qwen2Config

    text_only = tmp_path / "text-only"
    Qwen2Config(vocab_size=259, hidden_size=8, num_attention_heads=1).save_pretrained(text_only)
    byte_level_tokenizer().save_pretrained(text_only)
    reason = one_line_port_error(build("text-only"))
    assert reason.endswith(
        "text-only: not a vision-language model (its processor, a Qwen2Tokenizer, lacks an "
        "image processor or a tokenizer)"
    )

    weightless = shutil.ignore_patterns("*.safetensors")
    shutil.copytree(model_dir, tmp_path / "no-weights", ignore=weightless)
    no_weights = one_line_port_error(build("no-weights"))
    assert "no-weights: cannot load an image-text-to-text model (OSError: " in no_weights


def test_a_spec_whose_elements_are_not_strings_or_element_objects_is_a_port_error(
    make_judge: Callable[..., VlmJudge],
) -> None:
    judge = make_judge()

    def ask(spec: dict[str, Any]) -> str:
        request = JudgeRequest(prompt="p", image=picture(0), spec=spec)
        return one_line_port_error(lambda: judge.judge([requests()[1], request]))

    assert ask({"elements": "a cat"}) == (
        "judge: request 1: spec.elements must be a non-empty list"
    )
    assert ask({"elements": []}).endswith("spec.elements must be a non-empty list")
    assert "request 1: spec.elements[1] must be a non-empty string" in ask(
        {"elements": ["a cat", 3]}
    )
    assert "spec.elements[0]" in ask({"elements": [{"question": "Any cat?"}]})


def test_settings_ask_for_the_element_in_the_question_and_a_threshold_in_zero_to_one() -> None:
    with pytest.raises(ValidationError, match="must contain"):
        VlmJudgeSettings(path=Path("m"), question="Is it right?")
    with pytest.raises(ValidationError, match="threshold"):
        VlmJudgeSettings(path=Path("m"), threshold=1.5)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        VlmJudgeSettings.model_validate({"path": "m", "model": "Qwen/Qwen2-VL-2B-Instruct"})


def test_the_adapter_is_registered_reads_paths_against_the_project_and_checks_itself(
    model_dir: Path,
) -> None:
    adapter = adapter_for("judge", "vlm")
    assert adapter is JUDGE
    context = AdapterContext(root=model_dir.parent, home=model_dir.parent)

    judge = adapter.build(adapter.settings.model_validate({"path": model_dir.name}), context)

    assert judge.checkpoint == model_dir
    report = judge.check()
    assert report.startswith(f"vlm {model_dir}: llava on cpu (torch.float32), probe scored 0.")
    if not torch.cuda.is_available():
        on_gpu = AdapterContext(root=model_dir.parent, home=model_dir.parent, device="cuda")
        message = one_line_port_error(lambda: JUDGE.build(VlmJudgeSettings(path=model_dir), on_gpu))
        assert message.endswith("device 'cuda', but CUDA is not available")
