"""Group commit: concurrent deliveries share fsync passes in one worker thread.

Every message must be on disk before its 250, but one thread hand-off and one
directory fsync per message caps throughput.  A :class:`GroupCommitter` runs at most
one sync pass at a time; requests that arrive while a pass runs are gathered into the
next pass, which fsyncs each distinct file and directory once.  Under load N messages
therefore cost far fewer passes and directory fsyncs than N.

A pass's fsyncs are issued from several threads at once, so the disk works on their
writes together and the block layer can merge their cache flushes (a journalling file
system also shares its commits between fsyncs in flight): 50 small files on the bench
machine took 8.5 ms in one thread, 4.4 ms in eight.

The threads are the committer's own, fed by a queue: a pass costs one queue entry per
thread and one wake-up of the event loop, when the last of its threads is done.  A
``ThreadPoolExecutor`` future per thread cost a lock-laden future, a wrapping asyncio
future and a loop wake-up each, which was a tenth of a small message's CPU in durable
mode (bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from mailgate.delivery.pid import this_pid

PathOrFd = str | int
SYNC_THREADS = 8  # a pass's fsyncs in flight at once


@dataclass
class CommitStats:
    """Counters, for tests and metrics."""

    requests: int = 0  # sync() calls
    passes: int = 0  # worker-thread hand-offs
    file_fsyncs: int = 0
    dir_fsyncs: int = 0


class GroupCommitter:
    """Batches ``sync`` requests into shared worker-thread fsync passes."""

    def __init__(self) -> None:
        self.stats = CommitStats()
        self._stats_lock = threading.Lock()  # count_direct runs in worker threads
        self._pending: list[tuple[tuple[PathOrFd, ...], asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def sync(self, items: Iterable[PathOrFd]) -> None:
        """Return once every path (file or directory) or fd (counted as a file) in ``items``
        is fsync'ed.

        Raises the OSError of the first item of this request that failed; other
        requests of the same pass are not affected by it.
        """
        wanted = tuple(items)
        with self._stats_lock:
            self.stats.requests += 1
        if not wanted:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((wanted, future))
        if self._task is None:
            # keep a reference: the loop holds tasks only weakly
            self._task = loop.create_task(self._drain())
        await future

    def count_direct(self, files: int) -> None:
        """Record fsyncs a caller did itself in a worker thread it already had (a
        Maildir fsyncs its file where it wrote it, saving a thread hop)."""
        with self._stats_lock:
            self.stats.requests += 1
            self.stats.file_fsyncs += files

    @property
    def idle(self) -> bool:
        """No pass is running or waiting: a lone delivery gains nothing by queueing."""
        return self._task is None and not self._pending

    def sync_now(self, items: Iterable[PathOrFd]) -> dict[PathOrFd, OSError]:
        """fsync ``items`` in the calling (worker) thread; the failures by item."""
        errors, files, dirs = _sync_all(list(dict.fromkeys(items)))
        with self._stats_lock:
            self.stats.requests += 1
            self.stats.file_fsyncs += files
            self.stats.dir_fsyncs += dirs
        return errors

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                distinct = list(dict.fromkeys(item for wanted, _ in batch for item in wanted))
                self.stats.passes += 1
                try:
                    errors, files, dirs = await self._pass(distinct)
                except asyncio.CancelledError:
                    _fail(batch + self._pending, "cancelled")
                    self._pending = []
                    raise
                except Exception as exc:  # e.g. no sync thread could be started
                    _fail(batch, repr(exc))
                    continue
                self.stats.file_fsyncs += files
                self.stats.dir_fsyncs += dirs
                for wanted, future in batch:
                    if future.done():  # the waiter was cancelled
                        continue
                    failed = next((errors[i] for i in wanted if i in errors), None)
                    if failed is None:
                        future.set_result(None)
                    else:
                        future.set_exception(failed)
        finally:
            self._task = None

    async def _pass(self, items: list[PathOrFd]) -> tuple[dict[PathOrFd, OSError], int, int]:
        """fsync ``items`` in up to SYNC_THREADS threads at once; as _sync_all."""
        jobs = _sync_jobs()
        ways = min(SYNC_THREADS, len(items))
        state = _Pass(asyncio.get_running_loop(), ways)
        for i in range(ways):
            jobs.put((items[i::ways], state))
        await state.future
        return state.errors, state.files, state.dirs


# The sync threads of this process and their queue, shared by every committer: a
# reload builds a new router and committer, and threads per committer were never
# stopped (eight more at each SIGHUP, until a pids limit refused new ones).
_jobs: queue.SimpleQueue[tuple[list[PathOrFd], _Pass]] = queue.SimpleQueue()
_threads_pid = 0  # the process whose threads serve _jobs (0: none yet)


def _sync_jobs() -> queue.SimpleQueue[tuple[list[PathOrFd], _Pass]]:
    """The queue of this process's sync threads, started on its first pass (threads
    do not survive a fork: a worker forked after a pass starts its own).  Called on
    the event loop's thread only."""
    global _jobs, _threads_pid
    if _threads_pid != this_pid():
        _jobs = queue.SimpleQueue()
        for n in range(SYNC_THREADS):
            # Daemon threads: at exit they wait in the queue, and a pass still in
            # flight belongs to a message whose 250 was never sent.
            threading.Thread(
                target=_serve_jobs, args=(_jobs,), name=f"mailgate-fsync_{n}", daemon=True
            ).start()
        _threads_pid = this_pid()
    return _jobs


class _Pass:
    """One pass in flight: its threads add up their results, the last one wakes the loop."""

    __slots__ = ("dirs", "errors", "files", "future", "left", "lock", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, parts: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.left = parts
        self.lock = threading.Lock()
        self.errors: dict[PathOrFd, OSError] = {}
        self.files = 0
        self.dirs = 0

    def part_done(self, errors: dict[PathOrFd, OSError], files: int, dirs: int) -> None:
        """Called in a sync thread with its part's results."""
        with self.lock:
            self.errors.update(errors)
            self.files += files
            self.dirs += dirs
            self.left -= 1
            last = self.left == 0
        if last:
            # RuntimeError: the loop is closed, nobody is waiting any more
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._finish)

    def _finish(self) -> None:
        if not self.future.done():  # the pass's waiter may have been cancelled
            self.future.set_result(None)


def _serve_jobs(jobs: queue.SimpleQueue[tuple[list[PathOrFd], _Pass]]) -> None:
    while True:
        items, state = jobs.get()
        try:
            result = _sync_all(items)
        except Exception as exc:  # e.g. a path with a NUL: the pass must still end
            failed = OSError(errno.EIO, f"fsync failed: {exc!r}")
            result = ({item: failed for item in items}, 0, 0)
        state.part_done(*result)


def _fail(batch: list[tuple[tuple[PathOrFd, ...], asyncio.Future[None]]], why: str) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(OSError(f"fsync pass failed: {why}"))


def _sync_all(items: list[PathOrFd]) -> tuple[dict[PathOrFd, OSError], int, int]:
    """fsync each item once; return the failures and how many files and dirs were synced."""
    errors: dict[PathOrFd, OSError] = {}
    files = dirs = 0
    for item in items:
        try:
            if isinstance(item, int):  # an open file being delivered: no fstat needed
                is_dir = False
                os.fsync(item)
            else:
                fd = os.open(item, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            errors[item] = exc
            continue
        if is_dir:
            dirs += 1
        else:
            files += 1
    return errors, files, dirs
