"""HMAC-MD5 from precomputed key states, so CRAM-MD5 needs no stored password.

HMAC-MD5(K, m) = MD5((K ^ opad) || MD5((K ^ ipad) || m)).  Both inner and outer hashes
start with one 64-byte block that depends only on the key; the MD5 chaining values
after that block ("the ipad and opad states", 16 bytes each) are enough to finish the
HMAC for any message.  The layout (outer then inner, little-endian words) is Dovecot's
``{CRAM-MD5}`` scheme, so ``doveadm pw -s CRAM-MD5`` output can be used as is.

Storing those 32 bytes instead of the password means the users file never holds a
recoverable password, although the states are still *password-equivalent for
CRAM-MD5* (whoever has them can answer any CRAM challenge).

hashlib cannot resume from a given chaining value, hence this small pure-Python MD5
compression function (RFC 1321).  It runs on two short messages per AUTH, so speed is
irrelevant.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Final

STATE_SIZE: Final = 32  # outer state (16 bytes) then inner state: the order Dovecot uses

_MASK: Final = 0xFFFFFFFF
_IV: Final = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_SHIFTS: Final = (
    (7, 12, 17, 22) * 4 + (5, 9, 14, 20) * 4 + (4, 11, 16, 23) * 4 + (6, 10, 15, 21) * 4
)
_K: Final = tuple(int(abs(math.sin(i + 1)) * 2**32) & _MASK for i in range(64))

State = tuple[int, int, int, int]


def _compress(state: State, block: bytes) -> State:
    a, b, c, d = state
    words = struct.unpack("<16I", block)
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & _MASK & d), i
        elif i < 32:
            f, g = (d & b) | (~d & _MASK & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | (~d & _MASK)), (7 * i) % 16
        f = (f + a + _K[i] + words[g]) & _MASK
        a, d, c = d, c, b
        b = (b + ((f << _SHIFTS[i]) | (f >> (32 - _SHIFTS[i])))) & _MASK
    return (
        (state[0] + a) & _MASK,
        (state[1] + b) & _MASK,
        (state[2] + c) & _MASK,
        (state[3] + d) & _MASK,
    )


def _finish(state: State, data: bytes) -> bytes:
    """MD5 of (one already-compressed 64-byte block || data), from that block's state."""
    total_bits = (64 + len(data)) * 8
    padded = data + b"\x80" + b"\0" * ((55 - len(data)) % 64) + struct.pack("<Q", total_bits)
    for offset in range(0, len(padded), 64):
        state = _compress(state, padded[offset : offset + 64])
    return struct.pack("<4I", *state)


def cram_state(secret: bytes) -> bytes:
    """The 32-byte outer+inner HMAC-MD5 key state for ``secret``."""
    key = hashlib.md5(secret).digest() if len(secret) > 64 else secret
    key = key.ljust(64, b"\0")
    inner = _compress(_IV, bytes(k ^ 0x36 for k in key))
    outer = _compress(_IV, bytes(k ^ 0x5C for k in key))
    return struct.pack("<4I", *outer) + struct.pack("<4I", *inner)


def cram_digest(state: bytes, challenge: bytes) -> bytes:
    """HMAC-MD5(secret, challenge) computed from ``cram_state(secret)``."""
    outer: State = struct.unpack("<4I", state[:16])
    inner: State = struct.unpack("<4I", state[16:STATE_SIZE])
    return _finish(outer, _finish(inner, challenge))
