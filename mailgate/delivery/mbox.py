"""mbox delivery: mboxrd quoting, a dotlock plus flock, fsync, and no half messages.

Each message is appended as ``From <sender> <asctime>``, ``Return-Path:``, then the
message with LF line ends, every line matching ``^>*From `` given one more ``>``
(mboxrd, so readers can undo it exactly), and an empty line.  Writers take the
``<mbox>.lock`` dotlock (O_EXCL; broken when its process is gone or it is older than
``stale_lock_age``) and then an flock on the mbox, so both kinds of mail readers are
kept out.  A failed append is cut off again (ftruncate to the old size) before the
locks are released, so no reader ever sees a partial message.  An append cut short by
a crash of the process is cut off by the next writer: the dotlock holds the writer's
pid and the size the mbox had before it wrote, and whoever breaks the lock of a dead
writer truncates the mbox back to that size (that message got no 250: it comes again);
only one writer breaks it, under the mbox's flock, which a live writer holds for its
whole append and a dead one no longer does.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import glob
import logging
import os
import pwd
import re
import stat
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress

from mailgate.config.delivery import MboxConfig
from mailgate.delivery.base import RecipientResult, SpoolReader, TraceInfo
from mailgate.delivery.spool import (
    WRITE_BUFFER,
    LineEnds,
    mailbox_component,
    pid_alive,
    read_chunks,
    reply_for_os_error,
)
from mailgate.delivery.trace import return_path_header
from mailgate.protocol.envelope import Address, Envelope, Recipient
from mailgate.protocol.replies import Reply, reply

log = logging.getLogger(__name__)

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_LONG_LINE = 64 * 1024  # a partial line longer than this is written out unfinished
_POLL = 0.05  # seconds between lock attempts
_SENDER_UNSAFE = re.compile(r"[\x00-\x20\x7f]+")


class MailboxBusy(Exception):
    """The locks could not be had in time."""


APPEND_THREADS = 16
_appenders: ThreadPoolExecutor | None = None
_appenders_pid = 0


def _append_pool() -> ThreadPoolExecutor:
    """The threads mbox appends run in, this process's own: an append waits up to
    lock_timeout for a busy mailbox, and in the event loop's default pool (six threads
    on two CPUs) such waits held up everything else it runs, AUTH checks included
    (a greeting took 27 s).  Made again in a forked child (threads do not survive)."""
    global _appenders, _appenders_pid
    if _appenders is None or _appenders_pid != os.getpid():
        _appenders = ThreadPoolExecutor(APPEND_THREADS, thread_name_prefix="mailgate-mbox")
        _appenders_pid = os.getpid()
    return _appenders


class MboxDestination:
    """Appends to ``config.path`` with ``{user}``/``{domain}`` filled in per recipient."""

    def __init__(self, config: MboxConfig) -> None:
        self.config = config

    def address_problem(self, address: Address) -> str | None:
        """Why no mbox can be named after ``address``, or None (asked at RCPT)."""
        try:
            self.mbox_path(Recipient(address))
        except ValueError as exc:
            return str(exc)
        return None

    def mbox_path(self, recipient: Recipient) -> str:
        """The mbox file of ``recipient``; ValueError if its names are unsafe as paths."""
        address = recipient.address
        return self.config.path.format(
            user=mailbox_component(address.local),
            domain=mailbox_component(address.domain.lower()),
        )

    async def deliver(
        self,
        envelope: Envelope,
        trace: TraceInfo,
        spool: SpoolReader,
        recipients: list[Recipient],
    ) -> list[RecipientResult]:
        paths: list[str | None] = []
        for rcpt in recipients:
            try:
                paths.append(self.mbox_path(rcpt))
            except ValueError:
                log.warning("mbox: refusing unsafe mailbox for %r", str(rcpt.address))
                paths.append(None)
        distinct = list(dict.fromkeys(p for p in paths if p is not None))
        # an mbox may be its user's own (a spool of per-user mailboxes, /var/mail/bob
        # being bob's): the owner, besides the server's user, it may have
        owners = {p: _account_uid(r.address.local) for r, p in zip(recipients, paths, strict=True)
                  if p is not None}
        # A small message held in memory is appended from there: asking for its path
        # would write it out to the spool first, only to read it back.
        held = spool.held()
        source = held if held is not None else spool.path
        ends = LineEnds.for_message(envelope.body, spool.no_bare_cr)
        loop = asyncio.get_running_loop()
        pool = _append_pool()
        replies = await asyncio.gather(
            *(loop.run_in_executor(pool, self._append, p, envelope, source, ends, owners[p])
              for p in distinct)
        )
        outcome = dict(zip(distinct, replies, strict=True))
        return [
            RecipientResult(rcpt, outcome[p] if p else reply("delivery.local_error"))
            for rcpt, p in zip(recipients, paths, strict=True)
        ]

    def recover_dead_appends(self) -> int:
        """At start-up and after a worker died: cut off what writers that died in the
        middle of an append left (a reader would see half a message until the next
        delivery to that mailbox did it); how many mailboxes were mended."""
        pattern = self.config.path.replace("{user}", "*").replace("{domain}", "*")
        mended = 0
        for lock in glob.glob(glob.escape(pattern).replace("[*]", "*") + ".lock"):
            if _stale(lock, self.config.stale_lock_age) is None:
                continue  # a live writer's
            path = lock.removesuffix(".lock")
            try:
                # not through a symlink or into another name of some file: in a
                # directory local users write in, either could aim the cut elsewhere
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue  # (no mbox: the next writer removes the lock)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                os.close(fd)
                continue
            try:
                # no waiting: a mailbox in use is left to its next writer
                mended += _break_stale(lock, path, fd, time.monotonic(),
                                       self.config.stale_lock_age)
            except OSError as exc:
                log.error("mbox %s: cannot recover: %s", path, exc)
            finally:
                os.close(fd)
        return mended

    def _append(
        self, path: str, envelope: Envelope, spool: str | bytes, ends: LineEnds,
        owner: int | None,
    ) -> Reply:
        """Append one copy to ``path`` (in a worker thread); the reply for it."""
        try:
            append_message(path, envelope, spool, self.config, ends, owner)
        except MailboxBusy as exc:
            log.warning("mbox %s: %s", path, exc)
            return reply("delivery.mailbox_busy")
        except OSError as exc:
            log.error("mbox %s: cannot append: %s", path, exc)
            return reply_for_os_error(exc)
        except Exception:
            log.exception("mbox %s: unexpected failure", path)
            return reply("delivery.local_error")
        return reply("ok")


def append_message(
    path: str, envelope: Envelope, spool: str | bytes, config: MboxConfig,
    ends: LineEnds = LineEnds.LF, owner: int | None = None,
) -> None:
    """Append the message (the spool file's path, or the message itself when held in
    memory) to the mbox at ``path``, durably, under both locks; ``ends`` says how its
    CRLF line ends become LF.  An existing mbox must be the server's user's, or
    ``owner``'s (the recipient's own account)."""
    deadline = time.monotonic() + config.lock_timeout
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, created = _open_mbox(path, owner)
    try:
        if created:
            _fsync_dir(directory)  # the new file's name must survive a crash too
        with _dotlock(path, fd, deadline, config.stale_lock_age) as lock_fd, \
                _flock(fd, path, deadline):
            start = os.fstat(fd).st_size
            _note_start(lock_fd, start)
            try:
                _write(fd, envelope, spool, ends)
                os.fsync(fd)
            except BaseException:
                _cut_back(fd, start, path)
                raise
    finally:
        os.close(fd)


def _cut_back(fd: int, size: int, path: str) -> None:
    """Remove a failed append, so no reader ever sees half a message."""
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as exc:
        log.error("mbox %s: cannot remove a partial message: %s", path, exc)


def mboxrd_quote(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """LF-ended text with one ``>`` added before every line matching ``^>*From ``."""
    pending = b""  # an unfinished line; it starts at a line start
    mid_line = False  # the next data continues a line already written out
    for chunk in chunks:
        data = pending + chunk if pending else chunk
        pending = b""
        if mid_line:
            end = data.find(b"\n") + 1
            if not end:
                yield data
                continue
            yield data[:end]
            data = data[end:]
            mid_line = False
        cut = data.rfind(b"\n") + 1
        if cut:
            yield _FROM_LINE.sub(rb">\1", data[:cut])
        pending = data[cut:]
        if len(pending) > _LONG_LINE:  # bound memory: a line of binary data
            yield _FROM_LINE.sub(rb">\1", pending, count=1)
            pending = b""
            mid_line = True
    if pending:
        yield _FROM_LINE.sub(rb">\1", pending, count=1)


def from_line(envelope: Envelope, now: float | None = None) -> bytes:
    """The ``From sender date`` separator line (asctime date, local time)."""
    sender = envelope.sender
    who = "MAILER-DAEMON" if sender is None or sender.is_null else str(sender)
    stamp = time.asctime(time.localtime(now))
    return f"From {_SENDER_UNSAFE.sub('_', who)} {stamp}\n".encode()


def _write(fd: int, envelope: Envelope, spool: str | bytes, ends: LineEnds) -> None:
    header = ends.convert(return_path_header(envelope))
    if isinstance(spool, bytes):
        chunks: Iterable[bytes] = [header + ends.convert(spool)]
    else:
        chunks = _prepend(header, ends.convert_chunks(read_chunks(spool)))
    last = b"\n"
    with os.fdopen(fd, "ab", buffering=WRITE_BUFFER, closefd=False) as out:
        out.write(from_line(envelope))
        for piece in mboxrd_quote(chunks):
            if piece:
                out.write(piece)
                last = piece[-1:]
        out.write(b"\n\n" if last != b"\n" else b"\n")  # end the line, then the empty line


def _prepend(first: bytes, rest: Iterable[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


def _account_uid(user: str) -> int | None:
    """The uid of the system account ``user``, if there is one."""
    try:
        return pwd.getpwnam(user).pw_uid
    except (KeyError, ValueError, UnicodeEncodeError):
        return None


def _open_mbox(path: str, owner: int | None = None) -> tuple[int, bool]:
    # O_NOFOLLOW: a symlink planted where a mailbox should be (in a directory local
    # users write in, as /var/mail) would have the mail appended wherever it points
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), True
    except FileExistsError:
        fd = os.open(path, flags)
    # An existing mailbox must be one we made, or its recipient's own: in a directory
    # local users write in, one of them could make /var/mail/bob first, readable to
    # itself and writable to us, and read bob's mail; or a hard link to a file of
    # ours.  (As root, files are taken as they are.)
    info = os.fstat(fd)
    euid = os.geteuid()
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or (
        euid != 0 and info.st_uid not in (euid, owner)
    ):
        os.close(fd)
        raise PermissionError(
            errno.EPERM,
            f"not written: not a file of ours (owner uid {info.st_uid}, "
            f"{info.st_nlink} links): made by someone else?",
        )
    return fd, False


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _dotlock(path: str, fd: int, deadline: float, stale_age: float) -> Iterator[int]:
    """Hold ``path``.lock (``fd``: the mbox, open); yields the lock's open file."""
    lock = path + ".lock"
    while True:
        try:
            lock_fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            break
        except FileExistsError:
            if _stale(lock, stale_age) is not None and _break_stale(lock, path, fd, deadline,
                                                                     stale_age):
                continue
            if time.monotonic() >= deadline:
                raise MailboxBusy(f"{lock} is held by another writer") from None
            time.sleep(_POLL)
    try:
        ours = os.fstat(lock_fd).st_ino
        os.write(lock_fd, f"{os.getpid()}\n".encode())
    except BaseException:
        # (a full disk: the create needs an inode, the pid a block) an empty lock
        # left behind would hold the mbox up for stale_lock_age
        os.close(lock_fd)
        _remove(lock)
        raise
    try:
        yield lock_fd  # (kept open: the lock is written to by this fd, never by name)
    finally:
        os.close(lock_fd)
        _remove_own(lock, ours)


