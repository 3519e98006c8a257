"""Run a real ``mailgate serve`` subprocess on loopback for end-to-end tests."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mailgate.ops.logging import FLUSH_DELAY

_ANNOUNCE = re.compile(r"listening on (\S+?):(\d+)")


@dataclass
class RunningServer:
    proc: subprocess.Popen[str]
    host: str
    port: int
    workdir: Path
    maildir: Path
    stderr_path: Path
    config_path: Path
    extra_ports: list[int] = field(default_factory=list)

    def log(self) -> str:
        # info lines leave the server up to FLUSH_DELAY after their event, together
        time.sleep(4 * FLUSH_DELAY)
        return self.stderr_path.read_text(errors="replace")

    def messages(self, user: str = "root") -> list[bytes]:
        """The user's messages in the order they were stored."""
        new = self.maildir / user / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir(), key=_stored_order)]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    workdir: Path, config: str = "", *, hostname: str | None = "mx.mailgate.test",
    listeners: int = 1,
    extra_args: list[str] | None = None,
    nofile: tuple[int, int] | None = None,
) -> RunningServer:
    """Write ``config`` (TOML, may be empty) and start ``mailgate serve`` on free ports;
    ``nofile``: the (soft, hard) descriptor limit it starts with."""
    workdir.mkdir(parents=True, exist_ok=True)
    maildir = workdir / "maildir"
    body = textwrap.dedent(config)
    if "[server]" not in body:
        body = f'[server]\nspool_dir = "{workdir / "spool"}"\n\n' + body
    if "maildir_root" not in body:
        body += f'\n[delivery]\nmaildir_root = "{maildir}"\n' if "[delivery]" not in body else ""
    config_path = workdir / "mailgate.toml"
    config_path.write_text(body)
    stderr_path = workdir / "stderr.log"
    args = [sys.executable, "-m", "mailgate.cli", "serve", "--config", str(config_path)]
    if hostname is not None:  # None: the name the file gives, if any
        args += ["--hostname", hostname]
    if "[[listener]]" not in body:
        args += ["--listen", "127.0.0.1:0"] * listeners
    args += extra_args or []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        args, cwd=workdir, stdout=subprocess.PIPE, stderr=stderr_path.open("w"),
        text=True, env=env,
        preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)) if nofile else None,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line or proc.poll() is not None:
            break
    found = _ANNOUNCE.findall(line)
    if not found:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"mailgate did not start: {line!r}\n{stderr_path.read_text()}")
    host, port = found[0]
    ports = [int(p) for _, p in re.findall(r"(\S+?):(\d+)[,;]", line)]
    return RunningServer(proc, host.strip("[]"), int(port), workdir, maildir, stderr_path,
                         config_path, ports)


def wait_for(predicate: Callable[[], bool], timeout: float = 15) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])



def start_behind_proxy(workdir: Path, policy: str) -> tuple[RunningServer, int]:
    """A server whose one listener takes a PROXY header from 127.0.0.1, so that a test
    can be any client address; ``policy`` is the [policy] section's lines.  The
    server and that listener's port."""
    port = free_port()
    server = start_server(workdir, f"""
        [server]
        spool_dir = "{workdir}/spool"
        proxy_from = ["127.0.0.1/32"]

        [policy]
        {textwrap.dedent(policy).strip()}

        [[listener]]
        address = "127.0.0.1:{port}"
        proxy_protocol = true
    """)
    return server, port


def _stored_order(path: Path) -> tuple[int, int, str]:
    """A Maildir name "SECONDS.MMICROSECONDS..." as (seconds, microseconds, name): the
    microseconds are not zero-padded, so the names alone do not sort by time."""
    seconds, _, rest = path.name.partition(".")
    micro = rest[1:].split("P", 1)[0] if rest.startswith("M") else ""
    return (int(seconds) if seconds.isdigit() else 0,
            int(micro) if micro.isdigit() else 0, path.name)


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """What ``sock`` receives until ``marker`` is in it, or the connection ends."""
    got = b""
    while marker not in got:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got

