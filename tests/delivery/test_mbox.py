"""mbox delivery: mboxrd quoting, dotlock plus flock, no interleaving, no half messages."""

from __future__ import annotations

import asyncio
import errno
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from delivery_helpers import TRACE, as_stored, envelope, spooled

from mailgate.config.delivery import MboxConfig
from mailgate.delivery import mbox as mbox_module
from mailgate.delivery.mbox import MboxDestination, append_message, mboxrd_quote
from mailgate.delivery.spool import MEMORY_LIMIT, LineEnds
from mailgate.protocol.envelope import Address, Recipient

TRICKY = (
    b"Subject: quoting\r\n\r\nFrom the top\r\n>From once\r\n>>From twice\r\n"
    b"Fromage is not quoted\r\n From indented is not\r\nFrom\r\nlast line without end"
)
FROM_ = re.compile(rb"^From \S+ \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}$")


def read_mboxrd(path: Path) -> list[bytes]:
    """Split an mboxrd file into messages and undo the quoting (a reader's view)."""
    messages: list[list[bytes]] = []
    for line in path.read_bytes().split(b"\n"):
        if FROM_.match(line):
            messages.append([])
            continue
        if re.match(rb"^>+From ", line):
            line = line[1:]
        messages[-1].append(line)
    # every message ends with an empty line: the LF before the next From_ line ends it
    assert messages and messages[-1][-2:] == [b"", b""]
    messages[-1].pop()
    return [b"\n".join(lines) for lines in messages]


def ended(data: bytes) -> bytes:
    """A message as an mbox reader gets it back: with its last line ended."""
    return data if data.endswith(b"\n") else data + b"\n"


def mbox(tmp_path: Path, **changes: object) -> MboxDestination:
    config = MboxConfig(path=str(tmp_path / "mail" / "{user}"), **changes)  # type: ignore[arg-type]
    return MboxDestination(config)


def alice() -> list[Recipient]:
    return [Recipient(Address("alice", "example.org"))]


def test_mboxrd_quoting_round_trips(tmp_path: Path) -> None:
    dest = mbox(tmp_path)
    env = envelope("alice@example.org")
    spool = spooled(tmp_path, TRICKY, env)
    (result,) = asyncio.run(dest.deliver(env, TRACE, spool, alice()))
    assert result.reply.code == 250
    raw = (tmp_path / "mail" / "alice").read_bytes()
    assert FROM_.match(raw.split(b"\n", 1)[0])
    assert raw.split(b"\n")[1] == b"Return-Path: <sender@example.net>"
    assert b"\n>From the top\n>>From once\n>>>From twice\nFromage" in raw
    assert b"\n From indented is not\nFrom\n" in raw
    assert raw.endswith(b"last line without end\n\n")
    assert read_mboxrd(tmp_path / "mail" / "alice") == [ended(as_stored(spool))]
    assert not (tmp_path / "mail" / "alice.lock").exists()


def test_binary_mime_keeps_every_octet(tmp_path: Path) -> None:
    # RFC 3030 3: binary data is delivered with all bits of each octet, CRs included
    # (a CRLF and a bare LF stay distinguishable); mbox adds only its own separator.
    dest = mbox(tmp_path)
    env = envelope("alice@example.org", body="BINARYMIME")
    data = b"Subject: bin\r\n\r\n\xff\x00\r\n\x01\n\x02\r"
    spool = spooled(tmp_path, data, env)
    (result,) = asyncio.run(dest.deliver(env, TRACE, spool, alice()))
    assert result.reply.code == 250
    raw = (tmp_path / "mail" / "alice").read_bytes()
    head, stored = raw.split(b"\n", 1)
    assert FROM_.match(head)
    spooled_octets = Path(spool.path).read_bytes()
    assert stored == b"Return-Path: <sender@example.net>\r\n" + spooled_octets + b"\n\n"


def test_quoting_is_the_same_whatever_the_chunking() -> None:
    text = b"From a\n>From b\nxFrom c\n>>From d\nFro"
    whole = b"".join(mboxrd_quote([text]))
    assert whole == b">From a\n>>From b\nxFrom c\n>>>From d\nFro"
    for cut in range(len(text) + 1):
        assert b"".join(mboxrd_quote([text[:cut], text[cut:]])) == whole


