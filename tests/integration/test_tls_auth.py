"""End to end: STARTTLS, implicit TLS, submission with AUTH, authenticated relay."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import scramp
import trustme

from tests.integration.server import RunningServer, read_until, start_server, wait_for

HOST = "mx.mailgate.test"
PASSWORD = "correct horse battery staple"
MESSAGE = b"From: alice@mx.mailgate.test\r\nSubject: tls\r\n\r\nsecret body\r\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _pki(tmp: Path, ca: trustme.CA) -> tuple[Path, Path]:
    cert = ca.issue_cert(HOST, "127.0.0.1")
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def _users(tmp: Path) -> Path:
    users = tmp / "users"
    for user in ("alice", "bob"):
        subprocess.run(
            [sys.executable, "-m", "mailgate.cli", "passwd", user, "--users-file", str(users),
             "--stdin", "--cram"],
            input=PASSWORD + "\n", text=True, check=True, capture_output=True,
        )
    return users


def _client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


class Sink:
    """A real SMTP server (aiosmtpd) standing in for the smarthost, recording mail."""

    def __init__(self, tmp: Path, ca: trustme.CA) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[tuple[str, list[str], bytes]] = []
        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                sink.messages.append(
                    (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
                )
                return "250 2.0.0 stored by sink"

        cert = ca.issue_cert("localhost", "127.0.0.1")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        with socket.socket() as probe:  # aiosmtpd's Controller needs a concrete port
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port,
                                     tls_context=ctx, require_starttls=True)
        self.controller.start()
        self.cafile = tmp / "sink-ca.pem"
        ca.cert_pem.write_to_path(str(self.cafile))

    def stop(self) -> None:
        self.controller.stop()


@pytest.fixture
def sink(tmp_path: Path, ca: trustme.CA) -> Iterator[Sink]:
    s = Sink(tmp_path, ca)
    yield s
    s.stop()


@pytest.fixture
def tls_server(tmp_path: Path, ca: trustme.CA, sink: Sink) -> Iterator[RunningServer]:
    cert, key = _pki(tmp_path, ca)
    users = _users(tmp_path)
    config = f"""
        [server]
        spool_dir = "{tmp_path / 'spool'}"

        [[listener]]
        address = "127.0.0.1:0"
        role = "public"

        [[listener]]
        address = "127.0.0.1:0"
        role = "submission"
        require_tls = true

        [[listener]]
        address = "127.0.0.1:0"
        role = "smtps"

        [tls]
        cert = "{cert}"
        key = "{key}"

        [auth]
        users_file = "{users}"

        [policy]
        trusted_networks = []
        verify_sender_domain = false

        [delivery]
        maildir_root = "{tmp_path / 'maildir'}"
        local_users = ["alice", "bob"]
        relay = "outbound"

        [delivery.destinations.outbound.smtp]
        host = "127.0.0.1"
        port = {sink.port}
        cafile = "{sink.cafile}"
    """
    srv = start_server(tmp_path, config)
    yield srv
    srv.stop()


def _ports(srv: RunningServer) -> tuple[int, int, int]:
    public, submission, smtps = srv.extra_ports[:3]
    return public, submission, smtps


def test_starttls_resets_session_and_is_not_advertised_again(
    tls_server: RunningServer, ca: trustme.CA
) -> None:
    public, _, _ = _ports(tls_server)
    with smtplib.SMTP("127.0.0.1", public, timeout=10) as smtp:
        smtp.ehlo("client.mailgate.org")
        assert smtp.has_extn("starttls")
        assert "PLAIN" not in smtp.esmtp_features.get("auth", "")
        code, text = smtp.starttls(context=_client_context(ca))
        assert (code, text) == (220, b"2.0.0 Ready to start TLS")
        # RFC 3207 4.2: the session is reset; a new EHLO is needed.
        assert smtp.docmd("MAIL", "FROM:<alice@mx.mailgate.test>")[0] == 503
        smtp.ehlo("client.mailgate.org")
        assert not smtp.has_extn("starttls")
        assert "PLAIN" in smtp.esmtp_features["auth"]
        smtp.sendmail("carol@client.mailgate.org", ["alice@mx.mailgate.test"], MESSAGE)
    [stored] = tls_server.messages("alice")
    assert b"with ESMTPS" in stored and b"TLSv1." in stored


def test_plain_auth_refused_without_tls(tls_server: RunningServer) -> None:
    public, _, _ = _ports(tls_server)
    with smtplib.SMTP("127.0.0.1", public, timeout=10) as smtp:
        smtp.ehlo("client.mailgate.org")
        blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
        assert smtp.docmd("AUTH", f"PLAIN {blob}")[:1] == (538,)
        assert smtp.docmd("AUTH", f"PLAIN {blob}")[1].startswith(b"5.7.11")


def test_submission_requires_tls_then_auth(tls_server: RunningServer, ca: trustme.CA) -> None:
    _, submission, _ = _ports(tls_server)
    with smtplib.SMTP("127.0.0.1", submission, timeout=10) as smtp:
        smtp.ehlo("client.mailgate.org")
        assert smtp.docmd("MAIL", "FROM:<alice@mx.mailgate.test>")[:1] == (530,)
        smtp.starttls(context=_client_context(ca))
        smtp.ehlo("client.mailgate.org")
        code, text = smtp.docmd("MAIL", "FROM:<alice@mx.mailgate.test>")
        assert (code, text) == (530, b"5.7.0 Authentication required")
        with pytest.raises(smtplib.SMTPAuthenticationError) as bad:
            smtp.login("alice", "wrong password")
        assert bad.value.smtp_code == 535 and bad.value.smtp_error.startswith(b"5.7.8")
        assert smtp.login("alice", PASSWORD)[0] == 235
        code, text = smtp.docmd("AUTH", "PLAIN")
        assert (code, text[:5]) == (503, b"5.5.1")


def test_auth_errors(tls_server: RunningServer, ca: trustme.CA) -> None:
    _, _, smtps = _ports(tls_server)
    with smtplib.SMTP_SSL("127.0.0.1", smtps, timeout=10, context=_client_context(ca)) as smtp:
        smtp.ehlo("client.mailgate.org")
        assert smtp.docmd("AUTH", "NTLM")[:1] == (504,)
        assert smtp.docmd("AUTH", "PLAIN !!!notbase64") == (
            501, b"5.5.2 Cannot Base64-decode client response"
        )
        assert smtp.docmd("AUTH", "LOGIN")[0] == 334
        assert smtp.docmd("*")[:1] == (501,)
        # An empty initial response is valid SASL framing but not a PLAIN message.
        assert smtp.docmd("AUTH", "PLAIN =") == (501, b"5.5.2 Malformed authentication response")
    # the cancelled exchange names its mechanism (it said only outcome=aborted)
    assert wait_for(lambda: "outcome=aborted" in tls_server.log())
    [aborted] = [x for x in tls_server.log().splitlines() if "outcome=aborted" in x]
    assert "mechanism=LOGIN" in aborted


def test_cram_md5_and_scram(tls_server: RunningServer, ca: trustme.CA) -> None:
    _, _, smtps = _ports(tls_server)
    with smtplib.SMTP_SSL("127.0.0.1", smtps, timeout=10, context=_client_context(ca)) as smtp:
        smtp.ehlo("client.mailgate.org")
        code, challenge = smtp.docmd("AUTH", "CRAM-MD5")
        assert code == 334
        digest = hmac.new(PASSWORD.encode(), base64.b64decode(challenge), hashlib.md5)
        answer = base64.b64encode(f"bob {digest.hexdigest()}".encode()).decode()
        assert smtp.docmd(answer) == (235, b"2.7.0 Authentication successful")
    with smtplib.SMTP_SSL("127.0.0.1", smtps, timeout=10, context=_client_context(ca)) as smtp:
        smtp.ehlo("client.mailgate.org")
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD)
        first = base64.b64encode(client.get_client_first().encode()).decode()
        code, server_first = smtp.docmd("AUTH", f"SCRAM-SHA-256 {first}")
        assert code == 334
        client.set_server_first(base64.b64decode(server_first).decode())
        final = base64.b64encode(client.get_client_final().encode()).decode()
        code, server_final = smtp.docmd(final)
        assert code == 334
        client.set_server_final(base64.b64decode(server_final).decode())
        assert smtp.docmd("")[0] == 235


def test_authenticated_relay_goes_through_smarthost(
    tls_server: RunningServer, ca: trustme.CA, sink: Sink
) -> None:
    _, submission, _ = _ports(tls_server)
    with smtplib.SMTP("127.0.0.1", submission, timeout=10) as smtp:
        smtp.ehlo("client.mailgate.org")
        smtp.starttls(context=_client_context(ca))
        smtp.ehlo("client.mailgate.org")
        smtp.login("alice", PASSWORD)
        code, text = smtp.docmd("MAIL", "FROM:<bob@mx.mailgate.test>")
        assert (code, text[:5]) == (553, b"5.7.1")
        smtp.sendmail("alice@mx.mailgate.test", ["dave@remote.example.net"], MESSAGE)
    # the refusal's line names the user and the check, as other refusals do
    [refused] = [x for x in tls_server.log().splitlines() if "code=553" in x]
    assert "user=alice" in refused and "check=sender_owner" in refused
    deadline = time.monotonic() + 5
    while not sink.messages and time.monotonic() < deadline:
        time.sleep(0.05)
    [(sender, rcpts, data)] = sink.messages
    assert sender == "alice@mx.mailgate.test" and rcpts == ["dave@remote.example.net"]
    assert b"with ESMTPSA" in data and b"secret body" in data
    # the delivery line says where it went and what the next hop said (its queue id)
    [handed] = [x for x in tls_server.log().splitlines()
                if "event=delivery" in x and "to=dave@remote.example.net" in x]
    assert "relay=" in handed and "downstream=\"250 " in handed, handed


def test_unauthenticated_client_cannot_relay(tls_server: RunningServer, sink: Sink) -> None:
    public, _, _ = _ports(tls_server)
    with smtplib.SMTP("127.0.0.1", public, timeout=10) as smtp:
        smtp.ehlo("client.mailgate.org")
        smtp.docmd("MAIL", "FROM:<carol@client.mailgate.org>")
        assert smtp.docmd("RCPT", "TO:<dave@remote.example.net>") == (550, b"5.7.1 Relaying denied")
    assert sink.messages == []


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_tls_and_auth(tls_server: RunningServer, ca: trustme.CA, tmp_path: Path) -> None:
    _, submission, smtps = _ports(tls_server)
    for extra, port in ((["--tls"], submission), (["--tlsc"], smtps)):
        out = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{port}", *extra, "--auth", "PLAIN",
             "--auth-user", "alice", "--auth-password", PASSWORD, "--helo", "client.mailgate.org",
             "--from", "alice@mx.mailgate.test", "--to", "bob@mx.mailgate.test",
             "--timeout", "10"],
            capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "235 2.7.0" in out.stdout and "250 2.0.0 OK: queued as" in out.stdout
    assert len(tls_server.messages("bob")) == 2


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_s_client_starttls(tls_server: RunningServer) -> None:
    public, _, _ = _ports(tls_server)
    out = subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{public}",
         "-servername", HOST, "-name", "client.mailgate.org", "-brief", "-ign_eof"],
        input="EHLO client.mailgate.org\r\nQUIT\r\n", capture_output=True, text=True, timeout=30,
    )
    assert "CONNECTION ESTABLISHED" in out.stderr
    assert "Protocol version: TLSv1.3" in out.stderr or "TLSv1.2" in out.stderr
    assert "221 2.0.0" in out.stdout


def test_tls_handshake_failure_is_logged_and_closed(tls_server: RunningServer) -> None:
    public, _, _ = _ports(tls_server)
    with socket.create_connection(("127.0.0.1", public), timeout=10) as sock:
        sock.recv(1024)
        sock.sendall(b"EHLO client.mailgate.org\r\n")
        time.sleep(0.2)
        sock.recv(4096)
        sock.sendall(b"STARTTLS\r\n")
        assert sock.recv(1024).startswith(b"220 2.0.0")
        sock.sendall(b"this is not a TLS client hello\r\n" * 4)
        sock.settimeout(10)
        rest = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            rest += chunk
    time.sleep(0.3)
    assert "event=tls" in tls_server.log() and "outcome=failed" in tls_server.log()
    # The server is still serving.
    with smtplib.SMTP("127.0.0.1", public, timeout=10) as smtp:
        assert smtp.noop()[0] == 250


def test_sighup_reloads_certificates_without_dropping_sessions(
    tls_server: RunningServer, ca: trustme.CA, tmp_path: Path
) -> None:
    public, _, smtps = _ports(tls_server)

    def served_cert() -> tuple[bytes, bytes]:
        with smtplib.SMTP("127.0.0.1", public, timeout=10) as smtp:
            smtp.ehlo("client.mailgate.org")
            smtp.starttls(context=_client_context(ca))
            starttls = smtp.sock.getpeercert(binary_form=True)
        with smtplib.SMTP_SSL("127.0.0.1", smtps, timeout=10,
                              context=_client_context(ca)) as smtp:
            implicit = smtp.sock.getpeercert(binary_form=True)
        return starttls, implicit

    before = served_cert()
    open_session = smtplib.SMTP_SSL("127.0.0.1", smtps, timeout=10, context=_client_context(ca))
    open_session.ehlo("client.mailgate.org")
    _pki(tmp_path, ca)  # new certificates over the old files
    tls_server.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "event=reload" not in tls_server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    after = served_cert()
    assert after[0] != before[0] and after[1] != before[1]
    assert after[0] == after[1]
    assert open_session.noop()[0] == 250  # the session from before the reload goes on
    open_session.quit()


def test_a_tls_client_that_half_closes_gets_no_copy_delivered_without_its_250(
    tls_server: RunningServer, ca: trustme.CA
) -> None:
    # asyncio's TLS cannot answer after the client's FIN or close_notify: the
    # message was delivered and logged 250 while the client saw no reply, so it
    # sent it again.  Not delivered now: the client's retry is the one copy.
    public, _, _ = _ports(tls_server)
    with socket.create_connection(("127.0.0.1", public), timeout=10) as raw:
        read_until(raw, b"220 ")
        raw.sendall(b"EHLO client.mailgate.org\r\n")
        read_until(raw, b"250 ")
        raw.sendall(b"STARTTLS\r\n")
        read_until(raw, b"220 ")
        tls = _client_context(ca).wrap_socket(raw, server_hostname="mx.mailgate.test")
        tls.sendall(b"EHLO client.mailgate.org\r\nMAIL FROM:<carol@client.mailgate.org>\r\n"
                    b"RCPT TO:<alice@mx.mailgate.test>\r\nDATA\r\n")
        assert b"354 " in read_until(tls, b"354 ")
        tls.sendall(MESSAGE + b".\r\nQUIT\r\n")
        tls.shutdown(socket.SHUT_WR)  # the TCP connection's half-close
        with contextlib.suppress(OSError):
            while tls.recv(4096):
                pass
    assert wait_for(lambda: "event=close" in tls_server.log())
    assert tls_server.messages("alice") == []
    assert "outcome=aborted" in tls_server.log()


def test_the_smtps_listener_follows_a_reload_of_the_tls_settings(
    tmp_path: Path, ca: trustme.CA
) -> None:
    # Port 465 kept a context patched in place: after a reload it still refused TLS
    # 1.2 when min_version had been lowered (and kept serving a replaced certificate
    # of the other key type), while STARTTLS followed.
    cert, key = _pki(tmp_path, ca)
    tls = f'[tls]\ncert = "{cert}"\nkey = "{key}"\n'
    srv = start_server(tmp_path, f"""
        [server]
        spool_dir = "{tmp_path / 'spool'}"
        [[listener]]
        address = "127.0.0.1:0"
        [[listener]]
        address = "127.0.0.1:0"
        role = "smtps"
        {tls}min_version = "1.3"
        [delivery]
        maildir_root = "{tmp_path / 'maildir'}"
    """)

    def tls12_handshake() -> bool:
        client = _client_context(ca)
        client.maximum_version = ssl.TLSVersion.TLSv1_2
        try:
            with smtplib.SMTP_SSL("127.0.0.1", srv.extra_ports[1], timeout=10,
                                  context=client) as smtp:
                return smtp.ehlo("client.mailgate.org")[0] == 250
        except (ssl.SSLError, OSError):
            return False

    try:
        assert not tls12_handshake()
        srv.config_path.write_text(srv.config_path.read_text().replace(
            'min_version = "1.3"', 'min_version = "1.2"'))
        srv.signal(signal.SIGHUP)
        assert wait_for(lambda: "event=reload outcome=ok" in srv.log())
        assert tls12_handshake()
    finally:
        srv.stop()
