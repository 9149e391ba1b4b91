"""The world corpus (a training dataset with its truth) and the fixed benchmark suites."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import get_args

import pytest
from PIL import Image

from flywheel.world.benchmark import (
    REGRESSION_CASES,
    SKILL_ELEMENTS,
    SKILLS,
    STANDARD_CASES,
    BenchmarkCase,
    ElementKind,
    skill_elements,
    suite,
    suite_digest,
    suite_names,
)
from flywheel.world.corpus import (
    DATASET,
    CaptionKind,
    read_info,
    read_specs,
    reweighted,
    scene_seeds,
    write_world_corpus,
)
from flywheel.world.scenes import (
    COLOURS,
    CORPUS_SEED_LIMIT,
    EDIT_KINDS,
    SHAPES,
    SceneConfig,
    SceneSpec,
    captions,
    relations,
    render,
)
from training.data import SampleFilter, read_dataset, sample_info

# The suites' exact content. A deliberate change updates these (print them with
# `python -c "from flywheel.world.benchmark import *; print(suite_digest(suite('standard')))"`).
STANDARD_DIGEST = "84fe074a56eec53243fb57b31b05c155a54dc2325e2434cf3273124a3dba430b"
REGRESSION_DIGEST = "4de730bff77f143742ba41ee0991e7bc667dd26b1f7ece38833ea914eab19b49"


def _same_pixels(path: Path, spec: SceneSpec, size: int) -> bool:
    with Image.open(path) as image:
        return image.convert("RGB").tobytes() == render(spec, size, size).tobytes()


# ---- corpus -------------------------------------------------------------------------------


def test_corpus_round_trip(tmp_path: Path) -> None:
    written = write_world_corpus(
        tmp_path / "w", count=40, config=SceneConfig(), seed=3, size=32, edit_fraction=0.25
    )
    samples = read_dataset(tmp_path / "w")
    assert samples == written
    assert len(samples) == 40
    specs = read_specs(tmp_path / "w")
    assert list(specs) == [s.id for s in samples]
    editing = [s for s in samples if s.is_editing]
    assert len(editing) == 10
    languages = Counter(s.annotation.language for s in samples if s.annotation)
    assert set(languages) == {None, "en", "zh"}
    for sample in samples:
        record = specs[sample.id]
        assert record.spec.id == sample.id
        assert sample.caption == captions(record.spec).rich
        assert sample.annotation is not None
        assert sample.annotation.image_type == "synthetic scene"
        assert sample.annotation.style == "flat"
        assert not sample.annotation.watermarks
        assert sample.annotation.abnormal_element is None
        language = (
            {"latin": "en", "han": "zh"}[record.spec.texts[0].script] if record.spec.texts else None
        )
        assert sample.annotation.language == language
        assert sample.provenance.dataset == DATASET
        assert sample.provenance.split == "train"
        assert 0 <= record.seed < CORPUS_SEED_LIMIT
        # The truth renders to exactly the stored pixels.
        assert _same_pixels(tmp_path / "w" / sample.image, record.spec, 32)
        if sample.is_editing:
            assert record.source is not None
            assert record.edit_kind in EDIT_KINDS
            assert sample.instruction == record.instruction
            assert sample.provenance.origin_uri == f"world:edit:{record.seed}"
            (source_image,) = sample.input_images
            assert _same_pixels(tmp_path / "w" / source_image, record.source, 32)
            assert record.source.model_copy(update={"id": ""}) != record.spec.model_copy(
                update={"id": ""}
            )
        else:
            assert record.source is None
            assert sample.instruction is None
            assert sample.provenance.origin_uri == f"world:{record.seed}"
        with Image.open(tmp_path / "w" / sample.image) as image:
            assert image.size == (32, 32)
            assert image.mode == "RGB"
    info = read_info(tmp_path / "w")
    assert (info.count, info.seed, info.size, info.edit_fraction) == (40, 3, 32, 0.25)
    assert info.scene_config() == SceneConfig()
    # Filters of the training stack act on the annotations.
    only_en = SampleFilter(languages=("en",))
    kept = [s for s in samples if only_en.accepts(sample_info(s, 32, 32))]
    assert 0 < len(kept) < len(samples)


def test_corpus_is_deterministic_and_refuses_to_overwrite(tmp_path: Path) -> None:
    def lines(name: str, directory: Path) -> str:
        return (directory / name).read_text()

    for name in ("a", "b"):
        write_world_corpus(tmp_path / name, count=12, config=SceneConfig(), seed=7, size=16)
    for file in ("samples.jsonl", "specs.jsonl", "world.json"):
        assert lines(file, tmp_path / "a") == lines(file, tmp_path / "b")
    write_world_corpus(tmp_path / "c", count=12, config=SceneConfig(), seed=8, size=16)
    assert lines("specs.jsonl", tmp_path / "a") != lines("specs.jsonl", tmp_path / "c")
    with pytest.raises(FileExistsError):
        write_world_corpus(tmp_path / "a", count=2, config=SceneConfig(), seed=7)
    with pytest.raises(ValueError, match="edit_fraction"):
        write_world_corpus(tmp_path / "d", count=2, config=SceneConfig(), seed=7, edit_fraction=2)


@pytest.mark.parametrize("caption", ["raw", "terse"])
def test_corpus_captions(tmp_path: Path, caption: CaptionKind) -> None:
    samples = write_world_corpus(
        tmp_path, count=10, config=SceneConfig(), seed=1, size=16, caption=caption
    )
    specs = read_specs(tmp_path)
    for sample in samples:
        caps = captions(specs[sample.id].spec)
        assert sample.caption == (caps.raw if caption == "raw" else caps.terse)


def test_rare_concept_corpus_and_candidate_pool(tmp_path: Path) -> None:
    """A corpus where stars are rare, and a pool (other seeds, other weights) where they are not."""
    rare = reweighted(SceneConfig(), shapes={"star": 0.005})
    pool = reweighted(SceneConfig(), shapes={"star": 3.0})
    assert rare.shape_weights["circle"] == 1.0
    assert rare.shape_weights["star"] == 0.005
    train = write_world_corpus(tmp_path / "train", count=150, config=rare, seed=0, size=16)
    candidates = write_world_corpus(
        tmp_path / "pool", count=150, config=pool, seed=1, size=16, split="pool"
    )

    def stars(directory: Path) -> int:
        records = read_specs(directory).values()
        return sum(any(o.shape == "star" for o in r.spec.objects) for r in records)

    assert stars(tmp_path / "train") <= 2
    assert stars(tmp_path / "pool") >= 40
    assert {s.provenance.split for s in candidates} == {"pool"}
    assert not {s.provenance.origin_uri for s in train} & {
        s.provenance.origin_uri for s in candidates
    }
    with pytest.raises(ValueError, match="shape_weights"):
        reweighted(SceneConfig(), shapes={"pentagon": 1.0})


def test_scene_seeds_are_distinct_and_below_the_limit() -> None:
    seeds = scene_seeds(0, 5000)
    assert len(set(seeds)) == 5000
    assert all(0 <= s < CORPUS_SEED_LIMIT for s in seeds)
    assert scene_seeds(0, 10) == seeds[:10]
    assert not set(scene_seeds(1, 5000)) & set(seeds)


# ---- benchmark suites -----------------------------------------------------------------------


def test_suites_are_pinned() -> None:
    """Changing a suite changes the loop's scoreboard: it must be deliberate (update the pin)."""
    standard, regression = suite("standard"), suite("regression")
    assert suite_digest(standard) == STANDARD_DIGEST
    assert suite_digest(regression) == REGRESSION_DIGEST
    assert suite("standard") == standard
    assert suite_names() == ("standard", "regression")
    with pytest.raises(ValueError, match="unknown suite"):
        suite("nightly")


