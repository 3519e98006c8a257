"""Session ids: unique within a process, and a forked worker does not repeat its parent's."""

from __future__ import annotations

import os
import re

from mailgate.server.session import new_session_id


def test_ids_of_one_process_are_distinct_and_sortable_by_time() -> None:
    ids = [new_session_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{16}", sid) for sid in ids)
    assert ids == sorted(ids, key=lambda sid: sid[:8])  # the seconds come first


def test_a_forked_process_counts_from_its_own_start() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.write(write, new_session_id().encode())
        os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 64).decode()
    finally:
        os.close(read)
    os.waitpid(pid, 0)
    parent = new_session_id()
    # the same start in both would give the child the parent's next counter value
    assert child[8:] != parent[8:]
    assert abs(int(child[8:], 16) - int(parent[8:], 16)) > 1
