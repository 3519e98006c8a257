"""`mailgate passwd`: adding and changing users, file mode, no plaintext, no echo."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import stat
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from auth_helpers import CHEAP

from mailgate.auth.passwd import passwd_command
from mailgate.auth.users import load_users
from mailgate.config.auth import AuthConfig


def run_passwd(
    monkeypatch: pytest.MonkeyPatch, path: Path, user: str, password: str, cram: bool = False
) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
    return passwd_command(str(path), user, cram=cram, stdin_password=True, hasher=CHEAP)


def verify(path: Path, user: str, password: str) -> bool:
    import asyncio

    from mailgate.auth.factory import build_authenticator

    auth = build_authenticator(AuthConfig(users_file=str(path)))
    assert auth is not None
    outcome = asyncio.run(auth.start("PLAIN", "127.0.0.1").step(f"\0{user}\0{password}".encode()))
    return type(outcome).__name__ == "Success"


def test_creates_the_file_0600_without_plaintext(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "users"
    assert run_passwd(monkeypatch, path, "alice", "s3cret passphrase") == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert "s3cret" not in text and b"s3cret".hex() not in text
    assert "cram-md5=" not in text  # only with --cram
    assert verify(path, "alice", "s3cret passphrase")
    assert "added user alice" in capsys.readouterr().err
    # no temporary file left; the lock that serializes runs stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users", "users.lock"]


def test_changes_a_password_in_place(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "users"
    run_passwd(monkeypatch, path, "alice", "first")
    run_passwd(monkeypatch, path, "bob", "bobpw")
    with path.open("r+") as f:
        content = f.read()
        f.seek(0)
        f.write("# the users\n" + content)
    assert run_passwd(monkeypatch, path, "alice", "second", cram=True) == 0
    lines = path.read_text().splitlines()
    assert lines[0] == "# the users"
    assert [line.split(":")[0] for line in lines[1:]] == ["alice", "bob"]
    assert "cram-md5=" in lines[1] and "cram-md5=" not in lines[2]
    assert verify(path, "alice", "second") and not verify(path, "alice", "first")
    assert verify(path, "bob", "bobpw")


def test_keeps_the_owner_and_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "users"
    run_passwd(monkeypatch, path, "alice", "first")
    inode = path.stat().st_ino
    run_passwd(monkeypatch, path, "alice", "second")
    assert path.stat().st_ino != inode  # replaced by rename, never rewritten in place
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_uid == os.getuid()


@pytest.mark.parametrize(
    ("user", "password", "message"),
    [
        ("bad user", "pw", "white space"),
        ("a:b", "pw", "colon"),
        ("alice", "", "empty password"),
        ("alice", "bad\x07bell", "password not allowed"),
    ],
)
def test_refusals(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    user: str,
    password: str,
    message: str,
) -> None:
    path = tmp_path / "users"
    assert run_passwd(monkeypatch, path, user, password) == 1
    assert message in capsys.readouterr().err
    assert not path.exists()


def test_refuses_to_rewrite_a_broken_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "users"
    path.write_text("# ok\nbroken line\n")
    os.chmod(path, 0o600)
    assert run_passwd(monkeypatch, path, "alice", "pw") == 1
    assert f"{path}:2: user name contains" in capsys.readouterr().err
    assert path.read_text() == "# ok\nbroken line\n"


def _passwd_on_a_terminal(path: Path, answers: list[str]) -> tuple[int, str]:
    """Run passwd in a child whose controlling terminal is a pty we type into."""
    master, slave = pty.openpty()
    code = (
        "import sys; from argon2 import PasswordHasher;"
        "from mailgate.auth.passwd import passwd_command;"
        f"sys.exit(passwd_command({str(path)!r}, 'alice',"
        " hasher=PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)))"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=slave, stdout=slave, stderr=slave,
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        cwd=Path(__file__).parents[2],
    )  # fmt: skip
    os.close(slave)
    seen = b""
    answered_up_to = 0  # answer each prompt once, not again when more output follows it
    pending = list(answers)
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 20)
            if not ready:
                break
            try:
                chunk = os.read(master, 1024)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
            if pending and seen[answered_up_to:].rstrip().endswith(b"password:"):
                answered_up_to = len(seen)
                os.write(master, pending.pop(0).encode() + b"\n")
    finally:
        os.close(master)
    return child.wait(timeout=20), seen.decode(errors="replace")


def test_terminal_prompt_does_not_echo(tmp_path: Path) -> None:
    path = tmp_path / "users"
    status, screen = _passwd_on_a_terminal(path, ["tty secret", "tty secret"])
    assert status == 0, screen
    assert "New password:" in screen and "Repeat password:" in screen
    assert "tty secret" not in screen
    assert verify(path, "alice", "tty secret")


def test_terminal_confirmation_must_match(tmp_path: Path) -> None:
    path = tmp_path / "users"
    status, screen = _passwd_on_a_terminal(path, ["one secret", "another"])
    assert status == 1 and "the passwords differ" in screen
    assert not path.exists()


def test_loaded_file_has_the_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "users"
    run_passwd(monkeypatch, path, "alice", "pw", cram=True)
    alice = load_users(str(path))["alice"]
    assert alice.argon2 and alice.scram and alice.cram


def test_a_missing_directory_is_refused_plainly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "no-such-dir" / "users"
    assert run_passwd(monkeypatch, path, "alice", "pw") == 1
    err = capsys.readouterr().err
    assert err == (
        f"mailgate passwd: {path}: cannot write in {path.parent}: No such file or directory\n"
    )


def test_without_a_terminal_or_stdin_it_says_to_use_stdin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # getpass would fall back to echoing what it reads, with a warning
    monkeypatch.setattr(sys, "stdin", io.StringIO("pw\npw\n"))
    assert passwd_command(str(tmp_path / "users"), "alice", hasher=CHEAP) == 1
    err = capsys.readouterr().err
    assert "standard input is not a terminal: give the password with --stdin" in err
    assert not (tmp_path / "users").exists()


def test_a_group_readable_file_stays_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # root:mailgate 0640 as docs/deployment.md installs it: 0600 would lock the server out
    path = tmp_path / "users"
    assert run_passwd(monkeypatch, path, "alice", "first") == 0
    path.chmod(0o640)
    assert run_passwd(monkeypatch, path, "bob", "second") == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert verify(path, "alice", "first") and verify(path, "bob", "second")


def test_runs_at_the_same_time_lose_no_user(tmp_path: Path) -> None:
    path = tmp_path / "users"
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "mailgate.cli", "passwd", f"user{n}", "--users-file",
             str(path), "--stdin"],
            stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for n in range(6)
    ]
    for run in runs:
        run.communicate("pw\n", timeout=60)
        assert run.returncode == 0
    names = {line.split(":", 1)[0] for line in path.read_text().splitlines()}
    assert names == {f"user{n}" for n in range(6)}



@pytest.mark.skipif(os.geteuid() != 0, reason="the new file's group is set only as root")
def test_a_new_file_made_by_root_is_readable_by_the_servers_group(tmp_path: Path) -> None:
    # Made root:root 0600, the users file locked out the server once it dropped its
    # privileges to server.user.  With --config the server's group reads it.
    import grp

    group = grp.getgrnam("nogroup")
    path = tmp_path / "users"
    config = tmp_path / "mailgate.toml"
    config.write_text(f'[server]\nuser = "nobody"\ngroup = "nogroup"\n\n'
                      f'[auth]\nusers_file = "{path}"\n')

    def passwd(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "mailgate.cli", "passwd", "alice", "--stdin", *args],
            input="pw\n", capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stderr

    assert "note:" not in passwd("--config", str(config))
    info = path.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, group.gr_gid, 0o640)
    assert "note:" not in passwd("--config", str(config))  # an existing file: kept as it is
    assert stat.S_IMODE(path.stat().st_mode) == 0o640

    other = tmp_path / "users2"
    note = passwd("--users-file", str(other))  # no config: no group to give it
    assert stat.S_IMODE(other.stat().st_mode) == 0o600
    assert "cannot read it" in note and f"chown root:GROUP {other}" in note
