"""The launchers: a round run from its manifest by a command, in process, or as a Prefect flow
run on a real work pool — success, failure (nothing left that looks like a checkpoint),
timeout, and resume after the round already finished."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import JsonValue, ValidationError

from flywheel.adapters.base import AdapterContext
from flywheel.adapters.launchers import (
    COMMAND,
    DONE_MARKER,
    IN_PROCESS,
    LOG_FILE,
    PREFECT,
    RECIPE_RUNNERS,
    CommandLauncher,
    CommandSettings,
    InProcessLauncher,
    InProcessSettings,
    PrefectLauncher,
    PrefectSettings,
    deploy_round_flow,
    read_manifest,
    write_manifest,
)
from flywheel.ports import LaunchResult, PortError, RoundManifest, TrainingLauncher
from flywheel.project import adapter_for

TRAIN_SCRIPT = """
import json, os, signal, subprocess, sys, time
from pathlib import Path

args = sys.argv[1:]
path = Path(args[args.index("--manifest") + 1])
manifest = json.loads(path.read_text())
mode = args[args.index("--mode") + 1]
work = path.parent / manifest["work_dir"]  # relative paths: to the manifest's directory
runs = work / "runs"
runs.write_text(str(int(runs.read_text()) + 1 if runs.exists() else 1))
out = path.parent / manifest["output_dir"]
out.mkdir(parents=True, exist_ok=True)
(out / "weights.bin").write_bytes(b"half a checkpoint")
print("step 1 of 2", flush=True)
if mode == "exit3":
    print("RuntimeError: CUDA out of memory", flush=True)
    sys.exit(3)
if mode == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "sleep":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (work / "child.pid").write_text(str(child.pid))
    time.sleep(60)
if mode == "empty":
    (out / "weights.bin").unlink()
    sys.exit(0)
