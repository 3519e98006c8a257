"""Prometheus metrics, served on their own address (``metrics.listen``).

Each :class:`Metrics` has its own registry, so tests (and a reload) can make several.
With several worker processes (``server.workers``), every worker writes its values to
files in a directory the supervisor made (prometheus_client's multiprocess mode) and
one process of the supervisor's alone serves /metrics, adding up the workers' values.
Label values a client could choose (an AUTH mechanism name) are folded into a fixed
set, so no client can grow the number of time series.  When metrics are off the
server gets a :class:`NullMetrics`, whose methods do nothing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
    multiprocess,
    values,
)

from mailgate.config.loader import split_host_port
from mailgate.config.ops import DEFAULT_LATENCY_BUCKETS, MetricsConfig
from mailgate.ops.logging import log_event, outside_sessions

OUTCOMES: Final = ("accepted", "refused", "tempfail")
TLS_VERSIONS: Final = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
MECHANISMS: Final = (
    "PLAIN",
    "LOGIN",
    "CRAM-MD5",
    "SCRAM-SHA-256",
    "SCRAM-SHA-1",
    "XOAUTH2",
    "EXTERNAL",
)
OTHER: Final = "other"  # the label of any value outside its fixed set
# policy/greylist.py's outcomes (the tag it logs)
GREYLIST_OUTCOMES: Final = frozenset(
    ("new", "early", "passed", "whitelisted", "skipped", "error")
)
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_REPLY_CLASSES: Final = ("2xx", "3xx", "4xx", "5xx")
FLUSH_DELAY: Final = 1.0  # seconds an update may wait to be applied with others
MAX_OBSERVED: Final = 100_000  # latencies kept while they cannot be applied


class Metrics:
    """The counters the server updates, one small method per kind of event."""

    def __init__(self, latency_buckets: list[float] | None = None) -> None:
        self._pending: dict[tuple[Counter | Gauge, tuple[str, ...]], float] = {}
        self._observed: list[float] = []  # delivery latencies not yet applied
        self._scheduled = False  # a flush is due
        self._failing = False  # the last flush could not apply everything
        self.registry = CollectorRegistry()
        self.bound_address: tuple[str, int] | None = None  # where start() listens
        self._server: WSGIServer | None = None
        r = self.registry
        self._open = Gauge(
            "mailgate_connections_open", "Connections now open", ["listener"], registry=r,
            multiprocess_mode="livesum",  # workers: the sum over the living ones
        )
        self._connections = Counter(
            "mailgate_connections", "Connections accepted", ["listener"], registry=r
        )
        self._messages = Counter(
            "mailgate_messages",
            "Messages by outcome (accepted, refused, tempfail), reply code and enhanced code",
            ["outcome", "code", "enhanced"],
            registry=r,
        )
        self._bytes = Counter("mailgate_received_bytes", "Message octets received", registry=r)
        self._replies = Counter(
            "mailgate_replies", "Replies sent by code class", ["class"], registry=r
        )
        self._latency = Histogram(
            "mailgate_delivery_latency_seconds",
            "Seconds from end of data to the delivery's answer",
            buckets=latency_buckets or DEFAULT_LATENCY_BUCKETS,
            registry=r,
        )
        self._tls = Counter(
            "mailgate_tls_handshakes", "TLS handshakes by outcome and version",
            ["outcome", "version"], registry=r,
        )  # fmt: skip
        self._auth = Counter(
            "mailgate_auth", "AUTH attempts by mechanism and outcome", ["mechanism", "outcome"],
            registry=r,
        )  # fmt: skip
        self._rejections = Counter(
            "mailgate_rejections",
            "Refusals by reason (policy step, limit...)",
            ["reason"],
            registry=r,
        )
        # (error: the store failed and mail passed ungreylisted: worth an alert)
        self._greylist = Counter(
            "mailgate_greylist", "Greylisting decisions by outcome", ["outcome"], registry=r
        )

    @classmethod
    def from_config(cls, config: MetricsConfig) -> Metrics:
        """Metrics when ``config.listen`` is set, else a :class:`NullMetrics`."""
        return cls(config.latency_buckets) if config.listen else NullMetrics()

    def start(self, sock: socket.socket) -> None:
        """Serve /metrics on ``sock`` (from :func:`bind_metrics`) from a thread."""
        server = _BoundServer(sock, make_wsgi_app(self.registry))
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        self._server = server
        self.bound_address = server.server_address[:2]

    def stop(self) -> None:
        """Close the endpoint (on shutdown, or before a reload starts a new one)."""
        self.flush()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def connection_opened(self, listener: str) -> None:
        self._add(self._open, (listener,), 1)
        self._add(self._connections, (listener,), 1)

    def connection_closed(self, listener: str) -> None:
        self._add(self._open, (listener,), -1)

    def message(self, outcome: str, code: int, enhanced: str | None, size: int) -> None:
        """One message's end: ``outcome`` accepted/refused/tempfail; ``size`` octets read."""
        outcome = outcome if outcome in OUTCOMES else OTHER
        enhanced = enhanced if enhanced and _ENHANCED.fullmatch(enhanced) else ""
        self._add(self._messages, (outcome, _code(code), enhanced), 1)
        if size > 0:
            self._add(self._bytes, (), size)

    def delivery_latency(self, seconds: float) -> None:
        self._observed.append(seconds)
        if not self._scheduled:
            self._schedule()

    def tls(self, outcome: str, version: str | None) -> None:
        """A handshake: ``outcome`` e.g. ok/failed, ``version`` as ssl reports it."""
        self._add(self._tls, (outcome, version if version in TLS_VERSIONS else OTHER), 1)

    def auth(self, mechanism: str, outcome: str) -> None:
        mechanism = mechanism.upper()
        self._add(self._auth, (mechanism if mechanism in MECHANISMS else OTHER, outcome), 1)

    def rejection(self, reason: str) -> None:
        self._add(self._rejections, (reason,), 1)

    def greylist(self, outcome: str) -> None:
        self._add(self._greylist, (outcome if outcome in GREYLIST_OUTCOMES else OTHER,), 1)

    def replies(self, by_class: tuple[int, int, int, int]) -> None:
        """Replies sent: how many 2xx, 3xx, 4xx and 5xx ones."""
        for label, count in zip(_REPLY_CLASSES, by_class, strict=True):
            if count:
                self._add(self._replies, (label,), count)

    def flush(self) -> None:
        """Apply the updates gathered since the last flush (at shutdown too).

        What cannot be applied now stays for the next flush: with workers, a series'
        first update opens a file, which fails while the process is out of
        descriptors, and a batch dropped then lost its connections' +1s while their
        -1s came later (a negative count of open connections, for good)."""
        self._scheduled = False
        pending, self._pending = self._pending, {}
        observed, self._observed = self._observed, []
        try:
            for key in list(pending):
                metric, labels = key
                (metric.labels(*labels) if labels else metric).inc(pending[key])
                del pending[key]
            while observed:
                self._latency.observe(observed[-1])
                observed.pop()
        except OSError as exc:
            for key, amount in pending.items():
                self._pending[key] = self._pending.get(key, 0) + amount
            self._observed[:0] = observed[-MAX_OBSERVED:]
            if not self._failing:  # (once a streak: this runs every FLUSH_DELAY)
                log_event("metrics", level="error", outcome="deferred",
                          error=f"cannot update the metrics: {exc}"[:300])
            self._failing = True
            with contextlib.suppress(RuntimeError):  # (no loop: the next flush retries)
                asyncio.get_running_loop()
                self._schedule()
            return
        self._failing = False

    # Updates are gathered and applied together at most FLUSH_DELAY later: each one
    # is a locked write (into a memory-mapped file, with workers), and one per event
    # cost ~10 % of a small message's CPU; gathered, a second's messages of the same
    # outcome are one write.  Outside an event loop they are applied at once.
    def _add(self, metric: Counter | Gauge, labels: tuple[str, ...], amount: float) -> None:
        key = (metric, labels)
        pending = self._pending
        pending[key] = pending.get(key, 0) + amount
        if not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        # (a session's update schedules it, but it serves all: no session's context)
        loop.call_later(FLUSH_DELAY, self.flush, context=outside_sessions())


