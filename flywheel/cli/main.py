"""``flywheel``: the command line of the data flywheel.

Every command exits 0 on success, 2 with a one-line reason on bad input, and 1 with a
one-line reason when a service it needs is unavailable.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flywheel.cli.attribution import attribution_app
from flywheel.cli.cycle import cycle_command, deploy_command
from flywheel.cli.mining import mine_app, worker
from flywheel.cli.models import models_app
from flywheel.cli.output import console, err_console, fail
from flywheel.cli.project import doctor_command, init_command
from flywheel.cli.retrieval import retrieval_app
from flywheel.cli.review import review_app, status
from flywheel.cli.services import database
from flywheel.settings import get_settings

app = typer.Typer(
    name="flywheel",
    help="A closed-loop data flywheel for image-generation models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
keys_app = typer.Typer(help="Per-app API keys.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(keys_app, name="keys")
world_app = typer.Typer(
    help="The verifiable world: scenes, corpora, benchmark suites, the evaluator.",
    no_args_is_help=True,
)
app.add_typer(world_app, name="world")

EVAL_APP = "flywheel"
"""The app that ``flywheel eval`` stores its evaluation runs under."""

app.add_typer(retrieval_app, name="retrieval")
app.add_typer(mine_app, name="mine")
app.add_typer(attribution_app, name="attribution")
app.add_typer(review_app, name="review")
app.add_typer(models_app, name="models")
app.command("init")(init_command)
app.command("doctor")(doctor_command)
app.command("status")(status)
app.command("cycle")(cycle_command)
app.command("deploy")(deploy_command)
app.command("worker")(worker)


# ---- db ----------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Migrate the database up (to head by default)."""
    from flywheel.db import migrate

    with database() as engine:
        _run_migration(lambda: migrate.upgrade(engine, revision), revision)
        console.print(f"database at revision {migrate.current_revision(engine)}")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision; 'base' empties the database.")],
) -> None:
    """Migrate the database down to REVISION."""
    from flywheel.db import migrate

    with database() as engine:
        _run_migration(lambda: migrate.downgrade(engine, revision), revision)
        console.print(f"database at revision {migrate.current_revision(engine) or 'base'}")


@db_app.command("revision")
def db_revision(
    message: Annotated[str, typer.Option("--message", "-m", help="What the migration does.")],
) -> None:
    """For developers: write a migration for what the models changed (database must be at head)."""
    from flywheel.db import migrate

    with database() as engine:
        if migrate.current_revision(engine) != migrate.head_revision():
            fail("the database is not at head: run `flywheel db upgrade` first")
        path = migrate.autogenerate_revision(engine, message)
    console.print(f"wrote {path}: review it before committing")


@db_app.command("current")
def db_current() -> None:
    """Print the database's revision and the code's head."""
    from flywheel.db import migrate

    with database() as engine:
        current = migrate.current_revision(engine)
    head = migrate.head_revision()
    state = "up to date" if current == head else "behind: run `flywheel db upgrade`"
    console.print(f"{current or 'base'} (head {head}, {state})")


def _run_migration(step: Callable[[], None], revision: str) -> None:
    from alembic.util import CommandError

    try:
        step()
    except CommandError as exc:
        fail(f"cannot migrate to {revision!r}: {exc}")


# ---- keys --------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    app_name: Annotated[str, typer.Option("--app", help="The app the key belongs to.")],
    scopes: Annotated[
        str, typer.Option("--scopes", help="Comma-separated: ingest, read, triage, review, admin.")
    ],
    rate_limit: Annotated[
        str | None,
        typer.Option(
            "--rate-limit",
            help="This key's request limit ('50/second;2000/minute', or 'off'); "
            "default: FLYWHEEL_RATE_LIMIT.",
        ),
    ] = None,
) -> None:
    """Create a key and print it once (only its hash is stored)."""
    from flywheel.auth.service import create_api_key, parse_scopes
    from flywheel.db.engine import session_factory

    try:
        parsed = parse_scopes(scopes.split(","))
    except ValueError as exc:
        fail(str(exc))
    with database() as engine, session_factory(engine)() as session:
        try:
            created = create_api_key(session, app=app_name, scopes=parsed, rate_limit=rate_limit)
        except ValueError as exc:
            fail(str(exc))
        session.commit()
    err_console.print(
        f"created key {created.record.prefix} for app {app_name!r} with scopes "
        f"{','.join(s.value for s in parsed)}; it is shown only now:",
        highlight=False,
    )
    print(created.secret)


