"""Failure counting per client and per user: delays, 454, 421, reset, expiry."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from auth_helpers import FakeClock

from mailgate.auth.authenticator import Authenticator
from mailgate.auth.factory import build_authenticator
from mailgate.auth.mechanisms import Success
from mailgate.auth.throttle import FailureCounter, SharedFailureCounter
from mailgate.config.auth import AuthConfig

IP = "198.51.100.9"


def attempt(auth: Authenticator, data: bytes, ip: str = IP) -> object:
    async def go() -> object:
        return await auth.start("PLAIN", ip).step(data)

    return asyncio.run(go())


def fail(auth: Authenticator, user: str = "alice", ip: str = IP) -> None:
    attempt(auth, f"\0{user}\0wrong".encode(), ip)


def throttle(auth: Authenticator, ip: str = IP) -> str | None:
    found = asyncio.run(auth.check_throttle(ip))
    return found.name if found else None


def test_delay_grows_and_is_capped(make_auth: Callable[..., Authenticator]) -> None:
    auth = make_auth(failure_delay=0.5, failure_max_delay=3.0, throttle_close_after=50)
    assert auth.failure_delay(IP, "alice") == 0
    delays = []
    for _ in range(5):
        fail(auth)
        delays.append(auth.failure_delay(IP, "alice"))
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_user_count_follows_the_user_across_addresses(auth: Authenticator) -> None:
    for i in range(3):
        fail(auth, "bob", ip=f"192.0.2.{i}")
    # a fresh address guessing bob's password still waits for bob's three failures
    assert auth.failure_delay("203.0.113.1", "bob") == 0.5 * 2**2
    assert auth.failure_delay("203.0.113.1", "alice") == 0


def test_454_then_421(make_auth: Callable[..., Authenticator]) -> None:
    auth = make_auth(throttle_after=2, throttle_close_after=4)
    seen = []
    for _ in range(5):
        verdict = throttle(auth)
        seen.append(verdict)
        if verdict is None:
            fail(auth)  # the session runs an exchange only when not throttled
    # Trying again while throttled counts too, so a persistent guesser is cut off.
    assert seen == [None, None, "auth.throttled", "auth.throttled", "closing.auth_throttled"]
    reply = asyncio.run(auth.check_throttle(IP))
    assert reply is not None and reply.code == 421 and "mx.example.org" in reply.text
    assert throttle(auth, "192.0.2.200") is None  # another client is not affected


def test_an_ipv6_client_is_counted_by_its_64(make_auth: Callable[..., Authenticator]) -> None:
    # One site holds a whole /64 and may use any address of it: per address, a
    # guesser spreading over it was never answered 454 or 421.
    auth = make_auth(throttle_after=2, throttle_close_after=4)
    for n in range(2):
        fail(auth, ip=f"2001:db8:1:2::{n + 1}")
    assert throttle(auth, "2001:db8:1:2:ffff::99") == "auth.throttled"
    assert throttle(auth, "2001:db8:1:3::1") is None  # the next /64 is someone else
    assert throttle(auth, "::ffff:192.0.2.77") is None  # IPv4 (mapped) per address


def test_malformed_responses_count_too(make_auth: Callable[..., Authenticator]) -> None:
    auth = make_auth(throttle_after=1)
    attempt(auth, b"garbage")
    assert throttle(auth) == "auth.throttled"


def test_success_resets_the_user_not_the_address(auth: Authenticator) -> None:
    fail(auth)
    fail(auth)
    assert isinstance(attempt(auth, b"\0alice\0correct horse"), Success)
    assert auth.failure_delay("203.0.113.1", "alice") == 0
    assert auth.failure_delay(IP, None) == 1.0  # the address keeps its two failures


def test_attempts_side_by_side_count_before_they_end(
    make_auth: Callable[..., Authenticator],
) -> None:
    # Twenty connections from one address start AUTH at once; the password checks
    # take a while: each attempt counts from its start, so the third is refused
    # before any of the first two has failed.
    auth = make_auth(throttle_after=2, throttle_close_after=10)
    seen = []
    for _ in range(4):
        verdict = throttle(auth)
        seen.append(verdict)
        if verdict is None:
            auth.start("PLAIN", IP)  # under way, not yet answered
    assert seen == [None, None, "auth.throttled", "auth.throttled"]


def test_a_success_or_a_fault_of_ours_takes_its_attempt_back(auth: Authenticator) -> None:
    fail(auth)
    assert isinstance(attempt(auth, b"\0alice\0correct horse"), Success)
    assert auth.failure_delay(IP, None) == 0.5  # the one failure, not the success


def test_shared_counter_takes_back_only_its_own_row() -> None:
    counter = SharedFailureCounter(window=60, workers=2)
    counter.add("ip:198.51.100.9")
    counter.use_row(1)
    counter.add("ip:198.51.100.9")
    counter.sub("ip:198.51.100.9")
    counter.sub("ip:198.51.100.9")  # row 1 holds none now: it stays at zero
    assert counter.get("ip:198.51.100.9") == 1


def test_counts_expire(make_auth: Callable[..., Authenticator], clock: FakeClock) -> None:
    auth = make_auth(throttle_after=1, throttle_window=60)
    fail(auth)
    clock.now += 59
    assert throttle(auth) == "auth.throttled"  # and this try counts, at t=59
    clock.now += 2
    assert throttle(auth) == "auth.throttled"  # the first failure expired, not the try
    clock.now += 61
    assert throttle(auth) is None  # a minute without trying: the window is clean
    assert auth.failure_delay(IP, "alice") == 0


def test_counter_bounds_its_memory() -> None:
    clock = FakeClock()
    counter = FailureCounter(window=100, clock=clock, max_keys=10)
    for i in range(25):
        counter.add(f"k{i}")
        clock.now += 1
    assert counter.get("k24") == 1
    assert sum(counter.get(f"k{i}") for i in range(25)) <= 10


def test_worker_processes_count_failures_together() -> None:
    counter = SharedFailureCounter(window=60, workers=3)
    pid = os.fork()
    if pid == 0:  # worker 1: three failures, then gone
        try:
            counter.use_row(1)
            for _ in range(3):
                counter.add("ip:198.51.100.9")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    counter.use_row(2)
    assert counter.add("ip:198.51.100.9") == 4  # its own and the other worker's
    counter.use_row(0)
    counter.add("ip:198.51.100.9")
    assert counter.get("ip:198.51.100.9") == 5
    assert counter.get("ip:192.0.2.1") == 0
    counter.reset("ip:198.51.100.9")  # in every worker's row
    assert counter.get("ip:198.51.100.9") == 0


def test_shared_counts_expire_a_window_after_each_workers_last_failure() -> None:
    clock = FakeClock()
    counter = SharedFailureCounter(window=60, workers=2, clock=clock)
    counter.add("user:alice")
    clock.now += 50
    counter.use_row(1)
    counter.add("user:alice")
    assert counter.get("user:alice") == 2
    clock.now += 20  # row 0's failure is 70 s old, row 1's 20 s
    assert counter.get("user:alice") == 1
    counter.use_row(0)
    assert counter.add("user:alice") == 2  # row 0 starts again from its expired count
    with pytest.raises(ValueError):
        counter.use_row(2)


def test_the_throttle_works_the_same_over_shared_counts(
    users_file: Path, clock: FakeClock
) -> None:
    config = AuthConfig(users_file=str(users_file), throttle_after=2, throttle_close_after=3)
    shared = SharedFailureCounter(window=1, workers=2, clock=clock)
    auth = build_authenticator(config, hostname="mx.example.org", clock=clock, failures=shared)
    assert auth is not None
    assert shared.window == config.throttle_window  # the configured window, not the given
    fail(auth)
    shared.use_row(1)  # the next failure in another worker
    fail(auth)
    assert throttle(auth) == "auth.throttled"
    assert throttle(auth) == "closing.auth_throttled"


def test_a_reload_keeps_the_failure_counts(
    make_auth: Callable[..., Authenticator], users_file: Path, clock: FakeClock
) -> None:
    auth = make_auth(throttle_after=2)
    fail(auth)
    fail(auth)
    config = AuthConfig(users_file=str(users_file), throttle_after=2)
    reloaded = build_authenticator(
        config, hostname="mx.example.org", clock=clock, failures=auth.failures
    )
    assert reloaded is not None
    assert throttle(reloaded) == "auth.throttled"  # not a fresh budget for the guesser


def test_only_a_fallback_from_a_mechanism_the_user_cannot_pass_is_forgiven(
    make_auth: Callable[..., Authenticator], users_file: Path
) -> None:
    auth = make_auth()
    fail(auth, "alice")  # a PLAIN guess at alice, whom PLAIN can pass: stays counted
    failed = [("alice", "PLAIN"), ("nobody", "CRAM-MD5")]
    auth.forgive_fallback(IP, "alice", failed)
    assert auth.failure_delay(IP, None) == 0.5  # still the one failure


def test_a_fallback_from_cram_md5_for_a_user_without_its_secret_is_forgiven(
    auth: Authenticator,
) -> None:
    async def cram_miss() -> None:
        exchange = auth.start("CRAM-MD5", IP)
        await exchange.step(None)  # the challenge
        await exchange.step(b"carol " + b"0" * 32)

    asyncio.run(cram_miss())
    assert auth.failure_delay(IP, None) == 0.5
    auth.forgive_fallback(IP, "carol", [("carol", "CRAM-MD5")])
    assert auth.failure_delay(IP, None) == 0
