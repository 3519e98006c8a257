"""GroupCommitter with sync_method = "syncfs": one syncfs per file system and pass."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
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


def syncfs_here(directory: Path) -> bool:
    fd = os.open(directory, os.O_RDONLY)
    try:
        return fsync._filesystem_type(fd) in fsync._SYNCFS_TYPES
    finally:
        os.close(fd)


@pytest.fixture
def here(tmp_path: Path) -> Path:
    """tmp_path, where it is on a file system that gets syncfs (ext4, XFS, btrfs)."""
    if not syncfs_here(tmp_path):
        pytest.skip("the temporary directory is on a file system without trusted syncfs")
    return tmp_path


def make_files(tmp_path: Path, count: int) -> list[str]:
    paths = []
    for i in range(count):
        path = tmp_path / f"f{i}"
        path.write_bytes(b"x")
        paths.append(str(path))
    return paths


@pytest.fixture
def written() -> Iterator[Callable[[Path, int], list[int]]]:
    """Open descriptors of new files, as a delivery has them: opened, then written."""
    opened: list[int] = []

    def make(directory: Path, count: int) -> list[int]:
        fds = [os.open(directory / f"w{len(opened) + i}", os.O_WRONLY | os.O_CREAT, 0o600)
               for i in range(count)]
        for fd in fds:
            os.write(fd, b"x")
        opened.extend(fds)
        return fds

    yield make
    for fd in opened:
        os.close(fd)


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
    here: Path, written: Callable[[Path, int], list[int]], fsynced: list[int]
) -> None:
    committer = GroupCommitter("syncfs")
    fds = written(here, 50)

    async def main() -> None:
        # each "message": its file, and the directory it was linked into
        await asyncio.gather(*(committer.sync([fd, str(here)]) for fd in fds))

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
    here: Path, written: Callable[[Path, int], list[int]], monkeypatch: pytest.MonkeyPatch
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
    first, second, third = written(here, 3)

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


def test_the_kept_descriptors_are_closed_with_the_committer(
    here: Path, written: Callable[[Path, int], list[int]]
) -> None:
    (fd,) = written(here, 1)
    path = os.readlink(f"/proc/self/fd/{fd}")
    committer = GroupCommitter("syncfs")
    asyncio.run(committer.sync([fd, str(here)]))
    (witness,) = committer._witnesses.values()  # one file system
    assert os.readlink(f"/proc/self/fd/{witness}") == path  # the first item's file
    del committer
    gc.collect()
    try:
        now = os.readlink(f"/proc/self/fd/{witness}")
    except FileNotFoundError:
        now = None
    assert now != path  # closed (or the number taken since by something else)


def test_concurrent_maildir_deliveries_are_durable_by_syncfs(
    here: Path, written: Callable[[Path, int], list[int]], fsynced: list[int]
) -> None:
    dest = MaildirDestination(str(here / "md"), "user", "mx.example.org",
                              GroupCommitter("syncfs"))
    env = envelope("alice@example.org")
    spools = [spooled(here / f"s{i}", MESSAGE + f"{i}\r\n".encode(), env) for i in range(30)]
    (held,) = written(here, 1)

    async def main() -> list[list[object]]:
        # the first delivery alone takes the lone path (its own fsyncs): make it wait
        # behind a pass, so that every delivery here shares the group commit
        hold = asyncio.ensure_future(dest.committer.sync([held]))
        alice = [Recipient(Address("alice", "example.org"))]
        outcomes = await asyncio.gather(*(dest.deliver(env, TRACE, s, alice) for s in spools))
        await hold
        return outcomes

    outcomes = asyncio.run(main())
    assert all(r.reply.code == 250 for results in outcomes for r in results)  # type: ignore[attr-defined]
    assert len(files(here / "md" / "alice" / "new")) == 30
    stats = dest.committer.stats
    assert 1 <= stats.filesystem_syncs < 30
    assert only_witnesses(dest.committer, fsynced)
    # the new entries' pass names their file system by the files' own descriptors:
    # the sync thread opens no directory
    assert stats.dir_fsyncs == 0


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
    here: Path, written: Callable[[Path, int], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fsync.os, "fsync", failing)
    committer = GroupCommitter("syncfs")
    (fd,) = written(here, 1)
    with pytest.raises(WritebackError) as failure:  # (which fails every waiting request)
        asyncio.run(committer.sync([fd]))
    assert failure.value.errno == errno.EIO


def _failing_once(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    real_syncfs = fsync._syncfs
    calls = [0]

    def syncfs(fd: int) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise WritebackError(code, f"syncfs: {os.strerror(code)}")
        real_syncfs(fd)

    monkeypatch.setattr(fsync, "_syncfs", syncfs)


def test_a_request_for_writes_begun_before_a_failed_pass_fails(
    here: Path, written: Callable[[Path, int], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A delivery that links its file in a thread asks only afterwards: a pass that
    # wrote the new entry out meanwhile, and failed, reported the only error.
    _failing_once(monkeypatch, errno.EIO)
    committer = GroupCommitter("syncfs")
    first, late = written(here, 2)
    mark = committer.mark()  # before the late request's writes
    with pytest.raises(WritebackError):
        asyncio.run(committer.sync([first]))
    with pytest.raises(WritebackError) as failure:
        asyncio.run(committer.sync([late], since=mark))
    assert failure.value.errno == errno.EIO
    asyncio.run(committer.sync([late], since=committer.mark()))  # writes begun after: fine


def test_every_request_of_a_failed_pass_gets_the_write_error(
    here: Path, written: Callable[[Path, int], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # not another request's missing path: a full disk must stay 452, not 451
    _failing_once(monkeypatch, errno.ENOSPC)
    committer = GroupCommitter("syncfs")
    (fd,) = written(here, 1)

    async def main() -> list[object]:
        return await asyncio.gather(
            committer.sync([str(here / "missing")]), committer.sync([fd]),
            return_exceptions=True,
        )

    missing, message = asyncio.run(main())
    assert isinstance(message, WritebackError) and message.errno == errno.ENOSPC
    assert isinstance(missing, WritebackError)  # the whole pass failed


def test_a_file_system_seen_first_by_its_path_is_fsynced_itself(
    here: Path, fsynced: list[int]
) -> None:
    # A witness opened only now would not hear of a write error from before its
    # open: the directory gets its own fsync, as in "fsync" mode; later passes syncfs.
    committer = GroupCommitter("syncfs")
    asyncio.run(committer.sync([str(here)]))
    assert (committer.stats.filesystem_syncs, committer.stats.dir_fsyncs) == (0, 1)
    asyncio.run(committer.sync([str(here)]))
    assert (committer.stats.filesystem_syncs, committer.stats.dir_fsyncs) == (1, 2)


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or syncfs_here(Path("/dev/shm")),
                    reason="no /dev/shm on a file system without trusted syncfs (tmpfs)")
def test_a_file_system_without_trusted_syncfs_gets_an_fsync_per_file(
    written: Callable[[Path, int], list[int]], fsynced: list[int]
) -> None:
    # FUSE's syncfs does nothing (sshfs, mergerfs...); tmpfs stands in for any file
    # system not known to make syncfs durable
    committer = GroupCommitter("syncfs")
    fd = os.open("/dev/shm", os.O_TMPFILE | os.O_WRONLY, 0o600)
    try:
        os.write(fd, b"x")
        asyncio.run(committer.sync([fd]))
    finally:
        os.close(fd)
    assert committer.stats.filesystem_syncs == 0
    assert fsynced == [fd] and list(committer._witnesses.values()) == [fsync.NO_SYNCFS]


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or syncfs_here(Path("/dev/shm")),
                    reason="no /dev/shm on a file system without trusted syncfs (tmpfs)")
def test_maildir_entries_on_a_file_system_without_syncfs_get_their_directory_fsynced(
    tmp_path: Path,
) -> None:
    # The new entries' request named the files' descriptors, which on such a file
    # system were fsync'ed one by one: the files again, never new/ itself.
    root = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        dest = MaildirDestination(str(root), "user", "mx.example.org",
                                  GroupCommitter("syncfs"))
        env = envelope("alice@example.org")
        spools = [spooled(tmp_path / f"s{i}", MESSAGE + f"{i}\r\n".encode(), env)
                  for i in range(10)]

        async def main() -> int:
            alice = [Recipient(Address("alice", "example.org"))]
            await dest.deliver(env, TRACE, spools[0], alice)  # alone: makes the maildir
            alone = dest.committer.stats.dir_fsyncs
            # the others wait behind a pass, so that none takes the lone path
            held = os.open(root, os.O_TMPFILE | os.O_WRONLY, 0o600)
            try:
                hold = asyncio.ensure_future(dest.committer.sync([held]))
                await asyncio.gather(*(dest.deliver(env, TRACE, s, alice) for s in spools[1:]))
                await hold
            finally:
                os.close(held)
            return alone

        alone = asyncio.run(main())
        assert len(files(root / "alice" / "new")) == 10
        stats = dest.committer.stats
        assert stats.filesystem_syncs == 0
        assert stats.dir_fsyncs > alone  # new/ among the shared passes' items
    finally:
        shutil.rmtree(root)