@keys_app.command("list")
def keys_list(
    include_revoked: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
) -> None:
    """List keys (prefix, app, scopes, rate limit, created, revoked); secrets are never shown."""
    from flywheel.auth.repository import list_api_keys
    from flywheel.db.engine import session_factory

    with database() as engine, session_factory(engine)() as session:
        keys = list_api_keys(session, include_revoked=include_revoked)
    table = Table("prefix", "app", "scopes", "rate limit", "created", "revoked")
    for key in keys:
        table.add_row(
            key.prefix,
            key.app,
            ",".join(key.scopes),
            key.rate_limit or "default",
            f"{key.created_at:%Y-%m-%d %H:%M:%S}",
            f"{key.revoked_at:%Y-%m-%d %H:%M:%S}" if key.revoked_at else "",
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    prefix: Annotated[str, typer.Argument(help="The key's prefix, as `keys list` shows it.")],
) -> None:
    """Revoke a key; requests with it get 401 from then on."""
    from flywheel.auth.repository import revoke_api_key
    from flywheel.db.engine import session_factory

    if prefix.startswith("fwk_"):
        prefix = prefix.split("_")[1]
    with database() as engine, session_factory(engine)() as session:
        key = revoke_api_key(session, prefix=prefix)
        session.commit()
    if key is None:
        fail(f"no key with prefix {prefix!r}")
    console.print(f"revoked key {key.prefix} of app {key.app!r}")


@keys_app.command("set-limit")
def keys_set_limit(
    prefix: Annotated[str, typer.Argument(help="The key's prefix, as `keys list` shows it.")],
    rate_limit: Annotated[
        str,
        typer.Argument(
            help="'50/second;2000/minute', 'off' (no limit), or 'default' (FLYWHEEL_RATE_LIMIT)."
        ),
    ],
) -> None:
    """Change a key's request limit; API processes apply it from the key's next request."""
    from flywheel.auth.rate_limit import normalized_rate_limit
    from flywheel.auth.repository import set_rate_limit
    from flywheel.db.engine import session_factory

    if prefix.startswith("fwk_"):
        prefix = prefix.split("_")[1]
    stored: str | None = None
    if rate_limit.strip().lower() != "default":
        try:
            stored = normalized_rate_limit(rate_limit)
        except ValueError as exc:
            fail(str(exc))
    with database() as engine, session_factory(engine)() as session:
        key = set_rate_limit(session, prefix=prefix, rate_limit=stored)
        session.commit()
    if key is None:
        fail(f"no key with prefix {prefix!r}")
    console.print(f"key {key.prefix} of app {key.app!r}: rate limit {stored or 'default'}")


# ---- model checkpoints ---------------------------------------------------------------


