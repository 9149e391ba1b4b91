"""The ``launcher`` port: a training round run from its manifest, to the end.

A round is a :class:`~flywheel.ports.RoundManifest` written as JSON before it starts
(:func:`write_manifest`); a launcher reads it (:func:`read_manifest`), runs the round, and
returns :class:`~flywheel.ports.LaunchResult` with ``output_dir`` as the checkpoint. Three
adapters:

- ``in_process`` (:data:`IN_PROCESS`): the recipe's runner in this process, from
  :data:`RECIPE_RUNNERS` (``pe_sft`` is built in, and ``continued_pretraining`` and
  ``diffusion_dpo`` on a generator directory or a diffusers pipeline of ``model/``'s
  architecture, :mod:`flywheel.adapters.generator_rounds`; :func:`register_recipe` adds
  more);
- ``command`` (:data:`COMMAND`): a command template (``torchrun ... --manifest {manifest}``)
  run without a shell, its output logged to ``work_dir/launch.log``;
- ``prefect`` (:data:`PREFECT`): a flow run of a deployment of :func:`round_flow` on a work
  pool (GPU workers), waited for; :func:`deploy_round_flow` registers that deployment.

Every launcher keeps the same rules, so that a failing round pauses or retries the cycle and
never leaves a half-written checkpoint:

- **success** is the round ending well *and* ``output_dir`` being a non-empty directory;
  ``output_dir/metrics.json`` (a JSON object, optional) becomes ``LaunchResult.metrics``.
  The launcher then flushes the directory to disk and writes the marker
  ``output_dir/.flywheel-round-done`` (with the SHA-256 of the manifest file);
- **failure** (an exception, a non-zero exit, a kill, a timeout, a flow run that failed,
  crashed or was cancelled) moves whatever ``output_dir`` holds aside, to
  ``<output_dir>.failed-<UTC time>``, and raises :class:`~flywheel.ports.PortError` with one
  line saying what failed. ``work_dir`` is kept: a relaunch resumes from its checkpoints;
- **resume**: a launch whose ``output_dir`` holds the marker of the same manifest returns it
  without running again (the cycle crashed after the round ended). An ``output_dir``
  without the marker is a dead attempt's: it is moved aside before the round runs. The
  marker of *another* manifest is refused (the directory is some other round's checkpoint).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import shlex
import shutil
import signal
import string
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

import httpx
from prefect import flow, get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelling
from prefect.types.entrypoint import EntrypointType
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator

from flywheel.adapters.base import Adapter, AdapterContext, AdapterSettings, launched_round_loop
from flywheel.adapters.generator_rounds import run_continued_pretraining, run_diffusion_dpo
from flywheel.ports import LaunchResult, PortError, Recipe, RoundManifest
from training.io import atomic_write_text, fsync_directory, fsync_tree

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments.runner import RunnerDeployment

log = logging.getLogger(__name__)

DONE_MARKER = ".flywheel-round-done"
"""Written into ``output_dir`` by the launcher once the round succeeded (see the module doc)."""
METRICS_FILE = "metrics.json"
"""What a round reports, a JSON object in ``output_dir`` (optional)."""
LOG_FILE = "launch.log"
"""The command's (and an in-process failure's) log, in ``work_dir``, appended per attempt."""
PREFECT_RUN_FILE = "prefect-flow-run.json"
"""The Prefect launcher's record of its flow run, in ``work_dir`` (to wait on it again)."""
ROUND_FLOW = "flywheel-round"
"""The name of :func:`round_flow` (deployments are ``flywheel-round/<name>``)."""
PLACEHOLDERS = frozenset({"manifest", "output_dir", "work_dir", "python"})
"""What a command template may name."""
MANIFEST_ENV = "FLYWHEEL_ROUND_MANIFEST"
"""Set to the manifest's path in a command's environment."""

RecipeRunner = Callable[[RoundManifest], dict[str, JsonValue]]
"""Runs a round in this process: writes the checkpoint into ``manifest.output_dir`` and
returns the round's metrics (JSON values). Raises on failure."""


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ---- the manifest ----------------------------------------------------------------------------


