"""Structured logs: one line per event whatever a client sends, valid JSON, no secrets."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mailgate.ops.logging
from mailgate.config.ops import LoggingConfig
from mailgate.ops.logging import (
    FLUSH_DELAY,
    MAX_VALUE,
    SessionLog,
    enter_session,
    flush_logs,
    log_event,
    logfmt_value,
    setup_logging,
)
from mailgate.ops.metrics import FLUSH_DELAY as METRICS_FLUSH_DELAY
from mailgate.ops.metrics import Metrics

TS = r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture(autouse=True)
def restore_root_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Leave the root logger as it was, for the tests of everyone else."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(mailgate.ops.logging, "_installed", None)
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def stream() -> io.StringIO:
    out = io.StringIO()
    setup_logging(LoggingConfig(), out)
    return out


def lines(stream: io.StringIO) -> list[str]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return text[:-1].split("\n")


def use(stream: io.StringIO, **settings: str) -> None:
    setup_logging(LoggingConfig(**settings), stream)  # type: ignore[arg-type]


# --- logfmt ---------------------------------------------------------------------------


def test_a_session_line(stream: io.StringIO) -> None:
    log = SessionLog("1A2B3C", ip="192.0.2.1")
    log.event("connect", listener="0.0.0.0:25", tls=False, port=25)
    [line] = lines(stream)
    assert re.fullmatch(
        TS + r" level=info sid=1A2B3C event=connect ip=192\.0\.2\.1 listener=0\.0\.0\.0:25 "
        r"tls=false port=25",
        line,
    )


def test_server_events_have_no_sid_and_levels_are_named(stream: io.StringIO) -> None:
    log_event("startup", version="0.1")
    log_event("reload_failed", "error", error="bad file")
    assert [line.split(" ", 1)[1] for line in lines(stream)] == [
        "level=info event=startup version=0.1",
        'level=error event=reload_failed error="bad file"',
    ]


def test_bound_fields_and_a_field_called_name(stream: io.StringIO) -> None:
    log = SessionLog("S1")
    log.bind(helo="client.example")
    log.event("rcpt", name="alice@example.org", level="warning")
    [line] = lines(stream)
    assert line.endswith(
        "level=warning sid=S1 event=rcpt helo=client.example name=alice@example.org"
    )


def test_fields_cannot_overwrite_the_leading_keys(stream: io.StringIO) -> None:
    SessionLog("S1").event("x", sid="forged", event="forged", ts="forged")
    assert lines(stream)[0].endswith("sid=S1 event=x sid_=forged event_=forged ts_=forged")


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("plain", "plain"),
        ("", '""'),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("a=b", '"a=b"'),
        ("back\\slash", '"back\\\\slash"'),
        ("evil\r\nts=x level=error", '"evil\\r\\nts=x level=error"'),
        ("tab\there", '"tab\\there"'),
        ("nul\x00bell\x07del\x7f", '"nul\\x00bell\\x07del\\x7f"'),
        ("café", "café"),
        ("日本語 メール", '"日本語 メール"'),
        ("line\u2028sep\x85nel", '"line\\u2028sep\\x85nel"'),
        ("bad\udcffbyte", '"bad\\udcffbyte"'),
        ("nbsp\xa0", '"nbsp\\xa0"'),
        (None, '""'),
        (True, "true"),
        (3, "3"),
        (1.5, "1.5"),
        (b"DATA body", '"<9 bytes>"'),
    ],
)
def test_logfmt_escaping(value: object, shown: str) -> None:
    assert logfmt_value(value) == shown


def test_long_values_are_cut() -> None:
    assert logfmt_value("x" * (MAX_VALUE + 500)) == "x" * MAX_VALUE + "..."


def logfmt_pairs(line: str) -> dict[str, str]:
    """A small logfmt reader, to check that what is written reads back the same."""
    pairs = {}
    for m in re.finditer(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)', line):
        pairs[m[1]] = m[2]
    return pairs


@given(st.text(max_size=80))
def test_any_client_value_stays_on_one_line_and_reads_back(value: str) -> None:
    out = io.StringIO()
    use(out)
    SessionLog("S1").event("helo", name=value, after="end")
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert len(text.splitlines()) == 1  # no Unicode line break either
    text.encode("utf-8")  # writable even with lone surrogates
    pairs = logfmt_pairs(text)
    assert pairs["event"] == "helo" and pairs["after"] == "end" and pairs["sid"] == "S1"
    shown = pairs["name"]
    if shown.startswith('"'):
        unescaped = shown[1:-1].encode("ascii", "backslashreplace").decode("unicode_escape")
        assert unescaped == value
    else:
        assert shown == value


# --- JSON lines ------------------------------------------------------------------------


def test_json_lines_are_valid(stream: io.StringIO) -> None:
    use(stream, format="json")
    log = SessionLog("S9", ip="2001:db8::1")
    log.event("mail", sender='x"y\r\n@z', size=1234, ratio=0.5, ok=True, nothing=None)
    log.event("bad", weird="\udcff\u2028\x85", nan=float("nan"))
    first, second = lines(stream)
    record = json.loads(first)
    assert record["level"] == "info" and record["sid"] == "S9" and record["event"] == "mail"
    assert record["sender"] == 'x"y\r\n@z'
    assert (record["size"], record["ratio"], record["ok"], record["nothing"]) == (
        1234,
        0.5,
        True,
        None,
    )
    assert re.fullmatch(TS[3:], record["ts"])
    assert len(second.splitlines()) == 1
    assert json.loads(second)["weird"] == "\\udcff\u2028\x85"
    assert json.loads(second)["nan"] == "nan"


# --- secrets ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_no_secret_or_body_ever_reaches_the_log(stream: io.StringIO, fmt: str) -> None:
    use(stream, format=fmt)
    SessionLog("S1").event(
        "auth",
        mechanism="PLAIN",
        password="hunter2",
        user_password="hunter2",
        client_secret="hunter2",
        auth_response="aHVudGVyMg==",
        access_token="hunter2",
        body="hunter2",
        data=b"hunter2 is my password",
        user="alice",
    )
    text = stream.getvalue()
    assert "hunter2" not in text and "aHVudGVyMg" not in text
    assert "alice" in text and "PLAIN" in text
    assert text.count("[redacted]") == 6


# --- levels, foreign records, syslog -------------------------------------------------------


def test_a_disabled_level_writes_nothing(stream: io.StringIO) -> None:
    SessionLog("S1").event("detail", level="debug", x=1)
    assert stream.getvalue() == ""
    use(stream, level="debug")
    SessionLog("S1").event("detail", level="debug", x=1)
    assert "event=detail" in stream.getvalue()


def test_other_libraries_records_are_one_line_too(stream: io.StringIO) -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logging.getLogger("asyncio").exception("Task %s failed", "t1")
    [line] = lines(stream)
    pairs = logfmt_pairs(line)
    assert pairs["event"] == "log" and pairs["logger"] == "asyncio"
    assert pairs["msg"] == '"Task t1 failed"'
    assert pairs["error"] == '"ValueError: bad\\nthing"'
    assert pairs["traceback"].startswith('"Traceback (most recent call last):\\n')


def test_records_logged_for_a_session_carry_its_sid_and_server_work_none(
    stream: io.StringIO,
) -> None:
    # A downstream's warning while working for a session is one of its lines; a flush
    # or a sweep a session's code happened to schedule serves the whole server.
    metrics = Metrics()

    def flush() -> None:
        logging.getLogger("prometheus").warning("in the flush")

    metrics.flush = flush  # type: ignore[method-assign]

    async def session() -> None:
        enter_session("6b0859de5c5127ae")
        logging.getLogger("mailgate.delivery.lmtp").warning("cannot connect")
        await asyncio.to_thread(logging.getLogger("worker").warning, "in a thread")
        metrics.rejection("x")  # schedules the flush from the session's task

    async def main() -> None:
        await asyncio.create_task(session())
        logging.getLogger("server").warning("outside")
        await asyncio.sleep(METRICS_FLUSH_DELAY + 0.2)

    asyncio.run(main())
    sids = {logfmt_pairs(line)["msg"]: logfmt_pairs(line).get("sid") for line in lines(stream)}
    assert sids == {'"cannot connect"': "6b0859de5c5127ae", '"in a thread"': "6b0859de5c5127ae",
                    "outside": None, '"in the flush"': None}


def test_a_broken_stream_loses_the_line_without_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    broken = io.StringIO()
    broken.close()
    use(broken)  # type: ignore[arg-type]
    SessionLog("S1").event("connect")
    assert capsys.readouterr().err == ""


@contextlib.contextmanager
def udp_syslog() -> Iterator[socket.socket]:
    """A UDP syslog receiver on loopback, with logging set up to send to it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(5)
        port = receiver.getsockname()[1]
        setup_logging(
            LoggingConfig(format="syslog", syslog_address=f"127.0.0.1:{port}"), io.StringIO()
        )
        yield receiver