@app.command("convert")
def convert(
    out: Annotated[Path, typer.Option("--out", help="Directory to write.")],
    from_diffusers: Annotated[
        Path | None,
        typer.Option("--from-diffusers", help="A diffusers checkpoint directory to convert."),
    ] = None,
    to_diffusers: Annotated[
        Path | None,
        typer.Option("--to-diffusers", help="One of our checkpoint directories to convert."),
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option(help="Shard the weights above this size, e.g. 5GB or 500MB.")
    ] = "5GB",
    height: Annotated[int, typer.Option(min=16, help="A pipeline's image height.")] = 1024,
    width: Annotated[int, typer.Option(min=16, help="A pipeline's image width.")] = 1024,
) -> None:
    """Convert a Qwen-Image-2.1 transformer or VAE checkpoint between diffusers and ours; a
    whole QwenImage21Pipeline directory (model_index.json) becomes a generator directory."""
    from model.convert.directory import convert_from_diffusers, convert_to_diffusers

    if (from_diffusers is None) == (to_diffusers is None):
        fail("give exactly one of --from-diffusers DIR and --to-diffusers DIR")
    source = from_diffusers or to_diffusers
    assert source is not None
    if not source.is_dir():
        fail(f"{source}: not a directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        fail(f"{out}: exists and is not an empty directory")
    if not re.fullmatch(r"\d+(KB|MB|GB|TB)?", max_shard_size):
        fail(f"--max-shard-size {max_shard_size!r}: a byte count or a size like 500MB, 5GB")
    if from_diffusers is not None and (from_diffusers / "model_index.json").is_file():
        from model.convert.pipeline import convert_pipeline

        try:  # a whole pipeline: a generator directory Generator.load reads
            convert_pipeline(from_diffusers, out, height=height, width=width)
        except ValueError as exc:  # ConversionError, CheckpointError
            fail(str(exc).splitlines()[0])
        console.print(f"converted the pipeline {from_diffusers} into the generator directory {out}")
        return
    try:
        if from_diffusers is not None:
            converted = convert_from_diffusers(source, out, max_shard_size=max_shard_size)
        else:
            converted = convert_to_diffusers(source, out, max_shard_size=max_shard_size)
    except ValueError as exc:  # CheckpointError, ConversionError
        fail(str(exc).splitlines()[0])
    console.print(
        f"converted {converted.component} ({converted.tensors} tensors) into {out}: "
        + ", ".join(p.name for p in converted.files)
    )


# ---- training ----------------------------------------------------------------------


@app.command("train")
def train(
    recipe: Annotated[
        str | None, typer.Argument(help="The recipe to run (see --list).", show_default=False)
    ] = None,
    list_recipes: Annotated[
        bool, typer.Option("--list", help="List the recipes and exit.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Output directory (resumed when it has a run).")
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=0, help="Steps to train to (recipe's default).")
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            "--init",
            help="Start from these weights: a run directory, its checkpoints/ or a checkpoint.",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Train on this pre-encoded cache (python -m training.cache produce); "
            "required by recipes without a generated dataset.",
        ),
    ] = None,
    progress: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")
    ] = True,
) -> None:
    """Train a recipe into --out: metrics.jsonl and checkpoints; resumes an interrupted run."""
    from training.cache import CacheError
    from training.checkpoint import CheckpointError
    from training.recipes import RECIPES

    if list_recipes:
        for name, build in RECIPES.items():
            doc = (build.__doc__ or "").strip().splitlines()
            console.print(f"{name}: {doc[0] if doc else ''}", highlight=False, soft_wrap=True)
        return
    if recipe is None:
        fail("give a RECIPE to run, or --list")
    if recipe not in RECIPES:
        fail(f"unknown recipe {recipe!r}; known: {', '.join(sorted(RECIPES))}")
    if out is None:
        fail("give --out DIR, the directory to train into")
    if out.exists() and not out.is_dir():
        fail(f"{out}: exists and is not a directory")

    from training.trainer import train as run_training

    config = RECIPES[recipe]()
    if init is not None:
        if not hasattr(config, "init_from"):
            fail(f"{recipe} does not start from trained weights; drop --init")
        if not init.exists():
            fail(f"--init {init}: no such file or directory")
        config.init_from = init
    recipe_data = getattr(config, "data", None)
    if data is not None:
        if recipe_data is None or not hasattr(recipe_data, "cache_dir"):
            fail(f"{recipe} does not read a training cache; drop --data")
        if not data.is_dir():
            fail(f"--data {data}: no such directory")
        recipe_data.cache_dir = data
    elif (
        getattr(recipe_data, "cache_dir", True) is None
        and getattr(recipe_data, "synthetic", True) is None
    ):
        fail(f"{recipe} trains on a prepared cache: give --data DIR")
    try:
        result = run_training(config, out=out, max_steps=max_steps, progress=progress, name=recipe)
    except (CacheError, CheckpointError, ValueError) as exc:
        fail(str(exc).splitlines()[0])
    except OSError as exc:  # e.g. an out/cache that is something else
        fail(f"{out}: {exc}", code=1)
    except RuntimeError as exc:  # e.g. device "cuda" on a machine without CUDA
        fail(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, code=1)
    plot = ""
    if result.losses:
        from training.plot import PLOT_FILE, plot_metrics

        plot = f", curves in {plot_metrics(result.metrics, out / PLOT_FILE, title=recipe)}"
    last = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    start = f" (resumed from step {result.resumed_from})" if result.resumed_from else ""
    console.print(
        f"trained {recipe} to step {result.step}{start}{last} in {result.seconds:.1f}s; "
        f"metrics in {result.metrics}{plot}, checkpoint {result.checkpoint}",
        highlight=False,
        soft_wrap=True,
    )


