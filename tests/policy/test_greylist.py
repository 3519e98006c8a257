"""Greylisting (RFC 6647) with a stepped clock, on SQLite, Redis and memory stores."""

from __future__ import annotations

import asyncio
import ipaddress
import sqlite3
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from memory_store import MemoryStore
from redis_fixture import RedisServer, free_port, redis_server  # noqa: F401  (fixture)

from mailgate.config.policy import GreylistConfig
from mailgate.policy.base import Client, Verdict
from mailgate.policy.greylist import (
    OUTAGE_RETRY,
    Greylist,
    build_greylist,
    client_network,
    triplet_key,
)
from mailgate.policy.store import SQLITE_BUSY_TIMEOUT, RedisStore, SQLiteStore, Store
from mailgate.protocol.envelope import NULL_ADDRESS, Address, Envelope, Recipient

MIN_DELAY = 300.0
PENDING = 86400.0
PASS = 36 * 86400.0


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def config(**changes: Any) -> GreylistConfig:
    values: dict[str, Any] = {
        "enabled": True,
        "min_delay": MIN_DELAY,
        "pending_expiry": PENDING,
        "pass_expiry": PASS,
    }
    values.update(changes)
    return GreylistConfig(**values)


def client(ip: str = "192.0.2.10", **fields: Any) -> Client:
    return Client(ip=ipaddress.ip_address(ip), **fields)


ALICE = Address("Alice", "Example.ORG")


def envelope(sender: Address = ALICE, *rcpts: str) -> Envelope:
    recipients = [Recipient(Address(*r.split("@"))) for r in rcpts or ("bob@example.net",)]
    return Envelope(sender=sender, recipients=recipients)


async def at_rcpt(g: Greylist, c: Client, env: Envelope, index: int = 0) -> Verdict:
    return await g.rcpt(c, env, env.recipients[index])


def tag(v: Verdict) -> str:
    return dict(v.tags)["greylist"]


def assert_deferred(v: Verdict, outcome: str) -> None:
    assert v.reply is not None
    assert (v.reply.code, v.reply.enhanced, v.reply.name) == (451, "4.7.1", "greylist.deferred")
    assert not v.close
    assert tag(v) == outcome


def assert_accepted(v: Verdict, outcome: str) -> None:
    assert v.accepted
    assert tag(v) == outcome


StoreFactory = Callable[[Clock], Store]


