"""End to end: what a password guesser meets (docs/authentication.md, "Throttling")."""

from __future__ import annotations

import base64
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.server import RunningServer, read_until, start_server, wait_for

PASSWORD = "correct horse battery staple"


def _passwd(users: Path, user: str, *flags: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "mailgate.cli", "passwd", user, "--users-file", str(users),
         "--stdin", *flags],
        input=PASSWORD + "\n", text=True, check=True, capture_output=True,
    )


def _auth_server(
    tmp_path: Path, users: Path, failure_delay: float, tls: str = ""
) -> RunningServer:
    """An untrusted client's server with AUTH (PLAIN without TLS too) for ``users``;
    ``tls``: a [tls] table, for STARTTLS."""
    return start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path / 'spool'}"
        [[listener]]
        address = "127.0.0.1:0"
        allow_plaintext_auth = true
        {tls}
        [auth]
        users_file = "{users}"
        failure_delay = {failure_delay}
        [policy]
        trusted_networks = []
        verify_sender_domain = false
        [delivery]
        maildir_root = "{tmp_path / 'maildir'}"
        system_users = false
        local_users = ["alice", "bob", "carol"]
    """)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    users = tmp_path / "users"
    _passwd(users, "alice")
    srv = _auth_server(tmp_path, users, failure_delay=0.2)
    yield srv
    srv.stop()


def _plain(user: str, password: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def _wrong_guess(srv: RunningServer, source: str) -> float:
    """Seconds a wrong password for alice took to be answered, from ``source``."""
    with smtplib.SMTP(srv.host, srv.port, timeout=20, source_address=(source, 0)) as smtp:
        smtp.ehlo("client.mailgate.org")
        start = time.monotonic()
        assert smtp.docmd("AUTH", _plain("alice", "guess"))[0] == 535
        return time.monotonic() - start


def test_guessing_one_user_from_many_addresses_slows_down(server: RunningServer) -> None:
    # three failures for alice from one address: delays of 0.2, 0.4 and 0.8 s
    for _ in range(3):
        _wrong_guess(server, "127.0.0.1")
    # a fresh address: its own count is 0, alice's is 3, the fourth waits 0.2 * 2**3
    assert _wrong_guess(server, "127.0.0.7") >= 1.5


def test_an_authenticated_user_may_not_send_bounces(server: RunningServer) -> None:
    with smtplib.SMTP(server.host, server.port, timeout=20) as smtp:
        smtp.ehlo("client.mailgate.org")
        assert smtp.docmd("AUTH", _plain("alice", PASSWORD))[0] == 235
        code, text = smtp.docmd("MAIL", "FROM:<>")
        assert (code, text[:5]) == (553, b"5.7.1")
        assert smtp.docmd("MAIL", "FROM:<alice@mx.mailgate.test>")[0] == 250


def test_commands_pipelined_behind_auth_plain_are_answered(server: RunningServer) -> None:
    # RFC 4954 4: AUTH PLAIN with its initial response may lead a pipelined group
    with socket.create_connection((server.host, server.port), timeout=20) as sock:
        sock.recv(4096)
        sock.sendall(b"EHLO client.mailgate.org\r\n")
        read_until(sock, b"\r\n250 ")  # the EHLO reply's last line
        sock.sendall(f"AUTH {_plain('alice', PASSWORD)}\r\nMAIL FROM:<alice@mx.mailgate.test>\r\n"
                     "RCPT TO:<bob@mx.mailgate.test>\r\nQUIT\r\n".encode())
        got = read_until(sock, b"221 ")
    assert [line[:3] for line in got.decode().splitlines()] == ["235", "250", "250", "221"]


def _submission(
    tmp_path: Path, server: str = "", auth: str = "", more: str = "",
    names: tuple[str, ...] = (),
) -> tuple[RunningServer, Path]:
    """A server with one submission listener (plaintext AUTH allowed) and a users file
    of mode 0600 with ``names`` (PASSWORD each); ``server``, ``auth``: more lines of
    those sections, ``more``: more sections.  The server and its users file."""
    users = tmp_path / "users"
    users.write_text("")
    users.chmod(0o600)
    for name in names:
        _passwd(users, name)
    srv = start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path / 'spool'}"
        {server}
        [[listener]]
        address = "127.0.0.1:0"
        role = "submission"
        allow_plaintext_auth = true
        [auth]
        users_file = "{users}"
        {auth}
        [delivery]
        maildir_root = "{tmp_path / 'maildir'}"
        {more}
    """)
    return srv, users


