"""A real Dovecot LMTP server on loopback, with its own minimal configuration.

Imported explicitly by the LMTP tests (``from dovecot_fixture import ...``): pytest
puts this folder on sys.path.  Dovecot runs in the foreground (``dovecot -F``) with
its base_dir, state_dir, log and mail under a private directory, an inet LMTP
listener on a free loopback port and a unix listener, and a passwd-file userdb with
the users alice and bob.  Mail is stored with a fixed unprivileged uid (Dovecot
refuses uid 0), so the directory is made traversable for that uid.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

USERS = ("alice", "bob")
DOMAIN = "example.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            return s.recv(64).startswith(b"220 ")
    except OSError:
        return False


class Dovecot:
    """One dovecot master process serving LMTP only."""

    greeting_name = "lmtp.mailgate.test"  # the name its LMTP greeting gives

    def __init__(self) -> None:
        binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
        if not os.path.exists(binary):
            pytest.fail("dovecot is not installed (apt-get install dovecot-lmtpd)")
        self.dir = Path(tempfile.mkdtemp(prefix="mailgate-dovecot-"))
        self.dir.chmod(0o755)
        self.port = free_port()
        self.unix_path = str(self.dir / "run" / "lmtp")
        uid, gid, run_as = self._mail_owner()
        mail_root = self.dir / "mail"
        mail_root.mkdir()
        os.chown(mail_root, uid, gid)
        (self.dir / "users").write_text(
            "".join(f"{u}:{{PLAIN}}x:{uid}:{gid}::{mail_root / u}\n" for u in USERS)
        )
        self.conf = self.dir / "dovecot.conf"
        self.conf.write_text(self._config(run_as))
        self.log = self.dir / "dovecot.log"
        self._proc = subprocess.Popen(
            [binary, "-F", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while not (_greets(self.port) and os.path.exists(self.unix_path)):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = self.log.read_text() if self.log.exists() else ""
                self.stop()
                pytest.fail(f"dovecot did not start:\n{log}")
            time.sleep(0.05)

    @staticmethod
    def _mail_owner() -> tuple[int, int, str]:
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            return nobody.pw_uid, nobody.pw_gid, ""
        # Not root: Dovecot runs everything as the current user.
        me = pwd.getpwuid(os.geteuid())
        return me.pw_uid, me.pw_gid, me.pw_name

    def _config(self, run_as: str) -> str:
        d = self.dir
        users = (
            f"default_internal_user = {run_as}\ndefault_login_user = {run_as}\n" if run_as else ""
        )
        return f"""\
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = lmtp
listen = 127.0.0.1
hostname = {self.greeting_name}
ssl = no
first_valid_uid = 1
mail_location = maildir:~/Maildir
auth_username_format = %Ln
{users}passdb {{
  driver = passwd-file
  args = {d}/users
}}
userdb {{
  driver = passwd-file
  args = {d}/users
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
"""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def maildir_messages(self, user: str) -> list[bytes]:
        """The messages in ``user``'s Maildir/new, oldest first."""
        new = self.dir / "mail" / user / "Maildir" / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: p.name)
        return [f.read_bytes() for f in files]

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(name="dovecot")
def dovecot_server() -> Iterator[Dovecot]:
    server = Dovecot()
    try:
        yield server
    finally:
        server.remove()
