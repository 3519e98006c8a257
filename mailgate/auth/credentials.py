"""Making and checking stored credentials, the same way for known and unknown users.

A client must not learn whether a user exists: an unknown user (or one without the
credential form a mechanism needs) is checked against a dummy of the same kind and
cost, and fails.  Comparisons of secrets are constant-time (argon2 and scramp compare
with hmac.compare_digest internally; CRAM-MD5 here).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections import Counter

from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError
from scramp import ScramMechanism
from scramp.utils import ScramException, saslprep

from mailgate.auth.md5state import STATE_SIZE, cram_digest, cram_state
from mailgate.auth.users import ARGON2, CRAM, SCRAM, SCRAM_MIN_ITERATIONS, ScramKeys, UserRecord

# RFC 7677 asks for at least 4096; clients repeat the PBKDF2 on every login, so more is
# a cost paid by every mail client, not only by an attacker.
SCRAM_ITERATIONS = 10_000


def prepare_password(password: str) -> str:
    """SASLprep (RFC 4013), so PLAIN, LOGIN and SCRAM agree on non-ASCII passwords."""
    try:
        return saslprep(password)
    except ScramException as e:
        raise ValueError(f"password not allowed: {e.args[0]}") from None


def make_record(
    user: str,
    password: str,
    *,
    cram: bool = False,
    hasher: PasswordHasher | None = None,
    scram_iterations: int = SCRAM_ITERATIONS,
) -> UserRecord:
    """Every stored form for ``password`` (CRAM-MD5 only on request).  Slow: off the loop."""
    prepared = prepare_password(password)
    hashed = (hasher or PasswordHasher()).hash(prepared)
    salt, stored, server, iterations = ScramMechanism("SCRAM-SHA-256").make_auth_info(
        prepared, iteration_count=scram_iterations
    )
    return UserRecord(
        user,
        argon2=hashed,
        scram=ScramKeys(salt, iterations, stored, server),
        cram=cram_state(prepared.encode()) if cram else None,
    )


_ATTRIBUTES = {ARGON2: "argon2", SCRAM: "scram", CRAM: "cram"}  # form -> UserRecord field
SCRAM_SALT_SIZE = 32  # bytes: what scramp makes for mailgate passwd


def _fake_salt_key(users: dict[str, UserRecord]) -> bytes:
    """The key of unknown names' fake SCRAM salts: the same in every worker and after
    a reload of the same users file (a random key per process gave one name a
    different salt on each worker, which no real user shows), unknown outside (made
    from the stored secrets); it changes when the file does, as a real salt does when
    its password is changed."""
    digest = hashlib.sha256(b"mailgate fake SCRAM salt\n")
    for name in sorted(users):
        digest.update(users[name].to_line().encode() + b"\n")
    return digest.digest()


def _most_common(values: list[int], default: int) -> int:
    return Counter(values).most_common(1)[0][0] if values else default


class Credentials:
    """The loaded users table and the checks the mechanisms need."""

    def __init__(self, users: dict[str, UserRecord]) -> None:
        self.users = users
        self._dummy_secret = _fake_salt_key(users)
        self._dummy_cram = secrets.token_bytes(STATE_SIZE)
        self._dummy_hash_value: str | None = None  # made on first use, in a worker thread
        # A fake salt and count shaped as the real ones (mailgate passwd: 32 bytes,
        # 10,000): one server-first message must not tell a real name from a made-up one
        scram = [u.scram for u in users.values() if u.scram]
        self._dummy_salt_size = _most_common([len(k.salt) for k in scram], SCRAM_SALT_SIZE)
        self._dummy_iterations = _most_common([k.iterations for k in scram], SCRAM_MIN_ITERATIONS)

    def has_form(self, form: str) -> bool:
        """Whether any user has the stored form ``form`` (users.ARGON2, SCRAM or CRAM)."""
        attribute = _ATTRIBUTES[form]
        return any(getattr(u, attribute) for u in self.users.values())

    def lacks_form(self, user: str, form: str) -> bool:
        """Whether ``user`` exists without the stored form ``form``."""
        record = self.users.get(user)
        return record is not None and not getattr(record, _ATTRIBUTES[form])

    async def verify_password(self, user: str, password: str) -> bool:
        """Whether ``password`` is ``user``'s; argon2 runs in a worker thread."""
        record = self.users.get(user)
        stored = record.argon2 if record else None
        try:
            prepared = prepare_password(password)
        except ValueError:
            prepared = None
        if stored is None or prepared is None:
            await asyncio.to_thread(lambda: self._verify(self._dummy_hash(), password))
            return False
        return await asyncio.to_thread(self._verify_known, stored, prepared)

    def _verify_known(self, stored: str, password: str) -> bool:
        # The dummy hash is made by the first check after a load, whoever it is for:
        # made only for an unknown user, it would make that first miss slower, and
        # tell a prober which names exist.
        self._dummy_hash()
        return self._verify(stored, password)

    @staticmethod
    def _verify(stored: str, password: str) -> bool:
        try:
            return PasswordHasher().verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    def _dummy_hash(self) -> str:
        """A hash with the parameters real entries use, so a miss costs the same time."""
        if self._dummy_hash_value is None:
            real = next((u.argon2 for u in self.users.values() if u.argon2), None)
            hasher = PasswordHasher()
            if real:
                hasher = PasswordHasher.from_parameters(extract_parameters(real))
            self._dummy_hash_value = hasher.hash(secrets.token_hex(16))
        return self._dummy_hash_value

    def check_cram(self, user: str, challenge: bytes, digest: bytes) -> bool:
        record = self.users.get(user)
        # Unknown user: the same work against random key states, which cannot match.
        state = record.cram if record and record.cram else self._dummy_cram
        return hmac.compare_digest(cram_digest(state, challenge), digest)

    def scram_keys(self, user: str) -> tuple[bytes, bytes, bytes, int]:
        """scramp's auth_fn result; for an unknown user, a stable fake that never verifies."""
        record = self.users.get(user)
        if record and record.scram:
            k = record.scram
            return k.salt, k.stored_key, k.server_key, k.iterations
        # The same salt for the same name on every try, as a real user would show.
        salt = hmac.new(self._dummy_secret, user.encode(), "sha512").digest()[
            : self._dummy_salt_size]
        return salt, secrets.token_bytes(32), secrets.token_bytes(32), self._dummy_iterations
