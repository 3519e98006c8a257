"""Counting AUTH failures per client address and per user, in memory, with expiry.

A count is forgotten ``window`` seconds after its last failure.  Success resets the
user's count (the person got the password right) but not the address's: otherwise a
client holding one valid account could reset its budget between guesses at others.

An exchange counts against its address from its start, and success (or a fault of
ours) takes that back: the password check takes a while, and attempts run side by side
on many connections would otherwise all pass the check before any of them was counted.

One process counts in a dict (:class:`FailureCounter`); the worker processes of one
server count together in shared memory (:class:`SharedFailureCounter`), so that a
guesser cannot multiply its budget by the number of workers.  Either outlives a
reload: a SIGHUP must not hand a guesser a fresh budget.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

Clock = Callable[[], float]


class Failures(Protocol):
    """What the throttle needs of a counter; ``window`` may change on a reload."""

    window: float

    def get(self, key: str) -> int: ...

    def add(self, key: str) -> int: ...

    def sub(self, key: str) -> None:
        """Take back one :meth:`add` of this process (never below zero)."""
        ...

    def reset(self, key: str) -> None: ...


class FailureCounter:
    """key -> failures within the window; expired entries are dropped as they are seen."""

    def __init__(self, window: float, clock: Clock = time.monotonic, max_keys: int = 100_000):
        self.window = window
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
        self._counts[key] = (count, self._clock() + self.window)
        return count

    def sub(self, key: str) -> None:
        count = self.get(key)
        if count > 1:
            self._counts[key] = (count - 1, self._counts[key][1])
        else:
            self._counts.pop(key, None)

    def reset(self, key: str) -> None:
        self._counts.pop(key, None)

    def _purge(self) -> None:
        now = self._clock()
        self._counts = {k: v for k, v in self._counts.items() if v[1] > now}
        if len(self._counts) >= self._max_keys:
            # Still full of live entries: drop the oldest half rather than grow forever.
            by_expiry = sorted(self._counts.items(), key=lambda kv: kv[1][1])
            self._counts = dict(by_expiry[len(by_expiry) // 2 :])


class SharedFailureCounter:
    """FailureCounter's counts in memory shared by the worker processes of one server
    (made before they are forked): a guesser spreading its attempts over connections
    that different workers accept is counted once, not once per worker.

    Each worker counts only in its own row (no lock, no lost update) and a count is
    the sum over the rows.  Only a success's reset writes the other rows: racing a
    failure counted in that instant, it can lose that one failure, or keep it.  A key
    is counted in two slots chosen by two hashes and its count is the smaller sum (a
    count-min sketch): another key sharing both slots can only make it higher.  A
    row's count in a slot is forgotten ``window`` seconds after that row's last
    failure there; a worker that dies leaves its counts to its replacement, which
    writes the same row.
    """

    SLOTS: Final = 1 << 12  # per hash and worker: 2 x 4096 x 12 bytes = 96 KiB a worker

    def __init__(self, window: float, workers: int, clock: Clock = time.monotonic) -> None:
        if workers < 1:
            raise ValueError("workers: at least 1")
        self.window = window  # a reload may change it
        self._clock = clock  # CLOCK_MONOTONIC: one clock for every process of the machine
        self._workers = workers
        self._row = 0
        cells = workers * 2 * self.SLOTS
        # MAP_SHARED anonymous memory survives fork() shared, not copied.
        self._map = mmap.mmap(-1, cells * 12, flags=mmap.MAP_SHARED)
        view = memoryview(self._map)
        self._stamps = view[: cells * 8].cast("d")  # when the row last counted a failure
        self._counts = view[cells * 8 :].cast("i")
        # The hashes are keyed with a secret drawn here (before the fork: the workers
        # share it).  Unkeyed, a guesser could compute a user name sharing both slots
        # of a victim's address or name, and throttle it with failures of its own.
        self._key = os.urandom(16)

    def use_row(self, row: int) -> None:
        """In a freshly forked worker: count this process's failures in ``row``."""
        if not 0 <= row < self._workers:
            raise ValueError(f"row {row} outside 0..{self._workers - 1}")
        self._row = row

    def get(self, key: str) -> int:
        now = self._clock()
        return min(self._live(slot, now) for slot in _failure_slots(key, self.SLOTS, self._key))

    def add(self, key: str) -> int:
        now = self._clock()
        base = self._row * 2 * self.SLOTS
        stamps, counts = self._stamps, self._counts
        for slot in _failure_slots(key, self.SLOTS, self._key):
            cell = base + slot
            if stamps[cell] + self.window <= now:
                counts[cell] = 0  # this row's earlier failures there are forgotten
            counts[cell] += 1
            stamps[cell] = now
        return self.get(key)

    def sub(self, key: str) -> None:
        base = self._row * 2 * self.SLOTS
        counts = self._counts
        for slot in _failure_slots(key, self.SLOTS, self._key):
            if counts[base + slot] > 0:  # (0: the row's count there has expired since)
                counts[base + slot] -= 1

    def reset(self, key: str) -> None:
        for slot in _failure_slots(key, self.SLOTS, self._key):
            for row in range(self._workers):
                self._counts[row * 2 * self.SLOTS + slot] = 0

    def _live(self, slot: int, now: float) -> int:
        stamps, counts, window = self._stamps, self._counts, self.window
        total = 0
        for row in range(self._workers):
            cell = row * 2 * self.SLOTS + slot
            if stamps[cell] + window > now:
                total += counts[cell]
        return total