@pytest.fixture(params=["sqlite", "redis", "memory"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Each backend; the greylist's own clock decides, so Redis steps time too."""
    if request.param == "sqlite":
        yield lambda clock: SQLiteStore(str(tmp_path / "grey.sqlite"), now=clock)
    elif request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        yield lambda clock: RedisStore(server.url)
    else:
        yield lambda clock: MemoryStore(now=clock)


# --- the triplet's life ---------------------------------------------------------------


def test_first_attempt_early_retry_then_pass_then_whitelisted(make_store: StoreFactory) -> None:
    async def scenario() -> None:
        clock = Clock()
        g = Greylist(make_store(clock), config(), now=clock)
        c, env = client(), envelope()
        assert_deferred(await at_rcpt(g, c, env), "new")
        clock.t += MIN_DELAY - 1
        assert_deferred(await at_rcpt(g, c, env), "early")
        clock.t += 1  # min_delay after the *first* attempt: the early retry did not reset it
        assert_accepted(await at_rcpt(g, c, env), "passed")
        clock.t += 1
        assert_accepted(await at_rcpt(g, c, env), "whitelisted")
        await g.close()

    run(scenario())


def test_whitelisted_triplet_is_renewed_on_each_pass_and_expires_unused(
    make_store: StoreFactory,
) -> None:
    async def scenario() -> None:
        clock = Clock()
        g = Greylist(make_store(clock), config(), now=clock)
        c, env = client(), envelope()
        await at_rcpt(g, c, env)
        clock.t += MIN_DELAY
        assert_accepted(await at_rcpt(g, c, env), "passed")
        for _ in range(3):  # well past pass_expiry in total, but each pass renews it
            clock.t += PASS - 1
            assert_accepted(await at_rcpt(g, c, env), "whitelisted")
        clock.t += PASS
        assert_deferred(await at_rcpt(g, c, env), "new")
        await g.close()

    run(scenario())


def test_pending_triplet_expires(make_store: StoreFactory) -> None:
    async def scenario() -> None:
        clock = Clock()
        g = Greylist(make_store(clock), config(), now=clock)
        c, env = client(), envelope()
        assert_deferred(await at_rcpt(g, c, env), "new")
        clock.t += PENDING
        assert_deferred(await at_rcpt(g, c, env), "new")  # too late: starts over
        clock.t += MIN_DELAY - 1
        assert_deferred(await at_rcpt(g, c, env), "early")
        clock.t += 1
        assert_accepted(await at_rcpt(g, c, env), "passed")
        await g.close()

    run(scenario())


def test_triplet_is_network_sender_and_recipient() -> None:
    async def scenario() -> None:
        clock = Clock()
        g = Greylist(MemoryStore(now=clock), config(), now=clock)
        env = envelope()
        await at_rcpt(g, client("192.0.2.10"), env)
        clock.t += MIN_DELAY
        # Another sender, recipient or network is another triplet.
        other_sender = envelope(Address("carol", "example.org"))
        assert_deferred(await at_rcpt(g, client("192.0.2.10"), other_sender), "new")
        other_rcpt = envelope(Address("alice", "example.org"), "dave@example.net")
        assert_deferred(await at_rcpt(g, client("192.0.2.10"), other_rcpt), "new")
        assert_deferred(await at_rcpt(g, client("192.0.3.10"), env), "new")
        # The same triplet, whatever the case of the addresses.
        same = envelope(Address("ALICE", "example.org"), "BOB@Example.Net")
        assert_accepted(await at_rcpt(g, client("192.0.2.10"), same), "passed")

    run(scenario())


@pytest.mark.parametrize(
    ("first", "same_network", "other_network"),
    [
        ("192.0.2.10", "192.0.2.250", "192.0.3.10"),
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe", "2001:db8:1:3::1"),
        ("::ffff:192.0.2.10", "192.0.2.99", "::ffff:192.0.3.10"),
    ],
)
def test_client_network_groups_by_24_and_64(
    first: str, same_network: str, other_network: str
) -> None:
    async def scenario() -> None:
        clock = Clock()
        g = Greylist(MemoryStore(now=clock), config(), now=clock)
        env = envelope()
        assert_deferred(await at_rcpt(g, client(first), env), "new")
        clock.t += MIN_DELAY
        assert_deferred(await at_rcpt(g, client(other_network), env), "new")
        assert_accepted(await at_rcpt(g, client(same_network), env), "passed")

    run(scenario())
    assert client_network(ipaddress.ip_address("192.0.2.77")) == "192.0.2.0/24"
    assert client_network(ipaddress.ip_address("2001:db8::5")) == "2001:db8::/64"


def test_null_sender_is_its_own_triplet() -> None:
    async def scenario() -> None:
        clock = Clock()
        g = Greylist(MemoryStore(now=clock), config(), now=clock)
        bounce = envelope(NULL_ADDRESS)
        assert_deferred(await at_rcpt(g, client(), bounce), "new")
        clock.t += MIN_DELAY
        assert_deferred(await at_rcpt(g, client(), envelope()), "new")
        assert_accepted(await at_rcpt(g, client(), bounce), "passed")

    run(scenario())
    assert triplet_key("192.0.2.0/24", "", "bob@x") != triplet_key("192.0.2.0/24", "bob@x", "")


def test_unreadable_stored_value_counts_as_new() -> None:
    async def scenario() -> None:
        clock = Clock()
        store = MemoryStore(now=clock)
        g = Greylist(store, config(), now=clock)
        key = triplet_key("192.0.2.0/24", "alice@example.org", "bob@example.net")
        await store.set(key, "garbage")
        assert_deferred(await at_rcpt(g, client(), envelope()), "new")
        clock.t += MIN_DELAY
        assert_accepted(await at_rcpt(g, client(), envelope()), "passed")

    run(scenario())


# --- who is not greylisted ------------------------------------------------------------


@pytest.mark.parametrize(
    "who",
    [
        client(trusted=True),
        client(auth_user="alice"),
        client("198.51.100.7"),  # in the configured whitelist
        client("::ffff:198.51.100.7"),
    ],
)
def test_trusted_authenticated_and_whitelisted_clients_skip(who: Client) -> None:
    async def scenario() -> None:
        clock = Clock()
        store = MemoryStore(now=clock)
        g = Greylist(store, config(whitelist=["198.51.100.0/24"]), now=clock)
        env = envelope()
        assert_accepted(await at_rcpt(g, who, env), "skipped")
        assert_accepted(await at_rcpt(g, who, env), "skipped")
        # Nothing was recorded: without the exemptions, the same triplet is new.
        plain = Greylist(store, config(), now=clock)
        assert_deferred(await at_rcpt(plain, client(str(who.ip)), env), "new")

    run(scenario())


# --- stage = "data" -------------------------------------------------------------------


def test_stage_data_checks_every_recipient_and_passes_on_any() -> None:
    async def scenario() -> None:
        clock = Clock()
        g = Greylist(MemoryStore(now=clock), config(stage="data"), now=clock)
        c = client()
        two = envelope(Address("alice", "example.org"), "bob@example.net", "carol@example.net")
        assert (await at_rcpt(g, c, two)).tags == ()  # nothing happens at RCPT
        assert_deferred(await g.data(c, two), "new")
        clock.t += MIN_DELAY
        # bob and carol have both waited; dave is new but rides along.
        three = envelope(
            Address("alice", "example.org"),
            "bob@example.net",
            "carol@example.net",
            "dave@example.net",
        )
        assert_accepted(await g.data(c, three), "passed")
        assert_accepted(await g.data(c, envelope()), "whitelisted")  # bob alone
        # dave was recorded but not promoted: alone, he must still wait his turn.
        dave = envelope(Address("alice", "example.org"), "dave@example.net")
        assert_deferred(await g.data(c, dave), "early")
        clock.t += MIN_DELAY
        assert_accepted(await g.data(c, dave), "passed")

    run(scenario())


def test_stage_rcpt_does_nothing_at_data() -> None:
    async def scenario() -> None:
        clock = Clock()
        g = Greylist(MemoryStore(now=clock), config(stage="rcpt"), now=clock)
        assert (await g.data(client(), envelope())).tags == ()
        assert_deferred(await at_rcpt(g, client(), envelope()), "new")

    run(scenario())


# --- persistence and sharing ----------------------------------------------------------


def test_sqlite_state_survives_a_restart(tmp_path: Path) -> None:
    cfg = config(sqlite_path=str(tmp_path / "grey.sqlite"))
    clock = Clock()

    async def before() -> None:
        g = build_greylist(cfg, now=clock)
        assert_deferred(await at_rcpt(g, client(), envelope()), "new")
        await g.close()

    async def after() -> None:
        g = build_greylist(cfg, now=clock)
        assert_accepted(await at_rcpt(g, client(), envelope()), "passed")
        await g.close()

    run(before())
    clock.t += MIN_DELAY
    run(after())


def test_redis_state_is_shared_by_two_instances(redis_server: RedisServer) -> None:  # noqa: F811
    cfg = config(backend="redis", redis_url=redis_server.url)

    async def scenario() -> None:
        clock = Clock()
        first, second = build_greylist(cfg, now=clock), build_greylist(cfg, now=clock)
        assert_deferred(await at_rcpt(first, client("192.0.2.10"), envelope()), "new")
        assert_deferred(await at_rcpt(second, client("192.0.2.11"), envelope()), "early")
        clock.t += MIN_DELAY
        assert_accepted(await at_rcpt(second, client("192.0.2.12"), envelope()), "passed")
        assert_accepted(await at_rcpt(first, client("192.0.2.10"), envelope()), "whitelisted")
        await first.close()
        await second.close()

    run(scenario())


# --- failing open ---------------------------------------------------------------------


def test_redis_unreachable_fails_open(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"

    async def scenario() -> None:
        at_rcpt_step = build_greylist(config(backend="redis", redis_url=url))
        assert_accepted(await at_rcpt(at_rcpt_step, client(), envelope()), "error")
        assert_accepted(await at_rcpt(at_rcpt_step, client(), envelope()), "error")
        await at_rcpt_step.close()
        at_data_step = build_greylist(config(stage="data", backend="redis", redis_url=url))
        assert_accepted(await at_data_step.data(client(), envelope()), "error")
        await at_data_step.close()

    run(scenario())
    outages = [r for r in caplog.records if "accepting without greylisting" in r.message]
    assert len(outages) == 2  # once per step and outage, not once per message


def test_redis_going_down_fails_open_and_coming_back_works(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    try:
        cfg = config(backend="redis", redis_url=server.url)

        async def scenario() -> None:
            nonlocal server
            clock = Clock()
            g = build_greylist(cfg, now=clock)
            assert_deferred(await at_rcpt(g, client(), envelope()), "new")
            server.stop()
            assert_accepted(await at_rcpt(g, client(), envelope()), "error")
            # A new Redis (without the old state) on the same port: the step uses it
            # again without a restart of mailgate, once the outage's pause is over.
            server = RedisServer(tmp_path, port=server.port)
            assert_accepted(await at_rcpt(g, client(), envelope()), "error")  # not asked
            clock.t += OUTAGE_RETRY
            assert_deferred(await at_rcpt(g, client(), envelope()), "new")
            await g.close()

        run(scenario())
    finally:
        server.stop()


# --- configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"stage": "mail"},
        {"backend": "memcached"},
        {"min_delay": -1},
        {"min_delay": 600, "pending_expiry": 600},
        {"pass_expiry": 0},
        {"redis_url": "http://127.0.0.1/"},
        {"whitelist": ["192.0.2.0/33"]},
        {"whitelist": ["not a network"]},
        {"sqlite_path": ""},
    ],
)
def test_config_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"^greylist\."):
        GreylistConfig(**bad)


def test_config_defaults_follow_rfc_6647_practice() -> None:
    cfg = GreylistConfig()
    assert not cfg.enabled
    assert (cfg.stage, cfg.backend) == ("rcpt", "sqlite")
    assert cfg.min_delay == 300
    assert cfg.min_delay < cfg.pending_expiry < cfg.pass_expiry


def test_a_locked_sqlite_file_fails_open_in_bounded_time(tmp_path: Path) -> None:
    # Someone's sqlite3 session (or a backup) holds the write lock: each check waited
    # 5 s, one after another, so eight sessions' RCPTs were answered after 5 to 40 s.
    path = tmp_path / "greylist.sqlite"
    g = build_greylist(config(backend="sqlite", sqlite_path=str(path)))
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")

    async def scenario() -> tuple[list[Verdict], float, Verdict, float]:
        started = time.monotonic()
        at_once = await asyncio.gather(
            *(at_rcpt(g, client(f"192.0.2.{n}"), envelope()) for n in range(8)))
        waited = time.monotonic() - started
        started = time.monotonic()
        later = await at_rcpt(g, client(), envelope())  # during the outage: not asked
        return at_once, waited, later, time.monotonic() - started

    try:
        at_once, waited, later, then = asyncio.run(scenario())
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    for verdict in [*at_once, later]:
        assert_accepted(verdict, "error")
    # one wait for the lock (SQLITE_BUSY_TIMEOUT), not one per queued check
    assert waited < 8 * SQLITE_BUSY_TIMEOUT / 2, waited
    assert then < SQLITE_BUSY_TIMEOUT / 2, then


@pytest.mark.parametrize("address", ["10.1.1.1", "::ffff:10.1.1.1"])
def test_an_ipv4_mapped_whitelist_entry_is_its_ipv4_network(address: str) -> None:
    # "::ffff:10.0.0.0/104" is 10.0.0.0/8 (as in trusted_networks): as ip_network alone
    # reads it, no client matched it, IPv4 or mapped
    async def scenario() -> None:
        clock = Clock()
        g = Greylist(MemoryStore(now=clock), config(whitelist=["::ffff:10.0.0.0/104"]), now=clock)
        assert_accepted(await at_rcpt(g, client(address), envelope()), "skipped")

    run(scenario())
