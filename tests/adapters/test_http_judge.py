"""The HTTP judge against a real ``flywheel-judge/1`` service on 127.0.0.1.

The service (:class:`ColourJudgeService`, ``http.server`` in a thread, an ephemeral port)
judges for real: an element naming a colour passes when the image's mean colour is that
colour. Its paths misbehave on purpose: ``/flaky`` answers 503 once, ``/slow`` sleeps past
any timeout, ``/garbage`` answers HTML, and so on (see :meth:`Handler.do_POST`).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from flywheel.adapters.base import AdapterContext
from flywheel.adapters.http_judge import JUDGE, PROTOCOL, HttpJudge, HttpJudgeSettings
from flywheel.ports import Judge, JudgeRequest, PortError
from flywheel.project import adapter_for

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


def colour_verdicts(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The service's real judgment: each element (the spec's, else the prompt) that names a
    colour scores how close the image's mean colour is to it."""
    png = base64.b64decode(item["image_png"], validate=True)
    with Image.open(io.BytesIO(png)) as decoded:
        pixels = torch.tensor(numpy.array(decoded.convert("RGB")), dtype=torch.float32)
    mean = pixels.reshape(-1, 3).mean(dim=0) / 255
    spec = item.get("spec") or {}
    elements = spec.get("elements") or [item["prompt"]]
    verdicts = []
    for element in elements:
        named = [c for c in COLOURS if c in element]
        if not named:
            verdicts.append({"element": element, "passed": False, "score": 0.0, "reason": "?"})
            continue
        target = torch.tensor(COLOURS[named[0]])
        score = float(1 - (mean - target).abs().mean())
        verdicts.append(
            {
                "element": element,
                "passed": score >= 0.75,
                "score": round(score, 6),
                "reason": f"mean colour {[round(float(v), 3) for v in mean]}",
            }
        )
    return verdicts


@dataclass
class ServiceState:
    """What the service saw, and the event that wakes its sleeping handlers at teardown."""

    bodies: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    flaky_failures_left: int = 1
    errors: list[str] = field(default_factory=list)
    """Tracebacks of the service's own failures (a bug of the test, asserted empty)."""
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths(self) -> list[str]:
        with self.lock:
            return [path for path, _ in self.bodies]


class Handler(BaseHTTPRequestHandler):
    """One request to the colour judge service."""

    server: ColourJudgeService

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read :class:`ServiceState`."""

    def _send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up (a timeout test): nothing to answer
            pass

    def _json(self, status: int, data: object, **headers: str) -> None:
        self._send(status, json.dumps(data).encode(), "application/json", **headers)

    def do_POST(self) -> None:
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with state.lock:
            state.bodies.append((self.path, body))
            state.headers.append(dict(self.headers))
        if body.get("protocol") != PROTOCOL:
            self._json(400, {"error": f"unknown protocol {body.get('protocol')!r}"})
            return
        verdicts = [{"id": item["id"], "elements": colour_verdicts(item)} for item in body["items"]]
        answer = {"protocol": PROTOCOL, "verdicts": verdicts}
        path = self.path
        if path == "/judge":
            self._json(200, {**answer, "verdicts": verdicts[::-1], "model": "colour-mean"})
        elif path == "/flaky":
            with state.lock:
                fail = state.flaky_failures_left > 0
                state.flaky_failures_left -= 1
            if fail:
                self._json(503, {"error": "warming up"}, Retry_After="0")
            else:
                self._json(200, answer)
        elif path == "/down-for-good":
            self._json(503, {"error": "GPU out of memory"})
        elif path == "/slow":
            state.stop.wait(10)
            self._json(200, answer)
        elif path == "/garbage":
            self._send(200, b"<html><body>Welcome to nginx!</body></html>", "text/html")
        elif path == "/wrong-shape":
            self._json(200, {"protocol": PROTOCOL, "results": verdicts})
        elif path == "/wrong-types":
            for verdict in verdicts:
                for element in verdict["elements"]:
                    element["passed"] = "yes"
            self._json(200, answer)
        elif path == "/wrong-count":
            self._json(200, {**answer, "verdicts": verdicts[:-1]})
        elif path == "/unknown-id":
            self._json(200, {**answer, "verdicts": [*verdicts[1:], {**verdicts[0], "id": "x9"}]})
        elif path == "/bad-score":
            verdicts[0]["elements"][0]["score"] = 1.5
            self._json(200, answer)
        elif path == "/v2":
            self._json(200, {**answer, "protocol": "flywheel-judge/2"})
        elif path == "/bad-request":
            self._json(400, {"error": "spec.elements must be a list\nof strings"})
        elif path == "/auth":
            if self.headers.get("Authorization") == "Bearer s3cret":
                self._json(200, answer)
            else:
                self._json(401, {"error": "bad token"})
        else:
            self._json(404, {"error": f"no {path}"})


class ColourJudgeService(ThreadingHTTPServer):
    """The service: a threading HTTP server with its :class:`ServiceState`."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = ServiceState()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Keep the traceback for the fixture to fail on (a client would just retry)."""
        with self.state.lock:
            self.state.errors.append(traceback.format_exc())

    def url(self, path: str) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}{path}"


