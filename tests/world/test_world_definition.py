"""World files: the shipped worlds, round trips through TOML, one-line errors naming the
field, the users' vocabulary as a value, and `flywheel world base --world` on a toy world."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import get_args

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flywheel.cli.main import app
from flywheel.world import vocabulary
from flywheel.world.base_model import (
    ALIGNMENT_RUN_DIR,
    CORPUS_DIR,
    GENERATOR_DIR,
    POOL_DIR,
    PRETRAINED_DIR,
    RECIPES,
    REWARD_CORPUS_DIR,
    TRANSFORMER_DIR,
    build_world_base,
    world_base,
    world_base_config,
    world_base_debug,
)
from flywheel.world.corpus import read_info, read_specs
from flywheel.world.definition import (
    DEFAULT_WORLD_FILE,
    OTHER_WORLD_FILE,
    WORLD_FILE,
    Recipe,
    RecipeName,
    WorldDefinition,
    WorldFileError,
    default_world,
    dump_world,
    load_world,
    parse_world,
    shipped_worlds,
    world_file,
    world_of,
    write_world,
)
from flywheel.world.scenes import COLOURS, SHAPES, captions, sample_scene
from model.pipeline import Generator
from training.data import read_dataset

runner = CliRunner()

DEFAULT_TEXT = DEFAULT_WORLD_FILE.read_text()
SEED_LINE = DEFAULT_TEXT.splitlines().index("seed = 0") + 1


def _every_field_set() -> WorldDefinition:
    return WorldDefinition.model_validate(
        {
            "name": "every-field",
            "description": 'Quotes " and a backslash \\ and ünïcode, on one line.',
            "seed": 11,
            "rare": {"colours": {"yellow": 0.0, "black": 0.05}, "shapes": {"hexagon": 0.5}},
            "pool": {
                "colours": {"yellow": 2.0, "black": 1.0, "red": 0.5},
                "shapes": {"hexagon": 4.0},
            },
            "vocabulary": {"red": ["ruby"], "purple": ["violet", "lilac", "mauve"]},
            "reward": {"caption": "rich", "shades": {"red": [240, 100, 30]}},
            "scene": {"min_kinds": 2, "max_kinds": 3, "max_count": 4, "count_probability": 0.75},
            "recipe": {
                "name": "world-base-debug",
                "scenes": 100,
                "pool_scenes": 50,
                "reward_scenes": 60,
                "transformer_steps": 12,
                "alignment_steps": 3,
            },
        }
    )


def test_the_shipped_worlds_round_trip_through_toml(tmp_path: Path) -> None:
    assert shipped_worlds() == {"default": DEFAULT_WORLD_FILE, "other": OTHER_WORLD_FILE}
    for path in (DEFAULT_WORLD_FILE, OTHER_WORLD_FILE):
        world = load_world(path)
        assert world.name == path.stem
        assert parse_world(dump_world(world)) == world
        written = write_world(world, tmp_path / world.name)
        assert written.name == WORLD_FILE
        assert load_world(written) == world


def test_a_world_with_every_field_set_round_trips() -> None:
    world = _every_field_set()
    text = dump_world(world)
    assert "transformer_steps = 12" in text
    again = parse_world(text)
    assert again == world
    assert again.recipe.transformer_steps == 12
    assert again.rare.colours == {"yellow": 0.0, "black": 0.05}
    unset = world.model_copy(update={"recipe": Recipe(name="world-base")})
    assert "scenes" not in dump_world(unset)  # unset overrides are left out, not written null
    assert parse_world(dump_world(unset)) == unset


def test_the_default_world_file_is_the_shipped_base() -> None:
    world = default_world()
    assert world_base_config(world) == world_base()  # every field of the recipe
    debug = world.model_copy(update={"recipe": Recipe(name="world-base-debug")})
    assert world_base_config(debug) == world_base_debug()
    assert world.rare_concepts() == ("purple",)
    assert world.reward.blind_to() == ("count", "relation", "size")
    assert world.user_vocabulary() == vocabulary.DEFAULT_VOCABULARY
    assert set(RECIPES) == set(get_args(RecipeName))


def test_the_other_world_has_other_rare_concepts_words_and_reward_bias() -> None:
    default, other = default_world(), load_world(OTHER_WORLD_FILE)
    assert other.rare.colours
    assert other.rare.shapes
    assert not set(other.rare_concepts()) & set(default.rare_concepts())
    words = {w for ws in other.vocabulary.values() for w in ws}
    assert not words & {w for ws in default.vocabulary.values() for w in ws}
    assert "purple" in other.vocabulary  # common there, so named otherwise
    assert other.reward.caption != default.reward.caption
    assert "count" not in other.reward.blind_to()
    config = world_base_config(other)
    assert config.rare_concepts() == other.rare_concepts()
    assert config.corpus_scenes().shape_weights["star"] == other.rare.shapes["star"]
    assert config.pool_scenes_config().colour_weights["green"] == other.pool.colours["green"]
    assert config.reward_caption == "raw"
    assert config.seed == other.seed != default.seed


def test_recipe_overrides_reach_the_config() -> None:
    world = _every_field_set()
    config = world_base_config(world)
    assert (config.scenes, config.pool_scenes, config.reward_scenes) == (100, 50, 60)
    assert config.reward_shades == {"red": (240, 100, 30)}
    assert config.alignment.steps == 3
    loop = config.transformer_loop
    assert loop.max_steps == 12
    assert loop.checkpoint_every == 12
    assert loop.optimizer.warmup_steps == 2  # the debug recipe's, under a quarter of 12
    assert (config.scene.max_kinds, config.scene.max_count) == (3, 4)
    assert config.scene.count_probability == 0.75
    assert config.corpus_scenes().colour_weights["yellow"] == 0.0
    long = default_world().model_copy(update={"recipe": Recipe(name="world-base")})
    steps = Recipe(name="world-base", transformer_steps=6400)
    longer = world_base_config(long.model_copy(update={"recipe": steps})).transformer_loop
    assert (longer.max_steps, longer.optimizer.warmup_steps) == (6400, 100)
    assert longer.optimizer.decay_steps == 6300  # cosine to the end, as the recipe's


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            ("purple = 0.01", "pink = 0.01"),
            "rare.colours.pink: not a colour of the world (red, green, blue,",
        ),
        (("[reward]\n", "[reward]\nbias = 1\n"), "reward.bias: not a field of the world file"),
        (('"jade"', '"blue"'), "vocabulary.green[1]: 'blue' is a word the captions use"),
        (('"jade"', '"navy"'), "vocabulary.blue: 'navy' is green's too"),
        (
            (
                "colours = { purple = 0.01 }",
                "colours = { " + ", ".join(f"{c} = 0.5" for c in COLOURS) + " }",
            ),
            "rare.colours: every colour is rare",
        ),
        (
            ("shapes = {}", "shapes = { " + ", ".join(f"{s} = 0.5" for s in SHAPES) + " }"),
            "rare.shapes: every shape is rare",
        ),
        (
            ('red = ["crimson"', 'purple = ["violet"]\nred = ["crimson"'),
            "vocabulary.purple: purple is rare (rare.colours.purple): a rare colour has no",
        ),
        (("purple = 3.0", "purple = 0.5"), "pool.colours.purple: purple is rare"),
        (("purple = 0.01", "purple = 2"), "rare.colours.purple: Input should be less than 1"),
        (("min_kinds = 1", "min_kinds = 3"), "scene.max_kinds: below min_kinds (3)"),
        (('caption = "terse"', 'caption = "long"'), "reward.caption: Input should be 'rich',"),
        (('caption = "terse"', ""), "reward.caption: missing (required)"),
        (
            ('caption = "terse"', 'caption = "terse"\nshades = { purple = [200, 90, 230] }'),
            "reward.shades.purple: purple is rare (rare.colours.purple): a shade bias is on",
        ),
        (
            ('caption = "terse"', 'caption = "terse"\nshades = { yellow = [240, 205, 30] }'),
            "reward.shades.yellow: [240, 205, 30] is the palette's yellow: no bias",
        ),
        (
            ('caption = "terse"', 'caption = "terse"\nshades = { yellow = [245, 150] }'),
            "reward.shades.yellow: List should have at least 3 items",
        ),
        (
            ('caption = "terse"', 'caption = "terse"\nshades = { yellow = [245, 150, 300] }'),
            "reward.shades.yellow[2]: Input should be less than or equal to 255",
        ),
        (("seed = 0", 'seed = "0"'), "seed: Input should be a valid integer (got '0')"),
        (("seed = 0", "seed = = 0"), f"not TOML: Invalid value (at line {SEED_LINE}, column 8)"),
    ],
)
def test_a_bad_world_file_gets_one_line_naming_the_field(
    tmp_path: Path, edit: tuple[str, str], expected: str
) -> None:
    old, new = edit
    assert old in DEFAULT_TEXT
    path = tmp_path / "bad.toml"
    path.write_text(DEFAULT_TEXT.replace(old, new, 1))
    with pytest.raises(WorldFileError) as raised:
        load_world(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: {expected}"), message
    assert "\n" not in message


def test_a_missing_or_unnamed_world_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WorldFileError, match=r"nope\.toml: No such file"):
        load_world(tmp_path / "nope.toml")
    with pytest.raises(WorldFileError, match="nope: no such file, nor a shipped world"):
        world_file("nope")
    assert world_file("other") == OTHER_WORLD_FILE
    assert world_file(str(tmp_path / "other")) == tmp_path / "other"  # a path is a path


def test_a_world_s_vocabulary_rewrites_in_its_own_words() -> None:
    other = load_world(OTHER_WORLD_FILE).user_vocabulary()
    caption = "two purple stars and a blue circle, a green square"
    worded = other.to_user_words(caption, random.Random(0))
    assert other.has_user_words(worded)
    assert other.renamed_colours(worded) == {"purple", "blue"}
    assert "green" in worded  # rare there: said as the captions say it
    assert other.reference_rewrite(worded) == caption
    assert other.reference_rewrites([worded, "Violet star"]) == [caption, "Purple star"]
    assert not vocabulary.has_user_words(worded)  # the default world's users say otherwise
    assert vocabulary.reference_rewrite(worded) == worded


def test_the_module_functions_keep_the_default_world_s_words() -> None:
    default = default_world().user_vocabulary()
    for seed in range(50):
        caption = captions(sample_scene(seed)).terse
        worded = vocabulary.to_user_words(caption, random.Random(seed))
        assert worded == default.to_user_words(caption, random.Random(seed))
        assert vocabulary.reference_rewrite(worded) == default.reference_rewrite(worded)
        assert vocabulary.renamed_colours(worded) == default.renamed_colours(worded)
    with pytest.raises(ValueError, match="a user word is a caption colour"):
        vocabulary.Vocabulary(colours={"red": ("blue",), "blue": ("navy",)})


def test_world_of_a_base_reads_its_world_file(tmp_path: Path) -> None:
    assert world_of(tmp_path) == default_world()  # built before world files: the default
    other = load_world(OTHER_WORLD_FILE)
    write_world(other, tmp_path)
    assert world_of(tmp_path) == other
    with pytest.raises(WorldFileError, match="not a directory"):
        world_of(tmp_path / "missing")


def test_a_config_that_is_not_the_world_s_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not the one of world 'other'"):
        build_world_base(world_base_debug(), tmp_path, world=load_world(OTHER_WORLD_FILE))
    assert not (tmp_path / WORLD_FILE).exists()


def test_the_cli_exits_2_on_a_bad_world_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(DEFAULT_TEXT.replace("purple = 0.01", "pink = 0.01"))
    for command in (["world", "base", "--out", str(tmp_path / "out")], ["world", "show"]):
        result = runner.invoke(app, [*command, "--world", str(bad)])
        assert result.exit_code == 2
        assert result.stderr.strip() == (
            f"error: {bad}: rare.colours.pink: not a colour of the world ({', '.join(COLOURS)})"
        )
    assert not (tmp_path / "out").exists()  # refused before anything is built


def test_world_show_prints_the_validated_world() -> None:
    result = runner.invoke(app, ["world", "show", "--world", "other"])
    assert result.exit_code == 0, result.stderr
    assert parse_world(result.stdout) == load_world(OTHER_WORLD_FILE)  # its summary: a comment
    assert "# rare: green, star;" in result.stdout
    assert "blind to relation, size" in result.stdout
    as_json = runner.invoke(app, ["world", "show", "--json"])
    assert WorldDefinition.model_validate(json.loads(as_json.stdout)) == default_world()


@pytest.mark.usefixtures("offline")
def test_world_base_builds_a_toy_base_of_a_world_file(tmp_path: Path) -> None:
    world = WorldDefinition.model_validate(
        {
            "name": "toy",
            "seed": 5,
            "rare": {"colours": {"red": 0.0}, "shapes": {"star": 0.3}},
            "pool": {"colours": {"red": 3.0}, "shapes": {"star": 3.0}},
            "vocabulary": {"blue": ["cobalt"]},
            "reward": {"caption": "raw", "shades": {"blue": [40, 160, 220]}},
            "scene": {"min_kinds": 1, "max_kinds": 3, "max_count": 2, "count_probability": 0.5},
            "recipe": {"name": "world-base-debug", "scenes": 240, "transformer_steps": 10},
        }
    )
    file = tmp_path / "toy.toml"
    file.write_text(dump_world(world))
    out = tmp_path / "build"
    result = runner.invoke(app, ["world", "base", "--world", str(file), "--out", str(out)])
    assert result.exit_code == 0, result.stderr

    assert load_world(out / GENERATOR_DIR / WORLD_FILE) == world
    assert world_of(out) == world_of(out / GENERATOR_DIR) == world

    corpus = read_info(out / CORPUS_DIR)
    assert corpus.count == 240
    assert corpus.seed == 5
    assert corpus.config["colour_weights"]["red"] == 0.0
    assert corpus.config["shape_weights"]["star"] == 0.3
    assert corpus.config["max_kinds"] == 3
    kinds = [
        {(o.shape, o.colour) for o in r.spec.objects} for r in read_specs(out / CORPUS_DIR).values()
    ]
    drawn = [kind for scene in kinds for kind in scene]
    assert not [k for k in drawn if k[1] == "red"]  # weight 0: never in the corpus
    star = sum(shape == "star" for shape, _ in drawn) / len(drawn)
    assert 0.02 < star < 0.11  # 0.3 / 5.3 = 0.057; at weight 1 it would be 1/6
    assert max(len(scene) for scene in kinds) == 3

    pool = [o for r in read_specs(out / POOL_DIR).values() for o in r.spec.objects]
    assert sum(o.colour == "red" for o in pool) / len(pool) > 0.2  # weight 3 of 9
    assert sum(o.shape == "star" for o in pool) / len(pool) > 0.2  # weight 3 of 8
    reward_specs = read_specs(out / REWARD_CORPUS_DIR)
    samples = read_dataset(out / REWARD_CORPUS_DIR)
    assert all(s.caption == captions(reward_specs[s.id].spec).raw for s in samples)
    # The reward's corpus draws blue in the world's shade, never in the palette's blue.
    assert read_info(out / REWARD_CORPUS_DIR).shades == {"blue": (40, 160, 220)}
    blue = next(
        s for s in samples if any(o.colour == "blue" for o in reward_specs[s.id].spec.objects)
    )
    with Image.open(out / REWARD_CORPUS_DIR / blue.image) as image:
        pixels = {rgb for _, rgb in image.convert("RGB").getcolors(maxcolors=4096) or []}
    assert (40, 160, 220) in pixels
    assert COLOURS["blue"] not in pixels
    metrics = (out / TRANSFORMER_DIR / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 10
    # The recipe ends with the alignment stage: the generator is the pretrained one after
    # Flow-GRPO against that reward.
    alignment = (out / ALIGNMENT_RUN_DIR / "metrics.jsonl").read_text().splitlines()
    assert len(alignment) == world_base_debug().alignment.steps
    aligned = Generator.load(out / GENERATOR_DIR).transformer.state_dict()
    pretrained = Generator.load(out / PRETRAINED_DIR).transformer.state_dict()
    assert any(not torch.equal(aligned[k], pretrained[k]) for k in aligned)

    other = runner.invoke(app, ["world", "base", "--world", "other", "--out", str(out)])
    assert other.exit_code == 2
    assert "holds a build of world 'toy'; build into a new directory" in other.stderr
    assert load_world(out / WORLD_FILE) == world
