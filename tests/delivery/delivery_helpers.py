"""Shared helpers for the Maildir, mbox, router and failure tests."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate.delivery.base import TraceInfo
from mailgate.delivery.spool import SpoolDir, SpoolFile
from mailgate.delivery.trace import received_header
from mailgate.protocol.envelope import Address, Envelope, Recipient

TRACE = TraceInfo("7Hq2xK", "client.example.net", "192.0.2.7", None, "mx.example.org", "ESMTP")
SENDER = Address("sender", "example.net")


def address(text: str) -> Address:
    local, _, domain = text.rpartition("@")
    return Address(local, domain) if "@" in text else Address(text, "")


def envelope(*rcpts: str, sender: Address | None = SENDER, body: str = "8BITMIME") -> Envelope:
    return Envelope(
        helo="client.example.net",
        extended=True,
        sender=sender,
        body=body,
        recipients=[Recipient(address(r)) for r in rcpts],
    )


def spooled(tmp_path: Path, message: bytes, env: Envelope, session: str = "7Hq2xK") -> SpoolFile:
    """Spool ``message`` the way the server does: Received: first, then the body."""
    spool = SpoolDir(str(tmp_path / "spool")).create(session)
    spool.write(received_header(TRACE, env))
    spool.write(message)
    spool.close()
    return spool


def as_stored(spool: SpoolFile, sender: str = "sender@example.net") -> bytes:
    """What a final-delivery store must hold: Return-Path then the spool, LF line ends."""
    data = Path(spool.path).read_bytes().replace(b"\r\n", b"\n")
    return f"Return-Path: <{sender}>\n".encode() + data


def files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()) if directory.exists() else []


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64k") -> Iterator[Path]:
    """A small tmpfs at ``path``; the test is skipped if this machine forbids mounts."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {done.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
