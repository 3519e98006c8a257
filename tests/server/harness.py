"""A Session driven in-process, without sockets: a fake transport that records what
is written, and a client that sends a command and waits for the next write."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mailgate.app import build_context, build_listeners
from mailgate.config.loader import load_config
from mailgate.server.context import ServerContext
from mailgate.server.session import Session

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n.\r\n"


def context(tmp_path: Path, server: str = "") -> ServerContext:
    """Mail for bob@mailgate.org into a discard destination; 127.0.0.1 (the fake
    client) is trusted; ``server``: more lines of the [server] table."""
    path = tmp_path / "mailgate.toml"
    path.write_text(
        f'[server]\nhostname = "mx.mailgate.org"\nspool_dir = "{tmp_path}/s"\n{server}\n'
        "[policy]\nverify_sender_domain = false\n"
        f'[delivery]\nmaildir_root = "{tmp_path}/m"\nlocal_domains = ["mailgate.org"]\n'
        'system_users = false\nlocal_users = ["bob"]\ndefault = "hole"\n'
        '[delivery.destinations.hole]\ntype = "discard"\n'
    )
    return build_context(load_config(str(path)))


class Transport:
    """Records each write, in ``writes`` and in the shared ``seen`` sequence; the
    client is ``peer`` (127.0.0.1, trusted by default, unless told otherwise)."""

    def __init__(self, seen: list[tuple[str, str]], peer: str = "127.0.0.1") -> None:
        self.seen = seen
        self.writes: list[bytes] = []
        self.closing = False
        self.peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        local = "127.0.0.1" if self.peer == "127.0.0.1" else "192.0.2.1"
        return {"peername": (self.peer, 40000), "sockname": (local, 25)}.get(name)

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.seen.append(("write", data.decode()))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0  # (every write taken at once)

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def session(ctx: ServerContext, seen: list[tuple[str, str]]) -> tuple[Session, Transport]:
    """A session past its greeting and EHLO."""
    s = Session(ctx, build_listeners(ctx)[0])
    transport = Transport(seen)
    s.connection_made(transport)  # type: ignore[arg-type]
    await turn(s, transport, b"EHLO client.mailgate.org\r\n")
    return s, transport


async def turn(s: Session, transport: Transport, data: bytes) -> str:
    """Send ``data`` and wait for the session's next write (a client that waits)."""
    before = len(transport.writes)
    if data:
        s.data_received(data)
    for _ in range(500):
        if len(transport.writes) > before:
            await asyncio.sleep(0.01)  # what the session does after the write, done
            return transport.writes[before].decode()
        await asyncio.sleep(0.002)
    raise AssertionError(f"no reply to {data!r}")
