"""Several worker processes on the same listening sockets (``server.workers``).

One Python process uses one core.  With workers, a small supervisor binds the
listeners, cleans up after a crash and drops privileges once, then forks the workers;
each runs a whole server (its own event loop, policy, delivery and group commit) and
accepts from the shared sockets, so the kernel hands a new connection to whichever
worker is free to accept it.  Connection limits are counted across workers in shared
memory (server/limits.py).

The supervisor only relays signals: SIGHUP reaches every worker (each reloads, as a
single process would), SIGTERM/SIGINT stop them gracefully.  It runs no thread of its
own, since it forks (a child of a threaded process may inherit a lock some other
thread held): /metrics is served by a small process of its own, restarted if it
dies.  A worker that dies is started again, from the configuration as last
reloaded.  At start-up a worker that cannot start stops the whole server (the others
would fail the same way); later, a replacement that cannot start is retried with a
growing delay, and when no worker is left the supervisor exits with status 1 so that
the service manager notices.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailgate.auth.throttle import SharedFailureCounter
from mailgate.config.errors import ConfigError
from mailgate.config.loader import naming_file
from mailgate.config.restart import keep_restart_only, restart_only_changes
from mailgate.config.schema import Config
from mailgate.config.server import MAX_WORKERS
from mailgate.delivery.factory import build_router
from mailgate.ops.logging import flush_logs, log_event, setup_logging
from mailgate.ops.metrics import (
    bind_metrics,
    forget_worker,
    serve_shared_directory,
    write_to_shared_directory,
)
from mailgate.server.limits import ConnectionCounts

if TYPE_CHECKING:
    from mailgate.app import Overrides

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
START_TIMEOUT = 60.0  # seconds a worker may take to build its parts and listen
RESTART_PAUSE = 1.0  # at least this long between two starts of the same worker
MAX_RETRY_DELAY = 30.0  # a worker that cannot start is tried again this often, at most
KILL_AFTER = 15.0  # after the shutdown grace, stragglers are killed
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
METRICS_DIR_PREFIX = "mailgate-metrics-"  # + the supervisor's pid: see _serve_metrics


def worker_count(config: Config) -> int:
    """server.workers, or with 0 one per CPU this process may run on (its affinity:
    taskset, a cgroup's cpuset), at most MAX_WORKERS."""
    if config.server.workers:
        return config.server.workers
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


@dataclass
class WorkerShared:
    """What the workers of one server count together, in memory made before the fork:
    connections (server.max_connections*) and AUTH failures (auth.throttle_*)."""

    connections: ConnectionCounts
    auth_failures: SharedFailureCounter

    def use_row(self, index: int) -> None:
        """In worker ``index``: count in that worker's rows."""
        self.connections.use_row(index)
        self.auth_failures.use_row(index)


class Supervisor:
    """Binds, forks ``server.workers`` workers, relays signals and restarts the dead."""

    def __init__(
        self, config: Config, config_path: str | None, overrides: Overrides | None = None
    ) -> None:
        from mailgate.app import Overrides, default_hostname

        self.config = config
        self.config_path = config_path
        self.overrides = overrides or Overrides()
        # Every worker must name itself the same way (greeting, Received).
        config.server.hostname = config.server.hostname or default_hostname()
        self.workers = worker_count(config)
        self.shared = WorkerShared(
            ConnectionCounts(self.workers),
            SharedFailureCounter(config.auth.throttle_window, self.workers),
        )
        self.sockets: list[list[socket.socket]] = []
        self.pids: dict[int, int] = {}  # pid -> worker index
        self._started: dict[int, float] = {}  # worker index -> monotonic start time
        self._retry: dict[int, tuple[float, float]] = {}  # index -> (when, delay) to retry
        self.metrics_dir = ""  # where the workers write their metrics, when served
        self._metrics_sock: socket.socket | None = None  # bound before the privilege drop
        self._metrics_pid = 0  # the process serving /metrics
        self._metrics_started = 0.0

    def run(self) -> int:
        from mailgate.app import (
            bind_all,
            clean_leftovers,
            describe_delivery,
            drop_privileges,
            load_before_drop,
            recover_mboxes,
            warn_of_delivery,
        )

        config = self.config
        setup_logging(config.logging)
        hostname = config.server.hostname
        self.sockets = bind_all(config)
        try:
            self._serve_metrics()
            load_before_drop(config)
            drop_privileges(config)
            # what a crash left, as the server's user (as root, a symlink planted
            # under maildir_root had root delete files anywhere)
            router = clean_leftovers(config)
            recover_mboxes(router)
            warn_of_delivery(router, config)  # once for all workers, as the user they run as
        except BaseException:
            self._close()
            raise
        # Blocked here and in the children until they unblock them: a signal sent
        # while a worker is being forked must not be lost or kill it half-made.
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            self._start_metrics()
            failed = self._start_all()
            if failed is not None:
                self._stop_all(grace=0.0)
                return failed
            bound = [s.getsockname() for socks in self.sockets for s in socks]
            where = ", ".join(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p, *_ in bound)
            print(
                f"mailgate {hostname}: listening on {where}; delivering to "
                f"{describe_delivery(config)}; {self.workers} workers",
                flush=True,
            )
            log_event("started", hostname=hostname, listeners=len(bound), workers=self.workers)
            status = self._supervise()
        finally:
            # The signals stay blocked: a second SIGTERM (a service manager's and a
            # terminal's) must not kill the supervisor before its last log line.
            if self.pids:  # left by an unexpected error: the workers go too
                self._stop_all(grace=self.config.server.shutdown_grace + KILL_AFTER)
            self._close()
        log_event("stopped")
        flush_logs()
        return status

    def _serve_metrics(self) -> None:
        listen = self.config.metrics.listen
        if not listen:
            return
        user = self.config.server.user
        owners = {os.geteuid()}
        if user and os.geteuid() == 0:  # (ours were chowned to it: see below)
            with contextlib.suppress(KeyError):
                owners.add(pwd.getpwnam(user).pw_uid)
        _remove_dead_metrics_dirs(owners)
        # (the supervisor's pid in the name: one SIGKILLed cannot remove its own, and
        # the next start knows which are left by a dead one)
        self.metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
        user = self.config.server.user
        if user and os.geteuid() == 0:  # the workers write here after the drop
            shutil.chown(self.metrics_dir, user)
        self._metrics_sock = bind_metrics(listen)

    def _start_metrics(self) -> None:
        """Fork the process that serves /metrics (its server runs threads)."""
        sock = self._metrics_sock
        if sock is None:
            return
        flush_logs()
        sys.stdout.flush()
        sys.stderr.flush()
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:
            _die_with(supervisor)
            try:
                for signo in SIGNALS:
                    signal.signal(signo, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
                for listening in (s for socks in self.sockets for s in socks):
                    listening.close()  # only the workers answer SMTP
                serve_shared_directory(sock, self.metrics_dir)
            except BaseException as exc:
                log_event("metrics_failed", level="error", error=repr(exc)[:500])
                flush_logs()
            finally:
                os._exit(1)
        self._metrics_pid = pid
        self._metrics_started = time.monotonic()
        log_event("metrics_started", pid=pid)

    def close_metrics_socket(self) -> None:
        """In a worker: the /metrics socket is not its business."""
        if self._metrics_sock is not None:
            self._metrics_sock.close()
            self._metrics_sock = None

    def _metrics_exited(self, status: int) -> None:
        log_event("metrics_exited", level="error", pid=self._metrics_pid, **_how(status))
        self._metrics_pid = 0
        pause = self._metrics_started + RESTART_PAUSE - time.monotonic()
        if pause > 0:
            time.sleep(pause)  # one that keeps dying must not spin
        self._start_metrics()

    def _close_listeners(self) -> None:
        for sock in (s for socks in self.sockets for s in socks):
            sock.close()

    def _close(self) -> None:
        self._close_listeners()
        if self._metrics_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._metrics_pid, signal.SIGTERM)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._metrics_pid, 0)
            self._metrics_pid = 0
        self.close_metrics_socket()
        if self.metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    # -- starting ---------------------------------------------------------------------

    def _start_all(self) -> int | None:
        """Start every worker and wait until each listens; the exit status if one failed."""
        for index in range(self.workers):
            failed = self._start(index)
            if failed is not None:
                return failed
        return None

    def _start(self, index: int) -> int | None:
        ready_r, ready_w = os.pipe()
        flush_logs()
        sys.stdout.flush()
        sys.stderr.flush()
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            _die_with(supervisor)
            os.close(ready_r)
            os._exit(_worker(self, index, ready_w))
        os.close(ready_w)
        self.pids[pid] = index
        self._started[index] = time.monotonic()
        try:
            ready, _, _ = select.select([ready_r], [], [], START_TIMEOUT)
            if ready and os.read(ready_r, 1) == b"R":
                return None
        finally:
            os.close(ready_r)
        # It exited (or hung) before listening: collect its status.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        del self.pids[pid]
        code = os.waitstatus_to_exitcode(status)
        return code if code > 0 else 1

    # -- running ----------------------------------------------------------------------

    def _supervise(self) -> int:
        """Relay signals and keep the workers running; the exit status."""
        while True:
            info = signal.sigtimedwait(SIGNALS, 1.0)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                log_event("shutdown", workers=len(self.pids))
                # The workers close their copies; with ours open the kernel would go
                # on completing connections nobody accepts (no greeting, a reset at
                # exit) where a client should be refused and try the next MX.
                self._close_listeners()
                # a worker that had to be killed: not a clean stop (a service manager
                # should see it)
                clean = self._stop_all(grace=self.config.server.shutdown_grace + KILL_AFTER)
                return 0 if clean else 1
            if info is not None and info.si_signo == signal.SIGHUP:
                self._reload()
            elif info is not None and info.si_signo == signal.SIGCHLD:
                self._reap()
            self._retry_due()
            if not self.pids:
                # Nothing serves the sockets any more: better a clean exit the
                # service manager sees (and restarts) than clients queueing forever.
                log_event("no_workers", level="error", failing=len(self._retry))
                return 1

    def _reload(self) -> None:
        from mailgate.app import check_parts, default_hostname, load_overridden

        try:
            # a broken file, or parts that will not build (a users file, an access
            # list, certificates): one error here, not one per worker, and the old
            # configuration stays, for the workers and for any started later
            fresh = load_overridden(self.config_path, self.overrides)
            problems = check_parts(fresh).problems
            if problems:
                raise ConfigError(problems)
        except Exception as exc:  # (whatever it is, the running server must stay up)
            log_event("reload", level="error", outcome="refused",
                      error=naming_file(self.config_path, str(exc))[:500] or repr(exc))
            return
        # Told here once, not by every worker (the workers' reload does not say it).
        restart_needed = restart_only_changes(self.config, fresh)
        # What a worker started from now on runs with, as the running workers reload:
        # sockets, spool, logs and metrics as set up, the machine's name unless the
        # file (or --hostname) gives one.
        keep_restart_only(self.config, fresh)
        fresh.server.hostname = fresh.server.hostname or default_hostname()
        self.config = fresh
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        if restart_needed:
            log_event("reload", level="warning", outcome="relayed",
                      restart_needed=",".join(restart_needed))
        self._warn_of_delivery(fresh)

    @staticmethod
    def _warn_of_delivery(config: Config) -> None:
        """The start-up's delivery warnings, once for all workers, after a reload."""
        from mailgate.app import warn_of_delivery

        with contextlib.suppress(ValueError, OSError):  # the workers report those
            warn_of_delivery(build_router(config.delivery, config.server.hostname), config)

    def _reap(self) -> None:
        while self.pids:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return
            if pid == self._metrics_pid:
                self._metrics_exited(status)
                continue
            index = self.pids.pop(pid, None)
            if index is None:
                continue
            if self.metrics_dir:
                forget_worker(pid, self.metrics_dir)
            log_event("worker_exited", level="error", worker=index, pid=pid, **_how(status))
            # Its connections died with it; its AUTH failure counts stay for the next.
            self.shared.connections.clear_row(index)
            from mailgate.app import clean_leftovers, recover_mboxes

            try:
                # its half-received and half-delivered mail
                recover_mboxes(clean_leftovers(self.config))
            except (OSError, ValueError) as exc:
                log_event("cleanup", level="error", error=str(exc)[:300])
            pause = self._started[index] + RESTART_PAUSE - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # a worker that keeps crashing must not spin
            self._restart(index, RESTART_PAUSE)

    def _restart(self, index: int, delay: float) -> None:
        failed = self._start(index)
        if failed is None:
            self._retry.pop(index, None)
            return
        # Try again later, less and less often: the cause (a certificate, a full disk)
        # may be fixed without a restart of the whole server.
        log_event("worker_failed", level="error", worker=index, status=failed, retry_in=delay)
        self._retry[index] = (time.monotonic() + delay, min(delay * 2, MAX_RETRY_DELAY))

    def _retry_due(self) -> None:
        now = time.monotonic()
        for index, (when, delay) in list(self._retry.items()):
            if when <= now:
                self._restart(index, delay)

    def _stop_all(self, grace: float) -> bool:
        """Stop every worker, killing those still running after ``grace`` seconds;
        whether all of them ended on their own."""
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.pids:
            pid, _status = os.waitpid(-1, os.WNOHANG)
            if pid == self._metrics_pid:
                self._metrics_pid = 0  # reaped: never signal that pid again
            if pid:
                self.pids.pop(pid, None)
                continue
            if time.monotonic() >= deadline:
                for straggler in list(self.pids):
                    if grace > 0:  # (a delivery stuck past the grace: no answer sent)
                        log_event("worker_killed", level="error", worker=self.pids[straggler],
                                  pid=straggler, after=grace)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(straggler, signal.SIGKILL)
                    os.waitpid(straggler, 0)
                    del self.pids[straggler]
                return False
            time.sleep(0.05)
        return True


