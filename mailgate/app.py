"""The composition root: builds every part from the configuration and runs the server.

Only this module and the CLI know all the parts; policy and delivery never see the
server, and the server sees them only through their interfaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import socket
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from mailgate.auth.factory import build_authenticator
from mailgate.auth.throttle import Failures
from mailgate.config.delivery import LOCAL_DESTINATION
from mailgate.config.errors import ConfigError
from mailgate.config.loader import Findings, load_config, naming_file, split_host_port
from mailgate.config.names import dotted_key
from mailgate.config.restart import keep_restart_only, restart_only_changes
from mailgate.config.schema import Config
from mailgate.config.server import ListenerConfig
from mailgate.delivery.factory import build_router
from mailgate.delivery.maildir import MaildirDestination
from mailgate.delivery.mbox import MboxDestination
from mailgate.delivery.pipe import PipeDestination
from mailgate.delivery.router import Router
from mailgate.delivery.smarthost import SmarthostDestination
from mailgate.delivery.spool import SpoolDir, unwritable
from mailgate.ops.logging import flush_logs, log_event, setup_logging
from mailgate.ops.metrics import Metrics, bind_metrics
from mailgate.policy.factory import build_policy
from mailgate.server.context import (
    ListenerContext,
    ServerContext,
    listener_settings,
    with_normalize,
)
from mailgate.server.descriptors import limit_problem, raise_limit
from mailgate.server.limits import ConnectionCounts
from mailgate.server.listen import bind_listener
from mailgate.server.session import Session
from mailgate.server.tls_accept import TlsAcceptor
from mailgate.tls import TLSContexts

if TYPE_CHECKING:
    from mailgate.supervisor import WorkerShared

RETIRE_AFTER = 600.0  # seconds a replaced policy/router stays open after a reload
# seconds sessions still busy after the shutdown grace get to reach a safe point (421)
# before they are answered 421 as they are and the process ends
SHUTDOWN_WAIT = 10.0


def default_hostname() -> str:
    """The machine's fully qualified name, falling back to its plain host name."""
    name = socket.gethostname()
    if "." not in name:
        with contextlib.suppress(OSError):
            fqdn = socket.getfqdn(name)
            if "." in fqdn and not fqdn.startswith("localhost"):
                name = fqdn
    return name or "localhost"


def _load_named(path: str | None, overrides: Overrides) -> Config:
    """A reload's config, with the machine's name where the file gives none (as at
    start: one taken out of the file must not stay until a restart).  Run in a
    thread: that name may take a DNS lookup (getfqdn), which must not stop every
    session meanwhile."""
    config = load_overridden(path, overrides)
    config.server.hostname = config.server.hostname or default_hostname()
    return config


@dataclass
class Overrides:
    """Command-line settings that win over the config file."""

    listen: list[str] = field(default_factory=list)
    hostname: str | None = None


def apply_overrides(config: Config, overrides: Overrides) -> Config:
    """``config`` with the command line's settings; ValueError naming the option."""
    if overrides.listen:
        try:
            for address in overrides.listen:
                split_host_port(address)  # (the form, as the loader checks the file's)
            config.listener = [ListenerConfig(address=addr) for addr in overrides.listen]
            config.check_listeners()  # (overlaps, what bind refuses: as for the file's)
        except ValueError as exc:
            raise ValueError(f"--listen: {exc}") from None
    if overrides.hostname:
        config.server.hostname = overrides.hostname
    return config


def load_overridden(path: str | None, overrides: Overrides) -> Config:
    """The file's configuration with the command line's settings on top, as at start:
    a reload must not drop ``--listen`` or ``--hostname``."""
    return apply_overrides(load_config(path), overrides)


