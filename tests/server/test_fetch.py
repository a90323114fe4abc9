"""server.fetch: the SSRF guard (address tables, no network) and fetching against loopback listeners.

Nothing here leaves the machine: names resolve through the policy's resolver hook, real sockets are
loopback only, and the one table that uses the system resolver runs in a private network namespace.
"""

from __future__ import annotations

import asyncio
import gzip
import http.server
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from urllib.parse import quote, unquote

import httpx
import pytest

from server.errors import APIError
from server.fetch import FetchPolicy, ImageFetcher, address_allowed, fetch_image, ipv4_literal
from server.settings import Settings
from tests.live import ROOT, LiveServer, image_message
from tests.tools import missing_tool

PARAM = "messages[0].content[1].image_url.url"
LOOPBACK = ("127.0.0.0/8",)  # what the live-socket tests let through; every other check still runs


# -- spies ---------------------------------------------------------------------------------------------
class _Audit:
    """Records this thread's socket.connect and socket.getaddrinfo calls (audit events, so no code
    path around a monkeypatch can hide one)."""

    installed = False
    active: "_Audit | None" = None

    def __init__(self):
        self.thread = threading.get_ident()
        self.connects: list = []
        self.lookups: list = []

    @classmethod
    def hook(cls, event, args):
        spy = cls.active
        if spy is None or threading.get_ident() != spy.thread:
            return
        if event == "socket.connect":
            spy.connects.append(args[1])
        elif event == "socket.getaddrinfo":
            spy.lookups.append(args[0])


@pytest.fixture
def audit():
    if not _Audit.installed:
        sys.addaudithook(_Audit.hook)
        _Audit.installed = True
    spy = _Audit.active = _Audit()
    yield spy
    _Audit.active = None


class Resolver:
    """A resolver hook with a fixed table that records what it was asked."""

    def __init__(self, table: dict[str, list[str]] | None = None):
        self.table = table or {}
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host, port):
        self.calls.append((host, port))
        return self.table.get(host, [])


def refused(url: str, policy: FetchPolicy) -> APIError:
    with pytest.raises(APIError) as info:
        fetch_image(url, policy, param=PARAM)
    err = info.value
    assert err.status == 400 and err.param == PARAM and err.message
    assert err.body()["error"]["type"] == "invalid_request_error"
    return err


