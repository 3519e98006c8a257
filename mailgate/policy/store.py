"""A small async key/value store with expiry, shared by greylisting and throttles.

Two backends behind one :class:`Store` protocol (the tests add a dict-backed one):

* :class:`SQLiteStore`: a local file (WAL mode) that survives a restart.  All SQLite
  calls run on one dedicated worker thread, so the event loop never waits on disk and
  the connection is only ever touched by the thread that opened it.
* :class:`RedisStore`: Redis through ``redis.asyncio``, so that several mailgate
  instances share their state.

Every method of every backend raises :class:`StoreError` (and nothing else) when the
backend fails, e.g. Redis is unreachable or the database file is unreadable; callers
decide whether that fails open or closed.  ``incr`` on a key that holds something other
than an integer raises :class:`StoreError` too.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Protocol, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

log = logging.getLogger("mailgate.policy.greylist")

Clock = Callable[[], float]
T = TypeVar("T")


def database_problem(path: str) -> str | None:
    """Why an existing SQLite file at ``path`` is no usable database, else None (read
    only: check-config changes nothing)."""
    if not os.path.isfile(path):
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=SQLITE_BUSY_TIMEOUT)
        try:
            conn.execute("PRAGMA schema_version").fetchone()
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return None  # locked, or not ours to read: the server's own open will say
    except sqlite3.Error as exc:
        return f"{path}: {exc}: greylisting stays off until the file is moved away"
    return None


def path_problem(path: str) -> str | None:
    """What is wrong with ``path`` as the place of an SQLite file, else None: its
    directory is missing, or something other than a file is there (SQLite itself says
    only "unable to open database file")."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"no directory {directory}"
    if os.path.lexists(path) and not os.path.isfile(path):
        kind = "a directory" if os.path.isdir(path) else "not a regular file"
        return f"{path} is {kind}, not a database file"
    return None


class StoreError(OSError):
    """The store could not do what was asked (backend down, bad file, not an integer).

    An OSError, as the failures behind it are: start-up and reload then report a
    store that cannot be opened like any other file or socket that cannot ("cannot
    start: ...", "reload refused"), never as a traceback.
    """


class Store(Protocol):
    """Strings under string keys, each with an optional time to live in seconds."""

    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str, ttl: float | None = None) -> None: ...

    async def incr(self, key: str, ttl: float | None = None) -> int:
        """Add 1 atomically (a missing key counts as 0); ``ttl`` applies only on create."""
        ...

    async def delete(self, key: str) -> None: ...

    async def close(self) -> None: ...


def _deadline(now: float, ttl: float | None) -> float | None:
    return None if ttl is None else now + ttl


def _to_int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise StoreError(f"{key}: value is not an integer") from None


_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL)"


# Seconds a call waits for SQLite's write lock.  Writers hold it for milliseconds;
# longer is someone's sqlite3 session or a backup, and the caller fails open.
SQLITE_BUSY_TIMEOUT = 1.0


