"""An implicit-TLS (smtps, RFC 8314) listener that admits a connection before its handshake.

``loop.create_server(ssl=...)`` makes the TLS handshake before any session exists:
half-made handshakes were then neither counted in the connection limits nor logged,
each held for the event loop's own handshake timeout, and a PROXY header (which a
balancer sends before the TLS bytes) could not be read at all.  Here the listener
accepts the socket itself, so that, in this order,

1. a PROXY header from an allowed balancer is read off the plain socket (peeked, so
   that not one byte of the ClientHello is taken with it);
2. the connection is counted in ``max_connections`` and ``max_connections_per_ip``
   and refused by closing it (no 421 can be said before TLS);
3. the handshake runs, bounded by ``command_timeout``, and a failed one is logged and
   counted and gives its place back;

and only then a :class:`~mailgate.server.session.Session` starts, already admitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

from mailgate.ops.logging import SessionLog, log_event
from mailgate.protocol.replies import reply
from mailgate.server.proxy import ProxyError, ProxyHeader, parse_proxy
from mailgate.server.session import (
    PROXY_HEADER_MAX,
    Session,
    client_address,
    ip_text,
    new_session_id,
)

if TYPE_CHECKING:
    from mailgate.server.context import IPAddress, ListenerContext, ServerContext

ACCEPTS_PER_WAKEUP = 64  # as asyncio's servers: others get their turn between batches
ACCEPT_RETRY_DELAY = 1.0  # out of descriptors: accepting again after this many seconds
# accept() errors that say the process or the system is out of something, not that one
# connection went wrong: accepting is paused for a while rather than spun on.
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class TlsAcceptor:
    """Serves one listening socket of an smtps listener (see the module)."""

    def __init__(
        self, server: ServerContext, listener: ListenerContext, sock: socket.socket,
        ssl_context: Callable[[], ssl.SSLContext | None],
    ) -> None:
        self.server = server
        self.listener = listener
        self.sock = sock
        # asked for each connection: a reload's new certificates apply at once
        self._ssl_context = ssl_context
        self._pending: set[asyncio.Task[None]] = set()  # connections not yet sessions
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting; connections still in their handshake are dropped."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for task in self._pending:
            task.cancel()

    async def wait_closed(self) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending))

    def _accept(self) -> None:
        loop = self._loop
        assert loop is not None
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # another worker took it, or nothing left
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    log_event("accept", level="error", listener=self.listener.name,
                              error=str(exc)[:200], retry_in=ACCEPT_RETRY_DELAY)
                    loop.remove_reader(self.sock.fileno())
                    loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
                    return
                continue  # (ECONNABORTED and the like: that client is gone)
            conn.setblocking(False)
            task = loop.create_task(self._connection(conn, peer))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def _resume(self) -> None:
        if not self._closed and self._loop is not None:
            self._loop.add_reader(self.sock.fileno(), self._accept)

    async def _connection(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        server = self.server
        ip, port = client_address(peer)
        handed = False  # the socket belongs to a transport (which closes it)
        admitted = False
        session: Session | None = None
        try:
            if self.listener.config.proxy_protocol:
                origin = await self._read_proxy(conn, ip, port)
                if origin is None:
                    return
                ip, port, known = origin
            else:
                known = True
            refusal = server.admit_address(ip)
            if refusal is not None:
                SessionLog(new_session_id(), ip=ip_text(ip), listener=self.listener.name).event(
                    "refused", command="connect", code=refusal.code, enhanced=refusal.enhanced,
                    reason=refusal.name, tls="not started")
                server.metrics.rejection(refusal.name or str(refusal.code))
                return
            admitted = True
            ctx = self._ssl_context()
            if ctx is None:  # (start() refuses an smtps listener without [tls])
                return
            session = Session(server, self.listener, origin=(ip, port, known))
            handed = True
            try:
                await asyncio.get_running_loop().connect_accepted_socket(
                    lambda: session, conn, ssl=ctx,
                    ssl_handshake_timeout=server.config.server.command_timeout,
                )
            except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
                SessionLog(session.sid, ip=ip_text(ip), listener=self.listener.name).event(
                    "tls", outcome="failed", error=str(exc)[:200] or type(exc).__name__)
                server.metrics.tls("failed", "")
                return
        finally:
            # Once its connection_made ran, the session gives the place back when it
            # ends; before (a failed or cancelled handshake), nothing else will.
            if admitted and (session is None or session.transport is None):
                server.counts.remove(ip)
            if not handed:
                conn.close()

    async def _read_proxy(
        self, conn: socket.socket, peer_ip: IPAddress, peer_port: int
    ) -> tuple[IPAddress, int, bool] | None:
        """The client a PROXY header names, and whether it names one (the balancer
        itself stands in for LOCAL and UNKNOWN), or None when the connection was
        refused (logged, as the plain listeners log it)."""
        server = self.server

        def refuse(reason: str, answer: bool = False) -> None:
            SessionLog(new_session_id(), ip=ip_text(peer_ip), listener=self.listener.name).event(
                "proxy", level="warning", outcome="refused", reason=reason[:200])
            if answer:  # in plain text, as the balancer spoke (TLS comes after the header)
                with contextlib.suppress(OSError):
                    conn.send(reply("closing.proxy", host=server.hostname).to_bytes())

        if not server.proxy_allowed(peer_ip):
            refuse("not an address of server.proxy_from")
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + server.config.server.command_timeout
        seen = 0
        try:
            while True:
                if not await _readable(conn, deadline - loop.time()):
                    refuse("no whole header within command_timeout")
                    return None
                data = conn.recv(PROXY_HEADER_MAX + 1, socket.MSG_PEEK)
                if len(data) <= seen:  # readable with nothing new: the peer's EOF
                    refuse("closed before the whole header")
                    return None
                seen = len(data)
                try:
                    header = parse_proxy(data)
                except ProxyError as exc:
                    refuse(str(exc), answer=True)
                    return None
                if header is not None:
                    break
                if seen > PROXY_HEADER_MAX:
                    refuse("header longer than PROXY v2 allows", answer=True)
                    return None
                # Readable again only once more than what is here has arrived (else
                # the wait would spin on the bytes already peeked at).
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, seen + 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            _take(conn, header)
        except (BlockingIOError, InterruptedError):
            refuse("header not readable")
            return None
        except OSError as exc:
            refuse(f"connection failed: {exc.strerror or exc}")
            return None
        if header.local:
            return peer_ip, peer_port, False
        return (*client_address((header.source_ip, header.source_port)), True)


def _take(conn: socket.socket, header: ProxyHeader) -> None:
    """Consume exactly the header's octets (already received: they were peeked at)."""
    left = header.consumed
    while left:
        got = conn.recv(left)
        if not got:
            raise OSError(errno.ECONNRESET, "closed in the header")
        left -= len(got)


async def _readable(conn: socket.socket, timeout: float) -> bool:
    """Whether ``conn`` became readable (or hung up) within ``timeout`` seconds."""
    if timeout <= 0:
        return False
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        async with asyncio.timeout(timeout):
            await ready
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(conn.fileno())


__all__ = ["TlsAcceptor"]