def _break_stale(lock: str, path: str, fd: int, deadline: float, stale_age: float) -> bool:
    """Break a dead writer's lock; whether it was broken.  Under the mbox's flock, which
    a dead writer no longer holds and a live one holds for its whole append: of several
    writers that saw the same dead lock only the first breaks it (and cuts off the dead
    writer's part); a later one, checking again under the flock, finds a live lock or
    none.  Without it, a late breaker cut off a message another had just appended and
    answered 250 to, and removed that writer's lock."""
    try:
        with _flock(fd, path, deadline):
            stale = _stale(lock, stale_age)
            if stale is None:
                return False
            log.warning("mbox: breaking stale lock %s", lock)
            if stale >= 0:
                _cut_back_dead_writer(fd, path, stale)
            _remove(lock)
            return True
    except MailboxBusy:  # (a reader holds the flock: the caller's deadline decides)
        return False


def _remove_own(lock: str, inode: int) -> None:
    """Remove our lock, not one that replaced it (ours broken as too old)."""
    with suppress(FileNotFoundError):
        if os.stat(lock).st_ino == inode:
            os.unlink(lock)


def _note_start(lock_fd: int, start: int) -> None:
    """Write the mbox's size before this append into our lock, after the pid (the
    lock's first word, as other dotlock writers have it).  Through the file we made,
    not by its name (one swapped for a symlink while we waited for the flock would
    have had these bytes written over whatever it pointed at).  Not fsync'ed: it is
    for a crash of the process, whose writes the page cache keeps."""
    os.pwrite(lock_fd, f"{os.getpid()} {start}\n".encode(), 0)


