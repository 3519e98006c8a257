"""Ten 50 MB messages arriving in parallel, with the server's RSS sampled meanwhile.

A server that holds messages in memory grows by their size; mailgate streams them to
the spool, so its RSS should stay flat whatever the message size.
"""

from __future__ import annotations

import asyncio
import time

from procstat import memory_kb
from servers import HELO, RECIPIENT, SENDER, Server

LINE = b"X" * 998 + b"\r\n"  # the longest line RFC 5321 allows


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await asyncio.wait_for(reader.readline(), 300)
        if len(line) < 4 or not line[:3].isdigit():
            raise ConnectionError(f"bad reply line {line!r}")
        if line[3:4] != b"-":
            return line


async def _command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   text: str, want: bytes) -> None:
    writer.write(text.encode() + b"\r\n")
    line = await _reply(reader)
    if not line.startswith(want):
        raise ConnectionError(f"{text}: {line!r}")


async def _send(port: int, size: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _reply(reader)
    await _command(reader, writer, f"EHLO {HELO}", b"250")
    await _command(reader, writer, f"MAIL FROM:<{SENDER}> SIZE={size}", b"250")
    await _command(reader, writer, f"RCPT TO:<{RECIPIENT}>", b"250")
    await _command(reader, writer, "DATA", b"354")
    writer.write(b"Subject: big\r\n\r\n")
    block = LINE * 64
    for _ in range(size // len(block)):
        writer.write(block)
        await writer.drain()
    await _command(reader, writer, ".", b"250")
    await _command(reader, writer, "QUIT", b"221")
    writer.close()


async def _run(server: Server, count: int, size: int) -> dict[str, float]:
    samples: list[int] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            samples.append(memory_kb(server.pid, "VmRSS"))
            await asyncio.sleep(0.1)

    base = memory_kb(server.pid, "VmRSS")
    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    try:
        await asyncio.gather(*(_send(server.port, size) for _ in range(count)))
    finally:
        done.set()
        await sampler
    return {
        "messages": count,
        "size_mb": size // 1_000_000,
        "seconds": round(time.monotonic() - started, 1),
        "rss_before_mb": round(base / 1024, 1),
        "rss_max_mb": round(max(samples) / 1024, 1),
        "growth_mb": round((max(samples) - base) / 1024, 1),
        "peak_hwm_mb": round(memory_kb(server.pid, "VmHWM") / 1024, 1),
    }


def big_messages(server: Server, count: int = 10, size: int = 50_000_000) -> dict[str, float]:
    return asyncio.run(_run(server, count, size))