def test_syslog_over_udp() -> None:
    with udp_syslog() as receiver:
        SessionLog("S1", ip="192.0.2.1").event("connect", note="a\nb")
        datagram = receiver.recv(4096)
    # <22> = facility mail (2) * 8 + severity info (6); syslog adds its own time stamp
    assert re.fullmatch(
        rb'<22>mailgate\[\d+\]: level=info sid=S1 event=connect ip=192\.0\.2\.1 note="a\\nb"\x00',
        datagram,
    )


def test_syslog_lines_carry_the_pid_of_the_process_that_logs() -> None:
    # a worker inherits the supervisor's handler by fork: its lines must say its pid
    with udp_syslog() as receiver:
        pid = os.fork()
        if pid == 0:
            try:
                SessionLog("S2").event("connect")
                flush_logs()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        datagram = receiver.recv(4096)
    assert datagram.startswith(f"<22>mailgate[{pid}]: ".encode()), datagram


def test_syslog_to_a_unix_socket_with_a_facility(tmp_path: Path) -> None:
    path = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.settimeout(5)
        setup_logging(
            LoggingConfig(format="syslog", syslog_address=path, syslog_facility="local3"),
            io.StringIO(),
        )
        log_event("shutdown", "warning")
        datagram = receiver.recv(4096)
    assert re.fullmatch(rb"<156>mailgate\[\d+\]: level=warning event=shutdown\x00", datagram)


