"""Crash safety: under steady load the server is killed with SIGKILL at random moments
and restarted on the same maildir and spool.  Every message that got its 250 is in its
mailbox, complete; nothing partial is ever visible in new/ or cur/; what the crash left
in tmp/ and in the spool is removed at the next start."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import signal
import smtplib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.hardening.wire import (
    HELO,
    HOSTNAME,
    files_under,
    start,
    stored_files,
    untrusted_config,
)
from tests.integration.server import RunningServer

CLIENTS = 4


def _message(ident: str, rng: random.Random) -> bytes:
    """A message whose headers carry its id and the length and SHA-256 of its body as
    stored (LF line ends), so any stored copy can be checked for completeness."""
    raw = base64.encodebytes(rng.randbytes(rng.randrange(100, 300_000)))
    stored_body = raw  # encodebytes ends lines with LF, as the maildir stores them
    head = (f"X-Id: {ident}\r\nX-Length: {len(stored_body)}\r\n"
            f"X-Sha256: {hashlib.sha256(stored_body).hexdigest()}\r\n\r\n")
    return head.encode() + raw.replace(b"\n", b"\r\n")


def _verify(path: Path) -> str:
    """The id of a stored message, after checking it is whole."""
    data = path.read_bytes()
    head, sep, body = data.partition(b"\n\n")
    assert sep, f"{path.name}: no end of header"
    fields = dict(line.split(b": ", 1) for line in head.split(b"\n") if b": " in line)
    assert int(fields[b"X-Length"]) == len(body), f"{path.name}: truncated"
    assert hashlib.sha256(body).hexdigest().encode() == fields[b"X-Sha256"], path.name
    return fields[b"X-Id"].decode()


@dataclass
class Load:
    """Client threads that send to whichever server is up, and remember what got 250."""

    server: RunningServer
    acked: set[str] = field(default_factory=set)
    attempted: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, n: int) -> None:
        rng = random.Random(n)
        i = 0
        while not self.stop.is_set():
            i += 1
            ident = f"c{n}m{i}"
            server = self.server
            with self.lock:
                self.attempted.add(ident)
            try:
                with smtplib.SMTP(server.host, server.port, local_hostname=HELO,
                                  timeout=10) as smtp:
                    smtp.sendmail("load@client.mailgate.org", [f"alice@{HOSTNAME}"],
                                  _message(ident, rng))
            except (OSError, smtplib.SMTPException):
                time.sleep(0.02)  # the server is down or was killed mid-way: go on
                continue
            with self.lock:
                self.acked.add(ident)


def _plant_leftovers(workdir: Path, dead_pid: int) -> list[Path]:
    """Crash leftovers of a dead mailgate besides the real ones: a half-written maildir
    file and a spool file; and files that are NOT leftovers of ours, which must stay."""
    tmp = workdir / "maildir" / "alice" / "tmp"
    now = int(time.time())
    planted = [
        tmp / f"{now}.M1P{dead_pid}Q999.{HOSTNAME}",
        workdir / "spool" / f"planted.{dead_pid}.999.spool",
    ]
    for path in planted:
        path.write_bytes(b"X-Id: half\n")
    kept = [
        tmp / f"{now}.M1P{os.getpid()}Q1.{HOSTNAME}",  # a live process's delivery
        tmp / f"{now}.M1P{dead_pid}Q1.other.host.example",  # another host's (NFS)
        tmp / "courier.in.progress",  # not a name we make
    ]
    for path in kept:
        path.write_bytes(b"someone else's\n")
    old = tmp / "1000000000.M1P1Q1.elsewhere"  # 36 hours and more: abandoned by anyone
    old.write_bytes(b"old\n")
    os.utime(old, (1_000_000_000, 1_000_000_000))
    return kept


def test_sigkill_under_load(tmp_path: Path, long_run: bool) -> None:
    kills = 20 if long_run else 3
    config = untrusted_config(tmp_path)
    load = Load(start(tmp_path, config))
    threads = [threading.Thread(target=load.run, args=(n,), daemon=True) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    rng = random.Random(8)
    maildir, spool = tmp_path / "maildir", tmp_path / "spool"
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.4, 1.5))
            dead = load.server.proc.pid
            load.server.proc.send_signal(signal.SIGKILL)
            load.server.proc.wait()
            for path in stored_files(maildir):  # never a partial message in new/ or cur/
                _verify(path)
            kept = _plant_leftovers(tmp_path, dead)
            load.server = start(tmp_path, config)
            # The restarted server removed the dead one's files, and only those.
            leftovers = [p for p in files_under(maildir / "alice" / "tmp") + files_under(spool)
                         if f"P{dead}Q" in p.name or f".{dead}." in p.name]
            assert leftovers == [p for p in kept if p.name.endswith("example")], leftovers
            assert not (maildir / "alice" / "tmp" / "1000000000.M1P1Q1.elsewhere").exists()
            for path in kept:
                assert path.exists(), path
                path.unlink()
        time.sleep(rng.uniform(0.4, 1.0))
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(15)
        load.server.stop()
    stored = [_verify(path) for path in stored_files(maildir)]
    assert len(stored) == len(set(stored)), "a message was stored twice"
    assert load.acked <= set(stored), f"acknowledged but lost: {load.acked - set(stored)}"
    assert set(stored) <= load.attempted
    assert len(load.acked) > 5 * kills  # the load was real
    assert files_under(spool) == []
    assert files_under(maildir / "alice" / "tmp") == []
