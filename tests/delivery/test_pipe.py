"""PipeDestination running real mailer programs (small Python scripts)."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import sys
import textwrap
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop

from mailgate.config.delivery import PipeConfig
from mailgate.delivery.base import RecipientResult, TraceInfo
from mailgate.delivery.pipe import PipeDestination
from mailgate.protocol.envelope import NULL_ADDRESS, Address, Envelope, Recipient

TRACE = TraceInfo("id42", "client.test", "192.0.2.1", None, "mx.test", "ESMTP")

# Records its argv and stdin in OUT (one JSON line per run), then behaves as told by
# the environment-free convention: a recipient "exitNN@..." makes it exit NN.
RECORDER = """
import json, os, sys
data = sys.stdin.buffer.read()
with open(OUT, "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "stdin": data.decode("latin-1")}) + "\\n")
for arg in sys.argv[1:]:
    if arg.startswith("exit"):
        sys.stderr.write("line one for " + arg + "\\nline two\\n")
        sys.exit(int(arg[4:6]))
"""


@dataclass
class Spooled:
    path: str
    size: int


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "runs.jsonl"


def script(tmp_path: Path, body: str, out: Path | None = None) -> str:
    path = tmp_path / "mailer.py"
    path.write_text(f"OUT = {str(out)!r}\n" + textwrap.dedent(body))
    return str(path)


def runs(out: Path) -> list[dict[str, object]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines()]


def deliver(
    command: list[str],
    tmp_path: Path,
    recipients: list[Address],
    message: bytes = b"Subject: t\r\n\r\nbody\r\n",
    sender: Address | None = None,
    timeout: float = 30,
    run: Callable[[Coroutine[Any, Any, list[RecipientResult]]], list[RecipientResult]] = (
        asyncio.run
    ),
) -> list[RecipientResult]:
    spool_path = tmp_path / "msg.spool"
    spool_path.write_bytes(message)
    rcpts = [Recipient(a) for a in recipients]
    env = Envelope(sender=sender or Address("s", "client.test"), recipients=rcpts)
    dest = PipeDestination(PipeConfig(command=command, timeout=timeout))
    results = run(dest.deliver(env, TRACE, Spooled(str(spool_path), len(message)), rcpts))
    assert [r.recipient for r in results] == rcpts
    return results


def codes(results: list[RecipientResult]) -> list[tuple[int, str | None]]:
    return [(r.reply.code, r.reply.enhanced) for r in results]


def test_envelope_in_argv_and_message_on_stdin_with_lf(tmp_path: Path, out: Path) -> None:
    mailer = script(tmp_path, RECORDER, out)
    body = b"".join(b"line %d with \xe9\r\n" % i for i in range(30_000))  # > one chunk
    message = b"Received: from x\r\nSubject: t\r\n\r\n" + body
    command = [sys.executable, mailer, "-f", "{sender}", "--id={id}", "--", "{recipients}"]
    results = deliver(command, tmp_path, [Address("a", "x.test"), Address("b", "y.test")], message)
    assert codes(results) == [(250, "2.0.0")] * 2
    (run,) = runs(out)
    assert run["argv"] == ["-f", "s@client.test", "--id=id42", "--", "a@x.test", "b@y.test"]
    expected = b"Return-Path: <s@client.test>\n" + message.replace(b"\r\n", b"\n")
    assert run["stdin"] == expected.decode("latin-1")


def test_addresses_never_reach_a_shell(tmp_path: Path, out: Path) -> None:
    mailer = script(tmp_path, RECORDER, out)
    marker = tmp_path / "pwned"
    nasty = Address(f"$(touch {marker});`touch {marker}` | x", "x.test", quoted=True)
    deliver([sys.executable, mailer, "--", "{recipients}"], tmp_path, [nasty])
    (run,) = runs(out)
    assert run["argv"] == ["--", str(nasty)]
    assert not marker.exists()


def test_placeholders_are_filled_in_once(tmp_path: Path, out: Path) -> None:
    mailer = script(tmp_path, RECORDER, out)
    tricky = Address("{id}", "x.test", quoted=True)
    deliver([sys.executable, mailer, "--to={recipient}"], tmp_path, [tricky])
    assert runs(out)[0]["argv"] == ['--to="{id}"@x.test']


def test_dash_recipient_refused_before_double_dash(tmp_path: Path, out: Path) -> None:
    mailer = script(tmp_path, RECORDER, out)
    rcpts = [Address("-oQ/tmp/x", "x.test"), Address("ok", "x.test")]
    results = deliver([sys.executable, mailer, "{recipients}"], tmp_path, rcpts)
    assert codes(results) == [(550, "5.1.3"), (250, "2.0.0")]
    assert runs(out)[0]["argv"] == ["ok@x.test"]


def test_dash_recipient_passed_after_double_dash(tmp_path: Path, out: Path) -> None:
    mailer = script(tmp_path, RECORDER, out)
    rcpts = [Address("-oQ/tmp/x", "x.test")]
    results = deliver([sys.executable, mailer, "--", "{recipients}"], tmp_path, rcpts)
    assert codes(results) == [(250, "2.0.0")]
    assert runs(out)[0]["argv"] == ["--", "-oQ/tmp/x@x.test"]


def test_dash_sender_refuses_everything_and_runs_nothing(tmp_path: Path, out: Path) -> None:
    mailer = script(tmp_path, RECORDER, out)
    command = [sys.executable, mailer, "-f", "{sender}", "--", "{recipients}"]
    rcpts = [Address("a", "x.test"), Address("b", "x.test")]
    results = deliver(command, tmp_path, rcpts, sender=Address("-bad", "x.test"))
    assert codes(results) == [(550, "5.1.7")] * 2
    assert runs(out) == []


def test_null_sender_and_glued_option(tmp_path: Path, out: Path) -> None:
    mailer = script(tmp_path, RECORDER, out)
    deliver(
        [sys.executable, mailer, "-f{sender}"], tmp_path, [Address("a", "x")], sender=NULL_ADDRESS
    )
    deliver(
        [sys.executable, mailer, "-f{sender}"],
        tmp_path,
        [Address("a", "x")],
        sender=Address("-dash", "x"),
    )
    assert [r["argv"] for r in runs(out)] == [["-f<>"], ["-f-dash@x"]]


def test_one_run_per_recipient_with_its_own_outcome(tmp_path: Path, out: Path) -> None:
    mailer = script(tmp_path, RECORDER, out)
    rcpts = [Address("a", "x.test"), Address("exit67", "x.test"), Address("exit75", "x.test")]
    results = deliver([sys.executable, mailer, "{recipient}"], tmp_path, rcpts)
    assert codes(results) == [(250, "2.0.0"), (554, "5.1.1"), (451, "4.3.0")]
    assert [r["argv"] for r in runs(out)] == [[str(a)] for a in rcpts]
    # stderr lines come first, every line with the code and enhanced code.
    assert results[2].reply.to_bytes() == (
        b"451-4.3.0 line one for exit75@x.test\r\n"
        b"451-4.3.0 line two\r\n"
        b"451 4.3.0 mail process terminated abnormally\r\n"
    )


def test_refused_pattern_in_stderr_is_permanent(tmp_path: Path) -> None:
    mailer = script(
        tmp_path,
        """
        import sys
        sys.stdin.buffer.read()
        sys.stderr.write("vf: mail refused: executable attachment\\n")
        sys.exit(1)
    """,
    )
    results = deliver([sys.executable, mailer], tmp_path, [Address("a", "x")])
    assert codes(results) == [(554, "5.6.0")]
    assert results[0].reply.lines[0] == "vf: mail refused: executable attachment"


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
@pytest.mark.parametrize(
    ("status", "expected"), [(0, (250, "2.0.0")), (1, (451, "4.3.0")), (67, (554, "5.1.1"))]
)
def test_mailer_that_does_not_read_stdin(
    tmp_path: Path, status: int, expected: tuple[int, str], run: Any
) -> None:
    # judged by its exit status alone, on the server's loop too (uvloop says a closed
    # pipe with RuntimeError, asyncio with BrokenPipeError)
    for message in (b"Subject: t\r\n\r\nshort\r\n", b"x" * 998 + b"\r\n" * 4000):
        # a shell exits before the first write: the pipe is gone when it is written
        results = deliver(["/bin/sh", "-c", f"exit {status}"], tmp_path, [Address("a", "x")],
                          message, run=run)
        assert codes(results) == [expected]
    mailer = script(tmp_path, f"import sys\nsys.stdin.close()\nsys.exit({status})\n")
    message = b"x" * 1000 + b"\r\n"
    results = deliver([sys.executable, mailer], tmp_path, [Address("a", "x")], message * 4000,
                      run=run)
    assert codes(results) == [expected]


@pytest.mark.parametrize(
    ("status", "enhanced"), [(65, "5.6.0"), (67, "5.1.1"), (68, "5.1.2"), (77, "5.7.1")]
)
def test_permanent_exits_say_what_they_mean(tmp_path: Path, status: int, enhanced: str) -> None:
    # EX_NOHOST is permanent too (sendmail, Postfix); each with its RFC 3463 status
    mailer = script(tmp_path, f"import sys\nsys.stdin.read()\nsys.exit({status})\n")
    assert codes(deliver([sys.executable, mailer], tmp_path, [Address("a", "x")])) == [
        (554, enhanced)
    ]


def test_a_mailer_is_judged_by_its_exit_not_by_children_holding_stderr(
    tmp_path: Path,
) -> None:
    # It delivered and exited 0, leaving a child with its stderr: waiting for the
    # stderr to close ran into the timeout, and a 451 had the message sent again.
    mailer = script(
        tmp_path,
        """
        import subprocess, sys
        sys.stdin.read()
        subprocess.Popen(["sleep", "30"], stderr=sys.stderr)
        sys.stderr.write("started a helper\\n")
        sys.exit(0)
    """,
    )
    started = time.monotonic()
    results = deliver([sys.executable, mailer], tmp_path, [Address("a", "x")], timeout=10)
    assert codes(results) == [(250, "2.0.0")]
    assert time.monotonic() - started < 8  # not the timeout



def test_stderr_is_bounded(tmp_path: Path) -> None:
    mailer = script(
        tmp_path,
        """
        import sys
        for i in range(5000):
            sys.stderr.write(f"{i} " + "e" * 300 + "\\n")
        sys.exit(75)
    """,
    )
    results = deliver([sys.executable, mailer], tmp_path, [Address("a", "x")])
    assert codes(results) == [(451, "4.3.0")]
    assert len(results[0].reply.lines) == 11
    assert results[0].reply.lines[0].startswith("0 eee")


def test_signal_is_temporary(tmp_path: Path) -> None:
    mailer = script(tmp_path, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert codes(deliver([sys.executable, mailer], tmp_path, [Address("a", "x")])) == [
        (451, "4.3.0")
    ]


def test_time_limit_kills_the_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    mailer = script(
        tmp_path,
        f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pids)!r}, "w").write(str(child.pid))
        time.sleep(600)
    """,
    )
    # long enough for two Python start-ups on a loaded machine, so the child exists
    results = deliver([sys.executable, mailer], tmp_path, [Address("a", "x")], timeout=4)
    assert codes(results) == [(451, "4.3.0")]
    child = int(pids.read_text())
    stat = Path(f"/proc/{child}/stat")

    def stopped() -> bool:  # gone, or a zombie waiting for init: no longer running
        try:
            return stat.read_text().split(") ")[1].startswith("Z")
        except FileNotFoundError:
            return True

    deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously
    while not stopped() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stopped()


