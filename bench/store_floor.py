"""What one durable Maildir store costs on this disk when messages come one at a time
(load p4 in durable mode: no other message shares a flush): run by hand, never by the
test suite.

Per message, with no server and no SMTP: create a file in tmp/, write 1,100 bytes,
fsync it, link it into new/, unlink it from tmp/, then make the entry durable, either
by an fsync of new/ (``fsync``) or by syncfs(2) and an fsync of a descriptor kept open
(``syncfs``, what ``delivery.sync_method = "syncfs"`` does).  A server that stores a
message before its 250 cannot answer faster than this, whatever its language.

    .venv/bin/python bench/store_floor.py [--dir /var/tmp] [-n 400] [-r 3]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import tempfile
import time

_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def run(root: str, mode: str, messages: int) -> float:
    """Milliseconds of wall time per message."""
    work = tempfile.mkdtemp(prefix=f"{mode}-", dir=root)
    os.mkdir(f"{work}/tmp")
    os.mkdir(f"{work}/new")
    new = os.open(f"{work}/new", os.O_RDONLY)
    witness = os.open(f"{work}/witness", os.O_WRONLY | os.O_CREAT, 0o600)
    os.fsync(witness)
    body = b"x" * 1100
    try:
        start = time.perf_counter()
        for i in range(messages):
            fd = os.open(f"{work}/tmp/{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, body)
            os.fsync(fd)
            os.close(fd)
            os.link(f"{work}/tmp/{i}", f"{work}/new/{i}")
            os.unlink(f"{work}/tmp/{i}")
            if mode == "fsync":
                os.fsync(new)
            else:
                _syncfs(new)
                os.fsync(witness)
        return (time.perf_counter() - start) / messages * 1e3
    finally:
        os.close(new)
        os.close(witness)
        shutil.rmtree(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/var/tmp", help="a directory on the disk to measure")
    parser.add_argument("-n", "--messages", type=int, default=400)
    parser.add_argument("-r", "--rounds", type=int, default=3)
    args = parser.parse_args()
    for round_ in range(1, args.rounds + 1):
        for mode in ("fsync", "syncfs"):
            print(f"round {round_} {mode}: {run(args.dir, mode, args.messages):.3f} ms a message")


if __name__ == "__main__":
    main()
