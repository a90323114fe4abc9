"""Fetching http(s) image URLs without becoming an SSRF proxy.

The URL is parsed once, by httpx (the library that fetches it). The host is normalised (IPv4 in any
spelling a resolver accepts, IPv6 with its embedded IPv4) and, when it is a name, resolved once;
every address is checked before any connection (no loopback, private, link-local, metadata,
multicast, reserved or tunnel ranges). The connection goes to a checked address (Host header and TLS
SNI keep the name), the next one only when connecting fails. Redirects are followed by hand, each hop
checked again; the body is read raw (a `Content-Encoding` is refused: no decompression bomb) and
capped while it streams in.

One `Deadline` covers a whole request's URLs: name resolution (on a bounded pool of its own, waited
for no longer than the deadline), connects and reads. When it passes, every socket still open for the
request is shut, so a server that drips a byte just inside each read timeout cannot outlast it.
`ImageFetcher` fetches a request's URLs concurrently on a bounded pool of its own, so that requests
without URLs never wait behind slow ones.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field

import httpx

from .errors import APIError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class FetchPolicy:
    allowed_domains: tuple[str, ...] = ()  # empty: any public host
    timeout: float = 10.0  # seconds for all of a request's URLs: every lookup, hop, address and byte
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 3
    allow_private: bool = False  # testing only: turns the address guard off
    resolver: object = field(default=None, compare=False)  # callable(host, port) -> list[str]
    allowed_networks: tuple[str, ...] = ()  # testing: ("127.0.0.0/8",) lets exactly loopback through


def _refuse(message: str, param: str, code: str = "image_url_refused") -> APIError:
    return APIError(400, message, param=param, code=code)


def _invalid(message: str, param: str) -> APIError:
    return _refuse(message, param, code="invalid_image_url")


# -- addresses ---------------------------------------------------------------------------------------
# Ranges that is_global lets through or that differ between Python versions, plus IPv6 prefixes that
# tunnel to IPv4 in ways not worth following (IPv4-compatible, local-use NAT64, Teredo: its client
# address is obfuscated and its server a relay, so the whole prefix is refused).
_BLOCKED = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "100.64.0.0/10", "192.0.0.0/24", "192.88.99.0/24", "198.18.0.0/15", "240.0.0.0/4",
    "255.255.255.255/32", "::/96", "64:ff9b:1::/48", "100::/64", "2001::/32", "2001:db8::/32", "fc00::/7",
    "fe80::/10", "fec0::/10", "ff00::/8"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known prefix: the low 32 bits are the IPv4 target


def address_allowed(addr: IPAddress) -> bool:
    """A globally routable unicast address. IPv6 that embeds IPv4 is judged by the IPv4 it reaches."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            return False
        if addr.ipv4_mapped is not None:
            return address_allowed(addr.ipv4_mapped)
        if addr in _NAT64:
            return address_allowed(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
        if addr.sixtofour is not None:  # judged by the IPv4 it reaches: Python's own tables for
            return address_allowed(addr.sixtofour)  # 2002::/16 differ between patch releases
    if any(addr in net for net in _BLOCKED):
        return False
    return addr.is_global and not (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_multicast
                                    or addr.is_reserved or addr.is_unspecified
                                    or getattr(addr, "is_site_local", False))


@functools.lru_cache(maxsize=16)
def _networks(specs: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(s) for s in specs)


def _permitted(addr: IPAddress, policy: FetchPolicy) -> bool:
    return policy.allow_private or address_allowed(addr) or any(addr in n for n in _networks(policy.allowed_networks))


# -- hosts -------------------------------------------------------------------------------------------
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)")
_V4_PART = re.compile(r"0x(?P<hex>[0-9a-f]+)|0(?P<oct>[0-7]*)|(?P<dec>[1-9][0-9]*)")


