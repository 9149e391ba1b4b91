"""The scene renderer: deterministic, and its pixels agree with its spec (checked directly).

These checks read the pixels themselves (colours at known places, per-element masks), not
the evaluator's recognizers: the evaluator is only as good as the truth it is scored against.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from fontTools.ttLib import TTFont  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from PIL import Image

from flywheel.world import scenes
from flywheel.world.fonts import FONTS, Script, font_path, fonts_for, load_font
from flywheel.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    EDIT_KINDS,
    HAN_WORDS,
    LATIN_WORDS,
    SHAPES,
    SIZES,
    TEXT_SIZES,
    EditKind,
    SceneConfig,
    SceneObject,
    SceneSpec,
    SceneText,
    captions,
    region,
    relations,
    render,
    sample_edit,
    sample_scene,
)

SIZE = 64
SEEDS = range(150)
TEXT_HEAVY = SceneConfig(text_probability=1.0, han_probability=0.5)
"""Every scene holds a text (half of them Han), so text checks see many texts."""

Mask = NDArray[np.bool_]


def _pixels(image: Image.Image) -> NDArray[np.int16]:
    return np.asarray(image, dtype=np.int16)  # (H, W, 3)


def _alone(scene: SceneSpec, element: SceneObject | SceneText) -> SceneSpec:
    """``scene`` with nothing but ``element`` on its background."""
    if isinstance(element, SceneObject):
        return scene.model_copy(update={"objects": (element,), "texts": ()})
    return scene.model_copy(update={"objects": (), "texts": (element,)})


def _mask(
    scene: SceneSpec, element: SceneObject | SceneText, width: int = SIZE, height: int = SIZE
) -> Mask:
    """The pixels ``element`` touches when drawn alone (anti-aliased fringe included)."""
    pixels = _pixels(render(_alone(scene, element), width, height))
    background = np.array(BACKGROUNDS[scene.background], dtype=np.int16)
    return np.asarray(np.abs(pixels - background).max(axis=2) > 0)  # (H, W)


def _elements(scene: SceneSpec) -> list[SceneObject | SceneText]:
    return [*scene.objects, *scene.texts]


def _scenes() -> list[SceneSpec]:
    return [sample_scene(s) for s in SEEDS] + [sample_scene(s, TEXT_HEAVY) for s in SEEDS]


# ---- determinism --------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, database=None)
@given(seed=st.integers(min_value=0, max_value=2**40))
def test_same_seed_same_spec_and_pixels(seed: int) -> None:
    first, second = sample_scene(seed), sample_scene(seed)
    assert first == second
    assert first.model_dump_json() == second.model_dump_json()
    assert render(first).tobytes() == render(second).tobytes()
    edit_a, edit_b = sample_edit(seed), sample_edit(seed)
    assert edit_a == edit_b


def test_different_seeds_differ() -> None:
    specs = [sample_scene(s).model_dump_json(exclude={"id"}) for s in range(100)]
    images = [render(sample_scene(s)).tobytes() for s in range(100)]
    assert len(set(specs)) == 100
    assert len(set(images)) == 100


def test_config_is_validated_and_honoured() -> None:
    for bad in (
        SceneConfig(shape_weights={"pentagon": 1.0}),
        SceneConfig(shape_weights={"star": 0.0}),
        SceneConfig(min_kinds=3, max_kinds=2),
        SceneConfig(text_probability=1.5),
    ):
        with pytest.raises(ValueError, match=r"SceneConfig|weights"):
            sample_scene(0, bad)
    two = SceneConfig(min_kinds=2, max_kinds=2, text_probability=0.0)
    for seed in range(100):
        scene = sample_scene(seed, two)
        assert len({(o.colour, o.shape) for o in scene.objects}) == 2
        assert not scene.texts
    single = SceneConfig(shape_weights={"hexagon": 1.0}, colour_weights={"green": 1.0})
    assert {(o.shape, o.colour) for s in range(30) for o in sample_scene(s, single).objects} == {
        ("hexagon", "green")
    }


# ---- spec <-> image -------------------------------------------------------------------------


def test_object_centres_have_the_object_colour() -> None:
    """Every shape is filled at its centre: the centre pixel is exactly the object's colour."""
    checked = 0
    for scene in _scenes():
        for size in (SIZE, 2 * SIZE):
            pixels = _pixels(render(scene, size, size))
            for obj in scene.objects:
                row, col = int(obj.y * size), int(obj.x * size)
                assert tuple(pixels[row, col]) == COLOURS[obj.colour], (scene.id, obj, size)
                checked += 1
    assert checked > 400