def write_to_shared_directory(path: str) -> None:
    """In a worker, before its Metrics are made: keep values in files under ``path``."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    # prometheus_client chooses where values live when it is imported, from this
    # variable; the worker learns the directory later, so it chooses again.
    values.ValueClass = values.get_value_class()


def bind_metrics(listen: str) -> socket.socket:
    """A listening socket for /metrics on ``listen`` (HOST:PORT), bound now (before
    privileges are dropped) and served by :func:`serve_shared_directory` later.

    Raises ValueError for a malformed address and OSError when it cannot be bound.
    """
    host, port = split_host_port(listen)
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        return socket.create_server(address, family=family, backlog=64)
    except OSError as exc:  # the listeners' way of saying it: which address, and why
        # (create_server's own text adds the resolved address tuple; the errno says it)
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror
        raise OSError(exc.errno, f"cannot listen on {listen} for metrics: {reason}") from None


def serve_shared_directory(sock: socket.socket, path: str) -> None:
    """Serve /metrics on ``sock`` until this process ends: the sum of the workers'
    files under ``path``.  Meant for a process of its own (the supervisor forks one),
    since the server runs threads and a process that forks must not."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    _BoundServer(sock, make_wsgi_app(registry)).serve_forever()


class _QuietHandler(WSGIRequestHandler):
    # A connection that sends no request is dropped after this many seconds: each
    # holds a thread (400 idle connections held 400 threads for ever).
    timeout = 30

    def log_message(self, format: str, *args: object) -> None:
        pass  # a scrape is no news; errors show up in the scraper


