"""End to end with several worker processes (server.workers): one server to its clients."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trustme

from tests.integration.server import (
    RunningServer,
    free_port,
    read_until,
    start_server,
    wait_for,
)


def _worker_pids(srv: RunningServer) -> list[int]:
    return [int(p) for p in re.findall(r"event=worker_started worker=\d+ pid=(\d+)", srv.log())]


def _children(pid: int) -> set[int]:
    """Live child processes of ``pid``, from each process's stat (works on any kernel,
    unlike /proc/PID/task/PID/children)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # it exited meanwhile
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def _send(srv: RunningServer, n: int) -> None:
    with smtplib.SMTP(srv.host, srv.port, timeout=15) as smtp:
        smtp.ehlo("client.mailgate.org")
        message = f"Subject: workers {n}\r\n\r\nhello\r\n".encode()
        smtp.sendmail("a@client.mailgate.org", ["root@localhost"], message)


def _start(tmp_path: Path, extra: str = "") -> RunningServer:
    return start_server(tmp_path, f'[server]\nworkers = 2\nspool_dir = "{tmp_path}/s"\n{extra}')


def test_workers_share_the_port_and_deliver(tmp_path: Path) -> None:
    srv = _start(tmp_path)
    try:
        assert wait_for(lambda: len(_worker_pids(srv)) == 2)
        assert set(_worker_pids(srv)) == _children(srv.proc.pid)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: _send(srv, n), range(40)))
        bodies = srv.messages("root")
        assert len(bodies) == 40
        numbers = {int(m.group(1)) for b in bodies if (m := re.search(rb"workers (\d+)", b))}
        assert numbers == set(range(40))
    finally:
        assert srv.stop() == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in _worker_pids(srv))
    assert "event=stopped" in srv.log()


def test_connection_limit_holds_across_workers(tmp_path: Path) -> None:
    srv = _start(tmp_path, "max_connections_per_ip = 3\n")
    try:
        held = [socket.create_connection((srv.host, srv.port), timeout=10) for _ in range(3)]
        for sock in held:
            assert sock.recv(1024).startswith(b"220 ")
        for _ in range(3):  # whichever worker takes it, the fourth is one too many
            with socket.create_connection((srv.host, srv.port), timeout=10) as extra:
                assert extra.recv(1024).startswith(b"421 4.7.0")
        held.pop().close()
        assert wait_for(lambda: _greeted(srv))
        for sock in held:
            sock.close()
    finally:
        srv.stop()


def _greeted(srv: RunningServer) -> bool:
    with socket.create_connection((srv.host, srv.port), timeout=10) as sock:
        return sock.recv(1024).startswith(b"220 ")


def test_a_killed_worker_is_replaced(tmp_path: Path) -> None:
    srv = _start(tmp_path)
    try:
        assert wait_for(lambda: len(_worker_pids(srv)) == 2)
        victim = _worker_pids(srv)[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: len(_worker_pids(srv)) == 3)
        assert f"event=worker_exited worker=0 pid={victim} signal=SIGKILL" in srv.log()
        assert victim not in _children(srv.proc.pid) and len(_children(srv.proc.pid)) == 2
        for n in range(6):
            _send(srv, n)
        assert len(srv.messages("root")) == 6
    finally:
        srv.stop()


def test_sighup_reaches_every_worker(tmp_path: Path) -> None:
    srv = _start(tmp_path)
    try:
        assert wait_for(lambda: len(_worker_pids(srv)) == 2)
        srv.config_path.write_text(srv.config_path.read_text() + "\n[broken\n")
        srv.signal(signal.SIGHUP)
        assert wait_for(lambda: "outcome=refused" in srv.log())
        assert srv.log().count("event=reload") == 1  # the supervisor refused it, once
        srv.config_path.write_text(srv.config_path.read_text().replace("\n[broken\n", ""))
        srv.signal(signal.SIGHUP)
        assert wait_for(lambda: srv.log().count("event=reload outcome=ok") == 2)
        # each says which worker it is (two alike lines could not be told apart)
        ok = [x for x in srv.log().splitlines() if "event=reload outcome=ok" in x]
        assert sorted(x.split("worker=")[1].split()[0] for x in ok) == ["0", "1"]
        _send(srv, 1)
    finally:
        srv.stop()