def write_manifest(path: Path, manifest: RoundManifest) -> Path:
    """Write ``manifest`` as JSON to ``path`` (atomically; parents created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, manifest.model_dump_json(indent=2) + "\n")
    return path


def _is_local(value: str) -> bool:
    return "://" not in value


def _resolve(value: str, base: Path) -> str:
    if not _is_local(value):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def _manifest_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PortError("launcher", f"{path}: cannot be read ({exc.strerror or exc})") from None


def _parse_manifest(path: Path, data: bytes) -> RoundManifest:
    try:
        manifest = RoundManifest.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(file)'}: {e['msg']}" for e in exc.errors()
        )
        raise PortError(
            "launcher", f"{path}: not a round manifest ({_one_line(problems)})"
        ) from None
    base = path.absolute().parent
    return manifest.model_copy(
        update={
            "base_checkpoint": _resolve(manifest.base_checkpoint, base),
            "artefacts": {k: _resolve(v, base) for k, v in manifest.artefacts.items()},
            "output_dir": _resolve(manifest.output_dir, base),
            "work_dir": _resolve(manifest.work_dir, base),
        }
    )


def read_manifest(path: Path) -> RoundManifest:
    """The round manifest at ``path``; relative local paths in it (base checkpoint,
    artefacts, output and work directories) are resolved against the manifest's directory.
    :class:`PortError` (``launcher``) on a file that cannot be read or is not a manifest."""
    return _parse_manifest(path, _manifest_bytes(path))


def _load(path: Path) -> tuple[RoundManifest, str]:
    """The manifest and the SHA-256 of its file (what the done marker records)."""
    data = _manifest_bytes(path)
    return _parse_manifest(path, data), hashlib.sha256(data).hexdigest()


# ---- the rules every launcher keeps ----------------------------------------------------------


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def move_aside(output_dir: Path) -> Path | None:
    """Rename whatever is at ``output_dir`` to ``<output_dir>.failed-<UTC time>`` so it is
    never taken for a checkpoint; where it went (None: nothing was there)."""
    if not output_dir.exists() and not output_dir.is_symlink():
        return None
    stamp = _stamp()
    target = output_dir.with_name(f"{output_dir.name}.failed-{stamp}")
    attempt = 1
    while target.exists() or target.is_symlink():
        target = output_dir.with_name(f"{output_dir.name}.failed-{stamp}-{attempt}")
        attempt += 1
    os.rename(output_dir, target)
    fsync_directory(output_dir.parent)
    return target


def _failed(manifest: RoundManifest, what: str) -> PortError:
    """Move the partial output aside; the :class:`PortError` to raise, saying where it went."""
    try:
        moved = move_aside(Path(manifest.output_dir))
    except OSError as exc:  # it has no done marker: a relaunch moves it first
        where = f" (the partial output could not be moved aside: {exc.strerror or exc})"
    else:
        where = f" (partial output moved to {moved})" if moved is not None else ""
    return PortError("launcher", _one_line(f"round {manifest.round_id}: {what}") + where)


def _read_metrics(output_dir: Path) -> dict[str, JsonValue] | str:
    """``metrics.json`` of ``output_dir`` ({} when absent), or what is wrong with it."""
    path = output_dir / METRICS_FILE
    if not path.exists():
        return {}
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{path}: unreadable ({exc})"
    if not isinstance(metrics, dict):
        return f"{path}: not a JSON object"
    return cast("dict[str, JsonValue]", metrics)


def finished_round(manifest: RoundManifest, digest: str) -> LaunchResult | None:
    """The finished checkpoint ``output_dir`` holds for this manifest (None: none).
    :class:`PortError` when it holds the finished checkpoint of another manifest."""
    output_dir = Path(manifest.output_dir)
    marker = output_dir / DONE_MARKER
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PortError("launcher", f"{marker}: unreadable ({_one_line(str(exc))})") from None
    if not isinstance(record, dict) or record.get("manifest_sha256") != digest:
        raise PortError(
            "launcher",
            f"{output_dir} holds the finished checkpoint of another round manifest "
            f"(see {marker}); give this round another output_dir or move that one away",
        )
    metrics = _read_metrics(output_dir)
    if isinstance(metrics, str):
        raise PortError("launcher", _one_line(metrics))
    return LaunchResult(checkpoint=output_dir, metrics=metrics)


def _prepare(manifest: RoundManifest) -> None:
    """Before a run: the work directory and the output's parent exist, and a dead attempt's
    output (no done marker) is out of the way."""
    output_dir = Path(manifest.output_dir)
    try:
        Path(manifest.work_dir).mkdir(parents=True, exist_ok=True)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        moved = move_aside(output_dir)
    except OSError as exc:
        raise PortError(
            "launcher", f"round {manifest.round_id}: cannot prepare {output_dir} ({exc})"
        ) from None
    if moved is not None:
        log.warning("round %s: an unfinished output was moved to %s", manifest.round_id, moved)


def _is_checkpoint(output_dir: Path) -> bool:
    return output_dir.is_dir() and any(
        p.name not in (METRICS_FILE, DONE_MARKER) for p in output_dir.iterdir()
    )


def _finish(manifest: RoundManifest, digest: str, *, launcher: str, hint: str = "") -> LaunchResult:
    """The round ended well: check its output, flush it, mark it done."""
    output_dir = Path(manifest.output_dir)
    if not _is_checkpoint(output_dir):
        raise _failed(manifest, f"ended well but wrote no checkpoint into {output_dir}{hint}")
    metrics = _read_metrics(output_dir)
    if isinstance(metrics, str):
        raise _failed(manifest, metrics)
    fsync_tree(output_dir)
    record = {
        "format": "flywheel-round-done/1",
        "round_id": manifest.round_id,
        "cycle_id": manifest.cycle_id,
        "manifest_sha256": digest,
        "launcher": launcher,
        "finished_at": datetime.now(UTC).isoformat(),
    }
    atomic_write_text(output_dir / DONE_MARKER, json.dumps(record, indent=2) + "\n")
    return LaunchResult(checkpoint=output_dir, metrics=metrics)


# ---- in process ------------------------------------------------------------------------------

RECIPE_RUNNERS: dict[Recipe, RecipeRunner] = {}
"""Recipe -> the function that runs it in this process (:func:`register_recipe`)."""


def register_recipe(recipe: Recipe, runner: RecipeRunner) -> RecipeRunner:
    """Make ``runner`` the in-process runner of ``recipe`` (replacing any); returns it."""
    RECIPE_RUNNERS[recipe] = runner
    return runner


class PESFTRoundSettings(BaseModel):
    """``settings`` of a ``pe_sft`` manifest (every key optional; others are an error)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(default=1e-5, gt=0)
    """Peak learning rate (AdamW), after the warm-up, then cosine-decayed to a tenth."""
    warmup_steps: int | None = Field(default=None, ge=0)
    """Linear warm-up steps; None: a quarter of the steps, at most 20."""
    batch_size: int = Field(default=8, ge=1)
    """Pairs per optimizer step (drawn with replacement)."""
    max_length: int = Field(default=1024, ge=2)
    """Most tokens of one example (prompt + target); longer targets are cut."""
    seed: int = 0
    """Seed of the data order."""
    system_prompt: str | None = None
    """The system instruction the enhancer serves with (``system_prompt_t2i``); None: the
    enhancer's default."""
    enable_thinking: bool | None = None
    """Passed to the chat template, as the enhancer's ``enable_thinking`` when serving."""
    checkpoint_every: int | None = Field(default=None, ge=1)
    """Checkpoint into ``work_dir`` every this many steps (a relaunch resumes there); None:
    every 500 steps and at the end."""


