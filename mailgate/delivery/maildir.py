"""Maildir delivery: tmp/ → fsync → link into new/ → fsync new/, then 250.

A message for several maildirs is written once and hard-linked into each of them
(copied where they are on another file system).  A reader never sees a partial
message: a file appears in new/ only once its data is on disk, and the name is
unique (``<sec>.M<usec>P<pid>Q<n>.<host>``, the maildir convention), so concurrent
deliveries never collide; a name that exists anyway is never overwritten.

A message for one maildir is written, where Linux allows, into an unnamed file in
tmp/ (``O_TMPFILE``) that gets its only name when it is linked into new/: nothing is
created and removed in tmp/ per message, and a crash leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mailgate.config.delivery import MaildirLayout
from mailgate.delivery.base import RecipientResult, SpoolReader, TraceInfo
from mailgate.delivery.fsync import GroupCommitter
from mailgate.delivery.pid import this_pid
from mailgate.delivery.spool import (
    WRITE_BUFFER,
    LineEnds,
    mailbox_component,
    pid_alive,
    read_chunks,
    reply_for_os_error,
    unwritable,
)
from mailgate.delivery.trace import return_path_header
from mailgate.protocol.envelope import Address, Envelope, Recipient
from mailgate.protocol.replies import Reply, reply

log = logging.getLogger(__name__)

_SUBDIRS = ("tmp", "new", "cur")
_UNIQUE = re.compile(r"^\d+\.M\d+P(\d+)Q\d+\.")
_NO_LINK = frozenset({errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP})
_O_TMPFILE: int | None = getattr(os, "O_TMPFILE", None)  # Linux only
# what open(O_TMPFILE) fails with on a file system that has no unnamed files
_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL})
_deliveries = itertools.count()
TMP_MAX_AGE = 36 * 3600  # the Maildir convention: a tmp/ file this old is abandoned


def unique_name(hostname: str) -> str:
    """A maildir file name no other delivery on any host uses."""
    now = time.time()
    sec = int(now)
    host = _host_part(hostname)
    return f"{sec}.M{int((now - sec) * 1e6)}P{this_pid()}Q{next(_deliveries)}.{host}"


def _real_subdirs(parent: str) -> list[str]:
    """The directories in ``parent`` that are directories themselves, not symlinks to
    one: a cleanup must not follow a link planted under maildir_root out of it."""
    try:
        with os.scandir(parent) as entries:
            return [e.path for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _names(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def _host_part(hostname: str) -> str:
    return hostname.replace("/", "\\057").replace(":", "\\072") or "localhost"


def _writer_pid(name: str) -> int | None:
    """The pid in a name made by unique_name, or None for any other name."""
    match = _UNIQUE.match(name)
    return int(match.group(1)) if match else None


@dataclass
class _Run:
    """The state of one message's delivery to a set of maildirs."""

    name: str
    staged: dict[str, str] = field(default_factory=dict)  # maildir → its file in tmp/
    # maildir → the open descriptor of its unnamed file in tmp/ (closed by _close_all)
    unnamed: dict[str, int] = field(default_factory=dict)
    synced: int = 0  # files written and fsync'ed in a worker thread (for the stats)
    dirs: set[str] = field(default_factory=set)  # directories with new entries
    published: dict[str, str] = field(default_factory=dict)  # maildir → its file in new/
    failed: dict[str, Reply] = field(default_factory=dict)
    vanished: set[str] = field(default_factory=set)  # failed for a missing file or dir

    def fail(self, boxes: Iterable[str], exc: OSError) -> None:
        for box in boxes:
            if box not in self.failed and exc.errno == errno.ENOENT:
                self.vanished.add(box)
            self.failed.setdefault(box, reply_for_os_error(exc))

    def dirs_to_sync(self) -> list[str]:
        """The directories whose new entries must be durable before the 250."""
        return sorted(self.dirs | {os.path.join(box, "new") for box in self.published})


