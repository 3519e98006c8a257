"""Which configuration changes a reload (SIGHUP) cannot apply.

A reload builds new policy, delivery, users and certificates for new work; the
sockets, the worker processes, the privileges, the spool directory, the log output and
the metrics endpoint were set up once at start and stay as they are.  An operator who
changed one of those must hear that the change waits for a restart, not just "reload
ok" (mailgate/app.py and mailgate/supervisor.py log these keys with the reload).
"""

from __future__ import annotations

from mailgate.config.schema import Config

# Dotted paths into Config; a section name stands for every key in it.
RESTART_ONLY = (
    "listener",
    "server.workers",
    "server.user",
    "server.group",
    "server.spool_dir",
    "logging",
    "metrics",
)


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The keys of RESTART_ONLY whose value differs between ``old`` and ``new``."""
    return [path for path in RESTART_ONLY if _at(old, path) != _at(new, path)]


def _at(config: Config, path: str) -> object:
    value: object = config
    for name in path.split("."):
        value = getattr(value, name)
    return value


def keep_restart_only(old: Config, new: Config) -> None:
    """Give ``new`` the running values of RESTART_ONLY (from ``old``): what a reload
    adopts runs as it was set up, and so does a worker started from it later."""
    for path in RESTART_ONLY:
        *parents, name = path.split(".")
        old_owner: object = old
        new_owner: object = new
        for parent in parents:
            old_owner, new_owner = getattr(old_owner, parent), getattr(new_owner, parent)
        setattr(new_owner, name, getattr(old_owner, name))