def check_parts(config: Config) -> Findings:
    """``check-config``: build what ``serve`` would build from ``config`` and return
    what it would refuse (a certificate that does not match its key, a users file or
    access list it cannot use, an unknown destination), one line each, and what it
    would warn of at start-up (a maildir root it cannot write in).

    Without side effects: nothing is bound, and the greylist database is not opened
    (that would create it, as whoever runs the check); only its directory is checked.
    """
    hostname = config.server.hostname or default_hostname()
    problems: list[str] = []

    def attempt(build: Callable[[], object]) -> object | None:
        try:
            return build()
        except (ConfigError, ValueError, OSError, ssl.SSLError) as exc:
            problems.extend(exc.errors if isinstance(exc, ConfigError) else [str(exc)])
            return None

    ids = attempt(lambda: run_as(config))
    # what serve checks after dropping privileges, checked here for that user
    as_ids = ids if isinstance(ids, tuple) and os.geteuid() == 0 else None
    attempt(lambda: TLSContexts(config.tls))
    attempt(lambda: build_authenticator(
        config.auth, hostname=hostname,
        local_domains=config.delivery.local_domains or [hostname, "localhost"],
    ))
    router = attempt(lambda: build_router(config.delivery, hostname))
    warnings: list[str] = []
    if isinstance(router, Router):
        no_greylist = replace(config, greylist=replace(config.greylist, enabled=False))
        policy = attempt(lambda: build_policy(no_greylist, router, hostname))
        asyncio.run(_close_parts(policy, router))
        warnings = ([text for _, text in destination_problems(router, as_ids)]
                    + router.postmaster_problems() + router.alias_problems())
    warnings += setting_warnings(config)
    spool = SpoolDir(config.server.spool_dir).problem(as_ids)
    if spool:
        problems.append(spool)
    grey = config.greylist
    if grey.enabled and grey.backend == "sqlite":
        # imported here, as in policy/factory.py: only greylisting needs the backends
        from mailgate.policy.store import database_problem, path_problem

        unusable = path_problem(grey.sqlite_path)
        # SQLite in WAL mode makes its -wal and -shm files beside the database: the
        # server's user must be able to write in that directory, made or not
        directory = os.path.dirname(os.path.abspath(grey.sqlite_path))
        if not unusable and unwritable(directory, as_ids) is not None:
            unusable = f"{directory} is not a directory this user can write in"
        if unusable:
            problems.append(f"greylist.sqlite_path: {unusable}")
        broken = database_problem(grey.sqlite_path)
        if broken:  # (the server starts, and fails open: a warning)
            warnings.append(f"greylist.sqlite_path: {broken}")
    return Findings(problems, warnings)


def destination_problems(
    router: Router, as_ids: tuple[int, int] | None = None
) -> list[tuple[str, str]]:
    """Why the router's Maildir destinations could not store mail, its pipe mailers
    could not be run or its smarthosts' password files could not be read, as this
    process (or ``as_ids``), each with the event that logs it (``maildir``,
    ``mailer``, ``smarthost``); warnings, not refusals: maildirs made beforehand may
    still take mail, a mailer may be installed later."""
    found = []
    for name, destination in router.destinations.items():
        if isinstance(destination, MaildirDestination | PipeDestination | SmarthostDestination):
            problem = destination.problem(as_ids)
            if not problem:
                continue
            where = dotted_key("delivery.destinations", name)
            if isinstance(destination, PipeDestination):
                found.append(("mailer", f"{where}.pipe.command: {problem}"))
            elif isinstance(destination, SmarthostDestination):
                found.append(("smarthost", f"{where}.smtp.password_file: {problem}"))
            elif name == LOCAL_DESTINATION:
                found.append(("maildir", f"delivery.maildir_root: {problem}"))
            else:
                found.append(("maildir", f"{where}.maildir.root: {problem}"))
    return found


def warn_of_delivery(router: object, config: Config) -> None:
    """At start-up and after a reload, as the server's user: the destination_problems,
    postmaster_problems, alias_problems and setting_warnings, logged (check-config
    prints the same as warnings)."""
    if isinstance(router, Router):
        for event, problem in destination_problems(router):
            log_event(event, level="warning", problem=problem)
        for problem in router.postmaster_problems():
            log_event("postmaster", level="warning", problem=problem)
        for problem in router.alias_problems():
            log_event("alias", level="warning", problem=problem)
    for problem in setting_warnings(config):
        log_event("config", level="warning", problem=problem)


