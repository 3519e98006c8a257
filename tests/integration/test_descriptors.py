"""The descriptor limit follows server.max_connections (mailgate/server/descriptors.py):
raised at start and at reload within the hard limit, warned of where the hard limit is
too low."""

from __future__ import annotations

import re
import resource
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

from mailgate.server.descriptors import descriptors_needed
from tests.integration.server import RunningServer, start_server, wait_for

HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def _soft_limit(pid: int) -> int:
    limits = Path(f"/proc/{pid}/limits").read_text()
    found = re.search(r"^Max open files\s+(\d+)", limits, re.M)
    assert found, limits
    return int(found.group(1))


def _expected(max_connections: int, hard: int = HARD) -> int:
    needed = descriptors_needed(max_connections)
    return needed if hard == resource.RLIM_INFINITY else min(needed, hard)


def _config(tmp_path: Path, max_connections: int, workers: int = 1) -> str:
    return (f'[server]\nspool_dir = "{tmp_path}/s"\nmax_connections = {max_connections}\n'
            f"workers = {workers}\n")


def _worker_pids(srv: RunningServer) -> list[int]:
    return [int(p) for p in re.findall(r"event=worker_started worker=\d+ pid=(\d+)", srv.log())]


def _deliver(srv: RunningServer) -> None:
    with smtplib.SMTP(srv.host, srv.port, timeout=15) as smtp:
        smtp.sendmail("a@client.mailgate.org", ["root@localhost"], b"Subject: fd\r\n\r\nhi\r\n")


def test_a_low_soft_limit_is_raised_at_start_and_at_reload(tmp_path: Path) -> None:
    # systemd and login shells start services with 1,024; the default max_connections
    # (1,000) needs more once messages are under way
    srv = start_server(tmp_path, _config(tmp_path, 1000), nofile=(256, HARD))
    try:
        assert _soft_limit(srv.proc.pid) == _expected(1000) > 256
        _deliver(srv)
        srv.config_path.write_text(_config(tmp_path, 3000))
        srv.signal(signal.SIGHUP)
        assert wait_for(lambda: _soft_limit(srv.proc.pid) == _expected(3000)), (
            _soft_limit(srv.proc.pid), srv.log())
        _deliver(srv)
        assert len(srv.messages()) == 2
    finally:
        srv.stop()


def test_workers_start_with_the_raised_limit(tmp_path: Path) -> None:
    srv = start_server(tmp_path, _config(tmp_path, 1000, workers=2), nofile=(256, HARD))
    try:
        workers = _worker_pids(srv)
        assert len(workers) == 2
        assert [_soft_limit(pid) for pid in [srv.proc.pid, *workers]] == [_expected(1000)] * 3
    finally:
        srv.stop()


def test_a_higher_limit_is_never_lowered(tmp_path: Path) -> None:
    srv = start_server(tmp_path, _config(tmp_path, 1), nofile=(HARD, HARD))
    try:
        assert _soft_limit(srv.proc.pid) == HARD > descriptors_needed(1)
    finally:
        srv.stop()


def test_a_hard_limit_below_the_need_is_a_warning(tmp_path: Path) -> None:
    # check-config says it; serve starts (it may be what the site wants) and logs it
    config = tmp_path / "checked.toml"
    config.write_text(_config(tmp_path, 1000) + f'[delivery]\nmaildir_root = "{tmp_path}/m"\n')
    checked = subprocess.run(
        [sys.executable, "-m", "mailgate.cli", "check-config", str(config)],
        capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300)),
    )
    assert checked.returncode == 0, checked.stderr
    said = (f"{config}: warning: server.max_connections: 1000 connections may need up to "
            f"{descriptors_needed(1000)} open files, and this process may have at most 300 "
            "(its hard RLIMIT_NOFILE)")
    assert said in checked.stderr, checked.stderr
    assert "lower max_connections to 33" in checked.stderr
    srv = start_server(tmp_path / "run", _config(tmp_path, 1000), nofile=(256, 300))
    try:
        assert _soft_limit(srv.proc.pid) == 300
        assert re.search(r"level=warning event=config problem=.*server.max_connections: 1000 "
                         r"connections may need", srv.log()), srv.log()
        _deliver(srv)
    finally:
        srv.stop()
