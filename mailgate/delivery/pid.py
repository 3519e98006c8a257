"""This process's id, kept rather than asked for: ``os.getpid()`` is a system call,
and a delivery names its spool and maildir files with it (several calls per message)."""

from __future__ import annotations

import os

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def this_pid() -> int:
    """``os.getpid()``, right in a forked worker too."""
    return _pid