def setting_warnings(config: Config) -> list[str]:
    """Settings that work but that an administrator would not want unknowingly."""
    found = []
    hostname = config.server.hostname or default_hostname()
    if "." not in hostname.strip("."):
        found.append(
            f"server.hostname: {hostname!r} is not a fully qualified domain name (RFC 5321 "
            "4.1.1.1 and 4.2: the greeting and EHLO name the host by one); set it"
        )
    if os.geteuid() == 0 and not config.server.user:
        found.append(
            "server.user: empty, and running as root: every mailbox write and every pipe "
            "mailer runs as root; set a user of its own (see deployment.md)"
        )
    if config.server.group and not config.server.user:
        found.append("server.group: used only with server.user, which is empty")
    for n, listener in enumerate(config.listener, 1):
        if listener.role == "public" and listener.require_tls:
            found.append(
                f"listener[{n}].require_tls: a public (port 25) listener that requires "
                "STARTTLS refuses every MTA that does not offer it (RFC 3207 4: a "
                "publicly-referenced server MUST NOT require it)"
            )
        if listener.role != "public" and not config.auth.users_file:
            found.append(
                f"listener[{n}].role: {listener.role} without [auth] users_file takes mail "
                "from anyone, as port 25 does (RFC 6409 4.3: submission is for users "
                "who authenticate)"
            )
    # RFC 5321 4.5.3.2: a client waits at least 5 minutes for most replies and the
    # server SHOULD wait as long; shorter cuts off slow but honest senders
    server = config.server
    for key, value, least in (("command_timeout", server.command_timeout, 300),
                              ("data_timeout", server.data_timeout, 180)):
        if value < least:
            found.append(f"server.{key}: {value:g} s is below RFC 5321 4.5.3.2's "
                         f"{least} s: slow but honest clients are cut off")
    descriptors = limit_problem(server.max_connections)
    if descriptors:
        found.append(descriptors)
    return found


def build_context(
    config: Config,
    counts: ConnectionCounts | None = None,
    auth_failures: Failures | None = None,
) -> ServerContext:
    hostname = config.server.hostname or default_hostname()
    router = build_router(config.delivery, hostname)
    policy = build_policy(config, router, hostname)
    tls = TLSContexts(config.tls)
    authenticator = build_authenticator(
        config.auth,
        hostname=hostname,
        local_domains=config.delivery.local_domains or [hostname, "localhost"],
        failures=auth_failures,
    )
    metrics = Metrics.from_config(config.metrics)
    return ServerContext(
        config=config,
        hostname=hostname,
        policy=policy,
        delivery=router,
        mailboxes=router,
        spool=SpoolDir(config.server.spool_dir),
        authenticator=authenticator,
        tls=tls,
        metrics=metrics,
        counts=counts,
    )


def build_listeners(ctx: ServerContext) -> list[ListenerContext]:
    config = ctx.config
    starttls = ctx.tls.server_context() is not None
    mechanisms = list(ctx.authenticator.mechanisms) if ctx.authenticator else []
    out = []
    for entry in config.listener:
        settings = listener_settings(
            config, entry, ctx.hostname, starttls, mechanisms, ctx.authenticator is not None
        )
        out.append(
            ListenerContext(
                name=f"{entry.role}:{entry.address}",
                config=entry,
                settings=settings,
                settings_normalized=with_normalize(settings),
                implicit_tls=entry.role == "smtps",
            )
        )
    return out


def bind_all(config: Config) -> list[list[socket.socket]]:
    """The sockets of every configured listener, in order (OSError if one fails)."""
    bound: list[list[socket.socket]] = []
    try:
        for entry in config.listener:
            bound.append(bind_listener(entry.address))
    except BaseException:
        for sock in (s for socks in bound for s in socks):
            sock.close()
        raise
    return bound


def clean_leftovers(config: Config) -> Router:
    """Before any session: what a crash left in the spool and in Maildir tmp/ (files
    of living workers are recognised by their pid and left alone); the router whose
    destinations it looked in (recover_mboxes does the mbox files, after the drop)."""
    removed = SpoolDir(config.server.spool_dir).cleanup()
    if removed:
        log_event("spool_cleanup", removed=removed)
    router = build_router(config.delivery, config.server.hostname or default_hostname())
    for name, destination in router.destinations.items():
        if isinstance(destination, MaildirDestination):
            removed = destination.cleanup_tmp()  # a crash's half-written deliveries
            if removed:
                log_event("maildir_cleanup", destination=name, removed=removed)
    return router


