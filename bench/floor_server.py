"""The floor of the command-bound loads: an SMTP-shaped responder on uvloop that
parses nothing and stores nothing.  Run by hand, never by the test suite.

It answers 220 on connect, 354 to a line starting with DATA, 250 at the end of the
data, 221 to QUIT and 250 to every other line: what smtp-source needs, and no more.
What it costs per message is what any Python server on uvloop pays before doing any
SMTP at all (the kernel's reads, writes and epoll waits, uvloop, one Python call per
read), so it bounds the ratio a real server can reach on a load such as p4.

    .venv/bin/python bench/floor_server.py --port 2599 &
    smtp-source -s 1 -m 4000 -l 1024 -d -M client.bench.internal \\
        -f bench@client.bench.internal -t user@bench.internal 127.0.0.1:2599

(CPU per message: the process's utime+stime from /proc/<pid>/stat before and after,
divided by the messages; bench/RESULTS.md has the numbers.)
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop


class _Responder(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.in_data = False
        self.tail = b""  # the end of the data so far, to find <CRLF>.<CRLF> across reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(b"220 floor ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if self.in_data:
            seen = self.tail + data
            if b"\r\n.\r\n" in seen:
                self.in_data = False
                self.tail = b""
                transport.write(b"250 2.0.0 ok\r\n")
            else:
                self.tail = seen[-4:]
            return
        for line in data.split(b"\r\n")[:-1]:  # smtp-source sends whole lines
            verb = line[:4].upper()
            if verb == b"DATA":
                self.in_data = True
                self.tail = b"\r\n"  # the data may end at once: ".\r\n"
                transport.write(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                transport.write(b"221 2.0.0 bye\r\n")
                transport.close()
            else:
                transport.write(b"250 2.0.0 ok\r\n")


async def _serve(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Responder, "127.0.0.1", port)
    print(f"floor responder listening on 127.0.0.1:{port}", flush=True)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=2599)
    uvloop.run(_serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
