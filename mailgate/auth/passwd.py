"""``mailgate passwd USER``: add a user or change a password in the users file."""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import os
import stat
import sys
import tempfile
from collections.abc import Iterator

from argon2 import PasswordHasher

from mailgate.auth.credentials import make_record
from mailgate.auth.users import check_user_name, is_content, parse_users, read_users_file


class _Refused(Exception):
    """A problem to print and exit with 1."""


def passwd_command(
    users_file: str,
    user: str,
    *,
    cram: bool = False,
    stdin_password: bool = False,
    hasher: PasswordHasher | None = None,
    server_gid: int | None = None,
) -> int:
    """Set ``user``'s password; 0 on success, 1 with a message on stderr otherwise.

    The password is read without echo (twice, to confirm) or, with ``stdin_password``,
    as one line from standard input.  Only ``--cram`` stores the CRAM-MD5 key states,
    which are password-equivalent for CRAM-MD5.  ``hasher`` picks argon2 parameters
    (tests use cheap ones).  The file is rewritten atomically with mode 0600, or 0640
    if it was group-readable, under a lock that serializes concurrent runs.  A file
    made new by root gets ``server_gid`` (the group of the server's user, when the
    config names one) and 0640, so that the server can read it after dropping its
    privileges; without one it stays root's alone, and a note says so.
    """
    try:
        problem = check_user_name(user)
        if problem:
            raise _Refused(problem)
        _existing_lines(users_file)  # a broken file is refused before asking
        password = _read_password(stdin_password)
        try:
            record = make_record(user, password, cram=cram, hasher=hasher)
        except ValueError as e:
            raise _Refused(str(e)) from None
        # Read, changed and written under a lock: two runs at once (a script adding
        # users) would each write back what it read, and one's user would be lost.
        with _locked(users_file):
            lines = _existing_lines(users_file)
            changed = _replace_user(lines, user, record.to_line())
            new_group = server_gid if os.geteuid() == 0 else None
            created = _write_atomically(
                users_file, "".join(f"{line}\n" for line in lines), new_group
            )
    except _Refused as e:
        print(f"mailgate passwd: {e}", file=sys.stderr)
        return 1
    except (EOFError, KeyboardInterrupt):
        print("mailgate passwd: no password given", file=sys.stderr)
        return 1
    print(f"{'password changed for' if changed else 'added user'} {user}", file=sys.stderr)
    if created and os.geteuid() == 0 and server_gid is None:
        print(f"mailgate passwd: note: {users_file} is new, root's and mode 0600: a server "
              "that drops its privileges cannot read it.  Give --config (the server's group "
              f"then reads it), or: chown root:GROUP {users_file} && chmod 0640 {users_file}",
              file=sys.stderr)
    return 0


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on ``path``.lock (the users file itself is replaced by a
    rename, so a lock on it would not be shared by the next run)."""
    try:
        # O_NOFOLLOW: the users file's directory may be writable by the server's user,
        # who must not have root (running passwd) create or open a file elsewhere
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
    except OSError as e:  # no such directory, or not ours to write in
        directory = os.path.dirname(os.path.abspath(path))
        raise _Refused(f"{path}: cannot write in {directory}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _existing_lines(path: str) -> list[str]:
    """The current lines; a broken file is refused rather than rewritten blindly."""
    if not os.path.exists(path):
        return []
    try:
        text = read_users_file(path)
        parse_users(text, path)
    except ValueError as e:
        raise _Refused(str(e)) from None
    except OSError as e:
        raise _Refused(f"{path}: {e.strerror or e}") from None
    return text.splitlines()


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        if not sys.stdin.isatty():  # getpass would warn and echo what it reads
            raise _Refused("standard input is not a terminal: give the password with --stdin")
        password = getpass.getpass("New password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise _Refused("the passwords differ")
    if not password:
        raise _Refused("empty password")
    return password


def _replace_user(lines: list[str], user: str, new: str) -> bool:
    """Put ``new`` in place of ``user``'s line (keeping its position) or append it."""
    for i, line in enumerate(lines):
        if is_content(line) and line.strip().split(":", 1)[0] == user:
            lines[i] = new
            return True
    lines.append(new)
    return False


def _write_atomically(path: str, text: str, new_group: int | None) -> bool:
    """Replace ``path`` with ``text``; whether the file is new."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        old = os.stat(path)
    except FileNotFoundError:
        old = None
    # mkstemp creates the file 0600 from the start: no moment where others can read it.
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".users.", suffix=".tmp")
    except OSError as e:  # no such directory, or not ours to write in
        raise _Refused(f"{path}: cannot write in {directory}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if old is not None:
                # Run as root for a file the server's user owns, or root's and readable
                # to the server's group (docs/deployment.md): keep it readable to it.
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), old.st_uid, old.st_gid)
                os.fchmod(f.fileno(), 0o600 | (old.st_mode & stat.S_IRGRP))
            elif new_group is not None:  # root:<server's group> 0640, as deployment.md
                os.fchown(f.fileno(), -1, new_group)
                os.fchmod(f.fileno(), 0o640)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _Refused(f"{path}: {e.strerror or e}") from None
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a crash
        finally:
            os.close(dir_fd)
    except OSError as e:  # the file is in place; whether the rename is on disk, unknown
        raise _Refused(f"{path}: written, but {directory} could not be synced: "
                       f"{e.strerror or e}") from None
    return old is None