def _failure_slots(key: str, slots: int, secret: bytes) -> tuple[int, int]:
    # A hash that is the same in every process (str hashes are salted per interpreter;
    # forked workers share the salt, but nothing should depend on that), keyed.
    digest = int.from_bytes(
        hashlib.blake2b(key.encode(), digest_size=8, key=secret).digest(), "big"
    )
    return digest % slots, slots + (digest >> 32) % slots


@dataclass(frozen=True, slots=True)
class ThrottleLimits:
    after: int  # failures from an address before "454 try later"
    close_after: int  # failures before "421" and close
    base_delay: float
    max_delay: float


@functools.lru_cache(maxsize=1024)
def _address_key(client_ip: str) -> str:
    """The count a client address falls in: an IPv6 client by its /64, which one
    site (one guesser) holds whole and may pick any address of."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return f"ip:{client_ip}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # (a dual-stack listener's IPv4 client)
            return f"ip:{address.ipv4_mapped}"
        return f"ip:{ipaddress.IPv6Network((address, 64), strict=False)}"
    return f"ip:{address}"


class Throttle:
    def __init__(self, limits: ThrottleLimits, counter: Failures) -> None:
        self.limits = limits
        self.counter = counter  # kept across a reload (factory.build_authenticator)

    def attempt(self, client_ip: str) -> None:
        """An exchange starts: a failure of the address until it ends otherwise."""
        self.counter.add(_address_key(client_ip))

    def failure(self, user: str | None) -> None:
        """The exchange failed (its address was counted at its start)."""
        if user:
            self.counter.add(f"user:{user}")

    def success(self, client_ip: str, user: str) -> None:
        self.counter.sub(_address_key(client_ip))
        self.counter.reset(f"user:{user}")

    def not_counted(self, client_ip: str) -> None:
        """The exchange failed for a fault of ours (454): not the client's failure."""
        self.counter.sub(_address_key(client_ip))

    def client_failures(self, client_ip: str) -> int:
        return self.counter.get(_address_key(client_ip))

    def delay(self, client_ip: str, user: str | None) -> float:
        """Seconds to wait before answering a failure: grows with the larger count."""
        n = max(self.client_failures(client_ip), self.counter.get(f"user:{user}") if user else 0)
        if n == 0:
            return 0.0
        # 2**(n-1) overflows a float for a huge n; the cap is reached long before.
        return min(self.limits.base_delay * 2 ** min(n - 1, 64), self.limits.max_delay)