def run_pe_sft(manifest: RoundManifest) -> dict[str, JsonValue]:
    """Prompt-enhancer SFT: ``budget["pe_sft"]`` steps from the causal LM
    ``base_checkpoint`` on the ``artefacts["pairs"]`` JSONL (``{"prompt", "target"}`` a line,
    :func:`training.pe_sft.write_pairs`), the run kept in ``work_dir/pe_sft`` (resumable),
    the enhancer exported to ``output_dir``."""
    from model.prompt_enhancer import DEFAULT_T2I_SYSTEM
    from training.pe_sft import PESFTConfig, PromptPairsConfig, export_enhancer
    from training.trainer import train

    steps = manifest.budget.get("pe_sft")
    if steps is None or steps < 1:
        raise ValueError('a pe_sft round needs budget["pe_sft"] >= 1 steps')
    if "pairs" not in manifest.artefacts:
        raise ValueError('a pe_sft round needs artefacts["pairs"] (a JSONL of pairs)')
    settings = PESFTRoundSettings.model_validate(manifest.settings)
    config = PESFTConfig(
        model=Path(manifest.base_checkpoint),
        data=PromptPairsConfig(pairs=Path(manifest.artefacts["pairs"])),
        system_prompt=settings.system_prompt or DEFAULT_T2I_SYSTEM,
        enable_thinking=settings.enable_thinking,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        loop=launched_round_loop(
            steps,
            lr=settings.lr,
            warmup_steps=settings.warmup_steps,
            checkpoint_every=settings.checkpoint_every,
            seed=settings.seed,
            device=manifest.device,
            keep_checkpoints=2,
        ),
    )
    run = Path(manifest.work_dir) / "pe_sft"
    result = train(config, out=run, name=f"round {manifest.round_id} pe_sft")
    export_enhancer(run, Path(manifest.output_dir))
    lines = result.metrics.read_text(encoding="utf-8").splitlines()
    losses = [float(json.loads(line)["loss"]) for line in lines if line.strip()]
    window = max(1, min(10, len(losses) // 5))
    return {
        "recipe": "pe_sft",
        "steps": result.step,
        "resumed_from": result.resumed_from,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_first_mean": sum(losses[:window]) / window if losses else None,
        "loss_last_mean": sum(losses[-window:]) / window if losses else None,
        "seconds": round(result.seconds, 2),
    }


register_recipe("pe_sft", run_pe_sft)
register_recipe("continued_pretraining", run_continued_pretraining)
register_recipe("diffusion_dpo", run_diffusion_dpo)


class InProcessSettings(AdapterSettings):
    """``[launcher] adapter = "in_process"``: the round runs in the flywheel process."""

    device: str | None = None
    """Torch device the round trains on (``cpu``, ``cuda``, ``cuda:1``); None: the
    manifest's ``device``."""
    modules: list[str] = Field(default_factory=list)
    """Python modules imported when the launcher is built, each registering recipe runners
    with :func:`register_recipe` (a team's recipes beside, or instead of, the built-in
    ``pe_sft``, ``continued_pretraining`` and ``diffusion_dpo``)."""


class InProcessLauncher:
    """Runs the manifest's recipe with its runner from :data:`RECIPE_RUNNERS`."""

    def __init__(self, settings: InProcessSettings | None = None) -> None:
        self.settings = settings or InProcessSettings()
        for module in self.settings.modules:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise PortError("launcher", f"recipe module {module!r}: {exc}") from None

    def check(self) -> str:
        device = self.settings.device or "the manifest's device"
        return f"in process on {device}; recipes: {', '.join(sorted(RECIPE_RUNNERS)) or 'none'}"

    def launch(self, manifest: Path) -> LaunchResult:
        round_, digest = _load(manifest)
        done = finished_round(round_, digest)
        if done is not None:
            return done
        runner = RECIPE_RUNNERS.get(round_.recipe)
        if runner is None:
            known = ", ".join(sorted(RECIPE_RUNNERS)) or "none"
            raise PortError(
                "launcher",
                f"round {round_.round_id}: no in-process runner for recipe {round_.recipe!r} "
                f"(registered: {known})",
            )
        if self.settings.device is not None:
            round_ = round_.model_copy(update={"device": self.settings.device})
        _prepare(round_)
        try:
            metrics = runner(round_)
        except BaseException as exc:
            with (Path(round_.work_dir) / LOG_FILE).open("a", encoding="utf-8") as handle:
                handle.write(f"=== {_stamp()} in-process {round_.recipe} failed\n")
                handle.write("".join(traceback.format_exception(exc)))
            if not isinstance(exc, Exception):  # interrupted: no checkpoint, then stop
                move_aside(Path(round_.output_dir))
                raise
            what = exc.reason if isinstance(exc, PortError) else f"{type(exc).__name__}: {exc}"
            raise _failed(round_, f"{round_.recipe} failed in process: {what}") from exc
        output_dir = Path(round_.output_dir)
        if _is_checkpoint(output_dir) and not (output_dir / METRICS_FILE).exists():
            try:
                text = json.dumps(metrics, indent=2, allow_nan=False)
            except (TypeError, ValueError) as exc:
                what = f"{round_.recipe} returned metrics that are not JSON ({exc})"
                raise _failed(round_, what) from None
            atomic_write_text(output_dir / METRICS_FILE, text + "\n")
        return _finish(round_, digest, launcher="in_process")


def _build_in_process(settings: InProcessSettings, context: AdapterContext) -> InProcessLauncher:
    del context
    return InProcessLauncher(settings)


IN_PROCESS: Adapter[InProcessSettings] = Adapter(
    settings=InProcessSettings,
    build=_build_in_process,
    summary=(
        "rounds train in the flywheel process "
        "(built-in recipes: continued_pretraining, diffusion_dpo, pe_sft)"
    ),
)


# ---- a command -------------------------------------------------------------------------------


def _template_problem(template: str) -> str | None:
    """What is wrong with a command template (None: nothing)."""
    try:
        argv = shlex.split(template)
    except ValueError as exc:
        return f"cannot be split like a shell would ({exc})"
    if not argv:
        return "is empty"
    named: set[str] = set()
    for token in argv:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(token) if f is not None]
        except ValueError as exc:
            return f"has a bad placeholder in {token!r} ({exc})"
        for field in fields:
            if field not in PLACEHOLDERS:
                known = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
                return f"names {{{field}}} (known: {known}; write {{{{ }}}} for a brace)"
            named.add(field)
    if "manifest" not in named:
        return "does not pass {manifest} to the round"
    return None


class CommandSettings(AdapterSettings):
    """``[launcher] adapter = "command"``: the round is a command (``torchrun ...``)."""

    command: str = Field(min_length=1)
    """The command template, split like a shell would (quotes work) but run without a shell
    (no pipes, no ``$VAR``): ``{manifest}`` (required), ``{output_dir}``, ``{work_dir}``,
    ``{python}`` (the interpreter flywheel runs on) are replaced per round."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables set for the command, over flywheel's own
    (``FLYWHEEL_ROUND_MANIFEST`` is always set to the manifest's path)."""
    cwd: str | None = None
    """Working directory of the command, relative to the project file's directory; None:
    that directory."""
    timeout_s: float | None = Field(default=None, gt=0)
    """Longest the round may run, in seconds; then its process group is stopped and the round
    fails. None: no limit."""
    kill_grace_s: float = Field(default=30.0, ge=0)
    """After a timeout, seconds between SIGTERM (time to write a checkpoint) and SIGKILL."""

    @field_validator("command")
    @classmethod
    def _check_template(cls, value: str) -> str:
        problem = _template_problem(value)
        if problem is not None:
            raise ValueError(f"the command template {problem}")
        return value


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _last_line(log_file: Path, start: int) -> str:
    """The last non-empty line written to ``log_file`` after byte ``start``."""
    try:
        with log_file.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(start, size - 16384))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class CommandLauncher:
    """Runs a command per round, in a process group of its own, logged to ``work_dir``."""

    def __init__(self, settings: CommandSettings, *, root: Path) -> None:
        self.settings = settings
        self.root = root
        self.cwd = (root / Path(settings.cwd).expanduser()) if settings.cwd else root

    def argv(self, manifest: Path, round_: RoundManifest | None = None) -> list[str]:
        """The command for ``manifest`` (placeholders replaced per token)."""
        values = {
            "manifest": str(manifest),
            "output_dir": round_.output_dir if round_ else "<output_dir>",
            "work_dir": round_.work_dir if round_ else "<work_dir>",
            "python": sys.executable,
        }
        return [token.format_map(values) for token in shlex.split(self.settings.command)]

    def _executable(self, program: str) -> str:
        if os.sep in program or (os.altsep and os.altsep in program):
            path = Path(program).expanduser()
            path = path if path.is_absolute() else self.cwd / path
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
            raise PortError("launcher", f"{path}: no such executable file")
        path_var = self.settings.env.get("PATH", os.environ.get("PATH", os.defpath))
        found = shutil.which(program, path=path_var)
        if found is None:
            raise PortError("launcher", f"{program!r}: not found on PATH")
        return found

    def check(self) -> str:
        problem = _template_problem(self.settings.command)
        if problem is not None:
            raise PortError("launcher", f"the command template {problem}")
        if not self.cwd.is_dir():
            raise PortError("launcher", f"{self.cwd}: the command's working directory is missing")
        argv = self.argv(Path("<manifest>"))
        executable = self._executable(argv[0])
        limit = f", timeout {self.settings.timeout_s:g} s" if self.settings.timeout_s else ""
        return f"would run: {shlex.join(argv)} (in {self.cwd}, {argv[0]} = {executable}{limit})"

    def launch(self, manifest: Path) -> LaunchResult:
        round_, digest = _load(manifest)
        done = finished_round(round_, digest)
        if done is not None:
            return done
        manifest = manifest.absolute()
        argv = self.argv(manifest, round_)
        argv[0] = self._executable(argv[0])
        if not self.cwd.is_dir():
            raise PortError("launcher", f"{self.cwd}: the command's working directory is missing")
        _prepare(round_)
        log_file = Path(round_.work_dir) / LOG_FILE
        env = {**os.environ, **self.settings.env, MANIFEST_ENV: str(manifest)}
        with log_file.open("ab") as handle:
            start = handle.seek(0, os.SEEK_END)
            handle.write(f"=== {_stamp()} {shlex.join(argv)}\n".encode())
            handle.flush()
            code, why = self._run(argv, env=env, log=handle)
        if why is None and code == 0:
            return _finish(round_, digest, launcher="command")
        if why is None:
            why = (
                f"killed by {signal.Signals(-code).name}"
                if code < 0
                else f"exited with code {code}"
            )
        last = _last_line(log_file, start)
        detail = f"; last line: {last}" if last else ""
        raise _failed(round_, f"{Path(argv[0]).name} {why} (log {log_file}{detail})")

    def _run(self, argv: list[str], *, env: dict[str, str], log: Any) -> tuple[int, str | None]:
        """Run to the end; the exit code and, for a timeout, why it was stopped."""
        try:
            process = subprocess.Popen(
                argv,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a timeout stops all of it
            )
        except OSError as exc:
            return 127, f"could not start ({exc.strerror or exc})"
        try:
            try:
                code = process.wait(timeout=self.settings.timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGTERM)
                try:
                    process.wait(timeout=self.settings.kill_grace_s)
                except subprocess.TimeoutExpired:
                    _signal_group(process, signal.SIGKILL)
                    process.wait()
                return process.returncode, f"timed out after {self.settings.timeout_s:g} s"
        finally:
            if process.returncode is None:  # interrupted while waiting: stop the round
                _signal_group(process, signal.SIGKILL)
                process.wait()
        if code != 0:  # nothing of a failed round keeps writing into its output
            _signal_group(process, signal.SIGKILL)
        return code, None


