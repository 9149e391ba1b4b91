"""``https://`` image reads (through httpx), safe from server-side request forgery.

- The host is looked up once per read, and every address it has must be public
  (:func:`~flywheel.media.access.address_problem`) unless the operator lists the host in
  ``private_hosts``.
- The connection goes to an address of that lookup (the URL's host replaced by the address,
  the ``Host`` header and the TLS server name — SNI and certificate check — set to the host
  name), so the name is not looked up a second time: a DNS answer that changes between the
  check and the connection (DNS rebinding) is never used. Each address is tried in turn when
  one cannot be connected to (not when TLS fails).
- No proxy or ``.netrc`` from the environment (``trust_env=False``), no redirect followed, no
  content encoding accepted (``Accept-Encoding: identity``: a compressed body could expand
  past the cap before it is counted).
- The body is capped at ``max_bytes``: ``Content-Length`` first, then the bytes as they come.
- The whole read — lookup, connection, TLS, headers, body — runs under one deadline of
  ``timeout_s`` (an anyio cancel scope), so a server that drips a byte at a time is cut at
  the deadline, not whenever a single read times out.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from typing import Any

import anyio
import httpx

from flywheel.media.access import HttpsResource, ImageReadError, ImageRefused, address_problem

AddressInfo = tuple[Any, Any, Any, Any, tuple[Any, ...]]


def vetted_addresses(
    target: HttpsResource, infos: Sequence[AddressInfo], *, shown: str
) -> list[str]:
    """The addresses of ``target``'s host (``getaddrinfo`` results), in order, each once;
    :class:`ImageRefused` when one of them is not public and the host is not a private host
    of the operator's."""
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise ImageReadError(f"{shown}: host {target.host} has no address")
    if not target.private_ok:
        for address in addresses:
            problem = address_problem(address)
            if problem is not None:
                raise ImageRefused(
                    f"{shown}: host {target.host} resolves to {address}, {problem} (read only "
                    "when the operator lists the host in private_hosts)"
                )
    return addresses


def read_https(
    target: HttpsResource,
    *,
    shown: str,
    ssl_context: ssl.SSLContext,
    max_bytes: int,
    timeout_s: float,
) -> bytes:
    """The body of ``target`` (see the module docstring). Runs its own event loop: call it
    from a thread that has none running (a worker, a Streamlit script, a CLI)."""
    read = _Read(target, shown, ssl_context, max_bytes, timeout_s)
    try:
        return anyio.run(read.run, backend="asyncio")
    except (ImageRefused, ImageReadError):
        raise
    except (TimeoutError, httpx.TimeoutException):
        raise ImageRefused(f"{shown} was not read within timeout_s ({timeout_s:g} s)") from None
    except httpx.HTTPError as exc:
        raise ImageReadError(f"{shown} cannot be read ({type(exc).__name__}: {exc})") from None
    except OSError as exc:  # the lookup
        raise ImageReadError(f"{shown} cannot be read ({exc.strerror or exc})") from None


class _Read:
    def __init__(
        self,
        target: HttpsResource,
        shown: str,
        ssl_context: ssl.SSLContext,
        max_bytes: int,
        timeout_s: float,
    ) -> None:
        self.target = target
        self.shown = shown
        self.ssl_context = ssl_context
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def run(self) -> bytes:
        target = self.target
        with anyio.fail_after(self.timeout_s):
            infos = await anyio.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
            addresses = vetted_addresses(target, infos, shown=self.shown)
            async with httpx.AsyncClient(
                verify=self.ssl_context,
                trust_env=False,
                follow_redirects=False,
                timeout=httpx.Timeout(self.timeout_s),
            ) as client:
                for number, address in enumerate(addresses, start=1):
                    try:
                        return await self._get(client, address)
                    except httpx.ConnectError as exc:
                        if number == len(addresses) or _tls_failure(exc):
                            raise
        raise AssertionError("unreachable: the last address re-raises")

    async def _get(self, client: httpx.AsyncClient, address: str) -> bytes:
        target, shown, limit = self.target, self.shown, self.max_bytes
        request = client.build_request(
            "GET",
            httpx.URL(target.url).copy_with(
                host=address, port=target.port, userinfo=b"", fragment=None
            ),
            headers={"Host": _netloc(target), "Accept": "image/*", "Accept-Encoding": "identity"},
            extensions={"sni_hostname": target.host},
        )
        response = await client.send(request, stream=True)
        try:
            if 300 <= response.status_code < 400:
                raise ImageRefused(
                    f"{shown} redirects (HTTP {response.status_code}); redirects are not followed"
                )
            if response.status_code != 200:
                raise ImageReadError(f"{shown} cannot be read (HTTP {response.status_code})")
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise ImageRefused(f"{shown} came {encoding}-encoded; only plain bodies are read")
            length = response.headers.get("content-length")
            if length is not None and length.strip().isdigit() and int(length) > limit:
                raise ImageRefused(
                    f"{shown} is {int(length)} bytes (Content-Length), more than max_bytes "
                    f"({limit})"
                )
            data = bytearray()
            async for chunk in response.aiter_raw():
                data += chunk
                if len(data) > limit:
                    raise ImageRefused(f"{shown} is larger than max_bytes ({limit})")
            return bytes(data)
        finally:
            await response.aclose()


def _tls_failure(error: BaseException) -> bool:
    """The connection was made but TLS failed (a certificate not trusted, say): another
    address of the host would not do better."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _netloc(target: HttpsResource) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == 443 else f"{host}:{target.port}"
