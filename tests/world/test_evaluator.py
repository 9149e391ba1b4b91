"""The ground-truth evaluator: exact segmentation, trained recognizers, per-element verdicts.

The acceptance figure of the issue: on held-out clean renders (scene seeds the evaluator
never trained on) every element kind is right at least 98% of the time, at 64 x 64 and at
128 x 128, with the shipped weights. Renders of a different scene fail exactly the elements
that differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flywheel.world.evaluator import (
    ELEMENT_KINDS,
    TRAIN_SEED_OFFSET,
    WEIGHTS,
    ElementResult,
    Evaluation,
    EvaluatorConfig,
    estimate_background,
    evaluate,
    line_crop,
    load_evaluator,
    measure_accuracy,
    segment,
    stack_lines,
    to_array,
)
from flywheel.world.evaluator_training import EvaluatorTrainConfig, text_box, train_evaluator
from flywheel.world.recognizers import ALPHABET, ctc_greedy_decode
from flywheel.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    HAN_WORDS,
    LATIN_WORDS,
    SceneObject,
    SceneSpec,
    SceneText,
    render,
    sample_scene,
)

HELD_OUT_SCENES = 1000
REQUIRED_ACCURACY = 0.98

BASE = SceneSpec(
    id="base",
    background="cream",
    objects=(
        SceneObject(shape="circle", colour="red", size="medium", x=0.25, y=0.5),
        SceneObject(shape="square", colour="blue", size="medium", x=0.75, y=0.5),
    ),
    texts=(
        SceneText(
            text="cafe",
            script="latin",
            font="DejaVu Sans",
            size="large",
            colour="black",
            x=0.5,
            y=0.88,
        ),
    ),
)
"""A red circle left of a blue square, the word "cafe" below them."""


def _with_object(scene: SceneSpec, index: int, **update: object) -> SceneSpec:
    objects = list(scene.objects)
    objects[index] = objects[index].model_copy(update=update)
    return scene.model_copy(update={"objects": tuple(objects)})


def _elements(result: Evaluation, kind: str) -> list[ElementResult]:
    return [e for e in result.elements if e.kind == kind]


def _failed(result: Evaluation) -> set[tuple[str, str]]:
    return {(e.kind, e.subject) for e in result.elements if not e.passed}


# ---- the acceptance figure -----------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 128])
def test_held_out_accuracy_per_element_kind(size: int) -> None:
    scores = measure_accuracy(HELD_OUT_SCENES, size=size)
    assert set(scores) == set(ELEMENT_KINDS)
    for kind, score in scores.items():
        assert score.elements >= 50, kind
        assert score.accuracy >= REQUIRED_ACCURACY, (kind, score)


def test_held_out_seeds_are_never_trained_on() -> None:
    with pytest.raises(ValueError, match="held-out"):
        measure_accuracy(2, first_seed=TRAIN_SEED_OFFSET - 1)


def test_shipped_weights_are_small_and_load_by_default() -> None:
    assert WEIGHTS.is_file()
    assert WEIGHTS.stat().st_size < 2 * 1024 * 1024
    assert load_evaluator() is load_evaluator()  # cached


# ---- faithful renders pass, different scenes fail what differs -----------------------------


@pytest.mark.parametrize("size", [64, 128])
def test_a_faithful_render_passes_every_element(size: int) -> None:
    result = evaluate(BASE, render(BASE, size, size))
    assert set(result.skills) == set(ELEMENT_KINDS)
    assert all(e.passed and e.score == 1.0 for e in result.elements), result.elements
    assert result.score == 1.0
    (relation,) = _elements(result, "relation")
    assert relation.asked == "left of"
    assert [t.text for t in result.texts] == ["cafe"]


def test_wrong_colour_fails_colour_and_presence_only() -> None:
    image = render(_with_object(BASE, 0, colour="orange"))
    result = evaluate(BASE, image)
    colour = _elements(result, "colour")
    assert (colour[0].passed, colour[0].found) == (False, "orange")
    assert colour[1].passed
    assert all(e.passed for e in _elements(result, "shape"))
    assert _failed(result) == {
        ("colour", "object 0 (red circle)"),
        ("object", "red circle"),
        ("count", "red circle"),
        ("relation", "red circle left of blue square"),
    }


def test_missing_object_fails_presence_count_and_its_attributes() -> None:
    image = render(BASE.model_copy(update={"objects": BASE.objects[:1]}))
    result = evaluate(BASE, image)
    count = [e for e in _elements(result, "count") if e.subject == "blue square"]
    assert (count[0].asked, count[0].found, count[0].score) == ("1", "0", 0.0)
    assert _elements(result, "shape")[1].found is None
    assert _failed(result) == {
        ("object", "blue square"),
        ("count", "blue square"),
        ("shape", "object 1 (blue square)"),
        ("colour", "object 1 (blue square)"),
        ("relation", "red circle left of blue square"),
    }


def test_wrong_count_fails_count_only() -> None:
    pair = BASE.model_copy(
        update={
            "objects": (
                SceneObject(shape="circle", colour="red", size="small", x=0.2, y=0.25),
                SceneObject(shape="circle", colour="red", size="small", x=0.2, y=0.6),
                BASE.objects[1],
            )
        }
    )
    three = pair.model_copy(
        update={
            "objects": (
                *pair.objects,
                SceneObject(shape="circle", colour="red", size="small", x=0.45, y=0.45),
            )
        }
    )
    assert all(e.passed for e in evaluate(pair, render(pair)).elements)
    result = evaluate(pair, render(three))
    (count,) = [e for e in _elements(result, "count") if e.subject == "red circle"]
    assert (count.asked, count.found, count.passed, count.score) == ("2", "3", False, 0.5)
    assert _failed(result) == {("count", "red circle")}


def test_swapped_relation_fails_the_relation_only() -> None:
    swapped = _with_object(_with_object(BASE, 0, x=0.75), 1, x=0.25)
    result = evaluate(BASE, render(swapped))
    (relation,) = _elements(result, "relation")
    assert not relation.passed
    assert relation.found is not None
    assert relation.found.startswith("separation -")
    assert _failed(result) == {("relation", "red circle left of blue square")}


def test_wrong_text_fails_the_exact_match_with_a_positive_edit_distance() -> None:
    (text,) = BASE.texts
    image = render(BASE.model_copy(update={"texts": (text.model_copy(update={"text": "taxi"}),)}))
    result = evaluate(BASE, image)
    (element,) = _elements(result, "text")
    assert element.found == "taxi"
    assert not element.passed
    assert element.edit_distance == 3
    assert element.score == pytest.approx(1 - 3 / 4)
    assert _failed(result) == {("text", element.subject)}


def test_an_empty_canvas_fails_everything() -> None:
    image = render(BASE.model_copy(update={"objects": (), "texts": ()}))
    result = evaluate(BASE, image)
    assert not any(e.passed for e in result.elements)
    assert result.score == 0.0
    assert result.objects == []
    assert result.texts == []


# ---- inputs and outputs ---------------------------------------------------------------------


def test_image_types_and_sizes_agree() -> None:
    image = render(BASE, 128, 128)
    array = np.array(image)  # a writable copy
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]
    reference = evaluate(BASE, image)
    for same in (array, tensor, tensor[None], torch.from_numpy(array).permute(2, 0, 1)):
        assert evaluate(BASE, same) == reference
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        evaluate(BASE, tensor[:2])
    large = evaluate(BASE, render(BASE, 512, 512))  # box-filtered to 128 first
    assert (large.width, large.height) == (512, 512)
    assert large.score == 1.0
    wide = evaluate(BASE, render(BASE, 160, 96))
    assert wide.score == 1.0


def test_results_round_trip_as_json() -> None:
    result = evaluate(BASE, render(_with_object(BASE, 0, colour="orange")))
    again = Evaluation.model_validate(json.loads(result.model_dump_json()))
    assert again == result
    skills = json.loads(result.model_dump_json())["skills"]
    assert skills["colour"] == {"elements": 2, "passed": 1, "accuracy": 0.5, "mean_score": 0.5}


def test_segmentation_is_exact_on_renders() -> None:
    scene = sample_scene(7)
    for size in (64, 128):
        rgb = to_array(render(scene, size, size))
        background = np.asarray(estimate_background(rgb))
        assert np.abs(background - BACKGROUNDS[scene.background]).max() <= 1
        seg = segment(rgb, EvaluatorConfig())
        big = [c for c in seg.components if c.area >= 0.002 * size * size]
        found = sorted((list(COLOURS)[c.colour], round(c.x, 2), round(c.y, 2)) for c in big)
        asked = sorted((o.colour, round(o.x, 2), round(o.y, 2)) for o in scene.objects)
        assert len(found) >= len(asked)
        for colour, x, y in asked:  # every object is one component, its centroid within 1 px
            assert any(
                c == colour and abs(fx - x) <= 1 / size + 0.005 and abs(fy - y) <= 1 / size + 0.005
                for c, fx, fy in found
            ), (colour, x, y, found)


def test_a_line_reads_the_same_alone_and_in_a_batch() -> None:
    evaluator = load_evaluator()
    lines = []
    for k, word in enumerate((LATIN_WORDS[0], HAN_WORDS[3], LATIN_WORDS[27])):
        script = "latin" if word.isascii() else "han"
        text = SceneText(
            text=word,
            script=script,
            font="DejaVu Serif" if script == "latin" else "Noto Sans CJK",
            size=("small", "medium", "large")[k],
            colour="blue",
            x=0.5,
            y=0.5,
        )
        scene = SceneSpec(id="line", background="white", texts=(text,))
        seg = segment(to_array(render(scene, 96, 96)), EvaluatorConfig())
        x0, _, x1, _ = text_box(text, 96, 96)
        inside = [c for c in seg.ink if x0 - 2 <= c.x * 96 <= x1 + 2]
        box = (
            min(c.box[0] for c in inside),
            min(c.box[1] for c in inside),
            max(c.box[2] for c in inside),
            max(c.box[3] for c in inside),
        )
        lines.append(line_crop(seg.coverage[inside[0].colour], box))
    with torch.no_grad():
        together = ctc_greedy_decode(*evaluator.text_net(*stack_lines(lines)))
        alone = [ctc_greedy_decode(*evaluator.text_net(*stack_lines([x])))[0] for x in lines]
    assert together == alone
    assert set("".join(alone)) <= set(ALPHABET)


# ---- training ------------------------------------------------------------------------------


def _tiny() -> EvaluatorTrainConfig:
    return EvaluatorTrainConfig(
        scenes=40, sheets=30, sizes=(64,), shape_steps=100, text_steps=80, text_batch=16
    )


def test_training_is_deterministic_its_losses_fall_and_its_weights_load(tmp_path: Path) -> None:
    first, report = train_evaluator(tmp_path / "a.safetensors", seed=3, config=_tiny())
    _, again = train_evaluator(None, seed=3, config=_tiny())
    assert report.shape_loss == again.shape_loss
    assert report.text_loss == again.text_loss
    assert report.components > 100
    assert report.lines > 100
    head, tail = report.shape_loss[:10], report.shape_loss[-10:]
    assert sum(tail) < 0.5 * sum(head), (head, tail)
    head, tail = report.text_loss[:10], report.text_loss[-10:]
    assert sum(tail) < 0.6 * sum(head), (head, tail)
    assert report.shape_accuracy > 0.5  # 7 classes: chance is about 1 / 7
    loaded = load_evaluator(tmp_path / "a.safetensors")
    for mine, theirs in ((first.shape_net, loaded.shape_net), (first.text_net, loaded.text_net)):
        for (name, a), b in zip(
            mine.state_dict().items(), theirs.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), name


def test_foreign_weights_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": "something else"})
    with pytest.raises(ValueError, match="retrain"):
        load_evaluator(path)
    with pytest.raises(FileNotFoundError, match="train"):
        load_evaluator(tmp_path / "missing.safetensors")