def _v4_part(part: str) -> int | None:
    m = _V4_PART.fullmatch(part)
    if not m:
        return None
    if m["dec"] is not None:
        return int(m["dec"])
    return int(m["hex"], 16) if m["hex"] is not None else int(m["oct"] or "0", 8)


def ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """The spellings inet_aton (and so getaddrinfo) reads as IPv4: one to four parts, each decimal,
    0x hex or 0-led octal, the last one filling the remaining bytes (127.1, 0x7f000001, 0177.0.1)."""
    parts = host.lower().split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers = [_v4_part(p) for p in parts]
    if None in numbers:
        return None
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(parts)):
        return None
    value = 0
    for n in head:
        value = value << 8 | n
    return ipaddress.IPv4Address(value << 8 * (5 - len(parts)) | last)


def _host(url: httpx.URL, param: str) -> tuple[str, IPAddress | None]:
    """(normalised host, its address when the host is an IP literal in any spelling)."""
    host = url.raw_host.decode("ascii", "replace").lower()
    if ":" in host:  # httpx accepts only a bracketed, valid IPv6 literal here
        if "%" in host:
            raise _refuse("zone ids in image URLs are not allowed", param)
        try:
            return host, ipaddress.IPv6Address(host)
        except ValueError:
            raise _invalid(f"invalid IPv6 host {host!r}", param) from None
    host = host[:-1] if host.endswith(".") else host  # one trailing dot names the same host
    if not host or len(host) > 253 or not _NAME.fullmatch(host):
        raise _invalid(f"invalid host {host!r} in image URL", param)
    if _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):  # ends in a number: an IPv4 address or nothing
        addr = ipv4_literal(host)
        if addr is None:
            raise _invalid(f"invalid IPv4 host {host!r} in image URL", param)
        return str(addr), addr
    return host, None


def _domain_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    if not allowed:
        return True
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in (a.lower().strip(".") for a in allowed))


# getaddrinfo cannot be interrupted: it runs here, and a fetch waits for it no longer than its
# deadline (a stuck lookup holds a thread of this pool, never a request past its deadline).
_RESOLVERS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="slime-dns")


def _lookup(host: str, port: int, policy: FetchPolicy) -> list[str]:
    if policy.resolver is not None:
        return list(policy.resolver(host, port))  # type: ignore[operator]
    return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def _resolve(host: str, port: int, policy: FetchPolicy, deadline: "Deadline", param: str) -> list[IPAddress]:
    future = _RESOLVERS.submit(_lookup, host, port, policy)
    try:
        found = future.result(timeout=deadline.remaining(param))
        addresses = [ipaddress.ip_address(a) for a in dict.fromkeys(found)]
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise _refuse(f"resolving {host!r} timed out", param, code="image_url_failed") from None
    except (OSError, UnicodeError, ValueError):  # gaierror, an unencodable name, a resolver's non-address
        addresses = []
    if not addresses:
        raise _refuse(f"cannot resolve {host!r}", param)
    return addresses


@dataclass(frozen=True)
class _Target:
    host: str  # normalised: what the allow-list, the resolver and SNI see
    addresses: tuple[IPAddress, ...]  # all checked, in the resolver's order


def _target(url: httpx.URL, policy: FetchPolicy, deadline: "Deadline", param: str) -> _Target:
    """Every check of one hop, in order, all before any connection."""
    if url.scheme not in ("http", "https"):
        raise _refuse(f"scheme {url.scheme!r} is not allowed for image URLs", param)
    if url.userinfo:
        raise _refuse("credentials in image URLs are not allowed", param)
    if not url.raw_host:
        raise _refuse("image URL has no host", param)
    port = url.port if url.port is not None else (443 if url.scheme == "https" else 80)
    if not 0 < port < 65536:
        raise _invalid(f"invalid port {port} in image URL", param)
    host, literal = _host(url, param)
    if not _domain_allowed(host, policy.allowed_domains):
        raise _refuse(f"host {host!r} is not in the image URL allow-list", param)
    addresses = [literal] if literal is not None else _resolve(host, port, policy, deadline, param)
    if not all(_permitted(a, policy) for a in addresses):  # one bad address refuses the whole name
        what = "is not a public address" if literal is not None else "resolves to a non-public address"
        raise _refuse(f"image URL host {host!r} {what}", param)
    return _Target(host, tuple(addresses))