# -- the address check ---------------------------------------------------------------------------------
@pytest.mark.parametrize("address, allowed", [
    ("8.8.8.8", True), ("93.184.216.34", True), ("1.1.1.1", True),
    ("2606:4700::1111", True), ("2001:4860:4860::8888", True),
    ("::ffff:8.8.8.8", True),  # mapped: judged by the IPv4 it reaches
    ("64:ff9b::808:808", True),  # NAT64 to a public IPv4
    ("2002:808:808::1", True),  # 6to4 of a public IPv4
    ("127.0.0.1", False), ("127.255.255.254", False), ("0.0.0.0", False), ("0.1.2.3", False),
    ("10.0.0.1", False), ("172.16.0.1", False), ("172.31.255.255", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("169.254.0.1", False), ("100.64.0.1", False), ("100.127.255.254", False),
    ("198.18.0.1", False), ("198.19.255.255", False), ("192.0.0.8", False), ("192.0.2.1", False),
    ("198.51.100.1", False), ("203.0.113.1", False), ("192.88.99.1", False), ("224.0.0.1", False),
    ("239.255.255.250", False), ("240.0.0.1", False), ("255.255.255.255", False),
    ("::", False), ("::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False),
    ("::ffff:169.254.169.254", False), ("::127.0.0.1", False), ("::8.8.8.8", False),  # IPv4-compatible
    ("64:ff9b::7f00:1", False), ("64:ff9b::a00:1", False), ("64:ff9b:1::808:808", False),
    ("2002:7f00:1::", False), ("2002:a00:1::1", False), ("2002:a9fe:a9fe::", False),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo, client in 192.0.2/24
    ("2001:0:808:808:0:f7f7:f7f7:f7f7", False),  # Teredo with public server and client: still a tunnel
    ("fe80::1", False), ("fe80::1%eth0", False), ("2606:4700::1111%eth0", False), ("fec0::1", False), ("fc00::1", False), ("fd12:3456::1", False),
    ("ff02::1", False), ("ff0e::1", False), ("100::1", False), ("2001:db8::1", False),
])
def test_address_allowed(address, allowed):
    assert address_allowed(ipaddress.ip_address(address)) is allowed


@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"), ("127.0.1", "127.0.0.1"), ("2130706433", "127.0.0.1"),
    ("0x7f000001", "127.0.0.1"), ("0x7f.0.0.1", "127.0.0.1"), ("0x7F.1", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"),
    ("0177.1", "127.0.0.1"), ("017700000001", "127.0.0.1"), ("0", "0.0.0.0"), ("00", "0.0.0.0"),
    ("0xa9.0xfe.0xa9.0xfe", "169.254.169.254"), ("10.1", "10.0.0.1"), ("1.16777215", "1.255.255.255"),
    ("4294967295", "255.255.255.255"), ("4294967296", None), ("1.16777216", None), ("256.1", None),
    ("1.2.3.256", None), ("08", None), ("0x", None), ("1.2.3.4.5", None), ("1..2", None), ("1_0", None),
    ("+1", None), ("example.com", None), ("0x7g", None),
])
def test_ipv4_literal_reads_what_inet_aton_reads(host, expected):
    got = ipv4_literal(host)
    assert (str(got) if got else None) == expected
    try:  # the system's own reading must agree, or getaddrinfo would reach an address we did not check
        system = socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        system = None
    assert system == expected


# -- URLs refused before any lookup or connection --------------------------------------------------------
# (url, code); none of these may resolve through the system or open a socket.
REFUSED_LITERALS = [
    ("http://127.0.0.1/a.png", "image_url_refused"),
    ("http://2130706433/", "image_url_refused"),
    ("http://0x7f.0.0.1/", "image_url_refused"),
    ("http://0x7f000001/", "image_url_refused"),
    ("http://0177.1/", "image_url_refused"),
    ("http://017700000001/", "image_url_refused"),
    ("http://127.1/", "image_url_refused"),
    ("http://127.0.1/", "image_url_refused"),
    ("http://127.0.0.1./", "image_url_refused"),
    ("http://0.0.0.0/", "image_url_refused"),
    ("http://0/", "image_url_refused"),
    ("http://10.0.0.1/", "image_url_refused"),
    ("http://169.254.169.254/latest/meta-data/", "image_url_refused"),
    ("http://0xa9fea9fe/", "image_url_refused"),
    ("http://100.64.0.1/", "image_url_refused"),
    ("http://198.18.0.1/", "image_url_refused"),
    ("http://255.255.255.255/", "image_url_refused"),
    ("http://224.0.0.1/", "image_url_refused"),
    ("http://240.0.0.1/", "image_url_refused"),
    ("https://127.0.0.1:8443/", "image_url_refused"),
    ("http://[::1]/", "image_url_refused"),
    ("http://[::]/", "image_url_refused"),
    ("http://[::ffff:127.0.0.1]/", "image_url_refused"),
    ("http://[::ffff:7f00:1]/", "image_url_refused"),
    ("http://[::ffff:a9fe:a9fe]/", "image_url_refused"),
    ("http://[::127.0.0.1]/", "image_url_refused"),
    ("http://[64:ff9b::7f00:1]/", "image_url_refused"),
    ("http://[64:ff9b:1::808:808]/", "image_url_refused"),
    ("http://[2002:7f00:0001::]/", "image_url_refused"),
    ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "image_url_refused"),
    ("http://[2001::]/", "image_url_refused"),
    ("http://[fe80::1]/", "image_url_refused"),
    ("http://[fe80::1%25eth0]/", "image_url_refused"),
    ("http://[fe80::1%25lo]:8080/", "image_url_refused"),
    ("http://[fc00::1]/", "image_url_refused"),
    ("http://[fd00::1]/", "image_url_refused"),
    ("http://[fec0::1]/", "image_url_refused"),
    ("http://[ff02::1]/", "image_url_refused"),
    ("http://user:pw@8.8.8.8/", "image_url_refused"),
    ("file:///etc/passwd", "image_url_refused"),
    ("gopher://127.0.0.1:70/", "image_url_refused"),
    # malformed: httpx.URL raises, or the host is no name and no address
    ("http://[::1/", "invalid_image_url"),
    ("http://0177.0.0.1/", "invalid_image_url"),  # httpx itself rejects leading-zero dotted quads
    ("http://127.000.000.001/", "invalid_image_url"),
    ("http://xn--/", "invalid_image_url"),
    ("http://\u2488.com/", "invalid_image_url"),  # IDNA cannot encode it
    ("http://\uff11\uff12\uff17.0.0.1/", "invalid_image_url"),  # fullwidth digits
    ("http://a..b/", "invalid_image_url"),
    ("http://" + "a" * 64 + ".com/", "invalid_image_url"),
    ("http://%31%32%37.0.0.1/", "invalid_image_url"),
    ("http://1.2.3.4.5/", "invalid_image_url"),
    ("http://08/", "invalid_image_url"),
    ("http://0x1ffffffff/", "invalid_image_url"),
    ("http://127.0.0.1:99999/", "invalid_image_url"),
    ("http://127.0.0.1:0/", "invalid_image_url"),
    ("http://127.0.0.1:abc/", "invalid_image_url"),
    ("http://[v1.x]/", "invalid_image_url"),
    ("http:///a.png", "image_url_refused"),  # no host
]


