"""Slow and hostile clients: a thousand connections that trickle bytes or stall in the
middle of DATA do not keep an ordinary client from its mail, are closed with 421 when
their time is up, and leave no spool file and no memory behind."""

from __future__ import annotations

import contextlib
import selectors
import smtplib
import socket
import threading
import time
from pathlib import Path

from mailgate.delivery.spool import MEMORY_LIMIT
from tests.hardening.wire import (
    HELO,
    HOSTNAME,
    files_under,
    rss_kb,
    start,
    untrusted_config,
    wait_until,
)
from tests.integration.server import RunningServer

TIMEOUT = 2.0  # command_timeout and data_timeout of the server under test
TRICKLE_EVERY = 0.7  # seconds between two bytes of a trickler: faster than the timeout
COMMANDS = f"EHLO {HELO}\r\nMAIL FROM:<a@client.mailgate.org>\r\n".encode()
STALL = (
    f"EHLO {HELO}\r\nMAIL FROM:<a@client.mailgate.org>\r\nRCPT TO:<alice@{HOSTNAME}>\r\n"
    "DATA\r\n"
).encode()


def _ordinary_message(server: RunningServer) -> float:
    start_time = time.monotonic()
    with smtplib.SMTP(server.host, server.port, local_hostname=HELO, timeout=30) as smtp:
        refused = smtp.sendmail("a@client.mailgate.org", [f"bob@{HOSTNAME}"],
                                b"Subject: ordinary\r\n\r\nhello\r\n")
        assert refused == {}
    return time.monotonic() - start_time


def _connect(server: RunningServer, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        sock = socket.create_connection((server.host, server.port), timeout=10)
        out.append(sock)
    return out


class Trickler(threading.Thread):
    """Sends the next byte of COMMANDS on every socket, one byte per TRICKLE_EVERY."""

    def __init__(self, socks: list[socket.socket]) -> None:
        super().__init__(daemon=True)
        self.socks = socks
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.wait(TRICKLE_EVERY):
            byte = COMMANDS[i % len(COMMANDS) : i % len(COMMANDS) + 1]
            for sock in self.socks:
                with contextlib.suppress(OSError):  # closed by the server: the point
                    sock.send(byte)
            i += 1


def _read_until_closed(socks: list[socket.socket], deadline: float) -> dict[socket.socket, bytes]:
    """What each socket received until the server closed it (epoll: fds above 1024)."""
    got = {sock: b"" for sock in socks}
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        remaining = len(socks)
        while remaining and time.monotonic() < deadline:
            for key, _ in sel.select(0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    chunk = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    got[sock] += chunk
                else:
                    sel.unregister(sock)
                    remaining -= 1
    return got


def test_a_thousand_hostile_connections(tmp_path: Path, long_run: bool) -> None:
    hostile = 4000 if long_run else 1000
    config = untrusted_config(tmp_path, server=f"""
        command_timeout = {TIMEOUT}
        data_timeout = {TIMEOUT}
        max_connections = {hostile + 100}
        max_connections_per_ip = {hostile + 100}
    """)
    server = start(tmp_path, config)
    try:
        idle = min(_ordinary_message(server) for _ in range(3))
        baseline = rss_kb(server.proc.pid)

        trickling = _connect(server, hostile // 2)
        trickler = Trickler(trickling)
        trickler.start()
        stalled = _connect(server, hostile - hostile // 2)
        # In the middle of DATA, then silence.  Most bodies are small (held in memory);
        # the first fifty pass the spool's memory limit so that they are on disk.
        big = b"z" * (MEMORY_LIMIT + 2000)
        for i, sock in enumerate(stalled):
            body = big if i < 50 else b"z" * 2000
            sock.sendall(STALL + b"Subject: stalled\r\n\r\n" + body + b"\r\n")
        spool = tmp_path / "spool"
        assert wait_until(lambda: len(files_under(spool)) >= 50 // 2, 10)
        busy = _ordinary_message(server)
        assert busy < max(20 * idle, 5.0), (busy, idle)
        peak = rss_kb(server.proc.pid)

        got = _read_until_closed(trickling + stalled, time.monotonic() + 6 * TIMEOUT + 10)
        trickler.stop.set()
        trickler.join()
        unanswered = [s for s, data in got.items() if b"421 4.4.2" not in data]
        assert not unanswered, f"{len(unanswered)} hostile connections not timed out"
        for sock in trickling + stalled:
            sock.close()
        assert wait_until(lambda: files_under(spool) == [], 5), files_under(spool)
        assert len(list((server.maildir / "alice").glob("*/*"))) == 0
        assert len(list((server.maildir / "bob" / "new").iterdir())) == 4
        # memory comes back: bounded near the baseline, not growing with the attackers
        settled = rss_kb(server.proc.pid)
        assert settled < baseline + 32 * 1024, (baseline, peak, settled)
        assert _ordinary_message(server) < max(20 * idle, 5.0)
    finally:
        server.stop()