def test_a_worker_that_cannot_start_stops_the_server(tmp_path: Path) -> None:
    config = tmp_path / "mailgate.toml"
    config.write_text(
        f'[server]\nworkers = 2\nspool_dir = "{tmp_path}/s"\n'
        f'[tls]\ncert = "{tmp_path}/missing.pem"\nkey = "{tmp_path}/missing.key"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "mailgate.cli", "serve", "--config", str(config),
         "--listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "missing.pem" in done.stderr
    assert "Traceback" not in done.stderr
    assert "listening on" not in done.stdout


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE)
    assert found is not None
    return int(found.group(1))


def _metrics_pids(srv: RunningServer) -> list[int]:
    return [int(p) for p in re.findall(r"event=metrics_started pid=(\d+)", srv.log())]


def test_metrics_add_up_the_workers(tmp_path: Path) -> None:
    mport = free_port()
    leftovers = set(Path(tempfile.gettempdir()).glob("mailgate-metrics-*"))
    srv = _start(tmp_path, f'[metrics]\nlisten = "127.0.0.1:{mport}"\n')
    try:
        assert wait_for(lambda: len(_worker_pids(srv)) == 2 and len(_metrics_pids(srv)) == 1)
        # /metrics is served by a process of its own: the supervisor, which forks,
        # runs no thread besides its main one.
        assert _threads(srv.proc.pid) == 1
        assert _children(srv.proc.pid) == {*_worker_pids(srv), *_metrics_pids(srv)}
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda n: _send(srv, n), range(12)))
        def counted(text: bytes, pattern: bytes) -> float:
            found = re.search(pattern, text)
            return float(found.group(1)) if found else 0.0

        def scrape() -> bytes:
            return urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read()

        # updates reach the files within metrics.FLUSH_DELAY
        accepted = rb'mailgate_messages_total\{[^}]*outcome="accepted"[^}]*\} (\S+)'
        opened = rb"mailgate_connections_total\{[^}]*\} (\S+)"
        assert wait_for(lambda: counted(scrape(), accepted) == 12.0)
        assert wait_for(lambda: counted(scrape(), opened) == 12.0)
    finally:
        srv.stop()
    # the workers' metric files went with the server
    assert set(Path(tempfile.gettempdir()).glob("mailgate-metrics-*")) <= leftovers


def test_metrics_directories_of_killed_supervisors_are_removed_at_start(
    tmp_path: Path,
) -> None:
    # A SIGKILLed supervisor cannot remove its directory; the next start does, for
    # one whose process is gone (and only for that one).
    gone = subprocess.Popen(["true"])
    gone.wait()
    base = Path(tempfile.gettempdir())
    dead = base / f"mailgate-metrics-{gone.pid}-left"
    alive = base / f"mailgate-metrics-{os.getpid()}-inuse"
    for directory in (dead, alive):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"x")
    mport = free_port()
    try:
        srv = _start(tmp_path, f'[metrics]\nlisten = "127.0.0.1:{mport}"\n')
        try:
            assert wait_for(lambda: len(_metrics_pids(srv)) == 1)
            assert not dead.exists()
            assert alive.exists()
        finally:
            srv.stop()
    finally:
        shutil.rmtree(dead, ignore_errors=True)
        shutil.rmtree(alive, ignore_errors=True)


def _reload_both_workers(srv: RunningServer, old: str, new: str) -> None:
    """Once both workers run: change ``old`` to ``new`` in the file, SIGHUP, wait
    until both workers have reloaded."""
    assert wait_for(lambda: len(_worker_pids(srv)) == 2)
    srv.config_path.write_text(srv.config_path.read_text().replace(old, new))
    srv.signal(signal.SIGHUP)
    assert wait_for(lambda: srv.log().count("event=reload outcome=ok") == 2)


