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

With ``sync_method = "syncfs"`` a pass is one syncfs(2) per file system instead of one
fsync per file and directory: the kernel writes back everything dirty there (the
pass's files and directory entries among it), and one fsync of a file kept open there
flushes the disk's cache after all of it (see _syncfs_all).  Under load that is far
less work than an fsync, a thread wake-up and a GIL hand-off per file; the price is
that unrelated dirty data on the same file system is written too.
syncfs reports write errors only from Linux 5.8 (the config refuses it on older
kernels), and reports each one once, to whichever syncfs comes first: a failed pass
therefore fails every request waiting at that moment and every one made later whose
writes began before it (see ``mark``), not only its own.  Only file systems known to
make syncfs durable get it (ext2/3/4, XFS, btrfs: FUSE's syncfs, for one, does
nothing); on any other one, and for a file system's first path, each item is
fsync'ed as in "fsync" mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import queue
import stat
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

from mailgate.config.delivery import SyncMethod
from mailgate.delivery.pid import this_pid
from mailgate.ops.logging import outside_sessions

PathOrFd = str | int
SYNC_THREADS = 8  # a pass's fsyncs in flight at once


class WritebackError(OSError):
    """syncfs failed: data somewhere on the file system did not reach the disk."""


@dataclass
class CommitStats:
    """Counters, for tests and metrics."""

    requests: int = 0  # sync() calls
    passes: int = 0  # worker-thread hand-offs
    file_fsyncs: int = 0  # files made durable (by fsync, or by a syncfs of their own)
    dir_fsyncs: int = 0  # directories made durable, likewise
    filesystem_syncs: int = 0  # syncfs calls (sync_method = "syncfs")


class GroupCommitter:
    """Batches ``sync`` requests into shared worker-thread fsync passes."""

    def __init__(self, method: SyncMethod = "fsync") -> None:
        self.method = method
        self.stats = CommitStats()
        self._stats_lock = threading.Lock()  # count_direct runs in worker threads
        self._pending: list[tuple[tuple[PathOrFd, ...], asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        # syncfs: file system (st_dev) → a descriptor kept open on it, through which
        # every syncfs of this committer learns of the write errors since its last
        # one (NO_SYNCFS: a file system whose items are fsync'ed one by one)
        self._witnesses: dict[int, int] = {}
        # syncfs: the pending requests' descriptors → (st_dev, is a directory), as
        # they were when the request was made
        self._fd_info: dict[int, tuple[int, bool]] = {}
        # syncfs: how many passes reported a write error, and the latest of them
        self._write_errors = 0
        self._last_write_error: WritebackError | None = None
        weakref.finalize(self, _close_all, self._witnesses)

    def mark(self) -> int:
        """Taken before a delivery's writes that reach ``sync`` only after an await
        (``since``): a write error a syncfs reported meanwhile may have been theirs."""
        return self._write_errors

    async def sync(self, items: Iterable[PathOrFd], since: int | None = None) -> None:
        """Return once every path (file or directory) or fd (counted as a file) in ``items``
        is fsync'ed.

        Raises the OSError of the first item of this request that failed; other
        requests of the same pass are not affected by it (but see the module's
        doc for syncfs).  ``since``: a ``mark`` taken before the items' writes, when
        an await came between those and this call.
        """
        wanted = tuple(items)
        with self._stats_lock:
            self.stats.requests += 1
        if not wanted:
            return
        if self.method == "syncfs":
            if since is not None and since != self._write_errors:
                failed = self._last_write_error
                assert failed is not None
                raise WritebackError(failed.errno, failed.strerror)
            self._note_descriptors(wanted)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((wanted, future))
        if self._task is None:
            # keep a reference: the loop holds tasks only weakly.  A context of its
            # own: it serves every session, not the one whose request started it.
            self._task = loop.create_task(self._drain(), context=outside_sessions())
        await future

    def covers_file_systems(self, fds: list[int]) -> bool:
        """Whether a request naming ``fds`` makes every change on their file systems
        durable (syncfs mode, each of them one that gets syncfs, as seen by an
        earlier request): then it also covers new directory entries there."""
        if self.method != "syncfs":
            return False
        return all(
            self._witnesses.get(os.fstat(fd).st_dev, NO_SYNCFS) != NO_SYNCFS for fd in fds
        )

    def _note_descriptors(self, items: tuple[PathOrFd, ...]) -> None:
        """syncfs: the file system of each descriptor, found here on the loop.

        An fstat is a microsecond here, while in the sync thread each system call is
        a GIL hand-off with the busy loop.  Whatever file system is new gets its
        witness now, made from the caller's descriptor, opened before its writes: a
        write error since then is reported through it.  (Asked each time: a number
        noted for a request that failed or was cancelled may name another file now.)
        """
        for item in items:
            if isinstance(item, int):
                mode = os.fstat(item)
                if mode.st_dev not in self._witnesses:
                    _new_witness(self._witnesses, mode.st_dev, item)
                self._fd_info[item] = (mode.st_dev, stat.S_ISDIR(mode.st_mode))

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
                known, self._fd_info = self._fd_info, {}
                distinct = list(dict.fromkeys(item for wanted, _ in batch for item in wanted))
                self.stats.passes += 1
                try:
                    errors, files, dirs = await self._pass(distinct, known)
                except asyncio.CancelledError:
                    _fail(batch + self._pending, "cancelled")
                    self._pending, self._fd_info = [], {}
                    raise
                except Exception as exc:  # e.g. no sync thread could be started
                    _fail(batch, repr(exc))
                    continue
                self.stats.file_fsyncs += files
                self.stats.dir_fsyncs += dirs
                written_off = [e for e in errors.values() if isinstance(e, WritebackError)]
                if written_off:
                    # The error may be another file's, written back by this pass, and
                    # no later syncfs reports it again: every request made by now
                    # (each one after its writes) may have lost data.  They fail, and
                    # so does one made later for writes begun before (``mark``).
                    batch += self._pending
                    self._pending, self._fd_info = [], {}
                    self._write_errors += 1
                    self._last_write_error = failed = written_off[0]
                    errors = {item: failed for wanted, _ in batch for item in wanted}
                for wanted, future in batch:
                    if future.done():  # the waiter was cancelled
                        continue
                    failed = next((errors[i] for i in wanted if i in errors), None)
                    if failed is None:
                        future.set_result(None)
                    else:
                        future.set_exception(failed)
                if self._pending:
                    # Let the waiters just woken run first: a Maildir delivery links
                    # its file and asks at once for its new entry, which then goes
                    # in the next pass rather than waiting for one more (passes per
                    # message halved on bench/maildir_micro.py, RESULTS.md).
                    try:
                        await asyncio.sleep(0)
                    except asyncio.CancelledError:
                        _fail(self._pending, "cancelled")
                        self._pending, self._fd_info = [], {}
                        raise
        finally:
            self._task = None

    async def _pass(
        self, items: list[PathOrFd], known: dict[int, tuple[int, bool]]
    ) -> tuple[dict[PathOrFd, OSError], int, int]:
        """fsync ``items`` in up to SYNC_THREADS threads at once (as _sync_all), or
        syncfs their file systems in one thread (``known``: see _note_descriptors)."""
        jobs = _sync_jobs()
        if self.method == "syncfs":
            state = _Pass(asyncio.get_running_loop(), 1)
            jobs.put((items, state, (self._witnesses, known)))
            await state.future
            self.stats.filesystem_syncs += state.syncs
            return state.errors, state.files, state.dirs
        ways = min(SYNC_THREADS, len(items))
        state = _Pass(asyncio.get_running_loop(), ways)
        for i in range(ways):
            jobs.put((items[i::ways], state, None))
        await state.future
        return state.errors, state.files, state.dirs


# A job: the items, the pass they belong to, and for a syncfs pass the committer's
# witnesses and what is known of the descriptors (None: fsync each item).
_Job = tuple[
    list[PathOrFd], "_Pass", tuple[dict[int, int], dict[int, tuple[int, bool]]] | None
]
# The sync threads of this process and their queue, shared by every committer: a
# reload builds a new router and committer, and threads per committer were never
# stopped (eight more at each SIGHUP, until a pids limit refused new ones).
_jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
_threads_pid = 0  # the process whose threads serve _jobs (0: none yet)


def _sync_jobs() -> queue.SimpleQueue[_Job]:
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

    __slots__ = ("dirs", "errors", "files", "future", "left", "lock", "loop", "syncs")

    def __init__(self, loop: asyncio.AbstractEventLoop, parts: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.left = parts
        self.lock = threading.Lock()
        self.errors: dict[PathOrFd, OSError] = {}
        self.files = 0
        self.dirs = 0
        self.syncs = 0

    def part_done(
        self, errors: dict[PathOrFd, OSError], files: int, dirs: int, syncs: int = 0
    ) -> None:
        """Called in a sync thread with its part's results."""
        with self.lock:
            self.errors.update(errors)
            self.files += files
            self.dirs += dirs
            self.syncs += syncs
            self.left -= 1
            last = self.left == 0
        if last:
            # RuntimeError: the loop is closed, nobody is waiting any more
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._finish)

    def _finish(self) -> None:
        if not self.future.done():  # the pass's waiter may have been cancelled
            self.future.set_result(None)


def _serve_jobs(jobs: queue.SimpleQueue[_Job]) -> None:
    while True:
        items, state, syncfs = jobs.get()
        result: tuple[dict[PathOrFd, OSError], int, int, int]
        try:
            result = (*_sync_all(items), 0) if syncfs is None else _syncfs_all(items, *syncfs)
        except Exception as exc:  # e.g. a path with a NUL: the pass must still end
            failed = OSError(errno.EIO, f"fsync failed: {exc!r}")
            result = ({item: failed for item in items}, 0, 0, 0)
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


def _syncfs_all(
    items: list[PathOrFd], witnesses: dict[int, int], known: dict[int, tuple[int, bool]]
) -> tuple[dict[PathOrFd, OSError], int, int, int]:
    """Make ``items`` durable by one syncfs per file system they are on; as _sync_all,
    and the number of syncfs calls.

    A descriptor kept open on each file system (a duplicate of the first one seen
    there) is the committer's witness: syncfs reports the write errors since the
    last syncfs through the same open file, so none falls between two passes.  The
    descriptors' file systems are ``known``; paths are looked at here.  Items on a
    file system without syncfs, and paths on one seen here first (a witness opened
    now would not hear of an error before), are fsync'ed one by one.
    """
    errors: dict[PathOrFd, OSError] = {}
    on: dict[int, list[PathOrFd]] = {}
    each: list[PathOrFd] = []
    files = dirs = 0
    for item in items:
        if isinstance(item, int):
            dev, is_dir = known[item]
        else:
            try:
                dev, is_dir, first = _look_at(item, witnesses)
            except OSError as exc:
                errors[item] = exc
                continue
            except ValueError as exc:  # a path with a NUL: its request fails, not the pass
                errors[item] = OSError(errno.EINVAL, f"fsync failed: {exc!r}")
                continue
            if first:
                each.append(item)
                continue
        if witnesses[dev] == NO_SYNCFS:
            each.append(item)
            continue
        on.setdefault(dev, []).append(item)
        if is_dir:
            dirs += 1
        else:
            files += 1
    for dev, members in on.items():
        try:
            _syncfs(witnesses[dev])
            # On ext2-like file systems (ext4 without a journal among them) syncfs
            # writes the inode tables and directory blocks last, after its flush of
            # the disk's cache: a new file's size and its entry in new/ could still be
            # in that volatile cache.  An fsync of the witness (its data long clean)
            # flushes it once more, after them.
            os.fsync(witnesses[dev])
        except OSError as exc:
            failed = exc if isinstance(exc, WritebackError) else WritebackError(
                exc.errno, f"fsync after syncfs: {exc.strerror}")
            errors.update(dict.fromkeys(members, failed))
    if each:
        one_by_one, more_files, more_dirs = _sync_all(each)
        errors.update(one_by_one)
        files += more_files
        dirs += more_dirs
    return errors, files, dirs, len(on)


def _look_at(path: str, witnesses: dict[int, int]) -> tuple[int, bool, bool]:
    """The file system of ``path``, whether it is a directory, and whether that file
    system is new here (it gets its witness)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd)
        first = mode.st_dev not in witnesses
        if first:
            _new_witness(witnesses, mode.st_dev, fd)
    finally:
        os.close(fd)
    return mode.st_dev, stat.S_ISDIR(mode.st_mode), first


NO_SYNCFS = -1  # a witness for a file system whose syncfs is not trusted
# f_type of the file systems whose syncfs writes and flushes everything (with the
# fsync after it): ext2/3/4, XFS, btrfs.  FUSE's, for one, does nothing (but on
# virtiofs), so sshfs or mergerfs would get a 250 for data only in the page cache.
_SYNCFS_TYPES = frozenset({0xEF53, 0x58465342, 0x9123683E})


def _new_witness(witnesses: dict[int, int], dev: int, fd: int) -> None:
    """Keep a duplicate of ``fd`` as the witness of file system ``dev``, or NO_SYNCFS.

    Either thread may get here first for a file system: setdefault keeps one (a
    dict operation is atomic under the GIL) and a duplicate that lost is closed.
    """
    if _filesystem_type(fd) not in _SYNCFS_TYPES:
        witnesses.setdefault(dev, NO_SYNCFS)
        return
    copy = os.dup(fd)
    if witnesses.setdefault(dev, copy) != copy:
        os.close(copy)


def _filesystem_type(fd: int) -> int:
    """fstatfs(2)'s f_type (the first field of struct statfs on Linux), or -1."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if _libc.fstatfs(fd, buf) != 0:
        return -1
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(fd: int) -> None:
    """syncfs(2) (the GIL is released during the call, as for any ctypes call)."""
    if _libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise WritebackError(code, f"syncfs: {os.strerror(code)}")


def _close_all(fds: dict[int, int]) -> None:
    for fd in fds.values():
        if fd != NO_SYNCFS:
            with contextlib.suppress(OSError):
                os.close(fd)
    fds.clear()
