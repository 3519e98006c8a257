"""upas's slow-downs over the wire: the HELO delay (-D), the growing delay per refusal
(9front's tarpit) and the AUTH failure throttle.  The assertions are lower bounds on
deliberate delays (the feature itself), never speed targets."""

from __future__ import annotations

import base64
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.server import RunningServer, start_server, wait_for

WRONG = base64.b64encode(b"\0alice\0wrong password").decode()


def _users_file(tmp_path: Path) -> Path:
    """A users file with alice, made by `mailgate passwd`."""
    users = tmp_path / "users"
    subprocess.run(
        [sys.executable, "-m", "mailgate.cli", "passwd", "alice", "--users-file", str(users),
         "--stdin"],
        input="right password\n", text=True, check=True, capture_output=True,
    )
    return users


def auth_server(tmp_path: Path, extra: str = "") -> RunningServer:
    """AUTH for alice on a plaintext listener (extra_ports[0]), throttled after two
    failures and cut off after three."""
    users = _users_file(tmp_path)
    return start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path}/spool"
        max_errors = 50
        {extra}

        [[listener]]
        address = "127.0.0.1:0"
        allow_plaintext_auth = true

        [auth]
        users_file = "{users}"
        throttle_after = 2
        throttle_close_after = 3
        failure_delay = 0.05
        failure_max_delay = 0.1
    """)


def auth_once(srv: RunningServer) -> int:
    """One AUTH with the wrong password on a new connection; the reply code."""
    with smtplib.SMTP(srv.host, srv.extra_ports[0], timeout=10) as smtp:
        smtp.ehlo("client.mailgate.org")
        return smtp.docmd("AUTH", f"PLAIN {WRONG}")[0]


def slowed_server(tmp_path: Path, server: str) -> RunningServer:
    """A server whose loopback clients are untrusted, with these [server] lines."""
    return start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path}/spool"
        {server}

        [policy]
        trusted_networks = []
        verify_sender_domain = false
    """)


def test_helo_delay_and_growing_tarpit(tmp_path: Path) -> None:
    srv = slowed_server(tmp_path, "helo_delay = 0.4\ntarpit_delay = 0.2\ntarpit_max_delay = 0.4")
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            started = time.monotonic()
            assert smtp.ehlo("client.mailgate.org")[0] == 250
            assert time.monotonic() - started >= 0.4
            smtp.docmd("MAIL", "FROM:<a@client.mailgate.org>")
            started = time.monotonic()
            # 0.2 + 0.4 + 0.4 (capped), each after its refusal has left (as 9front:
            # the next command waits), so the third holds up the NOOP
            for _ in range(3):
                assert smtp.docmd("RCPT", "TO:<nobody-at-all@localhost>")[0] == 550
            assert smtp.noop()[0] == 250
            assert time.monotonic() - started >= 1.0
        assert "errors=3" in srv.log()
    finally:
        srv.stop()


