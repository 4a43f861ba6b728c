"""The guard for URLs that ffworker itself connects to (webhooks; later, URL inputs).

Two checks, both refusing the same addresses:

* ``check_url_literal(url)`` — at registration and submit time: only ``http`` and
  ``https``, a host, no credentials, and no host that names a guarded address
  literally (an IP literal in any spelling ``inet_aton`` accepts, ``localhost``).
* ``open_connection(url, timeout_s)`` — at every attempt: resolves the host, refuses
  every guarded address, connects to an address it checked, and checks again the
  peer address of the socket it got (the address actually connected to), so a DNS
  answer that changes between a check and the connection (rebinding) gains nothing.

Guarded: loopback, private (RFC 1918), shared (100.64/10), unique-local (fc00::/7),
link-local, multicast, unspecified (``0.0.0.0``, ``::``), reserved and documentation
ranges (anything not globally routable), IPv4-mapped, NAT64, 6to4 and Teredo IPv6
forms, and the cloud metadata addresses. ``allow_private=True``
(``FFWORKER_ALLOW_PRIVATE_URLS=1``) lifts the address checks, never the scheme check.
"""
from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
from urllib.parse import urlsplit

SCHEMES = ("http", "https")
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",   # AWS, GCP, Azure, OpenStack, DigitalOcean …
    "169.254.170.2",     # AWS ECS task metadata
    "100.100.100.200",   # Alibaba Cloud
    "192.0.0.192",       # Oracle Cloud
    "fd00:ec2::254",     # AWS over IPv6
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$", re.IGNORECASE)


class BlockedURL(ValueError):
    """The URL is not one ffworker may connect to; the message says why (no secrets in it)."""


def guarded(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` is refused, or None when it may be connected to."""
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address"
        if address in _NAT64 or address.sixtofour is not None or address.teredo is not None:
            return "an IPv6 address embedding an IPv4 one"
        if address.scope_id:
            return "a scoped IPv6 address"
    for reason, test in (
        ("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
        ("link-local", address.is_link_local), ("multicast", address.is_multicast),
        ("private", address.is_private), ("reserved", address.is_reserved),
    ):
        if test:
            return f"a {reason} address"
    if not address.is_global:
        return "not a globally routable address"
    return None


def _literal_address(host: str):
    """The address a host names literally (dotted, shortened, decimal or hex IPv4; IPv6), else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def check_url_literal(url: str, *, allow_private: bool = False) -> str:
    """Refuse (``BlockedURL``) a URL that is not http(s) or that names a guarded host; returns it."""
    if not isinstance(url, str) or len(url) > 2048:
        raise BlockedURL("must be an http or https URL of at most 2048 characters")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise BlockedURL("must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise BlockedURL("is not a valid URL")
    if parts.scheme.lower() not in SCHEMES:
        raise BlockedURL("must be an http or https URL")
    host = parts.hostname
    if not host:
        raise BlockedURL("must name a host")
    if parts.username is not None or parts.password is not None:
        raise BlockedURL("must not carry credentials (user:password@)")
    if port == 0:
        raise BlockedURL("must not use port 0")
    if allow_private:
        return url
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        raise BlockedURL("must not name the local host")
    address = _literal_address(host)
    if address is not None:
        reason = guarded(address)
        if reason:
            raise BlockedURL(f"must not name {reason}")
    return url


def resolve(host: str, port: int, *, allow_private: bool = False) -> list[tuple]:
    """``getaddrinfo`` answers for a TCP connection, with every guarded one refused.

    Refuses the whole name when any of its addresses is guarded: a name that also
    resolves to an internal address is not one to trust with the others.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ConnectionError(f"cannot resolve the host: {exc.strerror}") from None
    if not allow_private:
        for info in infos:
            reason = guarded(ipaddress.ip_address(info[4][0]))
            if reason:
                raise BlockedURL(f"the host resolves to {reason}")
    return infos


def _connect(host: str, port: int, timeout_s: float, allow_private: bool) -> socket.socket:
    last: Exception | None = None
    for family, kind, proto, _, sockaddr in resolve(host, port, allow_private=allow_private):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout_s)
            sock.connect(sockaddr)
            peer = ipaddress.ip_address(sock.getpeername()[0])
            reason = None if allow_private else guarded(peer)
            if reason:
                raise BlockedURL(f"connected to {reason}")
            return sock
        except BlockedURL:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            last = exc
    raise last or ConnectionError("no address to connect to")


class _GuardedHTTPConnection(http.client.HTTPConnection):
    allow_private = False

    def connect(self) -> None:
        self.sock = _connect(self.host, self.port, self.timeout, self.allow_private)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    allow_private = False

    def connect(self) -> None:
        sock = _connect(self.host, self.port, self.timeout, self.allow_private)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def open_connection(url: str, timeout_s: float, *, allow_private: bool = False) -> tuple[http.client.HTTPConnection, str]:
    """(an unconnected guarded connection for ``url``, the request target: path and query).

    The connection resolves and checks the host when it connects (its first request).
    It never follows redirects and never uses a proxy from the environment.
    """
    check_url_literal(url, allow_private=allow_private)
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.scheme.lower() == "https":
        connection = _GuardedHTTPSConnection(parts.hostname, parts.port, timeout=timeout_s,
                                             context=ssl.create_default_context())
    else:
        connection = _GuardedHTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    connection.allow_private = allow_private
    return connection, target