def recover_mboxes(router: Router) -> None:
    """What writers that died in the middle of an mbox append left, cut off: as the
    server's user, after the privilege drop (it truncates files in directories local
    users may write in)."""
    for name, destination in router.destinations.items():
        if isinstance(destination, MboxDestination):
            mended = destination.recover_dead_appends()
            if mended:
                log_event("mbox_cleanup", destination=name, mended=mended)


def run_as(config: Config) -> tuple[int, int] | None:
    """The (uid, gid) of server.user and server.group, None when no user is set;
    ConfigError naming the key when a user or group does not exist."""
    import grp
    import pwd

    settings = config.server
    if not settings.user:
        return None
    try:
        pw = pwd.getpwnam(settings.user)
    except KeyError:
        raise ConfigError([f"server.user: no such user {settings.user!r}"]) from None
    if not settings.group:
        return pw.pw_uid, pw.pw_gid
    try:
        return pw.pw_uid, grp.getgrnam(settings.group).gr_gid
    except KeyError:
        raise ConfigError([f"server.group: no such group {settings.group!r}"]) from None


def drop_privileges(config: Config) -> None:
    """Bind low ports as root, then run as the configured user (server.user)."""
    if os.geteuid() != 0:
        return
    ids = run_as(config)
    if ids is None:
        return
    uid, gid = ids
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)
    log_event("privileges_dropped", user=config.server.user, gid=gid)