def test_suites_cover_every_skill() -> None:
    for name, per_skill in (("standard", STANDARD_CASES), ("regression", REGRESSION_CASES)):
        cases = suite(name)
        assert Counter(c.skill for c in cases) == dict.fromkeys(SKILLS, per_skill)
        assert len({c.id for c in cases}) == len(cases)
        assert all(c.suite == name and c.spec.id == c.id for c in cases)
    standard = suite("standard")
    assert {c.spec.objects[0].shape for c in standard if c.skill == "shape"} == set(SHAPES)
    assert {c.spec.objects[0].colour for c in standard if c.skill == "colour"} == set(COLOURS)
    assert {len(c.spec.objects) for c in standard if c.skill == "count"} == {2, 3}
    assert {c.edit_kind for c in standard if c.skill == "editing"} == set(EDIT_KINDS)
    assert {rel for c in standard if c.skill == "relation" for _, rel, _ in relations(c.spec)} == {
        "left of",
        "right of",
        "above",
        "below",
    }


def test_suite_seeds_are_disjoint_and_never_trained_on() -> None:
    standard = {c.seed for c in suite("standard")}
    regression = {c.seed for c in suite("regression")}
    assert not standard & regression
    assert min(standard | regression) >= CORPUS_SEED_LIMIT
    # The edit sources draw scenes at seed + attempt * 1_000_003: still far from the other band.
    assert max(standard) + 100 * 1_000_003 < min(regression)


