"""The spool: where a message streams to while DATA/BDAT arrives, before delivery.

A spool file holds the Received: header then the body as received (CRLF line ends).
It is never fsync'ed: the client gets no 250 until the destinations made their own
copies durable, so a crash only loses messages that were never acknowledged.

Spool file names carry the writing process's id, so :meth:`SpoolDir.cleanup` at
start-up removes only the files of processes that are gone (several mailgate
processes may share one spool directory).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import itertools
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from mailgate.delivery.pid import this_pid
from mailgate.protocol.replies import Reply, reply

log = logging.getLogger(__name__)

SUFFIX = ".spool"
WRITE_BUFFER = 256 * 1024  # big writes: one syscall per 256 KiB of body
READ_CHUNK = 1024 * 1024  # destinations stream the spool in pieces this big
MEMORY_LIMIT = 128 * 1024  # a message up to this size is held in memory, not on disk
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_NAME = re.compile(r"^.*\.(\d+)\.\d+" + re.escape(SUFFIX) + "$")
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_names = itertools.count()  # process-wide: several SpoolDirs may share a directory


def reply_for_os_error(exc: OSError) -> Reply:
    """452 4.3.1 for a full disk or quota, 451 4.3.0 for any other OS error."""
    return reply("delivery.storage" if exc.errno in _STORAGE_ERRNOS else "delivery.local_error")


def read_chunks(path: str) -> Iterator[bytes]:
    """The spooled message in READ_CHUNK pieces: never the whole body in memory."""
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ_CHUNK):
            yield chunk


def crlf_to_lf(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The chunks with CRLF line ends turned into LF (Maildir and mbox store LF)."""
    carry = b""
    for chunk in chunks:
        data = carry + chunk if carry else chunk
        carry = b"\r" if data.endswith(b"\r") else b""
        if carry:
            data = data[:-1]
        yield data.replace(b"\r\n", b"\n")
    if carry:
        yield carry


class LineEnds(enum.Enum):
    """How a mailbox file stores the line ends of a message spooled with CRLF."""

    AS_RECEIVED = "as received"  # BINARYMIME data: the octets as they came
    LF = "lf"  # each CRLF turned into LF; a CR on its own is kept
    # The same for a message whose every CR begins a CRLF (see SpoolFile.no_bare_cr):
    # deleting the CRs is one bytes.translate pass, ~80 us per 100 KB here against
    # ~210 us for replace(), whose two-octet search is slow in CPython.
    LF_DROPPING_CR = "lf, dropping each cr"

    @classmethod
    def for_message(cls, body: str, no_bare_cr: bool) -> LineEnds:
        """How a mailbox stores a message of MAIL's ``BODY=`` type: BINARYMIME as it
        came (RFC 3030 3: every bit of each octet is kept), other mail with LF."""
        if body == "BINARYMIME":
            return cls.AS_RECEIVED
        return cls.LF_DROPPING_CR if no_bare_cr else cls.LF

    def convert(self, data: bytes) -> bytes:
        """``data``, a whole message or header, in this form."""
        if self is LineEnds.LF_DROPPING_CR:
            return data.translate(None, b"\r")
        if self is LineEnds.LF:
            return data.replace(b"\r\n", b"\n")
        return data

    def convert_chunks(self, chunks: Iterable[bytes]) -> Iterable[bytes]:
        """The message read in ``chunks``, in this form (a CRLF may span two chunks).

        Both LF forms use replace() here: a large message is written in a worker
        thread, MiB by MiB, and bytes.translate's extra MiB allocation per chunk
        doubled the server's memory growth with ten 50 MB messages at once (each
        thread keeps its own malloc arena); what it saves matters for the small
        messages held in memory, not for these.
        """
        return chunks if self is LineEnds.AS_RECEIVED else crlf_to_lf(chunks)


def mailbox_component(name: str) -> str:
    """``name`` if it is safe as one path component of a mailbox; ValueError if not."""
    if not name or name in (".", "..") or "/" in name or "\0" in name or len(name) > 255:
        raise ValueError(f"unsafe mailbox name {name!r}")
    return name