def test_background_fills_the_border_and_dominates() -> None:
    """Nothing touches the outermost pixels, and the background is the commonest colour."""
    for scene in _scenes():
        pixels = _pixels(render(scene))
        background = np.array(BACKGROUNDS[scene.background], dtype=np.int16)
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        assert (border == background).all(), scene.id
        is_background = (pixels == background).all(axis=2)
        assert is_background.mean() > 0.4, scene.id


def test_everything_inside_the_canvas() -> None:
    for scene in _scenes():
        for obj in scene.objects:
            half = SIZES[obj.size] / 2
            assert half <= obj.x <= 1 - half, (scene.id, obj)
            assert half <= obj.y <= 1 - half, (scene.id, obj)
        for text in scene.texts:
            # Drawn alone on a canvas twice as wide (the text's size follows the height), at
            # the same pixels shifted to the middle, the text stays inside the middle half.
            wide = text.model_copy(update={"x": 0.25 + text.x / 2})
            mask = _mask(scene, wide, 2 * SIZE, SIZE)
            columns = np.nonzero(mask.any(axis=0))[0]
            assert columns.min() >= SIZE // 2, (scene.id, text)
            assert columns.max() < SIZE * 3 // 2, (scene.id, text)
            rows = np.nonzero(mask.any(axis=1))[0]
            assert rows.min() > 0, (scene.id, text)
            assert rows.max() < SIZE - 1, (scene.id, text)


def test_elements_do_not_overlap() -> None:
    """Drawn one at a time, no two elements of a scene share a pixel (fringes included)."""
    pairs = 0
    for scene in _scenes():
        masks = [_mask(scene, e) for e in _elements(scene)]
        for (i, mask_i), (j, mask_j) in itertools.combinations(enumerate(masks), 2):
            assert not (mask_i & mask_j).any(), (scene.id, i, j)
            pairs += 1
        for a, b in itertools.combinations(scene.objects, 2):
            gap = np.hypot(a.x - b.x, a.y - b.y) - (SIZES[a.size] + SIZES[b.size]) / 2
            assert gap > 0.03, (scene.id, a, b)
    assert pairs > 200


def test_each_element_is_drawn_where_the_spec_puts_it() -> None:
    """An element's pixels sit around its centre; the full render shows it there too."""
    texts = 0
    for scene in _scenes():
        pixels = _pixels(render(scene))
        for element in _elements(scene):
            mask = _mask(scene, element)
            rows, cols = np.nonzero(mask)
            middle_x = (cols.min() + cols.max() + 1) / 2 / SIZE
            middle_y = (rows.min() + rows.max() + 1) / 2 / SIZE
            assert abs(middle_x - element.x) < 0.05, (scene.id, element)
            assert abs(middle_y - element.y) < 0.08, (scene.id, element)
            if isinstance(element, SceneObject):
                extent = (cols.max() - cols.min() + 1) / SIZE
                assert extent <= SIZES[element.size] + 2 / SIZE, (scene.id, element)
                continue
            texts += 1
            height = (rows.max() - rows.min() + 1) / SIZE
            assert height <= TEXT_SIZES[element.size] * 1.2, (scene.id, element)
            colour = np.array(COLOURS[element.colour], dtype=np.int16)
            background = np.array(BACKGROUNDS[scene.background], dtype=np.int16)
            near_text = np.abs(pixels - colour).sum(axis=2) < np.abs(pixels - background).sum(
                axis=2
            )
            assert (near_text & mask).sum() >= 4, (scene.id, element)
    assert texts > 150


