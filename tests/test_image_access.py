"""Images named by URI are read only where the project file allows: each refusal of the issue
(a file outside the roots, a path out through ``..`` or a symlink, a loopback or private
address, an oversized or slow remote image, a scheme never read) comes with its reason and
reads nothing — no file opened (an audit hook sees every ``open``), no connection made (the
test servers count them), no client library called. Allowed reads work: a file under a root,
https from a host the operator allows (a real TLS server on loopback, its certificate from a
``trustme`` CA given as ``ca_bundle``), s3:// from a real local S3 (moto's server) and gs://
from a local GCS emulator."""

from __future__ import annotations

import http.server
import io
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trustme
from PIL import Image
from pydantic import ValidationError

from flywheel.media import access
from flywheel.media.access import (
    ImageAccessConfig,
    ImagePolicy,
    ImageReadError,
    ImageRefused,
    address_problem,
    image_policy,
)
from flywheel.settings import get_settings
from tests.helpers import free_port


def _png(size: tuple[int, int] = (4, 3), colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()

# ---- proof that nothing was opened --------------------------------------------------------------

_OPENED: list[list[str]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _OPENED:
        _OPENED[-1].append(os.fsdecode(args[0]) if isinstance(args[0], str | bytes) else "")


sys.addaudithook(_audit)  # audit hooks stay for the process; this one records only on demand


@contextmanager
def opened_files() -> Iterator[list[str]]:
    """Every path opened (``open``, ``os.open``) while the block runs."""
    _OPENED.append([])
    try:
        yield _OPENED[-1]
    finally:
        _OPENED.pop()


def _refused(policy: ImagePolicy, uri: str, why: str) -> str:
    """Both ``refusal`` and ``read`` refuse ``uri`` with a reason containing ``why``."""
    reason = policy.refusal(uri)
    assert reason is not None, uri
    assert why in reason, (uri, reason)
    with pytest.raises(ImageRefused) as refused:
        policy.read(uri)
    assert str(refused.value) == reason
    assert "\n" not in reason
    return reason


# ---- file:// ----------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """A home, a root with an image, and an image outside both."""
    home, root, outside = tmp_path / "home", tmp_path / "root", tmp_path / "outside"
    for directory in (home, root, outside):
        directory.mkdir()
    (root / "ok.png").write_bytes(PNG)
    (home / "own.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(PNG)
    return {"home": home, "root": root, "outside": outside}


def _file_policy(tree: dict[str, Path], **settings: Any) -> ImagePolicy:
    return ImagePolicy(ImageAccessConfig(file_roots=[tree["root"]], **settings), home=tree["home"])


def test_a_file_under_a_root_or_the_home_is_read_and_decoded(tree: dict[str, Path]) -> None:
    policy = _file_policy(tree)
    for uri in ((tree["root"] / "ok.png").as_uri(), (tree["home"] / "own.png").as_uri()):
        assert policy.refusal(uri) is None
        assert policy.read(uri) == PNG
        image = policy.read_image(uri)
        assert (image.size, image.getpixel((0, 0))) == ((4, 3), (255, 0, 0))
    # A '..' and a symlink that stay inside a root are fine; so is file://localhost/.
    (tree["root"] / "sub").mkdir()
    (tree["root"] / "link.png").symlink_to(tree["root"] / "ok.png")
    for uri in (
        f"file://{tree['root']}/sub/../ok.png",
        (tree["root"] / "link.png").as_uri(),
        f"file://localhost{tree['root']}/ok.png",
    ):
        assert policy.read(uri) == PNG, uri


def test_a_file_outside_the_roots_is_refused_and_never_opened(tree: dict[str, Path]) -> None:
    policy = _file_policy(tree)
    secret = tree["outside"] / "secret.png"
    with opened_files() as opened:
        reason = _refused(policy, secret.as_uri(), "is outside the allowed roots")
        _refused(policy, "file:///etc/passwd", "is outside the allowed roots")
    assert reason == f"{secret.as_uri()} is outside the allowed roots"
    assert not [p for p in opened if p.startswith((str(tree["outside"]), "/etc"))], opened


def test_a_path_out_of_a_root_through_dotdot_is_refused_and_never_opened(
    tree: dict[str, Path],
) -> None:
    policy = _file_policy(tree)
    secret = tree["outside"] / "secret.png"
    with opened_files() as opened:
        reason = _refused(policy, f"file://{tree['root']}/../outside/secret.png", "outside")
        _refused(policy, f"file://{tree['root']}/%2e%2e/outside/secret.png", "outside")
        _refused(policy, f"file://{tree['root']}/../../../../etc/passwd", "outside")
    assert reason.endswith(f"is outside the allowed roots (through '..' or a symlink: {secret})")
    assert not [p for p in opened if p.startswith((str(tree["outside"]), "/etc"))], opened


def test_a_symlink_out_of_a_root_is_refused_and_never_opened(tree: dict[str, Path]) -> None:
    policy = _file_policy(tree)
    secret = tree["outside"] / "secret.png"
    (tree["root"] / "leak.png").symlink_to(secret)
    (tree["root"] / "door").symlink_to(tree["outside"], target_is_directory=True)
    with opened_files() as opened:
        reason = _refused(policy, (tree["root"] / "leak.png").as_uri(), "outside")
        _refused(policy, (tree["root"] / "door" / "secret.png").as_uri(), "outside")
    assert reason.endswith(f"(through '..' or a symlink: {secret})")
    assert not [p for p in opened if p.startswith(str(tree["outside"]))], opened


def test_a_file_larger_than_max_bytes_is_refused_before_it_is_opened(
    tree: dict[str, Path],
) -> None:
    big = tree["root"] / "big.png"
    big.write_bytes(_png((300, 300), "blue") + b"\0" * 2048)
    policy = _file_policy(tree, max_bytes=2048)
    too_big = r"is \d+ bytes, more than max_bytes \(2048\)"
    with opened_files() as opened, pytest.raises(ImageRefused, match=too_big):
        policy.read(big.as_uri())
    assert str(big) not in opened
    assert policy.read((tree["root"] / "ok.png").as_uri()) == PNG  # a small one still is


def test_what_is_not_an_image_or_too_many_pixels_is_never_decoded(tree: dict[str, Path]) -> None:
    (tree["root"] / "notes.txt").write_text("not an image")
    (tree["root"] / "cut.png").write_bytes(PNG[:40])
    (tree["root"] / "wide.png").write_bytes(_png((4000, 3000)))
    (tree["root"] / "image.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 1 1\n")
    policy = _file_policy(tree, max_pixels=1_000_000)
    for name in ("notes.txt", "cut.png", "image.eps"):
        with pytest.raises(ImageReadError, match="is not an image that can be read"):
            policy.read_image((tree["root"] / name).as_uri())
    with pytest.raises(ImageRefused, match=r"is 4000x3000 pixels, more than max_pixels"):
        policy.read_image((tree["root"] / "wide.png").as_uri())
    with pytest.raises(ImageReadError, match="no such file"):
        policy.read((tree["root"] / "gone.png").as_uri())
    with pytest.raises(ImageReadError, match="is not a regular file"):
        policy.read(tree["root"].as_uri())


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("", "an empty URI names no image"),
        ("images/cat.png", "has no scheme"),
        ("/etc/passwd", "has no scheme"),
        ("data:image/png;base64,iVBORw0KGgo=", "data: URIs are never read"),
        ("ftp://files.example/cat.png", "ftp: URIs are never read"),
        ("javascript:alert(1)", "javascript: URIs are never read"),
        ("http://images.example/cat.png", "plain http:// is never read (https:// only)"),
        ("file://fileserver/share/cat.png", "names another host's file"),
        ("file:cat.png", "has no absolute path"),
        ("file:///tmp/a\x00.png", "has a NUL character"),
        ("https://[::1/cat.png", "is not a valid URI"),
        ("https://images.example:99999/cat.png", "is not a valid URI"),
        ("https://evil.example/cat.png", "host evil.example is not an allowed https host"),
        ("https://user:pw@images.example/cat.png", "carries credentials"),
        ("s3://other-bucket/images/cat.png", "is not in an allowed bucket"),
        ("s3://team/images-private/cat.png", "is not in an allowed bucket"),
        ("s3://team/private/cat.png", "is not in an allowed bucket"),
        ("s3://team/images/../private/cat.png", "has a '.' or '..' segment"),
        ("gs://team/images/cat.png", "is not in an allowed bucket"),  # an s3:// bucket only
        ("s3://team/images/", "names no object"),
    ],
)
def test_uris_the_policy_does_not_read_are_refused_with_their_reason(
    uri: str, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[object] = []

    def lookup(*args: object, **kwargs: object) -> list[object]:
        lookups.append(args)
        return []

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    config = ImageAccessConfig(buckets=["s3://team/images"], https_hosts=["images.example"])
    policy = ImagePolicy(config, home=tmp_path)
    _refused(policy, uri, why)
    assert lookups == []  # refused before any DNS lookup


def test_a_hostile_uri_is_shown_on_one_line_and_cut(tmp_path: Path) -> None:
    policy = ImagePolicy(ImageAccessConfig(), home=tmp_path)
    reason = policy.refusal("gopher://x/\u202e\n" + "a" * 500)
    assert reason is not None
    assert reason.startswith("gopher://x/\\u202e\\n" + "a" * 10)
    assert "…" in reason
    assert len(reason) < 300
    assert reason.isprintable()


def test_the_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match=r"private_hosts store\.local not in https_hosts"):
        ImageAccessConfig(private_hosts=["store.local"])
    with pytest.raises(ValidationError, match="is not s3://bucket"):
        ImageAccessConfig(buckets=["team/images"])
    with pytest.raises(ValidationError, match="is not a host name"):
        ImageAccessConfig(https_hosts=["https://images.example/"])
    config = ImageAccessConfig(https_hosts=["Images.Example.", "[::1]"], private_hosts=["::1"])
    assert config.https_hosts == ["images.example", "::1"]


def test_addresses_that_are_not_public_are_named() -> None:
    assert address_problem("127.0.0.1") == "a loopback address"
    assert address_problem("::1") == "a loopback address"
    assert address_problem("10.1.2.3") == "a private address"
    assert address_problem("169.254.169.254") == "a link-local address"  # cloud metadata
    assert address_problem("0.0.0.0") == "an unspecified address"
    assert address_problem("224.0.0.1") == "a multicast address"
    assert address_problem("100.64.0.1") == "a non-public address"  # carrier-grade NAT
    assert address_problem("::ffff:127.0.0.1") == "a loopback address"  # IPv4-mapped
    assert address_problem("64:ff9b::a00:1") == "a private address"  # NAT64 of 10.0.0.1
    assert address_problem("2002:a00:1::") == "a private address"  # 6to4 of 10.0.0.1
    assert address_problem("93.184.215.14") is None
    assert address_problem("2606:4700::6810:84e5") is None


# ---- https:// ---------------------------------------------------------------------------------


@dataclass
class Served:
    """What the test server saw."""

    connections: int = 0
    paths: list[str] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)
    """Body bytes written per path before the client went away."""