@pytest.mark.parametrize("url, code", REFUSED_LITERALS)
def test_literal_and_malformed_urls_refused_without_lookup_or_connect(url, code, audit):
    resolver = Resolver()
    t0 = time.monotonic()
    err = refused(url, FetchPolicy(timeout=5, resolver=resolver))
    assert err.code == code, err.message
    assert resolver.calls == [] and audit.lookups == [] and audit.connects == []
    assert time.monotonic() - t0 < 0.5


NAMES = {
    "localhost": ["127.0.0.1", "::1"],
    "internal.example": ["10.0.0.5"],
    "metadata.example": ["169.254.169.254"],
    "v6.example": ["fd00::5"],
    "mapped.example": ["::ffff:192.168.0.1"],
    "nat64.example": ["64:ff9b::a9fe:a9fe"],
    "cgnat.example": ["100.64.1.1"],
    "mixed.example": ["93.184.216.34", "10.0.0.5"],  # one private address refuses the whole name
    "junk.example": ["not-an-address"],
}


@pytest.mark.parametrize("url, asked", [
    ("http://localhost/a.png", "localhost"),
    ("http://LOCALHOST./a.png", "localhost"),  # trailing dot and case: the same name
    ("http://internal.example/", "internal.example"),
    ("http://metadata.example/", "metadata.example"),
    ("https://v6.example/", "v6.example"),
    ("http://mapped.example/", "mapped.example"),
    ("http://nat64.example/", "nat64.example"),
    ("http://cgnat.example/", "cgnat.example"),
    ("http://mixed.example/", "mixed.example"),
    ("http://junk.example/", "junk.example"),
    ("http://nowhere.example/", "nowhere.example"),  # resolves to nothing
])
def test_names_resolving_to_non_public_addresses_refused_without_connect(url, asked, audit):
    resolver = Resolver(NAMES)
    err = refused(url, FetchPolicy(timeout=5, resolver=resolver))
    assert err.code == "image_url_refused", err.message
    assert [h for h, _ in resolver.calls] == [asked]
    assert audit.lookups == [] and audit.connects == []


def test_allow_list_is_checked_before_resolving(audit):
    resolver = Resolver({"evil.example": ["93.184.216.34"]})
    err = refused("http://evil.example/", FetchPolicy(allowed_domains=("images.example",), resolver=resolver))
    assert err.code == "image_url_refused" and "allow-list" in err.message
    assert resolver.calls == [] and audit.connects == []


