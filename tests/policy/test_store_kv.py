"""The key/value store: the same contract for the memory, SQLite and Redis backends."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from memory_store import MemoryStore
from redis_fixture import RedisServer, free_port, redis_server  # noqa: F401  (fixture)

from mailgate.policy.store import (
    RedisStore,
    SQLiteStore,
    Store,
    StoreError,
    open_store,
    path_problem,
)


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


# --- the contract, for every backend -------------------------------------------------

Factory = Callable[[], Store]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """A factory, so each store is made inside the event loop of the test that uses it."""
    if request.param == "memory":
        yield MemoryStore
    elif request.param == "sqlite":
        yield lambda: SQLiteStore(str(tmp_path / "kv.sqlite"))
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        yield lambda: RedisStore(server.url)


def test_get_set_delete(make_store: Factory) -> None:
    async def scenario() -> None:
        store = make_store()
        assert await store.get("k") is None
        await store.set("k", "v1")
        assert await store.get("k") == "v1"
        await store.set("k", "v2 with spaces and ü")
        assert await store.get("k") == "v2 with spaces and ü"
        await store.delete("k")
        assert await store.get("k") is None
        await store.delete("never-there")
        await store.close()

    run(scenario())


def test_incr_counts_atomically(make_store: Factory) -> None:
    async def scenario() -> None:
        store = make_store()
        assert await store.incr("n") == 1
        assert await store.incr("n") == 2
        counts = await asyncio.gather(*(store.incr("c", ttl=60) for _ in range(50)))
        assert sorted(counts) == list(range(1, 51))
        assert await store.get("c") == "50"
        await store.close()

    run(scenario())


def test_incr_of_a_non_integer_is_a_store_error(make_store: Factory) -> None:
    async def scenario() -> None:
        store = make_store()
        await store.set("k", "not a number")
        with pytest.raises(StoreError):
            await store.incr("k")
        assert await store.get("k") == "not a number"
        await store.close()

    run(scenario())


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_value_that_is_not_utf8_reads_as_unreadable_not_as_an_outage(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Written behind the store's back: greylisting read it as a store failure (Redis:
    # a UnicodeDecodeError with a traceback at every RCPT; SQLite: fail-open for all
    # mail for 10 s) and never replaced it.
    if backend == "sqlite":
        path = str(tmp_path / "kv.sqlite")
        SQLiteStore(path)  # (the schema)
        with sqlite3.connect(path) as db:
            db.execute("INSERT INTO kv VALUES ('k', CAST(x'fffe' AS TEXT), NULL)")
        make: Factory = lambda: SQLiteStore(path)  # noqa: E731
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        redis.Redis.from_url(server.url).set("k", b"\xff\xfe")
        make = lambda: RedisStore(server.url)  # noqa: E731

    async def scenario() -> None:
        store = make()
        value = await store.get("k")
        assert value is not None and value.strip("\ufffd") == ""
        await store.set("k", "v")
        assert await store.get("k") == "v"
        await store.close()

    run(scenario())


# --- expiry, with a stepped clock (memory and SQLite) ----------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def clocked(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Callable[[], Store], Clock]:
    clock = Clock()
    if request.param == "memory":
        return (lambda: MemoryStore(now=clock)), clock
    return (lambda: SQLiteStore(str(tmp_path / "kv.sqlite"), now=clock)), clock


def test_ttl_expires_on_read(clocked: tuple[Callable[[], Store], Clock]) -> None:
    make, clock = clocked

    async def scenario() -> None:
        store = make()
        await store.set("k", "v", ttl=10)
        await store.set("forever", "v")
        clock.t += 9.9
        assert await store.get("k") == "v"
        clock.t += 0.1
        assert await store.get("k") is None
        clock.t += 10**9
        assert await store.get("forever") == "v"
        await store.close()

    run(scenario())


def test_incr_sets_ttl_on_create_only(clocked: tuple[Callable[[], Store], Clock]) -> None:
    make, clock = clocked

    async def scenario() -> None:
        store = make()
        assert await store.incr("n", ttl=10) == 1
        clock.t += 5
        assert await store.incr("n", ttl=100) == 2  # the first TTL stands
        clock.t += 5
        assert await store.get("n") is None
        assert await store.incr("n", ttl=10) == 1  # expired: counts from 1 again
        await store.close()

    run(scenario())


# --- SQLite specifics -----------------------------------------------------------------


def test_sqlite_state_survives_a_new_store_on_the_same_file(tmp_path: Path) -> None:
    path = str(tmp_path / "kv.sqlite")

    async def scenario() -> None:
        first = SQLiteStore(path)
        await first.set("k", "v", ttl=3600)
        await first.incr("n")
        await first.close()
        second = SQLiteStore(path)
        assert await second.get("k") == "v"
        assert await second.incr("n") == 2
        await second.close()

    run(scenario())
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_sqlite_two_stores_on_one_file_count_together(tmp_path: Path) -> None:
    path = str(tmp_path / "kv.sqlite")

    async def scenario() -> None:
        a, b = SQLiteStore(path), SQLiteStore(path)
        counts = await asyncio.gather(*(s.incr("n") for s in [a, b] * 20))
        assert sorted(counts) == list(range(1, 41))
        await a.close()
        await b.close()

    run(scenario())


def test_sqlite_prunes_expired_rows(tmp_path: Path) -> None:
    path = str(tmp_path / "kv.sqlite")
    clock = Clock()

    def rows() -> set[str]:
        with sqlite3.connect(path) as conn:
            return {r[0] for r in conn.execute("SELECT key FROM kv")}

    async def scenario() -> None:
        store = SQLiteStore(path, now=clock, prune_interval=100)
        await store.set("short", "v", ttl=10)
        await store.set("long", "v", ttl=1000)
        clock.t += 50
        await store.set("other", "v")
        assert "short" in rows()  # expired but the sweep is not due yet
        clock.t += 50
        await store.set("other", "v")
        assert rows() == {"long", "other"}
        await store.close()

    run(scenario())


def test_sqlite_bad_path_is_a_store_error(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(StoreError, match=f"no directory {missing}") as info:
        SQLiteStore(str(missing / "kv.sqlite"))
    # start-up and reload report an OSError as "cannot start" / "reload refused"
    assert isinstance(info.value, OSError)


def test_sqlite_path_that_is_a_directory_is_named_so(tmp_path: Path) -> None:
    # SQLite says only "unable to open database file"; the operator needs the why,
    # and check-config must refuse it as the server would (it passed, and the
    # workers then refused the reload the supervisor had taken up)
    (tmp_path / "grey").mkdir()
    with pytest.raises(StoreError, match=f"{tmp_path}/grey is a directory, not a database"):
        SQLiteStore(str(tmp_path / "grey"))
    assert path_problem(str(tmp_path / "grey")) == (
        f"{tmp_path}/grey is a directory, not a database file"
    )
    assert path_problem(str(tmp_path / "kv.sqlite")) is None  # (made at the first open)


def test_sqlite_file_that_is_no_database_fails_each_call_not_the_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A corrupt file stopped the start and refused every reload (aliases and all),
    # for bookkeeping whose loss only means some mail is greylisted again.
    (tmp_path / "kv.sqlite").write_bytes(b"not a database, " * 100)
    store = SQLiteStore(str(tmp_path / "kv.sqlite"))
    assert any("file is not a database" in r.message for r in caplog.records)

    async def scenario() -> None:
        with pytest.raises(StoreError, match="move it away"):
            await store.get("k")
        await store.close()

    run(scenario())


def test_sqlite_file_damaged_while_in_use_says_to_move_it_away(tmp_path: Path) -> None:
    # "tried again every 10 s" alone read as if it would mend; a damaged file does
    # not (an audit overwrote a page of the running server's file).
    path = tmp_path / "kv.sqlite"

    async def scenario() -> None:
        store = SQLiteStore(str(path))
        for n in range(200):
            await store.set(f"k{n}", "x" * 100)
        await store.close()  # (checkpointed into the file)
        with open(path, "r+b") as f:
            f.seek(4096)
            f.write(b"\xff" * 4096)  # page 2: the header and schema still read
        store = SQLiteStore(str(path))
        with pytest.raises(StoreError, match="move it away and reload") as failure:
            for n in range(200):
                await store.get(f"k{n}")
        assert str(path) in str(failure.value)
        await store.close()

    run(scenario())


def test_sqlite_file_the_server_cannot_open_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "kv.sqlite").mkdir()  # a directory where the file should be
    with pytest.raises(StoreError, match="cannot open"):
        SQLiteStore(str(tmp_path / "kv.sqlite"))


def test_sqlite_closed_store_is_a_store_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = SQLiteStore(str(tmp_path / "kv.sqlite"))
        await store.close()
        with pytest.raises(StoreError):
            await store.get("k")

    run(scenario())


# --- Redis specifics ------------------------------------------------------------------


def test_redis_ttl_is_set_in_redis(redis_server: RedisServer) -> None:  # noqa: F811
    async def scenario() -> None:
        store = RedisStore(redis_server.url)
        await store.set("k", "v", ttl=100)
        await store.set("forever", "v")
        await store.incr("n", ttl=100)
        await store.incr("n", ttl=1000)  # must not extend the TTL set on create
        await store.close()

    run(scenario())
    raw = redis.Redis.from_url(redis_server.url)
    try:
        assert 0 < raw.pttl("k") <= 100_000
        assert raw.pttl("forever") == -1
        assert 0 < raw.pttl("n") <= 100_000
        assert raw.get("n") == b"2"
    finally:
        raw.close()


def test_redis_two_stores_share_state(redis_server: RedisServer) -> None:  # noqa: F811
    async def scenario() -> None:
        a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)
        await a.set("k", "from a")
        assert await b.get("k") == "from a"
        counts = await asyncio.gather(*(s.incr("n", ttl=60) for s in [a, b] * 20))
        assert sorted(counts) == list(range(1, 41))
        await a.close()
        await b.close()

    run(scenario())


def test_redis_unreachable_is_a_store_error() -> None:
    async def scenario() -> None:
        store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=1.0)
        for call in (
            store.get("k"),
            store.set("k", "v"),
            store.incr("k"),
            store.incr("k", ttl=5),
            store.delete("k"),
        ):
            with pytest.raises(StoreError):
                await call
        await store.close()

    run(scenario())


# --- the factory ----------------------------------------------------------------------


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    async def scenario() -> None:
        sqlite_store = open_store("sqlite", str(tmp_path / "kv.sqlite"), "redis://127.0.0.1/0")
        assert isinstance(sqlite_store, SQLiteStore)
        await sqlite_store.close()
        redis_store = open_store("redis", "unused", "redis://127.0.0.1:1/0")
        assert isinstance(redis_store, RedisStore)
        await redis_store.close()

    run(scenario())
    with pytest.raises(ValueError):
        open_store("memcached", "x", "y")
    with pytest.raises(StoreError):
        open_store("redis", "x", "http://not-redis/")


def test_a_hung_redis_costs_one_timeout_per_call(redis_server: RedisServer) -> None:  # noqa: F811
    # A call that timed out was sent again: each greylist check on a hung Redis took
    # twice greylist.redis_timeout (documented as the time per call).
    async def go() -> float:
        store = RedisStore(redis_server.url, timeout=1.0)
        await store.set("k", "v")  # connected
        os.kill(redis_server._proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreError):
                await store.get("k")
            return time.monotonic() - started
        finally:
            os.kill(redis_server._proc.pid, signal.SIGCONT)
            await store.close()

    assert asyncio.run(go()) < 1.8
