"""Counting AUTH failures per client address and per user, in memory, with expiry.

A count is forgotten ``window`` seconds after its last failure.  Success resets the
user's count (the person got the password right) but not the address's: otherwise a
client holding one valid account could reset its budget between guesses at others.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


class FailureCounter:
    """key -> failures within the window; expired entries are dropped as they are seen."""

    def __init__(self, window: float, clock: Clock = time.monotonic, max_keys: int = 100_000):
        self._window = window
        self._clock = clock
        self._max_keys = max_keys  # bounds memory under a flood of distinct addresses
        self._counts: dict[str, tuple[int, float]] = {}  # key -> (count, expiry)

    def get(self, key: str) -> int:
        entry = self._counts.get(key)
        if entry is None:
            return 0
        if entry[1] <= self._clock():
            del self._counts[key]
            return 0
        return entry[0]

    def add(self, key: str) -> int:
        count = self.get(key) + 1
        if key not in self._counts and len(self._counts) >= self._max_keys:
            self._purge()
        self._counts[key] = (count, self._clock() + self._window)
        return count

    def reset(self, key: str) -> None:
        self._counts.pop(key, None)

    def _purge(self) -> None:
        now = self._clock()
        self._counts = {k: v for k, v in self._counts.items() if v[1] > now}
        if len(self._counts) >= self._max_keys:
            # Still full of live entries: drop the oldest half rather than grow forever.
            by_expiry = sorted(self._counts.items(), key=lambda kv: kv[1][1])
            self._counts = dict(by_expiry[len(by_expiry) // 2 :])


@dataclass(frozen=True, slots=True)
class ThrottleLimits:
    after: int  # failures from an address before "454 try later"
    close_after: int  # failures before "421" and close
    base_delay: float
    max_delay: float


class Throttle:
    def __init__(self, limits: ThrottleLimits, counter: FailureCounter) -> None:
        self.limits = limits
        self._counter = counter

    def failure(self, client_ip: str, user: str | None) -> None:
        self._counter.add(f"ip:{client_ip}")
        if user:
            self._counter.add(f"user:{user}")

    def success(self, user: str) -> None:
        self._counter.reset(f"user:{user}")

    def client_failures(self, client_ip: str) -> int:
        return self._counter.get(f"ip:{client_ip}")

    def delay(self, client_ip: str, user: str | None) -> float:
        """Seconds to wait before answering a failure: grows with the larger count."""
        n = max(self.client_failures(client_ip), self._counter.get(f"user:{user}") if user else 0)
        if n == 0:
            return 0.0
        # 2**(n-1) overflows a float for a huge n; the cap is reached long before.
        return min(self.limits.base_delay * 2 ** min(n - 1, 64), self.limits.max_delay)