def test_the_helo_delay_is_for_port_25_not_for_mail_programs(tmp_path: Path) -> None:
    users = _users_file(tmp_path)
    srv = start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path}/spool"
        helo_delay = 3

        [[listener]]
        address = "127.0.0.1:0"

        [[listener]]
        address = "127.0.0.1:0"
        role = "submission"
        allow_plaintext_auth = true

        [auth]
        users_file = "{users}"

        [policy]
        trusted_networks = []
    """)
    try:
        submission = srv.extra_ports[-1]  # (the ports in the file's order)
        with smtplib.SMTP(srv.host, submission, timeout=10) as smtp:
            started = time.monotonic()
            assert smtp.ehlo("DESKTOP-ABC123")[0] == 250  # (no dot: fine here)
            assert time.monotonic() - started < 2.5
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            started = time.monotonic()
            assert smtp.ehlo("client.mailgate.org")[0] == 250
            assert time.monotonic() - started >= 3  # the public listener's delay
    finally:
        srv.stop()


def test_auth_failures_are_throttled_then_cut_off(tmp_path: Path) -> None:
    srv = auth_server(tmp_path)
    try:
        with smtplib.SMTP(srv.host, srv.extra_ports[0], timeout=10) as smtp:
            smtp.ehlo("client.mailgate.org")
            codes = [smtp.docmd("AUTH", f"PLAIN {WRONG}") for _ in range(3)]
            assert [c for c, _ in codes[:2]] == [535, 535]
            assert codes[2][0] == 454 and codes[2][1].startswith(b"4.7.0")
            code, text = smtp.docmd("AUTH", f"PLAIN {WRONG}")
            assert (code, text[:5]) == (421, b"4.7.0")
        log = srv.log()
        assert "wrong password" not in log and WRONG not in log
        # the session's line names the user tried and why it failed (one line, with
        # its sid: the auth module's own free-text line is gone)
        failed = [line for line in log.splitlines() if "event=auth " in line]
        assert "user=alice" in failed[0] and "reason=auth.failed" in failed[0]
        assert "sid=" in failed[0] and "logger=mailgate.auth" not in log
    finally:
        srv.stop()


def test_a_reload_does_not_reset_the_auth_failure_counts(tmp_path: Path) -> None:
    srv = auth_server(tmp_path)
    try:
        assert [auth_once(srv), auth_once(srv)] == [535, 535]
        srv.signal(signal.SIGHUP)
        assert wait_for(lambda: "event=reload outcome=ok" in srv.log())
        assert auth_once(srv) == 454
    finally:
        srv.stop()


def test_worker_processes_throttle_a_guesser_together(tmp_path: Path) -> None:
    # Each failure on a new connection, which either worker may accept: counted per
    # worker, five connections would leave one worker with at most two failures.
    srv = auth_server(tmp_path, "workers = 2")
    try:
        assert wait_for(lambda: srv.log().count("event=worker_started") == 2)
        codes = [auth_once(srv) for _ in range(5)]
        assert codes[:2] == [535, 535]
        assert codes[2:] == [454, 421, 421]
    finally:
        srv.stop()


def _read_replies(sock: socket.socket, count: int = 1) -> list[bytes]:
    """The next ``count`` whole replies (their lines joined), however they arrive."""
    data = b""
    while len(re.findall(rb"(?m)^\d{3} [^\r\n]*\r\n", data)) < count:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return re.findall(rb"(?:\d{3}-[^\r\n]*\r\n)*\d{3} [^\r\n]*\r\n", data)


def test_a_client_that_talks_before_the_greeting_is_refused_at_mail(tmp_path: Path) -> None:
    srv = slowed_server(tmp_path, "greet_pause = 0.5")
    try:
        # The bot: EHLO at once, without waiting for the 220.
        with socket.create_connection((srv.host, srv.port), timeout=10) as bot:
            started = time.monotonic()
            bot.sendall(b"EHLO bot.mailgate.org\r\n")
            greeting, ehlo = _read_replies(bot, 2)
            assert time.monotonic() - started >= 0.5
            assert greeting.startswith(b"220 ")
            assert ehlo.startswith(b"250-")  # what it sent is still read and answered
            bot.sendall(b"MAIL FROM:<a@client.mailgate.org>\r\n")
            assert _read_replies(bot) == [
                b"550 5.5.1 Protocol error: 127.0.0.1 talked before the greeting\r\n"
            ]
        # A real mail server waits for the greeting and is served.
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            smtp.ehlo("client.mailgate.org")
            smtp.sendmail("a@client.mailgate.org", ["root@localhost"], b"Subject: x\r\n\r\nhi\r\n")
        assert len(srv.messages("root")) == 1
        log = srv.log()
        assert "event=pregreet" in log and "octets=23" in log and "reason=talked_first" in log
    finally:
        srv.stop()


def _pausing_30_s(tmp_path: Path, server: str = "") -> RunningServer:
    """A server that holds its greeting back 30 s from every client (none trusted)."""
    return start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path}/spool"
        greet_pause = 30
        {server}

        [policy]
        trusted_networks = []
    """)


def test_a_client_that_hangs_up_during_the_greet_pause_is_let_go(tmp_path: Path) -> None:
    # The pause is 30 s; a client gone after a moment must not hold its session (and
    # its place in the connection limits) for the rest of it.
    srv = _pausing_30_s(tmp_path)
    try:
        with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
            assert wait_for(lambda: "event=connect" in srv.log())
            sock.sendall(b"EHLO bot.mailgate.org\r\n")
        assert wait_for(lambda: "event=close" in srv.log())  # well before the 30 s
    finally:
        srv.stop()


def test_a_half_close_during_the_greet_pause_is_no_way_round_the_pregreet_refusal(
    tmp_path: Path,
) -> None:
    # The bot sends its whole transaction at once and half-closes: the pause ends
    # at the EOF (it has nothing more to send), but it talked first all the same.
    srv = _pausing_30_s(tmp_path, "")
    try:
        with socket.create_connection((srv.host, srv.port), timeout=10) as bot:
            started = time.monotonic()
            bot.sendall(b"EHLO bot.mailgate.org\r\nMAIL FROM:<a@client.mailgate.org>\r\n"
                        b"QUIT\r\n")
            bot.shutdown(socket.SHUT_WR)
            greeting, ehlo, mail, bye = _read_replies(bot, 4)
            assert time.monotonic() - started < 20  # not after the 30 s pause
            assert greeting.startswith(b"220 ") and ehlo.startswith(b"250-")
            assert mail.startswith(b"550 5.5.1 Protocol error")
            assert bye.startswith(b"221 2.0.0")
        assert "event=pregreet" in srv.log()
    finally:
        srv.stop()


