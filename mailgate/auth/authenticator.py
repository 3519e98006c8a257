"""The object the session talks to: mechanisms on offer, exchanges, throttling, senders."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mailgate.auth.credentials import Credentials
from mailgate.auth.mechanisms import (
    CramMD5Exchange,
    LoginExchange,
    PlainExchange,
    SaslExchange,
    ScramExchange,
)
from mailgate.auth.senders import SenderMap
from mailgate.auth.throttle import Clock, Failures, Throttle
from mailgate.auth.users import ARGON2, CRAM, SCRAM, UserRecord, file_signature, load_users
from mailgate.ops.logging import log_event
from mailgate.protocol.replies import Reply, reply

# Which stored form each mechanism needs.
NEEDS = {"PLAIN": ARGON2, "LOGIN": ARGON2, "SCRAM-SHA-256": SCRAM, "CRAM-MD5": CRAM}


class Authenticator:
    """SMTP AUTH for one server: built by ``factory.build_authenticator``."""

    def __init__(
        self,
        *,
        users_file: str,
        users: dict[str, UserRecord],
        configured: list[str],
        throttle: Throttle,
        senders: SenderMap,
        hostname: str,
        reload_interval: float,
        clock: Clock,
    ) -> None:
        self._users_file = users_file
        self._configured = configured
        self._throttle = throttle
        self._senders = senders
        self._hostname = hostname
        self._reload_interval = reload_interval
        self._clock = clock
        # Told when the mechanisms on offer change (a users file picked up without
        # SIGHUP): the server refreshes what its listeners advertise.
        self.on_change: Callable[[], None] | None = None
        self.mechanisms: list[str] = []
        self._install(users, file_signature(users_file))

    def _install(
        self, users: dict[str, UserRecord], signature: tuple[int, int, int] | None
    ) -> None:
        self._credentials = Credentials(users)
        self._signature = signature
        self._checked_at = self._clock()
        # Only what some user can actually use: advertising a mechanism nobody can
        # pass would just make clients fail.
        mechanisms = [m for m in self._configured if self._credentials.has_form(NEEDS[m])]
        changed, self.mechanisms = mechanisms != self.mechanisms, mechanisms
        if changed and self.on_change is not None:
            self.on_change()

    def start(self, mechanism: str, client_ip: str) -> SaslExchange:
        """A new exchange; ``mechanism`` (any case) must be one of ``self.mechanisms``."""
        name = mechanism.upper()
        if name not in self.mechanisms:
            raise ValueError(f"mechanism not offered: {mechanism[:40]!r}")
        factories: dict[str, Callable[[], SaslExchange]] = {
            "PLAIN": lambda: PlainExchange(self._credentials, self._throttle, client_ip),
            "LOGIN": lambda: LoginExchange(self._credentials, self._throttle, client_ip),
            "CRAM-MD5": lambda: CramMD5Exchange(
                self._credentials, self._throttle, client_ip, self._hostname
            ),
            "SCRAM-SHA-256": lambda: ScramExchange(self._credentials, self._throttle, client_ip),
        }
        return factories[name]()

    @property
    def failures(self) -> Failures:
        """The AUTH failure counts, for the authenticator that replaces this one."""
        return self._throttle.counter

    async def check_throttle(self, client_ip: str) -> Reply | None:
        """None, or the reply that refuses this AUTH (421: the session then closes)."""
        await self.refresh()
        failures = self._throttle.client_failures(client_ip)
        if failures >= self._throttle.limits.close_after:
            return reply("closing.auth_throttled", host=self._hostname)
        if failures >= self._throttle.limits.after:
            # A client that keeps trying while throttled keeps counting, so that it
            # reaches close_after and is cut off rather than answered 454 for ever.
            self._throttle.attempt(client_ip)
            return reply("auth.throttled")
        return None

    def failure_delay(self, client_ip: str, user: str | None) -> float:
        """Seconds the session waits before sending a failure reply."""
        return self._throttle.delay(client_ip, user)

    def forgive_fallback(self, client_ip: str, user: str, failed: list[tuple[str, str]]) -> None:
        """``user`` just authenticated after the ``failed`` (user, mechanism) attempts
        of the same session: take back those that were of this user with a mechanism
        it has no stored form for.  They were no guesses but a client trying its
        mechanisms in turn (Python's smtplib tries CRAM-MD5 before PLAIN): counted,
        they locked out a client that always gives the right password.  Failures for
        other users, or with a mechanism the user could have passed, stay counted."""
        for claimed, mechanism in failed:
            if claimed == user and self._credentials.lacks_form(user, NEEDS[mechanism]):
                self._throttle.not_counted(client_ip)

    def may_send_as(self, user: str, address: str) -> bool:
        return self._senders.may_send_as(user, address)

    async def reload(self) -> None:
        """Re-read the users file; ValueError "file:line: problem" keeps the old table."""
        signature, users = await asyncio.to_thread(self._read)
        self._install(users, signature)
        self.log_loaded()

    def log_loaded(self, **who: object) -> None:
        """The line that says which users file is in force, and with how many users."""
        log_event("users_file", outcome="loaded", path=self._users_file,
                  users=len(self._credentials.users), **who)

    def _read(self) -> tuple[tuple[int, int, int] | None, dict[str, UserRecord]]:
        # The signature first: a change racing with the read is seen by the next check.
        return file_signature(self._users_file), load_users(self._users_file)

    async def refresh(self) -> None:
        """Pick up a changed users file (as `mailgate passwd` leaves it) without SIGHUP;
        at most a stat every reload interval."""
        if not self._reload_interval:
            return
        now = self._clock()
        if now - self._checked_at < self._reload_interval:
            return
        self._checked_at = now
        signature = await asyncio.to_thread(file_signature, self._users_file)
        if signature == self._signature:
            return
        try:
            await self.reload()
        except ValueError as e:
            # Keep serving the old table; say so once per change of the file.
            self._signature = signature
            log_event("users_file", level="error", outcome="refused", path=self._users_file,
                      error=f"{e}; the old one stays in use")