# -- fetching ----------------------------------------------------------------------------------------
def _timed_out(param: str) -> APIError:
    return _refuse("fetching the image URL timed out", param, code="image_url_failed")


class Deadline:
    """One request's time for all its image URLs. When it passes, or `cancel()` gives up on the
    request, every socket still open for it is shut down, which wakes a read blocked on it."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self.expired = False
        self._timer = threading.Timer(max(0.0, seconds), self.cancel)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self, param: str) -> float:
        left = self.at - time.monotonic()
        if left <= 0 or self.expired:
            raise _timed_out(param)
        return left

    def cancel(self) -> None:
        with self._lock:
            self.expired = True
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            _shut(sock)

    def close(self) -> None:
        """The request is done with its URLs: stop the timer."""
        self._timer.cancel()

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            if not self.expired:
                self._sockets.add(sock)
                return
        _shut(sock)

    def untrack(self, sock: socket.socket | None) -> None:
        with self._lock:
            self._sockets.discard(sock)  # type: ignore[arg-type]

    def tracer(self, opened: list):
        """An httpcore `trace` extension that tracks the connection's socket once it is connected.
        A duplicate of it: TLS wraps the socket later and detaches the original object, but a
        shutdown through any descriptor of the connection ends it."""
        def trace(event: str, info: dict) -> None:
            if event == "connection.connect_tcp.complete" and info.get("return_value") is not None:
                sock = info["return_value"].get_extra_info("socket")
                if sock is not None:
                    dup = socket.socket(fileno=os.dup(sock.fileno()))
                    opened.append(dup)
                    self.track(dup)
        return trace


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def _parse(url: str, param: str, base: httpx.URL | None = None) -> httpx.URL:
    try:
        return base.join(url) if base is not None else httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):  # IDNA failures are UnicodeError, a ValueError
        raise _invalid("malformed image URL", param) from None


def _dial_host(addr: IPAddress) -> str:
    mapped = getattr(addr, "ipv4_mapped", None)
    return str(mapped or addr)  # a mapped address is dialled as the IPv4 it stands for


def _read_capped(r: httpx.Response, policy: FetchPolicy, deadline: Deadline, param: str) -> bytes:
    declared = r.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
        raise _refuse("image at URL is too large", param, code="image_too_large")
    # Asked for identity; a body encoded anyway would be decoded a whole network read at a time
    # before any cap could see it (334 bytes of gzip-in-gzip make 100 MiB).
    encoding = r.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise _refuse(f"image URL sent a {encoding!r}-encoded body; only identity is accepted", param,
                      code="image_url_failed")
    chunks, size = [], 0
    for chunk in r.iter_raw():  # raw bytes, counted as they arrive: chunked bodies declare no length
        size += len(chunk)
        if size > policy.max_bytes:
            raise _refuse("image at URL is too large", param, code="image_too_large")
        deadline.remaining(param)
        chunks.append(chunk)
    deadline.remaining(param)  # a body read to the connection's end: the deadline's shutdown may have ended it
    return b"".join(chunks)


@functools.lru_cache(maxsize=1)
def tls_context():
    """The TLS settings of every fetch, built once: loading the CA bundle takes ~50 ms with the GIL
    held (~200 ms the first time), which a client per fetch paid while the engine waited."""
    return httpx.create_ssl_context()


def _get(url: httpx.URL, addr: IPAddress, target: _Target, timeout: httpx.Timeout, policy: FetchPolicy,
         deadline: Deadline, param: str) -> bytes | httpx.URL:
    """One GET to one checked address: the body, or where a redirect points."""
    headers = {"Host": url.netloc.decode("ascii"), "Accept": "image/*", "Accept-Encoding": "identity"}
    opened: list[socket.socket] = []
    extensions: dict = {"trace": deadline.tracer(opened)}
    if url.scheme == "https":
        extensions["sni_hostname"] = target.host
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False, verify=tls_context()) as client:
            with client.stream("GET", url.copy_with(host=_dial_host(addr)), headers=headers,
                               extensions=extensions) as r:
                if r.is_redirect:
                    return _parse(r.headers["location"], param, base=url)
                if r.status_code != 200:
                    raise _refuse(f"image URL answered HTTP {r.status_code}", param, code="image_url_failed")
                return _read_capped(r, policy, deadline, param)
    finally:
        for sock in opened:
            deadline.untrack(sock)
            sock.close()


def _fetch_hop(url: httpx.URL, target: _Target, policy: FetchPolicy, deadline: Deadline,
               param: str) -> bytes | httpx.URL:
    """Addresses in the resolver's order; only a failed connect moves on to the next."""
    for i, addr in enumerate(target.addresses):
        left = deadline.remaining(param)
        timeout = httpx.Timeout(left, connect=left / (len(target.addresses) - i))  # leave time for the rest
        try:
            return _get(url, addr, target, timeout, policy, deadline, param)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            continue
        except httpx.HTTPError as e:
            if deadline.expired or isinstance(e, httpx.TimeoutException):  # expired: its sockets were shut
                raise _timed_out(param) from None
            raise _refuse(f"fetching the image URL failed: {type(e).__name__}", param,
                          code="image_url_failed") from None
    deadline.remaining(param)  # connects cut short by the deadline are a timeout
    raise _refuse(f"cannot connect to {target.host!r}", param, code="image_url_failed")


