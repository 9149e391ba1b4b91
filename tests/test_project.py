"""The project file, `flywheel init`, `flywheel doctor` and `flywheel models`: every port
filled by the adapter the file names, bad files refused in one line, the embedded world
when there is no file."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flywheel.adapters.base import AdapterContext
from flywheel.adapters.degrader import RULES, RulesDegraderSettings
from flywheel.cli.main import app
from flywheel.cli.project import TEAM_TEMPLATE
from flywheel.ports import (
    PORTS,
    CaptionDegrader,
    Corpus,
    ImageGenerator,
    Judge,
    PromptEnhancer,
    PromptSuites,
    RewardModel,
    Synthesizer,
    TrainingLauncher,
)
from flywheel.project import (
    PROJECT_ENV,
    ProjectError,
    build_part,
    find_project,
    load_project,
    read_project,
    world_project,
)

runner = CliRunner()

PROTOCOLS: dict[str, type] = {
    "generator": ImageGenerator,
    "judge": Judge,
    "suites": PromptSuites,
    "reward": RewardModel,
    "enhancer": PromptEnhancer,
    "corpus": Corpus,
    "degrader": CaptionDegrader,
    "synthesizer": Synthesizer,
    "launcher": TrainingLauncher,
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory with no project named by the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(PROJECT_ENV, raising=False)
    return tmp_path


def world_file(path: Path, **replace: str) -> Path:
    """``flywheel init --world``'s file at ``path``, with lines replaced."""
    result = runner.invoke(app, ["init", "--world", "--path", str(path)])
    assert result.exit_code == 0, result.output
    text = path.read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path.write_text(text)
    return path


def test_no_project_file_means_the_embedded_world(workdir: Path) -> None:
    assert find_project() is None
    project = load_project()
    assert project.is_world
    assert project.path is None


def test_the_world_project_fills_every_port_with_a_part_that_satisfies_its_protocol(
    workdir: Path,
) -> None:
    context = AdapterContext(root=workdir, home=workdir / "home")
    project = world_project()
    for port in PORTS:
        built = build_part(project, port, context)
        assert built is not None
        assert isinstance(built.part, PROTOCOLS[port]), port


def test_init_world_writes_a_commented_file_that_reads_back_as_the_world(workdir: Path) -> None:
    result = runner.invoke(app, ["init", "--world"])
    assert result.exit_code == 0, result.output
    text = (workdir / "flywheel.toml").read_text()
    assert text.startswith("# flywheel project file")
    assert find_project() == workdir / "flywheel.toml"
    project = load_project()
    assert project.is_world
    assert project.path == (workdir / "flywheel.toml").resolve()


def test_init_refuses_to_overwrite_and_needs_exactly_one_kind(workdir: Path) -> None:
    assert runner.invoke(app, ["init", "--world"]).exit_code == 0
    again = runner.invoke(app, ["init", "--world"])
    assert again.exit_code == 2
    assert "exists" in again.output
    assert runner.invoke(app, ["init"]).exit_code == 2
    assert runner.invoke(app, ["init", "--world", "--diffusers", "x"]).exit_code == 2


def test_init_diffusers_refuses_a_directory_that_is_not_a_pipeline(workdir: Path) -> None:
    (workdir / "weights").mkdir()
    result = runner.invoke(app, ["init", "--diffusers", "weights"])
    assert result.exit_code == 2
    assert "model_index.json" in result.output
    assert not (workdir / "flywheel.toml").exists()


def test_init_diffusers_names_the_pipeline_and_team_adapters(workdir: Path) -> None:
    pipeline = workdir / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    result = runner.invoke(app, ["init", "--diffusers", "pipeline", "--name", "team"])
    assert result.exit_code == 0, result.output
    project = read_project(workdir / "flywheel.toml")
    assert project.project.name == "team"
    assert not project.is_world
    assert project.generator.adapter == "diffusers"
    assert project.generator.settings()["path"] == pipeline.resolve().as_posix()
    assert {project.section(p).adapter for p in ("judge", "corpus", "launcher")} == {  # type: ignore[union-attr]
        "http",
        "directory",
        "command",
    }
    assert project.synthesizer is None  # optional, left out
    assert "{manifest}" in TEAM_TEMPLATE.format(name="x", generator="y")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("[generator\nadapter = 1", "not TOML"),
        ('[project]\nname = "x"\n', "no [generator], [judge]"),
        ("[nonsense]\n", "unknown table(s) nonsense"),
    ],
)
def test_a_broken_project_file_is_refused_in_one_line(
    workdir: Path, content: str, reason: str
) -> None:
    (workdir / "flywheel.toml").write_text(content)
    with pytest.raises(ProjectError, match=r"flywheel\.toml: ") as raised:
        load_project()
    assert reason in str(raised.value)
    assert "\n" not in str(raised.value)
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 2
    assert reason in result.output


def test_an_unknown_adapter_name_is_refused_with_the_known_names(workdir: Path) -> None:
    world_file(
        workdir / "flywheel.toml",
        **{
            'adapter = "world"        # the ground-truth': (
                'adapter = "gpt-judge"  # the ground-truth'
            )
        },
    )
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 2
    assert "[judge] adapter 'gpt-judge' is unknown (known: http, vlm, world)" in result.output


def test_a_project_named_by_the_environment_must_exist(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PROJECT_ENV, str(workdir / "elsewhere.toml"))
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 2
    assert "elsewhere.toml: no such project file" in result.output


