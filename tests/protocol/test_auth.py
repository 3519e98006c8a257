"""The engine's side of AUTH (RFC 4954): entry checks, base64, cancel, the
challenge/response loop, and what happens to bytes pipelined behind it."""

from __future__ import annotations

import base64

from protocol_helpers import Session, codes, scripted

from mailgate.protocol import events as ev
from mailgate.protocol.connection import Connection
from mailgate.protocol.replies import reply

MECHS = ("PLAIN", "LOGIN", "CRAM-MD5")
JOE_SECRET = base64.b64encode(b"\0joe\0secret").decode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def login_flow(conn: Connection, event: ev.Event) -> None:
    """LOGIN as a server runs it: ask for the user, then the password, then judge."""
    if isinstance(event, ev.AuthStart):
        conn.auth_challenge(b"Username:")
    elif isinstance(event, ev.AuthResponse) and event.data == b"joe":
        conn.auth_challenge(b"Password:")
    elif isinstance(event, ev.AuthResponse):
        if event.data == b"secret":
            conn.auth_success("joe")
        else:
            conn.auth_failure(reply("auth.failed"))
    else:
        conn.accept()


def session(**settings: object) -> Session:
    settings.setdefault("auth_mechanisms", MECHS)
    settings.setdefault("allow_plaintext_auth", True)
    s = Session(**settings)
    s.ehlo()
    return s


def test_plain_with_initial_response() -> None:
    s = session()
    assert codes(s.send(f"AUTH PLAIN {JOE_SECRET}\r\n")) == ["235 2.7.0"]
    assert s.of(ev.AuthStart) == [ev.AuthStart("PLAIN", b"\0joe\0secret")]
    assert s.conn.authenticated == "user"


def test_mechanism_name_is_case_insensitive_and_equals_means_empty() -> None:
    s = session()
    s.send("auth plain =\r\n")
    assert s.of(ev.AuthStart) == [ev.AuthStart("PLAIN", b"")]


def test_challenge_response_flow() -> None:
    s = session(decide=login_flow)
    assert s.send("AUTH LOGIN\r\n") == [f"334 {b64(b'Username:')}"]
    assert s.send(b64(b"joe") + "\r\n") == [f"334 {b64(b'Password:')}"]
    assert codes(s.send(b64(b"secret") + "\r\n")) == ["235 2.7.0"]
    assert s.conn.authenticated == "joe"
    assert [e.data for e in s.of(ev.AuthResponse)] == [b"joe", b"secret"]


def test_failed_auth_can_be_retried() -> None:
    s = session(decide=login_flow)
    s.send("AUTH LOGIN\r\n")
    s.send(b64(b"joe") + "\r\n")
    assert codes(s.send(b64(b"wrong") + "\r\n")) == ["535 5.7.8"]
    assert s.conn.authenticated is None
    s.send("AUTH LOGIN\r\n")
    s.send(b64(b"joe") + "\r\n")
    assert codes(s.send(b64(b"secret") + "\r\n")) == ["235 2.7.0"]


def test_auth_failure_can_close() -> None:
    def close(conn: Connection, event: ev.Event) -> None:
        conn.auth_failure(reply("closing.auth_throttled", host="mx"), close=True)

    s = session(decide=scripted(AuthStart=close))
    assert codes(s.send("AUTH PLAIN =\r\nNOOP\r\n")) == ["421 4.7.0"]
    assert s.conn.closed


def test_unknown_mechanism_is_504() -> None:
    s = session()
    assert codes(s.send("AUTH KERBEROS_V4\r\n")) == ["504 5.5.4"]
    assert not s.of(ev.AuthStart)


def test_plaintext_mechanism_without_tls_is_538() -> None:
    s = session(allow_plaintext_auth=False)
    assert codes(s.send("AUTH PLAIN =\r\n")) == ["538 5.7.11"]
    assert codes(s.send("AUTH LOGIN\r\n")) == ["538 5.7.11"]
    assert codes(s.send("AUTH CRAM-MD5\r\n")) == ["334"]  # not a plaintext mechanism


def test_auth_needs_ehlo() -> None:
    s = Session(auth_mechanisms=MECHS, allow_plaintext_auth=True)
    assert codes(s.send("AUTH PLAIN =\r\n")) == ["503 5.5.1"]
    s.send("HELO c.example\r\n")
    assert codes(s.send("AUTH PLAIN =\r\n")) == ["503 5.5.1"]


def test_already_authenticated_is_503() -> None:
    s = session()
    s.send("AUTH PLAIN =\r\n")
    assert codes(s.send("AUTH PLAIN =\r\n")) == ["503 5.5.1"]


def test_auth_inside_a_transaction_is_503() -> None:
    s = session()
    s.send("MAIL FROM:<a@example.net>\r\n")
    assert codes(s.send("AUTH PLAIN =\r\n")) == ["503 5.5.1"]