def _stale(lock: str, stale_age: float) -> int | None:
    """None while ``lock`` may be a live writer's; for one left by a dead process (or
    too old to be live), the mbox size its writer noted, or -1 if none."""
    try:
        info = os.lstat(lock)
        with open(lock, "rb") as f:
            words = f.read(64).split()
    except FileNotFoundError:
        return None  # just released: the next attempt will take it
    age = time.time() - info.st_mtime
    # An empty lock file is a writer between creating and filling it: not stale.
    dead = bool(words) and words[0].isdigit() and not pid_alive(int(words[0]))
    if not dead and age <= stale_age:
        return None
    # The size is believed only from a lock this server's user made: in a mail spool
    # local users write in, a planted "999999 0" would have the mbox cut to nothing.
    ours = stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid()
    noted = words[1] if dead and ours and len(words) > 1 else b""
    return int(noted) if noted.isdigit() else -1


def _cut_back_dead_writer(fd: int, path: str, size: int) -> None:
    """Remove what a writer that died while appending left after ``size`` octets."""
    now = os.fstat(fd).st_size
    if now > size:
        log.warning("mbox %s: cutting off a message a dead writer left unfinished "
                    "(%d octets)", path, now - size)
        os.ftruncate(fd, size)
        os.fsync(fd)


@contextmanager
def _flock(fd: int, path: str, deadline: float) -> Iterator[None]:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise MailboxBusy(f"{path} is flock'ed by another process") from None
            time.sleep(_POLL)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _remove(path: str) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)
