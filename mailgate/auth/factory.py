"""Building the Authenticator from the [auth] section."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable

from mailgate.auth.authenticator import Authenticator
from mailgate.auth.senders import SenderMap, parse_senders_file
from mailgate.auth.throttle import Clock, FailureCounter, Failures, Throttle, ThrottleLimits
from mailgate.auth.users import load_users
from mailgate.config.auth import AuthConfig


def build_authenticator(
    config: AuthConfig,
    *,
    hostname: str = "",
    local_domains: Iterable[str] = (),
    clock: Clock = time.monotonic,
    failures: Failures | None = None,
) -> Authenticator | None:
    """The Authenticator, or None when no users file is configured.

    ``hostname`` goes into CRAM-MD5 challenges and the 421 reply (default: this
    machine's name); ``local_domains`` are the default sender domains when
    ``sender_domains`` is empty (without either, users not in the senders map may
    use no address at all).  ``failures`` counts AUTH failures: the counter of the
    authenticator being replaced on a reload, or the workers' shared one (its window
    is set from ``config``); without it a new in-memory counter starts from zero.
    Reads files at startup, so it blocks; a broken users or senders file raises
    ValueError "file:line: problem".
    """
    if not config.users_file:
        return None
    table: dict[str, list[str]] = {u: list(a) for u, a in config.senders.items()}
    if config.senders_file:
        try:
            with open(config.senders_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{config.senders_file}: {e}") from None
        for user, entries in parse_senders_file(text, config.senders_file).items():
            table.setdefault(user, []).extend(entries)
    if failures is None:
        counter: Failures = FailureCounter(config.throttle_window, clock)
    else:
        counter = failures
        counter.window = config.throttle_window
    limits = ThrottleLimits(
        after=config.throttle_after,
        close_after=config.throttle_close_after,
        base_delay=config.failure_delay,
        max_delay=config.failure_max_delay,
    )
    return Authenticator(
        users_file=config.users_file,
        users=load_users(config.users_file),
        configured=config.mechanisms,
        throttle=Throttle(limits, counter),
        senders=SenderMap(table, config.sender_domains or local_domains),
        hostname=hostname or socket.gethostname(),
        reload_interval=config.reload_interval,
        clock=clock,
    )
