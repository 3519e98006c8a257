"""Structured logs: one line per event, logfmt (default), JSON lines or syslog.

Every session event carries the session id (the one in the Received header), so
``grep sid=...`` gives a whole conversation.  Values are escaped so a client-supplied
value (a HELO name, an address) can never start a second line or fake a key, and the
redaction guard keeps secrets out: a field whose name has a part like ``password``,
``secret``, ``token``, ``response`` or ``body`` is logged as ``[redacted]``, and bytes
(a message body, an AUTH blob) are only ever logged as their length.

Records of other libraries (asyncio's "exception never retrieved"...) go through the
same handler as ``event=log``, so stderr stays one format.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import logging.handlers
import os
import re
import select
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, Final, TextIO, TypeVar

from mailgate.config.loader import split_host_port
from mailgate.config.ops import LoggingConfig

LEVELS: Final = {"debug": logging.DEBUG, "info": logging.INFO,
                 "warning": logging.WARNING, "error": logging.ERROR}  # fmt: skip
MAX_VALUE: Final = 1000  # characters of one value; a hostile client can send 64 KiB lines
REDACTED: Final = "[redacted]"
# A field is secret when any part of its name (split at _ - .) is one of these.
SECRET_PARTS: Final = frozenset(
    {"password", "passwd", "passphrase", "secret", "token", "response", "credential",
     "credentials", "cookie", "authorization", "body"}
)  # fmt: skip
RESERVED: Final = ("ts", "level", "sid", "event")  # the leading keys of every line
FLUSH_DELAY: Final = 0.025  # seconds an info line may wait to leave with the next ones

_logger = logging.getLogger("mailgate")
_installed: logging.Handler | None = None  # ours, replaced on a reload
_direct: _DirectWriter | None = None  # set when lines go to a stream (not syslog)
_KEY_JUNK = re.compile(r"[^A-Za-z0-9_.-]")
_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_FACILITIES: Final = logging.handlers.SysLogHandler.facility_names
_T = TypeVar("_T")
# The session whose task runs: the standard logging module's records (a downstream's
# warning, another library's) carry its sid too, as its own lines do.  A task started
# by a session inherits it, so one that serves others (the group commit) must start
# in a context of its own.
_session: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mailgate_session", default=None
)


def outside_sessions() -> contextvars.Context:
    """A context of no session, for a callback or task that serves the whole server
    though a session's code starts it (a flush, the timeout sweep): its lines must not
    carry that session's sid."""
    return contextvars.Context()


def enter_session(session_id: str) -> None:
    """From now on, in the running task and the tasks and threads it starts, records
    of the standard logging module are lines of session ``session_id``."""
    _session.set(session_id)


class SessionLog:
    """The log of one SMTP session: every line carries ``sid`` and the bound context."""

    __slots__ = ("_bound", "_context", "_head", "_sid")

    def __init__(self, session_id: str, **context: object) -> None:
        self._sid = session_id
        self._context = context
        # The logfmt text every line of the session repeats, rendered once.
        self._head = f" sid={logfmt_value(session_id)} event="
        self._bound = _logfmt_bound(context)

    @property
    def session_id(self) -> str:
        return self._sid

    def bind(self, **fields: object) -> None:
        """Add fields to every later line of this session (e.g. ``helo=`` after EHLO)."""
        self._context.update(fields)
        self._bound = _logfmt_bound(self._context)

    def event(self, name: str, /, level: str = "info", **fields: object) -> None:
        """Log event ``name``; a field may itself be called ``name`` (positional-only)."""
        levelno = LEVELS.get(level, logging.INFO)
        direct = _direct
        if direct is not None:  # the hot path: no LogRecord, no handler chain
            if levelno < direct.level:
                return
            bound = self._bound
            # (the keys view, not a set kept per session: 10,000 idle sessions each
            # paid 216 bytes for one)
            if bound is not None and not direct.as_json and self._context.keys().isdisjoint(fields):
                if _deferrable(fields):
                    # rendered when the batch leaves (see _Deferred)
                    direct.add((time.time(), levelno, self._head, name, bound, fields), levelno)
                    return
                line = _logfmt_fields(fields)
                if line is not None:
                    direct.add(
                        f"ts={_timestamp(time.time())}{_LEVEL_PARTS[levelno]}{self._head}"
                        f"{_EVENT_NAMES[name]}{bound}{line}",
                        levelno,
                    )
                    return
            direct.write(levelno, name, self._sid, {**self._context, **fields})
        elif _logger.isEnabledFor(levelno):  # a disabled level costs this check only
            _emit(levelno, name, self._sid, {**self._context, **fields})


