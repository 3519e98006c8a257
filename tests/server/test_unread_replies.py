"""A client that pipelines commands the engine answers alone (HELP, NOOP, BDAT chunks)
and never reads the replies is paused at the transport's high-water mark, as one
sending decisions is: its replies are not piled up in memory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mailgate.app import build_listeners
from mailgate.server import session as session_module
from tests.server.harness import Transport, context, session

HIGH_WATER = 64 * 1024  # asyncio's default for a transport's write buffer


class _Unread(Transport):
    """A transport whose peer reads nothing: past the high-water mark it pauses the
    protocol, as asyncio's do; and reading can be paused."""

    def __init__(self) -> None:
        super().__init__([])
        self.buffered = 0
        self.protocol: object = None
        self.reading = True

    def write(self, data: bytes) -> None:
        super().write(data)
        before, self.buffered = self.buffered, self.buffered + len(data)
        if before <= HIGH_WATER < self.buffered:
            self.protocol.pause_writing()  # type: ignore[attr-defined]

    def pause_reading(self) -> None:
        self.reading = False


def test_a_help_flood_that_is_not_read_stops_at_the_high_water_mark(tmp_path: Path) -> None:
    # (past junk_command_limit such a flood is soon closed: here it must not be)
    ctx = context(tmp_path, "junk_command_limit = 1000000")

    async def go() -> tuple[int, int, bool]:
        transport = _Unread()
        s, _ = await session(ctx, [])
        # (the harness's own transport took the greeting and EHLO; this one the flood)
        transport.protocol = s
        s.transport = transport  # type: ignore[assignment]
        s.data_received(b"HELP\r\n" * 200_000)  # 1.2 MB, ~22 MB of replies
        await asyncio.sleep(0.3)
        return transport.buffered, s.conn.buffered if s.conn else 0, transport.reading

    written, unread_input, reading = asyncio.run(go())
    # one batch past the mark at most (256 HELP replies of ~110 octets), and the rest
    # of the input is left unread, the session paused
    assert written <= 2 * HIGH_WATER
    assert unread_input > 1_000_000 and not reading


class _Closing(Transport):
    """A transport whose close() never completes (the peer reads nothing, so the
    last replies never leave); abort() ends the connection as asyncio's does."""

    def __init__(self) -> None:
        super().__init__([])
        self.protocol: object = None
        self.aborted = False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass  # (a FIN after replies that never leave)

    def close(self) -> None:
        self.closing = True  # (and nothing more: the unsent replies hold it open)

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = self.closing = True
            self.protocol.connection_lost(None)  # type: ignore[attr-defined]

    def get_write_buffer_size(self) -> int:
        return 0 if self.aborted else 4096  # replies nobody reads


@pytest.mark.parametrize(
    ("ending", "lingers"),
    [(b"FOO\r\nNOOP\r\n", True),  # 500, then 421: we end it, and linger for its FIN
     (b"QUIT\r\n", False)],  # its own QUIT: closed at once, but close() waits too
)
def test_a_session_ended_while_its_client_reads_nothing_lets_go_at_linger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ending: bytes, lingers: bool
) -> None:
    # The lingering session waited for close(), which waits for its last replies to
    # be read: never, for a client with its window shut, so it held its descriptor
    # and its place in the connection limits for good (an audit's, 108 s and on).
    monkeypatch.setattr(session_module, "LINGER", 0.2)
    ctx = context(tmp_path, "max_errors = 1")

    async def go() -> tuple[bool, int]:
        transport = _Closing()
        s = session_module.Session(ctx, build_listeners(ctx)[0])
        transport.protocol = s
        s.connection_made(transport)  # type: ignore[arg-type]
        s.data_received(b"EHLO client.mailgate.org\r\n" + ending)
        await asyncio.sleep(0.1)
        assert s._lingering is lingers and not transport.aborted
        assert ctx.counts.total() == (1 if lingers else 0)  # (lingering: its place held)
        await asyncio.sleep(0.4)
        return transport.aborted, ctx.counts.total()

    assert asyncio.run(go()) == (True, 0)


def test_a_help_flood_is_closed_once_past_the_junk_and_error_limits(tmp_path: Path) -> None:
    ctx = context(tmp_path, "junk_command_limit = 10\nmax_errors = 5")

    async def go() -> tuple[bytes, bool]:
        transport = _Unread()
        s, _ = await session(ctx, [])
        transport.protocol = s
        s.transport = transport  # type: ignore[assignment]
        s.data_received(b"HELP\r\n" * 1000)
        await asyncio.sleep(0.1)
        return b"".join(transport.writes), s.conn is None or s.conn.closed

    written, closed = asyncio.run(go())
    assert written.count(b"214 2.0.0") == 15  # the limit, then the error budget
    assert written.endswith(b"421 4.7.0 mx.mailgate.org Too many errors, closing connection\r\n")
    assert closed