@pytest.fixture
def service() -> Iterator[ColourJudgeService]:
    server = ColourJudgeService()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.state.stop.set()
    server.shutdown()
    server.server_close()
    thread.join(5)
    assert server.state.errors == []


def judge_at(url: str, **settings: Any) -> HttpJudge:
    """The adapter's judge for ``url``, built as the project file would build it."""
    context = AdapterContext(root=Path.cwd(), home=Path.cwd())
    built: HttpJudge = JUDGE.build(HttpJudgeSettings(url=url, **settings), context)
    return built


def solid(colour: tuple[float, float, float], size: int = 8) -> torch.Tensor:
    return torch.tensor(colour).view(3, 1, 1).expand(3, size, size).clone()


def requests_of(*colours: str) -> list[JudgeRequest]:
    """One request per colour: a solid image of it, asking for a red square and a shape of
    that colour."""
    return [
        JudgeRequest(
            prompt=f"a {name} square",
            image=solid(COLOURS[name]),
            spec={"elements": ["a red square", f"a {name} square"]},
        )
        for name in colours
    ]


def port_error(call: Any) -> str:
    """The one-line message of the :class:`PortError` ``call()`` raises."""
    with pytest.raises(PortError) as caught:
        call()
    assert caught.value.port == "judge"
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_batch_gets_one_verdict_per_image_in_order_from_the_services_judgment(
    service: ColourJudgeService,
) -> None:
    judge = judge_at(service.url("/judge"))
    assert isinstance(judge, Judge)

    verdicts = judge.judge(requests_of("red", "blue", "green"))

    assert [[e.element for e in v.elements] for v in verdicts] == [
        ["a red square", "a red square"],
        ["a red square", "a blue square"],
        ["a red square", "a green square"],
    ]
    assert [[e.passed for e in v.elements] for v in verdicts] == [
        [True, True],
        [False, True],
        [False, True],
    ]
    assert verdicts[0].passed
    assert not verdicts[1].passed
    assert verdicts[0].elements[0].score == pytest.approx(1.0)
    assert verdicts[1].elements[0].score == pytest.approx(1 / 3, abs=1e-5)
    assert verdicts[2].elements[1].reason.startswith("mean colour")
    assert judge.judge([]) == []
    assert service.state.paths() == ["/judge"]


def test_requests_go_in_batches_of_batch_size_with_unique_ids_and_verdicts_keep_the_order(
    service: ColourJudgeService,
) -> None:
    colours = ["red", "green", "blue", "blue", "red"]
    verdicts = judge_at(service.url("/judge"), batch_size=2).judge(requests_of(*colours))

    assert [v.elements[1].element for v in verdicts] == [f"a {c} square" for c in colours]
    assert [v.elements[0].passed for v in verdicts] == [c == "red" for c in colours]
    sent = [[item["id"] for item in body["items"]] for _, body in service.state.bodies]
    assert sent == [["0", "1"], ["2", "3"], ["4"]]