def fetch_image(url: str, policy: FetchPolicy, *, param: str, deadline: Deadline | None = None) -> bytes:
    """The body at `url` (following checked redirects), within `deadline` (default: its own, of
    `policy.timeout` seconds)."""
    own = deadline is None
    deadline = Deadline(policy.timeout) if deadline is None else deadline
    try:
        current = _parse(url, param)
        for _hop in range(policy.max_redirects + 1):
            result = _fetch_hop(current, _target(current, policy, deadline, param), policy, deadline, param)
            if isinstance(result, bytes):
                return result
            current = result
        raise _refuse("too many redirects", param)
    finally:
        if own:
            deadline.close()


class ImageFetcher:
    """Fetches the image URLs of requests on a bounded pool of its own, each request's URLs at once
    under one deadline (`policy.timeout`): a request with URLs never holds a worker that requests
    without them need, and 8 slow URLs cost a request one timeout, not eight."""

    def __init__(self, policy: FetchPolicy, workers: int = 32):
        self.policy = policy
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slime-fetch")
        tls_context()  # now, at start-up, not in the first request

    async def fetch_all(self, urls: list[tuple[str, str]]) -> list[bytes]:
        """(url, param) pairs -> their bodies, in order; the first failure (in URL order among
        those that failed first) fails them all and stops the rest."""
        if not urls:
            return []
        loop = asyncio.get_running_loop()
        deadline = Deadline(self.policy.timeout)
        futures = [loop.run_in_executor(self.pool, functools.partial(fetch_image, url, self.policy, param=param,
                                                                     deadline=deadline))
                   for url, param in urls]
        try:
            await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
            failed = [f for f in futures if f.done() and not f.cancelled() and f.exception() is not None]
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
            return [f.result() for f in futures]
        finally:
            if not all(f.done() for f in futures):  # failed, or the client went away: stop the others
                deadline.cancel()
                for f in futures:
                    f.cancel()
            deadline.close()
            for f in futures:  # the exceptions of the others are not news
                if f.done() and not f.cancelled():
                    f.exception()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
