"""GroupCommitter with sync_method = "syncfs": one syncfs per file system and pass."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import threading
from pathlib import Path

import pytest
from delivery_helpers import TRACE, envelope, files, spooled

from mailgate.config.delivery import syncfs_problem
from mailgate.config.errors import ConfigError
from mailgate.config.loader import load_config
from mailgate.delivery import fsync
from mailgate.delivery.fsync import GroupCommitter, WritebackError
from mailgate.delivery.maildir import MaildirDestination
from mailgate.protocol.envelope import Address, Recipient

MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"

LINUX_58 = syncfs_problem(os.uname().sysname, os.uname().release) is None
pytestmark = pytest.mark.skipif(not LINUX_58, reason="syncfs reports errors from Linux 5.8")


def make_files(tmp_path: Path, count: int) -> list[str]:
    paths = []
    for i in range(count):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"x")
        paths.append(str(path))
    return paths


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The descriptors fsync'ed (syncfs must do the work: only the cache flush after
    it is an fsync, of the file system's witness)."""
    done: list[int] = []
    real_fsync = os.fsync

    def counted(fd: int) -> None:
        done.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(fsync.os, "fsync", counted)
    return done


def only_witnesses(committer: GroupCommitter, done: list[int]) -> bool:
    """Every fsync was the flush after a syncfs."""
    witnesses = set(committer._witnesses.values())
    return len(done) == committer.stats.filesystem_syncs and set(done) <= witnesses


def test_concurrent_requests_share_one_syncfs_per_pass(
    tmp_path: Path, fsynced: list[int]
) -> None:
    committer = GroupCommitter("syncfs")
    paths = make_files(tmp_path, 50)

    async def main() -> None:
        await asyncio.gather(*(committer.sync([p, os.path.dirname(p)]) for p in paths))

    asyncio.run(main())
    stats = committer.stats
    assert stats.requests == 50 and stats.file_fsyncs == 50
    assert stats.passes < 50
    assert stats.filesystem_syncs == stats.passes  # tmp_path is one file system
    assert only_witnesses(committer, fsynced)


def test_a_path_that_cannot_be_opened_fails_only_its_own_request(tmp_path: Path) -> None:
    committer = GroupCommitter("syncfs")
    (good,) = make_files(tmp_path, 1)

    async def main() -> list[object]:
        return await asyncio.gather(
            committer.sync([good]),
            committer.sync([str(tmp_path / "missing")]),
            committer.sync(["bad\0path"]),
            committer.sync([good, str(tmp_path)]),
            return_exceptions=True,
        )

    first, missing, bad, last = asyncio.run(main())
    assert first is None and last is None
    assert isinstance(missing, FileNotFoundError)
    assert isinstance(bad, OSError) and bad.errno == errno.EINVAL


def test_a_failed_syncfs_fails_its_pass_and_every_request_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # syncfs reports a write error once, whichever file it was: a request that came
    # while the failing pass ran may be the one whose data was lost.
    real_syncfs = fsync._syncfs
    started = threading.Event()
    release = threading.Event()
    calls = [0]

    def failing_once(fd: int) -> None:
        calls[0] += 1
        if calls[0] == 1:
            started.set()
            release.wait(10)
            raise WritebackError(errno.EIO, "syncfs: Input/output error")
        real_syncfs(fd)

    monkeypatch.setattr(fsync, "_syncfs", failing_once)
    committer = GroupCommitter("syncfs")
    first, second, third = make_files(tmp_path, 3)

    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        in_pass = asyncio.ensure_future(committer.sync([first]))
        await loop.run_in_executor(None, started.wait, 10)
        waiting = asyncio.ensure_future(committer.sync([second]))  # for the next pass
        await asyncio.sleep(0)
        release.set()
        outcomes = await asyncio.gather(in_pass, waiting, return_exceptions=True)
        await committer.sync([third])  # the pass after that works again
        return outcomes

    outcomes = asyncio.run(main())
    assert all(isinstance(o, OSError) and o.errno == errno.EIO for o in outcomes)
    assert committer.idle