(out / "weights.bin").write_bytes(b"the whole checkpoint")
(out / "metrics.json").write_text(json.dumps({"loss": 0.25, "flavour": os.environ["FLAVOUR"]}))
print("step 2 of 2: done", flush=True)
"""


def _manifest(root: Path, **changes: object) -> Path:
    fields: dict[str, object] = {
        "round_id": 7,
        "cycle_id": 3,
        "track": "rl",
        "recipe": "flow_grpo",
        "base_checkpoint": "base",
        "artefacts": {"preferences": "prefs.jsonl"},
        "budget": {"flow_grpo": 2},
        "output_dir": "out/generator",
        "work_dir": "work",
    }
    return write_manifest(root / "manifest.json", RoundManifest.model_validate(fields | changes))


def _command(root: Path, mode: str, **settings: object) -> CommandLauncher:
    (root / "train.py").write_text(TRAIN_SCRIPT)
    config: dict[str, object] = {
        "command": f"{{python}} train.py --manifest {{manifest}} --mode {mode}",
        "env": {"FLAVOUR": "vanilla"},
        **settings,
    }
    launcher = COMMAND.build(
        COMMAND.settings.model_validate(config), AdapterContext(root=root, home=root / "home")
    )
    assert isinstance(launcher, CommandLauncher)
    return launcher


def _runs(root: Path) -> int:
    return int((root / "work" / "runs").read_text())


def _moved_aside(root: Path) -> list[Path]:
    return sorted((root / "out").glob("generator.failed-*"))


# ---- the manifest ----------------------------------------------------------------------------


def test_a_manifest_reads_back_with_its_relative_paths_resolved_against_its_directory(
    tmp_path: Path,
) -> None:
    path = _manifest(tmp_path, base_checkpoint="/models/base", settings={"lr": 1e-4})
    manifest = read_manifest(path)
    assert manifest.base_checkpoint == "/models/base"
    assert manifest.artefacts == {"preferences": str(tmp_path / "prefs.jsonl")}
    assert manifest.output_dir == str(tmp_path / "out/generator")
    assert manifest.work_dir == str(tmp_path / "work")
    assert manifest.settings == {"lr": 1e-4}
    assert json.loads(path.read_text())["format"] == "flywheel-round/1"


def test_a_manifest_that_is_missing_or_not_json_or_incomplete_is_a_launcher_error(
    tmp_path: Path,
) -> None:
    with pytest.raises(PortError, match=r"^launcher: .*nothing\.json: cannot be read"):
        read_manifest(tmp_path / "nothing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PortError, match=r"bad\.json: not a round manifest \(\(file\): Invalid"):
        read_manifest(tmp_path / "bad.json")
    (tmp_path / "short.json").write_text(json.dumps({"round_id": 1}))
    with pytest.raises(PortError, match=r"short\.json: not a round manifest \(cycle_id: Field"):
        read_manifest(tmp_path / "short.json")


# ---- command ---------------------------------------------------------------------------------


def test_a_command_round_returns_its_checkpoint_and_metrics_and_logs_its_output(
    tmp_path: Path,
) -> None:
    launcher = _command(tmp_path, "ok")
    assert isinstance(launcher, TrainingLauncher)
    result = launcher.launch(_manifest(tmp_path))
    output = tmp_path / "out" / "generator"
    assert result == LaunchResult(checkpoint=output, metrics={"loss": 0.25, "flavour": "vanilla"})
    assert (output / "weights.bin").read_bytes() == b"the whole checkpoint"
    assert json.loads((output / DONE_MARKER).read_text())["launcher"] == "command"
    log = (tmp_path / "work" / LOG_FILE).read_text()
    assert f"{sys.executable} train.py --manifest {tmp_path / 'manifest.json'}" in log
    assert "step 2 of 2: done" in log


def test_a_finished_round_is_returned_again_without_running_it_again(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    first = _command(tmp_path, "ok").launch(manifest)
    second = _command(tmp_path, "exit3").launch(manifest)  # would fail if it ran
    assert second == first
    assert _runs(tmp_path) == 1


def test_a_command_that_exits_non_zero_fails_with_its_code_and_last_log_line(
    tmp_path: Path,
) -> None:
    manifest = _manifest(tmp_path)
    with pytest.raises(PortError) as failed:
        _command(tmp_path, "exit3").launch(manifest)
    message = str(failed.value)
    assert message.startswith("launcher: round 7: python")
    assert "exited with code 3" in message
    assert "last line: RuntimeError: CUDA out of memory" in message
    assert "\n" not in message
    # The half-written output is out of the way, the work directory kept.
    assert not (tmp_path / "out" / "generator").exists()
    (aside,) = _moved_aside(tmp_path)
    assert f"partial output moved to {aside}" in message
    assert (aside / "weights.bin").read_bytes() == b"half a checkpoint"
    assert (tmp_path / "work" / "runs").is_file()
    # Fixed, it runs again (a failure is not a finished round).
    result = _command(tmp_path, "ok").launch(manifest)
    assert result.metrics["loss"] == 0.25
    assert _runs(tmp_path) == 2


def test_a_command_killed_midway_leaves_no_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(PortError, match=r"killed by SIGKILL .*last line: step 1 of 2"):
        _command(tmp_path, "sigkill").launch(_manifest(tmp_path))
    assert not (tmp_path / "out" / "generator").exists()
    assert len(_moved_aside(tmp_path)) == 1


def test_a_command_past_its_timeout_is_stopped_with_its_whole_process_group(
    tmp_path: Path,
) -> None:
    launcher = _command(tmp_path, "sleep", timeout_s=1.5, kill_grace_s=1)
    started = time.monotonic()
    with pytest.raises(PortError, match=r"python timed out after 1\.5 s"):
        launcher.launch(_manifest(tmp_path))
    assert time.monotonic() - started < 10
    child = int((tmp_path / "work" / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    assert not (tmp_path / "out" / "generator").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as stopped.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_a_command_that_ends_well_without_a_checkpoint_fails(tmp_path: Path) -> None:
    with pytest.raises(PortError, match=r"ended well but wrote no checkpoint into"):
        _command(tmp_path, "empty").launch(_manifest(tmp_path))
    assert not (tmp_path / "out" / "generator").exists()


def test_a_dead_attempts_output_is_moved_aside_before_the_round_runs(tmp_path: Path) -> None:
    stale = tmp_path / "out" / "generator"
    stale.mkdir(parents=True)
    (stale / "weights.bin").write_bytes(b"from a crashed attempt")
    result = _command(tmp_path, "ok").launch(_manifest(tmp_path))
    assert (result.checkpoint / "weights.bin").read_bytes() == b"the whole checkpoint"
    (aside,) = _moved_aside(tmp_path)
    assert (aside / "weights.bin").read_bytes() == b"from a crashed attempt"


def test_another_rounds_finished_checkpoint_is_refused_not_returned(tmp_path: Path) -> None:
    _command(tmp_path, "ok").launch(_manifest(tmp_path))
    other = _manifest(tmp_path, round_id=8)  # the same output_dir, another round
    with pytest.raises(PortError, match=r"holds the finished checkpoint of another round"):
        _command(tmp_path, "ok").launch(other)
    assert _runs(tmp_path) == 1


def test_check_says_what_would_run_and_refuses_what_cannot(tmp_path: Path) -> None:
    ok = _command(tmp_path, "ok", timeout_s=3600)
    said = ok.check()
    assert said.startswith(f"would run: {sys.executable} train.py --manifest '<manifest>'")
    assert "timeout 3600 s" in said
    context = AdapterContext(root=tmp_path, home=tmp_path)
    missing = CommandSettings(command="no-such-trainer-xyz --manifest {manifest}")
    with pytest.raises(PortError, match=r"'no-such-trainer-xyz': not found on PATH"):
        COMMAND.build(missing, context).check()
    with pytest.raises(PortError, match=r"not found on PATH"):
        COMMAND.build(missing, context).launch(_manifest(tmp_path))
    relative = CommandSettings(command="./train.sh {manifest}")
    with pytest.raises(PortError, match=r"train\.sh: no such executable file"):
        COMMAND.build(relative, context).check()
    with pytest.raises(ValidationError, match=r"does not pass \{manifest\}"):
        CommandSettings(command="torchrun train.py")
    with pytest.raises(ValidationError, match=r"names \{gpus\}"):
        CommandSettings(command="torchrun --nproc_per_node={gpus} train.py {manifest}")
    with pytest.raises(ValidationError, match=r"cannot be split"):
        CommandSettings(command="train 'unclosed {manifest}")
    assert adapter_for("launcher", "command") is COMMAND


# ---- in process ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def enhancer_round(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random enhancer and terse -> caption pairs: a pe_sft round's inputs."""
    from model.prompt_enhancer import build_pe_debug
    from training.pe_sft import write_pairs

    root = tmp_path_factory.mktemp("pe-round")
    build_pe_debug(root / "base")
    pairs = [(f"{c} {t}", f"A {c} {t}.") for c in ("red", "blue", "green") for t in ("boat", "owl")]
    write_pairs(root / "pairs.jsonl", pairs)
    return root


