"""Connection counts shared by every worker process: server-wide and per client address.

``max_connections`` and ``max_connections_per_ip`` are limits of the server, not of
one worker, so the counts live in one anonymous shared memory map made before the
workers are forked.  Each worker writes only its own row (no lock, no lost update);
a check adds up the rows.  The per-address counts are a count-min sketch: an address
is counted in two slots chosen by two different hashes, and its count is the smaller
of the two.  Another address sharing both slots can only make the count higher, so a
collision may refuse a connection early, never admit one over the limit.  The hashes
are keyed with a secret drawn at start: with fixed ones an IPv6 client, which picks
its own interface identifier, could compute an address sharing both slots of any
victim (a big provider's MTA, a company's NAT address) and hold it at its limit.

Admission takes the slot first and checks afterwards: two workers admitting the last
free place at the same instant both see the other and both refuse, rather than both
admit.  When a worker dies its connections die with it, and the supervisor clears its
row before starting the next one.
"""

from __future__ import annotations

import ipaddress
import mmap
import os
from hashlib import blake2b
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SLOTS: Final = 1 << 14  # per hash and worker; 2 x 16384 x 4 bytes = 128 KiB a worker
_ROW: Final = 1 + 2 * SLOTS  # the worker's total, then the two hash tables
_SLOT_MASK: Final = SLOTS - 1


class ConnectionCounts:
    """The connections of ``workers`` processes; this process writes row ``row``."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError("workers: at least 1")
        self.workers = workers
        self.row = 0
        # MAP_SHARED anonymous memory survives fork() shared, not copied; so does the
        # key, drawn here, before the workers are forked.
        self._map = mmap.mmap(-1, workers * _ROW * 4, flags=mmap.MAP_SHARED)
        self._cells = memoryview(self._map).cast("i")
        self._key = os.urandom(16)

    def _slots(self, ip: IPAddress) -> tuple[int, int]:
        """The address's two slots, from one keyed hash (see the module).  An IPv6
        client counts by its /64: one site holds it whole and may connect from any
        of its addresses; an IPv4-mapped one as its IPv4 address."""
        if isinstance(ip, ipaddress.IPv6Address):
            mapped = ip.ipv4_mapped
            ip = mapped if mapped is not None else ipaddress.IPv6Address(int(ip) >> 64 << 64)
        h = int.from_bytes(blake2b(ip.packed, digest_size=8, key=self._key).digest(), "big")
        return 1 + (h & _SLOT_MASK), 1 + SLOTS + ((h >> 32) & _SLOT_MASK)

    def use_row(self, row: int) -> None:
        """In a freshly forked worker: count this process's connections in ``row``."""
        if not 0 <= row < self.workers:
            raise ValueError(f"row {row} outside 0..{self.workers - 1}")
        self.row = row

    def clear_row(self, row: int) -> None:
        """A worker died: its connections are gone."""
        start = row * _ROW
        self._cells[start : start + _ROW] = memoryview(bytes(_ROW * 4)).cast("i")

    def total(self) -> int:
        cells = self._cells
        return sum(cells[w * _ROW] for w in range(self.workers))

    def from_address(self, ip: IPAddress) -> int:
        """Connections open from ``ip`` (possibly more, never fewer: see the module)."""
        first, second = self._slots(ip)
        return min(self._sum(first), self._sum(second))

    def try_add(self, ip: IPAddress, max_total: int, max_per_ip: int) -> str | None:
        """Count a new connection from ``ip``; None, or which limit refuses it
        ("total" or "address"), in which case nothing stays counted."""
        first, second = self._slots(ip)
        base = self.row * _ROW
        cells = self._cells
        cells[base] += 1
        cells[base + first] += 1
        cells[base + second] += 1
        refusal = None
        if self.total() > max_total:
            refusal = "total"
        elif self.from_address(ip) > max_per_ip:
            refusal = "address"
        if refusal is not None:
            self._take(base, first, second)
        return refusal

    def remove(self, ip: IPAddress) -> None:
        """A connection counted by :meth:`try_add` in this process has closed."""
        first, second = self._slots(ip)
        self._take(self.row * _ROW, first, second)

    def _take(self, base: int, first: int, second: int) -> None:
        cells = self._cells
        cells[base] -= 1
        cells[base + first] -= 1
        cells[base + second] -= 1

    def _sum(self, slot: int) -> int:
        cells = self._cells
        return sum(cells[w * _ROW + slot] for w in range(self.workers))