def test_allowed_networks_let_exactly_loopback_through(audit):
    """The test hook opens loopback only: private space stays refused, and so does loopback without it."""
    resolver = Resolver({"both.example": ["127.0.0.1", "10.0.0.1"]})
    err = refused("http://both.example:9/", FetchPolicy(resolver=resolver, allowed_networks=LOOPBACK))
    assert err.code == "image_url_refused"
    assert refused("http://10.0.0.1:9/", FetchPolicy(allowed_networks=LOOPBACK)).code == "image_url_refused"
    assert refused("http://127.0.0.1:9/", FetchPolicy()).code == "image_url_refused"
    assert audit.connects == []


# -- the same refusals with the system resolver, inside a private network namespace ------------------
NETNS_SNIPPET = r"""
import json, sys, threading, time
from server.errors import APIError
from server.fetch import FetchPolicy, fetch_image
events = []
me = threading.get_ident()
sys.addaudithook(lambda e, a: events.append(e) if e == "socket.connect" and threading.get_ident() == me else None)
out = []
for url in json.loads(sys.argv[1]):
    events.clear()
    t0 = time.monotonic()
    try:
        fetch_image(url, FetchPolicy(timeout=5), param="p")
        code = "fetched"
    except APIError as e:
        code = e.code
    out.append([url, code, len(events), time.monotonic() - t0])
print(json.dumps(out))
"""


def _netns_available() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0


