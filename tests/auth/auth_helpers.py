"""Shared test data: users and their passwords, credentials with cheap argon2 costs."""

from __future__ import annotations

from argon2 import PasswordHasher

from mailgate.auth.credentials import make_record

CHEAP = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)

PASSWORDS = {"alice": "correct horse", "bob": "bob's secret", "carol": "pässwörd"}


class FakeClock:
    """A hand-moved monotonic clock: expiry is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def user_line(user: str, password: str, *, cram: bool = True) -> str:
    return make_record(user, password, cram=cram, hasher=CHEAP, scram_iterations=4096).to_line()
