"""Coverage-guided fuzzing of the sans-I/O SMTP engine with atheris (libFuzzer).

The same properties as tests/protocol/test_fuzz.py, whose driver this reuses: the
engine never raises, every reply is well-formed, and cutting the input into reads at
other places changes neither the replies nor the events.

Input layout (so that seeds are easy to write by hand):
  byte 0     flags: bit 0 = Settings.normalize_bare_lf
  byte 1     number of read boundaries n (taken mod 16)
  2n bytes   boundaries, big-endian uint16 each, taken mod (len(stream) + 1)
  rest       the bytes the client sends

Run (see README.md):  python bench/fuzz/fuzz_engine.py bench/fuzz/corpus -max_total_time=600
Without atheris, ``--replay FILE|DIR...`` checks the given inputs once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "protocol")]

MAX_CUTS = 16
Runner = Callable[[bytes, list[int], bool], tuple[bytes, list[object]]]


def load_runner() -> Runner:
    """The Hypothesis tests' driver (imported late so atheris can instrument it)."""
    from test_fuzz import run

    return run


def split_input(data: bytes) -> tuple[bool, list[int], bytes]:
    """Decode the input layout above; any byte string is a valid input."""
    if len(data) < 2:
        return False, [], data
    normalize = bool(data[0] & 1)
    n = data[1] % MAX_CUTS
    raw_cuts = data[2 : 2 + 2 * n]
    stream = data[2 + len(raw_cuts) :]
    cuts = sorted(
        {int.from_bytes(raw_cuts[i : i + 2], "big") % (len(stream) + 1)
         for i in range(0, len(raw_cuts) - 1, 2)}
    )
    return normalize, cuts, stream


def check(data: bytes, run: Runner) -> None:
    normalize, cuts, stream = split_input(data)
    whole = run(stream, [], normalize)
    split = run(stream, cuts, normalize)
    assert split == whole, (stream, cuts, normalize)


def replay(paths: list[str]) -> int:
    files = [f for p in map(Path, paths) for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
    run = load_runner()
    for f in files:
        check(f.read_bytes(), run)
        print(f"ok {f}")
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--replay"]:
        return replay(sys.argv[2:])
    import atheris  # only needed for fuzzing proper

    # Coverage feedback from mailgate's code only (instrumenting everything loaded,
    # Hypothesis included, costs minutes at start-up and slows every run).
    with atheris.instrument_imports(include=["mailgate"]):
        run = load_runner()
    atheris.Setup(sys.argv, lambda data: check(data, run))
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
