"""``flywheel demo --world FILE [--base DIR]``: the demo on any world — its command line, and
the world-specific pieces of the loop following the world of the model they run on."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel.cli.main import app
from flywheel.cli.world import demo_base
from flywheel.cycle.registry import ModelBundle
from flywheel.demo import BUILD_PARTS, user_prompts
from flywheel.world.adapters import (
    WorldCorpus,
    WorldCorpusSettings,
    WorldDegrader,
    WorldSynthesizer,
    WorldSynthesizerSettings,
)
from flywheel.world.base_model import world_base_config
from flywheel.world.definition import (
    DEFAULT_WORLD_FILE,
    OTHER_WORLD_FILE,
    WORLD_FILE,
    WorldDefinition,
    default_world,
    dump_world,
    load_world,
    write_world,
)
from flywheel.world.loop.prompt_enhancer import (
    PromptEnhancerTrackConfig,
    enhancer_pairs,
    failing_concepts,
    grpo_prompts,
    kept_words,
    pair_concepts,
)
from flywheel.world.loop.slices import SliceCase
from flywheel.world.loop.steps import _keep_world, model_world
from flywheel.world.scenes import COLOURS
from flywheel.world.vocabulary import USER_COLOURS
from tests.test_demo import demo_env, flywheel_cli, run_tiny_demo

runner = CliRunner()

OTHER = load_world(OTHER_WORLD_FILE)
DEFAULT_WORDS = {w for words in USER_COLOURS.values() for w in words}
OTHER_WORDS = {w for words in OTHER.vocabulary.values() for w in words}


def _words(prompts: list[str]) -> set[str]:
    return {w.strip(",").casefold() for p in prompts for w in p.split()}


def _build_layout(
    directory: Path, world: WorldDefinition | None, parts: tuple[str, ...] = BUILD_PARTS
) -> Path:
    """A directory laid out as a build of ``flywheel world base`` (its parts' directories and
    the world files it records), for the command line's checks, which read no weights."""
    for part in parts:
        (directory / part).mkdir(parents=True, exist_ok=True)
    if world is not None:
        write_world(world, directory)
        if "generator" in parts:
            write_world(world, directory / "generator")
    return directory


# ---- the command line ------------------------------------------------------------------------