def test_missing_program_is_temporary(tmp_path: Path) -> None:
    results = deliver([str(tmp_path / "nonexistent")], tmp_path, [Address("a", "x")])
    assert codes(results) == [(451, "4.3.0")]


@pytest.mark.parametrize(
    "config",
    [
        PipeConfig(command=[]),
        PipeConfig(command=["/bin/true", "--to={recipients}"]),
        PipeConfig(command=["/bin/true", "{recipient}", "{recipients}"]),
        PipeConfig(command=["/bin/true"], refused_pattern="(unclosed"),
    ],
)
def test_bad_templates_are_refused(config: PipeConfig) -> None:
    with pytest.raises(ValueError, match=r"^(command|refused_pattern): "):
        PipeDestination(config)


@pytest.mark.parametrize(
    ("command", "said"),
    [(["/bin/true", "-f", "{sendr}", "{rcpt}"], "command[3]: unknown placeholder {sendr}"),
     (["/bin/true", "--to={Recipient}"], "command[2]: unknown placeholder {Recipient}")],
)
def test_a_misspelt_placeholder_is_refused(command: list[str], said: str) -> None:
    # passed on as it was, it gave the mailer no recipient: exit 0, 250, mail lost
    with pytest.raises(ValueError) as info:
        PipeDestination(PipeConfig(command=command))
    assert str(info.value).startswith(said)
    assert str(info.value).endswith("known: {sender}, {recipients}, {recipient}, {id}")
    # what is no placeholder stays allowed: a JSON argument, a lone brace
    PipeDestination(PipeConfig(command=["/bin/true", '{"to": 1}', "{", "{}", "{sender}"]))


