"""Failure counting per client and per user: delays, 454, 421, reset, expiry."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from auth_helpers import FakeClock

from mailgate.auth.authenticator import Authenticator
from mailgate.auth.mechanisms import Success
from mailgate.auth.throttle import FailureCounter

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