class MaildirDestination:
    """Maildirs under ``root``: ``root/<user>/`` or ``root/<domain>/<user>/``."""

    def __init__(
        self, root: str, layout: MaildirLayout, hostname: str, committer: GroupCommitter
    ) -> None:
        self.root = os.path.abspath(root)  # fixed now: a later chdir must not move mail
        self.layout = layout
        self.hostname = hostname
        self.committer = committer
        self._ready: set[str] = set()  # maildirs known to have tmp/, new/ and cur/
        self._unnamed: bool | None = None  # O_TMPFILE usable here (None: not tried yet)
        self._in_progress = 0  # deliveries under way (a lone one needs no group commit)

    def problem(self, as_ids: tuple[int, int] | None = None) -> str | None:
        """Why this process (or the user and group ``as_ids``) could not store mail
        under the root, found without making anything (start-up and check-config
        warn; per-user maildirs made beforehand under a root it cannot write in still
        take mail)."""
        nearest = unwritable(self.root, as_ids)
        if nearest is None:
            return None
        if nearest == self.root:
            return (f"{self.root} is not writable by the server's user: mail for users "
                    "whose maildir is not already there is answered 451")
        return (f"cannot make {self.root} ({nearest} is not a directory the server's "
                "user can write in): every delivery to a maildir there is answered 451")

    def cleanup_tmp(self) -> int:
        """At start-up: remove tmp/ files that no delivery will finish; return how many.

        A file of ours (``...P<pid>Q<n>.<our host>``) whose process is gone was left by
        a crash; any file older than 36 hours is abandoned (the Maildir rule).  Files
        of a live process, or another host's, are left alone.  Blocking: call it
        before serving.
        """
        own = f".{_host_part(self.hostname)}"
        depth = 2 if self.layout == "domain/user" else 1
        boxes = [self.root]
        for _ in range(depth):
            boxes = [d for parent in boxes for d in _real_subdirs(parent)]
        tmps = [t for box in boxes for t in _real_subdirs(box) if os.path.basename(t) == "tmp"]
        removed = 0
        now = time.time()
        for path in (os.path.join(t, name) for t in tmps for name in _names(t)):
            name = os.path.basename(path)
            pid = _writer_pid(name) if name.endswith(own) else None
            try:
                gone = pid is not None and (pid == os.getpid() or not pid_alive(pid))
                if gone or now - os.lstat(path).st_mtime > TMP_MAX_AGE:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("maildir: cannot clean %s: %s", path, exc)
        return removed

    def address_problem(self, address: Address) -> str | None:
        """Why no maildir can be named after ``address``, or None (asked at RCPT)."""
        try:
            self.mailbox(address)
        except ValueError as exc:
            return str(exc)
        return None

    def mailbox(self, address: Address) -> str:
        """The maildir of ``address``; ValueError if its names are unsafe as paths."""
        user = mailbox_component(address.local)
        if self.layout == "domain/user":
            return os.path.join(self.root, mailbox_component(address.domain.lower()), user)
        return os.path.join(self.root, user)

    async def deliver(
        self,
        envelope: Envelope,
        trace: TraceInfo,
        spool: SpoolReader,
        recipients: list[Recipient],
    ) -> list[RecipientResult]:
        boxes: list[str | None] = []
        for rcpt in recipients:
            try:
                boxes.append(self.mailbox(rcpt.address))
            except ValueError:
                log.warning("maildir: refusing unsafe mailbox for %r", str(rcpt.address))
                boxes.append(None)
        wanted = list(dict.fromkeys(box for box in boxes if box is not None))
        outcome = await self._store(wanted, envelope, spool) if wanted else {}
        return [
            RecipientResult(rcpt, outcome[box] if box else reply("delivery.local_error"))
            for rcpt, box in zip(recipients, boxes, strict=True)
        ]

    async def _store(
        self, boxes: list[str], envelope: Envelope, spool: SpoolReader
    ) -> dict[str, Reply]:
        """Deliver one copy into each maildir; the reply for each.

        A maildir made once is not checked again before each delivery (a stat per
        message was ~2 % of a worker's CPU in durable mode).  One removed since (a
        user or a script deleting it) shows up as a missing file or directory: it is
        made again and its copy delivered once more.
        """
        replies, vanished = await self._store_once(boxes, envelope, spool)
        again = [box for box in vanished if box in self._ready]
        if again:
            self._ready.difference_update(again)
            replies.update((await self._store_once(again, envelope, spool))[0])
        return replies

    async def _store_once(
        self, boxes: list[str], envelope: Envelope, spool: SpoolReader
    ) -> tuple[dict[str, Reply], set[str]]:
        """One attempt of _store; the replies, and the maildirs that failed for a
        missing file or directory."""
        ends = LineEnds.for_message(envelope.body, spool.no_bare_cr)
        header = ends.convert(return_path_header(envelope))
        run = _Run(unique_name(self.hostname))
        # Alone (no other delivery in progress, no fsync pass running or queued), a
        # message is written, fsync'ed and published in one worker hop, directories
        # included: a group commit has nothing to share.  Otherwise the fsyncs go
        # through the group commit, shared with the concurrent deliveries.
        lone = self._in_progress == 0 and self.committer.idle
        self._in_progress += 1
        try:
            held = spool.held()
            if held is not None and not lone:
                await self._store_held(run, boxes, header, held, ends)
            else:
                # A small message held in memory is written straight into the maildir.
                source = held if held is not None else spool.path
                mark = self.committer.mark()  # (the links are made in the thread)
                await asyncio.to_thread(
                    self._stage_and_publish, run, boxes, header, source, ends, lone
                )
                if not lone:
                    await self._sync(run, run.dirs_to_sync(), list(run.published), mark)
        except Exception:
            log.exception("maildir: unexpected failure")
            run.fail(boxes, OSError(errno.EIO, "unexpected failure"))
        finally:
            self._in_progress -= 1
            # only after a failure is anything left here: cheap unlinks, on the loop
            _unlink_all(run.staged.values())
            for box in run.failed:  # never leave a copy whose 250 was not sent
                _unlink_all([run.published.pop(box)] if box in run.published else [])
        return {box: run.failed.get(box) or reply("ok") for box in boxes}, run.vanished

    async def _store_held(
        self, run: _Run, boxes: list[str], header: bytes, held: bytes, ends: LineEnds
    ) -> None:
        """A small message among concurrent deliveries: written into tmp/ and linked
        into new/ on the event loop, fsync'ed by the shared passes of the group commit.

        Writing a few KB into the page cache takes microseconds; handing every message
        to a worker thread cost far more (a GIL hand-off and two context switches per
        system call made there while the loop is busy).  Only the fsyncs, which wait
        on the disk, leave the loop, and each pass serves every message waiting.
        """
        fds = self._stage_bytes(run, boxes, header + ends.convert(held))
        unnamed = set(run.unnamed.values())  # linked through their fd, closed with run
        try:
            if fds:
                await self._sync(run, fds, [*run.staged, *run.unnamed])
            self._publish(run)
            if run.published:
                # A syncfs needs only to know the file system of the new entries: the
                # files' own (a link cannot leave it, nor can a directory made here).
                # Elsewhere each directory is fsync'ed (an fsync of a file is not one
                # of its directory).
                by_fs = self.committer.covers_file_systems(fds)
                await self._sync(run, fds if by_fs else run.dirs_to_sync(), list(run.published))
        finally:
            for fd in fds:
                if fd not in unnamed:
                    os.close(fd)
            _close_all(run)

    def _stage_bytes(self, run: _Run, boxes: list[str], data: bytes) -> list[int]:
        """Write ``data`` into the first maildir's tmp/ and link it into the others';
        the open descriptors of the files written, still to be fsync'ed."""
        if self._stage_unnamed(run, boxes, lambda fd: _write_all(fd, data)):
            return list(run.unnamed.values())
        fds: list[int] = []
        source = None
        for box in boxes:
            tmp = os.path.join(box, "tmp", run.name)
            try:
                self._ensure(box, run.dirs)
                if source is None or not _try_link(source, tmp):
                    fds.append(_create(tmp, data))
                    source = source or tmp
            except OSError as exc:
                log.error("maildir %s: cannot write: %s", box, exc)
                run.fail([box], exc)
                continue
            run.staged[box] = tmp
        return fds

    async def _sync(
        self, run: _Run, paths: list[str] | list[int], boxes: list[str], since: int | None = None
    ) -> None:
        try:
            await self.committer.sync(paths, since)
        except OSError as exc:
            log.error("maildir: fsync failed: %s", exc)
            run.fail(boxes, exc)

    def _stage_and_publish(
        self, run: _Run, boxes: list[str], header: bytes, spool: str | bytes, ends: LineEnds,
        sync_dirs: bool,
    ) -> None:
        """Write and fsync the file in tmp/, link it into new/ and, with ``sync_dirs``,
        fsync the directories too (worker thread).

        The message is visible in new/ before the directory fsync; its 250 is not
        sent before that fsync, so a crash in between can only cause a resend.
        """
        try:
            self._stage(run, boxes, header, spool, ends)
            self.committer.count_direct(files=run.synced)
            self._publish(run)
        finally:
            # here, in this thread: were the awaiting task cancelled, the loop must not
            # close descriptors this thread may still use
            _close_all(run)
        if sync_dirs and run.published:
            errors = self.committer.sync_now(run.dirs_to_sync())
            if errors:
                failure = next(iter(errors.values()))
                log.error("maildir: fsync failed: %s", failure)
                run.fail(list(run.published), failure)

    def _stage(
        self, run: _Run, boxes: list[str], header: bytes, spool: str | bytes, ends: LineEnds
    ) -> None:
        """Write the message into the first maildir's tmp/, link it into the others'."""

        def write_unnamed(fd: int) -> None:
            _write_into(fd, header, spool, ends)
            run.synced += 1

        if self._stage_unnamed(run, boxes, write_unnamed):
            return
        source = None
        for box in boxes:
            tmp = os.path.join(box, "tmp", run.name)
            try:
                self._ensure(box, run.dirs)
                if source is None:
                    _write_message(tmp, header, spool, ends)
                    run.synced += 1
                    source = tmp
                elif not _try_link(source, tmp):
                    _copy(source, tmp)
                    run.synced += 1
            except OSError as exc:
                log.error("maildir %s: cannot write: %s", box, exc)
                run.fail([box], exc)
                continue
            run.staged[box] = tmp

    def _ensure(self, box: str, dirs: set[str]) -> None:
        """Create the maildir's directories if needed; note the ones to fsync."""
        if box in self._ready:  # see _store for a maildir removed since
            return
        missing = []
        path = os.path.abspath(box)  # a relative root would loop at "" forever
        while not os.path.isdir(path):
            missing.append(path)
            path = os.path.dirname(path)
        os.makedirs(box, mode=0o700, exist_ok=True)
        dirs.update(os.path.dirname(p) for p in missing)
        for sub in _SUBDIRS:
            try:
                os.mkdir(os.path.join(box, sub), 0o700)
                dirs.add(box)
            except FileExistsError:
                pass
        self._ready.add(box)

    def _stage_unnamed(self, run: _Run, boxes: list[str], write: Callable[[int], None]) -> bool:
        """A message for one maildir: ``write`` it into an unnamed file in that
        maildir's tmp/, kept open in ``run.unnamed`` for _publish.  False when the
        named tmp/ file is to be used instead; a failure is recorded in ``run``.

        Whether unnamed files work (Linux, O_TMPFILE, /proc for the link) is tried
        once per process on the first maildir; one on a file system without O_TMPFILE
        (NFS, say, among local ones) gets the named file each time.
        """
        if len(boxes) != 1 or self._unnamed is False:
            return False
        box = boxes[0]
        try:
            self._ensure(box, run.dirs)
            if self._unnamed is None:
                self._unnamed = _unnamed_supported(os.path.join(box, "tmp"))
                if not self._unnamed:
                    return False
            try:
                fd = _create_unnamed(box)
            except OSError as exc:
                if exc.errno in _NO_TMPFILE:
                    return False
                raise
            run.unnamed[box] = fd
            write(fd)
        except OSError as exc:
            log.error("maildir %s: cannot write: %s", box, exc)
            run.fail([box], exc)
        return True

    def _publish(self, run: _Run) -> None:
        """Link each staged file into new/ under a name nobody uses (the unnamed
        files stay open in ``run`` until _close_all)."""
        for box, fd in run.unnamed.items():
            if box in run.failed:
                continue
            try:
                run.published[box] = _link_unique_fd(
                    fd, os.path.join(box, "new"), run.name, self.hostname
                )
            except OSError as exc:
                log.error("maildir %s: cannot move into new/: %s", box, exc)
                run.fail([box], exc)
        for box, tmp in list(run.staged.items()):
            if box in run.failed:
                continue
            try:
                new = _link_unique(tmp, os.path.join(box, "new"), run.name, self.hostname)
            except OSError as exc:
                log.error("maildir %s: cannot move into new/: %s", box, exc)
                run.fail([box], exc)
                continue
            run.published[box] = new
            del run.staged[box]  # its tmp/ name is gone