def _how(status: int) -> dict[str, object]:
    """How a child ended, for its log line: its exit status, or the signal that killed
    it, by name (status=-9 said little to an operator)."""
    code = os.waitstatus_to_exitcode(status)
    return {"signal": _signal_name(-code)} if code < 0 else {"status": code}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # (a real-time signal has no name)
        return str(number)


def _die_with(supervisor: int) -> None:
    """In a child just forked: be sent SIGTERM when the supervisor dies, however it
    dies (SIGKILL too), so that no worker or metrics process lives on holding the
    sockets a restarted server must bind.  The signal is still blocked here; a child
    whose supervisor is already gone gets it as soon as it unblocks it."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return  # not allowed here: the service manager's cgroup still cleans up
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != supervisor:  # it died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker(supervisor: Supervisor, index: int, ready_fd: int) -> int:
    """The body of worker ``index`` (in the forked child); its exit status."""
    from mailgate.app import run_worker

    for signo in SIGNALS:
        signal.signal(signo, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    supervisor.shared.use_row(index)
    supervisor.close_metrics_socket()  # served by the metrics process alone
    if supervisor.metrics_dir:
        write_to_shared_directory(supervisor.metrics_dir)
    try:
        return run_worker(
            supervisor.config, supervisor.config_path, supervisor.shared, supervisor.sockets,
            index, ready_fd, supervisor.overrides,
        )
    # Logged, not printed: logging is set up (JSON or syslog must get them too).
    except (ConfigError, ValueError) as exc:  # DeliveryConfigError is a ValueError
        log_event("worker_error", level="error", worker=index,
                  error=naming_file(supervisor.config_path, str(exc))[:500])
        return 2
    except OSError as exc:
        log_event("worker_error", level="error", worker=index,
                  error=f"cannot start: {exc}"[:500])
        return 1
    except BaseException as exc:  # whatever happens, the child exits with a status
        log_event("worker_error", level="error", worker=index, error=repr(exc)[:500])
        return 1
    finally:
        flush_logs()


def _remove_dead_metrics_dirs(owners: set[int]) -> None:
    """Remove the metrics directories that supervisors killed outright (SIGKILL, a
    crash) left behind: ours (owned by one of ``owners``), named with a process id
    that no longer runs."""
    base = tempfile.gettempdir()
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        if not name.startswith(METRICS_DIR_PREFIX):
            continue
        pid_text = name[len(METRICS_DIR_PREFIX):].split("-", 1)[0]
        path = os.path.join(base, name)
        try:
            if not pid_text.isdigit() or os.lstat(path).st_uid not in owners:
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue  # alive but not ours to signal, or gone meanwhile
