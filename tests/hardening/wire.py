"""Raw-socket SMTP talk, server memory readings and a recording SMTP sink for the
hardening tests, which attack a real ``mailgate serve`` process over loopback."""

from __future__ import annotations

import re
import select
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope as AioEnvelope
from aiosmtpd.smtp import Session as AioSession

from tests.integration.server import RunningServer, start_server

HOSTNAME = "mx.mailgate.test"
HELO = "client.mailgate.org"
_REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$")


def untrusted_config(workdir: Path, extra: str = "", *, server: str = "",
                     delivery: str = "") -> str:
    """A config under which the loopback test client is an ordinary internet client:
    not trusted, no DNS needed for its sender, no HELO checks (clients here invent names)."""
    return textwrap.dedent(f"""\
        [server]
        spool_dir = "{workdir / 'spool'}"
        {textwrap.dedent(server).strip()}

        [policy]
        trusted_networks = []
        verify_sender_domain = false
        helo_checks = false

        [delivery]
        maildir_root = "{workdir / 'maildir'}"
        local_users = ["alice", "bob"]
        {textwrap.dedent(delivery).strip()}
        """) + textwrap.dedent(extra)


def start(workdir: Path, config: str) -> RunningServer:
    return start_server(workdir, config, hostname=HOSTNAME)


def rss_kb(pid: int) -> int:
    """The resident set size of process ``pid`` in KiB (VmRSS from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def stored_files(maildir: Path) -> list[Path]:
    """Every message file in any new/ or cur/ under ``maildir``."""
    return sorted(p for sub in ("new", "cur") for p in maildir.glob(f"**/{sub}/*") if p.is_file())


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


@dataclass
class Reply:
    code: int
    lines: list[bytes]

    @property
    def text(self) -> bytes:
        return b"\n".join(self.lines)


class Wire:
    """One SMTP client connection driven byte by byte, so a test controls every write."""

    def __init__(self, server: RunningServer, timeout: float = 15) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            (server.host, server.port), timeout=timeout)
        self._buf = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes | None:
        """The next raw reply line with its line end, or None at EOF."""
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line + b"\n"

    def reply(self) -> Reply:
        """One whole (multi-line) reply; every line must be well formed."""
        lines = []
        while True:
            raw = self.line()
            if raw is None:
                raise ConnectionError(f"EOF inside a reply after {lines!r}")
            assert raw.endswith(b"\r\n"), raw
            match = _REPLY_LINE.match(raw[:-2])
            assert match is not None, raw
            lines.append(match.group(3))
            if match.group(2) == b" ":
                return Reply(int(match.group(1)), lines)

    def cmd(self, line: str | bytes) -> Reply:
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.reply()

    def rest(self) -> bytes:
        """Everything the server still sends until it closes (or resets) the connection."""
        out, self._buf = self._buf, b""
        try:
            while chunk := self.sock.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out

    def available(self, wait: float = 0.05) -> bytes:
        """What the server sent so far (waiting up to ``wait`` for the first bytes)."""
        out, self._buf = self._buf, b""
        ready, _, _ = select.select([self.sock], [], [], wait)
        while ready:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
            ready, _, _ = select.select([self.sock], [], [], 0.02)
        return out

    def starttls(self, context: ssl.SSLContext) -> None:
        assert not self._buf, "plaintext left over before the handshake"
        self.sock = context.wrap_socket(self.sock, server_hostname=HOSTNAME)

    def close(self) -> None:
        self.sock.close()


@dataclass
class SinkMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class _Recorder:
    received: list[SinkMessage] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(
        self, server: AioSMTP, session: AioSession, envelope: AioEnvelope
    ) -> str:
        with self.lock:
            self.received.append(SinkMessage(
                envelope.mail_from or "", list(envelope.rcpt_tos),
                bytes(envelope.original_content or b"")))
        return "250 2.0.0 OK"


class Sink:
    """A real SMTP server (aiosmtpd, in a thread) that records every message it gets:
    the smarthost that any relay leak would reach."""

    def __init__(self) -> None:
        self.recorder = _Recorder()
        self.port = free_port()
        self._controller = Controller(self.recorder, hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> Sink:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()

    @property
    def received(self) -> list[SinkMessage]:
        with self.recorder.lock:
            return list(self.recorder.received)

    def smarthost_config(self) -> str:
        """The [delivery] lines that send every non-local recipient here."""
        return (
            'relay = "outbound"\n'
            "[delivery.destinations.outbound.smtp]\n"
            f'host = "127.0.0.1"\nport = {self.port}\nstarttls = "off"\ntimeout = 10\n'
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: object, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(predicate())  # type: ignore[operator]


def make_tls(directory: Path) -> tuple[ssl.SSLContext, str]:
    """A trustme CA and a certificate for HOSTNAME: the client context that trusts it,
    and the [tls] lines of the server config."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert(HOSTNAME)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context, f'[tls]\ncert = "{cert_path}"\nkey = "{key_path}"\n'


def make_users(path: Path, user: str, password: str) -> str:
    """A users file made by ``mailgate passwd``; the [auth] lines of the server config."""
    subprocess.run(
        [sys.executable, "-m", "mailgate.cli", "passwd", user, "--users-file", str(path),
         "--stdin"],
        input=password + "\n", text=True, check=True, capture_output=True, timeout=60,
    )
    return f'[auth]\nusers_file = "{path}"\n'


def eager_tls_command(wire: Wire, context: ssl.SSLContext, command: bytes,
                      timeout: float = 5) -> bytes:
    """Finish the TLS handshake and send ``command`` in the SAME TCP write as the
    client's Finished (as a loaded client often does); the decrypted answer."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=HOSTNAME)
    sock = wire.sock
    sock.settimeout(timeout)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("EOF in the TLS handshake") from None
            incoming.write(data)
    tls.write(command)
    sock.sendall(outgoing.read())
    answer = b""
    while not re.search(rb"(^|\n)\d{3} [^\n]*\r\n$", answer):
        try:
            answer += tls.read(65536)
            continue
        except ssl.SSLWantReadError:
            pass
        data = sock.recv(65536)
        if not data:
            break
        incoming.write(data)
    return answer
