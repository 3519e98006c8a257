"""Users files with real credentials (cheap argon2 parameters so the tests are fast)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from auth_helpers import CHEAP, PASSWORDS, FakeClock, user_line

from mailgate.auth.authenticator import Authenticator
from mailgate.auth.factory import build_authenticator
from mailgate.config.auth import AuthConfig


@pytest.fixture
def cheap_hasher() -> PasswordHasher:
    return CHEAP


@pytest.fixture(scope="session")
def users_text() -> str:
    # carol has no CRAM-MD5 form, as `mailgate passwd` without --cram leaves a user.
    return (
        "# test users\n"
        + "\n".join(user_line(u, p, cram=(u != "carol")) for u, p in PASSWORDS.items())
        + "\n"
    )


@pytest.fixture
def users_file(tmp_path: Path, users_text: str) -> Path:
    path = tmp_path / "users"
    path.write_text(users_text)
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_auth(users_file: Path, clock: FakeClock) -> Callable[..., Authenticator]:
    def make(**overrides: object) -> Authenticator:
        config = AuthConfig(users_file=str(users_file), **overrides)  # type: ignore[arg-type]
        auth = build_authenticator(
            config, hostname="mx.example.org", local_domains=["example.org"], clock=clock
        )
        assert auth is not None
        return auth

    return make


@pytest.fixture
def auth(make_auth: Callable[..., Authenticator]) -> Authenticator:
    return make_auth()
