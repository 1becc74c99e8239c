"""Which names the server answers to (QNA_ALLOWED_HOSTS): a guard against DNS rebinding.

A server on this machine's loopback address (`qna serve`'s default, without tokens)
trusts whoever can reach it: only local programs. A web page the user visits can
reach it too, by DNS rebinding: its own name, made to resolve to 127.0.0.1, makes the
browser's requests to it same-origin, past CORS; it could read the history and spend
the LLM account. Such requests carry the page's name in Host, which no local client
sends: they are refused.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

# Flask (and the error module, with the metrics) are imported where they are used:
# `serve` asks `binds_loopback` in the gunicorn master, which must import neither before
# the metrics directory is set (codes.py).


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, as a Host header gives it) is this
    machine's loopback: localhost (and its subdomains, RFC 6761), 127.0.0.0/8, ::1,
    ::ffff:127.0.0.1."""
    host = host.lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def binds_loopback(host: str) -> bool:
    """Whether listening on `host` (as --host gives it) listens on the loopback: as
    the system resolves it, so that 127.1, LOCALHOST or /etc/hosts' ip6-localhost
    count as 127.0.0.1 does."""
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return is_loopback(host)
    return any(is_loopback(str(info[4][0])) for info in found)


def host_name(header: str) -> str:
    """The name in a Host header: lower case, without its port, brackets or final dot."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def install_host_check(app: Flask, allowed: frozenset[str]) -> None:
    """Answer only requests whose Host names this machine's loopback or one of
    `allowed` (names as `host_name` gives them); others get 421 `unknown_host`."""
    from flask import request

    from qna.entrypoints.http.errors import ApiError

    @app.before_request
    def refuse_unknown_hosts() -> None:
        header = request.headers.get("Host")
        if header is None:  # HTTP/1.0: no browser sends a request without one
            return
        name = host_name(header)
        if is_loopback(name) or name in allowed:
            return
        raise ApiError(
            421,
            "unknown_host",
            f"This server does not answer to the name {name[:100]!r}: it listens on this "
            "machine's loopback address, and a web page that reached it by another name "
            "may be a DNS rebinding attack. Set QNA_ALLOWED_HOSTS to the names it is "
            "reached by.",
        )
