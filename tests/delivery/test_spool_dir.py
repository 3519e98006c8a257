"""The spool: streamed writes, head reads for filters, discard and start-up cleanup."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailgate.delivery import spool as spool_module
from mailgate.delivery.spool import SpoolDir, crlf_to_lf, reply_for_os_error, unwritable


def test_create_makes_the_directory_and_writes_stream_in(tmp_path: Path) -> None:
    spool_dir = SpoolDir(str(tmp_path / "a" / "spool"))
    spool = spool_dir.create("sess/../id\r\n")
    assert Path(spool.path).parent == tmp_path / "a" / "spool"  # no path tricks from the id
    chunk = b"x" * 100_000 + b"\r\n"
    for _ in range(30):
        spool.write(chunk)
    assert spool.size == 30 * len(chunk)
    assert spool.read_head(10) == b"x" * 10  # flushed before reading, while still open
    spool.close()
    assert Path(spool.path).read_bytes() == chunk * 30
    assert spool.read_head(-1) == b""


def test_each_message_gets_its_own_file(tmp_path: Path) -> None:
    spool_dir = SpoolDir(str(tmp_path))
    first, second = spool_dir.create("s1"), spool_dir.create("s1")
    assert first.path != second.path


def test_discard_removes_the_file_and_can_be_repeated(tmp_path: Path) -> None:
    spool = SpoolDir(str(tmp_path)).create("s1")
    spool.write(b"data")
    spool.discard()
    spool.discard()
    assert not os.path.exists(spool.path)
    assert list(tmp_path.iterdir()) == []


def test_cleanup_removes_files_of_dead_processes_only(tmp_path: Path) -> None:
    spool_dir = SpoolDir(str(tmp_path))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    try:
        (tmp_path / f"a.{dead.stdout.strip()}.0.spool").write_bytes(b"stale")
        (tmp_path / f"b.{os.getpid()}.3.spool").write_bytes(b"from an earlier us")
        (tmp_path / f"c.{live.pid}.0.spool").write_bytes(b"in flight elsewhere")
        (tmp_path / "notes.txt").write_bytes(b"not ours")
        assert spool_dir.cleanup() == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"c.{live.pid}.0.spool", "notes.txt"]
    finally:
        live.kill()
        live.wait()
    assert SpoolDir(str(tmp_path / "missing")).cleanup() == 0


def test_crlf_to_lf_across_chunk_boundaries() -> None:
    text = b"a\r\nb\r\n\r\nc\rd\r\n"
    for cut in range(len(text) + 1):
        assert b"".join(crlf_to_lf([text[:cut], text[cut:]])) == text.replace(b"\r\n", b"\n")


def test_os_errors_map_to_storage_or_local_error() -> None:
    assert str(reply_for_os_error(OSError(errno.ENOSPC, "full"))) == (
        "452 4.3.1 Insufficient system storage"
    )
    assert reply_for_os_error(OSError(errno.EDQUOT, "quota")).code == 452
    assert reply_for_os_error(OSError(errno.EACCES, "denied")).enhanced == "4.3.0"


def test_ensure_makes_the_directory_or_names_it(tmp_path: Path) -> None:
    made = SpoolDir(str(tmp_path / "a" / "spool"))
    made.ensure()
    assert (tmp_path / "a" / "spool").is_dir()
    assert (tmp_path / "a" / "spool").stat().st_mode & 0o777 == 0o700
    (tmp_path / "file").write_text("x")
    blocked = SpoolDir(str(tmp_path / "file" / "spool"))  # under a file: never a directory
    try:
        blocked.ensure()
    except OSError as exc:
        assert exc.errno == errno.ENOTDIR
        assert str(exc).endswith(f"spool_dir {tmp_path}/file/spool: Not a directory")
    else:
        raise AssertionError("ensure() accepted a spool under a file")


def test_unwritable_for_the_user_the_server_will_become(tmp_path: Path) -> None:
    # check-config runs as root and checks for server.user by the mode bits
    other_uid, other_gid = os.geteuid() + 4242, os.getegid() + 4242
    box = tmp_path / "box"
    box.mkdir()
    box.chmod(0o755)
    assert unwritable(str(box / "deep" / "spool"), (other_uid, other_gid)) == str(box)
    box.chmod(0o757)  # others may write and search
    assert unwritable(str(box / "deep" / "spool"), (other_uid, other_gid)) is None
    box.chmod(0o775)  # the group may
    assert unwritable(str(box), (other_uid, box.stat().st_gid)) is None
    assert unwritable(str(box), (other_uid, other_gid)) == str(box)
    assert unwritable(str(box), (0, 0)) is None  # root writes anywhere the bits allow
    (tmp_path / "file").write_text("x")
    assert unwritable(str(tmp_path / "file" / "spool")) == str(tmp_path / "file")


def test_ensure_names_the_real_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a spool on a file system remounted read-only was "Permission denied" (os.access),
    # pointing the operator at the modes instead of the mount
    def read_only(*args: object, **kwargs: object) -> tuple[int, str]:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(spool_module.tempfile, "mkstemp", read_only)
    with pytest.raises(OSError, match="Read-only file system") as caught:
        SpoolDir(str(tmp_path / "spool")).ensure()
    assert caught.value.errno == errno.EROFS