def test_the_text_is_the_words_it_names() -> None:
    """Another word at the same place renders different pixels (the string is drawn)."""
    for seed in range(40):
        scene = sample_scene(seed, TEXT_HEAVY)
        text = scene.texts[0]
        words = HAN_WORDS if text.script == "han" else LATIN_WORDS
        other = next(w for w in words if w != text.text and len(w) == len(text.text))
        changed = scene.model_copy(update={"texts": (text.model_copy(update={"text": other}),)})
        difference = np.abs(_pixels(render(scene)) - _pixels(render(changed))).max(axis=2)
        assert (difference > 60).sum() >= 5, (scene.id, text.text, other)


def test_fonts_render_their_scripts() -> None:
    """The Han font maps every character of the Han words to a real glyph (no tofu)."""
    for name, script in FONTS.items():
        assert font_path(name).is_file()
        assert name in fonts_for(script)
    (han_font,) = fonts_for("han")
    characters = sorted(set("".join(HAN_WORDS)))
    with TTFont(str(font_path(han_font)), lazy=True, fontNumber=0) as font:
        cmap = font.getBestCmap()
    assert all(ord(c) in cmap for c in characters)
    font = load_font(han_font, 32)
    bitmaps = {}
    for c in characters:
        mask = font.getmask(c)
        assert mask.getbbox() is not None, c
        bitmaps[c] = (mask.size, bytes(mask))
    # Tofu draws one box for every missing character: distinct characters, distinct bitmaps.
    assert len(set(bitmaps.values())) == len(characters)
    missing = font.getmask("\U0010fffd")
    assert (missing.size, bytes(missing)) not in set(bitmaps.values())
    for latin in fonts_for("latin"):
        assert load_font(latin, 32).getmask("a").getbbox() is not None


def test_layout_bounds_the_real_text_widths() -> None:
    """The fixed width bound the layout uses holds for every word in every font."""
    scripts: tuple[tuple[Script, tuple[str, ...]], ...] = (
        ("latin", LATIN_WORDS),
        ("han", HAN_WORDS),
    )
    for script, words in scripts:
        for name in fonts_for(script):
            font = load_font(name, 200)
            for word in words:
                bound = scenes._text_extent(word, "large", script) / TEXT_SIZES["large"]
                assert font.getlength(word) / 200 <= bound, (name, word)


# ---- captions ---------------------------------------------------------------------------


_NUMBERS = {1: "", 2: "two", 3: "three"}


def test_captions_say_what_the_scene_holds() -> None:
    count_scenes = 0
    for scene in _scenes():
        caps = captions(scene)
        assert scene.background in caps.rich
        for (colour, shape), n in scene.counts().items():
            (size,) = {o.size for o in scene.objects if (o.colour, o.shape) == (colour, shape)}
            noun = shape if n == 1 else f"{shape}s"
            phrase = f"{_NUMBERS[n]} {size} {colour} {noun}".strip()
            assert phrase in caps.rich, (caps.rich, phrase)
            assert f"{_NUMBERS[n]} {colour} {noun}".strip() in caps.raw, (caps.raw, colour)
            assert f"{colour} {shape}" in caps.terse
            count_scenes += n > 1
        for obj in scene.objects:
            assert region(obj.x, obj.y) in caps.rich
        for i, rel, j in relations(scene)[:3]:
            a, b = scene.objects[i], scene.objects[j]
            assert f"{a.colour} {a.shape} is {rel} the {b.colour} {b.shape}" in caps.rich.lower()
        for text in scene.texts:
            assert f'"{text.text}"' in caps.rich
            assert f'"{text.text}"' in caps.raw
            assert text.font in caps.rich
            assert text.colour in caps.rich
            assert text.text not in caps.terse
            assert "text" in caps.terse
    assert count_scenes > 20