class MailServer:
    """Listeners, signals, reload and graceful shutdown around one ServerContext."""

    def __init__(
        self, config: Config, config_path: str | None = None,
        counts: ConnectionCounts | None = None,
        auth_failures: Failures | None = None,
        overrides: Overrides | None = None,
    ) -> None:
        self.config_path = config_path
        self.overrides = overrides or Overrides()
        # (a worker inherits the supervisor's raised limit; a reload may need more)
        raise_limit(config.server.max_connections)
        self.ctx = build_context(config, counts, auth_failures)
        self._auth_failures = auth_failures  # the workers' shared counts, if any
        self.listeners = build_listeners(self.ctx)
        self._follow_users()
        self.servers: list[asyncio.base_events.Server | TlsAcceptor] = []
        self._stop = asyncio.Event()
        self.supervised = False  # a worker of a supervisor (sockets bound for it)
        # A worker's lines about itself (reload, shutdown) say which one: with three,
        # three alike lines could not be told apart.
        self.who: dict[str, object] = {}
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False  # a SIGHUP came while a reload ran

    async def start(
        self, sockets: list[list[socket.socket]], *, supervised: bool,
        metrics_socket: socket.socket | None = None,
    ) -> list[tuple[str, int]]:
        """Serve every listener on ``sockets`` (one list per listener), bound, like the
        leftovers cleaned and the privileges dropped, before this server was made
        (:func:`prepare_alone`, or the supervisor of several workers); returns the
        bound (host, port) pairs.  ``metrics_socket``: a single process's /metrics.
        """
        loop = asyncio.get_running_loop()
        self.supervised = supervised
        if metrics_socket is not None:  # with workers the supervisor serves them
            self.ctx.metrics.start(metrics_socket)
        if not supervised:
            warn_of_delivery(self.ctx.delivery, self.ctx.config)  # (the supervisor's, with workers)
        # As the user that will write it, before taking any mail: an unusable spool
        # would otherwise answer every message 452.
        self.ctx.spool.ensure()
        bound = []
        for listener, socks in zip(self.listeners, sockets, strict=True):
            ssl_ctx = self.ctx.tls.server_context() if listener.implicit_tls else None
            if listener.implicit_tls and ssl_ctx is None:
                raise ConfigError([f"listener {listener.config.address}: role smtps needs [tls]"])
            for sock in socks:
                if listener.implicit_tls:
                    # (admitted before the handshake: see server/tls_accept.py)
                    acceptor = TlsAcceptor(self.ctx, listener, sock, self.ctx.tls.server_context)
                    acceptor.start()
                    self.servers.append(acceptor)
                else:
                    server = await loop.create_server(
                        lambda lc=listener: Session(self.ctx, lc), sock=sock, backlog=1024
                    )
                    self.servers.append(server)
                addr = sock.getsockname()
                bound.append((addr[0], addr[1]))
        return bound

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    def request_reload(self) -> None:
        """SIGHUP.  Reloads run one at a time: one asked for while another runs is done
        once after it, reading the file then.  Run side by side, a slow one (a large
        alias list) could finish last and put an older file back in force."""
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload_until_current())

    async def _reload_until_current(self) -> None:
        while True:
            self._reload_again = False
            await self.reload()
            if not self._reload_again:
                return

    async def reload(self) -> None:
        """SIGHUP: a new config, users, aliases, access lists and certificates for new
        work; sessions in progress keep going.  A broken config changes nothing."""
        try:
            # read and checked in a thread: the sessions go on meanwhile
            config = await asyncio.to_thread(_load_named, self.config_path, self.overrides)
            # Under a supervisor it tells these once for all workers.
            restart_needed = [] if self.supervised else restart_only_changes(
                self.ctx.config, config
            )
            keep_restart_only(self.ctx.config, config)  # sockets, spool... as set up
            # The AUTH failure counts go on: a reload must not reset a guesser's budget.
            old = self.ctx.authenticator
            failures = old.failures if old else self._auth_failures
            fresh = build_context(config, auth_failures=failures)
        except Exception as exc:  # (whatever it is, the running server must stay up)
            log_event("reload", level="error", outcome="refused",
                      error=naming_file(self.config_path, str(exc))[:500] or repr(exc),
                      **self.who)
            return
        raise_limit(fresh.config.server.max_connections)
        ctx = self.ctx
        retired = (ctx.policy, ctx.delivery)
        ctx.use_config(fresh.config, fresh.hostname)
        ctx.policy = fresh.policy
        ctx.delivery = fresh.delivery
        ctx.mailboxes = fresh.mailboxes
        # Calls already running on the old policy and router may still need them for
        # a while: close them (greylist store, LMTP verifier) only after a grace period.
        asyncio.get_running_loop().call_later(
            RETIRE_AFTER, lambda: asyncio.ensure_future(_close_parts(*retired))
        )
        ctx.authenticator = fresh.authenticator
        if ctx.authenticator is not None:  # (read anew: say so, as a re-read before AUTH does)
            ctx.authenticator.log_loaded(**self.who)
        self._follow_users()
        try:
            # New contexts; STARTTLS and implicit-TLS connections ask for the current
            # one each time, so new handshakes use them at once.
            ctx.tls.reload(fresh.config.tls)
        except (ValueError, OSError) as exc:
            log_event("reload", level="error", outcome="tls_refused", error=str(exc)[:500],
                      **self.who)
        self.listeners_settings_refresh()
        log_reloaded(restart_needed, **self.who)
        if not self.supervised:  # with workers, the supervisor says it once
            warn_of_delivery(ctx.delivery, ctx.config)

    def _follow_users(self) -> None:
        """A users file picked up between reloads can change the mechanisms on offer
        (CRAM-MD5 needs a stored secret): the listeners then advertise the new set."""
        if self.ctx.authenticator is not None:
            self.ctx.authenticator.on_change = self.listeners_settings_refresh

    def listeners_settings_refresh(self) -> None:
        fresh = build_listeners(self.ctx)
        for old, new in zip(self.listeners, fresh, strict=True):
            old.settings = new.settings
            old.settings_normalized = new.settings_normalized

    async def wait_stopped(self) -> None:
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting; 421 each session once it is between transactions, giving
        messages under way up to the grace period; then 421 the rest."""
        for server in self.servers:
            server.close()
        log_event("shutdown", sessions=len(self.ctx.sessions), **self.who)
        for session in list(self.ctx.sessions):
            session.request_drain()
        grace = self.ctx.config.server.shutdown_grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.ctx.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.ctx.sessions):
            session.request_shutdown()
        deadline = loop.time() + SHUTDOWN_WAIT
        while self.ctx.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        ending = [task for s in list(self.ctx.sessions) if (task := s.abandon()) is not None]
        if ending:  # (cancelled: a mailer is killed, the lines of their ends logged)
            await asyncio.wait(ending, timeout=5)
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)
        await _close_parts(self.ctx.policy, self.ctx.delivery)
        self.ctx.metrics.flush()  # the last second's updates, before the process ends


def log_reloaded(restart_needed: list[str], **who: object) -> None:
    """The reload's log line; a warning naming the changed keys that wait for a restart."""
    if restart_needed:
        log_event("reload", level="warning", outcome="ok",
                  restart_needed=",".join(restart_needed), **who)
    else:
        log_event("reload", outcome="ok", **who)


