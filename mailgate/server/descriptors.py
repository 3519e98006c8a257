"""The process's descriptor limit (RLIMIT_NOFILE), sized for ``server.max_connections``.

Linux starts a service with a soft limit of 1,024 descriptors (systemd's default too),
and ``max_connections`` is 1,000 by default: past the soft limit a server fails in
ways that do not say why.  uvloop's listeners, out of descriptors, accept and close
new clients at once, without a greeting or a log line, and a session already in gets
451 for a spool file it cannot open.  The soft limit may be raised by the process
itself up to the hard one, as nginx's worker_rlimit_nofile does: so at start and at each
reload the server raises it to what ``max_connections`` may need (never lowering
it), and where the hard limit, which only root can raise, is below that, start-up and
``check-config`` warn.
"""

from __future__ import annotations

import contextlib
import resource

# A session at its busiest: its socket, its spool file, and the file or downstream
# connection its delivery is writing to.
PER_CONNECTION = 3
# The rest of a process: listeners, log and metrics files, the greylist database, DNS
# sockets, the group commit's descriptors, a pipe mailer's pipes.
RESERVED = 200


def descriptors_needed(max_connections: int) -> int:
    """The descriptors a process may hold with ``max_connections`` sessions.  Each
    worker counts them all: the kernel may hand every connection to the same one."""
    return max_connections * PER_CONNECTION + RESERVED


def raise_limit(max_connections: int) -> None:
    """Raise the soft limit towards :func:`descriptors_needed`, as far as the hard
    limit allows; never lower it (a site may have set it higher on purpose)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = descriptors_needed(max_connections)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        # (refused only where the hard limit changed under us: the warning still says so)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def limit_problem(max_connections: int) -> str | None:
    """What an administrator should be told when this process's hard limit is below
    what ``max_connections`` may need; None when it is not."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = descriptors_needed(max_connections)
    if hard == resource.RLIM_INFINITY or hard >= needed:
        return None
    return (
        f"server.max_connections: {max_connections} connections may need up to "
        f"{needed} open files, and this process may have at most {hard} (its hard "
        "RLIMIT_NOFILE); past it new connections are closed unanswered and messages get 451: "
        "raise the limit (LimitNOFILE= in a systemd unit, ulimit -Hn in a script) or "
        f"lower max_connections to {max(1, (hard - RESERVED) // PER_CONNECTION)}"
    )
