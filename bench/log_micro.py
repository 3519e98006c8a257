"""CPU of one structured log line: ``SessionLog.event`` down to the stream write.

Run by hand (never by the test suite):

    .venv/bin/python bench/log_micro.py [-n LINES] [-r ROUNDS] [--format logfmt|json]

A session writes about four lines per message (mail, rcpt, delivery, message); this
times the "message" and "rcpt" lines as the benchmark's sessions write them, in
logfmt (the default) to a stream that discards.  The lines are written from inside a
running event loop, as in the server, and flushed every fourth line (about one event
loop turn's worth), so the batching and its ``call_soon`` are paid as in the server.
It prints the best round's process-CPU nanoseconds per line (best, because the
machine is shared and noise only ever adds time).

To compare with another version, put that version's ``mailgate`` package first on
the path, e.g. ``git archive HEAD mailgate | tar -x -C /tmp/base`` then
``PYTHONPATH=/tmp/base .venv/bin/python bench/log_micro.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time
from collections.abc import Callable

from mailgate.config.ops import LoggingConfig
from mailgate.ops import logging as mglog
from mailgate.ops.logging import SessionLog, setup_logging


class _Discard(io.TextIOBase):
    def write(self, text: str) -> int:
        return len(text)


def _message(log: SessionLog, i: int) -> None:
    log.event(
        "message", id=f"0123456789abcdef.{i}", sender="bench@client.bench.internal",
        size=1375, rcpts=1, code=250, enhanced="2.0.0", seconds=0.0071,
    )


def _rcpt(log: SessionLog, i: int) -> None:
    log.event("rcpt", to="user@bench.internal")


async def _run(line: Callable[[SessionLog, int], None], lines: int) -> float:
    """CPU seconds for ``lines`` lines of one session."""
    log = SessionLog("0123456789abcdef", ip="127.0.0.1", listener="smtp:127.0.0.1:2525")
    writer = mglog._direct
    assert writer is not None
    start = time.process_time()
    for i in range(lines):
        line(log, i)
        if i % 4 == 3:
            writer.flush()
    spent = time.process_time() - start
    await asyncio.sleep(0)  # run the flushes the writes scheduled
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--lines", type=int, default=100_000)
    parser.add_argument("-r", "--rounds", type=int, default=7)
    parser.add_argument("--format", choices=("logfmt", "json"), default="logfmt")
    args = parser.parse_args()
    setup_logging(LoggingConfig(format=args.format), _Discard())  # type: ignore[arg-type]
    for name, line in (("message", _message), ("rcpt", _rcpt)):
        asyncio.run(_run(line, 1000))  # warm up

        async def rounds(line: Callable[[SessionLog, int], None] = line) -> float:
            return min([await _run(line, args.lines) for _ in range(args.rounds)])

        best = asyncio.run(rounds())
        print(f"{name:8} {best / args.lines * 1e9:6.0f} ns CPU per line (best of {args.rounds})")


if __name__ == "__main__":
    main()