# ---- the world ---------------------------------------------------------------------


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
    recipe: Annotated[
        str, typer.Option("--recipe", help="world-base (shipped) or world-base-debug (toy).")
    ] = "world-base",
    ship: Annotated[
        bool,
        typer.Option("--ship", help="Copy the generator and reward model to where they ship."),
    ] = False,
) -> None:
    """Train the world's base generator from scratch (corpus, VAE, cache, transformer)."""
    from flywheel.world.base_model import RECIPES, build_world_base
    from flywheel.world.base_model import ship as ship_build

    if recipe not in RECIPES:
        fail(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    try:
        generator = build_world_base(RECIPES[recipe](), out, progress=True)
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    console.print(f"generator: {generator}", highlight=False)
    if ship:
        shipped = ship_build(out)
        console.print(f"shipped: {', '.join(str(p) for p in shipped)}", highlight=False)


@world_app.command("weaknesses")
def world_weaknesses(
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Generator directory (default: the shipped world base)."),
    ] = None,
    rare: Annotated[
        str,
        typer.Option("--rare", help="The colours / shapes the corpus made rare, comma-separated."),
    ] = "purple",
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
    from flywheel.world.evaluation import BASE_MODEL
    from flywheel.world.scenes import COLOURS, SHAPES
    from flywheel.world.weaknesses import measure_weaknesses, reward_agreement
    from model.pipeline import Generator

    concepts = tuple(s.strip() for s in rare.split(",") if s.strip())
    if not concepts or set(concepts) - set(SHAPES) - set(COLOURS):
        fail(
            f"--rare {rare!r}: comma-separated colours ({', '.join(COLOURS)}) "
            f"or shapes ({', '.join(SHAPES)})"
        )
    if set(COLOURS) <= set(concepts) or set(SHAPES) <= set(concepts):
        fail(f"--rare {rare!r}: leave some colours and shapes common (the control)")
    try:
        generator = Generator.load(model or BASE_MODEL)
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
    agreement = reward_agreement(scorer.score, per_skill=per_skill * 2)
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


# ---- eval --------------------------------------------------------------------------


def _model_version(model: Path) -> str:
    """A model version name from a generator directory's name (printable ASCII, no spaces)."""
    name = re.sub(r"[^\x21-\x7e]+", "-", model.resolve().name).strip("-")
    return name[:200] or "model"


@app.command("eval")
def eval_command(
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Generator directory (default: the shipped world base)."),
    ] = None,
    suite_name: Annotated[
        str, typer.Option("--suite", help="standard or regression.")
    ] = "standard",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Noise seed of the first batch.")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Cases per batch.")] = 16,
    model_version: Annotated[
        str | None,
        typer.Option("--model-version", help="Version name stored (default: the directory name)."),
    ] = None,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Run id (default: suite, version, UTC time).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress on stderr.")] = True,
) -> None:
    """Run a benchmark suite on a generator, store it as evaluation signals, print per-skill
    scores."""
    from datetime import UTC, datetime

    from pydantic import TypeAdapter, ValidationError
    from rich.progress import Progress

    from flywheel.db import migrate
    from flywheel.db.engine import session_factory
    from flywheel.signals.schemas import Identifier, RunIdentifier
    from flywheel.signals.service import EventConflict, ingest_evaluation
    from flywheel.world.benchmark import suite, suite_names
    from flywheel.world.evaluation import (
        BASE_MODEL,
        evaluation_run,
        run_suite,
        save_images,
    )
    from model.pipeline import Generator, GeneratorError

    if suite_name not in suite_names():
        fail(f"unknown suite {suite_name!r}; known: {', '.join(suite_names())}")
    directory = model or BASE_MODEL
    version = model_version or _model_version(directory)
    now = datetime.now(UTC)
    run = run_id or f"{suite_name}-{version[:80]}-{now:%Y%m%dT%H%M%S%fZ}"
    for option, value, kind in (
        ("--model-version", version, Identifier),
        ("--run-id", run, RunIdentifier),
    ):  # checked before minutes of generation, not after
        try:
            TypeAdapter(kind).validate_python(value)
        except ValidationError as exc:
            fail(f"{option} {value!r}: {exc.errors()[0]['msg']}")
    try:
        generator = Generator.load(directory)
    except GeneratorError as exc:
        fail(str(exc).splitlines()[0])
    settings = get_settings()
    with database(settings) as engine:
        migrate.upgrade(engine)
        cases = suite(suite_name)
        with Progress(console=err_console, disable=not progress, transient=True) as display:
            result, generated = run_suite(
                generator,
                cases,
                suite=suite_name,
                seed=seed,
                batch_size=batch_size,
                progress=display,
            )
        images = settings.home / "eval" / re.sub(r"[^\w.-]+", "_", run)
        payload = evaluation_run(
            result,
            save_images(generated, images),
            run_id=run,
            model_version=version,
            timestamp=now,
        )
        with session_factory(engine)() as session:
            try:
                stored = ingest_evaluation(session, app=EVAL_APP, run=payload)
            except EventConflict as exc:
                fail(f"run id {run!r} was stored before with other results ({exc})")
    if as_json:
        console.print_json(
            data={
                "skills": {
                    name: {"score": s.score, "n": s.n, "pass_rate": s.pass_rate}
                    for name, s in result.skills.items()
                },
                "score": result.score,
                "suite": suite_name,
                "digest": result.digest,
                "model": str(directory),
                "model_version": version,
                "run_id": run,
                "evaluation_run": stored.result.id,
                "images": str(images),
            }
        )
        return
    table = Table("skill", "score", "pass rate", "cases")
    for name, skill in result.skills.items():
        table.add_row(name, f"{skill.score:.3f}", f"{skill.pass_rate:.3f}", str(skill.n))
    console.print(table)
    console.print(
        f"{version} on {suite_name}: score {result.score:.3f}; stored as evaluation run "
        f"{run!r} ({len(result.cases)} signals), images in {images}",
        highlight=False,
        soft_wrap=True,
    )