def test_concurrent_writers_do_not_interleave(tmp_path: Path) -> None:
    dest = mbox(tmp_path)
    env = envelope("alice@example.org")
    big = [
        spooled(
            tmp_path / str(i),
            b"Subject: big\r\n\r\n" + (bytes([65 + i]) * 99 + b"\r\n") * 30000,
            env,
        )
        for i in range(4)
    ]

    async def main() -> list[list[object]]:
        return await asyncio.gather(*(dest.deliver(env, TRACE, s, alice()) for s in big))

    outcomes = asyncio.run(main())
    assert all(r.reply.code == 250 for results in outcomes for r in results)  # type: ignore[attr-defined]
    stored = read_mboxrd(tmp_path / "mail" / "alice")
    assert sorted(stored) == sorted(ended(as_stored(s)) for s in big)


def test_a_stale_dotlock_of_a_dead_process_is_broken(tmp_path: Path) -> None:
    dest = mbox(tmp_path)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "alice.lock").write_text(f"{gone}\n")
    env = envelope("alice@example.org")
    (result,) = asyncio.run(dest.deliver(env, TRACE, spooled(tmp_path, TRICKY, env), alice()))
    assert result.reply.code == 250
    assert not (tmp_path / "mail" / "alice.lock").exists()


def test_an_old_dotlock_is_broken_even_if_its_process_lives(tmp_path: Path) -> None:
    dest = mbox(tmp_path, stale_lock_age=60)
    (tmp_path / "mail").mkdir()
    lock = tmp_path / "mail" / "alice.lock"
    lock.write_text(f"{os.getpid()}\n")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    env = envelope("alice@example.org")
    (result,) = asyncio.run(dest.deliver(env, TRACE, spooled(tmp_path, TRICKY, env), alice()))
    assert result.reply.code == 250


def test_a_live_dotlock_makes_the_mailbox_busy(tmp_path: Path) -> None:
    dest = mbox(tmp_path, lock_timeout=0.3)
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "alice").write_bytes(b"")
    lock = tmp_path / "mail" / "alice.lock"
    lock.write_text(f"{os.getpid()}\n")
    env = envelope("alice@example.org")
    (result,) = asyncio.run(dest.deliver(env, TRACE, spooled(tmp_path, TRICKY, env), alice()))
    assert str(result.reply) == "450 4.2.0 Mailbox busy, try again later"
    assert (tmp_path / "mail" / "alice").read_bytes() == b""
    assert lock.exists()  # someone else's lock is left alone


def test_an_flock_held_by_another_process_makes_the_mailbox_busy(tmp_path: Path) -> None:
    dest = mbox(tmp_path, lock_timeout=0.3)
    (tmp_path / "mail").mkdir()
    path = tmp_path / "mail" / "alice"
    path.write_bytes(b"")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX);"
            " print('locked', flush=True); time.sleep(30)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        env = envelope("alice@example.org")
        spool = spooled(tmp_path, TRICKY, env)
        (result,) = asyncio.run(dest.deliver(env, TRACE, spool, alice()))
        assert result.reply.code == 450
        assert path.read_bytes() == b""
        assert not (tmp_path / "mail" / "alice.lock").exists()  # our dotlock was released
    finally:
        holder.kill()
        holder.wait()
    (result,) = asyncio.run(dest.deliver(env, TRACE, spool, alice()))
    assert result.reply.code == 250


def test_fixed_path_collects_every_recipient_once_each(tmp_path: Path) -> None:
    dest = MboxDestination(MboxConfig(path=str(tmp_path / "archive")))
    env = envelope("alice@example.org", "bob@example.org")
    spool = spooled(tmp_path, b"Subject: x\r\n\r\nbody\r\n", env)
    targets = [Recipient(Address("alice", "example.org")), Recipient(Address("bob", "example.org"))]
    results = asyncio.run(dest.deliver(env, TRACE, spool, targets))
    assert [r.reply.code for r in results] == [250, 250]
    assert len(read_mboxrd(tmp_path / "archive")) == 1


