"""Idle connections: N clients that said EHLO and wait; the server's RSS per connection."""

from __future__ import annotations

import asyncio
import time

from procstat import memory_kb
from servers import HELO, Server

_OPEN_AT_ONCE = 200  # connection attempts in flight (the listen backlog is 1024)


async def _open(port: int, sem: asyncio.Semaphore) -> asyncio.StreamWriter:
    async with sem:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _reply(reader)  # 220 greeting
        writer.write(f"EHLO {HELO}\r\n".encode())
        await _reply(reader)  # 250 and its extension lines
        return writer


async def _reply(reader: asyncio.StreamReader) -> None:
    while True:
        line = await asyncio.wait_for(reader.readline(), 60)
        if len(line) < 4 or not line[:3].isdigit():
            raise ConnectionError(f"bad reply line {line!r}")
        if line[3:4] != b"-":
            return


async def _hold(server: Server, count: int) -> tuple[int, int]:
    before = memory_kb(server.pid, "VmRSS")
    sem = asyncio.Semaphore(_OPEN_AT_ONCE)
    writers = await asyncio.gather(*(_open(server.port, sem) for _ in range(count)))
    await asyncio.sleep(1)  # let the server settle (timers armed, buffers trimmed)
    after = memory_kb(server.pid, "VmRSS")
    for writer in writers:
        writer.close()
    await asyncio.sleep(0.5)
    return before, after


def rss_per_connection(server: Server, count: int) -> dict[str, float]:
    """Open ``count`` idle EHLO'd connections; RSS growth per connection in KiB."""
    started = time.monotonic()
    before, after = asyncio.run(_hold(server, count))
    return {
        "connections": count,
        "rss_before_mb": round(before / 1024, 1),
        "rss_after_mb": round(after / 1024, 1),
        "kb_per_connection": round((after - before) / count, 2),
        "seconds": round(time.monotonic() - started, 1),
    }
