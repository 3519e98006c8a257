"""The kept process id stays right in a forked worker (files are named by it)."""

from __future__ import annotations

import os

from mailgate.delivery.pid import this_pid


def test_this_pid_is_the_process_id_before_and_after_a_fork() -> None:
    assert this_pid() == os.getpid()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the worker: report what it sees, and leave without cleanup
        os.write(write, f"{this_pid()} {os.getpid()}".encode())
        os._exit(0)
    os.close(write)
    seen, actual = os.read(read, 64).decode().split()
    os.close(read)
    os.waitpid(child, 0)
    assert int(seen) == int(actual) == child
    assert this_pid() == os.getpid() != child