def test_the_request_carries_the_protocol_prompt_spec_and_a_lossless_png_of_the_image(
    service: ColourJudgeService,
) -> None:
    image = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    request = JudgeRequest(prompt="noise", image=image, spec={"elements": ["red"], "n": 2})
    judge_at(service.url("/judge"), headers={"X-Team": "vision"}).judge([request])

    ((_, body),) = service.state.bodies
    assert body["protocol"] == PROTOCOL
    (item,) = body["items"]
    assert item["prompt"] == "noise"
    assert item["spec"] == {"elements": ["red"], "n": 2}
    assert "image_uri" not in item
    with Image.open(io.BytesIO(base64.b64decode(item["image_png"]))) as png:
        assert png.format == "PNG"
        assert png.size == (7, 5)
        decoded = torch.tensor(numpy.array(png), dtype=torch.float32).permute(2, 0, 1)
    assert torch.equal(decoded, (image * 255).round())
    (headers,) = service.state.headers
    assert headers["X-Team"] == "vision"
    assert headers["Content-Type"] == "application/json"

    no_spec = JudgeRequest(prompt="a red dot", image=solid(COLOURS["red"]))
    (verdict,) = judge_at(service.url("/judge")).judge([no_spec])
    assert service.state.bodies[-1][1]["items"][0]["spec"] is None
    assert [e.element for e in verdict.elements] == ["a red dot"]


def test_a_transient_503_is_retried_after_a_backoff_and_then_succeeds(
    service: ColourJudgeService,
) -> None:
    judge = judge_at(service.url("/flaky"), retries=2, backoff_s=0.05)

    (verdict,) = judge.judge(requests_of("red"))

    assert verdict.passed
    assert service.state.paths() == ["/flaky", "/flaky"]


def test_a_service_that_keeps_answering_5xx_is_a_port_error_after_its_retries(
    service: ColourJudgeService,
) -> None:
    judge = judge_at(service.url("/down-for-good"), retries=2, backoff_s=0.01)

    message = port_error(lambda: judge.judge(requests_of("red")))

    assert "answered 503 on each of 3 attempt(s): GPU out of memory" in message
    assert service.url("/down-for-good") in message
    assert len(service.state.bodies) == 3


def test_a_service_slower_than_the_timeout_is_a_port_error_after_bounded_retries_in_bounded_time(
    service: ColourJudgeService,
) -> None:
    judge = judge_at(service.url("/slow"), timeout_s=0.3, retries=2, backoff_s=0.05)

    began = time.monotonic()
    message = port_error(lambda: judge.judge(requests_of("red")))
    took = time.monotonic() - began

    assert "timed out (timeout_s=0.3) on each of 3 attempt(s)" in message
    # three attempts of 0.3 s and backoffs of 0.05 s and 0.1 s: about 1.05 s
    assert 0.9 < took < 3.0
    assert len(service.state.bodies) == 3


def test_a_service_that_is_down_is_a_port_error_saying_it_cannot_be_reached() -> None:
    with socket.socket() as probe:  # a port nothing listens on once the socket is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = judge_at(f"http://127.0.0.1:{port}/judge", retries=1, backoff_s=0.01)

    began = time.monotonic()
    message = port_error(lambda: judge.judge(requests_of("red")))

    assert f"judge: http://127.0.0.1:{port}/judge: cannot reach the service" in message
    assert "after 2 attempt(s)" in message
    assert time.monotonic() - began < 2.0


def test_a_service_that_answers_non_json_is_a_port_error_quoting_what_came(
    service: ColourJudgeService,
) -> None:
    message = port_error(lambda: judge_at(service.url("/garbage")).judge(requests_of("red")))

    assert "answered 200 with a body that is not JSON (text/html: '<html><body>Welcome" in message


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/wrong-shape", "answered JSON of the wrong shape for flywheel-judge/1 (verdicts: Field"),
        ("/wrong-types", "(verdicts.0.elements.0.passed: Input should be a valid boolean (and 1"),
        ("/v2", "speaks protocol 'flywheel-judge/2', not 'flywheel-judge/1'"),
    ],
    ids=["missing-key", "wrong-type", "other-version"],
)
def test_a_service_that_answers_json_of_the_wrong_shape_is_a_port_error_naming_the_field(
    service: ColourJudgeService, path: str, expected: str
) -> None:
    message = port_error(lambda: judge_at(service.url(path)).judge(requests_of("red")))

    assert expected in message
    assert len(service.state.bodies) == 1  # a wrong answer is not retried