def _create_unnamed(box: str) -> int:
    """An open, unnamed file in the maildir's tmp/ (O_TMPFILE)."""
    assert _O_TMPFILE is not None
    return os.open(os.path.join(box, "tmp"), _O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)


def _link_fd(fd: int, target: str) -> None:
    # linkat(AT_SYMLINK_FOLLOW) on the /proc link names the open file itself.  Python
    # calls linkat only when given a dir_fd; an absolute path ignores its value.
    os.link(f"/proc/self/fd/{fd}", target, src_dir_fd=fd, follow_symlinks=True)


def _unnamed_supported(tmp_dir: str) -> bool:
    if _O_TMPFILE is None:
        return False
    probe = os.path.join(tmp_dir, f".probe.{os.getpid()}.{next(_deliveries)}")
    try:
        fd = os.open(tmp_dir, _O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        _link_fd(fd, probe)
    except OSError:
        return False
    finally:
        os.close(fd)
    _unlink_all([probe])
    return True


def _link_unique_fd(fd: int, new_dir: str, name: str, hostname: str) -> str:
    """Link the unnamed file ``fd`` into ``new_dir`` (never over an existing file)."""
    for _ in range(10):
        target = os.path.join(new_dir, name)
        try:
            _link_fd(fd, target)
        except FileExistsError:
            name = unique_name(hostname)
            continue
        return target
    raise OSError(errno.EEXIST, "no unique maildir name found", new_dir)


def _close_all(run: _Run) -> None:
    for fd in run.unnamed.values():
        os.close(fd)
    run.unnamed.clear()


def _write_into(fd: int, header: bytes, spool: str | bytes, ends: LineEnds) -> None:
    """Write the message into the open file ``fd`` and fsync it; ``spool`` is the spool
    file's path or the message itself."""
    if isinstance(spool, bytes):
        _write_all(fd, header + ends.convert(spool))
        os.fsync(fd)
        return
    with os.fdopen(fd, "wb", buffering=WRITE_BUFFER, closefd=False) as out:
        out.write(header)
        chunks = read_chunks(spool)
        for chunk in ends.convert_chunks(chunks):
            out.write(chunk)
        out.flush()
        os.fsync(fd)


def _write_message(path: str, header: bytes, spool: str | bytes, ends: LineEnds) -> None:
    """``spool`` is the spool file's path, or the message itself when held in memory
    (then it goes out in one write, without a 256 KiB buffer: most mail is small)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        _write_into(fd, header, spool, ends)  # durable before it is linked into new/
    except BaseException:
        _unlink_all([path])
        raise
    finally:
        os.close(fd)


def _create(path: str, data: bytes) -> int:
    """A new file holding ``data``; its descriptor, open (the caller fsyncs it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
    except BaseException:
        os.close(fd)
        _unlink_all([path])
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _try_link(source: str, target: str) -> bool:
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno in _NO_LINK:
            return False
        raise
    return True


def _copy(source: str, target: str) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=WRITE_BUFFER) as out:
            for chunk in read_chunks(source):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        _unlink_all([target])
        raise


def _link_unique(tmp: str, new_dir: str, name: str, hostname: str) -> str:
    """Link ``tmp`` into ``new_dir`` (never over an existing file) and drop ``tmp``."""
    for _ in range(10):
        target = os.path.join(new_dir, name)
        try:
            if not _try_link(tmp, target):
                if os.path.lexists(target):
                    raise FileExistsError(errno.EEXIST, "exists", target)
                os.rename(tmp, target)  # a file system without hard links
                return target
        except FileExistsError:
            name = unique_name(hostname)
            continue
        os.unlink(tmp)
        return target
    raise OSError(errno.EEXIST, "no unique maildir name found", new_dir)


def _unlink_all(paths: Iterable[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("maildir: cannot remove %s: %s", path, exc)