@pytest.mark.parametrize("size", ["held", "spooled"])
@pytest.mark.parametrize("no_bare_cr", [True, False])
def test_held_and_spooled_messages_are_stored_alike(
    tmp_path: Path, size: str, no_bare_cr: bool
) -> None:
    """A small message is appended from memory (no spool file is written for it), a
    large one from the spool file; both quoted alike, a stray CR kept unless the
    message is known to have none."""
    stray = b"" if no_bare_cr else b"a\rb\r\n"
    filler = b"z" * (MEMORY_LIMIT + 10) + b"\r\n" if size == "spooled" else b""
    message = TRICKY.replace(b"Fromage", stray + b"Fromage") + b"\r\n" + filler
    env = envelope("alice@example.org")
    spool = spooled(tmp_path, message, env)
    spool.no_bare_cr = no_bare_cr
    held = spool.held() is not None
    assert held == (size == "held")
    (result,) = asyncio.run(mbox(tmp_path).deliver(env, TRACE, spool, alice()))
    assert result.reply.code == 250
    assert not held or list((tmp_path / "spool").iterdir()) == []  # never written out
    [stored] = read_mboxrd(tmp_path / "mail" / "alice")
    assert stored == as_stored(spool)  # the spool's bytes, LF line ends, CR kept
    assert (b"a\rb\n" in stored) == (not no_bare_cr)


def test_what_a_writer_killed_mid_append_left_is_cut_off_by_the_next(tmp_path: Path) -> None:
    dest = mbox(tmp_path)
    env = envelope("alice@example.org")
    first = spooled(tmp_path, b"Subject: first\r\n\r\none\r\n", env)
    assert asyncio.run(dest.deliver(env, TRACE, first, alice()))[0].reply.code == 250
    box = tmp_path / "mail" / "alice"
    size = box.stat().st_size
    # a writer killed in the middle of its append: half a message, and its lock
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with box.open("ab") as f:
        f.write(b"From x@y Mon Jan  1 00:00:00 2024\nSubject: big\n\nhalf of i")
    (tmp_path / "mail" / "alice.lock").write_text(f"{dead.pid} {size}\n")
    second = spooled(tmp_path, b"Subject: second\r\n\r\ntwo\r\n", env)
    assert asyncio.run(dest.deliver(env, TRACE, second, alice()))[0].reply.code == 250
    subjects = [m.split(b"Subject: ")[1].split(b"\n")[0] for m in read_mboxrd(box)]
    assert subjects == [b"first", b"second"]
    assert not (tmp_path / "mail" / "alice.lock").exists()


def _append_all(box: Path, config: MboxConfig, tags: list[str]) -> tuple[list[str], list[str]]:
    """Append a message per tag from a thread each, at once: the tags stored, and the
    errors of those that failed."""
    done: list[str] = []
    failed: list[str] = []

    def append(tag: str) -> None:
        body = f"Subject: {tag}\r\n\r\n".encode() + b"text\r\n" * 3000
        try:
            append_message(str(box), envelope("alice@example.org"), body + f"END {tag}\r\n"
                           .encode(), config, LineEnds.LF)
            done.append(tag)
        except Exception as exc:
            failed.append(repr(exc))

    threads = [threading.Thread(target=append, args=(tag,)) for tag in tags]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done, failed


def test_writers_meeting_one_dead_lock_break_it_once(tmp_path: Path) -> None:
    # Eight deliveries wait on the lock of a writer that died mid-append.  Each used to
    # break it on its own: a late one cut off a message another had appended and
    # answered 250 to, and removed that writer's live lock (which then failed, 451).
    box = tmp_path / "box"
    config = MboxConfig(path=str(box), lock_timeout=60)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for round_ in range(5):
        good = b"From x Thu Jan  1 00:00:00 1970\nSubject: pre\n\npre\n\n"
        box.write_bytes(good + b"From y partial junk\n" + b"j" * 50_000)
        (tmp_path / "box.lock").write_text(f"{dead.pid} {len(good)}\n")
        done, failed = _append_all(box, config, [f"r{round_}t{i}" for i in range(8)])
        data = box.read_bytes()
        assert failed == [] and len(done) == 8
        assert all(f"END {tag}\n".encode() in data for tag in done)
        assert b"partial junk" not in data
        assert not (tmp_path / "box.lock").exists()