# ---- serve / demo ------------------------------------------------------------------


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to bind.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    migrate_first: Annotated[
        bool, typer.Option("--migrate/--no-migrate", help="Upgrade the database to head first.")
    ] = True,
    access_log: Annotated[
        bool, typer.Option("--access-log/--no-access-log", help="Log every request.")
    ] = True,
) -> None:
    """Run the HTTP API under uvicorn."""
    import uvicorn

    from flywheel.db import migrate
    from flywheel.db.engine import database_url
    from flywheel.logs import uvicorn_log_config

    settings = get_settings()
    try:
        url = database_url(settings)
    except ValueError as exc:
        fail(str(exc))
    # Workers (and a reload) read settings from the environment: hand them the resolved
    # URL so they join this process's embedded server instead of starting their own.
    os.environ["FLYWHEEL_DATABASE_URL"] = url
    get_settings.cache_clear()
    if migrate_first:
        with database() as engine:
            _run_migration(lambda: migrate.upgrade(engine), "head")
    uvicorn.run(
        "flywheel.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=uvicorn_log_config(),
        log_level="info",
        access_log=access_log,
    )


@app.command("demo")
def demo(
    report: Annotated[
        Path | None, typer.Option("--report", help="Write the demo's report as JSON here.")
    ] = None,
    events: Annotated[
        int, typer.Option(min=1, max=10_000, help="Feedback events the product app sends.")
    ] = 48,
    probes: Annotated[int, typer.Option(min=1, max=10_000, help="Colour probes mined.")] = 48,
    seed: Annotated[int, typer.Option(help="Seed of the simulated users.")] = 0,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="JSON file of cycle settings (CycleConfig fields)."),
    ] = None,
) -> None:
    """A complete flywheel cycle on the embedded default with the shipped base: evaluate,
    ingest feedback through the API, mine, attribute, run the three tracks' rounds,
    re-evaluate, promote (the final review is approved automatically: demo mode only) and
    print a before / after table per track."""
    from flywheel.cli.cycle import load_cycle_config
    from flywheel.demo import run_demo, write_report
    from flywheel.settings import prefect_environment

    config = load_cycle_config(config_file, auto_approve=True)
    settings = get_settings()
    with database(settings):
        pass  # fail early, in one line, when the database is unreachable
    prefect_environment(settings)
    result = run_demo(
        settings, events=events, seed=seed, console=console, cycle=config, probes=probes
    )
    if report is not None:
        write_report(result, report)
        console.print(f"report: {report}")