def test_a_service_that_answers_the_wrong_number_of_verdicts_or_unknown_ids_is_a_port_error(
    service: ColourJudgeService,
) -> None:
    requests = requests_of("red", "green", "blue")

    missing = port_error(lambda: judge_at(service.url("/wrong-count")).judge(requests))
    unknown = port_error(lambda: judge_at(service.url("/unknown-id")).judge(requests))

    assert "answered 2 verdict(s) for 3 item(s): none for id(s) '2'" in missing
    assert "answered verdict(s) for unknown id(s) 'x9' (asked for '0', '1', '2')" in unknown


def test_a_score_outside_zero_to_one_is_a_port_error_naming_the_item_and_element(
    service: ColourJudgeService,
) -> None:
    message = port_error(lambda: judge_at(service.url("/bad-score")).judge(requests_of("red")))

    assert "item '0' element 'a red square': score 1.5 is outside [0, 1]" in message


def test_a_client_error_is_not_retried_and_its_error_is_quoted_on_one_line(
    service: ColourJudgeService,
) -> None:
    judge = judge_at(service.url("/bad-request"), retries=3)

    message = port_error(lambda: judge.judge(requests_of("red")))

    assert message.endswith("answered 400: spec.elements must be a list of strings")
    assert len(service.state.bodies) == 1


def test_the_bearer_token_comes_from_the_environment_variable_the_settings_name(
    service: ColourJudgeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_JUDGE_TOKEN", raising=False)
    unset = port_error(lambda: judge_at(service.url("/auth"), bearer_token_env="TEST_JUDGE_TOKEN"))
    assert "the environment variable TEST_JUDGE_TOKEN (for the Authorization header)" in unset

    monkeypatch.setenv("TEST_JUDGE_TOKEN", "wrong")
    refused = judge_at(service.url("/auth"), bearer_token_env="TEST_JUDGE_TOKEN")
    assert port_error(lambda: refused.judge(requests_of("red"))).endswith("answered 401: bad token")

    monkeypatch.setenv("TEST_JUDGE_TOKEN", "s3cret")
    monkeypatch.setenv("TEST_JUDGE_KEY", "k-123")
    judge = judge_at(
        service.url("/auth"),
        bearer_token_env="TEST_JUDGE_TOKEN",
        header_env={"X-Key": "TEST_JUDGE_KEY"},
    )
    (verdict,) = judge.judge(requests_of("red"))
    assert verdict.passed
    assert service.state.headers[-1]["X-Key"] == "k-123"


def test_settings_refuse_secrets_written_in_the_file_and_urls_that_are_not_http() -> None:
    with pytest.raises(ValidationError, match="secrets do not belong in the project file"):
        HttpJudgeSettings(url="http://judge", headers={"authorization": "Bearer x"})
    with pytest.raises(ValidationError, match="must be an http:// or https:// URL"):
        HttpJudgeSettings(url="ftp://judge/v1")
    with pytest.raises(ValidationError, match="both set Authorization"):
        HttpJudgeSettings(url="http://j", bearer_token_env="A", header_env={"Authorization": "B"})
    with pytest.raises(ValidationError, match="retries"):
        HttpJudgeSettings(url="http://judge", retries=50)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        HttpJudgeSettings.model_validate({"url": "http://judge", "timeout": 3})


def test_building_calls_nothing_and_check_judges_one_probe_image(
    service: ColourJudgeService,
) -> None:
    adapter = adapter_for("judge", "http")
    assert adapter is JUDGE
    judge = judge_at(service.url("/judge"))
    assert service.state.bodies == []

    report = judge.check()

    assert report.startswith(f"{service.url('/judge')}: {PROTOCOL}, one probe judged in ")
    assert report.endswith("(1 element(s))")
    ((_, body),) = service.state.bodies
    assert body["items"][0]["prompt"] == "a grey square"
