"""Listening sockets, bound before the event loop (and the workers) start.

Binding here rather than inside ``loop.create_server`` lets the supervisor bind
once, as root if port 25 needs it, and hand the same sockets to every worker it
forks: the kernel then gives each new connection to whichever worker accepts first,
which is the one with time for it.
"""

from __future__ import annotations

import contextlib
import socket

from mailgate.config.loader import split_host_port

BACKLOG = 1024


def bind_listener(address: str, backlog: int = BACKLOG) -> list[socket.socket]:
    """Sockets listening on every address ``HOST:PORT`` resolves to (as asyncio's
    create_server would bind them); OSError when one of them cannot be bound."""
    host, port = split_host_port(address)
    try:
        infos = socket.getaddrinfo(
            host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as exc:  # say which listener: its host is not an address
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    bound: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _name, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # one socket per family, as asyncio does: [::] must not also take IPv4
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in bound:
            with contextlib.suppress(OSError):
                sock.close()
        raise
    return bound