def test_a_lock_that_cannot_be_filled_in_is_not_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk: the lock's create needs an inode, its pid a block.  The empty lock
    # left behind held the mailbox up ("held by another writer") for stale_lock_age.
    real_write = os.write

    def full(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".lock"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    dest = mbox(tmp_path)
    env = envelope("alice@example.org")
    first = spooled(tmp_path, b"Subject: a\r\n\r\nx\r\n", env)
    monkeypatch.setattr(mbox_module.os, "write", full)
    assert asyncio.run(dest.deliver(env, TRACE, first, alice()))[0].reply.code == 452
    assert not (tmp_path / "mail" / "alice.lock").exists()
    monkeypatch.setattr(mbox_module.os, "write", real_write)
    second = spooled(tmp_path, b"Subject: b\r\n\r\ny\r\n", env)
    assert asyncio.run(dest.deliver(env, TRACE, second, alice()))[0].reply.code == 250


def test_busy_mailboxes_do_not_hold_up_the_loops_threads(tmp_path: Path) -> None:
    # Ten appends wait for mailboxes a live writer holds: in the loop's default pool
    # (six threads here) they held up everything else it runs, AUTH checks included.
    dest = mbox(tmp_path, lock_timeout=3)
    users = [f"u{i}" for i in range(10)]
    (tmp_path / "mail").mkdir(exist_ok=True)
    for user in users:
        (tmp_path / "mail" / f"{user}.lock").write_text(f"{os.getpid()}\n")
    env = envelope("alice@example.org")
    rcpts = [Recipient(Address(user, "example.org")) for user in users]

    async def main() -> None:
        spool = spooled(tmp_path, b"Subject: s\r\n\r\nx\r\n", env)
        waiting = asyncio.ensure_future(dest.deliver(env, TRACE, spool, rcpts))
        await asyncio.sleep(0.2)  # the appends have their threads
        loop = asyncio.get_running_loop()
        asked = loop.time()
        await asyncio.to_thread(int)  # the default pool still has one free...
        assert loop.time() - asked < 2  # ...not one an append gives back after 3 s
        assert not waiting.done()
        assert {r.reply.code for r in await waiting} == {450}

    asyncio.run(main())


def test_a_dead_writers_half_message_is_cut_off_at_start_up(tmp_path: Path) -> None:
    # It stayed visible to readers until the next delivery to that mailbox.
    dest = mbox(tmp_path)
    (tmp_path / "mail").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    good = b"From x Thu Jan  1 00:00:00 1970\nSubject: pre\n\npre\n\n"
    for user in ("alice", "bob", "carol"):
        (tmp_path / "mail" / user).write_bytes(good + b"From y\nSubject: half\n\nhalf of")
    (tmp_path / "mail" / "alice.lock").write_text(f"{dead.pid} {len(good)}\n")
    (tmp_path / "mail" / "bob.lock").write_text(f"{os.getpid()} {len(good)}\n")  # live
    # a symlink where an mbox should be: never followed (a local user could aim the
    # cut at any file the server may write)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 100)
    (tmp_path / "mail" / "carol").unlink()
    (tmp_path / "mail" / "carol").symlink_to(victim)
    (tmp_path / "mail" / "carol.lock").write_text(f"{dead.pid} 0\n")
    assert dest.recover_dead_appends() == 1
    assert (tmp_path / "mail" / "alice").read_bytes() == good
    assert not (tmp_path / "mail" / "alice.lock").exists()
    assert (tmp_path / "mail" / "bob").read_bytes().endswith(b"half of")
    assert victim.read_bytes() == b"precious" * 100


def test_a_symlink_where_the_mailbox_should_be_is_not_followed(tmp_path: Path) -> None:
    dest = mbox(tmp_path)
    (tmp_path / "mail").mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"not a mailbox\n")
    (tmp_path / "mail" / "alice").symlink_to(victim)
    env = envelope("alice@example.org")
    spool = spooled(tmp_path, b"Subject: s\r\n\r\nx\r\n", env)
    assert asyncio.run(dest.deliver(env, TRACE, spool, alice()))[0].reply.code == 451
    assert victim.read_bytes() == b"not a mailbox\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file another user's needs root")