def _check_focus(case: BenchmarkCase) -> None:
    """The prompt states what the case's skill tests, and the spec holds it."""
    prompt, spec = case.prompt, case.spec
    assert case.focus.lower() in prompt.lower(), (case.id, case.focus, prompt)
    if case.skill == "shape":
        (obj,) = spec.objects
        assert obj.shape == case.focus
        assert f" {obj.shape} " in prompt
    elif case.skill == "colour":
        (obj,) = spec.objects
        assert obj.colour == case.focus
        assert f" {obj.colour} " in prompt
    elif case.skill == "count":
        (kind, number), *rest = spec.counts().items()
        assert not rest
        assert number in (2, 3)
        word = {2: "two", 3: "three"}[number]
        assert re.search(rf"\b{word} \w+ {kind[0]} {kind[1]}s\b", prompt), prompt
    elif case.skill == "relation":
        ((i, rel, j),) = relations(spec)
        a, b = spec.objects[i], spec.objects[j]
        assert f"the {a.colour} {a.shape} is {rel} the {b.colour} {b.shape}" in prompt.lower()
    elif case.skill in ("text-latin", "text-logographic"):
        (text,) = spec.texts
        assert text.script == ("latin" if case.skill == "text-latin" else "han")
        assert f'"{text.text}"' in prompt
        assert len(spec.objects) <= 1
    elif case.skill == "editing":
        assert case.source is not None
        assert case.instruction == prompt
        assert case.source.model_copy(update={"id": ""}) != spec.model_copy(update={"id": ""})
    else:
        assert prompt == captions(spec).terse
        assert not spec.texts
        for obj in spec.objects:
            assert f"{obj.colour} {obj.shape}" in prompt
        assert not re.search(r"\b(two|three|small|medium|large|left|right|top|bottom)\b", prompt)
    if case.skill not in ("editing", "terse"):
        assert prompt == captions(spec).rich


def test_every_prompt_states_what_its_skill_tests() -> None:
    for name in suite_names():
        for case in suite(name):
            _check_focus(case)


def test_skill_elements() -> None:
    element_kinds = get_args(ElementKind)
    assert set(SKILL_ELEMENTS) == set(SKILLS)
    for case in suite("regression"):
        kinds = skill_elements(case)
        assert kinds
        assert set(kinds) <= set(element_kinds)
    by_skill = {c.skill: skill_elements(c) for c in suite("regression")}
    assert by_skill["count"] == ("count",)
    assert by_skill["terse"] == ("object",)
    assert set(by_skill["editing"]) == set(element_kinds)


def test_cases_round_trip_as_json() -> None:
    for case in suite("regression"):
        again = BenchmarkCase.model_validate(json.loads(case.model_dump_json()))
        assert again == case
    case = suite("regression")[0]
    with pytest.raises(ValueError, match="editing cases"):
        BenchmarkCase.model_validate({**case.model_dump(), "instruction": "make it blue"})