def log_event(name: str, /, level: str = "info", **fields: object) -> None:
    """A server-wide event (startup, reload, shutdown): a line without ``sid``."""
    levelno = LEVELS.get(level, logging.INFO)
    direct = _direct
    if direct is not None:
        if levelno >= direct.level:
            direct.write(levelno, name, None, fields)
    elif _logger.isEnabledFor(levelno):
        _emit(levelno, name, None, fields)


def debug_enabled() -> bool:
    """Whether "debug" lines are written: a caller can skip building one that is not."""
    direct = _direct
    if direct is not None:
        return direct.level <= logging.DEBUG
    return _logger.isEnabledFor(logging.DEBUG)


def flush_logs() -> None:
    """Write out the lines still waiting to leave together (at exit, before an announce)."""
    if _direct is not None:
        _direct.flush()


# A session's line as it was logged, rendered when its batch leaves: the time, the
# level, the session's rendered head and context, the event and its fields.  A line
# rendered in the middle of a session's work cost about three times what the same
# line costs in a loop of them (the formatting code is cold in the CPU's caches);
# rendering the batch in one go saved ~5 of the ~20 µs a message spends on its two
# lines (bench/session_micro.py).
_Deferred = tuple[float, int, str, str, str, dict[str, object]]


class _DirectWriter:
    """mailgate's own lines to a stream, formatted exactly as the handler would,
    without the logging module's per-record machinery (a LogRecord, locks, a handler
    chain): at several lines per message that was most of a session's CPU."""

    __slots__ = ("as_json", "level", "pending", "stream")

    def __init__(self, stream: TextIO, as_json: bool, level: int) -> None:
        self.stream = stream
        self.as_json = as_json
        self.level = level
        self.pending: list[str | _Deferred] = []

    def write(self, levelno: int, name: str, sid: str | None, fields: dict[str, object]) -> None:
        self.add(_render(self.as_json, True, time.time(), levelno, sid, name, fields), levelno)

    def add(self, line: str | _Deferred, levelno: int = logging.INFO) -> None:
        pending = self.pending
        pending.append(line)
        urgent = levelno >= logging.WARNING
        if len(pending) > 1 and not urgent:
            return  # a flush is already scheduled
        # Lines leave together, at most FLUSH_DELAY after the first of them (a warning
        # or an error at once): a write per line, or even per event-loop turn, was a
        # fifth of a session's CPU on a sequential client.  Outside a loop, at once.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if urgent:
            loop.call_soon(self.flush, context=outside_sessions())
        else:
            loop.call_later(FLUSH_DELAY, self.flush, context=outside_sessions())

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if not pending:
            return
        lines = [p if type(p) is str else _deferred_line(p) for p in pending]
        # Nowhere left to report a failing log stream: the lines are dropped.
        with contextlib.suppress(Exception):
            for piece in _whole_line_pieces("\n".join(lines) + "\n"):
                self.stream.write(piece)
                self.stream.flush()


def _whole_line_pieces(text: str) -> list[str]:
    """``text`` cut at line ends into pieces of at most PIPE_BUF bytes, the size the
    kernel writes to a pipe in one piece: worker processes share stderr, and a line
    must never be split by another worker's write (a longer line goes alone)."""
    limit = select.PIPE_BUF if text.isascii() else select.PIPE_BUF // 4  # UTF-8: <= 4 bytes
    if len(text) <= limit:
        return [text]
    pieces = []
    start = 0
    while start < len(text):
        end = text.rfind("\n", start, start + limit) + 1
        if end <= start:  # one line longer than the limit
            end = text.index("\n", start) + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def setup_logging(config: LoggingConfig, stream: TextIO = sys.stderr) -> None:
    """Send every log record to ``stream`` (or syslog) in the configured format.

    Called again on reload, it replaces its previous handler.  If the syslog
    socket cannot be opened, lines go to ``stream`` and a warning says why.
    """
    global _installed, _direct
    flush_logs()
    _direct = None
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
        _installed.close()
    problem = ""
    handler: logging.Handler
    if config.format == "syslog":
        try:
            handler = _SyslogHandler(config)
        except (OSError, ValueError) as exc:
            problem = str(exc)
            handler = _StreamHandler(stream)
            handler.setFormatter(_Formatter(as_json=False, with_ts=True))
    else:
        handler = _StreamHandler(stream)
        handler.setFormatter(_Formatter(as_json=config.format == "json", with_ts=True))
    root.addHandler(handler)
    root.setLevel(LEVELS[config.level])
    _installed = handler
    if isinstance(handler, _StreamHandler):
        _direct = _DirectWriter(stream, config.format == "json", LEVELS[config.level])
    if problem:
        log_event("syslog_unavailable", "warning", address=config.syslog_address, error=problem)


