"""A judge behind HTTP: a team's VLM judge or detector service, spoken to in the
``flywheel-judge/1`` protocol.

The protocol (one ``POST`` to the configured URL per batch of images, JSON both ways)::

    request                                   response (200)
    {                                         {
      "protocol": "flywheel-judge/1",           "protocol": "flywheel-judge/1",
      "items": [                                "verdicts": [
        {                                         {
          "id": "0",                                "id": "0",
          "prompt": "a red circle",                 "elements": [
          "spec": {"elements": [...]} | null,         {"element": "a red circle",
          "image_png": "<base64 PNG>",                 "passed": true, "score": 0.93,
          "image_uri": "s3://..."   (optional)         "reason": "..."}
        }                                           ]
      ]                                           }
    }                                           ]
                                              }

Each item's ``id`` is unique within the request; the service answers exactly one verdict per
id, in any order, each with its per-element verdicts: ``element`` (what was checked, a
non-empty string), ``passed`` (a JSON boolean), ``score`` (a number in [0, 1], the
confidence that the element is right) and an optional ``reason``. Keys the protocol does not
name are ignored on both sides (a service may add its own). A service that cannot judge a
request answers 4xx with ``{"error": "one line"}``; 429 and 5xx mean "try again".

The client sends ``image_png`` always (a :class:`~flywheel.ports.JudgeRequest` carries pixels)
and ``image_uri`` never: the field is reserved for callers that know where an image is
stored, and a service must judge ``image_png``.

Failures are :class:`~flywheel.ports.PortError` of one line naming the URL and what was
wrong: the service down or timing out (after ``retries`` retries with exponential backoff,
also on 429 and 5xx), a non-2xx answer, a body that is not JSON, JSON of the wrong shape,
another protocol version, missing, duplicate or unknown ids, a score outside [0, 1]. A call
either returns every verdict or raises: there is no half result.

Building the judge does not call the service; :meth:`HttpJudge.check` does (one probe
image).
"""

from __future__ import annotations

import base64
import io
import math
import os
import time
from collections.abc import Mapping, Sequence

import httpx
import torch
from PIL import Image
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from torch import Tensor

from flywheel.adapters.base import Adapter, AdapterContext, AdapterSettings
from flywheel.ports import ElementVerdict, JudgeRequest, PortError, Verdict

PROTOCOL = "flywheel-judge/1"
"""The protocol version sent in every request and required in every answer."""

_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_BODY_SNIPPET = 160


class HttpJudgeSettings(AdapterSettings):
    """The ``[judge]`` table of ``adapter = "http"``."""

    url: str = Field(min_length=1)
    """The service's endpoint (``http://`` or ``https://``), to which each batch is POSTed."""
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """Longest one attempt waits to connect, to send, and between bytes of the answer."""
    retries: int = Field(default=2, ge=0, le=10)
    """Further attempts of a batch after a connection error, a timeout, a 429 or a 5xx."""
    backoff_s: float = Field(default=0.5, ge=0, le=60)
    """Wait before the first retry; each later retry waits twice the one before."""
    max_backoff_s: float = Field(default=10.0, ge=0, le=300)
    """Longest wait between two attempts (a ``Retry-After`` header is honoured up to it)."""
    batch_size: int = Field(default=8, ge=1, le=1024)
    """Images per request."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra request headers, sent as written (not for secrets: ``Authorization`` and
    ``Cookie`` are refused here; use ``bearer_token_env`` or ``header_env``)."""
    header_env: dict[str, str] = Field(default_factory=dict)
    """Header name -> the environment variable holding its value (an API key header, say);
    read when the judge is built, which fails if one is unset."""
    bearer_token_env: str | None = Field(default=None, min_length=1)
    """The environment variable holding a token sent as ``Authorization: Bearer <token>``
    (None: no such header); read when the judge is built, which fails if it is unset."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as exc:
            raise ValueError(f"not a URL ({exc})") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("headers")
    @classmethod
    def _no_secrets(cls, value: dict[str, str]) -> dict[str, str]:
        secret = sorted(k for k in value if k.lower() in _SECRET_HEADERS)
        if secret:
            raise ValueError(
                f"{', '.join(secret)}: secrets do not belong in the project file "
                "(use bearer_token_env or header_env)"
            )
        return value

    @model_validator(mode="after")
    def _one_authorization(self) -> HttpJudgeSettings:
        if self.bearer_token_env is not None and any(
            k.lower() == "authorization" for k in self.header_env
        ):
            raise ValueError("bearer_token_env and header_env both set Authorization")
        return self


# ---- the wire format -------------------------------------------------------------------------


class WireElement(BaseModel):
    """One element's verdict as the service sends it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    element: StrictStr = Field(min_length=1)
    passed: StrictBool
    score: StrictFloat | StrictInt
    reason: StrictStr = ""


