"""Where the server may read images from (the ``[images]`` table of the project file), and
reading them there only.

A product app names an image by URI; the server reads it only where the project file allows
(:class:`ImageAccessConfig`): ``file://`` under the configured roots (``$FLYWHEEL_HOME``
always one), ``s3://`` / ``gs://`` under the configured buckets and prefixes, ``https://``
from the allow-listed hosts — never a private, loopback or link-local address on an app's
word. Anything else is stored but never read; :meth:`ImagePolicy.refusal` says why, and
:meth:`ImagePolicy.read` raises :class:`ImageRefused` with that reason.

- ``file://``: the path is resolved (``..`` and symlinks) and must lie under a root; the
  file must be a regular file no larger than ``max_bytes`` (checked by ``stat`` before it is
  opened, then by a bounded read of the opened file, opened without following a symlink).
- ``https://`` (:mod:`flywheel.media.https`): the host must be allow-listed; every address
  it resolves to must be public (unless the operator lists the host in ``private_hosts``);
  the connection goes to a checked address (no second lookup), no redirect is followed,
  the body is capped at ``max_bytes`` and the whole read at ``timeout_s``. Plain
  ``http://`` is never read.
- ``s3://`` / ``gs://`` (:mod:`flywheel.media.buckets`): through boto3 / google-cloud-storage
  (optional installs) with their own credentials and endpoint settings, size- and
  time-capped.

:func:`read_image` decodes only common raster formats, and only up to ``max_pixels``.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import socket
import ssl
import stat
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, unquote, urlsplit

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from flywheel.project import Project

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""What :func:`read_image` decodes (PIL's other decoders — EPS through Ghostscript among
them — are never run on an app's bytes)."""
SCHEMES = "file://, s3://, gs:// or https://"
_LIBRARIES = {"s3": ("boto3", "boto3"), "gs": ("google.cloud.storage", "google-cloud-storage")}
"""Bucket scheme -> (module, package) that reads it."""


