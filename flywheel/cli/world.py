"""``flywheel world``: the verifiable world's scenes, corpora, benchmark suites, base model
and ground-truth evaluator.

Every import of :mod:`flywheel.world` stays inside a command: the CLI imports in processes
where importing the world raises (a team's own stack)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from flywheel.cli.output import console, fail

if TYPE_CHECKING:
    from flywheel.world.definition import WorldDefinition

world_app = typer.Typer(
    help="The verifiable world: scenes, corpora, benchmark suites, the evaluator.",
    no_args_is_help=True,
)


@world_app.command("render")
def world_render(
    seed: Annotated[int, typer.Option("--seed", help="The scene's seed.")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")],
    size: Annotated[int, typer.Option("--size", min=8, max=4096, help="Side in pixels.")] = 128,
) -> None:
    """Render the scene of --seed and print its spec and captions."""
    from flywheel.world.scenes import captions, render, sample_scene

    if out.suffix.lower() != ".png":
        fail(f"--out {out}: give a .png file")
    scene = sample_scene(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    render(scene, size, size).save(out)
    texts = captions(scene)
    console.print_json(scene.model_dump_json())
    console.print(f"rich:  {texts.rich}\nraw:   {texts.raw}\nterse: {texts.terse}", highlight=False)


@world_app.command("corpus")
def world_corpus(
    out: Annotated[Path, typer.Option("--out", help="New dataset directory.")],
    count: Annotated[int, typer.Option("--count", min=1, help="Samples to write.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the scene seeds.")] = 0,
    size: Annotated[int, typer.Option("--size", min=8, max=4096, help="Side in pixels.")] = 64,
    caption: Annotated[
        str, typer.Option("--caption", help="Each sample's caption: rich, raw or terse.")
    ] = "rich",
    edit_fraction: Annotated[
        float, typer.Option("--edit-fraction", min=0.0, max=1.0, help="Share of edits.")
    ] = 0.0,
) -> None:
    """Write a world corpus in the training dataset format (with every sample's spec)."""
    from flywheel.world.corpus import CAPTION_KINDS, write_world_corpus

    if caption not in CAPTION_KINDS:
        fail(f"--caption {caption!r}: one of {', '.join(CAPTION_KINDS)}")
    try:
        samples = write_world_corpus(
            out,
            count=count,
            seed=seed,
            size=size,
            caption=caption,
            edit_fraction=edit_fraction,
        )
    except (FileExistsError, ValueError) as exc:
        fail(str(exc).splitlines()[0])
    edits = sum(1 for s in samples if s.is_editing)
    console.print(f"wrote {len(samples)} samples ({edits} edits) to {out}", highlight=False)


@world_app.command("suite")
def world_suite(
    name: Annotated[str, typer.Argument(help="standard or regression.")] = "standard",
    as_json: Annotated[bool, typer.Option("--json", help="Print the cases as JSON.")] = False,
) -> None:
    """List a benchmark suite's cases (skill, id, prompt)."""
    from flywheel.world.benchmark import suite, suite_digest, suite_names

    if name not in suite_names():
        fail(f"unknown suite {name!r}; known: {', '.join(suite_names())}")
    cases = suite(name)
    if as_json:
        console.print_json(data=[case.model_dump(mode="json") for case in cases])
        return
    for case in cases:
        console.print(
            f"{case.skill:<16} {case.id:<28} {case.prompt}", highlight=False, soft_wrap=True
        )
    console.print(f"{len(cases)} cases, digest {suite_digest(cases)}", highlight=False)


@world_app.command("base")
def world_base(
    out: Annotated[Path, typer.Option("--out", help="Build directory (resumed if it exists).")],
    world: Annotated[
        str,
        typer.Option("--world", help="World file, or a shipped world's name (default, other)."),
    ] = "default",
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe",
            help="world-base (shipped) or world-base-debug (toy): replaces the world file's "
            "[recipe], its overrides too.",
        ),
    ] = None,
    ship: Annotated[
        bool,
        typer.Option(
            "--ship",
            help="Copy the generator, reward model and enhancer to where the world's base "
            "ships (another world's: flywheel/world/weights/<name>/).",
        ),
    ] = False,
) -> None:
    """Train a world's base generator, reward model and prompt enhancer from scratch."""
    from flywheel.world.base_model import RECIPES, build_world_base, ship_world, world_base_config
    from flywheel.world.definition import Recipe

    if recipe is not None and recipe not in RECIPES:
        fail(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    definition = _load_world(world)
    if recipe is not None:
        definition = definition.model_copy(
            update={"recipe": Recipe.model_validate({"name": recipe})}
        )
    try:
        config = world_base_config(definition)
        generator = build_world_base(config, out, world=definition, progress=True)
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    console.print(f"world {definition.name}: generator {generator}", highlight=False)
    if ship:
        shipped = ship_world(out, definition)
        console.print(f"shipped: {', '.join(str(p) for p in shipped)}", highlight=False)


@world_app.command("show")
def world_show(
    world: Annotated[
        str,
        typer.Option("--world", help="World file, or a shipped world's name (default, other)."),
    ] = "default",
    as_json: Annotated[bool, typer.Option("--json", help="Print the world as JSON.")] = False,
) -> None:
    """Validate a world file and print the world (TOML), with what it makes of the base."""
    definition = _load_world(world)
    if as_json:
        console.print_json(definition.model_dump_json())
        return
    from flywheel.world.definition import dump_world

    console.print(dump_world(definition), markup=False, highlight=False, soft_wrap=True)
    blind = ", ".join(definition.reward.blind_to()) or "nothing"
    words = sum(len(w) for w in definition.vocabulary.values())
    console.print(
        f"# rare: {', '.join(definition.rare_concepts()) or 'nothing'}; {words} users' words "
        f"for {len(definition.vocabulary)} colours; the reward learns from "
        f"{definition.reward.caption} captions, blind to {blind}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def _load_world(value: str) -> WorldDefinition:
    """The world ``--world`` names; exit 2 with the file and the field when it cannot be read."""
    from flywheel.world.definition import WorldFileError, load_world, world_file

    try:
        return load_world(world_file(value))
    except WorldFileError as exc:
        fail(str(exc))


def demo_base(world: str | None, base: Path | None) -> Path | None:
    """The build directory ``flywheel demo --world W --base DIR`` serves (None: the shipped
    base; another world's shipped base when ``W`` is one without ``--base``); exit 2 with a
    one-line reason when ``W`` cannot be read, when another world than the default has no
    ``--base`` and no shipped base, when ``DIR`` lacks a part of a build, or when ``DIR`` is a
    build of another world than ``W``. Without ``--world``, a ``--base`` runs on its own
    world."""
    from flywheel.demo import BUILD_PARTS
    from flywheel.world.base_model import SHIPPED_WORLDS_DIR, shipped_base_of
    from flywheel.world.definition import WORLD_FILE, WorldFileError, default_world, world_of

    definition = _load_world(world) if world is not None else None
    if base is None:
        if definition is None or _same_world(definition, default_world()):
            return None
        shipped = SHIPPED_WORLDS_DIR / definition.name
        if shipped_base_of(definition.name) is None or not _same_world(
            world_of(shipped), definition
        ):
            fail(
                f"world {definition.name!r} has no shipped base: build one with `flywheel "
                f"world base --world {world} --out DIR` and pass --base DIR"
            )
        base = shipped
    if not base.is_dir():
        fail(f"--base {base}: not a directory (a build of `flywheel world base --out DIR`)")
    missing = [f"{part}/" for part in BUILD_PARTS if not (base / part).is_dir()]
    if missing:
        fail(
            f"--base {base}: no {', '.join(missing)} (a build of `flywheel world base` holds "
            f"{', '.join(f'{part}/' for part in BUILD_PARTS)})"
        )
    try:
        recorded, generator = world_of(base), world_of(base / "generator")
    except WorldFileError as exc:
        fail(str(exc))
    if not _same_world(recorded, generator):
        fail(
            f"--base {base}: its generator/{WORLD_FILE} is of world {generator.name!r}, its "
            f"{WORLD_FILE} of {recorded.name!r}"
        )
    if definition is not None and not _same_world(recorded, definition):
        fail(
            f"--base {base} is a build of world {recorded.name!r}, not of --world {world} "
            f"({definition.name!r}): build one with `flywheel world base --world {world} --out "
            "DIR`"
        )
    return base


def _same_world(one: WorldDefinition, other: WorldDefinition) -> bool:
    """Whether two worlds are the same, the recipe they are built with aside."""
    return one.model_copy(update={"recipe": other.recipe}) == other


@world_app.command("weaknesses")
def world_weaknesses(
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Generator directory (default: the shipped world base)."),
    ] = None,
    rare: Annotated[
        str | None,
        typer.Option(
            "--rare",
            help="The colours / shapes the corpus made rare, comma-separated (default: those "
            "of the model's world).",
        ),
    ] = None,
    per_concept: Annotated[
        int, typer.Option("--per-concept", min=1, help="Probes per colour and per shape.")
    ] = 8,
    per_skill: Annotated[
        int, typer.Option("--per-skill", min=1, help="Probes per other skill.")
    ] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Noise seed.")] = 0,
    reward: Annotated[
        Path | None,
        typer.Option("--reward", help="Reward model directory (default: the shipped one)."),
    ] = None,
    enhancer: Annotated[
        Path | None,
        typer.Option("--enhancer", help="Prompt enhancer directory (default: the shipped one)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Measure a generator's, a reward model's and a prompt enhancer's known weaknesses."""
    from flywheel.world.base_model import (
        BASE_ENHANCER,
        BASE_REWARD,
        load_world_enhancer,
        load_world_reward,
    )
    from flywheel.world.definition import world_of
    from flywheel.world.evaluation import BASE_MODEL
    from flywheel.world.scenes import COLOURS, SHAPES
    from flywheel.world.weaknesses import measure_weaknesses, reward_agreement
    from model.pipeline import Generator

    generator_dir = model or BASE_MODEL
    if rare is None:
        try:
            rare = ",".join(world_of(generator_dir).rare_concepts())
        except ValueError as exc:  # WorldFileError is one
            fail(str(exc).splitlines()[0])
    concepts = tuple(s.strip() for s in rare.split(",") if s.strip())
    if not concepts or set(concepts) - set(SHAPES) - set(COLOURS):
        fail(
            f"--rare {rare!r}: comma-separated colours ({', '.join(COLOURS)}) "
            f"or shapes ({', '.join(SHAPES)})"
        )
    if set(COLOURS) <= set(concepts) or set(SHAPES) <= set(concepts):
        fail(f"--rare {rare!r}: leave some colours and shapes common (the control)")
    try:
        generator = Generator.load(generator_dir)
        scorer = load_world_reward(reward or BASE_REWARD)
        rewriter = load_world_enhancer(enhancer or BASE_ENHANCER)
    except ValueError as exc:  # GeneratorError is one
        fail(str(exc).splitlines()[0])
    report = measure_weaknesses(
        generator,
        enhancer=rewriter,
        rare=concepts,
        per_concept=per_concept,
        per_skill=per_skill,
        seed=seed,
    )
    agreement = reward_agreement(
        scorer.score, per_skill=per_skill * 2, shades=world_of(generator_dir).reward.shade_map()
    )
    if as_json:
        both = {"generator": report.model_dump(), "reward": agreement.model_dump()}
        console.print_json(data=both)
        return
    table = Table("probe", "control", "score", "weakness", "score")
    table.add_row(
        "rare concepts",
        "common ones",
        f"{report.common_score:.2f}",
        f"rare: {', '.join(report.rare)}",
        f"{report.rare_score:.2f}",
    )
    table.add_row(
        "objects",
        "rich prompts",
        f"{report.rich_prompt_score:.2f}",
        "terse prompts",
        f"{report.terse_prompt_score:.2f}",
    )
    table.add_row(
        "their colours",
        "rich prompts",
        f"{report.rich_prompt_colour:.2f}",
        "terse prompts",
        f"{report.terse_prompt_colour:.2f}",
    )
    table.add_row(
        "enhancer",
        "",
        "",
        "terse prompts kept",
        f"{report.enhancer_unchanged:.2f}",
    )
    for name, value in (("count", report.count_score), ("relation", report.relation_score)):
        table.add_row(name, name, f"{value:.2f}", "", "")
    console.print(table)
    for title, scores in (("colour", report.colours), ("shape", report.shapes)):
        line = ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
        console.print(f"per {title}: {line}", highlight=False)
    console.print(f"({report.cases} images)", highlight=False)
    prefers = ", ".join(f"{k} {v:.2f}" for k, v in agreement.skills.items())
    console.print(
        f"reward prefers the right render of {agreement.pairs} pairs: {prefers} (chance 0.50)",
        highlight=False,
    )
    for colour, share in agreement.shades.items():
        console.print(
            f"reward prefers {colour} over its corpus' shade of it: {share:.2f} (its bias)",
            highlight=False,
        )


@world_app.command("check")
def world_check(
    image: Annotated[Path, typer.Option("--image", help="The image to score (PNG, JPEG, ...).")],
    seed: Annotated[
        int | None, typer.Option("--seed", help="Score against the scene of this seed.")
    ] = None,
    spec: Annotated[
        Path | None, typer.Option("--spec", help="Score against this scene spec (JSON file).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the evaluation as JSON.")] = False,
) -> None:
    """Score an image against a scene spec with the ground-truth evaluator."""
    from PIL import Image, UnidentifiedImageError
    from pydantic import ValidationError

    from flywheel.world.evaluator import evaluate
    from flywheel.world.scenes import SceneSpec, sample_scene

    if (seed is None) == (spec is None):
        fail("give exactly one of --seed and --spec")
    if spec is not None:
        try:
            scene = SceneSpec.model_validate_json(spec.read_bytes())
        except OSError as exc:
            fail(f"--spec {spec}: {exc.strerror or exc}")
        except ValidationError as exc:
            fail(f"--spec {spec}: not a scene spec ({exc.errors()[0]['msg']})")
    else:
        assert seed is not None
        scene = sample_scene(seed)
    try:
        with Image.open(image) as opened:
            picture = opened.convert("RGB")
    except OSError as exc:
        reason = "not an image" if isinstance(exc, UnidentifiedImageError) else exc.strerror
        fail(f"--image {image}: {reason or exc}")
    result = evaluate(scene, picture)
    if as_json:
        console.print_json(result.model_dump_json())
        return
    table = Table("kind", "element", "asked", "found", "score", "passed")
    for element in result.elements:
        table.add_row(
            element.kind,
            element.subject,
            element.asked,
            "-" if element.found is None else element.found,
            f"{element.score:.2f}",
            "yes" if element.passed else "[red]no[/]",
        )
    console.print(table)
    skills = ", ".join(f"{k} {v.passed}/{v.elements}" for k, v in result.skills.items())
    console.print(f"score {result.score:.3f}; {skills}", highlight=False)


@world_app.command("evaluator-train")
def world_evaluator_train(
    out: Annotated[Path, typer.Option("--out", help="The safetensors file to write.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the scenes and the weights.")] = 0,
    scenes: Annotated[
        int | None,
        typer.Option("--scenes", help="Rendered training scenes (at least 10; default 1000)."),
    ] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")
    ] = True,
) -> None:
    """Train the ground-truth evaluator's networks (shape classifier, line reader) on
    rendered scenes and write their weights to --out."""
    from flywheel.world.evaluator_training import EvaluatorTrainConfig, train_evaluator

    if out.is_dir():
        fail(f"--out {out}: a directory; give the safetensors file to write")
    config = EvaluatorTrainConfig()
    if scenes is not None:
        config.scenes = scenes
    try:
        config.validate()  # before minutes of rendering and training
        _, report = train_evaluator(out, seed=seed, config=config, progress=progress)
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    except OSError as exc:
        fail(f"--out {out}: {exc.strerror or exc}", code=1)
    console.print(
        f"{report.components} component crops, {report.lines} lines; validation: shapes "
        f"{report.shape_accuracy:.4f}, text {report.text_accuracy:.4f}; "
        f"{report.seconds:.1f} s -> {report.path}",
        highlight=False,
        soft_wrap=True,
    )


@world_app.command("evaluator-measure")
def world_evaluator_measure(
    weights: Annotated[
        Path | None,
        typer.Option("--weights", help="Evaluator weights (default: the shipped ones)."),
    ] = None,
    scenes: Annotated[int, typer.Option("--scenes", min=1, help="Held-out scenes per size.")] = 200,
    sizes: Annotated[
        list[int] | None,
        typer.Option("--size", min=8, max=4096, help="Side in pixels; repeat for more sizes."),
    ] = None,
) -> None:
    """Per-kind accuracy of the ground-truth evaluator on clean renders of held-out scenes
    (64 and 128 pixels unless --size is given)."""
    from safetensors import SafetensorError

    from flywheel.world.evaluator import load_evaluator, measure_accuracy

    if weights is not None and not weights.is_file():
        fail(f"--weights {weights}: no such file")
    try:
        evaluator = load_evaluator(weights)
    except (ValueError, SafetensorError) as exc:  # foreign weights, not a safetensors file
        fail(f"--weights {weights}: {str(exc).splitlines()[0]}")
    for size in sizes or [64, 128]:
        try:
            scores = measure_accuracy(scenes, size=size, evaluator=evaluator)
        except ValueError as exc:  # more scenes than the held-out seeds
            fail(str(exc).splitlines()[0])
        summary = ", ".join(f"{k} {v.accuracy:.4f} ({v.elements})" for k, v in scores.items())
        console.print(f"{size}x{size}: {summary}", highlight=False, soft_wrap=True)