class WireVerdict(BaseModel):
    """One item's verdict as the service sends it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: StrictStr
    elements: list[WireElement]


class WireResponse(BaseModel):
    """A whole answer of the service."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    protocol: StrictStr
    verdicts: list[WireVerdict]


def png_base64(image: Tensor) -> str:
    """``image`` ``(3, H, W)`` in [0, 1] as a base64 (standard alphabet, padded) PNG."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"an image must be (3, H, W), not {tuple(image.shape)}")
    pixels = (image.detach().to("cpu", torch.float32).clamp(0, 1) * 255).round().to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def request_body(requests: Sequence[JudgeRequest], ids: Sequence[str]) -> dict[str, JsonValue]:
    """The JSON body of one request of the protocol: ``requests`` under ``ids``."""
    items: list[JsonValue] = []
    for request, item_id in zip(requests, ids, strict=True):
        spec: JsonValue = dict(request.spec) if request.spec is not None else None
        items.append(
            {
                "id": item_id,
                "prompt": request.prompt,
                "spec": spec,
                "image_png": png_base64(request.image),
            }
        )
    return {"protocol": PROTOCOL, "items": items}


def _one_line(text: str, limit: int = _BODY_SNIPPET) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _error_text(response: httpx.Response) -> str:
    """What a non-2xx answer says: its ``error`` field when JSON has one, else its text."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return _one_line(data["error"])
    return _one_line(response.text) or "(empty body)"


def _shape_problem(error: ValidationError) -> str:
    problem = error.errors()[0]
    where = ".".join(str(p) for p in problem["loc"]) or "(body)"
    more = error.error_count() - 1
    return f"{where}: {problem['msg']}" + (f" (and {more} more)" if more else "")


def _ids(values: Sequence[str]) -> str:
    shown = ", ".join(repr(v) for v in values[:5])
    return shown + (f" and {len(values) - 5} more" if len(values) > 5 else "")


# ---- the judge -------------------------------------------------------------------------------