async def _close_parts(*parts: object) -> None:
    """Close a policy's and a router's resources, whichever they have."""
    for part in parts:
        close = getattr(part, "close", None) or getattr(part, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


def describe_delivery(config: Config) -> str:
    delivery = config.delivery
    return os.path.abspath(delivery.maildir_root)


def load_before_drop(config: Config) -> None:
    """Import, while still root, the parts built after the privilege drop that are
    otherwise imported only when configured (the greylist's SQLite and Redis
    backends): a Python its user cannot read (a venv under /root) fails there with
    ModuleNotFoundError, not with a message that names the cause."""
    if config.greylist.enabled:
        importlib.import_module("mailgate.policy.greylist")


def prepare_alone(config: Config) -> tuple[list[list[socket.socket]], socket.socket | None]:
    """What a single process does before it builds anything that opens a file: bind
    the listeners and /metrics (ports below 1024 need root), drop privileges, clean
    what a crash left.  Everything made after (the greylist database, the spool's
    files) then belongs to server.user, as in the supervisor's workers."""
    sockets = bind_all(config)
    metrics = None
    try:
        metrics = bind_metrics(config.metrics.listen) if config.metrics.listen else None
        load_before_drop(config)
        drop_privileges(config)
        # As the server's user: as root, a symlink planted under maildir_root had
        # root delete (or truncate) files anywhere.
        recover_mboxes(clean_leftovers(config))
    except BaseException:
        for sock in (s for socks in sockets for s in socks):
            sock.close()
        if metrics is not None:
            metrics.close()
        raise
    return sockets, metrics


async def serve(
    config: Config, config_path: str | None, overrides: Overrides | None = None,
    announce: bool = True,
) -> int:
    setup_logging(config.logging)
    sockets, metrics_socket = prepare_alone(config)
    server = MailServer(config, config_path, overrides=overrides)
    bound = await server.start(sockets, supervised=False, metrics_socket=metrics_socket)
    server.install_signals()
    flush_logs()  # what start() logged (cleanup, privilege drop) comes before the announce
    if announce:
        where = ", ".join(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in bound)
        print(
            f"mailgate {server.ctx.hostname}: listening on {where}; "
            f"delivering to {describe_delivery(config)}",
            flush=True,
        )
    log_event("started", hostname=server.ctx.hostname, listeners=len(bound))
    await server.wait_stopped()
    log_event("stopped")
    flush_logs()
    return 0


async def serve_worker(
    config: Config, config_path: str | None, shared: WorkerShared,
    sockets: list[list[socket.socket]], index: int, ready_fd: int,
    overrides: Overrides | None = None,
) -> int:
    """One of several workers (mailgate/supervisor.py): serve the supervisor's sockets."""
    server = MailServer(
        config, config_path, shared.connections, shared.auth_failures, overrides
    )
    server.who = {"worker": index}
    await server.start(sockets, supervised=True)
    server.install_signals()
    os.write(ready_fd, b"R")
    os.close(ready_fd)
    log_event("worker_started", worker=index, pid=os.getpid())
    await server.wait_stopped()
    flush_logs()
    return 0


def run_worker(
    config: Config, config_path: str | None, shared: WorkerShared,
    sockets: list[list[socket.socket]], index: int, ready_fd: int,
    overrides: Overrides | None = None,
) -> int:
    return _run_loop(
        serve_worker(config, config_path, shared, sockets, index, ready_fd, overrides)
    )


def run(config: Config, config_path: str | None, overrides: Overrides | None = None) -> int:
    """Serve ``config`` (read from ``config_path``, then ``overrides`` applied)."""
    from mailgate.supervisor import Supervisor, worker_count

    # before anything is opened, and before the workers are forked: they inherit it
    raise_limit(config.server.max_connections)
    if worker_count(config) > 1:
        return Supervisor(config, config_path, overrides).run()
    return _run_loop(serve(config, config_path, overrides))


def _run_loop(main: Coroutine[None, None, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
