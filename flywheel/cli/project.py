"""``flywheel init`` (write a commented project file) and ``flywheel doctor`` (check every
part of the project in force with a one-sample smoke)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flywheel.adapters.base import AdapterContext
from flywheel.cli.output import console, err_console, fail
from flywheel.doctor import run_doctor
from flywheel.project import PROJECT_FILE, ProjectError, load_project, read_project
from flywheel.settings import get_settings

ProjectOption = Annotated[
    Path | None,
    typer.Option(
        "--project",
        help=f"The project file (default: $FLYWHEEL_PROJECT, else ./{PROJECT_FILE}, else the "
        "embedded world).",
        dir_okay=False,
    ),
]

WORLD_TEMPLATE = """\
# flywheel project file: which adapter fills each part of the loop, and its settings.
# This one names the embedded world for every part — the same as having no project file.
# `flywheel init --diffusers DIR` writes one for a team's own stack; `flywheel doctor`
# checks every part. Relative paths are relative to this file's directory.

[project]
name = "{name}"

[images]
# Where the server may read images that apps name by URI ($FLYWHEEL_HOME always).
file_roots = []

[generator]
adapter = "world"        # the shipped world base

[judge]
adapter = "world"        # the ground-truth evaluator

[suites]
adapter = "world"        # the world's standard and regression suites

[reward]
adapter = "world"        # the shipped open_clip reward

[enhancer]
adapter = "world"        # the shipped prompt enhancer

[corpus]
adapter = "world"        # the base's training corpus and candidate pool
train = 1500
pool = 2000

[degrader]
adapter = "world"        # the world users' words

[synthesizer]
adapter = "world"        # scenes drawn with the scarce concept made common

[launcher]
adapter = "in_process"   # rounds train in the cycle's process
"""

TEAM_TEMPLATE = """\
# flywheel project file: which adapter fills each part of the loop, and its settings.
# Edit the lines marked EDIT, then run `flywheel doctor`: it loads every part and runs a
# one-sample smoke of each. Relative paths are relative to this file's directory.
# The README's "Use it on your own model" documents every adapter and setting.

[project]
name = "{name}"

[images]
# Where the server may read the images apps name by URI; anything else is stored, never read.
file_roots = ["data"]                 # EDIT: shared disks holding your images
buckets = []                          # e.g. ["s3://my-bucket/generations", "gs://other"]
https_hosts = []                      # e.g. ["images.example.com"]
max_bytes = 20971520
timeout_s = 10.0

[filters]
# What retrieved and synthesized samples must pass before a round trains on them.
min_side = 512                        # shorter side, pixels
near_duplicate_bits = 4               # difference-hash distance of a near-copy
# min_alignment = 0.2                 # your reward's score under the sample's caption
min_entropy_bits = 1.0                # grey-level entropy below which an image is flat
min_caption_tokens = 3
max_caption_tokens = 512

[generator]
adapter = "diffusers"                 # a diffusers pipeline directory (model_index.json)
path = "{generator}"
height = 1024
width = 1024
num_inference_steps = 30
dtype = "bfloat16"

[judge]
adapter = "http"                      # your VLM judge / detector behind the judge protocol
url = "http://127.0.0.1:8700/v1/judge"   # EDIT
timeout_s = 60.0
retries = 2

[suites]
adapter = "jsonl"                     # one prompt per line: id, prompt, spec, tags
standard = "suites/standard.jsonl"    # EDIT
regression = "suites/regression.jsonl"   # EDIT

[reward]
adapter = "open_clip"                 # an open_clip directory
path = "models/reward"                # EDIT

[enhancer]
adapter = "causal_lm"                 # a Hugging Face causal LM with a chat template
path = "models/enhancer"              # EDIT

[corpus]
adapter = "directory"                 # records.jsonl + images (train and pool splits)
path = "data/corpus"                  # EDIT

[degrader]
adapter = "rules"                     # rich caption -> terse user prompt
keep_clauses = 1
max_words = 12

# [synthesizer]                       # optional: new samples of a scarce concept

[launcher]
adapter = "command"                   # your trainer, given the round's manifest
command = "torchrun --nproc_per_node=8 train.py --manifest {{manifest}}"   # EDIT
"""


def init_command(
    world: Annotated[
        bool, typer.Option("--world", help="Name the embedded world for every part.")
    ] = False,
    diffusers: Annotated[
        Path | None,
        typer.Option("--diffusers", help="Your diffusers pipeline directory (the generator)."),
    ] = None,
    path: Annotated[Path, typer.Option("--path", help="Where to write it.")] = Path(PROJECT_FILE),
    name: Annotated[str, typer.Option("--name", help="The project's name.")] = "flywheel",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented project file (flywheel.toml)."""
    if world == (diffusers is not None):
        fail("give exactly one of --world and --diffusers DIR")
    if path.exists() and not force:
        fail(f"{path} exists (--force overwrites it)")
    if not name.strip() or '"' in name or "\\" in name or "\n" in name:
        fail(f"--name {name!r}: a name without quotes, backslashes or newlines")
    if diffusers is not None:
        if not (diffusers / "model_index.json").is_file():
            fail(f"{diffusers}: not a diffusers pipeline directory (no model_index.json)")
        text = TEAM_TEMPLATE.format(name=name, generator=diffusers.resolve().as_posix())
    else:
        text = WORLD_TEMPLATE.format(name=name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    try:
        read_project(path)
    except ProjectError as exc:  # the templates themselves are tested; this says so if not
        fail(f"wrote {path}, which does not read back: {exc}", code=1)
    console.print(f"wrote {path}; check it with `flywheel doctor --project {path}`")


def doctor_command(
    project: ProjectOption = None,
    device: Annotated[str, typer.Option(help="Where models run (cpu, cuda, cuda:1).")] = "cpu",
) -> None:
    """Load every part of the project and smoke-test each; exit 2 when one fails."""
    try:
        loaded = load_project(project)
    except ProjectError as exc:
        fail(str(exc))
    settings = get_settings()
    context = AdapterContext(root=loaded.root, home=settings.home, device=device)
    where = str(loaded.path) if loaded.path is not None else "no project file: the embedded world"
    console.print(f"project {loaded.project.name} ({where})", highlight=False)
    checks = run_doctor(loaded, context)
    table = Table("part", "adapter", "state", "detail")
    for check in checks:
        state = "[green]ok[/]" if check.ok else "[red]failed[/]"
        table.add_row(check.port, check.adapter or "-", state, check.detail)
    console.print(table)
    failed = [c for c in checks if not c.ok]
    for check in failed:
        err_console.print(
            f"error: [{check.port}] {check.adapter}: {check.detail}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    if failed:
        raise typer.Exit(2)