def _emit(levelno: int, name: str, sid: str | None, fields: dict[str, object]) -> None:
    # makeRecord + handle skips Logger.log's caller lookup (a stack walk per line)
    record = _logger.makeRecord(_logger.name, levelno, "", 0, name, (), None)
    record.mailgate = (sid, name, fields)
    _logger.handle(record)


class _StreamHandler(logging.Handler):
    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """Nowhere left to report a failing log stream: drop the line, never a traceback."""


class _SyslogHandler(logging.handlers.SysLogHandler):
    def __init__(self, config: LoggingConfig) -> None:
        super().__init__(
            _syslog_address(config.syslog_address), _FACILITIES[config.syslog_facility]
        )
        sock = getattr(self, "socket", None)
        if sock is None or sock.fileno() < 0:
            # SysLogHandler would silently retry on every line; say so at start-up instead
            self.close()
            raise OSError(f"cannot connect to the syslog socket {self.address}")
        self.setFormatter(_Formatter(as_json=False, with_ts=False))  # syslog stamps the time

    @property  # type: ignore[override]
    def ident(self) -> str:
        """The process that logs: a worker's own pid, not that of the supervisor whose
        handler it inherited by fork."""
        return f"mailgate[{os.getpid()}]: "

    def handleError(self, record: logging.LogRecord) -> None:
        """A syslog daemon that went away loses lines; the server must go on."""


def _syslog_address(text: str) -> str | tuple[str, int]:
    if not text:
        return "/dev/log" if os.path.exists("/dev/log") else ("127.0.0.1", 514)
    if text.startswith("/"):
        return text
    return split_host_port(text)


class _Formatter(logging.Formatter):
    def __init__(self, *, as_json: bool, with_ts: bool) -> None:
        super().__init__()
        self.as_json = as_json
        self.with_ts = with_ts

    def format(self, record: logging.LogRecord) -> str:
        sid, name, fields = getattr(record, "mailgate", None) or _foreign(record)
        return _render(
            self.as_json, self.with_ts, record.created, record.levelno, sid, name, fields
        )


_LEVEL_NAMES: Final = {logging.DEBUG: "debug", logging.INFO: "info",
                       logging.WARNING: "warning", logging.ERROR: "error",
                       logging.CRITICAL: "critical"}  # fmt: skip


def _render(
    as_json: bool, with_ts: bool, created: float, levelno: int, sid: str | None, name: str,
    fields: dict[str, object],
) -> str:
    """One line: ts, level, sid, event first, then the fields (renamed, redacted)."""
    head: dict[str, object] = {}
    if with_ts:
        head["ts"] = _timestamp(created)
    head["level"] = _LEVEL_NAMES.get(levelno) or logging.getLevelName(levelno).lower()
    if sid is not None:
        head["sid"] = sid
    head["event"] = name
    for k, v in fields.items():
        key, secret = _FIELD_KEYS[k]
        head[key] = REDACTED if secret else v
    return _json_line(head) if as_json else _logfmt_line(head)


def _foreign(record: logging.LogRecord) -> tuple[str | None, str, dict[str, object]]:
    """Another library's record as an ``event=log`` line, with the sid of the session
    it was logged for."""
    try:
        message = record.getMessage()
    except Exception:  # a bad %-format in someone's log call must not lose the line
        message = str(record.msg)
    fields: dict[str, object] = {"logger": record.name, "msg": message}
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        fields["error"] = f"{type(exc).__name__}: {exc}"
        fields["traceback"] = "".join(traceback.format_exception(exc))  # escaped: one line
    return _session.get(), "log", fields


@functools.lru_cache(maxsize=4)
def _second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


# (millisecond, second, text) of the last time stamp: the lines of one message are
# often written in the same millisecond.  One tuple, so that a thread logging at the
# same moment can never see the text of another millisecond.
_last_stamp: tuple[int, int, str] = (-1, -1, "")


def _timestamp(created: float) -> str:
    global _last_stamp
    ms = int(created * 1000)
    second = int(created)
    last_ms, last_second, text = _last_stamp
    if ms != last_ms or second != last_second:
        text = f"{_second(second)}.{ms % 1000:03d}Z"
        _last_stamp = (ms, second, text)
    return text


class _Memo(dict[str, _T]):
    """``fn(name)`` remembered, for names the code chooses (events, fields): few and
    reused on every line.  Bounded all the same, by starting afresh when full."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[[str], _T]) -> None:
        super().__init__()
        self._fn = fn

    def __missing__(self, name: str) -> _T:
        if len(self) >= 512:
            self.clear()
        value = self[name] = self._fn(name)
        return value


def _field_key(name: str) -> tuple[str, bool]:
    """A field's key as logged (reserved names get a ``_``) and whether it is secret."""
    key = f"{name}_" if name in RESERVED else _KEY_JUNK.sub("_", name) or "_"
    return key, any(part in SECRET_PARTS for part in re.split(r"[_.-]", key.lower()))