def test_an_adapter_setting_that_is_wrong_is_named_by_doctor(workdir: Path) -> None:
    world_file(
        workdir / "flywheel.toml",
        **{"train = 1500": "train = -3\ntrian = 4"},
    )
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert lines[0].startswith("error: [corpus] world: [corpus] world: train:")
    assert "trian: Extra inputs are not permitted" in lines[0]


def test_a_generator_directory_of_the_wrong_format_fails_doctor_and_the_rest_still_pass(
    workdir: Path,
) -> None:
    (workdir / "not-a-generator").mkdir()
    world_file(
        workdir / "flywheel.toml",
        **{
            'adapter = "world"        # the shipped world base': (
                'adapter = "flywheel"\npath = "not-a-generator"'
            )
        },
    )
    result = runner.invoke(app, ["doctor", "--project", str(workdir / "flywheel.toml")])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: [generator] flywheel: generator: {workdir / 'not-a-generator'}: not a generator "
        "directory"
    ]
    # The judge and the reward were still asked (about a plain image), and answered.
    assert "judge" in result.output
    assert result.output.count(" ok ") >= 7


def test_doctor_on_the_embedded_world_passes_every_part(workdir: Path) -> None:
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "no project file: the embedded world" in result.output
    for port in PORTS:
        assert port in result.output
    assert "failed" not in result.output


def test_the_rules_degrader_shortens_rich_captions_into_user_words() -> None:
    degrader = RULES.build(
        RulesDegraderSettings(synonyms={"purple": ["violet"]}, max_words=6),
        AdapterContext(root=Path.cwd(), home=Path.cwd()),
    )
    rich = (
        "A picture with a white background showing a large purple triangle at the middle "
        "left; two small red circles at the top right. The triangle is left of the circles."
    )
    assert degrader.degrade([rich], seed=0) == ["a violet triangle"]
    assert degrader.degrade([rich, rich], seed=1) == degrader.degrade([rich, rich], seed=1)


@pytest.fixture
def cli_database(create_database: Callable[[], str], use_database: Callable[[str], None]) -> str:
    url = create_database()
    use_database(url)
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    return url


def test_models_register_makes_a_teams_model_the_serving_one(
    cli_database: str, workdir: Path
) -> None:
    from flywheel.world.evaluation import BASE_MODEL

    result = runner.invoke(
        app,
        ["models", "register", "team-v1", "--generator", str(BASE_MODEL), "--description", "ours"],
    )
    assert result.exit_code == 0, result.output
    assert "team-v1" in result.output
    assert "serving" in result.output
    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.output.splitlines() if "team-v1" in line)
    assert "yes" in row
    shown = runner.invoke(app, ["models", "show", "team-v1"])
    assert shown.exit_code == 0, shown.output
    for component in ("generator", "enhancer", "reward"):
        assert component in shown.output
    again = runner.invoke(app, ["models", "register", "team-v1", "--generator", str(BASE_MODEL)])
    assert again.exit_code == 2
    assert "already registered" in again.output
    missing = runner.invoke(app, ["models", "show", "nope"])
    assert missing.exit_code == 2
    gone = runner.invoke(app, ["models", "register", "v2", "--generator", str(workdir / "no")])
    assert gone.exit_code == 2
    assert "is missing" in gone.output


class _GarbageJudge(BaseHTTPRequestHandler):
    """A judge service that answers every request with something that is not JSON."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b"<html>upstream error</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def garbage_judge() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GarbageJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/judge"
    server.shutdown()
    server.server_close()


def _doctor_errors(path: Path) -> list[str]:
    result = runner.invoke(app, ["doctor", "--project", str(path)])
    assert result.exit_code == 2, result.output
    return [line for line in result.output.splitlines() if line.startswith("error:")]


JUDGE_LINE = 'adapter = "world"        # the ground-truth evaluator'
CORPUS_LINE = 'adapter = "world"        # the base\'s training corpus and candidate pool'
LAUNCHER_LINE = 'adapter = "in_process"   # rounds train in the cycle\'s process'


def test_doctor_names_a_judge_that_is_down(workdir: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = world_file(
        workdir / "flywheel.toml",
        **{JUDGE_LINE: f'adapter = "http"\nurl = "http://127.0.0.1:{port}/judge"\nretries = 0'},
    )
    [line] = _doctor_errors(path)
    assert line.startswith("error: [judge] http: judge: ")
    assert f"127.0.0.1:{port}" in line


def test_doctor_names_a_judge_that_answers_garbage(workdir: Path, garbage_judge: str) -> None:
    path = world_file(
        workdir / "flywheel.toml", **{JUDGE_LINE: f'adapter = "http"\nurl = "{garbage_judge}"'}
    )
    [line] = _doctor_errors(path)
    assert line.startswith("error: [judge] http: judge: ")
    assert "not JSON" in line or "not json" in line


def test_doctor_names_a_missing_corpus_directory(workdir: Path) -> None:
    path = world_file(
        workdir / "flywheel.toml",
        **{
            CORPUS_LINE: 'adapter = "directory"\npath = "data/nowhere"',
            "train = 1500\n": "",
            "pool = 2000\n": "",
        },
    )
    [line] = _doctor_errors(path)
    assert line.startswith("error: [corpus] directory: corpus: ")
    assert "data/nowhere" in line


def test_doctor_names_a_launcher_command_that_cannot_run(workdir: Path) -> None:
    path = world_file(
        workdir / "flywheel.toml",
        **{
            LAUNCHER_LINE: (
                'adapter = "command"\ncommand = "no-such-trainer --manifest {manifest}"'
            )
        },
    )
    [line] = _doctor_errors(path)
    assert line.startswith("error: [launcher] command: launcher: ")
    assert "no-such-trainer" in line