class SQLiteStore:
    """A store in one SQLite file, in WAL mode, served by a single worker thread.

    Expired rows are invisible to reads at once and deleted by a sweep that runs with a
    write at most every ``prune_interval`` seconds, so the file does not grow forever.
    Several processes may open the same file: writes take SQLite's write lock
    (``BEGIN IMMEDIATE``), which keeps ``incr`` atomic across them.

    The constructor opens (and creates) the file and raises :class:`StoreError` when it
    cannot (no such directory, no permission), so a bad path shows at start-up rather
    than on the first message.  A file that is no database is logged, and every call
    then raises :class:`StoreError`: greylisting fails open until it is moved away.
    """

    def __init__(self, path: str, now: Clock = time.time, prune_interval: float = 3600.0) -> None:
        self._now = now
        self._prune_interval = prune_interval
        self._last_prune = now()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._conn: sqlite3.Connection | None = None
        self._broken = ""  # why every call fails: a file that is no database
        self._path = path
        try:
            self._executor.submit(self._open, path).result()
        except (sqlite3.OperationalError, OSError) as exc:
            self._executor.shutdown(wait=False)
            raise StoreError(f"cannot open {path}: {exc}") from exc
        except sqlite3.Error as exc:
            # A file there, but no database (corrupt, or something else's): the path
            # is right and the bookkeeping lost, which must not stop the server (or
            # every reload) as a wrong path does; greylisting fails open meanwhile.
            self._broken = (
                f"{path}: {exc} (move it away: a new one is made at the next start or reload)"
            )
            log.warning("greylist store %s", self._broken)

    def _open(self, path: str) -> None:
        problem = path_problem(path)
        if problem:
            raise OSError(errno.ENOENT, problem)
        # Autocommit mode: each statement is its own transaction unless we BEGIN.
        conn = sqlite3.connect(path, isolation_level=None, timeout=SQLITE_BUSY_TIMEOUT)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable across a crash of mailgate in WAL mode; only a power
            # loss may drop the last few writes, which greylisting state can afford.
            conn.execute("PRAGMA synchronous=NORMAL")
            # A value that is not UTF-8 (not written by us) reads with U+FFFD, so that
            # it is unreadable state, replaced at the next write, rather than a
            # "Could not decode" error taken for the whole store failing.
            conn.text_factory = lambda raw: raw.decode("utf-8", "replace")
            conn.execute(_SCHEMA)
        except sqlite3.Error:
            conn.close()
            raise
        self._conn = conn

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise StoreError(self._broken or "store is closed")
        loop = asyncio.get_running_loop()
        queued = time.monotonic()

        def run_if_not_stale(conn: sqlite3.Connection) -> T:
            # Calls wait their turn for the one thread: behind a call that waited out
            # the lock, a queue of them would each wait again (8 sessions: the last
            # answered after 40 s).  One that waited its turn too long gives up.
            if time.monotonic() - queued > SQLITE_BUSY_TIMEOUT:
                raise sqlite3.OperationalError("database is locked (gave up waiting)")
            return work(conn)

        try:
            return await loop.run_in_executor(self._executor, run_if_not_stale, conn)
        except sqlite3.OperationalError as exc:  # locked, busy, read-only: passes
            raise StoreError(f"sqlite: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            # damaged while in use (malformed, not a database): it does not mend by
            # waiting, as a lock does
            raise StoreError(
                f"sqlite: {self._path}: {exc} (if damaged, move it away and reload: "
                "a new one is made)"
            ) from exc
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite: {exc}") from exc
        except RuntimeError as exc:  # the executor was shut down by close()
            raise StoreError("store is closed") from exc

    def _maybe_prune(self, conn: sqlite3.Connection, now: float) -> None:
        if now - self._last_prune >= self._prune_interval:
            self._last_prune = now
            conn.execute("DELETE FROM kv WHERE expires IS NOT NULL AND expires <= ?", (now,))

    async def get(self, key: str) -> str | None:
        now = self._now()

        def work(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(
                "SELECT value FROM kv WHERE key = ? AND (expires IS NULL OR expires > ?)",
                (key, now),
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._run(work)

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        now = self._now()

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)",
                (key, value, _deadline(now, ttl)),
            )
            self._maybe_prune(conn, now)

        await self._run(work)

    async def incr(self, key: str, ttl: float | None = None) -> int:
        now = self._now()

        def work(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    "SELECT value FROM kv WHERE key = ? AND (expires IS NULL OR expires > ?)",
                    (key, now),
                ).fetchone()
                if row is None:
                    count = 1
                    conn.execute(
                        "INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, '1', ?)",
                        (key, _deadline(now, ttl)),
                    )
                else:
                    count = _to_int(key, str(row[0])) + 1
                    conn.execute("UPDATE kv SET value = ? WHERE key = ?", (str(count), key))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._maybe_prune(conn, now)
            return count

        return await self._run(work)

    async def delete(self, key: str) -> None:
        await self._run(lambda conn: conn.execute("DELETE FROM kv WHERE key = ?", (key,)))

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=False)


class RedisStore:
    """A store in Redis, shared by every mailgate instance that points at it.

    No connection is made until the first call.  Each call is bounded by ``timeout``
    seconds; one that failed to connect, or on a connection that broke, is retried once
    at once (a pooled connection may have gone stale when Redis restarted), one that
    timed out is not (a hung Redis would otherwise cost twice the timeout); then it
    raises :class:`StoreError`.
    """

    def __init__(self, url: str, timeout: float = 2.0) -> None:
        try:
            self._redis = aioredis.from_url(
                url,
                decode_responses=True,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
        except ValueError as exc:
            raise StoreError(f"bad redis url: {exc}") from exc

    async def get(self, key: str) -> str | None:
        with _redis_errors():
            try:
                value = await self._redis.get(key)
            except UnicodeDecodeError:
                # not ours (something else wrote the key): unreadable, not an outage;
                # the caller reads "" as no state and its next set replaces it
                return ""
        return None if value is None else str(value)

    async def set(self, key: str, value: str, ttl: float | None = None) -> None:
        with _redis_errors():
            await self._redis.set(key, value, px=_millis(ttl))

    async def incr(self, key: str, ttl: float | None = None) -> int:
        with _redis_errors():
            if ttl is None:
                return int(await self._redis.incr(key))
            # SET NX gives only a new key its TTL, INCR keeps a key's TTL, and MULTI
            # makes the pair atomic, so no other instance sees a count without a TTL.
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(key, 0, px=_millis(ttl), nx=True)
                pipe.incr(key)
                _, count = await pipe.execute()
            return int(count)

    async def delete(self, key: str) -> None:
        with _redis_errors():
            await self._redis.delete(key)

    async def close(self) -> None:
        with _redis_errors():
            await self._redis.aclose()


@contextmanager
def _redis_errors() -> Iterator[None]:
    # redis-py wraps socket failures and timeouts in RedisError; OSError covers the rest.
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreError(f"redis: {exc}") from exc


def _millis(ttl: float | None) -> int | None:
    # Redis wants a positive whole number of milliseconds.
    return None if ttl is None else max(1, round(ttl * 1000))


def open_store(
    backend: str,
    sqlite_path: str,
    redis_url: str,
    redis_timeout: float = 2.0,
    now: Clock = time.time,
) -> Store:
    """The store a config names: ``"sqlite"`` (a file) or ``"redis"`` (shared).

    ``now`` is the SQLite store's clock for expiry (Redis keeps its own time).
    Raises :class:`StoreError` when the SQLite file cannot be opened or the Redis URL
    is malformed, and ValueError for an unknown backend.
    """
    if backend == "sqlite":
        return SQLiteStore(sqlite_path, now=now)
    if backend == "redis":
        return RedisStore(redis_url, timeout=redis_timeout)
    raise ValueError(f"unknown store backend {backend!r}")
