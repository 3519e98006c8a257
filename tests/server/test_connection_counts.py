"""Connection counts shared between worker processes (server.workers)."""

from __future__ import annotations

import ipaddress
import os
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from mailgate.server.limits import ConnectionCounts

A = ipaddress.ip_address("192.0.2.1")
B = ipaddress.ip_address("2001:db8::1")


def test_counts_total_and_per_address() -> None:
    counts = ConnectionCounts()
    assert counts.try_add(A, 10, 2) is None
    assert counts.try_add(A, 10, 2) is None
    assert counts.try_add(A, 10, 2) == "address"  # the third from A
    assert counts.try_add(B, 10, 2) is None  # another client is still welcome
    assert (counts.total(), counts.from_address(A), counts.from_address(B)) == (3, 2, 1)
    assert counts.try_add(B, 3, 2) == "total"
    assert counts.total() == 3  # a refused connection leaves nothing counted
    counts.remove(A)
    assert (counts.total(), counts.from_address(A)) == (2, 1)


def test_rows_of_other_workers_count_too() -> None:
    counts = ConnectionCounts(workers=3)
    counts.use_row(2)
    assert counts.try_add(A, 10, 2) is None
    counts.use_row(0)
    assert counts.try_add(A, 10, 2) is None
    assert counts.try_add(A, 10, 2) == "address"
    counts.clear_row(2)  # that worker died, its connection with it
    assert counts.from_address(A) == 1
    assert counts.try_add(A, 10, 2) is None


def test_a_forked_worker_shares_the_counts() -> None:
    counts = ConnectionCounts(workers=2)
    assert counts.try_add(A, 10, 3) is None
    pid = os.fork()
    if pid == 0:  # the worker: sees the parent's connection, adds its own
        counts.use_row(1)
        ok = counts.from_address(A) == 1 and counts.try_add(A, 10, 3) is None
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (counts.total(), counts.from_address(A)) == (2, 2)
    assert counts.try_add(A, 10, 2) == "address"


addresses = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address) | st.integers(
    0, 2**128 - 1
).map(ipaddress.IPv6Address)


@given(st.lists(st.tuples(addresses, st.booleans()), max_size=300))
def test_never_counts_fewer_than_are_open(steps: list[tuple[object, bool]]) -> None:
    counts = ConnectionCounts(workers=2)
    open_now: Counter[object] = Counter()
    for ip, close in steps:
        if close and open_now[ip]:
            counts.remove(ip)  # type: ignore[arg-type]
            open_now[ip] -= 1
        else:
            assert counts.try_add(ip, 10_000, 10_000) is None  # type: ignore[arg-type]
            open_now[ip] += 1
    assert counts.total() == sum(open_now.values())
    for ip, n in open_now.items():
        assert counts.from_address(ip) >= n  # type: ignore[arg-type]


def _fixed_hash_twin(victim: ipaddress.IPv4Address) -> ipaddress.IPv6Address:
    """An address the old fixed hashes put in both of ``victim``'s slots: they hashed
    low64 ^ high64, which an IPv6 client choosing its interface id can make anything."""
    prefix = 0x20010DB8AAAABBBB
    return ipaddress.IPv6Address((prefix << 64) | (int(victim) ^ prefix))


def test_a_chosen_ipv6_address_cannot_hold_another_clients_limit() -> None:
    counts = ConnectionCounts()
    victim = ipaddress.IPv4Address("203.0.113.60")
    twin = _fixed_hash_twin(victim)
    for _ in range(3):
        assert counts.try_add(twin, max_total=100, max_per_ip=3) is None
    assert counts.try_add(twin, max_total=100, max_per_ip=3) == "address"
    assert counts.try_add(victim, max_total=100, max_per_ip=3) is None
    # and the slots are secret: two servers (two keys) put one address apart
    assert ConnectionCounts()._slots(victim) != ConnectionCounts()._slots(victim)


def test_an_ipv6_client_counts_by_its_64() -> None:
    # one site may connect from any of its 2^64 addresses
    counts = ConnectionCounts()
    for n in range(2):
        assert counts.try_add(ipaddress.ip_address(f"2001:db8:1:2::{n + 1}"), 100, 2) is None
    assert counts.try_add(ipaddress.ip_address("2001:db8:1:2:ab::7"), 100, 2) == "address"
    assert counts.try_add(ipaddress.ip_address("2001:db8:1:3::1"), 100, 2) is None
    # a dual-stack listener's IPv4 client is its IPv4 address
    counts.try_add(ipaddress.ip_address("192.0.2.1"), 100, 2)
    counts.try_add(ipaddress.ip_address("::ffff:192.0.2.1"), 100, 2)
    assert counts.from_address(ipaddress.ip_address("192.0.2.1")) == 2
