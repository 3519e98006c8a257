"""Small messages stay in memory: no spool file unless a destination asks for one."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mailgate.delivery.base import TraceInfo
from mailgate.delivery.fsync import GroupCommitter
from mailgate.delivery.maildir import MaildirDestination
from mailgate.delivery.spool import MEMORY_LIMIT, SpoolDir
from mailgate.protocol.envelope import Address, Envelope, Recipient


def test_small_message_discarded_never_touches_the_disk(tmp_path: Path) -> None:
    spool = SpoolDir(str(tmp_path)).create("s1")
    spool.write(b"Subject: small\r\n\r\nhi\r\n")
    spool.close()
    assert spool.held() == b"Subject: small\r\n\r\nhi\r\n"
    assert spool.read_head(9) == b"Subject: "
    spool.discard()
    assert list(tmp_path.iterdir()) == []


def test_path_writes_a_held_message_out(tmp_path: Path) -> None:
    spool = SpoolDir(str(tmp_path)).create("s1")
    spool.write(b"x" * 10)
    spool.close()
    assert Path(spool.path).read_bytes() == b"x" * 10
    assert spool.held() is None
    spool.discard()
    assert list(tmp_path.iterdir()) == []


def test_large_message_spills_to_a_file_as_it_streams(tmp_path: Path) -> None:
    spool = SpoolDir(str(tmp_path)).create("s1")
    chunk = b"y" * 65536
    for _ in range(MEMORY_LIMIT // len(chunk) + 2):
        spool.write(chunk)
    assert spool.held() is None
    assert len(list(tmp_path.iterdir())) == 1  # on disk before the end of the data
    spool.close()
    assert Path(spool.path).stat().st_size == spool.size
    spool.discard()


def test_maildir_stores_a_held_message_without_a_spool_file(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    spool = SpoolDir(str(spool_dir)).create("s1")
    spool.write(b"Subject: m\r\n\r\nbody\r\n")
    spool.close()
    destination = MaildirDestination(str(tmp_path / "md"), "user", "mx.test", GroupCommitter())
    rcpt = Recipient(Address("alice", "mx.test"))
    envelope = Envelope(helo="c.test", sender=Address("a", "c.test"), recipients=[rcpt])
    trace = TraceInfo("s1.1", "c.test", "192.0.2.1", None, "mx.test", "ESMTP")
    [result] = asyncio.run(destination.deliver(envelope, trace, spool, [rcpt]))
    assert result.ok
    [stored] = list((tmp_path / "md" / "alice" / "new").iterdir())
    assert stored.read_bytes() == b"Return-Path: <a@c.test>\nSubject: m\n\nbody\n"
    assert not spool_dir.exists() or list(spool_dir.iterdir()) == []
