"""The smtp-source loads, and one measured run of a load against a server."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from procstat import cpu_seconds, memory_kb
from servers import HELO, RECIPIENT, SENDER, Server


@dataclass(frozen=True)
class Load:
    name: str
    what: str
    messages: int
    size: int  # payload octets (-l); smtp-source adds ~200 octets of headers
    sessions: int  # parallel SMTP sessions (-s)
    reuse: bool  # -d: "don't disconnect after sending a message", i.e. connection reuse

    def scaled(self, factor: float) -> Load:
        return Load(self.name, self.what, max(1, int(self.messages * factor)), self.size,
                    self.sessions, self.reuse)


LOADS = [
    Load("p1", "20,000 x 1 KB, 50 parallel, one message per connection", 20_000, 1024, 50, False),
    Load("p2", "20,000 x 1 KB, 50 parallel, connections reused (-d)", 20_000, 1024, 50, True),
    Load("p3", "2,000 x 100 KB, 20 parallel, one message per connection",
         2_000, 102_400, 20, False),
    Load("p4", "2,000 x 1 KB, sequential on one connection (-d)", 2_000, 1024, 1, True),
]


def smtp_source_argv(load: Load, port: int) -> list[str]:
    argv = ["smtp-source", "-s", str(load.sessions), "-m", str(load.messages),
            "-l", str(load.size), "-M", HELO, "-f", SENDER, "-t", RECIPIENT]
    if load.reuse:
        argv.append("-d")
    return [*argv, f"127.0.0.1:{port}"]


@dataclass
class Measurement:
    load: str
    mode: str
    server: str
    round: int
    seconds: float
    msgs_per_s: float
    cpu_ms_per_msg: float
    peak_rss_mb: float
    stored: int | None  # messages found in the Maildir afterwards (durable mode)


def measure(load: Load, server: Server, round_no: int) -> Measurement:
    before = cpu_seconds(server.pid)
    started = time.perf_counter()
    done = subprocess.run(smtp_source_argv(load, server.port), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds(server.pid) - before
    if done.returncode != 0:
        raise RuntimeError(f"smtp-source against {server.name}: {done.stderr.strip()[:300]}")
    stored = None
    if server.mode == "maildir":
        stored = _count(server.work / "maildir" / "user" / "new")
        if stored != load.messages:
            raise RuntimeError(f"{server.name} stored {stored} of {load.messages} messages")
    return Measurement(
        load.name, server.mode, server.name, round_no, round(seconds, 3),
        round(load.messages / seconds, 1), round(cpu * 1000 / load.messages, 3),
        round(memory_kb(server.pid, "VmHWM") / 1024, 1), stored,
    )


def _count(path: Path) -> int:
    try:
        return sum(1 for _ in path.iterdir())
    except FileNotFoundError:
        return 0