def test_refusals_hold_with_the_system_resolver_in_a_private_network_namespace():
    """No resolver hook: real getaddrinfo, in a namespace where nothing can leave the machine.
    A guard that let any of these through would show a connect attempt (they fail in there)."""
    if not _netns_available():
        missing_tool("`unshare --net` is unavailable (needs root or user namespaces)")
    cases = dict(REFUSED_LITERALS)
    cases.update({"http://localhost/a.png": "image_url_refused", "http://localhost./a.png": "image_url_refused",
                  "http://no-such-host.invalid/": "image_url_refused"})
    proc = subprocess.run(["unshare", "--net", sys.executable, "-c", NETNS_SNIPPET, json.dumps(list(cases))],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert len(results) == len(cases)
    for url, code, connects, elapsed in results:
        assert (code, connects) == (cases[url], 0), url
        assert elapsed < 1.0, url


# -- loopback listeners ----------------------------------------------------------------------------------
class Target:
    """A loopback HTTP/1.1 server. Routes: /png, /hop/N (redirects on to N+1 until `ok_after`, then
    /png), /to?<url> (redirects there), /chunked/N (N bytes chunked, no length; -1: endless),
    /drip (one byte every 50 ms), /gap/S (one byte every S seconds), /encoded/E (`body` sent with
    Content-Encoding E: gzip, or "gzip, gzip", compressed that many times). Records (path, Host
    header) per request."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, body: bytes = b"\x89PNG-image", ok_after: int = 10**9):
        outer = self
        self.requests: list[tuple[str, str]] = []
        self.stop = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                outer.requests.append((self.path, self.headers.get("Host")))
                try:
                    outer.route(self, body, ok_after)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the fetcher hung up, as it should on a cap or a deadline

            def log_message(self, *a):
                pass

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 64  # many URLs connect at once

        self.httpd = Server((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]

    def route(self, h, body: bytes, ok_after: int) -> None:
        if h.path == "/png":
            return self.send(h, 200, body)
        if h.path.startswith("/hop/"):
            n = int(h.path.rsplit("/", 1)[1])
            return self.send(h, 302, location="/png" if n >= ok_after else f"/hop/{n + 1}")
        if h.path.startswith("/to?"):
            return self.send(h, 302, location=unquote(h.path[4:]))
        if h.path.startswith("/chunked/"):
            return self.chunked(h, int(h.path.rsplit("/", 1)[1]), 8192, 0.0)
        if h.path == "/drip":
            return self.chunked(h, -1, 1, 0.05)
        if h.path == "/eof-drip":  # no length, no chunks: the body ends when the connection does
            h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n")
            h.close_connection = True
            for _ in range(200):
                if self.stop.is_set():
                    break
                h.wfile.write(b"x")
                h.wfile.flush()
                time.sleep(0.05)
            return None
        if h.path.startswith("/gap/"):
            return self.chunked(h, -1, 1, float(h.path.rsplit("/", 1)[1]))
        if h.path.startswith("/encoded/"):
            encoding = unquote(h.path.rsplit("/", 1)[1])
            data = body
            for _ in encoding.split(",") if encoding != "identity" else ():
                data = gzip.compress(data)
            return self.send(h, 200, data, headers={"Content-Encoding": encoding})
        self.send(h, 404)

    @staticmethod
    def send(h, status: int, body: bytes = b"", location: str | None = None, headers: dict | None = None) -> None:
        h.send_response(status)
        if location:
            h.send_header("Location", location)
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def chunked(self, h, total: int, size: int, pause: float) -> None:
        """`total` bytes (-1: until stopped, at most 10 s) in chunks of `size`, no Content-Length."""
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        sent, give_up = 0, time.monotonic() + 20
        while (total < 0 or sent < total) and not self.stop.is_set() and time.monotonic() < give_up:
            n = size if total < 0 else min(size, total - sent)
            h.wfile.write(b"%x\r\n%s\r\n" % (n, b"x" * n))
            h.wfile.flush()
            sent += n
            time.sleep(pause)
        h.wfile.write(b"0\r\n\r\n")

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def target():
    t = Target()
    yield t
    t.close()


def policy(**kw) -> FetchPolicy:
    return FetchPolicy(**{"timeout": 5, "allowed_networks": LOOPBACK, **kw})


def test_fetches_from_an_allowed_listener_and_the_spy_sees_the_connect(target, audit):
    """The positive control for every `connects == []` above: a real fetch is seen."""
    assert fetch_image(target.url("/png"), policy(), param=PARAM) == b"\x89PNG-image"
    assert audit.connects == [("127.0.0.1", target.port)]
    assert target.paths == ["/png"]


def test_the_connection_goes_to_the_checked_address_and_keeps_the_name(target, audit):
    resolver = Resolver({"images.example": ["127.0.0.1"]})
    url = f"http://images.example:{target.port}/png"
    assert fetch_image(url, policy(resolver=resolver), param=PARAM) == b"\x89PNG-image"
    assert resolver.calls == [("images.example", target.port)]
    assert set(audit.lookups) <= {"127.0.0.1"}  # the system resolver only ever sees the pinned address
    assert audit.connects == [("127.0.0.1", target.port)]
    assert target.requests == [("/png", f"images.example:{target.port}")]


def test_tls_sni_carries_the_name_not_the_pinned_address(tmp_path, audit):
    if not shutil.which("openssl"):
        missing_tool("the openssl CLI is missing (to make a test certificate)")
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=images.example"],
                   check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    seen: list[str | None] = []
    ctx.sni_callback = lambda sock, name, c: seen.append(name)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        try:
            ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            pass  # the self-signed certificate is refused by the fetcher: expected
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        resolver = Resolver({"images.example": ["127.0.0.1"]})
        err = refused(f"https://images.example:{port}/png", policy(resolver=resolver))
        assert err.code == "image_url_failed"  # an untrusted certificate is a failed fetch, not a 500
        thread.join(5)
        assert seen == ["images.example"]
        assert audit.connects == [("127.0.0.1", port)]
    finally:
        listener.close()


def test_fetch_times_out_on_a_listener_that_never_answers(audit):
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) but never reads or writes
    try:
        t0 = time.monotonic()
        err = refused(f"http://127.0.0.1:{listener.getsockname()[1]}/png", policy(timeout=0.5))
        elapsed = time.monotonic() - t0
        assert err.code == "image_url_failed" and "timed out" in err.message
        assert 0.4 < elapsed < 1.5
        assert len(audit.connects) == 1
    finally:
        listener.close()


def test_a_slow_drip_cannot_outlast_the_deadline(target):
    """Each byte comes well within the timeout; the whole body never would."""
    t0 = time.monotonic()
    err = refused(target.url("/drip"), policy(timeout=0.6))
    assert err.code == "image_url_failed" and "timed out" in err.message
    assert time.monotonic() - t0 < 1.5


def test_redirects_are_followed_up_to_the_limit():
    target = Target(ok_after=2)
    try:
        assert fetch_image(target.url("/hop/0"), policy(max_redirects=3), param=PARAM) == b"\x89PNG-image"
        assert target.paths == ["/hop/0", "/hop/1", "/hop/2", "/png"]
    finally:
        target.close()


def test_too_many_redirects(target):
    err = refused(target.url("/hop/0"), policy(max_redirects=2))
    assert err.code == "image_url_refused" and "too many redirects" in err.message
    assert target.paths == ["/hop/0", "/hop/1", "/hop/2"]  # the first request and two redirects, no more


@pytest.mark.parametrize("location, code", [
    ("http://10.0.0.1/x.png", "image_url_refused"),
    ("http://169.254.169.254/latest/meta-data/", "image_url_refused"),
    ("http://[::ffff:192.168.0.1]/x.png", "image_url_refused"),
    ("http://[::1]/x.png", "image_url_refused"),
    ("http://internal.example/x.png", "image_url_refused"),  # a name that resolves to private space
    ("file:///etc/passwd", "image_url_refused"),
    ("http://[::1", "image_url_failed"),  # httpx reads the Location itself: a protocol error, still a 400
])
def test_a_redirect_is_checked_like_the_first_url(target, audit, location, code):
    resolver = Resolver(NAMES)
    err = refused(target.url("/to?" + quote(location, safe="")), policy(resolver=resolver))
    assert err.code == code, err.message
    assert target.paths == ["/to?" + quote(location, safe="")]
    assert audit.connects == [("127.0.0.1", target.port)]  # only the first hop ever connected


def test_byte_cap_on_a_chunked_body_without_length(target):
    assert fetch_image(target.url("/chunked/50000"), policy(max_bytes=50_000), param=PARAM) == b"x" * 50_000
    t0 = time.monotonic()
    err = refused(target.url("/chunked/-1"), policy(max_bytes=100_000, timeout=5))  # endless body
    assert err.code == "image_too_large"
    assert time.monotonic() - t0 < 2  # stopped at the cap, not at the deadline


def test_next_address_is_tried_when_connecting_fails(target, audit):
    """127.0.0.2 and ::1 have no listener on this port (refused, or unreachable without IPv6)."""
    resolver = Resolver({"dual.example": ["::1", "127.0.0.2", "127.0.0.1"]})
    got = fetch_image(f"http://dual.example:{target.port}/png",
                      policy(resolver=resolver, allowed_networks=("127.0.0.0/8", "::1/128")), param=PARAM)
    assert got == b"\x89PNG-image"
    assert [a[0] for a in audit.connects] == ["::1", "127.0.0.2", "127.0.0.1"]
    assert target.requests == [("/png", f"dual.example:{target.port}")]


def test_next_address_is_tried_when_connecting_times_out(target, audit):
    """A listener whose backlog is full drops SYNs: connecting to it times out, not refuses."""
    try:
        blackhole = socket.create_server(("127.0.0.3", target.port), backlog=0)
    except OSError:
        pytest.skip("127.0.0.3 with the target's port is taken")
    filler = socket.create_connection(("127.0.0.3", target.port))  # fills the backlog
    audit.connects.clear()
    try:
        resolver = Resolver({"slow.example": ["127.0.0.3", "127.0.0.1"]})
        t0 = time.monotonic()
        got = fetch_image(f"http://slow.example:{target.port}/png", policy(resolver=resolver, timeout=2),
                          param=PARAM)
        assert got == b"\x89PNG-image"
        assert 0.8 < time.monotonic() - t0 < 1.8  # half the deadline on the first address, then the second
        assert [a[0] for a in audit.connects] == ["127.0.0.3", "127.0.0.1"]
    finally:
        filler.close()
        blackhole.close()


def test_all_addresses_failing_is_image_url_failed(target, audit):
    resolver = Resolver({"dead.example": ["127.0.0.2", "127.0.0.4"]})
    err = refused(f"http://dead.example:{target.port}/png", policy(resolver=resolver))
    assert err.code == "image_url_failed"
    assert [a[0] for a in audit.connects] == ["127.0.0.2", "127.0.0.4"]
    assert target.requests == []


# -- compressed bodies, deadlines ------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["gzip", "gzip, gzip"])
def test_an_encoded_body_is_refused_without_decoding_it(target, encoding):
    """The fetch asks for identity; a body sent encoded anyway is refused, however small it would be."""
    err = refused(target.url("/encoded/" + quote(encoding)), policy())
    assert err.code == "image_url_failed" and "encoded" in err.message
    assert fetch_image(target.url("/encoded/identity"), policy(), param=PARAM) == b"\x89PNG-image"


def test_a_decompression_bomb_is_never_inflated():
    """50 MiB of zeros in gzip-in-gzip is ~200 bytes on the wire: decoding it whole before the cap saw
    it took 50 MiB at once; raw reading never holds more than the wire bytes."""
    import tracemalloc

    target = Target(body=bytes(50 << 20))
    try:
        tracemalloc.start()
        err = refused(target.url("/encoded/" + quote("gzip, gzip")), policy(max_bytes=1 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        target.close()
    assert err.code == "image_url_failed"
    assert peak < 4 << 20, f"{peak / 2**20:.0f} MiB allocated while refusing"


def test_a_byte_just_inside_each_read_timeout_cannot_outlast_the_deadline(target):
    """Every gap (0.7 s) is under the read timeout the fetch started with (1 s): the deadline shuts the
    socket at 1 s instead of the next read running to 1.4 s."""
    t0 = time.monotonic()
    err = refused(target.url("/gap/0.7"), policy(timeout=1.0))
    elapsed = time.monotonic() - t0
    assert err.code == "image_url_failed" and "timed out" in err.message
    assert elapsed < 1.25, elapsed


def test_a_body_the_deadline_cut_short_is_a_timeout_not_an_image(target):
    """A body delimited by the connection's end: the deadline's shutdown ends it too, and what came
    until then is not handed on as the image."""
    err = refused(target.url("/eof-drip"), policy(timeout=0.5))
    assert err.code == "image_url_failed" and "timed out" in err.message


def test_the_deadline_also_ends_a_tls_connection(tmp_path):
    """TLS wraps the connected socket (the original object is detached): the deadline still shuts
    the connection, so a drip over https cannot outlast it either."""
    if not shutil.which("openssl"):
        missing_tool("the openssl CLI is missing (to make a test certificate)")
    import server.fetch as fetch

    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=images.example",
                    "-addext", "subjectAltName=DNS:images.example"], check=True, capture_output=True)
    target = Target()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    target.httpd.socket = server_ctx.wrap_socket(target.httpd.socket, server_side=True)
    trusting = ssl.create_default_context(cafile=str(cert))
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fetch, "tls_context", lambda: trusting)
            resolver = Resolver({"images.example": ["127.0.0.1"]})
            url = f"https://images.example:{target.port}"
            assert fetch_image(url + "/png", policy(resolver=resolver), param=PARAM) == b"\x89PNG-image"
            t0 = time.monotonic()
            err = refused(url + "/gap/0.7", policy(resolver=resolver, timeout=1.0))
            assert "timed out" in err.message
            assert time.monotonic() - t0 < 1.25  # before: the next read ran on to 1.4 s
    finally:
        target.close()


def test_a_slow_resolver_is_bounded_by_the_deadline():
    def slow(host, port):
        time.sleep(3)
        return ["127.0.0.1"]

    t0 = time.monotonic()
    err = refused("http://slow-dns.example/png", policy(timeout=0.5, resolver=slow))
    assert err.code == "image_url_failed" and "timed out" in err.message
    assert time.monotonic() - t0 < 1.0


def test_a_requests_urls_are_fetched_at_once_under_one_deadline(target):
    """8 slow URLs cost one timeout, not 8; a fast one among them still comes back first in order."""
    fetcher = ImageFetcher(policy(timeout=1.0), workers=16)
    urls = [(target.url("/png"), "p0")] + [(target.url("/drip"), f"p{i}") for i in range(1, 9)]
    try:
        t0 = time.monotonic()
        with pytest.raises(APIError) as info:
            asyncio.run(fetcher.fetch_all(urls))
        elapsed = time.monotonic() - t0
        assert info.value.code == "image_url_failed" and "timed out" in info.value.message
        assert elapsed < 1.6, elapsed
        assert sorted(target.paths) == sorted(["/png"] + ["/drip"] * 8)  # all 9 were in flight together
        good = asyncio.run(fetcher.fetch_all([(target.url("/png"), "a"), (target.url("/chunked/10"), "b")]))
        assert good == [b"\x89PNG-image", b"x" * 10]
    finally:
        fetcher.close()


def test_the_first_failure_stops_the_requests_other_fetches(target):
    fetcher = ImageFetcher(policy(timeout=5.0))
    try:
        t0 = time.monotonic()
        with pytest.raises(APIError) as info:
            asyncio.run(fetcher.fetch_all([(target.url("/drip"), "a"), (target.url("/missing"), "b")]))
        assert info.value.param == "b" and "404" in info.value.message
        assert time.monotonic() - t0 < 1.0  # not the drip's 5 s
    finally:
        fetcher.close()


# -- through the HTTP server -----------------------------------------------------------------------------
def test_server_answers_refusals_as_openai_400s(tiny_dir, target):
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", allow_image_urls=True)) as s:
        for url, code in ((f"http://2130706433:{target.port}/png", "image_url_refused"),
                          (f"http://[::ffff:127.0.0.1]:{target.port}/png", "image_url_refused"),
                          ("http://[::1/", "invalid_image_url"),
                          ("http://\u2488.com/", "invalid_image_url")):
            r = httpx.post(s.url + "/v1/chat/completions", timeout=30,
                           json={"model": "tiny", "messages": [image_message("x", url)]})
            assert r.status_code == 400, (url, r.text)
            assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                          "param": PARAM, "code": code}}
        assert target.requests == []


def test_slow_image_urls_never_hold_up_requests_without_them(tiny_dir, target):
    """Two requests with 8 slow URLs each (a byte every 50 ms, never done): each fails after one
    timeout, and a text-only request sent meanwhile is answered at once (URL fetching has a pool of
    its own; preparation workers never wait on the network)."""
    with LiveServer(Settings(model=str(tiny_dir), device="cpu", allow_image_urls=True, image_url_allow_private=True,
                             image_url_timeout=2.0)) as s:
        slow = {"model": "tiny", "max_tokens": 2, "messages": [image_message("x", *[target.url("/drip")] * 8)]}
        text = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}

        async def run():
            async with httpx.AsyncClient(base_url=s.url, timeout=30) as client:
                t0 = time.monotonic()
                slow_calls = [asyncio.create_task(client.post("/v1/chat/completions", json=slow)) for _ in range(2)]
                while len(target.paths) < 16 and time.monotonic() - t0 < 2:
                    await asyncio.sleep(0.02)
                t1 = time.monotonic()
                r = await client.post("/v1/chat/completions", json=text)
                text_seconds = time.monotonic() - t1
                answers = await asyncio.gather(*slow_calls)
                return r, text_seconds, answers, time.monotonic() - t0

        r, text_seconds, answers, total = asyncio.run(run())
        assert r.status_code == 200, r.text
        assert text_seconds < 1.0, text_seconds
        assert len(target.paths) == 16  # every URL of both requests was in flight at once
        for a in answers:
            assert a.status_code == 400 and a.json()["error"]["code"] == "image_url_failed", a.text
        assert total < 3.5, total  # one 2 s deadline per request, not 8