def test_terse_prompt_omits_counts_sizes_and_places() -> None:
    banned = re.compile(
        r"\b(two|three|small|medium|large|left|right|top|bottom|centre|middle|above|below|"
        r"background)\b"
    )
    for scene in _scenes():
        terse = captions(scene).terse
        if scene.objects:
            assert not banned.search(terse), terse
        assert len(terse) < len(captions(scene).rich)


# ---- editing ----------------------------------------------------------------------------


def _changed_pixels(source: SceneSpec, target: SceneSpec) -> Mask:
    return np.asarray((_pixels(render(source)) != _pixels(render(target))).any(axis=2))


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edits_change_exactly_what_the_instruction_says(kind: EditKind) -> None:
    for seed in range(30):
        pair = sample_edit(seed, kind=kind)
        source, target = pair.source, pair.target
        assert pair.kind == kind
        assert source.background == target.background
        changed = _changed_pixels(source, target)
        assert changed.any()
        if kind == "text":
            assert source.objects == target.objects
            assert len(source.texts) == len(target.texts)
            old_text, new_text = source.texts[0], target.texts[0]
            assert old_text.model_copy(update={"text": new_text.text}) == new_text
            assert old_text.text != new_text.text
            assert pair.instruction == f'replace the text "{old_text.text}" with "{new_text.text}"'
            drawn = _mask(source, old_text) | _mask(target, new_text)
            assert not (changed & ~drawn).any()
            continue
        assert source.texts == target.texts
        before, after = list(source.objects), list(target.objects)
        if kind == "attribute":
            assert len(before) == len(after)
            (i,) = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
            old, new = before[i], after[i]
            assert old.model_copy(update={"colour": new.colour}) == new
            assert new.colour != old.colour
            assert source.counts()[(old.colour, old.shape)] == 1
            assert pair.instruction == f"make the {old.colour} {old.shape} {new.colour}"
            assert not (changed & ~_mask(source, old)).any()
        elif kind == "add":
            assert after[:-1] == before
            new = after[-1]
            assert (new.colour, new.shape) not in source.counts()
            assert pair.instruction.startswith(f"add a {new.size} {new.colour} {new.shape}")
            assert region(new.x, new.y) in pair.instruction
            for other in _elements(source):
                assert not (_mask(target, new) & _mask(source, other)).any()
            assert not (changed & ~_mask(target, new)).any()
        else:
            assert len(after) == len(before) - 1 >= 1
            (old,) = [o for o in before if o not in after]
            assert [o for o in before if o != old] == after
            assert source.counts()[(old.colour, old.shape)] == 1
            assert pair.instruction == f"remove the {old.colour} {old.shape}"
            assert not (changed & ~_mask(source, old)).any()


def test_edits_without_texts_still_come() -> None:
    """A world without texts yields edits of the other kinds (the text kind is skipped)."""
    no_text = SceneConfig(text_probability=0.0)
    kinds = {sample_edit(seed, no_text).kind for seed in range(40)}
    assert kinds == {"attribute", "add", "remove"}
    with pytest.raises(RuntimeError, match="text edit"):
        sample_edit(0, no_text, kind="text")


# ---- rare concepts ------------------------------------------------------------------------


def test_a_rare_concept_is_rare() -> None:
    """shape_weights star=0.005: stars in under 1% of 2000 scenes; at weight 1, far more."""
    rare = SceneConfig(shape_weights={**dict.fromkeys(SHAPES, 1.0), "star": 0.005})

    def star_frequency(config: SceneConfig) -> float:
        scenes = [sample_scene(seed, config) for seed in range(2000)]
        return sum(any(o.shape == "star" for o in s.objects) for s in scenes) / len(scenes)

    assert star_frequency(rare) < 0.01
    assert star_frequency(SceneConfig()) > 0.15