def test_a_real_syncfs_error_is_raised() -> None:
    with pytest.raises(WritebackError) as failure:
        fsync._syncfs(-1)
    assert failure.value.errno == errno.EBADF


def test_the_kept_descriptors_are_closed_with_the_committer(tmp_path: Path) -> None:
    (path,) = make_files(tmp_path, 1)
    committer = GroupCommitter("syncfs")
    asyncio.run(committer.sync([path, str(tmp_path)]))
    (witness,) = committer._witnesses.values()  # tmp_path is one file system
    assert os.readlink(f"/proc/self/fd/{witness}") == path  # the first item's file
    del committer
    gc.collect()
    try:
        now = os.readlink(f"/proc/self/fd/{witness}")
    except FileNotFoundError:
        now = None
    assert now != path  # closed (or the number taken since by something else)


def test_concurrent_maildir_deliveries_are_durable_by_syncfs(
    tmp_path: Path, fsynced: list[int]
) -> None:
    dest = MaildirDestination(str(tmp_path / "md"), "user", "mx.example.org",
                              GroupCommitter("syncfs"))
    env = envelope("alice@example.org")
    spools = [spooled(tmp_path / f"s{i}", MESSAGE + f"{i}\r\n".encode(), env) for i in range(30)]

    async def main() -> list[list[object]]:
        # the first delivery alone takes the lone path (its own fsyncs): make it wait
        # behind a pass, so that every delivery here shares the group commit
        hold = asyncio.ensure_future(dest.committer.sync([str(tmp_path)]))
        alice = [Recipient(Address("alice", "example.org"))]
        outcomes = await asyncio.gather(*(dest.deliver(env, TRACE, s, alice) for s in spools))
        await hold
        return outcomes

    outcomes = asyncio.run(main())
    assert all(r.reply.code == 250 for results in outcomes for r in results)  # type: ignore[attr-defined]
    assert len(files(tmp_path / "md" / "alice" / "new")) == 30
    stats = dest.committer.stats
    assert 1 <= stats.filesystem_syncs < 30
    assert only_witnesses(dest.committer, fsynced)
    # the new entries' pass names their file system by the files' own descriptors:
    # the sync thread opens no directory but the one held above
    assert stats.dir_fsyncs == 1


def test_a_closed_descriptor_fails_its_own_request(tmp_path: Path) -> None:
    committer = GroupCommitter("syncfs")
    (path,) = make_files(tmp_path, 1)
    with pytest.raises(OSError) as failure:
        asyncio.run(committer.sync([999_999]))  # (a number just closed would be reused)
    assert failure.value.errno == errno.EBADF
    asyncio.run(committer.sync([path]))  # the committer still works


@pytest.mark.parametrize(
    ("system", "release", "refused"),
    [("Linux", "6.1.0-18-amd64", False), ("Linux", "5.8.0", False),
     ("Linux", "5.4.0-150-generic", True), ("Linux", "4.19.0", True),
     ("Linux", "weird", True), ("Darwin", "23.1.0", True)],
)
def test_syncfs_is_refused_where_it_cannot_report_errors(
    system: str, release: str, refused: bool
) -> None:
    assert (syncfs_problem(system, release) is not None) is refused


def test_the_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "mailgate.toml"
    config.write_text('[delivery]\nsync_method = "sometimes"\n')
    with pytest.raises(ConfigError) as failure:
        load_config(str(config))
    assert "delivery.sync_method" in str(failure.value)
    config.write_text('[delivery]\nsync_method = "syncfs"\n')
    assert load_config(str(config)).delivery.sync_method == "syncfs"


def test_a_failed_flush_after_the_syncfs_fails_the_pass_as_a_write_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fsync.os, "fsync", failing)
    committer = GroupCommitter("syncfs")
    (path,) = make_files(tmp_path, 1)
    with pytest.raises(WritebackError) as failure:  # (which fails every waiting request)
        asyncio.run(committer.sync([path]))
    assert failure.value.errno == errno.EIO
