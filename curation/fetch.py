"""A guarded urllib opener for crawling: address policy, scheme policy, redirect and size limits.

img2dataset downloads through ``urllib.request.urlopen``; installing this opener with
``urllib.request.install_opener`` in each download worker puts every request (and every redirect
hop) through these checks without touching img2dataset's code.

Why each check exists:
- A crawler fed untrusted URLs must not reach internal services (SSRF): hosts are resolved once,
  every resolved address is checked, and the socket connects to the checked address itself, so a
  DNS answer cannot change between check and connect.
- Only http and https are fetched: urllib would otherwise read ``file://`` paths from local disk.
- The body is read at most ``max_bytes`` (+1) so a huge or endless response cannot exhaust memory.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field

ALLOWED_SCHEMES = ("http", "https")


class FetchRefused(urllib.error.URLError):
    """A request refused by policy. ``str()`` starts with the error class so it survives
    img2dataset, which keeps only the message of a failed download."""

    def __init__(self, error_class: str, detail: str):
        super().__init__(f"{error_class}: {detail}")
        self.error_class = error_class

    def __str__(self) -> str:
        return str(self.reason)


@dataclass(frozen=True)
class FetchPolicy:
    """What the crawler may fetch. The defaults are safe for the open web."""

    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    # Networks that are allowed even though they are internal (the demo web on 127.0.0.1).
    allowed_networks: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        for net in self.allowed_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as err:
                raise ValueError(
                    f"allowed network {net!r} is not an address or CIDR range (e.g. 127.0.0.1/32)"
                ) from err


def is_internal_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Addresses a public crawler has no business connecting to."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def check_address(address: str, policy: FetchPolicy) -> None:
    """Raise ``FetchRefused('blocked_address')`` for an internal address outside the allow list."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if not is_internal_address(ip):
        return
    if any(ip in ipaddress.ip_network(net, strict=False) for net in policy.allowed_networks):
        return
    raise FetchRefused("blocked_address", f"{address} is a loopback, private, link-local or multicast address")


def _guarded_create_connection(policy: FetchPolicy):
    def create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
        host, port = address
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise FetchRefused("dns_failure", f"cannot resolve {host}: {err.strerror}") from err
        for *_, sockaddr in infos:
            check_address(sockaddr[0], policy)
        last_error: OSError | None = None
        for family, socktype, proto, _, sockaddr in infos:
            sock = socket.socket(family, socktype, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as err:
                sock.close()
                last_error = err
        assert last_error is not None
        raise last_error

    return create_connection


def _connection_classes(policy: FetchPolicy):
    create_connection = _guarded_create_connection(policy)

    class GuardedHTTPConnection(http.client.HTTPConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = create_connection

    class GuardedHTTPSConnection(http.client.HTTPSConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = create_connection

    return GuardedHTTPConnection, GuardedHTTPSConnection


class _CappedResponse:
    """Wraps an http.client response so that reading past ``max_bytes`` fails instead of
    buffering an arbitrarily large body."""

    def __init__(self, response, max_bytes: int):
        self._response = response
        self._max_bytes = max_bytes

    def read(self, amt: int | None = None) -> bytes:
        if amt is not None:
            return self._response.read(amt)
        data = self._response.read(self._max_bytes + 1)
        if len(data) > self._max_bytes:
            raise FetchRefused("too_large", f"body exceeds the limit of {self._max_bytes} bytes")
        return data

    def __getattr__(self, name):
        return getattr(self._response, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._response.close()


def build_opener(policy: FetchPolicy) -> urllib.request.OpenerDirector:
    """An opener with only http(s), guarded connections, bounded redirects and bodies."""
    http_connection, https_connection = _connection_classes(policy)

    class GuardedHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_connection, req)

    class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_connection, req, context=self._context)

    class RedirectHandler(urllib.request.HTTPRedirectHandler):
        max_redirections = policy.max_redirects

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            scheme = urllib.parse.urlsplit(newurl).scheme.lower()
            if scheme not in ALLOWED_SCHEMES:
                raise FetchRefused("unsupported_scheme", f"redirect to a {scheme or 'relative'} URL")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    class SizeLimitProcessor(urllib.request.BaseHandler):
        handler_order = 900  # after the redirect handling, before the error processor

        def http_response(self, request, response):
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                response.close()
                raise FetchRefused(
                    "too_large", f"Content-Length {length} exceeds the limit of {policy.max_bytes} bytes"
                )
            return _CappedResponse(response, policy.max_bytes)

        https_response = http_response

    class SchemeGuard(urllib.request.BaseHandler):
        def unknown_open(self, req):
            raise FetchRefused("unsupported_scheme", f"only http and https are fetched, not {req.type}://")

    opener = urllib.request.OpenerDirector()
    for handler in (
        GuardedHTTPHandler(),
        GuardedHTTPSHandler(),
        RedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        SizeLimitProcessor(),
        SchemeGuard(),
    ):
        opener.add_handler(handler)
    return opener


def install(policy: FetchPolicy) -> None:
    """Make ``urllib.request.urlopen`` (used by img2dataset) go through the guarded opener."""
    urllib.request.install_opener(build_opener(policy))
