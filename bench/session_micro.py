"""CPU per message of a whole session (engine, decisions, logging, the asyncio task)
without sockets: run by hand, never by the test suite.

The real ``Session`` protocol of ``mailgate serve`` gets the bench's smtp-source
transcript of load p4 (EHLO once, then per message MAIL, RCPT, DATA and a ~1 KB body,
each sent after the previous reply; with ``--connect`` that of p1, a new session with
EHLO and QUIT per message) through ``data_received``, on uvloop, with the
bench configuration (bench/servers.py, discard or Maildir) and log lines rendered and
written to /dev/null.  A fake transport takes the replies.  What is left out is the
kernel's part (the socket system calls), which the loads in bench/run.py measure.

    .venv/bin/python bench/session_micro.py               # discard, 5,000 messages x 5
    .venv/bin/python bench/session_micro.py --maildir -n 2000
    .venv/bin/python bench/session_micro.py --connect       # a session per message
    PYTHONPATH=/tmp/base .venv/bin/python bench/session_micro.py   # another version

Prints the best round's process-CPU microseconds per message (noise only adds time),
and the best round's wall time.  In Maildir mode, mind that ext4 makes file creation
slow for a while after many files were deleted (bench/RESULTS.md): the run's files
are removed at its end, so leave a minute between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from engine_micro import DATA, HELO, MAIL, RCPT, _body  # noqa: E402
from servers import mailgate_config  # noqa: E402

from mailgate.app import build_context, build_listeners  # noqa: E402
from mailgate.config.loader import load_config  # noqa: E402
from mailgate.ops.logging import setup_logging  # noqa: E402
from mailgate.server.session import Session  # noqa: E402


class _Transport:
    """What a Session uses of a transport; each write completes the driver's future
    (a bare future, not an asyncio.Queue: the driver's own cost stays small)."""

    def __init__(self) -> None:
        self.replies: list[bytes] = []
        self.waiter: asyncio.Future[None] | None = None
        self.closing = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 25)}.get(name, default)

    def write(self, data: bytes) -> None:
        self.replies.append(data)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def reply(self) -> bytes:
        if not self.replies:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None
        return self.replies.pop(0)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0  # (every write taken at once)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _exchange(session: Session, transport: _Transport, data: bytes, code: bytes) -> None:
    # From a loop callback, as a real transport calls it (not from inside this task).
    asyncio.get_running_loop().call_soon(session.data_received, data)
    answer = await transport.reply()
    if not answer.startswith(code):
        raise SystemExit(f"unexpected reply to {data[:20]!r}: {answer!r}")


async def run(
    work: str, default: str, messages: int, rounds: int, walls: list[float], per_connection: bool
) -> list[float]:
    path = Path(work) / "mailgate.toml"
    path.write_text(mailgate_config(work, 0, default, 1))
    (Path(work) / "spool").mkdir()
    config = load_config(str(path))
    with open("/dev/null", "w") as devnull:
        setup_logging(config.logging, stream=devnull)
        ctx = build_context(config)
        listener = build_listeners(ctx)[0]
        body = _body()

        async def connect() -> tuple[Session, _Transport]:
            session = Session(ctx, listener)
            transport = _Transport()
            session.connection_made(transport)  # type: ignore[arg-type]
            await transport.reply()  # the greeting
            await _exchange(session, transport, HELO, b"250")
            return session, transport

        async def quit(session: Session, transport: _Transport) -> None:
            await _exchange(session, transport, b"QUIT\r\n", b"221")
            session.connection_lost(None)  # what the transport does once closed
            assert session._task is not None
            await session._task

        session, transport = await connect()

        async def message() -> None:
            await _exchange(session, transport, MAIL, b"250")
            await _exchange(session, transport, RCPT, b"250")
            await _exchange(session, transport, DATA, b"354")
            await _exchange(session, transport, body, b"250")

        async def one() -> None:
            nonlocal session, transport
            if per_connection:  # load p1: one message per connection
                session, transport = await connect()
                await message()
                await quit(session, transport)
            else:
                await message()

        for _ in range(min(messages, 500)):  # warm up
            await one()
        results = []
        for _ in range(rounds):
            start, wall = time.process_time(), time.perf_counter()
            for _ in range(messages):
                await one()
            results.append((time.process_time() - start) / messages * 1e6)
            walls.append((time.perf_counter() - wall) / messages * 1e6)
        if not per_connection:
            await quit(session, transport)
        await asyncio.sleep(0.1)  # let the log writer's timer run before /dev/null closes
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=5000)
    parser.add_argument("-r", "--rounds", type=int, default=5)
    parser.add_argument("--maildir", action="store_true", help="durable Maildir delivery")
    parser.add_argument("--connect", action="store_true",
                        help="a new session per message (EHLO ... QUIT), as load p1")
    args = parser.parse_args()
    default = "local" if args.maildir else "blackhole"
    with tempfile.TemporaryDirectory(prefix="mailgate-session-micro-") as work:
        walls: list[float] = []
        results = uvloop.run(
            run(work, default, args.messages, args.rounds, walls, args.connect)
        )
    print(" ".join(f"{r:.1f}" for r in results))
    # the wall time matters in Maildir mode: one message waits for its fsyncs
    print(f"best {min(results):.1f} µs of CPU, {min(walls):.1f} µs of wall time "
          f"per message ({default})")


if __name__ == "__main__":
    main()
