"""Real storage failures: a full tmpfs gives 452 4.3.1, a read-only one 451 4.3.0.

Nothing half-written may remain, and the same destination keeps working once the
file system has room again.  The tests mount small tmpfs file systems (root only)
and skip, saying why, where mounting is not permitted.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from delivery_helpers import TRACE, envelope, files, remount_read_only, spooled, tmpfs

from mailgate.config.delivery import DeliveryConfig, DestinationConfig, MaildirConfig, MboxConfig
from mailgate.delivery.factory import build_router
from mailgate.delivery.fsync import GroupCommitter
from mailgate.delivery.maildir import MaildirDestination
from mailgate.delivery.mbox import MboxDestination
from mailgate.protocol.envelope import Address, Recipient

BIG = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 2000  # 160 KB: more than the tmpfs
SMALL = b"Subject: small\r\n\r\nhello\r\n"
STORAGE = "452 4.3.1 Insufficient system storage"
LOCAL = "451 4.3.0 Requested action aborted: local error in processing"


def alice() -> list[Recipient]:
    return [Recipient(Address("alice", "example.org"))]


def maildir(root: Path) -> MaildirDestination:
    return MaildirDestination(str(root), "user", "mx.example.org", GroupCommitter())


def test_full_disk_in_maildir_is_452_and_leaves_nothing(tmp_path: Path) -> None:
    env = envelope("alice@example.org")
    with tmpfs(tmp_path / "full", size="64k") as root:
        dest = maildir(root)
        (result,) = asyncio.run(dest.deliver(env, TRACE, spooled(tmp_path, BIG, env), alice()))
        assert str(result.reply) == STORAGE
        assert files(root / "alice" / "tmp") == [] and files(root / "alice" / "new") == []
        # the same destination goes on serving: a message that fits is delivered
        (result,) = asyncio.run(dest.deliver(env, TRACE, spooled(tmp_path, SMALL, env), alice()))
        assert result.reply.code == 250
        assert len(files(root / "alice" / "new")) == 1
        assert files(root / "alice" / "tmp") == []


def test_full_disk_through_the_router_only_fails_that_destination(tmp_path: Path) -> None:
    env = envelope("alice@example.org", "bob@example.org")
    with tmpfs(tmp_path / "full", size="64k") as root:
        spacious = MaildirConfig(root=str(tmp_path / "big"))
        config = DeliveryConfig(
            maildir_root=str(root),
            local_domains=["example.org"],
            system_users=False,
            local_users=["alice", "bob"],
            users={"bob": "spacious"},
            destinations={"spacious": DestinationConfig(maildir=spacious)},
        )
        router = build_router(config, "mx.example.org")
        results = asyncio.run(router.deliver(env, TRACE, spooled(tmp_path, BIG, env)))
        assert [str(r.reply) for r in results] == [STORAGE, "250 2.0.0 OK"]
        assert files(root / "alice" / "tmp") == []
        assert len(files(tmp_path / "big" / "bob" / "new")) == 1


def test_full_disk_in_mbox_is_452_and_the_mbox_is_unchanged(tmp_path: Path) -> None:
    env = envelope("alice@example.org")
    with tmpfs(tmp_path / "full", size="64k") as root:
        dest = MboxDestination(MboxConfig(path=str(root / "{user}")))
        (result,) = asyncio.run(dest.deliver(env, TRACE, spooled(tmp_path, SMALL, env), alice()))
        assert result.reply.code == 250
        before = (root / "alice").read_bytes()
        (result,) = asyncio.run(dest.deliver(env, TRACE, spooled(tmp_path, BIG, env), alice()))
        assert str(result.reply) == STORAGE
        assert (root / "alice").read_bytes() == before  # the partial append was cut off
        assert not (root / "alice.lock").exists()


def test_read_only_maildir_is_451(tmp_path: Path) -> None:
    env = envelope("alice@example.org")
    with tmpfs(tmp_path / "ro", size="1m") as root:
        dest = maildir(root)
        (result,) = asyncio.run(dest.deliver(env, TRACE, spooled(tmp_path, SMALL, env), alice()))
        assert result.reply.code == 250  # the maildir exists and works...
        remount_read_only(root)  # ...until its file system turns read-only
        (result,) = asyncio.run(dest.deliver(env, TRACE, spooled(tmp_path, SMALL, env), alice()))
        assert str(result.reply) == LOCAL
        assert len(files(root / "alice" / "new")) == 1
        assert files(root / "alice" / "tmp") == []


def test_read_only_mbox_is_451(tmp_path: Path) -> None:
    env = envelope("alice@example.org")
    with tmpfs(tmp_path / "ro", size="1m") as root:
        (root / "alice").write_bytes(b"")
        remount_read_only(root)
        dest = MboxDestination(MboxConfig(path=str(root / "{user}")))
        (result,) = asyncio.run(dest.deliver(env, TRACE, spooled(tmp_path, SMALL, env), alice()))
        assert str(result.reply) == LOCAL
        assert os.path.getsize(root / "alice") == 0
