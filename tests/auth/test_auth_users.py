"""The users file: parsing, errors with line numbers, file mode, the CRAM key states."""

from __future__ import annotations

import hmac
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from auth_helpers import user_line

from mailgate.auth.md5state import cram_digest, cram_state
from mailgate.auth.users import load_users, parse_users

GOOD = user_line("alice", "correct horse")


def test_parse_keeps_every_form() -> None:
    users = parse_users(f"# comment\n\n  {GOOD}  \n", "users")
    alice = users["alice"]
    assert alice.argon2 and alice.argon2.startswith("$argon2id$")
    assert alice.scram and alice.scram.iterations == 4096 and len(alice.scram.stored_key) == 32
    assert alice.cram and len(alice.cram) == 32
    assert alice.to_line() == GOOD


def test_no_plaintext_in_a_line() -> None:
    assert "correct horse" not in GOOD
    assert b"correct horse".hex() not in GOOD


SCRAM_FIELD = next(f for f in GOOD.split(":") if f.startswith("scram-sha-256="))


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("bob", "has no credentials"),
        ("bob:password=x", "unknown credential form"),
        ("bob:argon2", "unknown credential form"),
        ("bob:argon2=$1$abc", "not an argon2 hash"),
        ("bob:cram-md5=zz", "not hexadecimal"),
        ("bob:cram-md5=abcd", "64 hex digits"),
        ("bob:scram-sha-256=a,b", "salt,iterations"),
        ("bob:scram-sha-256=!!!,4096,a,b", "salt is not valid base64"),
        ("bob:scram-sha-256=AAAA,4096,a,b", "shorter than 12"),
        (f"bob:{SCRAM_FIELD.replace(',4096,', ',100,')}", "iterations must be"),
        (f"bob:{SCRAM_FIELD}:{SCRAM_FIELD}", "given twice"),
        ("b\x01b:argon2=x", "control character"),
        (":argon2=x", "empty user name"),
        (GOOD.replace("alice", "bob", 1) + "\n" + GOOD.replace("alice", "bob", 1), "listed twice"),
    ],
)
def test_parse_errors_name_file_and_line(line: str, problem: str) -> None:
    text = f"# header\n{GOOD}\n\n{line}\n"
    with pytest.raises(ValueError) as info:
        parse_users(text, "/etc/mailgate/users")
    message = str(info.value)
    expected_line = 4 if "listed twice" not in problem else 5
    assert message.startswith(f"/etc/mailgate/users:{expected_line}: ")
    assert problem in message


def test_every_bad_line_is_named_at_once() -> None:
    # one check-config run shows them all, not one per run
    bad = ["bob", "carol:argon2", "b\x01b:argon2=x"]
    with pytest.raises(ValueError) as info:
        parse_users("\n".join([GOOD, *bad, GOOD]) + "\n", "/etc/mailgate/users")
    assert str(info.value).splitlines() == [
        "/etc/mailgate/users:2: user bob has no credentials",
        "/etc/mailgate/users:3: unknown credential form in field 1 after the user name (not "
        "shown: it may be a password); known: argon2, scram-sha-256, cram-md5, as mailgate "
        "passwd writes them",
        "/etc/mailgate/users:4: user name contains a colon, white space or a control character",
        "/etc/mailgate/users:5: user alice is listed twice",
    ]
    with pytest.raises(ValueError) as many:
        parse_users("\n".join(f"u{n}" for n in range(25)), "users")
    lines = str(many.value).splitlines()
    assert len(lines) == 21 and lines[-1] == "users: 5 more"


def test_error_never_quotes_a_stored_value() -> None:
    secret = "a" * 62 + "zz"
    with pytest.raises(ValueError) as info:
        parse_users(f"bob:cram-md5={secret}\n", "users")
    assert secret not in str(info.value)


@pytest.mark.parametrize(
    ("line", "field"),
    # what an administrator used to other servers writes: the password itself
    [("erin:MyS3cretPassw0rd", 1), ("erin:{PLAIN}MyS3cretPassw0rd", 1),
     ("erin:MyS3cret=Passw0rd", 1), (GOOD.replace("alice", "erin") + ":MyS3cretPassw0rd", 4)],
)
def test_a_password_where_a_credential_belongs_is_not_shown(line: str, field: int) -> None:
    with pytest.raises(ValueError) as info:
        parse_users(line + "\n", "users")
    message = str(info.value)
    assert f"unknown credential form in field {field} after the user name" in message, message
    assert "MyS3cret" not in message and "Passw0rd" not in message


@pytest.mark.parametrize("mode", [0o604, 0o620, 0o602, 0o666])
def test_load_refuses_open_modes(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "users"
    path.write_text(GOOD + "\n")
    os.chmod(path, mode)
    with pytest.raises(ValueError, match=f"{path}: .*chmod 600"):
        load_users(str(path))


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640])
def test_load_accepts_private_modes(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "users"
    path.write_text(GOOD + "\n")
    os.chmod(path, mode)
    assert list(load_users(str(path))) == ["alice"]


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothere: No such file"):
        load_users(str(tmp_path / "nothere"))


@pytest.mark.parametrize("size", [0, 1, 8, 55, 56, 63, 64, 65, 130])
def test_cram_state_gives_hmac_md5(size: int) -> None:
    key, message = os.urandom(size), os.urandom(size * 2 + 3)
    expected = hmac.new(key, message, "md5").digest()
    assert cram_digest(cram_state(key), message) == expected


@pytest.mark.skipif(shutil.which("doveadm") is None, reason="dovecot's doveadm not installed")
def test_cram_state_matches_dovecot() -> None:
    out = subprocess.run(
        ["doveadm", "pw", "-s", "CRAM-MD5", "-p", "tanstaaftanstaaf"],
        capture_output=True, text=True, check=True, timeout=10,
    ).stdout.strip()  # fmt: skip
    assert out == "{CRAM-MD5}" + cram_state(b"tanstaaftanstaaf").hex()