def _build_command(settings: CommandSettings, context: AdapterContext) -> CommandLauncher:
    return CommandLauncher(settings, root=context.root)


COMMAND: Adapter[CommandSettings] = Adapter(
    settings=CommandSettings,
    build=_build_command,
    summary="rounds run as a command (torchrun ... --manifest {manifest}), logged to work_dir",
)


# ---- the round as a Prefect flow -------------------------------------------------------------


@task(name="read-round-manifest", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def load_round(manifest: str) -> RoundManifest:
    """The round's manifest (retried: a shared file system may show it late)."""
    return read_manifest(Path(manifest))


@task(name="run-round", retries=1, retry_delay_seconds=30, cache_policy=NO_CACHE)
def run_round(manifest: str, command: str | None, modules: list[str]) -> dict[str, JsonValue]:
    """The round, to the end, with the command launcher (``command`` set; run in the worker's
    working directory) or in process. A retry resumes from ``work_dir``'s checkpoints
    (:func:`round_flow` sets how many)."""
    launcher: InProcessLauncher | CommandLauncher
    if command:
        launcher = CommandLauncher(CommandSettings(command=command), root=Path.cwd())
    else:
        launcher = InProcessLauncher(InProcessSettings(modules=modules))
    result = launcher.launch(Path(manifest))
    return {"checkpoint": str(result.checkpoint), "metrics": result.metrics}


@flow(name=ROUND_FLOW, description="One flywheel training round, run from its manifest.")
def round_flow(
    manifest: str,
    command: str | None = None,
    modules: list[str] | None = None,
    retries: int = 1,
    retry_delay_s: int = 30,
) -> dict[str, JsonValue]:
    """Run the round at ``manifest`` (a path the worker sees) on this worker.

    ``command``: a command template (see :class:`CommandSettings`) to run instead of the
    in-process runner; ``modules``: recipe modules to import first (see
    :class:`InProcessSettings`); ``retries``: attempts after a failure, each resuming from
    ``work_dir`` after ``retry_delay_s`` seconds. Returns the checkpoint and metrics.
    """
    logger = get_run_logger()
    round_ = load_round(manifest)
    logger.info(
        "round %s of cycle %s (%s, %s): %s -> %s",
        round_.round_id,
        round_.cycle_id,
        round_.track,
        round_.recipe,
        round_.base_checkpoint,
        round_.output_dir,
    )
    runner = run_round.with_options(retries=retries, retry_delay_seconds=retry_delay_s)
    result = runner(manifest, command, list(modules or []))
    logger.info("round %s finished: %s", round_.round_id, result["checkpoint"])
    return result


def deploy_round_flow(
    name: str,
    *,
    work_pool: str = "flywheel-gpu",
    command: str | None = None,
    modules: list[str] | None = None,
    retries: int = 1,
    job_variables: dict[str, Any] | None = None,
    concurrency_limit: int | None = None,
) -> str:
    """Register the deployment ``flywheel-round/<name>`` of :func:`round_flow` on
    ``work_pool`` (created as a ``process`` pool when missing) with the Prefect API in force;
    its name. Workers (``prefect worker start --pool <work_pool>``) run the installed
    package; the manifest's paths must be on storage they share with the cycle."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(work_pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=work_pool, type="process"))
    deployment = round_flow.to_deployment(
        name=name,
        work_pool_name=work_pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        parameters={"command": command, "modules": list(modules or []), "retries": retries},
        job_variables=job_variables,
        concurrency_limit=concurrency_limit,
        description="One flywheel training round from its manifest (flywheel.adapters.launchers).",
        tags=["flywheel"],
    )
    cast("RunnerDeployment", deployment).apply()
    return f"{ROUND_FLOW}/{name}"


# ---- Prefect ---------------------------------------------------------------------------------


class PrefectSettings(AdapterSettings):
    """``[launcher] adapter = "prefect"``: the round is a flow run of a deployment of
    :func:`round_flow` on a work pool (``PREFECT_API_URL`` names the server)."""

    deployment: str = Field(pattern=r"^[^/\s]+/[^/\s]+$")
    """The deployment, ``flywheel-round/<name>`` (:func:`deploy_round_flow`)."""
    timeout_s: float | None = Field(default=None, gt=0)
    """Longest the flow run may take, waiting in the pool included, in seconds; then it is
    cancelled and the round fails. None: no limit."""
    poll_s: float = Field(default=10.0, gt=0)
    """Seconds between two looks at the flow run's state."""
    cancel_grace_s: float = Field(default=60.0, ge=0)
    """After a timeout, seconds to wait for the cancelled flow run to stop before its output
    is moved aside."""
    job_variables: dict[str, JsonValue] = Field(default_factory=dict)
    """Work-pool job variables of each flow run, over the deployment's (``env``, ...)."""


def _api_problem(exc: Exception) -> str:
    url = PREFECT_API_URL.value() or "the ephemeral Prefect API"
    if isinstance(exc, PrefectHTTPStatusError):
        return f"the Prefect API at {url} answered {exc.response.status_code}"
    return f"the Prefect API at {url} cannot be reached ({type(exc).__name__}: {exc})"


_API_ERRORS = (httpx.HTTPError, PrefectHTTPStatusError, OSError)


class PrefectLauncher:
    """Starts a flow run of the deployment per round and waits for its end."""

    def __init__(self, settings: PrefectSettings) -> None:
        self.settings = settings

    def check(self) -> str:
        try:
            with get_client(sync_client=True) as client:
                deployment = client.read_deployment_by_name(self.settings.deployment)
        except ObjectNotFound:
            url = PREFECT_API_URL.value() or "the ephemeral Prefect API"
            raise PortError(
                "launcher",
                f"Prefect deployment {self.settings.deployment!r} does not exist at {url}",
            ) from None
        except _API_ERRORS as exc:
            raise PortError("launcher", _one_line(_api_problem(exc))) from None
        pool = deployment.work_pool_name or "no work pool"
        entry = deployment.entrypoint or "?"
        return (
            f"would run a flow run of {self.settings.deployment} ({entry}) on {pool} with "
            f"parameters {{'manifest': <manifest>}}"
        )

    def _record(self, round_: RoundManifest) -> Path:
        return Path(round_.work_dir) / PREFECT_RUN_FILE

    def _live_run(
        self, client: SyncPrefectClient, round_: RoundManifest, digest: str
    ) -> UUID | None:
        """The flow run an earlier launch of this manifest started and that is still going."""
        try:
            record = json.loads(self._record(round_).read_text(encoding="utf-8"))
            run_id = UUID(record["flow_run_id"])
            same = record.get("manifest_sha256") == digest
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not same or record.get("deployment") != self.settings.deployment:
            return None
        try:
            state = client.read_flow_run(run_id).state
        except ObjectNotFound:
            return None
        return run_id if state is not None and not state.is_final() else None

    def launch(self, manifest: Path) -> LaunchResult:
        round_, digest = _load(manifest)
        done = finished_round(round_, digest)
        if done is not None:
            return done
        deployment = self.settings.deployment
        try:
            with get_client(sync_client=True) as client:
                Path(round_.work_dir).mkdir(parents=True, exist_ok=True)
                run_id = self._live_run(client, round_, digest)
                if run_id is None:
                    _prepare(round_)
                    run_id = self._start(manifest.absolute(), round_, digest)
                else:
                    log.info("round %s: waiting again on flow run %s", round_.round_id, run_id)
                flow_run, timed_out = self._wait(client, run_id)
        except ObjectNotFound as exc:  # the flow run was deleted while waited on
            raise _failed(round_, f"its flow run of {deployment} vanished ({exc})") from None
        except _API_ERRORS as exc:  # the flow run may live on: a relaunch waits on it again
            raise PortError("launcher", _one_line(_api_problem(exc))) from None
        if timed_out:
            raise _failed(
                round_,
                f"flow run {run_id} of {deployment} did not end within "
                f"{self.settings.timeout_s:g} s and was cancelled",
            )
        state = flow_run.state
        if state is None or not state.is_completed():
            name = state.name if state is not None else "no state"
            message = f": {state.message}" if state is not None and state.message else ""
            inner = f"launcher: round {round_.round_id}: "  # the round's own PortError
            message = f": {message.split(inner, 1)[1]}" if inner in message else message
            raise _failed(
                round_,
                f"flow run {flow_run.name} ({flow_run.id}) of {deployment} ended {name}{message}",
            )
        done = finished_round(round_, digest)
        if done is not None:
            return done
        hint = " (is output_dir on storage the Prefect workers share?)"
        return _finish(round_, digest, launcher="prefect", hint=hint)

    def _start(self, manifest: Path, round_: RoundManifest, digest: str) -> UUID:
        """A new flow run of the deployment for ``manifest``, recorded in ``work_dir``."""
        try:
            started = run_deployment(
                self.settings.deployment,
                parameters={"manifest": str(manifest)},
                timeout=0,
                flow_run_name=f"cycle-{round_.cycle_id}-round-{round_.round_id}-{round_.track}",
                tags=["flywheel", f"cycle-{round_.cycle_id}", round_.recipe],
                job_variables=dict(self.settings.job_variables) or None,
            )
        except ObjectNotFound:
            url = PREFECT_API_URL.value() or "the ephemeral Prefect API"
            raise PortError(
                "launcher",
                f"Prefect deployment {self.settings.deployment!r} does not exist at {url}",
            ) from None
        flow_run = cast("FlowRun", started)
        record = {
            "flow_run_id": str(flow_run.id),
            "deployment": self.settings.deployment,
            "manifest_sha256": digest,
            "started_at": datetime.now(UTC).isoformat(),
        }
        atomic_write_text(self._record(round_), json.dumps(record, indent=2) + "\n")
        return flow_run.id

    def _poll(self, client: SyncPrefectClient, run_id: UUID, until: float | None) -> FlowRun:
        """The flow run, read every ``poll_s`` seconds until it is final or ``until`` passes;
        ten API failures in a row are raised."""
        misses = 0
        while True:
            try:
                flow_run = client.read_flow_run(run_id)
            except (httpx.TransportError, OSError):
                misses += 1
                if misses >= 10:
                    raise
            else:
                misses = 0
                final = flow_run.state is not None and flow_run.state.is_final()
                if final or (until is not None and time.monotonic() >= until):
                    return flow_run
            time.sleep(self.settings.poll_s)

    def _wait(self, client: SyncPrefectClient, run_id: UUID) -> tuple[FlowRun, bool]:
        """The flow run once final, and whether it ran past ``timeout_s`` (then it was
        cancelled and waited for ``cancel_grace_s`` more)."""
        timeout = self.settings.timeout_s
        flow_run = self._poll(
            client, run_id, None if timeout is None else time.monotonic() + timeout
        )
        if flow_run.state is not None and flow_run.state.is_final():
            return flow_run, False
        message = f"flywheel: the round did not end within {timeout} s"
        client.set_flow_run_state(run_id, Cancelling(message=message), force=True)
        return self._poll(client, run_id, time.monotonic() + self.settings.cancel_grace_s), True


def _build_prefect(settings: PrefectSettings, context: AdapterContext) -> PrefectLauncher:
    del context
    return PrefectLauncher(settings)


PREFECT: Adapter[PrefectSettings] = Adapter(
    settings=PrefectSettings,
    build=_build_prefect,
    summary="rounds run as Prefect flow runs of flywheel-round/<name> on a (GPU) work pool",
)