def _pe_manifest(root: Path, steps: int, **changes: object) -> Path:
    from training.pe_sft import DEBUG_SYSTEM_PROMPT

    settings: dict[str, JsonValue] = {
        "lr": 3e-3,
        "batch_size": 8,
        "max_length": 128,
        "system_prompt": DEBUG_SYSTEM_PROMPT,
    }
    fields: dict[str, object] = {
        "round_id": 1,
        "cycle_id": 1,
        "track": "prompt_enhancer",
        "recipe": "pe_sft",
        "base_checkpoint": str(root / "base"),
        "artefacts": {"pairs": str(root / "pairs.jsonl")},
        "budget": {"pe_sft": steps},
        "settings": settings,
        "output_dir": "out/enhancer",
        "work_dir": "work",
    }
    manifest = RoundManifest.model_validate(fields | changes)
    return write_manifest(root / f"round-{manifest.round_id}" / "manifest.json", manifest)


def test_an_in_process_pe_sft_round_trains_the_enhancer_and_its_loss_falls(
    enhancer_round: Path,
) -> None:
    from model.prompt_enhancer import PromptEnhancer, PromptEnhancerConfig
    from training.pe_sft import DEBUG_SYSTEM_PROMPT

    launcher = IN_PROCESS.build(InProcessSettings(), AdapterContext(root=Path("/"), home=Path("/")))
    assert isinstance(launcher, TrainingLauncher)
    assert "pe_sft" in launcher.check()
    manifest = _pe_manifest(enhancer_round, steps=16)
    result = launcher.launch(manifest)
    metrics = result.metrics
    assert result.checkpoint == manifest.parent / "out" / "enhancer"
    assert metrics["steps"] == 16
    assert isinstance(metrics["loss_first_mean"], float)
    assert isinstance(metrics["loss_last_mean"], float)
    assert metrics["loss_last_mean"] < metrics["loss_first_mean"] - 1.0
    assert json.loads((result.checkpoint / "metrics.json").read_text()) == metrics
    config = PromptEnhancerConfig(
        path=result.checkpoint, system_prompt_t2i=DEBUG_SYSTEM_PROMPT, max_new_tokens=12
    )
    (rewrite,) = PromptEnhancer.load(config).rewrite(["red owl"])
    assert rewrite.text.startswith("A ")  # what the pairs taught; the random base writes noise
    # Launched again: the finished round, not another one.
    weights = {p.name: p.stat().st_mtime_ns for p in result.checkpoint.iterdir()}
    assert launcher.launch(manifest) == result
    assert {p.name: p.stat().st_mtime_ns for p in result.checkpoint.iterdir()} == weights


