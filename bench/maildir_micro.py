"""CPU and wall time per message of the Maildir store alone, N deliveries at once:
run by hand, never by the test suite.

Each of ``--concurrency`` tasks delivers ``--messages`` 1 KB messages (held in memory,
as a small message arrives) into one maildir through the real MaildirDestination and
GroupCommitter, on uvloop: one task takes the lone path (write and fsyncs in one
worker-thread hop), several share the group commit's passes.  CPU is the process's,
worker threads included (getrusage), user and system apart.

    .venv/bin/python bench/maildir_micro.py                  # 25 at once, 200 each
    .venv/bin/python bench/maildir_micro.py -c 1 -n 2000     # one at a time
    .venv/bin/python bench/maildir_micro.py --sync-method syncfs   # one syncfs per pass
    .venv/bin/python bench/maildir_micro.py -c 20 -n 50 --size 100   # p3's 100 KB
    PYTHONPATH=/tmp/base .venv/bin/python bench/maildir_micro.py   # another version

The files are kept (a new directory under --workdir per run, printed): on this
machine's ext4, creating files is taxed for more than a minute after many were
deleted (bench/RESULTS.md), which would skew the next run.  Remove them when done.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from pathlib import Path

import uvloop

from mailgate.config.delivery import SyncMethod
from mailgate.delivery.base import TraceInfo
from mailgate.delivery.fsync import GroupCommitter
from mailgate.delivery.maildir import MaildirDestination
from mailgate.protocol.envelope import Address, Envelope, Recipient

_LINE = b"x" * 70 + b"\r\n"


def message(kb: int) -> bytes:
    """A message of about ``kb`` KB in 72-octet lines (1 KB: as smtp-source's)."""
    return b"Subject: bench\r\n\r\n" + _LINE * max(1, kb * 1024 // len(_LINE) - 2)


class _HeldSpool:
    """A small message held in memory, as SpoolFile keeps it (one that came by DATA:
    every CR begins a CRLF)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self.no_bare_cr = True

    @property
    def path(self) -> str:
        raise AssertionError("a held message is never read from a file")

    def held(self) -> bytes:
        return self.data

    def read_head(self, limit: int) -> bytes:
        return self.data[:limit]


async def run(root: str, concurrency: int, messages: int, kb: int, method: SyncMethod) -> str:
    data = message(kb)
    committer = GroupCommitter(method)
    dest = MaildirDestination(root, "user", "mx.bench.internal", committer)
    rcpt = Recipient(Address("user", "bench.internal"))
    envelope = Envelope(helo="client.bench.internal",
                        sender=Address("bench", "client.bench.internal"), recipients=[rcpt])
    trace = TraceInfo("bench", "client.bench.internal", "127.0.0.1", None, "mx", "ESMTP")

    async def deliver_all() -> None:
        for _ in range(messages):
            [result] = await dest.deliver(envelope, trace, _HeldSpool(data), [rcpt])
            if result.reply.code != 250:
                raise SystemExit(f"delivery failed: {result.reply}")

    await asyncio.gather(*(deliver_all() for _ in range(concurrency)))  # warm up
    before, start, passes = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter(), \
        committer.stats.passes
    await asyncio.gather(*(deliver_all() for _ in range(concurrency)))
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
    n = concurrency * messages
    switches = (after.ru_nvcsw + after.ru_nivcsw) - (before.ru_nvcsw + before.ru_nivcsw)
    return (
        f"{concurrency} at once: user {(after.ru_utime - before.ru_utime) / n * 1e6:.0f} µs, "
        f"system {(after.ru_stime - before.ru_stime) / n * 1e6:.0f} µs, "
        f"wall {wall / n * 1e6:.0f} µs per message; "
        f"{(committer.stats.passes - passes) / n:.2f} fsync passes and "
        f"{switches / n:.1f} context switches per message"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--concurrency", type=int, default=25)
    parser.add_argument("-n", "--messages", type=int, default=200, help="per task")
    parser.add_argument("--size", type=int, default=1, help="message size in KB (held in "
                        "memory: at most the spool's 128 KB)")
    parser.add_argument("--workdir", default="/var/tmp/mailgate-maildir-micro")
    parser.add_argument("--sync-method", choices=["fsync", "syncfs"], default="fsync")
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    root = tempfile.mkdtemp(dir=args.workdir)
    print(uvloop.run(run(root, args.concurrency, args.messages, args.size, args.sync_method)))
    print(f"files kept in {root}")


if __name__ == "__main__":
    main()