def test_a_lock_planted_by_another_user_never_cuts_the_mailbox(tmp_path: Path) -> None:
    # In a mail spool local users write in, "999999 0" in bob.lock had the server cut
    # bob's mailbox (mail it had answered 250 for) to nothing.
    dest = mbox(tmp_path)
    (tmp_path / "mail").mkdir()
    box = tmp_path / "mail" / "bob"
    box.write_bytes(b"From x Thu Jan  1 00:00:00 1970\nSubject: kept\n\nmail\n\n")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "mail" / "bob.lock"
    lock.write_text(f"{dead.pid} 0\n")
    os.chown(lock, 4242, 4242)
    assert dest.recover_dead_appends() == 1  # the dead lock goes...
    assert b"Subject: kept" in box.read_bytes()  # ...and the mailbox stays whole


def test_a_hard_link_where_the_mailbox_should_be_is_not_written(tmp_path: Path) -> None:
    # another name of some file of ours (a local user may link to files it cannot read)
    dest = mbox(tmp_path)
    (tmp_path / "mail").mkdir()
    other = tmp_path / "mail" / "ours"
    other.write_bytes(b"someone's data\n")
    os.link(other, tmp_path / "mail" / "alice")
    env = envelope("alice@example.org")
    spool = spooled(tmp_path, b"Subject: s\r\n\r\nx\r\n", env)
    assert asyncio.run(dest.deliver(env, TRACE, spool, alice()))[0].reply.code == 451
    assert other.read_bytes() == b"someone's data\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs root")
def test_a_mailbox_made_by_a_local_user_first_is_not_written() -> None:
    # /var/mail/bob made by mallory before bob's first mail, readable to mallory and
    # writable to us: bob's mail would have gone to mallory.  The server runs as its
    # own user (a child that drops to nobody here); the file is someone else's.
    tmp_path = Path(tempfile.mkdtemp())  # (pytest's own is root's alone: nobody cannot enter)
    tmp_path.chmod(0o755)
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail").chmod(0o1777)
    squatted = tmp_path / "mail" / "bob"
    squatted.write_bytes(b"")
    squatted.chmod(0o666)  # (root's: not nobody's)
    own = tmp_path / "mail" / "daemon"
    own.write_bytes(b"")
    own.chmod(0o666)
    daemon = pwd.getpwnam("daemon")
    os.chown(own, daemon.pw_uid, daemon.pw_gid)
    code = f"""
import os, pwd, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from delivery_helpers import envelope
from mailgate.config.delivery import MboxConfig
from mailgate.delivery.mbox import append_message
nobody = pwd.getpwnam("nobody")
os.setgid(nobody.pw_gid); os.setuid(nobody.pw_uid)
try:
    append_message({str(squatted)!r}, envelope("bob@example.org"), b"Subject: s\\r\\n\\r\\nx\\r\\n",
                   MboxConfig(path={str(tmp_path / "mail" / "{user}")!r}))
except PermissionError as exc:
    print("refused:", exc)
# a mailbox of the recipient's own account (a spool of per-user mailboxes) is written
append_message({str(own)!r}, envelope("daemon@example.org"), b"Subject: s\\r\\n\\r\\nx\\r\\n",
               MboxConfig(path={str(tmp_path / "mail" / "{user}")!r}),
               owner=pwd.getpwnam("daemon").pw_uid)
print("own written")
"""
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60, cwd="/")
        assert "refused: " in done.stdout and "not a file of ours" in done.stdout, (
            done.stdout + done.stderr)
        assert squatted.read_bytes() == b""
        assert "own written" in done.stdout and b"Subject: s" in own.read_bytes()
    finally:
        shutil.rmtree(tmp_path)
