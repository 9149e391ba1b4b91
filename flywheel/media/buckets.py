"""``s3://`` and ``gs://`` image reads, through boto3 and google-cloud-storage (optional
installs: the policy refuses a URI whose library is missing, saying which to install).

The libraries find their credentials and endpoints as they always do (``AWS_*`` variables,
``~/.aws``, instance roles, ``AWS_ENDPOINT_URL_S3`` for an S3-compatible store; Application
Default Credentials, ``STORAGE_EMULATOR_HOST``): the endpoint is the operator's, never an
app's. An object larger than ``max_bytes`` is refused from its metadata before its body is
read, and its body is read with a cap. The read runs in a worker thread that the caller
waits on for ``timeout_s`` at most; the libraries' own connect and read timeouts
(``timeout_s`` too, one attempt) end an abandoned worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flywheel.media.access import BucketObject, ImageReadError, ImageRefused

if TYPE_CHECKING:
    from types_boto3_s3 import S3Client

_CLIENTS = threading.Lock()


def read_object(
    target: BucketObject,
    *,
    shown: str,
    clients: dict[str, Any],
    max_bytes: int,
    timeout_s: float,
) -> bytes:
    """The bytes of ``target``, at most ``max_bytes``, within ``timeout_s``; ``clients``
    keeps each library's client between reads (one policy's)."""
    if target.scheme == "s3":
        return within_deadline(
            lambda: _read_s3(target, shown, clients, max_bytes, timeout_s), shown, timeout_s
        )
    return within_deadline(
        lambda: _read_gs(target, shown, clients, max_bytes, timeout_s), shown, timeout_s
    )


def within_deadline(work: Callable[[], bytes], shown: str, timeout_s: float) -> bytes:
    """``work()`` in a daemon thread; :class:`ImageRefused` when it has not returned within
    ``timeout_s`` (the thread is left to end by its own timeouts; its result is dropped)."""
    outcome: list[bytes | BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="image-read", daemon=True).start()
    if not done.wait(timeout_s):
        raise ImageRefused(f"{shown} was not read within timeout_s ({timeout_s:g} s)")
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _too_large(shown: str, size: int, limit: int) -> ImageRefused:
    return ImageRefused(f"{shown} is {size} bytes, more than max_bytes ({limit})")


# ---- s3:// ------------------------------------------------------------------------------------


def _s3_client(clients: dict[str, Any], timeout_s: float) -> S3Client:
    import boto3
    from botocore.config import Config

    with _CLIENTS:
        client: S3Client | None = clients.get("s3")
        if client is None:
            config = Config(
                connect_timeout=timeout_s,
                read_timeout=timeout_s,
                retries={"max_attempts": 1, "mode": "standard"},
            )
            client = boto3.session.Session().client("s3", config=config)
            clients["s3"] = client
        return client


def _read_s3(
    target: BucketObject, shown: str, clients: dict[str, Any], limit: int, timeout_s: float
) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client = _s3_client(clients, timeout_s)
        response = client.get_object(Bucket=target.bucket, Key=target.key)
        body = response["Body"]
        try:
            size = response.get("ContentLength")
            if size is not None and size > limit:
                raise _too_large(shown, size, limit)
            data = body.read(limit + 1)
        finally:
            body.close()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "an error")
        raise ImageReadError(f"{shown} cannot be read (S3 answered {code})") from None
    except BotoCoreError as exc:
        raise ImageReadError(f"{shown} cannot be read ({exc})") from None
    if len(data) > limit:
        raise ImageRefused(f"{shown} is larger than max_bytes ({limit})")
    return data


# ---- gs:// ------------------------------------------------------------------------------------


def _read_gs(
    target: BucketObject, shown: str, clients: dict[str, Any], limit: int, timeout_s: float
) -> bytes:
    from google.api_core.exceptions import GoogleAPIError
    from google.auth.exceptions import GoogleAuthError
    from google.cloud import storage  # type: ignore[import-untyped]
    from requests import RequestException

    try:
        with _CLIENTS:
            client = clients.get("gs")
            if client is None:
                client = clients["gs"] = storage.Client()
        blob = client.bucket(target.bucket).get_blob(target.key, timeout=timeout_s)
        if blob is None:
            raise ImageReadError(f"{shown}: no such object")
        size = blob.size
        if size is not None and size > limit:
            raise _too_large(shown, size, limit)
        # That generation only (the size checked is the size read), at most limit + 1 bytes.
        data: bytes = blob.download_as_bytes(
            end=limit, if_generation_match=blob.generation, timeout=timeout_s, retry=None
        )
    except (GoogleAPIError, GoogleAuthError, RequestException) as exc:
        raise ImageReadError(f"{shown} cannot be read ({type(exc).__name__}: {exc})") from None
    if len(data) > limit:
        raise ImageRefused(f"{shown} is larger than max_bytes ({limit})")
    return data