def test_bad_base64_is_501_5_5_2() -> None:
    s = session(decide=login_flow)
    assert codes(s.send("AUTH PLAIN ***\r\n")) == ["501 5.5.2"]
    assert codes(s.send("AUTH PLAIN AAA\r\n")) == ["501 5.5.2"]  # bad padding
    s.send("AUTH LOGIN\r\n")
    assert codes(s.send("not base64!\r\n")) == ["501 5.5.2"]
    assert len(s.of(ev.AuthAborted)) == 1
    assert codes(s.send("NOOP\r\n")) == ["250 2.0.0"]  # back to commands


def test_star_cancels() -> None:
    # RFC 4954 4: 501; the security subject, as the other AUTH 501 (was 5.0.0)
    s = session(decide=login_flow)
    assert codes(s.send("AUTH PLAIN *\r\n")) == ["501 5.7.0"]
    s.send("AUTH LOGIN\r\n")
    assert codes(s.send("*\r\n")) == ["501 5.7.0"]
    aborted = s.of(ev.AuthAborted)
    assert len(aborted) == 1 and aborted[0].reply.enhanced == "5.7.0"
    assert s.conn.authenticated is None


def test_a_refused_line_inside_the_exchange_aborts_it() -> None:
    s = session(decide=login_flow)
    s.send("AUTH LOGIN\r\n")
    assert codes(s.send(b"am9l\n")) == ["500 5.5.2"]
    assert s.of(ev.AuthAborted)[0].reply.code == 500
    assert codes(s.send("NOOP\r\n")) == ["250 2.0.0"]


def test_empty_response_line_is_empty_data() -> None:
    s = session(decide=login_flow)
    s.send("AUTH LOGIN\r\n")
    s.send("\r\n")
    assert s.of(ev.AuthResponse)[0].data == b""


def test_commands_pipelined_after_a_one_step_auth_are_answered() -> None:
    # RFC 4954 4: AUTH with an initial response that completes the exchange (PLAIN)
    # may be followed by more commands in the group; each gets its reply (RFC 5321 4.2).
    s = session()
    out = s.send(f"AUTH PLAIN {JOE_SECRET}\r\nMAIL FROM:<a@example.net>\r\n"
                 "RCPT TO:<b@example.org>\r\n")
    assert codes(out) == ["235 2.7.0", "250 2.1.0", "250 2.1.5"]
    assert s.conn.authenticated == "user"


def test_an_initial_response_to_a_server_first_mechanism_is_501_5_7_0() -> None:
    # RFC 4954 4: CRAM-MD5 begins with the server's challenge
    s = session(auth_mechanisms=("CRAM-MD5", "PLAIN"))
    for arg in ("am9lIDEyMzQ=", "="):
        assert s.send(f"AUTH CRAM-MD5 {arg}\r\n") == [
            "501 5.7.0 CRAM-MD5 takes no initial response"
        ]
    assert not s.of(ev.AuthStart)


def test_response_lines_are_strict_base64() -> None:
    # RFC 4954 4: reject, not ignore, characters outside the alphabet; "=" is the
    # empty response only as the AUTH command's argument
    for line in (" " + b64(b"joe") + " ", b64(b"joe") + "\t", "="):
        s = session(decide=login_flow)
        s.send("AUTH LOGIN\r\n")
        assert codes(s.send(line + "\r\n")) == ["501 5.5.2"], line
        assert not s.of(ev.AuthResponse)


def test_an_over_long_sasl_line_is_500_5_5_6() -> None:
    s = session(decide=login_flow)
    s.send("AUTH LOGIN\r\n")
    assert s.send("A" * 13000 + "\r\n") == ["500 5.5.6 Authentication exchange line is too long"]
    assert codes(s.send("AUTH PLAIN " + "A" * 13000 + "\r\n")) == ["500 5.5.6"]
    # split over several reads, the line is refused as a SASL line all the same
    s.send("AUTH LOGIN\r\n")
    assert s.send("A" * 13000) == []
    assert codes(s.send("A" * 100 + "\r\n")) == ["500 5.5.6"]
    assert codes(s.send("NOOP\r\n")) == ["250 2.0.0"]


def test_require_auth_and_require_tls() -> None:
    s = session(require_auth=True)
    assert codes(s.send("MAIL FROM:<a@example.net>\r\n")) == ["530 5.7.0"]
    s.send("AUTH PLAIN =\r\n")
    assert codes(s.send("MAIL FROM:<a@example.net>\r\n")) == ["250 2.1.0"]
    s = session(require_tls=True, starttls=True)
    assert codes(s.send("AUTH PLAIN =\r\n")) == ["530 5.7.0"]


def test_auth_arguments() -> None:
    s = session()
    assert codes(s.send("AUTH\r\n")) == ["501 5.5.2"]
    assert codes(s.send("AUTH PLAIN a b\r\n")) == ["501 5.5.2"]


def test_tls_forgets_authentication() -> None:
    s = session(starttls=True)
    s.send("AUTH PLAIN =\r\n")
    assert s.conn.authenticated
    s.send("STARTTLS\r\n")
    assert s.conn.authenticated is None