def test_a_bad_world_file_exits_2_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(DEFAULT_WORLD_FILE.read_text().replace("purple = 0.01", "pink = 0.01"))
    result = runner.invoke(app, ["demo", "--world", str(bad)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {bad}: rare.colours.pink: not a colour of the world ({', '.join(COLOURS)})"
    )


def test_another_world_without_a_base_exits_2_saying_how_to_build_one(tmp_path: Path) -> None:
    third = tmp_path / "third.toml"
    third.write_text(dump_world(OTHER.model_copy(update={"name": "third"})))
    result = runner.invoke(app, ["demo", "--world", str(third)])
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "world 'third' has no shipped base" in message
    assert f"`flywheel world base --world {third} --out DIR`" in message


def test_a_base_of_another_world_exits_2(tmp_path: Path) -> None:
    base = _build_layout(tmp_path / "build", OTHER)
    result = runner.invoke(app, ["demo", "--world", "default", "--base", str(base)])
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert f"--base {base} is a build of world 'other', not of --world default" in message
    # A build without a world file is the default world's (the shipped base predates them).
    plain = _build_layout(tmp_path / "plain", None)
    refused = runner.invoke(app, ["demo", "--world", "other", "--base", str(plain)])
    assert refused.exit_code == 2
    assert "is a build of world 'default', not of --world other" in refused.stderr


def test_a_base_without_its_generator_exits_2_naming_what_is_missing(tmp_path: Path) -> None:
    base = _build_layout(tmp_path / "build", OTHER, parts=("reward",))
    result = runner.invoke(app, ["demo", "--world", "other", "--base", str(base)])
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert message.startswith(f"error: --base {base}: no generator/, enhancer/ ")
    missing = runner.invoke(app, ["demo", "--base", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2
    assert "not a directory" in missing.stderr


def test_a_build_whose_generator_is_of_another_world_exits_2(tmp_path: Path) -> None:
    base = _build_layout(tmp_path / "build", OTHER)
    (base / "generator" / WORLD_FILE).unlink()  # the generator: the default world's
    result = runner.invoke(app, ["demo", "--base", str(base)])
    assert result.exit_code == 2
    assert "generator/world.toml is of world 'default'" in result.stderr


def test_the_demo_s_base_is_the_shipped_one_or_a_build_of_the_world_asked(
    tmp_path: Path,
) -> None:
    assert demo_base(None, None) is None  # today's demo: the shipped base
    assert demo_base("default", None) is None
    assert demo_base(str(DEFAULT_WORLD_FILE), None) is None
    base = _build_layout(tmp_path / "build", OTHER)
    assert demo_base("other", base) == base
    assert demo_base(str(OTHER_WORLD_FILE), base) == base
    assert demo_base(None, base) == base  # without --world: the base's own world
    # The recipe a base was built with is not its world: a toy build of `other` is of `other`.
    toy = OTHER.model_copy(
        update={"recipe": OTHER.recipe.model_copy(update={"name": "world-base-debug"})}
    )
    debug = _build_layout(tmp_path / "debug", toy)
    assert demo_base("other", debug) == debug


# ---- the world-specific pieces follow the world ------------------------------------------------


def _cases(prompts: list[str]) -> list[SliceCase]:
    return [SliceCase(case_id=i, prompt=p, reference=p) for i, p in enumerate(prompts)]


def test_the_enhancer_s_pairs_for_the_other_world_are_in_its_users_words() -> None:
    config = PromptEnhancerTrackConfig(pairs_per_concept=30)
    routed = _cases(["ruby circle", "cobalt square", "navy star", "violet triangle"])
    assert failing_concepts(routed, world=OTHER) == ["blue", "purple", "red"]
    assert failing_concepts(routed) == ["blue"]  # the default world's users say navy

    pairs = enhancer_pairs(["red", "purple"], config, world=OTHER)
    user = [i for i, o in pairs if i != o]
    assert len(user) == 60
    said = _words(user)
    assert said & OTHER_WORDS >= {"ruby", "cherry", "violet", "lilac"}
    assert not said & DEFAULT_WORDS  # never the default world's words
    assert pair_concepts(pairs, world=OTHER) == ["purple", "red"]
    assert pair_concepts(pairs) == []
    with pytest.raises(ValueError, match="concepts"):
        enhancer_pairs(["green"], config, world=OTHER)  # rare there: no users' words

    stage = grpo_prompts(["blue"], config, gate_prompts=[], world=OTHER)
    assert stage
    assert _words([p for p, _ in stage]) & {"cobalt", "sapphire"}
    assert not _words([p for p, _ in stage]) & DEFAULT_WORDS
    other_words = OTHER.user_vocabulary()
    assert kept_words("blue circle", "cobalt circle", vocabulary=other_words) == 1.0
    assert kept_words("blue circle", "cobalt circle") == 0.5  # "cobalt" is a word to keep there


def test_the_default_world_s_pairs_are_unchanged() -> None:
    config = PromptEnhancerTrackConfig(pairs_per_concept=20)
    default = default_world()
    assert enhancer_pairs(["blue", "red"], config) == enhancer_pairs(
        ["blue", "red"], config, world=default
    )
    assert grpo_prompts(["blue"], config, gate_prompts=[]) == grpo_prompts(
        ["blue"], config, gate_prompts=[], world=default
    )


def test_the_simulated_users_treat_the_other_world_s_green_as_purple_is_treated() -> None:
    other = user_prompts(random.Random(0), events=60, run="r", world=OTHER)
    default = user_prompts(random.Random(0), events=60, run="r", world=default_world())
    # The rare colour is never asked about (it has no users' words): green there, purple here.
    assert all(case.focus != "green" for case, _ in other)
    assert all(case.focus != "purple" for case, _ in default)
    assert any(case.focus == "purple" for case, _ in other)  # common there, with words
    assert any(case.focus == "green" for case, _ in default)
    other_said, default_said = _words([p for _, p in other]), _words([p for _, p in default])
    assert {"violet", "lilac"} & other_said
    assert not other_said & DEFAULT_WORDS
    assert not default_said & OTHER_WORDS
    assert default_said & DEFAULT_WORDS


def test_the_world_adapters_follow_their_world_setting() -> None:
    captions = ["a small red circle at the top left. a large blue square below it"]
    said = WorldDegrader(world=OTHER).degrade(captions, seed=0)[0]
    assert said.split(", ")[0].split()[0] in OTHER.vocabulary["red"]
    assert WorldDegrader().degrade(captions, seed=0)[0].split()[0] in USER_COLOURS["red"]

    corpus = WorldCorpus(WorldCorpusSettings(train=200, pool=200), world=OTHER)
    assert corpus._base.seed == OTHER.seed
    pool = [t for item in corpus.items("pool") for t in item.tags]
    train = [t for item in corpus.items("train") for t in item.tags]
    assert pool.count("colour:green") > 3 * max(1, train.count("colour:green"))
    default = WorldCorpus(WorldCorpusSettings(train=200, pool=200))
    assert [i.tags for i in default.items("train")] != [i.tags for i in corpus.items("train")]
    synthesizer = WorldSynthesizer(WorldSynthesizerSettings(), world=OTHER)
    assert synthesizer._base.image_size == world_base_config(OTHER).image_size


def test_the_loop_reads_the_world_of_the_model_it_runs_on(tmp_path: Path) -> None:
    generator = tmp_path / "generator"
    generator.mkdir()
    model = ModelBundle(
        version_id=1, name="m", generator=generator, enhancer=tmp_path, reward=tmp_path
    )
    assert model_world(model) == default_world()  # no world file: the shipped base's world
    write_world(OTHER, generator)
    assert model_world(model) == OTHER
    # A generator round's candidate keeps its base's world file.
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    _keep_world(generator, candidate)
    assert load_world(candidate / WORLD_FILE) == OTHER
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    _keep_world(shipped, tmp_path / "other-candidate")  # nothing to keep: nothing written
    assert not (tmp_path / "other-candidate").exists()


# ---- the tiny demo on the other world's shipped base ---------------------------------------


@pytest.mark.timeout(600)
def test_the_tiny_demo_runs_on_the_other_worlds_shipped_base(tmp_path: Path) -> None:
    env = demo_env(tmp_path)
    report_file = tmp_path / "report.json"
    result = run_tiny_demo(tmp_path, report_file, "--world", "other", env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(report_file.read_text())
    name = report["base_concepts"]["model"]
    assert name.startswith("world-base-other-")
    assert f"serving model: {name}" in " ".join(result.stdout.split())
    assert report["base_concepts"]["world"] == "other"
    assert report["base_concepts"]["rare_left_out"] == ["green", "star"]
    assert report["feedback"]["statuses"] == {"created": report["feedback"]["events"]}
    assert report["cycle"]["status"] in ("promoted", "rejected")
    # Attribution fitted on this world, measured on the default world's shipped base.
    assert report["attribution"]["other_world"]["world"] == "default"
    assert 0.0 <= report["attribution"]["other_world"]["macro_f1"] <= 1.0
    # The cycle ran on the build: a generator round's candidate is of the build's world.
    cycle = tmp_path / "home" / "cycles" / str(report["cycle"]["id"])
    candidates = list(cycle.glob("*/generator"))
    assert candidates, report["tracks"]
    for candidate in candidates:
        assert load_world(candidate / WORLD_FILE).name == "other"

    status = flywheel_cli("status", "--json", env=env, timeout=120)
    assert status.returncode == 0, status.stderr[-2000:]
    serving = json.loads(status.stdout)["model"]["version"]
    promoted = report["cycle"]["status"] == "promoted"
    assert serving == (f"cycle-{report['cycle']['id']}" if promoted else name)