def test_mechanisms_follow_the_users_file_without_a_reload(tmp_path: Path) -> None:
    # nobody in the users file yet: submission must still require AUTH
    srv, users = _submission(tmp_path, auth="reload_interval = 0.2",
                             more='system_users = false\nlocal_users = ["alice"]\n'
                                  "[policy]\nverify_sender_domain = false")
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=20) as smtp:
            smtp.ehlo("client.mailgate.org")
            assert not smtp.has_extn("auth")
            code, text = smtp.docmd("MAIL", "FROM:<alice@mx.mailgate.test>")
            assert (code, text) == (530, b"5.7.0 Authentication required")
        _passwd(users, "alice", "--cram")
        time.sleep(0.5)
        with smtplib.SMTP(srv.host, srv.port, timeout=20) as smtp:
            smtp.ehlo("client.mailgate.org")
            assert "CRAM-MD5" in smtp.esmtp_features["auth"].split()
            _passwd(users, "alice")  # no CRAM-MD5 secret stored any more
            time.sleep(0.5)
            # this session was offered CRAM-MD5 before the change: refused, not a crash
            assert smtp.docmd("AUTH", "CRAM-MD5")[:1] == (504,)
            assert smtp.docmd("AUTH", _plain("alice", PASSWORD))[0] == 235
        with smtplib.SMTP(srv.host, srv.port, timeout=20) as smtp:
            smtp.ehlo("client.mailgate.org")
            assert "CRAM-MD5" not in smtp.esmtp_features["auth"].split()
    finally:
        srv.stop()


def test_a_reload_says_which_users_file_it_loaded(tmp_path: Path) -> None:
    # After fixing a refused users file, SIGHUP is how an administrator puts it in
    # force: the log must confirm it (docs/authentication.md), not only "reload ok".
    srv, users = _submission(tmp_path, auth="reload_interval = 0")
    try:
        _passwd(users, "alice")
        _passwd(users, "bob")
        srv.signal(signal.SIGHUP)
        assert wait_for(lambda: "event=reload outcome=ok" in srv.log())
        assert f"event=users_file outcome=loaded path={users} users=2" in srv.log()
    finally:
        srv.stop()


@pytest.mark.parametrize("ending", ["timeout", "connection lost"])
def test_an_exchange_cut_off_at_a_challenge_has_its_line(tmp_path: Path, ending: str) -> None:
    # It counted towards the address's failures when it began: without a line, the
    # throttle's 454 came sooner than the failures an operator could see.
    srv, _ = _submission(tmp_path, server="command_timeout = 1", names=("alice",))
    try:
        with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
            read_until(sock, b"220 ")
            sock.sendall(b"EHLO client.mailgate.org\r\n")
            read_until(sock, b"250 ")
            sock.sendall(b"AUTH LOGIN\r\n" + base64.b64encode(b"alice") + b"\r\n")
            read_until(sock, b"334 UGFzc3dvcmQ6")  # "Password:": the user name was taken
            if ending == "timeout":
                assert b"421 4.4.2" in read_until(sock, b"421 ")
        assert wait_for(lambda: "event=close" in srv.log())
        [line] = [x for x in srv.log().splitlines() if "event=auth" in x]
        assert f'outcome=aborted user=alice reason="{ending}"' in line or (
            f"outcome=aborted user=alice reason={ending}" in line), line
        assert "mechanism=LOGIN" in line
    finally:
        srv.stop()


