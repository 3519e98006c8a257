"""Resource exhaustion: an endless line, endless headers and 10,000 RCPTs each get a
clean SMTP error, and the server's resident memory stays bounded while they arrive."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.hardening.wire import (
    HELO,
    HOSTNAME,
    Wire,
    files_under,
    rss_kb,
    start,
    stored_files,
    untrusted_config,
    wait_until,
)
from tests.integration.server import RunningServer

MAX_SIZE = 4 * 1024 * 1024
GROWTH_KB = 64 * 1024  # the most the server may grow over its baseline


@dataclass
class Meter:
    """Samples the server's VmRSS in a thread while an attack runs."""

    pid: int
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Meter:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kb(self.pid))
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp("exhaustion")
    config = untrusted_config(
        workdir, server=f"max_message_size = {MAX_SIZE}\nmax_errors = 100000")
    running = start(workdir, config)
    _warm_up(running)
    yield running
    running.stop()


def _warm_up(server: RunningServer) -> None:
    """One ordinary message, so that the baseline includes every module and buffer."""
    wire = Wire(server)
    for line in (f"EHLO {HELO}", "MAIL FROM:<a@client.mailgate.org>", f"RCPT TO:<bob@{HOSTNAME}>",
                 "DATA"):
        assert wire.cmd(line).code in (250, 354)
    assert wire.cmd(b"Subject: warm up\r\n\r\n" + b"x" * 70_000 + b"\r\n.").code == 250
    wire.close()


def _stream(wire: Wire, piece: bytes, total: int) -> None:
    sent = 0
    while sent < total:
        wire.send(piece)
        sent += len(piece)


@pytest.fixture
def volume(long_run: bool) -> int:
    return 1024 * 1024 * 1024 if long_run else 128 * 1024 * 1024


def test_endless_command_line(server: RunningServer, volume: int) -> None:
    baseline = rss_kb(server.proc.pid)
    wire = Wire(server)
    assert wire.cmd(f"EHLO {HELO}").code == 250
    with Meter(server.proc.pid) as meter:
        wire.send(b"MAIL FROM:<")
        _stream(wire, b"a" * 65536, volume)
        r = wire.cmd(b">")
    assert (r.code, r.lines[0]) == (500, b"5.5.2 Line too long")
    assert wire.cmd("NOOP").code == 250  # the session goes on, in step
    wire.close()
    assert meter.peak < baseline + GROWTH_KB, (baseline, meter.peak)


def test_endless_line_and_endless_headers_in_data(server: RunningServer, volume: int) -> None:
    baseline = rss_kb(server.proc.pid)
    before = stored_files(server.maildir)
    for piece in (b"y" * 65536, b"X-Header: value\r\n" * 4096, b"\r\n" * 8192):
        wire = Wire(server)
        for line in (f"EHLO {HELO}", "MAIL FROM:<a@client.mailgate.org>",
                     f"RCPT TO:<alice@{HOSTNAME}>"):
            assert wire.cmd(line).code == 250
        assert wire.cmd("DATA").code == 354
        with Meter(server.proc.pid) as meter:
            _stream(wire, piece, volume)
            r = wire.cmd(b"\r\n.")
        assert (r.code, r.lines[0][:5]) == (552, b"5.3.4"), r
        assert wire.cmd("NOOP").code == 250
        wire.close()
        assert meter.peak < baseline + GROWTH_KB, (piece[:16], baseline, meter.peak)
    assert stored_files(server.maildir) == before
    assert files_under(server.workdir / "spool") == []


def test_ten_thousand_recipients(server: RunningServer, long_run: bool) -> None:
    count = 100_000 if long_run else 10_000
    baseline = rss_kb(server.proc.pid)
    wire = Wire(server)
    assert wire.cmd(f"EHLO {HELO}").code == 250
    assert wire.cmd("MAIL FROM:<a@client.mailgate.org>").code == 250
    rcpts = b"".join(b"RCPT TO:<alice+%d@%s>\r\n" % (i, HOSTNAME.encode()) for i in range(count))
    with Meter(server.proc.pid) as meter:
        sender = threading.Thread(target=wire.send, args=(rcpts,))
        sender.start()
        replies = [wire.reply() for _ in range(count)]
        sender.join()
    codes = [r.code for r in replies]
    assert codes[:100] == [250] * 100
    assert {(r.code, r.lines[0]) for r in replies[100:]} == {(452, b"4.5.3 Too many recipients")}
    assert wire.cmd("DATA").code == 354
    assert wire.cmd(b"Subject: many\r\n\r\nhi\r\n.").code == 250
    wire.close()
    assert meter.peak < baseline + GROWTH_KB, (baseline, meter.peak)


def _push_until_refused(wire: Wire, piece: bytes, limit: int) -> int:
    """Send ``piece`` over and over without reading, until the server has taken
    nothing for two seconds or ``limit`` octets went; the octets it took."""
    sock = wire.sock
    sock.setblocking(False)
    sent, stalled_since = 0, time.monotonic()
    while sent < limit and time.monotonic() - stalled_since < 2.0:
        try:
            sent += sock.send(piece)
            stalled_since = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)
    sock.setblocking(True)
    return sent


def test_a_client_that_never_reads_its_replies_is_not_read_either(
    server: RunningServer, volume: int
) -> None:
    # Each EHLO line of ~20 octets makes a reply of ~250: answered into the
    # transport's buffer without end, they grew the server by 250 MB in 20 s.  Once
    # the replies are not read, the server stops reading (pause_writing).
    baseline = rss_kb(server.proc.pid)
    wire = Wire(server)
    wire.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with Meter(server.proc.pid) as meter:
        taken = _push_until_refused(wire, f"EHLO {HELO}\r\n".encode() * 5000, volume)
    assert taken < 32 * 1024 * 1024, taken  # kernel buffers and one high-water mark
    assert meter.peak < baseline + GROWTH_KB, (baseline, meter.peak)
    other = Wire(server)  # the server goes on for everyone else
    assert other.cmd("NOOP").code == 250
    other.close()
    wire.close()


def test_a_session_cannot_write_the_log_without_bound(server: RunningServer) -> None:
    # 1,000 EHLOs and 1,000 RCPTs past max_recipients: no error that ends the
    # session, each was a log line of its own (~200 octets for ~30 of input).
    wire = Wire(server)
    ehlos = 1000
    wire.send(f"EHLO {HELO}\r\n".encode() * ehlos)
    assert {wire.reply().code for _ in range(ehlos)} == {250}
    assert wire.cmd("MAIL FROM:<a@client.mailgate.org>").code == 250
    over = 1000
    wire.send(b"".join(b"RCPT TO:<alice+%d@%s>\r\n" % (i, HOSTNAME.encode())
                       for i in range(100 + over)))
    assert [wire.reply().code for _ in range(100 + over)] == [250] * 100 + [452] * over
    assert wire.cmd("DATA").code == 354
    done = wire.cmd(b"Subject: still logged\r\n\r\nhi\r\n.")
    assert done.code == 250
    sid = done.lines[0].split(b"queued as ")[1].split(b".")[0].decode()
    wire.close()
    assert wait_until(lambda: f"sid={sid} event=close" in server.log(), 15)
    lines = [line for line in server.log().splitlines() if f"sid={sid} " in line]
    assert sum("event=log_limited" in line for line in lines) == 1
    # what became of the message is never held back
    assert sum("event=delivery" in line for line in lines) == 100
    # 500 about commands, then log_limited, connect, message, close
    assert len(lines) == 100 + 504, len(lines)
    assert any("event=message" in line and "code=250" in line for line in lines)
