"""Starting and stopping the servers under test, each in its own process."""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
# delivery.sync_method for mailgate's durable runs (bench/run.py --sync-method)
SYNC_METHOD = "fsync"
NOFILE = 65536  # 10,000 idle connections need more descriptors than the default

# smtp-source's identity in every run (mailgate refuses HELO localhost and reserved
# names such as .test, so the bench uses a made-up name under .internal)
HELO = "client.bench.internal"
SENDER = "bench@client.bench.internal"
RECIPIENT = "user@bench.internal"

MAILGATE_CONFIG = """\
[server]
hostname = "mx.bench.internal"
spool_dir = "{work}/spool"
max_message_size = 62914560          # the 50 MB memory test
max_connections = 20000              # the idle-connection test
max_connections_per_ip = 20000
workers = {workers}                  # 0: one process per CPU

[[listener]]
address = "127.0.0.1:{port}"

[policy]
verify_sender_domain = false         # no DNS on the bench machine (127.0.0.1 is trusted anyway)

[delivery]
maildir_root = "{work}/maildir"
sync_method = "{sync_method}"       # bench/run.py --sync-method; "fsync" is the default
local_domains = ["bench.internal"]
system_users = false
local_users = ["user"]
default = "{default}"

[delivery.destinations.blackhole]
type = "discard"
"""


def mailgate_config(work: object, port: int, default: str, workers: int) -> str:
    """The bench's mailgate.toml: ``default`` is the destination ("blackhole" or
    "local"), the durable mode's sync method the one bench/run.py was given."""
    return MAILGATE_CONFIG.format(
        work=work, port=port, default=default, workers=workers, sync_method=SYNC_METHOD
    )


def raise_nofile() -> int:
    """Raise this process's descriptor limit to NOFILE, or to the hard limit if lower
    (without CAP_SYS_RESOURCE the hard limit cannot grow); return the new limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = NOFILE if hard == resource.RLIM_INFINITY else min(NOFILE, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
        return NOFILE
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        return limit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str  # "mailgate" or "aiosmtpd"
    mode: str  # "discard" or "maildir"
    port: int
    proc: subprocess.Popen[bytes]
    work: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # The run's files stay until the whole bench is over: deleting thousands of
        # files makes ext4 skip their inodes as "recently deleted" for ~30 s while
        # allocating new ones, which taxed whichever server ran next (perf showed
        # recently_deleted() at ~20 % of a durable run's CPU).


def command(name: str, mode: str, port: int, work: Path) -> list[str]:
    """The exact command line that starts ``name`` (also printed in RESULTS.md)."""
    if name == "mailgate":
        return [str(VENV_BIN / "mailgate"), "serve", "--config", str(work / "mailgate.toml")]
    if name == "floor":  # bench/floor_server.py: no server, the floor of the loads
        return [str(VENV_BIN / "python"), str(ROOT / "bench" / "floor_server.py"),
                "--port", str(port)]
    return [
        str(VENV_BIN / "python"), str(ROOT / "bench" / "aiosmtpd_server.py"),
        "--port", str(port), "--mode", mode, "--maildir", str(work / "maildir" / "user"),
    ]


def start(name: str, mode: str, workdir: Path, workers: int = 0) -> Server:
    """Start a fresh server (fresh peak-RSS counter) and wait until it accepts."""
    port = free_port()
    work = workdir / f"{name}-{mode}-{port}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    default = "blackhole" if mode == "discard" else "local"
    (work / "mailgate.toml").write_text(mailgate_config(work, port, default, workers))
    proc = subprocess.Popen(
        command(name, mode, port, work),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # mailgate logs every event; the cost is still paid
        preexec_fn=raise_nofile,  # what `prlimit --nofile` would do
        cwd=work,
    )
    server = Server(name, mode, port, proc, work)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(512)  # the greeting: the server is ready
            # let it see the probe's close before measuring; several workers: the
            # probe only proves that one of them is up
            time.sleep(0.2 if workers == 1 or name != "mailgate" else 1.5)
            return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{name} did not start listening on {port}")


def on_fresh_server(
    name: str, mode: str, workdir: Path, workers: int, measure: Callable[[Server], T]
) -> T:
    """``measure`` run against a server started for it alone, stopped afterwards."""
    # Write back what earlier measurements left dirty first: 20,000 stored messages
    # are ~80 MB that the kernel would otherwise flush during the next measurement
    # (p3 durable ran ~10 % slower after the two 20,000-message loads without this).
    os.sync()
    server = start(name, mode, workdir, workers)
    try:
        return measure(server)
    finally:
        server.stop()


def check_tools() -> None:
    """smtp-source must exist and Postfix's own daemon must not be running."""
    if shutil.which("smtp-source") is None:
        sys.exit(
            "smtp-source not found: echo 'postfix postfix/main_mailer_type select No "
            "configuration' | debconf-set-selections; DEBIAN_FRONTEND=noninteractive "
            "apt-get install -y postfix; postfix stop"
        )
    if _postfix_master_running():
        subprocess.run(["postfix", "stop"], check=False, capture_output=True)
        time.sleep(1)
        if _postfix_master_running():
            sys.exit("a Postfix master process is running; stop it first (postfix stop)")


def _postfix_master_running() -> bool:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == "master":
                    return True
        except OSError:
            continue
    return False