_WSGIApp = Callable[[dict[str, object], Callable[..., object]], Iterable[bytes]]


def _only_metrics(app: _WSGIApp) -> _WSGIApp:
    """``app`` at /metrics, 404 elsewhere: a scraper pointed at a wrong path must
    notice (prometheus_client's own app answers every path)."""

    def serve(environ: dict[str, object], start_response: Callable[..., object]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/metrics":
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: metrics are at /metrics\n"]

    return serve


class _BoundServer(ThreadingMixIn, WSGIServer):
    """A WSGI server on a socket that is already bound and listening; each request in
    a thread of its own, so one slow scraper does not hold up the others."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, app: _WSGIApp) -> None:
        self.address_family = sock.family
        super().__init__(sock.getsockname()[:2], _QuietHandler, bind_and_activate=False)
        self.socket.close()  # the one made by the constructor, never bound
        self.socket = sock
        self.server_address = sock.getsockname()
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])
        self.setup_environ()
        self.set_app(_only_metrics(app))  # type: ignore[arg-type]

    def handle_error(self, _request: object, _client_address: object) -> None:
        # socketserver prints a traceback to stderr, lines no log reader expects: a
        # scraper that hung up is nothing to report, anything else one log line.
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError | TimeoutError):
            log_event("metrics_error", level="error", error=repr(exc)[:300])


def forget_worker(pid: int, path: str) -> None:
    """A worker exited: its open-connection gauge no longer counts."""
    multiprocess.mark_process_dead(pid, path)


def _code(code: int) -> str:
    return str(code) if 200 <= code < 600 else OTHER


class NullMetrics(Metrics):
    """Metrics switched off: every method returns at once, nothing is registered."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.bound_address = None
        self._server = None

    def start(self, sock: socket.socket) -> None:
        pass

    def connection_opened(self, listener: str) -> None:
        pass

    def connection_closed(self, listener: str) -> None:
        pass

    def message(self, outcome: str, code: int, enhanced: str | None, size: int) -> None:
        pass

    def delivery_latency(self, seconds: float) -> None:
        pass

    def tls(self, outcome: str, version: str | None) -> None:
        pass

    def auth(self, mechanism: str, outcome: str) -> None:
        pass

    def rejection(self, reason: str) -> None:
        pass

    def greylist(self, outcome: str) -> None:
        pass

    def replies(self, by_class: tuple[int, int, int, int]) -> None:
        pass

    def flush(self) -> None:
        pass
