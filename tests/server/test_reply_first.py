"""A client waiting for a reply gets it before the work that can wait (log lines,
metrics, the Received: field of the data to come); a pipelining client still gets
its group's replies in one write (RFC 2920)."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from mailgate.delivery.spool import SpoolFile
from mailgate.ops.logging import SessionLog
from mailgate.server.context import ServerContext
from tests.server.harness import MESSAGE, context, session, turn


@pytest.fixture
def ctx(tmp_path: Path) -> ServerContext:
    return context(tmp_path)


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    order: list[tuple[str, str]] = []
    real = SessionLog.event

    def event(self: SessionLog, name: str, /, level: str = "info", **fields: object) -> None:
        order.append(("log", name))
        real(self, name, level, **fields)

    monkeypatch.setattr(SessionLog, "event", event)
    return order


def test_the_250_leaves_before_the_message_is_logged(
    ctx: ServerContext, seen: list[tuple[str, str]]
) -> None:
    async def go() -> None:
        s, transport = await session(ctx, seen)
        assert (await turn(s, transport, b"MAIL FROM:<a@mailgate.org>\r\n"))[:3] == "250"
        assert (await turn(s, transport, b"RCPT TO:<bob@mailgate.org>\r\n"))[:3] == "250"
        assert (await turn(s, transport, b"DATA\r\n"))[:3] == "354"
        del seen[:]
        assert (await turn(s, transport, MESSAGE)).startswith("250 2.0.0")
        await turn(s, transport, b"QUIT\r\n")

    asyncio.run(go())
    first_write = seen.index(next(s for s in seen if s[0] == "write"))
    logged = [name for kind, name in seen[first_write:] if kind == "log"]
    # the message's lines come after its 250, not before it
    assert seen[first_write][1].startswith("250 2.0.0")
    assert logged[:2] == ["delivery", "message"]


def test_a_pipelined_group_is_still_answered_in_one_write(
    ctx: ServerContext, seen: list[tuple[str, str]]
) -> None:
    async def go() -> list[bytes]:
        s, transport = await session(ctx, seen)
        before = len(transport.writes)
        s.data_received(b"RSET\r\nMAIL FROM:<a@mailgate.org>\r\n"
                              b"RCPT TO:<bob@mailgate.org>\r\nRCPT TO:<x@elsewhere.example>\r\n"
                              b"DATA\r\n")
        await turn(s, transport, b"")
        writes = transport.writes[before:]
        await turn(s, transport, MESSAGE)
        await turn(s, transport, b"QUIT\r\n")
        return writes

    writes = asyncio.run(go())
    assert len(writes) == 1
    codes = [line[:3] for line in writes[0].decode().splitlines()]
    assert codes == ["250", "250", "250", "550", "354"]


def test_a_received_field_that_cannot_be_spooled_fails_the_message(
    ctx: ServerContext, seen: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Received: field is written after the 354 has gone: a spool that cannot take
    it makes the end of the data a 452, as a spool that fails during the data does."""
    real = SpoolFile.write

    def write(self: SpoolFile, data: bytes) -> None:
        if data.startswith(b"Received:"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, data)

    monkeypatch.setattr(SpoolFile, "write", write)

    async def go() -> list[str]:
        s, transport = await session(ctx, seen)
        replies = [
            await turn(s, transport, b"MAIL FROM:<a@mailgate.org>\r\n"),
            await turn(s, transport, b"RCPT TO:<bob@mailgate.org>\r\n"),
            await turn(s, transport, b"DATA\r\n"),
            await turn(s, transport, MESSAGE),
        ]
        await turn(s, transport, b"QUIT\r\n")
        return replies

    replies = asyncio.run(go())
    assert [r[:3] for r in replies] == ["250", "250", "354", "452"]
    assert replies[3].startswith("452 4.3.1")
    assert ("log", "spool") in seen
