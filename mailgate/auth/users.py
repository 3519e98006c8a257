"""The users file: one user per line, stored credential forms, no plaintext passwords.

    # comment
    alice:argon2=$argon2id$v=19$m=65536,t=3,p=4$...:scram-sha-256=SALT,4096,STORED,SERVER
    bob:argon2=$argon2id$...:scram-sha-256=...:cram-md5=<64 hex digits>

Fields after the user name are ``form=value``, separated by ``:`` (no value contains a
colon).  ``argon2`` serves PLAIN and LOGIN, ``scram-sha-256`` (base64 salt, iteration
count, base64 StoredKey and ServerKey, RFC 5802) serves SCRAM-SHA-256, ``cram-md5``
(the HMAC-MD5 key states, see md5state) serves CRAM-MD5.  Errors name the file and
line and never quote a stored value.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass
from typing import Final

from argon2 import extract_parameters
from argon2.exceptions import InvalidHashError

from mailgate.auth.md5state import STATE_SIZE

ARGON2: Final = "argon2"
SCRAM: Final = "scram-sha-256"
CRAM: Final = "cram-md5"
FORMS: Final = (ARGON2, SCRAM, CRAM)

SCRAM_MIN_ITERATIONS: Final = 4096  # RFC 7677 section 4; also scramp's floor
SCRAM_MAX_ITERATIONS: Final = 10_000_000  # scramp's DoS guard
SCRAM_MIN_SALT: Final = 12  # bytes; scramp refuses shorter salts
MAX_REPORTED: Final = 20  # bad lines named in one error; the rest are counted
SHA256_SIZE: Final = 32


@dataclass(frozen=True, slots=True)
class ScramKeys:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    def encode(self) -> str:
        b64 = base64.b64encode
        return (
            f"{b64(self.salt).decode()},{self.iterations},"
            f"{b64(self.stored_key).decode()},{b64(self.server_key).decode()}"
        )


@dataclass(frozen=True, slots=True)
class UserRecord:
    name: str
    argon2: str | None = None  # an argon2 PHC string
    scram: ScramKeys | None = None
    cram: bytes | None = None  # 32 bytes of HMAC-MD5 key state

    def to_line(self) -> str:
        fields = [self.name]
        if self.argon2:
            fields.append(f"{ARGON2}={self.argon2}")
        if self.scram:
            fields.append(f"{SCRAM}={self.scram.encode()}")
        if self.cram:
            fields.append(f"{CRAM}={self.cram.hex()}")
        return ":".join(fields)


def check_user_name(name: str) -> str | None:
    """Why ``name`` cannot be a user name, or None when it can."""
    if not name:
        return "empty user name"
    if len(name) > 255:
        return "user name longer than 255 characters"
    if ":" in name or "#" in name[:1] or any(ch.isspace() or not ch.isprintable() for ch in name):
        return "user name contains a colon, white space or a control character"
    return None


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None


def _parse_scram(value: str) -> ScramKeys:
    parts = value.split(",")
    if len(parts) != 4:
        raise ValueError("scram-sha-256 needs salt,iterations,storedkey,serverkey")
    salt = _b64(parts[0], "scram-sha-256 salt")
    if len(salt) < SCRAM_MIN_SALT:
        raise ValueError(f"scram-sha-256 salt shorter than {SCRAM_MIN_SALT} bytes")
    if not parts[1].isdigit() or not SCRAM_MIN_ITERATIONS <= int(parts[1]) <= SCRAM_MAX_ITERATIONS:
        raise ValueError(
            f"scram-sha-256 iterations must be {SCRAM_MIN_ITERATIONS}..{SCRAM_MAX_ITERATIONS}"
        )
    stored = _b64(parts[2], "scram-sha-256 storedkey")
    server = _b64(parts[3], "scram-sha-256 serverkey")
    if len(stored) != SHA256_SIZE or len(server) != SHA256_SIZE:
        raise ValueError("scram-sha-256 keys must be 32 bytes each")
    return ScramKeys(salt, int(parts[1]), stored, server)


def _parse_argon2(value: str) -> str:
    try:
        extract_parameters(value)
    except (InvalidHashError, ValueError):
        raise ValueError("argon2 is not an argon2 hash string") from None
    return value


def _parse_cram(value: str) -> bytes:
    try:
        state = bytes.fromhex(value)
    except ValueError:
        raise ValueError("cram-md5 is not hexadecimal") from None
    if len(state) != STATE_SIZE:
        raise ValueError(f"cram-md5 must be {STATE_SIZE * 2} hex digits")
    return state


def parse_line(line: str) -> UserRecord:
    """One non-comment line; ValueError saying what is wrong (never quoting a secret)."""
    name, *fields = line.split(":")
    problem = check_user_name(name)
    if problem:
        raise ValueError(problem)
    if not fields:
        raise ValueError(f"user {name} has no credentials")
    values: dict[str, str] = {}
    for number, item in enumerate(fields, 1):
        form, eq, value = item.partition("=")
        if form not in FORMS or not eq:
            # Not quoted, not even its start: what an administrator writes there by
            # mistake is most often the password itself ("user:secret", "{PLAIN}secret"),
            # and this text reaches the log and the journal.
            raise ValueError(
                f"unknown credential form in field {number} after the user name (not shown: "
                f"it may be a password); known: {', '.join(FORMS)}, as mailgate passwd writes them"
            )
        if form in values:
            raise ValueError(f"{form} given twice")
        values[form] = value
    return UserRecord(
        name,
        argon2=_parse_argon2(values[ARGON2]) if ARGON2 in values else None,
        scram=_parse_scram(values[SCRAM]) if SCRAM in values else None,
        cram=_parse_cram(values[CRAM]) if CRAM in values else None,
    )


def is_content(line: str) -> bool:
    """Whether a line holds a user (not blank, not a comment)."""
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def parse_users(text: str, path: str) -> dict[str, UserRecord]:
    """The users in ``text``; ValueError with a "path:line: problem" line for each bad
    line (up to MAX_REPORTED), so that check-config shows them all at once."""
    users: dict[str, UserRecord] = {}
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not is_content(line):
            continue
        try:
            record = parse_line(line.strip())
        except ValueError as e:
            problems.append(f"{path}:{number}: {e}")
            continue
        if record.name in users:
            problems.append(f"{path}:{number}: user {record.name} is listed twice")
        users[record.name] = record
    if problems:
        more = len(problems) - MAX_REPORTED
        shown = problems[:MAX_REPORTED] + ([f"{path}: {more} more"] if more > 0 else [])
        raise ValueError("\n".join(shown))
    return users


def check_mode(path: str, mode: int) -> None:
    """Refuse a users file others can read or anyone but its owner can change."""
    mode = stat.S_IMODE(mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ValueError(f"{path}: group- or world-writable (mode {mode:04o}); chmod 600")
    if mode & stat.S_IROTH:
        raise ValueError(f"{path}: world-readable (mode {mode:04o}); chmod 600")
    # Group-readable is the layout docs/deployment.md installs: root's file, readable
    # to the server's group, so that the server cannot change its own credentials.


def read_users_file(path: str) -> str:
    """The file's text after the mode check; ValueError with the path on any problem."""
    try:
        with open(path, encoding="utf-8") as f:
            check_mode(path, os.fstat(f.fileno()).st_mode)
            return f.read()
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not valid UTF-8") from None


def load_users(path: str) -> dict[str, UserRecord]:
    """Read and parse the users file (blocking: call it off the event loop)."""
    return parse_users(read_users_file(path), path)


def file_signature(path: str) -> tuple[int, int, int] | None:
    """What changes when the file is replaced or rewritten; None when it cannot be seen."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