def test_a_mailer_that_cannot_run_is_named(tmp_path: Path) -> None:
    def problem(program: str) -> str | None:
        return PipeDestination(PipeConfig(command=[program])).problem()

    plain = tmp_path / "plain"
    plain.write_text("not a program")
    assert problem("/bin/true") is None and problem("sendmail") is None  # (PATH: not checked)
    assert problem(str(tmp_path / "nonexistent")) == (
        f"{tmp_path}/nonexistent is not a file: every message routed here is answered 451")
    assert problem(str(plain)) == (f"{plain} is not executable by the server's user: every "
                                   "message routed here is answered 451")


def test_the_mailer_gets_no_more_of_the_environment_than_it_needs(
    tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the server's own environment may hold what it was started with (a password)
    monkeypatch.setenv("MAILGATE_SECRET", "hunter2")
    monkeypatch.setenv("TZ", "UTC")
    monkeypatch.chdir(tmp_path)  # and its working directory (it runs in /)
    mailer = script(tmp_path, "import json, os, sys\nsys.stdin.read()\n"
                    "open(OUT, 'w').write(json.dumps({**os.environ, 'CWD': os.getcwd()}))\n",
                    out)
    assert codes(deliver([sys.executable, mailer], tmp_path, [Address("a", "x")])) == [
        (250, "2.0.0")
    ]
    seen = json.loads(out.read_text())
    assert "MAILGATE_SECRET" not in seen
    assert seen["TZ"] == "UTC" and seen["PATH"]
    assert seen["CWD"] == "/"
    # who it runs as, not who started the server (HOME=/root after the drop)
    account = pwd.getpwuid(os.geteuid())
    assert (seen["USER"], seen["HOME"]) == (account.pw_name, account.pw_dir)