_FIELD_KEYS: Final = _Memo(_field_key)


def _text(value: object) -> str:
    """A field value as text, bounded, with bytes shown only by their length."""
    if isinstance(value, str):
        text = value
    elif value is None:
        text = ""
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, bytes | bytearray | memoryview):
        text = f"<{len(value)} bytes>"  # message data and SASL blobs: never the content
    else:
        try:
            text = str(value)
        except Exception:
            text = f"<unprintable {type(value).__name__}>"
    if len(text) > MAX_VALUE:
        text = text[:MAX_VALUE] + "..."
    return text


# Printable ASCII but space, '"', '=' and backslash: such a value needs no quoting.
_BARE: Final = re.compile(r"[!#-<>-\[\]-~]+")
_bare: Final = _BARE.fullmatch


def logfmt_value(value: object) -> str:
    """One logfmt value: bare when safe, else double-quoted with escapes."""
    kind = type(value)
    if kind is int or kind is float:  # digits, ".", "e", "+", "-", "inf", "nan": all bare
        return str(value)
    if kind is str and len(value) <= MAX_VALUE and _bare(value):  # the common case
        return value
    text = _text(value)
    if _bare(text) or (text and text.isprintable() and not any(c in text for c in ' "=\\')):
        return text
    return '"' + "".join(_escape(c) for c in text) + '"'


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)  # control, line/paragraph separator, lone surrogate...
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
    )


def _logfmt_line(line: dict[str, object]) -> str:
    return " ".join(f"{k}={logfmt_value(v)}" for k, v in line.items())


def _plain_key(name: str) -> str:
    """``" name="`` for a field logged under its own name, never redacted; else ""."""
    key, secret = _FIELD_KEYS[name]
    return f" {name}=" if key == name and not secret else ""


_PLAIN_KEYS: Final = _Memo(_plain_key)
_EVENT_NAMES: Final = _Memo(logfmt_value)
_LEVEL_PARTS: Final = {no: f" level={name}" for no, name in _LEVEL_NAMES.items()}
_IMMUTABLE: Final = frozenset({str, int, float, bool, type(None)})


def _logfmt_fields(fields: dict[str, object]) -> str | None:
    """The fields as `` key=value`` each, what _logfmt_line writes for them, or None
    when a key must be renamed or redacted: then two keys may become one, and only
    _render's dict of renamed keys gets that right."""
    parts: list[str] = []
    for name, value in fields.items():
        prefix = _PLAIN_KEYS[name]
        if not prefix:
            return None
        parts.append(prefix)
        kind = type(value)
        # logfmt_value's commonest cases, without the call
        if kind is str and len(value) <= MAX_VALUE and _bare(value):
            parts.append(value)
        elif kind is int:
            parts.append(str(value))
        else:
            parts.append(logfmt_value(value))
    return "".join(parts)


def _deferrable(fields: dict[str, object]) -> bool:
    """Whether a line's fields can be rendered later with the same text: plain keys
    (nothing to rename or redact) and values whose text cannot change."""
    plain = _PLAIN_KEYS
    immutable = _IMMUTABLE
    for name, value in fields.items():
        if type(value) not in immutable or not plain[name]:
            return False
    return True


def _deferred_line(entry: _Deferred) -> str:
    created, levelno, head, name, bound, fields = entry
    line = _logfmt_fields(fields)  # not None: _deferrable checked the keys
    return f"ts={_timestamp(created)}{_LEVEL_PARTS[levelno]}{head}{_EVENT_NAMES[name]}{bound}{line}"


def _logfmt_bound(context: dict[str, object]) -> str | None:
    """A session's bound context as logfmt, rendered once, or None when it must be
    rendered with each line (see _logfmt_fields; or a value whose text could change)."""
    if any(type(value) not in _IMMUTABLE for value in context.values()):
        return None
    return _logfmt_fields(context)


def _json_value(value: object) -> Any:
    if isinstance(value, bool | int) or value is None:
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    # a lone surrogate (undecodable client bytes) cannot be written as UTF-8: escape it
    return _text(value).encode("utf-8", "backslashreplace").decode("utf-8")


def _json_line(line: dict[str, object]) -> str:
    text = json.dumps({k: _json_value(v) for k, v in line.items()}, ensure_ascii=False)
    # JSON allows these raw in strings, but line splitters (str.splitlines) break on them
    return text.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