def test_a_shutdown_during_the_greet_pause_answers_421_at_once(tmp_path: Path) -> None:
    srv = _pausing_30_s(tmp_path, "shutdown_grace = 0")
    try:
        with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
            assert wait_for(lambda: "event=connect" in srv.log())
            started = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            assert _read_replies(sock) == [b"421 4.3.2 mx.mailgate.test shutting down\r\n"]
            assert time.monotonic() - started < 10  # not after the 30 s pause
        assert srv.proc.wait(10) == 0
    finally:
        srv.stop()


def test_trusted_clients_are_greeted_at_once(tmp_path: Path) -> None:
    srv = start_server(tmp_path, f'[server]\nspool_dir = "{tmp_path}/spool"\ngreet_pause = 5\n')
    try:
        with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
            started = time.monotonic()
            [greeting] = _read_replies(sock)
            assert greeting.startswith(b"220 ")
            assert time.monotonic() - started < 4  # 127.0.0.1 is trusted by default
    finally:
        srv.stop()


def test_a_refusal_leaves_before_its_tarpit_delay(tmp_path: Path) -> None:
    # A pipelined group (MAIL refused, then RCPTs): the refusal was held in the output
    # until every delay of the group had passed, minutes with a few recipients.
    srv = slowed_server(tmp_path, "tarpit_delay = 3\ntarpit_max_delay = 3")
    try:
        with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
            sock.recv(1024)
            sock.sendall(b"EHLO client.mailgate.org\r\n")
            time.sleep(0.3)
            sock.recv(4096)
            started = time.monotonic()
            sock.sendall(b"MAIL FROM:<a@client.mailgate.org>\r\nRCPT TO:<nobody-x@localhost>\r\n"
                         b"RCPT TO:<nobody-y@localhost>\r\n")
            got = b""
            while b"550" not in got:
                got += sock.recv(4096)
            assert time.monotonic() - started < 2.5  # the first refusal, before its 3 s delay
    finally:
        srv.stop()


def test_a_refused_vrfy_is_logged_and_slowed_as_other_refusals(tmp_path: Path) -> None:
    # It counts towards max_errors: a client probing for addresses with VRFY went
    # without a log line and without the tarpit.
    srv = slowed_server(tmp_path, "vrfy = true\ntarpit_delay = 1\ntarpit_max_delay = 1")
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            smtp.ehlo("client.mailgate.org")
            assert smtp.verify("nobody-by-this-name")[:1] == (550,)
            started = time.monotonic()
            assert smtp.noop()[0] == 250
            assert time.monotonic() - started >= 0.9  # held up by the refusal's delay
        [line] = [x for x in srv.log().splitlines() if "event=refused" in x]
        assert "command=VRFY code=550 enhanced=5.1.1" in line
    finally:
        srv.stop()


def test_a_client_that_hangs_up_is_not_held_in_its_tarpit(tmp_path: Path) -> None:
    # The delay slept on after the client had gone, holding its connection slot (here
    # the only one its address has) for up to tarpit_max_delay.
    srv = slowed_server(tmp_path, "tarpit_delay = 30\nmax_connections_per_ip = 1")
    try:
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            smtp.ehlo("client.mailgate.org")
            smtp.docmd("MAIL", "FROM:<a@client.mailgate.org>")
            assert smtp.docmd("RCPT", "TO:<nobody-x@localhost>")[0] == 550
            smtp.sock.close()  # gone, in the middle of its 30 s delay
        assert wait_for(lambda: "event=close" in srv.log(), timeout=10)
        with smtplib.SMTP(srv.host, srv.port, timeout=10) as smtp:
            assert smtp.noop()[0] == 250
    finally:
        srv.stop()


def test_a_half_close_is_no_way_round_the_tarpit(tmp_path: Path) -> None:
    # Pipelined guesses and shutdown(SHUT_WR): every verdict came back at once.
    srv = slowed_server(tmp_path, "tarpit_delay = 1\ntarpit_max_delay = 1")
    try:
        with socket.create_connection((srv.host, srv.port), timeout=20) as sock:
            started = time.monotonic()
            sock.sendall(b"EHLO client.mailgate.org\r\nMAIL FROM:<a@client.mailgate.org>\r\n"
                         b"RCPT TO:<nobody-1@localhost>\r\nRCPT TO:<nobody-2@localhost>\r\n"
                         b"QUIT\r\n")
            sock.shutdown(socket.SHUT_WR)
            replies = _read_replies(sock, 6)
            assert [r[:3] for r in replies] == [b"220", b"250", b"250", b"550", b"550", b"221"]
            assert time.monotonic() - started >= 2  # the two refusals' delays
    finally:
        srv.stop()