def test_unreachable_syslog_falls_back_to_the_stream(tmp_path: Path) -> None:
    out = io.StringIO()
    missing = str(tmp_path / "no-such.sock")
    setup_logging(LoggingConfig(format="syslog", syslog_address=missing), out)
    log_event("startup")
    first, second = lines(out)
    assert f'event=syslog_unavailable address={missing} error="' in first
    assert second.endswith("level=info event=startup")


# --- the pre-rendered session line (logfmt) -----------------------------------------------
# A session renders its sid and bound context once and plain fields inline; anything
# else (a renamed or secret key, a field that replaces a bound one) takes the general
# path.  Each case below is written out by hand as the general path writes it.


def after_ts(stream: io.StringIO) -> list[str]:
    return [line.split(" ", 1)[1] for line in lines(stream)]


def test_a_bound_value_needing_quotes(stream: io.StringIO) -> None:
    log = SessionLog("S1", ip="192.0.2.1", listener='a b"c', note="", port=25, tls=None)
    log.event("x", n=1)
    log.event("y")
    assert after_ts(stream) == [
        'level=info sid=S1 event=x ip=192.0.2.1 listener="a b\\"c" note="" port=25 tls="" n=1',
        'level=info sid=S1 event=y ip=192.0.2.1 listener="a b\\"c" note="" port=25 tls=""',
    ]


