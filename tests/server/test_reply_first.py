"""A client waiting for a reply gets it before the work that can wait (log lines,
metrics, the Received: field of the data to come); a pipelining client still gets
its group's replies in one write (RFC 2920)."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from mailgate.app import build_context, build_listeners
from mailgate.delivery.spool import SpoolFile
from mailgate.ops.logging import SessionLog
from mailgate.server.context import ServerContext
from mailgate.server.session import Session

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n.\r\n"


class _Transport:
    """Records each write and each log line in one sequence, in the order they came."""

    def __init__(self, seen: list[tuple[str, str]]) -> None:
        self.seen = seen
        self.writes: list[bytes] = []
        self.closing = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 25)}.get(name)

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.seen.append(("write", data.decode()))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.fixture
def ctx(tmp_path: Path) -> ServerContext:
    from mailgate.config.loader import load_config

    path = tmp_path / "mailgate.toml"
    path.write_text(
        f'[server]\nhostname = "mx.mailgate.org"\nspool_dir = "{tmp_path}/s"\n'
        "[policy]\nverify_sender_domain = false\n"
        f'[delivery]\nmaildir_root = "{tmp_path}/m"\nlocal_domains = ["mailgate.org"]\n'
        'system_users = false\nlocal_users = ["bob"]\ndefault = "hole"\n'
        '[delivery.destinations.hole]\ntype = "discard"\n'
    )
    return build_context(load_config(str(path)))


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    order: list[tuple[str, str]] = []
    real = SessionLog.event

    def event(self: SessionLog, name: str, /, level: str = "info", **fields: object) -> None:
        order.append(("log", name))
        real(self, name, level, **fields)

    monkeypatch.setattr(SessionLog, "event", event)
    return order


async def _session(ctx: ServerContext, seen: list[tuple[str, str]]) -> tuple[Session, _Transport]:
    session = Session(ctx, build_listeners(ctx)[0])
    transport = _Transport(seen)
    session.connection_made(transport)  # type: ignore[arg-type]
    await _turn(session, transport, b"EHLO client.mailgate.org\r\n")
    return session, transport


async def _turn(session: Session, transport: _Transport, data: bytes) -> str:
    """Send ``data`` and wait for the session's next write (a client that waits)."""
    before = len(transport.writes)
    if data:
        session.data_received(data)
    for _ in range(500):
        if len(transport.writes) > before:
            await asyncio.sleep(0.01)  # what the session does after the write, done
            return transport.writes[before].decode()
        await asyncio.sleep(0.002)
    raise AssertionError(f"no reply to {data!r}")


def test_the_250_leaves_before_the_message_is_logged(
    ctx: ServerContext, seen: list[tuple[str, str]]
) -> None:
    async def go() -> None:
        session, transport = await _session(ctx, seen)
        assert (await _turn(session, transport, b"MAIL FROM:<a@mailgate.org>\r\n"))[:3] == "250"
        assert (await _turn(session, transport, b"RCPT TO:<bob@mailgate.org>\r\n"))[:3] == "250"
        assert (await _turn(session, transport, b"DATA\r\n"))[:3] == "354"
        del seen[:]
        assert (await _turn(session, transport, MESSAGE)).startswith("250 2.0.0")
        await _turn(session, transport, b"QUIT\r\n")

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
        session, transport = await _session(ctx, seen)
        before = len(transport.writes)
        session.data_received(b"RSET\r\nMAIL FROM:<a@mailgate.org>\r\n"
                              b"RCPT TO:<bob@mailgate.org>\r\nRCPT TO:<x@elsewhere.example>\r\n"
                              b"DATA\r\n")
        await _turn(session, transport, b"")
        writes = transport.writes[before:]
        await _turn(session, transport, MESSAGE)
        await _turn(session, transport, b"QUIT\r\n")
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
        session, transport = await _session(ctx, seen)
        replies = [
            await _turn(session, transport, b"MAIL FROM:<a@mailgate.org>\r\n"),
            await _turn(session, transport, b"RCPT TO:<bob@mailgate.org>\r\n"),
            await _turn(session, transport, b"DATA\r\n"),
            await _turn(session, transport, MESSAGE),
        ]
        await _turn(session, transport, b"QUIT\r\n")
        return replies

    replies = asyncio.run(go())
    assert [r[:3] for r in replies] == ["250", "250", "354", "452"]
    assert replies[3].startswith("452 4.3.1")
    assert ("log", "spool") in seen