class HttpJudge:
    """The :class:`~flywheel.ports.Judge` of a ``flywheel-judge/1`` service (see the module
    doc). Thread-safe: each call opens its own connection pool."""

    def __init__(self, settings: HttpJudgeSettings, headers: Mapping[str, str]) -> None:
        self._settings = settings
        self._headers = {"User-Agent": PROTOCOL, **headers}
        url = httpx.URL(settings.url)
        self._where = str(url.copy_with(username=None, password=None, query=None, fragment=None))

    @property
    def url(self) -> str:
        """The endpoint, as written in the settings."""
        return self._settings.url

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        """One verdict per request, in order, from the service, ``batch_size`` at a time."""
        if not requests:
            return []
        settings = self._settings
        verdicts: list[Verdict] = []
        with httpx.Client(
            headers=self._headers, timeout=settings.timeout_s, follow_redirects=False
        ) as client:
            for start in range(0, len(requests), settings.batch_size):
                batch = requests[start : start + settings.batch_size]
                ids = [str(start + i) for i in range(len(batch))]
                data = self._post(client, request_body(batch, ids))
                verdicts.extend(self._verdicts(data, ids))
        return verdicts

    def check(self) -> str:
        """Judge one probe image (a grey square) and say how the service answered;
        :class:`PortError` when it did not answer well."""
        probe = JudgeRequest(prompt="a grey square", image=torch.full((3, 32, 32), 0.5))
        began = time.perf_counter()
        (verdict,) = self.judge([probe])
        took = (time.perf_counter() - began) * 1000
        return (
            f"{self._where}: {PROTOCOL}, one probe judged in {took:.0f} ms "
            f"({len(verdict.elements)} element(s))"
        )

    def _fail(self, message: str) -> PortError:
        return PortError("judge", f"{self._where}: {message}")

    def _post(self, client: httpx.Client, body: dict[str, JsonValue]) -> object:
        """POST ``body`` with retries; the decoded JSON answer of a 2xx."""
        settings = self._settings
        attempts = settings.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            wait = min(settings.max_backoff_s, settings.backoff_s * 2**attempt)
            try:
                response = client.post(settings.url, json=body)
            except httpx.TimeoutException:
                if last:
                    raise self._fail(
                        f"timed out (timeout_s={settings.timeout_s:g}) on each of "
                        f"{attempts} attempt(s)"
                    ) from None
            except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                if last:
                    reason = _one_line(str(exc)) or type(exc).__name__
                    raise self._fail(
                        f"cannot reach the service ({reason}) after {attempts} attempt(s)"
                    ) from None
            except httpx.HTTPError as exc:
                reason = _one_line(str(exc)) or type(exc).__name__
                raise self._fail(f"request failed ({reason})") from None
            else:
                status = response.status_code
                if status == 429 or status >= 500:
                    if last:
                        raise self._fail(
                            f"answered {status} on each of {attempts} attempt(s): "
                            f"{_error_text(response)}"
                        )
                    wait = min(settings.max_backoff_s, max(wait, _retry_after(response)))
                elif not 200 <= status < 300:
                    raise self._fail(f"answered {status}: {_error_text(response)}")
                else:
                    try:
                        return response.json()
                    except ValueError:
                        kind = response.headers.get("content-type", "no content type")
                        raise self._fail(
                            f"answered {status} with a body that is not JSON "
                            f"({kind}: {_one_line(response.text, 60)!r})"
                        ) from None
            time.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _verdicts(self, data: object, ids: Sequence[str]) -> list[Verdict]:
        """The verdicts of ``data`` (a decoded answer) for ``ids``, in their order."""
        if isinstance(data, dict) and "protocol" in data and data["protocol"] != PROTOCOL:
            raise self._fail(f"speaks protocol {data['protocol']!r}, not {PROTOCOL!r}")
        try:
            answer = WireResponse.model_validate(data)
        except ValidationError as exc:
            raise self._fail(
                f"answered JSON of the wrong shape for {PROTOCOL} ({_shape_problem(exc)})"
            ) from None
        by_id: dict[str, WireVerdict] = {}
        twice: list[str] = []
        for verdict in answer.verdicts:
            if verdict.id in by_id:
                twice.append(verdict.id)
            by_id[verdict.id] = verdict
        asked = set(ids)
        unknown = [i for i in by_id if i not in asked]
        missing = [i for i in ids if i not in by_id]
        if twice:
            raise self._fail(f"answered id(s) {_ids(twice)} more than once")
        if unknown:
            raise self._fail(
                f"answered verdict(s) for unknown id(s) {_ids(unknown)} (asked for {_ids(ids)})"
            )
        if missing:
            raise self._fail(
                f"answered {len(answer.verdicts)} verdict(s) for {len(ids)} item(s): "
                f"none for id(s) {_ids(missing)}"
            )
        verdicts = []
        for item_id in ids:
            elements = []
            for wire in by_id[item_id].elements:
                score = float(wire.score)
                if not (math.isfinite(score) and 0.0 <= score <= 1.0):
                    raise self._fail(
                        f"item {item_id!r} element {_one_line(wire.element, 60)!r}: "
                        f"score {score!r} is outside [0, 1]"
                    )
                elements.append(
                    ElementVerdict(
                        element=wire.element, passed=wire.passed, score=score, reason=wire.reason
                    )
                )
            verdicts.append(Verdict(elements=tuple(elements)))
        return verdicts


def _retry_after(response: httpx.Response) -> float:
    """Seconds a ``Retry-After`` header (in seconds) asks to wait; 0 without one."""
    try:
        return max(0.0, float(response.headers.get("retry-after", "0")))
    except ValueError:
        return 0.0


def _resolve_headers(settings: HttpJudgeSettings) -> dict[str, str]:
    """The request headers: the literal ones, then those read from the environment."""
    headers = dict(settings.headers)
    wanted = [(name, variable, "") for name, variable in settings.header_env.items()]
    if settings.bearer_token_env is not None:
        wanted.append(("Authorization", settings.bearer_token_env, "Bearer "))
    for name, variable, prefix in wanted:
        value = os.environ.get(variable)
        if not value:
            raise PortError(
                "judge", f"the environment variable {variable} (for the {name} header) is not set"
            )
        headers[name] = prefix + value
    return headers


def _build(settings: HttpJudgeSettings, context: AdapterContext) -> HttpJudge:
    """The judge of ``settings`` (reads header secrets from the environment, calls
    nothing)."""
    return HttpJudge(settings, _resolve_headers(settings))


JUDGE: Adapter[HttpJudgeSettings] = Adapter(
    settings=HttpJudgeSettings,
    build=_build,
    summary=f"a VLM judge or detector service behind HTTP ({PROTOCOL}, JSON, batched, retried)",
)

__all__ = [
    "JUDGE",
    "PROTOCOL",
    "HttpJudge",
    "HttpJudgeSettings",
    "WireElement",
    "WireResponse",
    "WireVerdict",
    "png_base64",
    "request_body",
]