def test_bind_after_lines_were_written(stream: io.StringIO) -> None:
    log = SessionLog("S1", ip="192.0.2.1")
    log.event("connect")
    log.bind(helo="two words", ip="198.51.100.7")
    log.event("helo", n=2)
    assert after_ts(stream) == [
        "level=info sid=S1 event=connect ip=192.0.2.1",
        'level=info sid=S1 event=helo ip=198.51.100.7 helo="two words" n=2',
    ]


def test_a_field_replaces_a_bound_one_in_its_place(stream: io.StringIO) -> None:
    log = SessionLog("S1", ip="192.0.2.1", listener="l1")
    log.event("x", n=1, ip="198.51.100.7")
    log.event("y", n=2)
    assert after_ts(stream) == [
        "level=info sid=S1 event=x ip=198.51.100.7 listener=l1 n=1",
        "level=info sid=S1 event=y ip=192.0.2.1 listener=l1 n=2",
    ]


def test_secret_and_reserved_names_bound_or_as_fields(stream: io.StringIO) -> None:
    log = SessionLog("S1", token="t0p", event="bound")
    log.event("x", password="hunter2", level_name="ok", sid="forged")
    SessionLog("S2").event("y", a=1, client_secret="hunter2", b=2)
    assert after_ts(stream) == [
        "level=info sid=S1 event=x token=[redacted] event_=bound password=[redacted] "
        "level_name=ok sid_=forged",
        "level=info sid=S2 event=y a=1 client_secret=[redacted] b=2",
    ]


def test_keys_renamed_alike_are_written_once(stream: io.StringIO) -> None:
    SessionLog("S1", **{"a b": 1}).event("x", a_b=2, c=3)
    SessionLog("S2").event("y", **{"ts": 1, "ts_": 2, "d": "e"})
    assert after_ts(stream) == [
        "level=info sid=S1 event=x a_b=2 c=3",
        "level=info sid=S2 event=y ts_=2 d=e",
    ]


def test_values_whose_text_can_change_are_rendered_with_each_line(stream: io.StringIO) -> None:
    seen: list[str] = []
    log = SessionLog("S1", seen=seen, data=b"abc")
    log.event("x")
    seen.append("a")
    log.event("y")
    assert after_ts(stream) == [
        'level=info sid=S1 event=x seen=[] data="<3 bytes>"',
        "level=info sid=S1 event=y seen=['a'] data=\"<3 bytes>\"",
    ]


def test_values_of_every_kind_and_an_unusual_sid(stream: io.StringIO) -> None:
    log = SessionLog("s 1", ip="192.0.2.1")
    log.event(
        "odd event", level="warning", f=0.5, g=float("inf"), big=10**30, yes=True,
        none=None, raw=b"x", long="y" * (MAX_VALUE + 1), nl="a\nb", name="n",
    )
    assert after_ts(stream) == [
        'level=warning sid="s 1" event="odd event" ip=192.0.2.1 f=0.5 g=inf '
        f'big={10**30} yes=true none="" raw="<1 bytes>" long={"y" * MAX_VALUE}... '
        'nl="a\\nb" name=n'
    ]