def test_an_in_process_runner_that_raises_fails_the_round_and_moves_its_output_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_then_boom(manifest: RoundManifest) -> dict[str, JsonValue]:
        out = Path(manifest.output_dir)
        out.mkdir(parents=True)
        (out / "weights.bin").write_bytes(b"half")
        raise RuntimeError("NaN loss at step 5")

    monkeypatch.setitem(RECIPE_RUNNERS, "flow_grpo", half_then_boom)
    launcher = InProcessLauncher()
    with pytest.raises(PortError) as failed:
        launcher.launch(_manifest(tmp_path))
    assert str(failed.value).startswith(
        "launcher: round 7: flow_grpo failed in process: RuntimeError: NaN loss at step 5"
    )
    assert not (tmp_path / "out" / "generator").exists()
    assert len(_moved_aside(tmp_path)) == 1
    assert "NaN loss at step 5" in (tmp_path / "work" / LOG_FILE).read_text()


def test_a_recipe_with_no_in_process_runner_is_a_launcher_error(tmp_path: Path) -> None:
    with pytest.raises(PortError, match=r"no in-process runner for recipe 'flow_grpo'"):
        InProcessLauncher().launch(_manifest(tmp_path))
    with pytest.raises(PortError, match=r"recipe module 'no_such_recipes_xyz'"):
        InProcessLauncher(InProcessSettings(modules=["no_such_recipes_xyz"]))


# ---- Prefect ---------------------------------------------------------------------------------

POOL = "flywheel-test-gpu"


@pytest.fixture(scope="module")
def round_deployment(prefect_api: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``flywheel-round/test`` on a process work pool, and a real worker polling it."""
    name = deploy_round_flow("test", work_pool=POOL, retries=0)
    log = (tmp_path_factory.mktemp("worker") / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process"],
        env={
            **os.environ,
            "PREFECT_API_URL": prefect_api,
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        },
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    yield name
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    log.close()


def _flow_runs(deployment: str) -> int:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        return sum(r.deployment_id == deployment_id for r in client.read_flow_runs())


def test_a_prefect_round_runs_as_a_flow_run_on_a_work_pool_worker(
    round_deployment: str, enhancer_round: Path
) -> None:
    settings = PREFECT.settings.model_validate({"deployment": round_deployment, "poll_s": 0.5})
    launcher = PREFECT.build(settings, AdapterContext(root=Path("/"), home=Path("/")))
    assert isinstance(launcher, TrainingLauncher)
    said = launcher.check()
    assert "flywheel.adapters.launchers.round_flow" in said
    assert POOL in said
    settings = settings.model_copy(update={"timeout_s": 120.0})
    manifest = _pe_manifest(enhancer_round, steps=2, round_id=2)
    result = PrefectLauncher(settings).launch(manifest)
    assert result.checkpoint == manifest.parent / "out" / "enhancer"
    assert result.metrics["steps"] == 2
    assert json.loads((result.checkpoint / DONE_MARKER).read_text())["launcher"] == "in_process"
    assert (result.checkpoint / "config.json").is_file()
    assert _flow_runs(round_deployment) == 1
    # Launched again: the finished checkpoint, no second flow run.
    assert launcher.launch(manifest) == result
    assert _flow_runs(round_deployment) == 1


def test_a_failed_prefect_flow_run_is_a_launcher_error_and_leaves_no_checkpoint(
    round_deployment: str, tmp_path: Path
) -> None:
    # The flow's command branch: the worker runs a command that writes half, then exits 3.
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT)
    command = f"{{python}} {tmp_path / 'train.py'} --manifest {{manifest}} --mode exit3"
    deployment = deploy_round_flow("test-command", work_pool=POOL, command=command, retries=0)
    settings = PrefectSettings(deployment=deployment, poll_s=0.5, timeout_s=120)
    with pytest.raises(PortError) as failed:
        PrefectLauncher(settings).launch(_manifest(tmp_path))
    message = str(failed.value)
    assert message.startswith("launcher: round 7: flow run cycle-3-round-7-rl")
    assert f"of {deployment} ended Failed" in message
    # The reason the flow run gave: the worker's command launcher's own line.
    assert "ended Failed: python exited with code 3" in message
    assert "last line: RuntimeError: CUDA out of memory" in message
    assert not (tmp_path / "out" / "generator").exists()
    (aside,) = _moved_aside(tmp_path)
    assert (aside / "weights.bin").read_bytes() == b"half a checkpoint"
    assert _runs(tmp_path) == 1


def test_a_missing_prefect_deployment_fails_the_check_and_the_launch(
    prefect_api: str, enhancer_round: Path
) -> None:
    launcher = PrefectLauncher(PrefectSettings(deployment="flywheel-round/nope"))
    with pytest.raises(PortError, match=r"deployment 'flywheel-round/nope' does not exist at http"):
        launcher.check()
    with pytest.raises(PortError, match=r"does not exist"):
        launcher.launch(_pe_manifest(enhancer_round, steps=2, round_id=4))
    with pytest.raises(ValidationError, match=r"deployment"):
        PrefectSettings(deployment="no-slash")
    assert prefect_api