def test_a_client_falling_back_from_cram_md5_is_not_locked_out(tmp_path: Path) -> None:
    # Python's smtplib (and aiosmtplib) try CRAM-MD5 first and fall back to PLAIN:
    # for a user without a CRAM-MD5 secret each login was one counted failure, and
    # the fifth login with the right password met 454.
    users = tmp_path / "users"
    _passwd(users, "alice", "--cram")  # someone has one: CRAM-MD5 is offered
    _passwd(users, "carol")
    srv = _auth_server(tmp_path, users, failure_delay=0.05)
    try:
        for _ in range(8):
            with smtplib.SMTP(srv.host, srv.port, timeout=20) as smtp:
                smtp.ehlo("client.mailgate.org")
                assert "CRAM-MD5" in smtp.esmtp_features["auth"]
                assert smtp.login("carol", PASSWORD)[0] == 235
        log = srv.log()
        assert log.count("mechanism=CRAM-MD5 outcome=failed") == 8
        assert "outcome=throttled" not in log  # (no 454, no 421)
    finally:
        srv.stop()


@pytest.mark.skipif(shutil.which("gsasl") is None, reason="gsasl is not installed")
def test_scram_with_the_user_as_authzid_from_gsasl(server: RunningServer) -> None:
    # GNU SASL (neomutt's SASL library) sends "n,a=alice,n=alice,...": scramp refused
    # any authzid, so such clients could not log in with SCRAM-SHA-256 at all
    def gsasl(*authzid: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["gsasl", "--smtp", "--no-starttls", "-m", "SCRAM-SHA-256", "-a", "alice",
             *authzid, "-p", PASSWORD, server.host, str(server.port)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )

    for authzid in (("-z", "alice"), ()):
        done = gsasl(*authzid)
        assert done.returncode == 0 and "221 " in done.stdout, (authzid, done.stdout)
    other = gsasl("-z", "bob")  # acting for another user: refused
    assert other.returncode != 0 and "535 5.7.8" in other.stdout + other.stderr


def test_a_second_login_after_starttls_takes_no_failure_back_again(tmp_path: Path) -> None:
    # The fallback failures a login takes back were taken back at each success, and
    # STARTTLS allows a second one (RFC 3207 forgets the first): one valid account
    # wiped the address's count of its guesses at others in every session.
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("mx.mailgate.test", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    users = tmp_path / "users"
    _passwd(users, "alice", "--cram")  # someone has one: CRAM-MD5 is offered
    _passwd(users, "carol")
    srv = _auth_server(tmp_path, users, failure_delay=0.01, tls=(
        f'[tls]\ncert = "{tmp_path / "cert.pem"}"\nkey = "{tmp_path / "key.pem"}"'
    ))
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    guesses = 0  # wrong passwords for alice answered 535, not 454

    def session() -> bool:
        """The attacker's session; whether it met the throttle (454)."""
        nonlocal guesses
        with smtplib.SMTP(srv.host, srv.port, timeout=20) as smtp:
            smtp.ehlo("client.mailgate.org")
            if smtp.docmd("AUTH", "CRAM-MD5")[0] == 454:
                return True
            # carol has no CRAM-MD5 secret: a fallback failure, taken back at her login
            assert smtp.docmd(base64.b64encode(b"carol " + b"0" * 32).decode())[0] == 535
            code = smtp.docmd("AUTH", _plain("alice", "guess"))[0]  # the real guess
            if code == 454:
                return True
            assert code == 535
            guesses += 1
            if smtp.docmd("AUTH", _plain("carol", PASSWORD))[0] == 454:
                return True
            smtp.starttls(context=client_tls)
            smtp.ehlo("client.mailgate.org")
            return smtp.docmd("AUTH", _plain("carol", PASSWORD))[0] == 454

    try:
        throttled = any(session() for _ in range(8))
        # the address's budget (5 failures) holds: the guesses at alice were counted
        assert throttled and guesses <= 5, guesses
    finally:
        srv.stop()
