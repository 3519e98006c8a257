"""A dict-backed :class:`mailgate.policy.store.Store` for tests of code that only needs
some store (the greylist's logic, the store contract itself), with a clock the test
controls."""

from __future__ import annotations

import time
from collections.abc import Callable

from mailgate.policy.store import StoreError

Clock = Callable[[], float]


def _deadline(now: float, ttl: float | None) -> float | None:
    return None if ttl is None else now + ttl


class MemoryStore:
    """A process-local store; expiry is checked on read against ``now``."""

    def __init__(self, now: Clock = time.time) -> None:
        self._now = now
        self._data: dict[str, tuple[str, float | None]] = {}

    def _live(self, key: str) -> str | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires is not None and expires <= self._now():
            del self._data[key]
            return None
        return value

    async def get(self, key: str) -> str | None:
        return self._live(key)

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        self._data[key] = (value, _deadline(self._now(), ttl))

    async def incr(self, key: str, ttl: float | None = None) -> int:
        current = self._live(key)
        if current is None:
            self._data[key] = ("1", _deadline(self._now(), ttl))
            return 1
        try:
            count = int(current) + 1
        except ValueError:
            raise StoreError(f"{key}: value is not an integer") from None
        self._data[key] = (str(count), self._data[key][1])
        return count

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def close(self) -> None:
        self._data.clear()
