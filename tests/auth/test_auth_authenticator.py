"""The Authenticator as the session sees it: offered mechanisms, reloads, logging."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from auth_helpers import FakeClock, user_line

from mailgate.auth.authenticator import Authenticator
from mailgate.auth.credentials import Credentials
from mailgate.auth.factory import build_authenticator
from mailgate.auth.mechanisms import Failure, PlainExchange, Success
from mailgate.auth.throttle import FailureCounter, Throttle, ThrottleLimits
from mailgate.config.auth import AuthConfig


def login(auth: Authenticator, user: str, password: str) -> bool:
    exchange = auth.start("PLAIN", "127.0.0.1")
    return isinstance(asyncio.run(exchange.step(f"\0{user}\0{password}".encode())), Success)


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def test_no_users_file_no_auth() -> None:
    assert build_authenticator(AuthConfig()) is None


def test_offers_configured_order(auth: Authenticator) -> None:
    assert auth.mechanisms == ["SCRAM-SHA-256", "CRAM-MD5", "PLAIN", "LOGIN"]


def test_offers_only_what_stored_forms_allow(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "users"
    write(path, user_line("alice", "pw", cram=False) + "\n")
    config = AuthConfig(users_file=str(path), mechanisms=["login", "CRAM-MD5", "plain"])
    auth = build_authenticator(config, clock=clock)
    assert auth is not None and auth.mechanisms == ["LOGIN", "PLAIN"]
    with pytest.raises(ValueError):
        auth.start("CRAM-MD5", "127.0.0.1")


def test_broken_file_at_start_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "users"
    write(path, "# users\nalice:argon2=nonsense\n")
    with pytest.raises(ValueError, match=rf"^{path}:2: argon2 is not"):
        build_authenticator(AuthConfig(users_file=str(path)))


def test_reload_picks_up_changes(auth: Authenticator, users_file: Path) -> None:
    write(users_file, user_line("dave", "davepw") + "\n")
    assert not login(auth, "dave", "davepw")
    asyncio.run(auth.reload())
    assert login(auth, "dave", "davepw")
    assert not login(auth, "alice", "correct horse")


def test_broken_reload_keeps_the_old_table(auth: Authenticator, users_file: Path) -> None:
    write(users_file, "# users\n\nalice:argon2=$argon2id$broken\n")
    with pytest.raises(ValueError, match=rf"^{users_file}:3: "):
        asyncio.run(auth.reload())
    assert login(auth, "alice", "correct horse")


def test_open_mode_refused_on_reload(auth: Authenticator, users_file: Path) -> None:
    os.chmod(users_file, 0o644)
    with pytest.raises(ValueError, match="world-readable"):
        asyncio.run(auth.reload())
    assert login(auth, "alice", "correct horse")


def test_changed_file_is_picked_up_without_reload(
    make_auth: Callable[..., Authenticator], users_file: Path, clock: FakeClock
) -> None:
    auth = make_auth(reload_interval=5)
    write(users_file, user_line("dave", "davepw") + "\n")
    asyncio.run(auth.check_throttle("127.0.0.1"))
    assert not login(auth, "dave", "davepw")  # checked at most every 5 seconds
    clock.now += 6
    asyncio.run(auth.check_throttle("127.0.0.1"))
    assert login(auth, "dave", "davepw")


def test_broken_changed_file_keeps_serving(
    make_auth: Callable[..., Authenticator],
    users_file: Path,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    auth = make_auth(reload_interval=1)
    write(users_file, "junk line\n")
    clock.now += 2
    with caplog.at_level(logging.ERROR, "mailgate"):
        asyncio.run(auth.check_throttle("127.0.0.1"))
    # one structured line (event=users_file outcome=refused), not a free-text one
    [(_, event, fields)] = [r.mailgate for r in caplog.records if hasattr(r, "mailgate")]
    assert (event, fields["outcome"], fields["path"]) == ("users_file", "refused", str(users_file))
    assert f"{users_file}:1:" in str(fields["error"])
    assert login(auth, "alice", "correct horse")


def test_logs_never_hold_the_password(
    auth: Authenticator, caplog: pytest.LogCaptureFixture
) -> None:
    # (what an AUTH came to is the session's event=auth line, tested with the server)
    with caplog.at_level(logging.DEBUG, "mailgate"):
        assert login(auth, "alice", "correct horse")
        assert not login(auth, "alice", "wrong guess")
        exchange = auth.start("LOGIN", "127.0.0.1")
        asyncio.run(exchange.step(b"bob"))
        asyncio.run(exchange.step(b"bad\nline injected"))
    logged = caplog.text + repr([getattr(r, "mailgate", None) for r in caplog.records])
    for secret in ("correct horse", "wrong guess", "injected"):
        assert secret not in logged


class _BrokenBackend(Credentials):
    """Fault injection: the password check itself fails (a worker thread, the disk)."""

    async def verify_password(self, user: str, password: str) -> bool:
        raise OSError("disk on fire")


def test_backend_trouble_is_temporary_and_not_counted(caplog: pytest.LogCaptureFixture) -> None:
    throttle = Throttle(ThrottleLimits(1, 2, 0.5, 10), FailureCounter(60))
    exchange = PlainExchange(_BrokenBackend({}), throttle, "192.0.2.1")
    with caplog.at_level(logging.ERROR, "mailgate.auth"):
        outcome = asyncio.run(exchange.step(b"\0alice\0pw"))
    assert isinstance(outcome, Failure) and outcome.reply.name == "auth.temporary"
    assert outcome.reply.code == 454 and outcome.reply.enhanced == "4.7.0"
    assert throttle.client_failures("192.0.2.1") == 0
    assert "internal error" in caplog.text


def test_the_first_check_after_a_load_makes_the_dummy_hash_whoever_it_is_for(
    auth: Authenticator,
) -> None:
    # Made only for an unknown name, the dummy hash would make that name's first
    # miss slower than a known user's: a prober could tell which names exist.
    credentials = auth._credentials
    assert credentials._dummy_hash_value is None
    assert not login(auth, "alice", "wrong")  # a known user
    assert credentials._dummy_hash_value is not None
