"""Fetching http(s) image URLs without becoming an SSRF proxy.

The URL is parsed once, by httpx (the library that fetches it); the host is resolved once and
every address checked (no loopback, private, link-local, metadata, multicast or reserved ranges);
the connection goes to the checked address (Host header and TLS SNI keep the name); redirects are
followed by hand, each hop checked again; the body is capped while it streams in.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

import httpx

from .errors import APIError


@dataclass(frozen=True)
class FetchPolicy:
    allowed_domains: tuple[str, ...] = ()  # empty: any public host
    timeout: float = 10.0
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 3
    allow_private: bool = False  # tests only: lets a loopback listener through the address guard
    resolver: object = field(default=None, compare=False)  # callable(host, port) -> list[str]


def _refuse(message: str, param: str, code: str = "image_url_refused") -> APIError:
    return APIError(400, message, param=param, code=code)


def _domain_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    if not allowed:
        return True
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in (a.lower().lstrip(".") for a in allowed))


def _address_ok(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not (addr.is_multicast or addr.is_reserved or addr.is_link_local)


def _resolve(host: str, port: int, policy: FetchPolicy) -> list[str]:
    if policy.resolver is not None:
        return list(policy.resolver(host, port))  # type: ignore[operator]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return list(dict.fromkeys(info[4][0] for info in infos))


def fetch_image(url: str, policy: FetchPolicy, *, param: str) -> bytes:
    current = httpx.URL(url)
    for _hop in range(policy.max_redirects + 1):
        if current.scheme not in ("http", "https"):
            raise _refuse(f"scheme {current.scheme!r} is not allowed for image URLs", param)
        host = current.host
        if not host:
            raise _refuse("image URL has no host", param)
        if current.userinfo:
            raise _refuse("credentials in image URLs are not allowed", param)
        if not _domain_allowed(host, policy.allowed_domains):
            raise _refuse(f"host {host!r} is not in the image URL allow-list", param)
        port = current.port or (443 if current.scheme == "https" else 80)
        addresses = _resolve(host, port, policy)
        if not addresses:
            raise _refuse(f"cannot resolve {host!r}", param)
        if not policy.allow_private and not all(_address_ok(a) for a in addresses):
            raise _refuse(f"host {host!r} resolves to a non-public address", param)
        ip = addresses[0]
        pinned = current.copy_with(host=ip)
        headers = {"Host": current.netloc.decode("ascii"), "Accept": "image/*"}
        extensions = {"sni_hostname": host} if current.scheme == "https" else {}
        try:
            with httpx.Client(timeout=policy.timeout, follow_redirects=False, trust_env=False) as client:
                with client.stream("GET", pinned, headers=headers, extensions=extensions) as r:
                    if r.is_redirect:
                        location = r.headers.get("location")
                        if not location:
                            raise _refuse("redirect without a Location", param)
                        current = current.join(location)
                        continue
                    if r.status_code != 200:
                        raise _refuse(f"image URL answered HTTP {r.status_code}", param, code="image_url_failed")
                    declared = r.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                        raise _refuse("image at URL is too large", param, code="image_too_large")
                    chunks, size = [], 0
                    for chunk in r.iter_bytes():
                        size += len(chunk)
                        if size > policy.max_bytes:
                            raise _refuse("image at URL is too large", param, code="image_too_large")
                        chunks.append(chunk)
                    return b"".join(chunks)
        except httpx.TimeoutException:
            raise _refuse("fetching the image URL timed out", param, code="image_url_failed") from None
        except httpx.HTTPError as e:
            raise _refuse(f"fetching the image URL failed: {type(e).__name__}", param, code="image_url_failed") from None
    raise _refuse("too many redirects", param)