class ImageAccessConfig(BaseModel):
    """What image URIs the server reads. Anything else is stored but never read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file_roots: list[Path] = Field(default_factory=list)
    """``file://`` URIs are read only under these directories (after resolving ``..`` and
    symlinks). ``$FLYWHEEL_HOME`` is always one (flywheel's own images live there)."""
    buckets: list[str] = Field(default_factory=list)
    """``s3://bucket[/prefix]`` and ``gs://bucket[/prefix]`` URIs read (with the cloud
    client libraries' own credentials)."""
    https_hosts: list[str] = Field(default_factory=list)
    """Host names whose ``https://`` URIs are read; never one that resolves to a private,
    loopback or link-local address."""
    max_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    """Largest image read."""
    timeout_s: float = Field(default=10.0, gt=0)
    """Longest a remote read may take, in all."""
    private_hosts: list[str] = Field(default_factory=list)
    """Hosts of ``https_hosts`` that the operator allows to resolve to private or loopback
    addresses (an on-premises object store). Only this file can name one; an app never can."""
    ca_bundle: Path | None = None
    """PEM file of certificate authorities trusted for ``https://`` reads besides the
    system's (an on-premises CA)."""
    max_pixels: int = Field(default=40_000_000, gt=0)
    """Largest image decoded (width x height); a larger one is refused before decoding."""

    @field_validator("buckets")
    @classmethod
    def _bucket_uris(cls, value: list[str]) -> list[str]:
        for entry in value:
            parsed = urlsplit(entry)
            if parsed.scheme not in ("s3", "gs") or not parsed.netloc:
                raise ValueError(f"{entry!r} is not s3://bucket[/prefix] nor gs://bucket[/prefix]")
        return value

    @field_validator("https_hosts", "private_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        hosts = []
        for entry in value:
            host = normal_host(entry.strip().removeprefix("[").removesuffix("]"))
            if not host or "/" in host or (":" in host and not _is_ip(host)):
                raise ValueError(f"{entry!r} is not a host name (no scheme, port nor path)")
            hosts.append(host)
        return hosts

    @model_validator(mode="after")
    def _private_hosts_are_allowed_hosts(self) -> ImageAccessConfig:
        stray = sorted(set(self.private_hosts) - set(self.https_hosts))
        if stray:
            raise ValueError(f"private_hosts {', '.join(stray)} not in https_hosts")
        return self


class ImageRefused(ValueError):
    """The policy does not read this image (one line: why)."""


class ImageReadError(OSError):
    """An allowed image that could not be read: gone, unreachable, not an image (one line)."""


def shown_uri(uri: str, limit: int = 160) -> str:
    """``uri`` for a one-line message: cut to ``limit`` characters, control and bidi
    characters as their escapes."""
    text = uri if len(uri) <= limit else uri[:limit] + "…"
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def normal_host(host: str) -> str | None:
    """A host name as compared with the allow-lists: lower case, IDNA-encoded, without a
    trailing dot; None when it cannot be encoded."""
    host = host.lower().removesuffix(".")
    if _is_ip(host):
        return str(ipaddress.ip_address(host))
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def address_problem(address: str) -> str | None:
    """Why a resolved address is never connected to on an app's word (None: a public one).
    An IPv6 address that carries an IPv4 one (mapped, NAT64, 6to4, Teredo) is judged by that
    too."""
    ip = ipaddress.ip_address(address)
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    if isinstance(ip, ipaddress.IPv6Address):  # the IPv4 address inside first: its name
        if ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        if ip in _NAT64:
            candidates.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:
            candidates.append(ip.sixtofour)
        if ip.teredo is not None:
            candidates.extend(ip.teredo)
    candidates.append(ip)
    for candidate in candidates:
        for kind, flagged in (
            ("an unspecified", candidate.is_unspecified),
            ("a loopback", candidate.is_loopback),
            ("a link-local", candidate.is_link_local),
            ("a multicast", candidate.is_multicast),
            ("a private", candidate.is_private),
            ("a reserved", candidate.is_reserved),
            ("a non-public", not candidate.is_global),
        ):
            if flagged:
                return f"{kind} address"
    return None


# ---- what a URI names -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalFile:
    path: Path
    """Resolved (``..`` and the symlinks that exist now), under a root."""


@dataclass(frozen=True, slots=True)
class BucketObject:
    scheme: str
    bucket: str
    key: str


@dataclass(frozen=True, slots=True)
class HttpsResource:
    url: str
    host: str
    """Normalized (:func:`normal_host`)."""
    port: int
    private_ok: bool
    """The operator lists the host in ``private_hosts``."""


Target = LocalFile | BucketObject | HttpsResource


class ImagePolicy:
    """The image reads one project allows (see the module docstring)."""

    def __init__(self, config: ImageAccessConfig, *, home: Path, base: Path | None = None) -> None:
        """``home``: ``$FLYWHEEL_HOME``, always a file root. ``base``: the directory relative
        ``file_roots`` and ``ca_bundle`` are resolved against (the project file's; None: the
        working directory)."""
        self.config = config
        base = base or Path.cwd()
        roots = (home, *config.file_roots)
        self.roots = tuple(dict.fromkeys((base / r.expanduser()).resolve() for r in roots))
        """Every file root, resolved."""
        self.ca_bundle = (base / config.ca_bundle).resolve() if config.ca_bundle else None
        self.buckets = tuple(_bucket_prefix(entry) for entry in config.buckets)
        self._ssl: ssl.SSLContext | None = None
        self._clients: dict[str, Any] = {}

    # ---- decisions (no I/O but path resolution and, for https, DNS) ---------------------------

    def refusal(self, uri: str) -> str | None:
        """Why ``uri`` will not be read (one line), or None when the policy reads it. Resolves
        a local path's symlinks, and an allowed https host's addresses; reads nothing."""
        try:
            target = self.target(uri)
            if isinstance(target, HttpsResource) and not target.private_ok:
                from flywheel.media.https import vetted_addresses

                infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
                vetted_addresses(target, infos, shown=shown_uri(uri))
        except ImageRefused as refused:
            return str(refused)
        except OSError:
            return None  # the host does not resolve: allowed, but reading it will fail
        return None

    def target(self, uri: str) -> Target:
        """What ``uri`` names, when the policy reads it; :class:`ImageRefused` otherwise (no
        I/O but resolving a local path)."""
        shown = shown_uri(uri)
        if not uri.strip():
            raise ImageRefused("an empty URI names no image")
        if "\x00" in uri:
            raise ImageRefused(f"{shown} has a NUL character")
        try:
            parsed = urlsplit(uri)
            port = parsed.port
        except ValueError as exc:
            raise ImageRefused(f"{shown} is not a valid URI ({exc})") from None
        if not parsed.scheme:
            raise ImageRefused(f"{shown} has no scheme (only {SCHEMES} URIs are read)")
        if parsed.scheme == "file":
            return self._local_file(parsed, shown)
        if parsed.scheme in ("s3", "gs"):
            return self._bucket_object(parsed, shown)
        if parsed.scheme == "https":
            return self._https(uri, parsed, port, shown)
        if parsed.scheme == "http":
            raise ImageRefused(f"{shown}: plain http:// is never read (https:// only)")
        raise ImageRefused(f"{shown}: {parsed.scheme}: URIs are never read (only {SCHEMES})")

    def _local_file(self, parsed: SplitResult, shown: str) -> LocalFile:
        if parsed.netloc not in ("", "localhost"):
            raise ImageRefused(f"{shown} names another host's file; only local files are read")
        path = Path(unquote(parsed.path))
        if not path.is_absolute():
            raise ImageRefused(f"{shown} has no absolute path")
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError) as exc:
            raise ImageRefused(f"{shown}: its path cannot be resolved ({exc})") from None
        if not any(resolved.is_relative_to(root) for root in self.roots):
            how = "" if resolved == path else f" (through '..' or a symlink: {resolved})"
            raise ImageRefused(f"{shown} is outside the allowed roots{how}")
        return LocalFile(resolved)

    def _bucket_object(self, parsed: SplitResult, shown: str) -> BucketObject:
        key = parsed.path.removeprefix("/")
        if parsed.query or parsed.fragment:
            raise ImageRefused(f"{shown}: a bucket URI has no query nor fragment")
        if not key or key.endswith("/"):
            raise ImageRefused(f"{shown} names no object")
        if any(part in (".", "..") for part in key.split("/")):
            raise ImageRefused(f"{shown} has a '.' or '..' segment")
        name = f"{parsed.scheme}://{parsed.netloc}/{key}"
        if not any(name.startswith(prefix) for prefix in self.buckets):
            raise ImageRefused(f"{shown} is not in an allowed bucket")
        module, package = _LIBRARIES[parsed.scheme]
        if not _installed(module):
            raise ImageRefused(
                f"{shown}: {parsed.scheme}:// needs {package}: pip install {package}"
            )
        return BucketObject(parsed.scheme, parsed.netloc, key)

    def _https(self, uri: str, parsed: SplitResult, port: int | None, shown: str) -> HttpsResource:
        if parsed.username is not None or parsed.password is not None:
            raise ImageRefused(f"{shown} carries credentials")
        host = normal_host(parsed.hostname or "")
        if not host:
            raise ImageRefused(f"{shown} has no valid host")
        if host not in self.config.https_hosts:
            raise ImageRefused(f"{shown}: host {host} is not an allowed https host")
        return HttpsResource(
            url=uri, host=host, port=port or 443, private_ok=host in self.config.private_hosts
        )

    # ---- reads ------------------------------------------------------------------------------

    def read(self, uri: str) -> bytes:
        """The bytes of ``uri``: :class:`ImageRefused` when the policy does not read it or a
        limit cuts it (size, time), :class:`ImageReadError` when it cannot be read."""
        target = self.target(uri)
        shown = shown_uri(uri)
        if isinstance(target, LocalFile):
            return self._read_file(target, shown)
        if isinstance(target, HttpsResource):
            from flywheel.media.https import read_https

            return read_https(
                target,
                shown=shown,
                ssl_context=self.ssl_context(),
                max_bytes=self.config.max_bytes,
                timeout_s=self.config.timeout_s,
            )
        from flywheel.media.buckets import read_object

        return read_object(
            target,
            shown=shown,
            clients=self._clients,
            max_bytes=self.config.max_bytes,
            timeout_s=self.config.timeout_s,
        )

    def read_image(self, uri: str) -> Image.Image:
        """``uri`` decoded (loaded; :data:`IMAGE_FORMATS` only, at most ``max_pixels``)."""
        return decode_image(self.read(uri), shown=shown_uri(uri), max_pixels=self.config.max_pixels)

    def ssl_context(self) -> ssl.SSLContext:
        """The system's certificate authorities, and ``ca_bundle``'s."""
        if self._ssl is None:
            context = ssl.create_default_context()
            if self.ca_bundle is not None:
                context.load_verify_locations(cafile=self.ca_bundle)
            self._ssl = context
        return self._ssl

    def _read_file(self, target: LocalFile, shown: str) -> bytes:
        limit = self.config.max_bytes
        try:
            path = target.path.resolve(strict=True)  # again: a symlink may have appeared
        except FileNotFoundError:
            raise ImageReadError(f"{shown}: no such file") from None
        except (OSError, RuntimeError) as exc:
            raise ImageReadError(f"{shown}: its path cannot be resolved ({exc})") from None
        if not any(path.is_relative_to(root) for root in self.roots):
            raise ImageRefused(f"{shown} is outside the allowed roots (now resolves to {path})")
        try:
            before = path.stat()
        except OSError as exc:
            raise ImageReadError(f"{shown} cannot be read ({exc.strerror or exc})") from None
        _check_file(before, shown, limit)  # its size before it is opened
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            descriptor = os.open(path, flags)
        except OSError as exc:
            raise ImageReadError(f"{shown} cannot be opened ({exc.strerror or exc})") from None
        with os.fdopen(descriptor, "rb", buffering=0) as opened:
            opened_stat = os.fstat(descriptor)
            if (opened_stat.st_dev, opened_stat.st_ino) != (before.st_dev, before.st_ino):
                raise ImageRefused(f"{shown} changed while it was opened")
            _check_file(opened_stat, shown, limit)
            data = bytearray()
            while len(data) <= limit:
                chunk = opened.read(min(1 << 20, limit + 1 - len(data)))
                if not chunk:
                    break
                data += chunk
        if len(data) > limit:
            raise ImageRefused(f"{shown} is larger than max_bytes ({limit})")
        return bytes(data)


def _check_file(status: os.stat_result, shown: str, limit: int) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise ImageReadError(f"{shown} is not a regular file")
    if status.st_size > limit:
        raise ImageRefused(f"{shown} is {status.st_size} bytes, more than max_bytes ({limit})")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _bucket_prefix(entry: str) -> str:
    """``s3://bucket[/prefix]`` as the start of the URIs it allows: the whole bucket, or the
    keys under the prefix taken as a folder (``images`` allows ``images/x``, not
    ``images-private/x``)."""
    parsed = urlsplit(entry)
    prefix = parsed.path.strip("/")
    return f"{parsed.scheme}://{parsed.netloc}/" + (f"{prefix}/" if prefix else "")


def decode_image(data: bytes, *, shown: str, max_pixels: int) -> Image.Image:
    """``data`` decoded (:data:`IMAGE_FORMATS` only): :class:`ImageRefused` above
    ``max_pixels``, :class:`ImageReadError` when it is not an image PIL reads whole."""
    try:
        image = Image.open(BytesIO(data), formats=IMAGE_FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageRefused(
                f"{shown} is {width}x{height} pixels, more than max_pixels ({max_pixels})"
            )
        image.load()
    except ImageRefused:
        raise
    except UnidentifiedImageError:
        kinds = ", ".join(IMAGE_FORMATS[:-1]) + f" or {IMAGE_FORMATS[-1]}"
        raise ImageReadError(f"{shown} is not an image that can be read (not {kinds})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRefused(f"{shown} is too many pixels to decode ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{shown} is not an image that can be read ({exc})") from None
    return image


def image_policy(project: Project | None = None) -> ImagePolicy:
    """The policy in force: ``project``'s ``[images]`` (default: the project in force,
    :func:`flywheel.project.load_project`) and ``$FLYWHEEL_HOME``."""
    from flywheel.project import load_project
    from flywheel.settings import get_settings

    project = project or load_project()
    return ImagePolicy(project.images, home=get_settings().home, base=project.root)
