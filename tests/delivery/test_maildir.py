"""Maildir delivery: tmp → new, unique names, byte-exact content, links, fsyncs."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from delivery_helpers import TRACE, as_stored, envelope, files, spooled, tmpfs

from mailgate.delivery import maildir
from mailgate.delivery.base import RecipientResult
from mailgate.delivery.fsync import GroupCommitter
from mailgate.delivery.maildir import MaildirDestination
from mailgate.delivery.spool import MEMORY_LIMIT
from mailgate.protocol.envelope import NULL_ADDRESS, Address, Recipient

MESSAGE = b"Subject: hello\r\nFrom: a@example.net\r\n\r\nFrom the start\r\nline 2\r\n"
NAME = re.compile(r"^\d+\.M\d+P\d+Q\d+\.mx\.example\.org$")


def destination(root: Path, layout: str = "user", unnamed: bool = True) -> MaildirDestination:
    dest = MaildirDestination(str(root), layout, "mx.example.org", GroupCommitter())  # type: ignore[arg-type]
    if not unnamed:
        dest._unnamed = False  # as where O_TMPFILE (or /proc) is missing
    return dest


# Unnamed files in tmp/ (O_TMPFILE) where the file system has them, and the named
# tmp/ file everywhere else: every single-maildir test runs both ways.
WAYS = pytest.mark.parametrize("unnamed", [True, False], ids=["unnamed", "named"])


def rcpts(*addresses: str) -> list[Recipient]:
    return [Recipient(Address(*a.split("@"))) for a in addresses]


@WAYS
def test_delivery_creates_the_maildir_and_stores_the_message_exactly(
    tmp_path: Path, unnamed: bool
) -> None:
    dest = destination(tmp_path / "md", unnamed=unnamed)
    env = envelope("alice@example.org")
    spool = spooled(tmp_path, MESSAGE, env)
    results = asyncio.run(dest.deliver(env, TRACE, spool, rcpts("alice@example.org")))
    assert [str(r.reply) for r in results] == ["250 2.0.0 OK"]
    box = tmp_path / "md" / "alice"
    assert {p.name for p in box.iterdir()} == {"tmp", "new", "cur"}
    assert files(box / "tmp") == [] and files(box / "cur") == []
    (stored,) = files(box / "new")
    assert NAME.match(stored.name)
    content = stored.read_bytes()
    assert content == as_stored(spool)
    assert content.startswith(b"Return-Path: <sender@example.net>\nReceived: from ")
    assert b"\r" not in content
    stats = dest.committer.stats
    # the file, then new/ and the directories just created, each fsync'ed
    assert stats.file_fsyncs == 1 and stats.dir_fsyncs >= 2


@WAYS
def test_fifty_concurrent_deliveries_never_collide(tmp_path: Path, unnamed: bool) -> None:
    dest = destination(tmp_path / "md", unnamed=unnamed)
    env = envelope("alice@example.org")
    spools = [
        spooled(tmp_path / f"s{i}", MESSAGE + f"message {i}\r\n".encode(), env) for i in range(50)
    ]

    async def main() -> list[list[object]]:
        return await asyncio.gather(
            *(dest.deliver(env, TRACE, s, rcpts("alice@example.org")) for s in spools)
        )

    outcomes = asyncio.run(main())
    assert all(result.reply.code == 250 for results in outcomes for result in results)  # type: ignore[attr-defined]
    stored = files(tmp_path / "md" / "alice" / "new")
    assert len({p.name for p in stored}) == 50
    assert files(tmp_path / "md" / "alice" / "tmp") == []
    assert sorted(p.read_bytes() for p in stored) == sorted(as_stored(s) for s in spools)
    stats = dest.committer.stats
    assert stats.requests == 100  # a file sync and a directory sync per message
    assert stats.passes < stats.requests  # ...shared between messages
    assert stats.file_fsyncs == 50
    assert 1 <= stats.dir_fsyncs < 100


def test_several_recipients_share_one_hard_linked_copy(tmp_path: Path) -> None:
    dest = destination(tmp_path / "md")
    env = envelope("alice@example.org", "bob@example.org")
    spool = spooled(tmp_path, MESSAGE, env)
    targets = rcpts("alice@example.org", "bob@example.org", "alice@example.net")
    results = asyncio.run(dest.deliver(env, TRACE, spool, targets))
    assert [r.reply.code for r in results] == [250, 250, 250]
    (alice,) = files(tmp_path / "md" / "alice" / "new")  # both alices: one mailbox, one copy
    (bob,) = files(tmp_path / "md" / "bob" / "new")
    assert alice.stat().st_ino == bob.stat().st_ino
    assert alice.stat().st_nlink == 2
    assert bob.read_bytes() == as_stored(spool)
    assert dest.committer.stats.file_fsyncs == 1  # written (and synced) once


def test_another_file_system_gets_a_copy(tmp_path: Path) -> None:
    root = tmp_path / "md"
    with tmpfs(root / "bob", size="1m"):
        dest = destination(root)
        env = envelope("alice@example.org", "bob@example.org")
        spool = spooled(tmp_path, MESSAGE, env)
        targets = rcpts("alice@example.org", "bob@example.org")
        results = asyncio.run(dest.deliver(env, TRACE, spool, targets))
        assert [r.reply.code for r in results] == [250, 250]
        (alice,) = files(root / "alice" / "new")
        (bob,) = files(root / "bob" / "new")
        assert alice.stat().st_dev != bob.stat().st_dev
        assert alice.read_bytes() == bob.read_bytes() == as_stored(spool)
        assert files(root / "bob" / "tmp") == [] and files(root / "alice" / "tmp") == []
        assert dest.committer.stats.file_fsyncs == 2  # the copy is synced too


def test_domain_layout_and_null_sender(tmp_path: Path) -> None:
    dest = destination(tmp_path / "md", "domain/user")
    env = envelope("alice@example.org", sender=NULL_ADDRESS)
    spool = spooled(tmp_path, MESSAGE, env)
    asyncio.run(dest.deliver(env, TRACE, spool, rcpts("alice@Example.ORG")))
    (stored,) = files(tmp_path / "md" / "example.org" / "alice" / "new")
    assert stored.read_bytes().startswith(b"Return-Path: <>\n")


def test_binary_mime_is_stored_as_received(tmp_path: Path) -> None:
    dest = destination(tmp_path / "md")
    env = envelope("alice@example.org", body="BINARYMIME")
    data = b"Subject: bin\r\n\r\n\x00\x01\r\n\xff\r"
    spool = spooled(tmp_path, data, env)
    asyncio.run(dest.deliver(env, TRACE, spool, rcpts("alice@example.org")))
    (stored,) = files(tmp_path / "md" / "alice" / "new")
    assert (
        stored.read_bytes()
        == b"Return-Path: <sender@example.net>\r\n" + Path(spool.path).read_bytes()
    )


def test_unsafe_mailbox_names_are_refused(tmp_path: Path) -> None:
    dest = destination(tmp_path / "md")
    env = envelope("x@example.org")
    spool = spooled(tmp_path, MESSAGE, env)
    targets = [Recipient(Address("..", "example.org")), Recipient(Address("a/b", "example.org"))]
    targets += rcpts("alice@example.org")
    results = asyncio.run(dest.deliver(env, TRACE, spool, targets))
    assert [str(r.reply) for r in results][:2] == [
        "451 4.3.0 Requested action aborted: local error in processing"
    ] * 2
    assert results[2].reply.code == 250
    assert sorted(os.listdir(tmp_path / "md")) == ["alice"]


def test_a_relative_root_is_fixed_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    dest = destination(Path("maildir"))
    monkeypatch.chdir("/")
    env = envelope("alice@example.org")
    spool = spooled(tmp_path, MESSAGE, env)
    (result,) = asyncio.run(dest.deliver(env, TRACE, spool, rcpts("alice@example.org")))
    assert result.reply.code == 250
    assert len(files(tmp_path / "maildir" / "alice" / "new")) == 1


def _unnamed_files_work(directory: Path) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    return maildir._unnamed_supported(str(directory))


@pytest.mark.parametrize("size", [len(MESSAGE), MEMORY_LIMIT * 3], ids=["held", "spooled"])
def test_one_maildir_gets_an_unnamed_file_and_tmp_is_never_changed(
    tmp_path: Path, size: int
) -> None:
    if not _unnamed_files_work(tmp_path / "probe"):
        pytest.skip("no O_TMPFILE on this file system")
    dest = destination(tmp_path / "md")
    env = envelope("alice@example.org")
    body = MESSAGE + b"x" * max(0, size - len(MESSAGE)) + b"\r\n"
    first = spooled(tmp_path / "s0", body, env)
    asyncio.run(dest.deliver(env, TRACE, first, rcpts("alice@example.org")))
    tmp = tmp_path / "md" / "alice" / "tmp"
    before = tmp.stat().st_mtime_ns  # no name created or removed in tmp/ from now on

    async def main() -> list[list[object]]:
        alone = await dest.deliver(env, TRACE, spools[0], rcpts("alice@example.org"))
        together = await asyncio.gather(
            *(dest.deliver(env, TRACE, s, rcpts("alice@example.org")) for s in spools[1:])
        )
        return [alone, *together]

    spools = [spooled(tmp_path / f"s{i}", body + f"{i}\r\n".encode(), env) for i in range(1, 6)]
    outcomes = asyncio.run(main())
    assert all(result.reply.code == 250 for results in outcomes for result in results)  # type: ignore[attr-defined]
    assert tmp.stat().st_mtime_ns == before and files(tmp) == []
    stored = files(tmp_path / "md" / "alice" / "new")
    assert sorted(p.read_bytes() for p in stored) == sorted(
        as_stored(s) for s in [first, *spools]
    )
    assert all(p.stat().st_nlink == 1 and p.stat().st_mode & 0o777 == 0o600 for p in stored)


@WAYS
def test_a_name_taken_in_new_is_never_overwritten(
    tmp_path: Path, unnamed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = destination(tmp_path / "md", unnamed=unnamed)
    new = tmp_path / "md" / "alice" / "new"
    new.mkdir(parents=True)
    (new / "taken").write_bytes(b"someone else's mail")
    names = iter(["taken", "free"])
    monkeypatch.setattr(maildir, "unique_name", lambda hostname: next(names))
    env = envelope("alice@example.org")
    spool = spooled(tmp_path, MESSAGE, env)
    (result,) = asyncio.run(dest.deliver(env, TRACE, spool, rcpts("alice@example.org")))
    assert result.reply.code == 250
    assert (new / "taken").read_bytes() == b"someone else's mail"
    assert (new / "free").read_bytes() == as_stored(spool)


def test_a_maildir_without_unnamed_files_gets_the_named_tmp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a file system without O_TMPFILE (NFS) while the first maildir had it:
    # what open(O_TMPFILE) answers there is simulated, the rest is real.
    dest = destination(tmp_path / "md")
    env = envelope("alice@example.org")
    first = spooled(tmp_path / "s0", MESSAGE, env)
    asyncio.run(dest.deliver(env, TRACE, first, rcpts("alice@example.org")))

    def no_tmpfile(box: str) -> int:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported", box)

    monkeypatch.setattr(maildir, "_create_unnamed", no_tmpfile)
    spool = spooled(tmp_path / "s1", MESSAGE + b"second\r\n", env)
    (result,) = asyncio.run(dest.deliver(env, TRACE, spool, rcpts("alice@example.org")))
    assert result.reply.code == 250
    box = tmp_path / "md" / "alice"
    assert files(box / "tmp") == []
    assert sorted(p.read_bytes() for p in files(box / "new")) == sorted(
        [as_stored(first), as_stored(spool)]
    )


@WAYS
def test_no_descriptor_is_left_open(tmp_path: Path, unnamed: bool) -> None:
    dest = destination(tmp_path / "md", unnamed=unnamed)
    env = envelope("alice@example.org")
    spools = [spooled(tmp_path / f"s{i}", MESSAGE + f"{i}\r\n".encode(), env) for i in range(12)]
    big = spooled(tmp_path / "big", MESSAGE + b"z" * (MEMORY_LIMIT * 2) + b"\r\n", env)

    async def main() -> None:
        await dest.deliver(env, TRACE, spools[0], rcpts("alice@example.org"))  # alone
        await dest.deliver(env, TRACE, big, rcpts("alice@example.org"))  # from the spool file
        await asyncio.gather(  # together: on the loop, fsyncs in the group commit
            *(dest.deliver(env, TRACE, s, rcpts("alice@example.org")) for s in spools[1:])
        )

    before = len(os.listdir("/proc/self/fd"))
    asyncio.run(main())
    assert len(os.listdir("/proc/self/fd")) == before
    assert len(files(tmp_path / "md" / "alice" / "new")) == 13


@WAYS
@pytest.mark.parametrize("removed", ["maildir", "tmp", "new"])
def test_a_maildir_removed_since_its_last_delivery_is_made_again(
    tmp_path: Path, unnamed: bool, removed: str
) -> None:
    """A maildir once made is not checked before each delivery; one that a user or a
    script removed since is made again on the failure, and the message still stored,
    alone or among concurrent deliveries, for one recipient or several."""
    dest = destination(tmp_path / "md", unnamed=unnamed)
    env = envelope("alice@example.org")
    alice = tmp_path / "md" / "alice"
    spools = [spooled(tmp_path / f"s{i}", MESSAGE + f"{i}\r\n".encode(), env) for i in range(6)]

    def remove() -> None:
        shutil.rmtree(alice if removed == "maildir" else alice / removed)

    async def main() -> list[list[RecipientResult]]:
        results = [await dest.deliver(env, TRACE, spools[0], rcpts("alice@example.org"))]
        remove()
        results.append(await dest.deliver(env, TRACE, spools[1], rcpts("alice@example.org")))
        remove()
        results += await asyncio.gather(  # together: on the loop, fsyncs in the group commit
            *(dest.deliver(env, TRACE, s, rcpts("alice@example.org")) for s in spools[2:5])
        )
        remove()
        both = rcpts("alice@example.org", "bob@example.org")
        results.append(await dest.deliver(env, TRACE, spools[5], both))
        return results

    outcomes = asyncio.run(main())
    assert [r.reply.code for results in outcomes for r in results] == [250] * 7
    kept = {"maildir": 1, "tmp": 6, "new": 1}[removed]  # what the last removal left
    assert len(files(alice / "new")) == kept
    assert files(alice / "tmp") == []
    assert len(files(tmp_path / "md" / "bob" / "new")) == 1


def test_the_tmp_cleanup_follows_no_symlink_out_of_the_maildirs(tmp_path: Path) -> None:
    # It globbed root/*/tmp/*: a link root/x/tmp -> /etc had (as root, at start-up)
    # every file there older than 36 hours removed.
    root = tmp_path / "md"
    (root / "alice" / "tmp").mkdir(parents=True)
    old_leftover = root / "alice" / "tmp" / "1.M1P999999Q1.mx.example.org"
    old_leftover.write_bytes(b"half")
    victim_dir = tmp_path / "etc"
    victim_dir.mkdir()
    victim = victim_dir / "important.conf"
    victim.write_text("keep me")
    long_ago = time.time() - 3 * 86400
    for path in (old_leftover, victim):
        os.utime(path, (long_ago, long_ago))
    (root / "x").mkdir()
    (root / "x" / "tmp").symlink_to(victim_dir)
    (root / "y").symlink_to(tmp_path / "etc-box")
    (tmp_path / "etc-box" / "tmp").mkdir(parents=True)
    (tmp_path / "etc-box" / "tmp" / "other.conf").write_text("keep me too")
    os.utime(tmp_path / "etc-box" / "tmp" / "other.conf", (long_ago, long_ago))
    assert destination(root).cleanup_tmp() == 1
    assert not old_leftover.exists()
    assert victim.read_text() == "keep me"
    assert (tmp_path / "etc-box" / "tmp" / "other.conf").exists()