def test_a_replacement_worker_starts_from_the_reloaded_config(tmp_path: Path) -> None:
    config = f"""
        [server]
        workers = 2
        spool_dir = "{tmp_path}/s"
        [delivery]
        maildir_root = "{tmp_path}/maildir"
        system_users = false
        local_users = ["alice"]
    """
    srv = start_server(tmp_path, config)
    try:
        _reload_both_workers(srv, '["alice"]', '["alice", "bob"]')
        for pid in _worker_pids(srv)[:2]:  # both workers of the first config
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        assert wait_for(lambda: len(_worker_pids(srv)) == 4)
        for _ in range(6):  # whichever replacement answers knows bob
            with smtplib.SMTP(srv.host, srv.port, timeout=15) as smtp:
                smtp.ehlo("client.mailgate.org")
                smtp.mail("a@client.mailgate.org")
                assert smtp.rcpt("bob@localhost")[0] == 250
    finally:
        srv.stop()


def test_the_supervisor_says_once_what_waits_for_a_restart(tmp_path: Path) -> None:
    srv = _start(tmp_path)
    try:
        _reload_both_workers(srv, "workers = 2", "workers = 3")
        assert wait_for(lambda: "outcome=relayed" in srv.log())
        lines = [x for x in srv.log().splitlines() if "event=reload" in x]
        told = [x for x in lines if "restart_needed" in x]
        assert len(lines) == 3 and len(told) == 1
        assert "level=warning" in told[0] and "restart_needed=server.workers" in told[0]
        assert len(_worker_pids(srv)) == 2  # still the two it started with
    finally:
        srv.stop()


def test_workers_that_cannot_restart_are_retried_then_the_server_exits(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("mx.mailgate.test")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    srv = _start(tmp_path, f'[tls]\ncert = "{tmp_path}/cert.pem"\nkey = "{tmp_path}/key.pem"\n')
    try:
        assert wait_for(lambda: len(_worker_pids(srv)) == 2)
        (tmp_path / "cert.pem").unlink()  # a replacement can no longer start
        first, second = _worker_pids(srv)
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: "event=worker_failed worker=0" in srv.log())
        _send(srv, 1)  # the other worker still serves
        os.kill(second, signal.SIGKILL)
        assert srv.proc.wait(30) == 1
        assert "event=no_workers" in srv.log()
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()


def test_what_a_dead_worker_left_in_the_spool_is_removed(tmp_path: Path) -> None:
    srv = _start(tmp_path)
    try:
        assert wait_for(lambda: len(_worker_pids(srv)) == 2)
        victim, survivor = _worker_pids(srv)
        spool = tmp_path / "s"
        spool.mkdir(exist_ok=True)
        left = spool / f"abc.{victim}.1.spool"  # a message the victim was receiving
        busy = spool / f"abc.{survivor}.1.spool"  # one the other worker is receiving
        left.write_bytes(b"half a message")
        busy.write_bytes(b"half another")
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: "event=spool_cleanup removed=1" in srv.log())
        assert not left.exists() and busy.exists()
    finally:
        srv.stop()


def test_a_metrics_address_in_use_stops_the_supervisor_cleanly(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = tmp_path / "mailgate.toml"
    config.write_text(
        f'[server]\nworkers = 2\nspool_dir = "{tmp_path}/s"\n'
        f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
    )
    leftovers = set(Path(tempfile.gettempdir()).glob("mailgate-metrics-*"))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "mailgate.cli", "serve", "--config", str(config),
             "--listen", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )
    finally:
        taken.close()
    assert done.returncode == 1
    assert "mailgate: cannot start:" in done.stderr
    assert "Traceback" not in done.stderr
    assert set(Path(tempfile.gettempdir()).glob("mailgate-metrics-*")) == leftovers


def test_a_dead_metrics_process_is_replaced(tmp_path: Path) -> None:
    mport = free_port()
    srv = _start(tmp_path, f'[metrics]\nlisten = "127.0.0.1:{mport}"\n')
    try:
        assert wait_for(lambda: len(_metrics_pids(srv)) == 1)
        _send(srv, 1)
        os.kill(_metrics_pids(srv)[0], signal.SIGKILL)
        assert wait_for(lambda: len(_metrics_pids(srv)) == 2)
        assert "event=metrics_exited" in srv.log() and "signal=SIGKILL" in srv.log()
        accepted = re.compile(rb'mailgate_messages_total\{[^}]*outcome="accepted"[^}]*\} 1\.0')

        def served() -> bool:
            # the workers write their counts once a second: the message may be on its way
            url = f"http://127.0.0.1:{mport}/metrics"
            return accepted.search(urllib.request.urlopen(url, timeout=10).read()) is not None

        assert wait_for(served)
        assert len(_worker_pids(srv)) == 2  # the workers were never touched
    finally:
        assert srv.stop() == 0
    # nothing outlives the supervisor: the replacement was stopped and reaped too
    assert wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in _metrics_pids(srv)))