@app.command("dashboard")
def dashboard(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 8501,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
) -> None:
    """Serve the triage dashboard and review queue (Streamlit) on the configured database."""
    import subprocess

    import dashboard as package

    settings = get_settings()
    with database(settings):
        pass  # one-line failure when the database is unreachable
    script = Path(package.__file__).resolve().parent / "app.py"
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(script),
        "--server.port",
        str(port),
        "--server.address",
        host,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]
    console.print(f"dashboard: http://{host}:{port}", highlight=False)
    raise typer.Exit(subprocess.call(command))


@app.command("stack")
def stack(
    api_port: Annotated[int, typer.Option(min=1, max=65535, help="API port.")] = 8000,
    prefect_port: Annotated[int, typer.Option(min=1, max=65535, help="Prefect port.")] = 4200,
    api_workers: Annotated[int, typer.Option(min=1, help="API worker processes.")] = 1,
    worker_concurrency: Annotated[int, typer.Option(min=1, help="Celery processes.")] = 1,
    logs: Annotated[Path, typer.Option(help="Directory of the processes' logs.")] = Path(
        "stack-logs"
    ),
) -> None:
    """Run the production topology natively on this machine — the API, a Celery worker and
    a Prefect server — against FLYWHEEL_DATABASE_URL and FLYWHEEL_REDIS_URL, until Ctrl-C."""
    import time as clock

    from flywheel.stack import StackConfig, StackError, native_stack

    settings = get_settings()
    if not settings.database_url or not settings.redis_url:
        fail("set FLYWHEEL_DATABASE_URL and FLYWHEEL_REDIS_URL (the stack runs on real services)")
    with database(settings):
        pass
    config = StackConfig(
        api_port=api_port,
        prefect_port=prefect_port,
        api_workers=api_workers,
        worker_concurrency=worker_concurrency,
        log_dir=logs,
    )
    try:
        with native_stack(settings, config) as running:
            console.print(
                f"api {running.api_url} · Prefect {running.prefect_api_url} · Celery worker "
                f"({worker_concurrency}) · logs in {logs}/ — Ctrl-C stops them",
                highlight=False,
            )
            while all(p.poll() is None for p in running.processes.values()):
                clock.sleep(1)
            dead = [name for name, p in running.processes.items() if p.poll() is not None]
            fail(f"{', '.join(dead)} stopped; see {logs}/", code=1)
    except StackError as exc:
        fail(str(exc), code=1)
    except KeyboardInterrupt:
        console.print("stopped")


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