class SpoolFile:
    """One spooled message: written once by the server, then read by the destinations.

    A message of at most MEMORY_LIMIT octets stays in memory, and the file is only
    created when a destination asks for :attr:`path`: a small message that is
    discarded or stored in a Maildir then costs no spool syscalls at all.  Memory
    stays bounded by MEMORY_LIMIT per message in flight.
    """

    __slots__ = ("_closed", "_gone", "_memory", "_path", "_writer", "no_bare_cr", "size")

    def __init__(self, path: str) -> None:
        self._path = path
        self.size = 0
        # Set by the writer when every CR of the message begins a CRLF (the DATA
        # reader refuses any other; BDAT data and reports quoting such data are not
        # checked): a mailbox storing LF line ends may then simply drop each CR.
        self.no_bare_cr = False
        self._memory: bytearray | None = bytearray()
        self._writer: BinaryIO | None = None
        self._closed = False
        self._gone = False

    @property
    def path(self) -> str:
        """The spool file's path; a message held in memory is written out first."""
        if self._memory is not None:
            self._spill()
        return self._path

    def held(self) -> bytes | None:
        """The whole message when it is small enough to be held in memory, else None."""
        return bytes(self._memory) if self._memory is not None else None

    def _spill(self) -> None:
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        writer = os.fdopen(fd, "wb", buffering=WRITE_BUFFER)
        try:
            writer.write(self._memory or b"")
            if self._closed:
                writer.close()
        except BaseException:
            writer.close()
            os.unlink(self._path)
            raise
        self._memory = None
        self._writer = None if self._closed else writer

    def write(self, data: bytes) -> None:
        """Append ``data`` (buffered).  Raises OSError, e.g. ENOSPC: see reply_for_os_error."""
        if self._closed:
            raise ValueError(f"spool file {self._path} is closed")
        memory = self._memory
        if memory is not None:
            if len(memory) + len(data) <= MEMORY_LIMIT:
                memory += data
                self.size += len(data)
                return
            self._spill()
        assert self._writer is not None
        self._writer.write(data)
        self.size += len(data)

    def close(self) -> None:
        """Flush and close the writer (no fsync).  Raises OSError like ``write``."""
        self._closed = True
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()

    def discard(self) -> None:
        """Close and remove the file; safe to call more than once and after errors."""
        try:
            self.close()
        except OSError as exc:  # a flush that hits a full disk: the file goes anyway
            log.debug("spool %s: flush on discard failed: %s", self._path, exc)
        if self._memory is not None:
            self._memory = None  # never written out: no file to remove, none to make
            self._gone = True
            return
        if not self._gone:
            self._gone = True
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("spool %s: cannot remove: %s", self._path, exc)

    def insert(self, offset: int, data: bytes) -> None:
        """Put ``data`` at ``offset`` of the closed message (header fields added after
        the trace fields).  A message written out is copied into a new file, which
        then takes the old one's name.  Raises OSError like ``write``."""
        if not self._closed:
            raise ValueError(f"spool file {self._path} is still being written")
        if self._memory is not None and len(self._memory) + len(data) <= MEMORY_LIMIT:
            self._memory[offset:offset] = data
            self.size += len(data)
            return
        source = self.path  # written out first if held
        # named as spool files are, so that a crash's leftover is cleaned at start-up
        copy = f"{source.removesuffix(SUFFIX)}-i.{this_pid()}.{next(_names)}{SUFFIX}"
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb", buffering=WRITE_BUFFER) as out, open(source, "rb") as old:
                out.write(old.read(offset))
                out.write(data)
                for chunk in iter(lambda: old.read(WRITE_BUFFER), b""):
                    out.write(chunk)
            os.replace(copy, source)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(copy)
            raise
        self.size += len(data)

    def read_head(self, limit: int) -> bytes:
        """The first ``limit`` bytes of the spooled message (for content filters)."""
        if self._memory is not None:
            return bytes(self._memory[: max(0, limit)])
        if self._writer is not None:
            self._writer.flush()
        with open(self._path, "rb") as f:
            return f.read(max(0, limit))


def unwritable(path: str, as_ids: tuple[int, int] | None = None) -> str | None:
    """None when this process (or the user and group ``as_ids``, which it will become)
    can write in ``path`` or make it; else the directory that stops it: the nearest
    one that exists must be one it can write in."""
    nearest = os.path.abspath(path)
    while not os.path.exists(nearest) and os.path.dirname(nearest) != nearest:
        nearest = os.path.dirname(nearest)
    if os.path.isdir(nearest) and may_access(nearest, os.W_OK | os.X_OK, as_ids):
        return None
    return nearest


def may_access(path: str, want: int, as_ids: tuple[int, int] | None = None) -> bool:
    """Whether this process (or the user and group ``as_ids``, which it will become)
    may access ``path`` as ``want`` says (os.R_OK, W_OK, X_OK or'ed together)."""
    if as_ids is None or as_ids[0] == os.geteuid():
        return os.access(path, want)
    # Another user's view, by the mode bits (the server drops to exactly one group).
    uid, gid = as_ids
    st = os.stat(path)
    if uid == 0:  # root: all but executing a file no one may execute
        return not (want & os.X_OK and not os.path.isdir(path) and not st.st_mode & 0o111)
    shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
    return (st.st_mode >> shift) & want == want  # (R_OK, W_OK, X_OK are 4, 2, 1)


class SpoolDir:
    """The spool directory; one file per message in flight."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ready = False

    def ensure(self) -> None:
        """Make the directory if need be and check that this process can write in it;
        OSError naming it otherwise (the server's start-up stops on that)."""
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            # A file made and removed, not os.access(): its error is the real one (a
            # read-only file system said "Permission denied", pointing at the modes).
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=self.path)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise OSError(exc.errno, f"spool_dir {self.path}: {exc.strerror or exc}") from None
        self._ready = True

    def problem(self, as_ids: tuple[int, int] | None = None) -> str | None:
        """What ensure() would fail on, found without making anything (check-config,
        for the server's user and group ``as_ids`` when it runs as root)."""
        nearest = unwritable(self.path, as_ids)
        if nearest is None:
            return None
        return (f"server.spool_dir: cannot make or write {self.path}"
                f" ({nearest} is not a directory this user can write in)")

    def create(self, session_id: str) -> SpoolFile:
        """A new, empty spool file for a message of session ``session_id``."""
        if not self._ready:
            self.ensure()  # made at start-up already, unless this runs outside serve
        sid = _UNSAFE.sub("_", session_id)[:64] or "msg"
        # Unique within this process; cleanup() at start-up removed what an earlier
        # process with our pid may have left under the same name.
        return SpoolFile(os.path.join(self.path, f"{sid}.{this_pid()}.{next(_names)}{SUFFIX}"))

    def cleanup(self) -> int:
        """Remove spool files left by processes that are gone; return how many."""
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return 0
        removed = 0
        for name in names:
            match = _NAME.match(name)
            if match is None:
                continue  # not ours: leave it alone
            pid = int(match.group(1))
            if pid != os.getpid() and pid_alive(pid):
                continue  # another mailgate process is still writing it
            try:
                os.unlink(os.path.join(self.path, name))
                removed += 1
            except FileNotFoundError:
                pass
        return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except (OverflowError, OSError):
        return False
    return True