def _running(pid: int) -> bool:
    """``pid`` exists and is not a zombie waiting for its new parent to reap it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return False
    return fields[0] != "Z"


def test_nothing_outlives_a_killed_supervisor(tmp_path: Path) -> None:
    # Without a service manager's cgroup to clean up, workers and the metrics process
    # left running would hold the sockets a restarted server has to bind.
    mport = free_port()
    srv = _start(tmp_path, f'[metrics]\nlisten = "127.0.0.1:{mport}"\n')
    children: list[int] = []
    try:
        assert wait_for(lambda: len(_worker_pids(srv)) == 2 and len(_metrics_pids(srv)) == 1)
        children = [*_worker_pids(srv), *_metrics_pids(srv)]
        srv.signal(signal.SIGKILL)
        assert wait_for(lambda: not any(_running(pid) for pid in children))
        again = _start(tmp_path / "again", f'[metrics]\nlisten = "127.0.0.1:{mport}"\n')
        try:
            assert wait_for(lambda: len(_worker_pids(again)) == 2)  # its metrics port is free
        finally:
            again.stop()
    finally:
        srv.stop()
        for pid in children:  # should this fail, leave nothing running behind
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_reload_the_workers_would_refuse_is_refused_once_and_kept_from_new_ones(
    tmp_path: Path,
) -> None:
    # The file loads, but a part it now names will not build (an access list with a
    # bad line): the supervisor refuses it once, and a worker started after it runs
    # the old configuration, as the others do, instead of failing to start.
    access = tmp_path / "access"
    access.write_text("deny ip 192.0.2.0/24\nfrobnicate everything\n")
    srv = _start(tmp_path)
    try:
        assert wait_for(lambda: len(_worker_pids(srv)) == 2)
        srv.config_path.write_text(
            srv.config_path.read_text() + f'[policy]\naccess_file = "{access}"\n'
        )
        srv.signal(signal.SIGHUP)
        assert wait_for(lambda: "outcome=refused" in srv.log())
        refused = [x for x in srv.log().splitlines() if "event=reload" in x]
        assert len(refused) == 1 and "access:2:" in refused[0], refused
        os.kill(_worker_pids(srv)[0], signal.SIGKILL)
        assert wait_for(lambda: len(_worker_pids(srv)) == 3)
        assert "worker_failed" not in srv.log()
        _send(srv, 1)
    finally:
        assert srv.stop() == 0


def test_a_change_that_waits_for_a_restart_waits_in_new_workers_too(tmp_path: Path) -> None:
    srv = _start(tmp_path)
    try:
        assert wait_for(lambda: len(_worker_pids(srv)) == 2)
        srv.config_path.write_text(srv.config_path.read_text().replace(
            f'spool_dir = "{tmp_path}/s"', f'spool_dir = "{tmp_path}/s2"'))
        srv.signal(signal.SIGHUP)
        assert wait_for(lambda: "restart_needed=server.spool_dir" in srv.log())
        os.kill(_worker_pids(srv)[0], signal.SIGKILL)
        assert wait_for(lambda: len(_worker_pids(srv)) == 3)
        for n in range(4):
            _send(srv, n)
        assert not (tmp_path / "s2").exists()  # the new worker kept the running spool
    finally:
        assert srv.stop() == 0


def test_a_replacement_that_cannot_start_says_why_in_a_log_line(tmp_path: Path) -> None:
    # the access list broke on disk after the start: a new worker cannot build it
    access = tmp_path / "access"
    access.write_text("deny ip 192.0.2.0/24\n")
    srv = _start(tmp_path, f'[policy]\naccess_file = "{access}"\n')
    try:
        assert wait_for(lambda: len(_worker_pids(srv)) == 2)
        access.write_text("frobnicate everything\n")
        os.kill(_worker_pids(srv)[0], signal.SIGKILL)
        assert wait_for(lambda: "event=worker_failed" in srv.log())
        # a log line (JSON or syslog where so configured), not a print
        errors = [x for x in srv.log().splitlines() if "event=worker_error" in x]
        assert errors and "level=error" in errors[0] and "access:1:" in errors[0]
        assert not [x for x in srv.log().splitlines() if x.startswith("mailgate: ")]
    finally:
        srv.stop()



def test_new_connections_are_refused_once_the_shutdown_begins(tmp_path: Path) -> None:
    # The supervisor kept its listening sockets open through the shutdown grace: the
    # kernel completed connections nobody accepted (no greeting, a reset at exit),
    # where a client should be refused at once and try the next MX.
    srv = _start(tmp_path, "shutdown_grace = 5")
    try:
        assert wait_for(lambda: len(_worker_pids(srv)) == 2)
        with socket.create_connection((srv.host, srv.port), timeout=10) as busy:
            busy.recv(1024)
            busy.sendall(b"EHLO client.mailgate.org\r\nMAIL FROM:<a@client.mailgate.org>\r\n"
                         b"RCPT TO:<root@localhost>\r\nDATA\r\n")
            time.sleep(0.5)  # a transaction under way holds the shutdown up
            srv.signal(signal.SIGTERM)
            assert wait_for(lambda: "event=shutdown" in srv.log())
            time.sleep(0.5)
            try:
                with socket.create_connection((srv.host, srv.port), timeout=3) as late:
                    late.settimeout(3)
                    greeting = late.recv(1024)
            except ConnectionRefusedError:
                greeting = b"refused"
            assert greeting in (b"refused", b"") or greeting.startswith(b"421")
            busy.sendall(b"Subject: last\r\n\r\nhi\r\n.\r\n")
            assert b"250 2.0.0" in read_until(busy, b"250 2.0.0")
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()


def test_a_worker_killed_at_the_end_of_the_shutdown_is_logged() -> None:
    # A delivery stuck past the grace: the worker was killed in silence and the server
    # exited 0.  (In a process of its own: _stop_all reaps any child of its process.)
    script = (
        "import subprocess, sys, time\n"
        "from mailgate.ops.logging import setup_logging\n"
        "from mailgate.config.ops import LoggingConfig\n"
        "from mailgate.supervisor import Supervisor\n"
        "setup_logging(LoggingConfig())\n"
        "stuck = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        "time.sleep(0.5)\n"
        "sup = Supervisor.__new__(Supervisor)\n"
        "sup.pids = {stuck.pid: 1}\n"
        "sup._metrics_pid = 0\n"
        "print(sup._stop_all(grace=0.5), stuck.poll() is not None)\n"
    )
    done = _python(script)
    assert done.stdout.split() == ["False", "True"]
    assert "event=worker_killed" in done.stderr and "worker=1" in done.stderr


def test_one_worker_per_cpu_means_the_cpus_this_process_may_use() -> None:
    # os.cpu_count() ignored affinity (taskset, a container's cpuset) and the cap:
    # a 2-CPU container on a 128-core host forked 128 workers
    script = (
        "import os\n"
        "from mailgate.config.schema import Config\n"
        "from mailgate.supervisor import worker_count\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "config = Config()\n"
        "config.server.workers = 0\n"
        "print(worker_count(config))\n"
        "config.server.workers = 3\n"
        "print(worker_count(config))\n"
    )
    done = _python(script)
    assert done.stdout.split() == ["1", "3"], done.stderr


def _python(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user's needs root")
def test_metrics_directories_of_the_servers_user_are_removed_too(tmp_path: Path) -> None:
    # Started as root, the supervisor chowns its directory to server.user: the next
    # start (as root) must know those as its own.
    import pwd

    from mailgate.supervisor import _remove_dead_metrics_dirs

    gone = subprocess.Popen(["true"])
    gone.wait()
    left = Path(tempfile.gettempdir()) / f"mailgate-metrics-{gone.pid}-chowned"
    left.mkdir()
    nobody = pwd.getpwnam("nobody").pw_uid
    os.chown(left, nobody, -1)
    try:
        _remove_dead_metrics_dirs({os.geteuid()})
        assert left.exists()  # not ours by that list
        _remove_dead_metrics_dirs({os.geteuid(), nobody})
        assert not left.exists()
    finally:
        shutil.rmtree(left, ignore_errors=True)