class _Handler(http.server.BaseHTTPRequestHandler):
    served: ClassVar[Served]
    port: ClassVar[int]

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, body: bytes, *, length: int | None, chunks: int, delay: float = 0.0) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.end_headers()
        sent = 0
        try:
            for _ in range(chunks):
                self.wfile.write(body)
                self.wfile.flush()
                sent += len(body)
                if delay:
                    time.sleep(delay)
        except OSError:
            pass
        finally:
            self.served.sent[self.path] = sent

    def do_GET(self) -> None:
        self.served.paths.append(self.path)
        if self.path == "/ok.png":
            self._send(PNG, length=len(PNG), chunks=1)
        elif self.path == "/big.png":  # announces 64 MiB, sends while the client reads
            self._send(b"\0" * 65536, length=64 << 20, chunks=1024)
        elif self.path == "/endless.png":  # no Content-Length: counted as it comes
            self._send(b"\0" * 65536, length=None, chunks=1024)
        elif self.path == "/slow.png":  # a byte every 50 ms: no single read ever times out
            self._send(b"\0", length=1000, chunks=1000, delay=0.05)
        elif self.path == "/moved.png":
            self.send_response(302)
            self.send_header("Location", f"https://127.0.0.1:{self.port}/ok.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    served: Served

    def get_request(self) -> tuple[Any, Any]:
        self.served.connections += 1
        return super().get_request()

    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # a client that went away mid-body: what the size and time tests do


@dataclass
class TlsServer:
    port: int
    served: Served
    ca_bundle: Path


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """An https server on 127.0.0.1 with a certificate for localhost and 127.0.0.1, issued by
    a throw-away CA (the operator's ``ca_bundle``)."""
    ca = trustme.CA()
    bundle = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    served = Served()
    server = _Server(("127.0.0.1", 0), _Handler)
    server.served = served
    server.socket = context.wrap_socket(server.socket, server_side=True)
    port = server.server_address[1]
    handler = type("Handler", (_Handler,), {"served": served, "port": port})
    server.RequestHandlerClass = handler
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield TlsServer(port=port, served=served, ca_bundle=bundle)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _https_policy(server: TlsServer, tmp_path: Path, **settings: Any) -> ImagePolicy:
    """localhost and 127.0.0.1 allowed, and (the operator's word) private."""
    hosts = ["localhost", "127.0.0.1"]
    settings = {"https_hosts": hosts, "private_hosts": hosts, **settings}
    config = ImageAccessConfig(ca_bundle=server.ca_bundle, **settings)
    return ImagePolicy(config, home=tmp_path)


def test_a_loopback_or_private_address_is_refused_and_never_connected_to(
    tls_server: TlsServer, tmp_path: Path
) -> None:
    port, served = tls_server.port, tls_server.served
    # Allow-listed, but the operator has not said these hosts may be private.
    hosts = ["localhost", "127.0.0.1", "::ffff:127.0.0.1", "10.1.2.3", "169.254.169.254"]
    policy = ImagePolicy(
        ImageAccessConfig(https_hosts=hosts, ca_bundle=tls_server.ca_bundle), home=tmp_path
    )
    before = served.connections
    for uri, why in [
        (f"https://127.0.0.1:{port}/ok.png", "resolves to 127.0.0.1, a loopback address"),
        (f"https://localhost:{port}/ok.png", "a loopback address"),
        (f"https://[::ffff:127.0.0.1]:{port}/ok.png", "a loopback address"),
        ("https://10.1.2.3/ok.png", "resolves to 10.1.2.3, a private address"),
        ("https://169.254.169.254/latest/meta-data/", "a link-local address"),
    ]:
        reason = _refused(policy, uri, why)
        assert reason.endswith("(read only when the operator lists the host in private_hosts)")
    assert served.connections == before  # not one connection


def test_an_allowed_private_host_is_read_over_https_and_redirects_are_not_followed(
    tls_server: TlsServer, tmp_path: Path
) -> None:
    served = tls_server.served
    policy = _https_policy(tls_server, tmp_path)
    for host in ("localhost", "127.0.0.1"):
        uri = f"https://{host}:{tls_server.port}/ok.png#fragment"
        assert policy.refusal(uri) is None
        assert policy.read(uri) == PNG
    assert policy.read_image(f"https://localhost:{tls_server.port}/ok.png").size == (4, 3)
    paths = len(served.paths)
    with pytest.raises(ImageRefused, match=r"redirects \(HTTP 302\); redirects are not followed"):
        policy.read(f"https://localhost:{tls_server.port}/moved.png")  # known once it answers
    assert served.paths[paths:] == ["/moved.png"]  # never /ok.png
    with pytest.raises(ImageReadError, match=r"cannot be read \(HTTP 404\)"):
        policy.read(f"https://localhost:{tls_server.port}/gone.png")
    # Without the operator's CA the server's certificate is not trusted.
    untrusted = ImagePolicy(
        ImageAccessConfig(https_hosts=["localhost"], private_hosts=["localhost"]), home=tmp_path
    )
    with pytest.raises(ImageReadError, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.read(f"https://localhost:{tls_server.port}/ok.png")


def test_an_oversized_remote_image_is_refused_without_downloading_it(
    tls_server: TlsServer, tmp_path: Path
) -> None:
    served = tls_server.served
    policy = _https_policy(tls_server, tmp_path, max_bytes=100_000)
    big = f"https://127.0.0.1:{tls_server.port}/big.png"
    assert policy.refusal(big) is None  # the size is known only once the server answers
    with pytest.raises(ImageRefused) as by_length:
        policy.read(big)
    assert str(by_length.value) == f"{big} is {64 << 20} bytes (Content-Length), more than " + (
        "max_bytes (100000)"
    )
    endless = f"https://127.0.0.1:{tls_server.port}/endless.png"
    with pytest.raises(ImageRefused, match=r"is larger than max_bytes \(100000\)$"):
        policy.read(endless)
    deadline = time.monotonic() + 10
    while not {"/big.png", "/endless.png"} <= served.sent.keys() and time.monotonic() < deadline:
        time.sleep(0.02)
    # The server stopped once the client went away: far less than the 64 MiB it had to send
    # (what it wrote before noticing sits in socket buffers, never read by the policy).
    assert served.sent["/big.png"] < 16 << 20, served.sent
    assert served.sent["/endless.png"] < 16 << 20, served.sent


def test_a_slow_remote_image_is_cut_at_the_deadline(tls_server: TlsServer, tmp_path: Path) -> None:
    policy = _https_policy(tls_server, tmp_path, timeout_s=1.0)
    uri = f"https://localhost:{tls_server.port}/slow.png"
    start = time.monotonic()
    with pytest.raises(ImageRefused) as refused:
        policy.read(uri)
    took = time.monotonic() - start
    assert str(refused.value) == f"{uri} was not read within timeout_s (1 s)"
    assert 1.0 <= took < 2.0, took


# ---- s3:// and gs:// --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a real HTTP S3 API)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_s3_objects_are_read_only_from_allowed_buckets_and_prefixes(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    for name, value in {
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3 = boto3.session.Session().client("s3")
    s3.create_bucket(Bucket="team")
    s3.put_object(Bucket="team", Key="images/cat.png", Body=PNG)
    s3.put_object(Bucket="team", Key="images/huge.png", Body=b"\0" * 5000)
    s3.put_object(Bucket="team", Key="private/secret.png", Body=PNG)
    config = ImageAccessConfig(buckets=["s3://team/images"], max_bytes=4096, timeout_s=5)
    policy = ImagePolicy(config, home=tmp_path)
    assert policy.refusal("s3://team/images/cat.png") is None
    assert policy.read("s3://team/images/cat.png") == PNG
    assert policy.read_image("s3://team/images/cat.png").size == (4, 3)
    with pytest.raises(ImageRefused, match=r"is 5000 bytes, more than max_bytes \(4096\)"):
        policy.read("s3://team/images/huge.png")
    with pytest.raises(ImageReadError, match=r"S3 answered NoSuchKey"):
        policy.read("s3://team/images/gone.png")

    def no_read(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("a refused object was read")

    monkeypatch.setattr("flywheel.media.buckets.read_object", no_read)
    for uri in ("s3://team/private/secret.png", "s3://team/images/../private/secret.png"):
        _refused(policy, uri, "s3://team/")


@pytest.fixture(scope="module")
def gcs_emulator() -> Iterator[str]:
    """A GCS API emulator (gcp-storage-emulator) on 127.0.0.1."""
    from gcp_storage_emulator.server import create_server  # type: ignore[import-untyped]

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="team")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.mark.filterwarnings("ignore:Please install grpcio-status:ImportWarning")  # gs needs none
def test_gs_objects_are_read_only_from_allowed_buckets(
    gcs_emulator: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage  # type: ignore[import-untyped]

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator)
    anonymous = AnonymousCredentials()  # type: ignore[no-untyped-call]
    client = storage.Client(project="test", credentials=anonymous)
    bucket = client.bucket("team")
    bucket.blob("images/cat.png").upload_from_string(PNG)
    bucket.blob("images/huge.png").upload_from_string(b"\0" * 5000)
    config = ImageAccessConfig(buckets=["gs://team/images/"], max_bytes=4096, timeout_s=5)
    policy = ImagePolicy(config, home=tmp_path)
    assert policy.read("gs://team/images/cat.png") == PNG
    with pytest.raises(ImageRefused, match=r"is 5000 bytes, more than max_bytes \(4096\)"):
        policy.read("gs://team/images/huge.png")
    with pytest.raises(ImageReadError, match="no such object"):
        policy.read("gs://team/images/gone.png")
    _refused(policy, "gs://team/other/cat.png", "is not in an allowed bucket")


def test_a_bucket_uri_without_its_client_library_is_refused_naming_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access, "_installed", lambda module: False)
    config = ImageAccessConfig(buckets=["s3://team", "gs://team"])
    policy = ImagePolicy(config, home=tmp_path)
    _refused(policy, "s3://team/cat.png", "s3:// needs boto3: pip install boto3")
    _refused(
        policy,
        "gs://team/cat.png",
        "gs:// needs google-cloud-storage: pip install google-cloud-storage",
    )


# ---- the policy in force ----------------------------------------------------------------------


def test_the_policy_in_force_is_the_project_files_images_table_and_the_home(
    tree: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = ["generator", "judge", "suites", "reward", "enhancer", "corpus", "degrader"]
    project = tmp_path / "flywheel.toml"
    project.write_text(
        "".join(f'[{port}]\nadapter = "world"\n' for port in ports)
        + '[launcher]\nadapter = "in_process"\n'
        + '[images]\nfile_roots = ["root"]\nhttps_hosts = ["images.example"]\nmax_bytes = 4096\n'
    )
    monkeypatch.setenv("FLYWHEEL_PROJECT", str(project))
    monkeypatch.setenv("FLYWHEEL_HOME", str(tree["home"]))
    get_settings.cache_clear()
    try:
        policy = image_policy()
    finally:
        get_settings.cache_clear()
    assert policy.roots == (tree["home"].resolve(), tree["root"].resolve())  # relative: to the file
    assert policy.config.max_bytes == 4096
    assert policy.read((tree["root"] / "ok.png").as_uri()) == PNG
    assert policy.read((tree["home"] / "own.png").as_uri()) == PNG
    _refused(policy, (tree["outside"] / "secret.png").as_uri(), "outside the allowed roots")


# ---- the dashboard (the miners: tests/test_mining.py) ---------------------------------------


def test_the_dashboard_says_why_an_image_is_not_shown_and_opens_nothing(
    tree: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamlit.testing.v1 import AppTest

    from dashboard.common import literal

    monkeypatch.chdir(tmp_path)  # no flywheel.toml: the embedded world's policy, home only
    monkeypatch.delenv("FLYWHEEL_PROJECT", raising=False)
    monkeypatch.setenv("FLYWHEEL_HOME", str(tree["home"]))
    get_settings.cache_clear()
    secret = (tree["outside"] / "secret.png").as_uri()
    uris = [(tree["home"] / "own.png").as_uri(), secret, "https://10.0.0.1/x.png"]

    def draw(uris: list[str]) -> None:
        from dashboard.common import show_image

        for uri in uris:
            show_image(uri, caption="feedback #7")

    try:
        with opened_files() as opened:
            shown = AppTest.from_function(draw, args=(uris,)).run()
    finally:
        get_settings.cache_clear()
    assert not shown.exception, [e.value for e in shown.exception]
    assert len(shown.get("image")) == 1  # the image under the home
    assert [c.value for c in shown.caption] == [
        literal(f"feedback #7: image not shown: {secret} is outside the allowed roots"),
        literal(
            "feedback #7: image not shown: https://10.0.0.1/x.png: host 10.0.0.1 is not an "
            "allowed https host"
        ),
    ]
    assert not [p for p in opened if p.startswith(str(tree["outside"]))], opened
