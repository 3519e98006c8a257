"""GroupCommitter: concurrent sync requests share worker-thread fsync passes."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from mailgate.delivery import fsync
from mailgate.delivery.fsync import GroupCommitter


def make_files(tmp_path: Path, count: int) -> list[str]:
    paths = []
    for i in range(count):
        directory = tmp_path / f"d{i % 2}"
        directory.mkdir(exist_ok=True)
        path = directory / f"f{i}"
        path.write_bytes(b"x")
        paths.append(str(path))
    return paths


def test_concurrent_requests_share_passes_and_directory_fsyncs(tmp_path: Path) -> None:
    committer = GroupCommitter()
    paths = make_files(tmp_path, 50)

    async def main() -> None:
        # each "message": its file, and the directory it was linked into
        await asyncio.gather(*(committer.sync([p, os.path.dirname(p)]) for p in paths))

    asyncio.run(main())
    stats = committer.stats
    assert stats.requests == 50
    assert stats.file_fsyncs == 50  # every file synced, once
    assert stats.passes < 50  # far fewer hand-offs than messages
    assert stats.dir_fsyncs <= 2 * stats.passes  # each directory once per pass
    assert stats.dir_fsyncs < 50  # two distinct directories, once per pass


def test_one_pass_syncs_a_path_once(tmp_path: Path) -> None:
    committer = GroupCommitter()
    (path,) = make_files(tmp_path, 1)

    async def main() -> None:
        await committer.sync([path, path, str(tmp_path), str(tmp_path)])

    asyncio.run(main())
    assert (committer.stats.file_fsyncs, committer.stats.dir_fsyncs) == (1, 1)


def test_a_failing_path_fails_only_its_own_request(tmp_path: Path) -> None:
    committer = GroupCommitter()
    (good,) = make_files(tmp_path, 1)

    async def main() -> list[object]:
        return await asyncio.gather(
            committer.sync([good]),
            committer.sync([str(tmp_path / "missing")]),
            committer.sync([good, str(tmp_path)]),
            return_exceptions=True,
        )

    first, second, third = asyncio.run(main())
    assert first is None and third is None
    assert isinstance(second, FileNotFoundError)


def test_file_descriptors_and_empty_requests(tmp_path: Path) -> None:
    committer = GroupCommitter()
    (path,) = make_files(tmp_path, 1)
    fd = os.open(path, os.O_RDONLY)

    async def main() -> None:
        await committer.sync([])
        await committer.sync([fd])

    try:
        asyncio.run(main())
    finally:
        os.close(fd)
    assert committer.stats.file_fsyncs == 1
    assert committer.stats.passes == 1


def test_a_pass_issues_its_fsyncs_in_parallel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The disk can only work on fsyncs together (and the block layer merge their
    # cache flushes) if they are in flight together: count how many are at once.
    lock = threading.Lock()
    in_flight = [0]
    most = [0]
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.05)
        real_fsync(fd)
        with lock:
            in_flight[0] -= 1

    monkeypatch.setattr(fsync.os, "fsync", slow_fsync)
    committer = GroupCommitter()
    paths = make_files(tmp_path, 20)
    missing = str(tmp_path / "missing")

    async def main() -> list[object]:
        return await asyncio.gather(
            committer.sync(paths), committer.sync([missing]), return_exceptions=True
        )

    first, second = asyncio.run(main())
    assert first is None and isinstance(second, FileNotFoundError)
    assert most[0] == fsync.SYNC_THREADS
    assert committer.stats.file_fsyncs == 20 and committer.stats.passes <= 2


def test_a_path_the_threads_cannot_take_fails_its_request_not_the_pass(
    tmp_path: Path,
) -> None:
    # os.open raises ValueError (not OSError) for a NUL in a path: the pass must end
    # anyway, with that request failed and the others synced.
    committer = GroupCommitter()
    (good,) = make_files(tmp_path, 1)

    async def main() -> list[object]:
        return await asyncio.wait_for(
            asyncio.gather(
                committer.sync([good]), committer.sync(["bad\0path"]), return_exceptions=True
            ),
            timeout=10,
        )

    first, second = asyncio.run(main())
    assert first is None
    assert isinstance(second, OSError) and "fsync failed" in str(second)


def test_sync_threads_are_started_again_in_a_forked_child(tmp_path: Path) -> None:
    # Threads do not survive fork: a worker process forked after the parent's first
    # pass must start its own rather than queue work nobody takes.
    committer = GroupCommitter()
    (path,) = make_files(tmp_path, 1)
    asyncio.run(committer.sync([path]))
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if its pass completes
        try:
            asyncio.run(asyncio.wait_for(committer.sync([path, str(tmp_path)]), timeout=10))
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _slow_committer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[GroupCommitter, str, str]:
    """A committer whose fsyncs take a while, and two files to sync."""
    _slow_fsyncs(monkeypatch)
    first, second = make_files(tmp_path, 2)
    return GroupCommitter(), first, second


def _assert_cancelled(failed: object, committer: GroupCommitter) -> None:
    """A request failed by a cancelled pass, and the committer left idle."""
    assert isinstance(failed, OSError) and "cancelled" in str(failed)
    assert committer.idle


def _slow_fsyncs(monkeypatch: pytest.MonkeyPatch, seconds: float = 0.2) -> None:
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(seconds)
        real_fsync(fd)

    monkeypatch.setattr(fsync.os, "fsync", slow_fsync)


def test_a_cancelled_waiter_leaves_the_committer_working(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    committer, first, second = _slow_committer(tmp_path, monkeypatch)

    async def main() -> None:
        waiter = asyncio.ensure_future(committer.sync([first]))
        await asyncio.sleep(0.05)  # its pass is under way
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.wait_for(committer.sync([second]), timeout=10)

    asyncio.run(main())
    assert committer.stats.file_fsyncs == 2


def test_a_cancelled_pass_fails_its_requests_and_the_next_one_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    committer, first, second = _slow_committer(tmp_path, monkeypatch)

    async def main() -> object:
        waiter = asyncio.ensure_future(committer.sync([first]))
        await asyncio.sleep(0.05)
        assert committer._task is not None
        committer._task.cancel()  # as at a shutdown: the pass's requests fail
        failed = await asyncio.gather(waiter, return_exceptions=True)
        await asyncio.wait_for(committer.sync([second]), timeout=10)
        return failed[0]

    failed = asyncio.run(main())
    _assert_cancelled(failed, committer)


def test_committers_share_the_process_sync_threads(tmp_path: Path) -> None:
    # Each reload builds a router with a new committer: with threads of its own per
    # committer, eight more were left at every SIGHUP, until a pids limit refused
    # new threads and deliveries answered 451.
    (path,) = make_files(tmp_path, 1)

    def sync_threads() -> int:
        return sum(t.name.startswith("mailgate-fsync_") for t in threading.enumerate())

    for _ in range(5):
        asyncio.run(GroupCommitter().sync([path, str(tmp_path)]))
    assert sync_threads() == fsync.SYNC_THREADS


def test_the_requests_of_a_pass_just_done_go_in_the_next_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Maildir delivery asks for its new entry as soon as its file's pass wakes it.
    # Messages of a second wave arrive while the first wave's pass runs: the pass
    # after it must take the first wave's entries along with the second wave's
    # files (one pass for each wave and one for the last entries: three); started
    # at once, it took only the files, and each wave's entries waited a pass more.
    _slow_fsyncs(monkeypatch, 0.3)  # (a margin for a loaded machine's sleep below)
    committer = GroupCommitter()
    (tmp_path / "b").mkdir()
    first, second = make_files(tmp_path, 2), make_files(tmp_path / "b", 2)

    async def message(path: str) -> None:
        await committer.sync([path])  # its file
        await committer.sync([os.path.dirname(path)])  # then its entry

    async def main() -> None:
        wave = [asyncio.ensure_future(message(p)) for p in first]
        await asyncio.sleep(0.05)  # the first wave's pass runs
        await asyncio.gather(*wave, *(message(p) for p in second))

    asyncio.run(main())
    assert committer.stats.passes == 3


def test_a_committer_cancelled_between_passes_fails_what_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    committer, first, second = _slow_committer(tmp_path, monkeypatch)

    async def main() -> object:
        in_pass = asyncio.ensure_future(committer.sync([first]))
        await asyncio.sleep(0)
        (_, first_done), = committer._pending
        await asyncio.sleep(0.05)  # its pass is under way
        waiting = asyncio.ensure_future(committer.sync([second]))
        drain = committer._task
        assert drain is not None
        # cancelled as the pass ends, while the committer lets the woken run
        first_done.add_done_callback(lambda _: drain.cancel())
        await in_pass
        return (await asyncio.wait_for(asyncio.gather(waiting, return_exceptions=True), 10))[0]

    failed = asyncio.run(main())
    _assert_cancelled(failed, committer)