def test_the_time_stamp_follows_the_clock(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = iter([1764072448.2461, 1764072448.2469, 1764072448.2471, 1764072449.0001])
    monkeypatch.setattr(mailgate.ops.logging.time, "time", lambda: next(clock))
    log = SessionLog("S1")
    for _ in range(4):
        log.event("x")
    assert [line.split(" ", 1)[0] for line in lines(stream)] == [
        "ts=2025-11-25T12:07:28.246Z",
        "ts=2025-11-25T12:07:28.246Z",
        "ts=2025-11-25T12:07:28.247Z",
        "ts=2025-11-25T12:07:29.000Z",
    ]


def test_lines_rendered_when_their_batch_leaves_keep_their_time_and_order(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inside the event loop a line whose values cannot change is rendered only when
    # its batch leaves; one with a value that can change is rendered at once.  Both
    # keep the time they were logged at, and their order.
    clock = iter([1764072448.2461, 1764072448.5002, 1764072449.7503])
    monkeypatch.setattr(mailgate.ops.logging.time, "time", lambda: next(clock))

    async def main() -> None:
        log = SessionLog("S1", ip="192.0.2.1")
        seen: list[str] = []
        log.event("a", n=1, to="x@example.org")
        log.event("b", seen=seen)
        seen.append("later")
        log.event("c", n=3, f=0.25)
        assert stream.getvalue() == ""  # waiting to leave together
        flush_logs()

    asyncio.run(main())
    assert lines(stream) == [
        "ts=2025-11-25T12:07:28.246Z level=info sid=S1 event=a ip=192.0.2.1 n=1 to=x@example.org",
        "ts=2025-11-25T12:07:28.500Z level=info sid=S1 event=b ip=192.0.2.1 seen=[]",
        "ts=2025-11-25T12:07:29.750Z level=info sid=S1 event=c ip=192.0.2.1 n=3 f=0.25",
    ]


keys = st.sampled_from(
    ["a", "b", "ip", "a b", "a_b", "ts", "ts_", "event", "sid", "password", "x.token", "é"]
)
values = st.one_of(
    st.text(max_size=12), st.integers(), st.floats(), st.booleans(), st.none(),
    st.binary(max_size=3), st.lists(st.integers(), max_size=2),
)  # fmt: skip
field_dicts = st.dictionaries(keys, values, max_size=5)


@given(field_dicts, field_dicts, field_dicts)
def test_a_session_line_is_what_the_general_renderer_writes(
    context: dict[str, object], bound: dict[str, object], fields: dict[str, object]
) -> None:
    out = io.StringIO()
    use(out)
    log = SessionLog("S1", **context)
    log.bind(**bound)
    log.event("ev", **fields)
    expected = mailgate.ops.logging._render(
        False, False, 0.0, logging.INFO, "S1", "ev", {**context, **bound, **fields}
    )
    assert after_ts(out) == [expected]


class _Writes(io.StringIO):
    """A stream that remembers each flushed write, as a pipe would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.mark.parametrize("value", ["x" * 150, "é" * 150, "y" * 5000])
def test_batched_lines_leave_in_whole_line_pieces_of_pipe_size(value: str) -> None:
    """Workers share stderr: a write must never cut a line another can interleave with."""
    stream = _Writes()
    setup_logging(LoggingConfig(), stream)
    log = SessionLog("S1")
    try:
        for n in range(100):
            log.event("rcpt", n=n, to=value)
        flush_logs()
    finally:
        setup_logging(LoggingConfig())
    lines = stream.getvalue().splitlines()
    assert len(lines) == 100 and all(f"n={n} " in lines[n] for n in range(100))
    assert len(stream.writes) > 1
    for piece in stream.writes:
        assert piece.endswith("\n")
        assert len(piece.encode()) <= select.PIPE_BUF or piece.count("\n") == 1


def test_info_lines_wait_a_moment_to_leave_together_warnings_do_not() -> None:
    stream = _Writes()
    setup_logging(LoggingConfig(), stream)
    log = SessionLog("S1")

    async def main() -> tuple[int, int, int]:
        log.event("rcpt", to="a@b.example")
        log.event("rcpt", to="c@d.example")
        await asyncio.sleep(0)
        after_a_turn = len(stream.writes)
        await asyncio.sleep(FLUSH_DELAY * 4)
        after_the_delay = len(stream.writes)
        log.event("spool", level="warning", error="disk full")
        await asyncio.sleep(0)
        return after_a_turn, after_the_delay, len(stream.writes)

    try:
        assert asyncio.run(main()) == (0, 1, 2)  # two info lines in one write; the warning at once
    finally:
        setup_logging(LoggingConfig())
    assert stream.getvalue().count("\n") == 3
