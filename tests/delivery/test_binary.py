"""Which BINARYMIME messages hold binary data, wherever the chunks are cut."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailgate.delivery.binary import MAX_LINE, file_holds_binary, holds_binary


@pytest.mark.parametrize(
    ("data", "binary"),
    [
        (b"", False),
        (b"Subject: x\r\n\r\ncaf\xc3\xa9 \xff\r\n", False),  # 8-bit text is not binary
        (b"last line without its end", False),
        (b"x" * MAX_LINE + b"\r\n", False),
        (b"x" * MAX_LINE, False),
        (b"x" * (MAX_LINE + 1) + b"\r\n", True),
        (b"x" * (MAX_LINE + 1), True),
        (b"a\x00b\r\n", True),
        (b"a\nb\r\n", True),
        (b"a\rb\r\n", True),
        (b"a\r\nb\r", True),
        (b"a\r\nb\n", True),
    ],
)
def test_holds_binary_whole_and_cut_anywhere(data: bytes, binary: bool) -> None:
    assert holds_binary([data]) is binary
    for cut in range(len(data) + 1):
        assert holds_binary([data[:cut], data[cut:]]) is binary, cut


def test_file_holds_binary(tmp_path: Path) -> None:
    text, binary = tmp_path / "text", tmp_path / "binary"
    text.write_bytes(b"line\r\n" * 400_000)  # over one read
    binary.write_bytes(b"line\r\n" * 400_000 + b"\x00")
    assert not file_holds_binary(str(text))
    assert file_holds_binary(str(binary))
