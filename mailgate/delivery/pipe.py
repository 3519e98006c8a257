"""Hand-off to a mailer program on a pipe, the upas ``send`` heritage.

The configured ``command`` is an argv list run **without a shell**
(``asyncio.create_subprocess_exec``), in its own process group.  Template items:

``{sender}``      the envelope sender (``<>`` for the null sender);
``{recipients}``  a whole item that becomes one item per recipient;
``{recipient}``   one recipient: the mailer then runs once per recipient;
``{id}``          the session id (also the queue id in our 250 reply).

Placeholders may sit inside a longer item (``--from={sender}``); values are put in
once, so an address containing ``{id}`` stays as it is.

**Addresses that look like options.**  A mailer parses its argv with getopt, so an
address such as ``-oQ/tmp@example.com`` at the start of an argv item would be taken
as an option.  An item that *begins* with an address is therefore refused when the
address begins with ``-``, unless the item comes after a ``--`` item of the template
(the end of the options).  Such a recipient gets ``550 5.1.3``, such a sender
``550 5.1.7`` for every recipient; the others are delivered.  Write templates as
``["/usr/sbin/sendmail", "-i", "-f", "{sender}", "--", "{recipients}"]`` and only
a sender beginning with ``-`` is refused (use ``-f{sender}`` to accept that too).

**Standard input** is ``Return-Path: <sender>`` then the spooled message (the
Received: header and the body), with **LF** line ends, as upas fed its mailers and
as Unix mail programs expect; it is streamed from the spool in large chunks.  A
mailer that exits without reading it all is not an error in itself: its exit
status decides.

**Outcome.**  Exit 0: ``250``.  Otherwise the first lines of its stderr (at most
10 lines of the first 8 KiB) come before our own reply line, each with its code:
exit EX_DATAERR (65), EX_NOUSER (67), EX_NOHOST (68) or EX_NOPERM (77), or a failure
whose stderr matches ``refused_pattern`` (a regular expression), is a permanent refusal
``554 5.6.0``; anything else (EX_TEMPFAIL, a signal, no exit within ``timeout``
seconds, after which the whole process group is killed) is ``451 4.3.0``.  The
mailer is judged by its own exit: a child it leaves running may keep its stderr open
(what it wrote within a second of the exit is kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
import signal

from mailgate.config.delivery import PipeConfig
from mailgate.delivery.base import RecipientResult, SpoolReader, TraceInfo
from mailgate.delivery.dotstuff import CRLFToLF, spool_chunks
from mailgate.delivery.handoff import may_send_data
from mailgate.delivery.spool import may_access
from mailgate.delivery.trace import return_path_header
from mailgate.protocol.envelope import Envelope, Recipient
from mailgate.protocol.replies import Reply, multiline, reply

log = logging.getLogger(__name__)

STDERR_LIMIT = 8 * 1024  # octets of the mailer's stderr kept; the rest is read and dropped
STDERR_LINES = 10  # lines of it put in the reply
REFUSED_EXITS = frozenset({os.EX_DATAERR, os.EX_NOUSER, os.EX_NOHOST, os.EX_NOPERM})
STDERR_GRACE = 1.0  # seconds left for the rest of its stderr once the mailer exited
_EXIT_STATUS = {os.EX_NOUSER: "5.1.1", os.EX_NOHOST: "5.1.2", os.EX_NOPERM: "5.7.1"}

_PLACEHOLDER = re.compile(r"\{(sender|recipient|id)\}")
_PLACEHOLDERS = ("sender", "recipients", "recipient", "id")
_ANY_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w.-]*)\}")  # what looks like one


class PipeDestination:
    """Runs ``config.command`` with the envelope in argv and the message on stdin."""

    def __init__(self, config: PipeConfig) -> None:
        """Raises ValueError for a command template that cannot work."""
        command = list(config.command)
        if not command or not command[0]:
            raise ValueError("command: must name a program")
        if any("{recipients}" in item and item != "{recipients}" for item in command):
            raise ValueError("command: {recipients} must be an item of its own")
        for n, item in enumerate(command, 1):
            # A misspelt one ({sendr}, {rcpt}) would be passed on as it is, and a
            # mailer given no recipient may well exit 0: the mail lost after a 250.
            unknown = next((m[0] for m in _ANY_PLACEHOLDER.finditer(item)
                            if m[1] not in _PLACEHOLDERS), None)
            if unknown is not None:
                raise ValueError(
                    f"command[{n}]: unknown placeholder {unknown[:40]}; known: "
                    + ", ".join("{" + name + "}" for name in _PLACEHOLDERS)
                )
        self._per_recipient = any("{recipient}" in item for item in command)
        if self._per_recipient and "{recipients}" in command:
            raise ValueError("command: use either {recipient} or {recipients}, not both")
        try:
            self._refused = re.compile(config.refused_pattern) if config.refused_pattern else None
        except re.error as e:
            raise ValueError(f"refused_pattern: not a regular expression ({e})") from e
        self._command = command
        self._timeout = config.timeout

    def problem(self, as_ids: tuple[int, int] | None = None) -> str | None:
        """Why the mailer could not be run (as this process, or the user and group
        ``as_ids``): start-up, reloads and check-config warn, since every message
        routed here would be answered 451."""
        program = self._command[0]
        if not os.path.isabs(program):
            return None  # (looked up in PATH when run: not checked here)
        if not os.path.isfile(program):
            return f"{program} is not a file: every message routed here is answered 451"
        if not may_access(program, os.X_OK, as_ids):
            return (f"{program} is not executable by the server's user: every message "
                    "routed here is answered 451")
        return None

    async def deliver(
        self,
        envelope: Envelope,
        trace: TraceInfo,
        spool: SpoolReader,
        recipients: list[Recipient],
    ) -> list[RecipientResult]:
        """One result per recipient; never raises."""
        try:
            # (a mailer cannot take a message back: it runs only once no other
            # hand-off of the message deferred a recipient, delivery.handoff)
            if not await may_send_data(deferred=False):
                held = reply("delivery.held_back")
                return [RecipientResult(r, held) for r in recipients]
            if not self._per_recipient:
                return await self._run_for(envelope, trace, spool, recipients)
            results = []
            # One run at a time: a mailer per recipient in parallel could fork hundreds.
            for recipient in recipients:
                results += await self._run_for(envelope, trace, spool, [recipient])
            return results
        except Exception:  # a bug must not lose the message: the client retries on 451
            log.exception("%s: mailer %s failed", trace.session_id, self._command[0])
            return [RecipientResult(r, reply("delivery.local_error")) for r in recipients]

    async def _run_for(
        self,
        envelope: Envelope,
        trace: TraceInfo,
        spool: SpoolReader,
        recipients: list[Recipient],
    ) -> list[RecipientResult]:
        argv, refused = self._argv(envelope, trace.session_id, recipients)
        outcome = None
        if argv is not None and len(refused) < len(recipients):
            outcome = await self._run(argv, trace.session_id, envelope, spool)
        return [
            RecipientResult(r, refused.get(i) or outcome or reply("delivery.local_error"))
            for i, r in enumerate(recipients)
        ]

    def _argv(
        self, envelope: Envelope, session_id: str, recipients: list[Recipient]
    ) -> tuple[list[str] | None, dict[int, Reply]]:
        """The argv, and the replies of recipients that cannot be passed in it.

        argv is None when the sender itself cannot be passed: then every recipient
        is refused.
        """
        sender = envelope.sender
        values = {
            "sender": str(sender) if sender is not None and not sender.is_null else "<>",
            "recipient": str(recipients[0].address) if recipients else "",
            "id": session_id,
        }
        argv: list[str] = []
        refused: dict[int, Reply] = {}
        after_options = False
        for item in self._command:
            if item == "{recipients}":
                for i, r in enumerate(recipients):
                    address = str(r.address)
                    if not after_options and address.startswith("-"):
                        refused[i] = reply("delivery.mailer_unsafe_recipient", address=address)
                    else:
                        argv.append(address)
                continue
            value = _PLACEHOLDER.sub(lambda m: values[m[1]], item)
            leading = _PLACEHOLDER.match(item)
            if leading and not after_options and value.startswith("-"):
                if leading[1] == "sender":
                    bad = reply("delivery.mailer_unsafe_sender", address=values["sender"])
                    return None, dict.fromkeys(range(len(recipients)), bad)
                if leading[1] == "recipient":
                    refused[0] = reply("delivery.mailer_unsafe_recipient", address=value)
            after_options = after_options or item == "--"
            argv.append(value)
        return argv, refused

    async def _run(
        self, argv: list[str], session_id: str, envelope: Envelope, spool: SpoolReader
    ) -> Reply:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group, to kill it whole
                env=mailer_environment(),
                # not the server's working directory (whatever it was started in,
                # with whatever files it holds): the root, as daemons' children have
                cwd="/",
            )
        except (OSError, ValueError) as e:
            log.error("%s: cannot run mailer %s: %s", session_id, argv[0], e)
            return reply("delivery.mailer_failed")
        assert proc.stdin is not None and proc.stderr is not None
        said = bytearray()
        stderr_task = asyncio.create_task(_read_bounded(proc.stderr, said))
        try:
            async with asyncio.timeout(self._timeout):
                await _feed(proc.stdin, return_path_header(envelope), spool.path)
                # Judged by its own exit: a child it left running (a daemon it
                # started) may hold stderr open long after it is done.
                status = await _exited(proc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STDERR_GRACE):
                    await asyncio.shield(stderr_task)
            stderr = bytes(said)
        except TimeoutError:
            # The whole group: a mailer's children may hold its stderr open.
            _kill_group(proc.pid)
            log.warning("%s: mailer %s timed out, killed", session_id, argv[0])
            return reply("delivery.mailer_failed")
        finally:
            if proc.returncode is None:
                _kill_group(proc.pid)
                await _exited(proc)
            stderr_task.cancel()
            # Our end of a stderr a child still holds: closed, not left to the
            # garbage collector (Process itself has no close()).
            transport = getattr(proc, "_transport", None)
            if transport is not None:
                transport.close()
        return self._outcome(status, stderr, session_id, argv[0])

    def _outcome(self, status: int, stderr: bytes, session_id: str, program: str) -> Reply:
        if status == 0:
            if stderr:
                log.info("%s: mailer %s succeeded but said: %r", session_id, program, stderr[:200])
            return reply("ok")
        text = stderr.decode("utf-8", "replace")
        lines = [line for line in text.splitlines() if line.strip()][:STDERR_LINES]
        refused = status in REFUSED_EXITS or (
            self._refused is not None and self._refused.search(text) is not None
        )
        log.warning(
            "%s: mailer %s %s %s: %s",
            session_id,
            program,
            "refused" if refused else "failed",
            f"signal {-status}" if status < 0 else f"exit {status}",
            lines[0] if lines else "",
        )
        name = "delivery.mailer_refused" if refused else "delivery.mailer_failed"
        answer = multiline(name, lines)
        # RFC 3463: what the exit says, where it says more than "content" (5.6.0)
        return answer.with_status(_EXIT_STATUS[status]) if status in _EXIT_STATUS else answer


async def _feed(stdin: asyncio.StreamWriter, header: bytes, spool_path: str) -> None:
    """Return-Path and the spooled message with LF line ends; stops if the mailer quits."""
    conv = CRLFToLF()
    try:
        stdin.write(conv.feed(header))
        async for chunk in spool_chunks(spool_path):
            if stdin.is_closing():
                break
            stdin.write(conv.feed(chunk))
            await stdin.drain()
        if not stdin.is_closing():
            stdin.write(conv.finish())
            await stdin.drain()
    except (BrokenPipeError, ConnectionResetError, RuntimeError):
        # It stopped reading: its exit status tells whether that was a failure.
        # (uvloop says so with RuntimeError "handler is closed", asyncio with EPIPE.)
        pass
    finally:
        stdin.close()


# What a mailer gets of the server's environment (Postfix's pipe passes as little):
# not the rest, which may hold what the server was started with (credentials, a
# Redis URL with its password, the service manager's variables).
MAILER_ENVIRONMENT = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "TZ", "LANG", "LC_ALL",
                      "LC_CTYPE")  # who it runs as (procmail finds its rc by HOME), where


def mailer_environment() -> dict[str, str]:
    env = {name: os.environ[name] for name in MAILER_ENVIRONMENT if name in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    # Who it runs as, not who started the server: after the privilege drop the
    # environment still said HOME=/root, USER=root.
    try:
        account = pwd.getpwuid(os.geteuid())
    except KeyError:
        return env
    env.update(HOME=account.pw_dir, USER=account.pw_name, LOGNAME=account.pw_name,
               SHELL=account.pw_shell or "/bin/sh")
    return env


async def _exited(proc: asyncio.subprocess.Process) -> int:
    """Its exit status as soon as it exits.  (uvloop's wait() says so; asyncio's also
    waits until its pipes are closed, which a child it left may never do: then its
    return code is looked at every 50 ms.)"""
    waiter = asyncio.ensure_future(proc.wait())
    try:
        while proc.returncode is None and not waiter.done():
            await asyncio.wait({waiter}, timeout=0.05)
        return proc.returncode if proc.returncode is not None else waiter.result()
    finally:
        waiter.cancel()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


async def _read_bounded(stream: asyncio.StreamReader, kept: bytearray) -> None:
    """The first STDERR_LIMIT octets into ``kept`` (so that what came is there when
    the reading is cancelled); the rest is read too, so the mailer never blocks."""
    while chunk := await stream.read(64 * 1024):
        if len(kept) < STDERR_LIMIT:
            kept += chunk[: STDERR_LIMIT - len(kept)]

