"""One load against two versions of mailgate, alternating fresh servers: run by hand,
never by the test suite.

For telling a change of the code from a change of this VM's state (see RESULTS.md):
the other version is a git worktree put first on PYTHONPATH, and the two take turns
(ABBA...) so that a drift of the machine hits both alike.  Discard mode, the bench
configuration (bench/servers.py), workers as the full bench runs them.

    git worktree add /tmp/base <commit>
    .venv/bin/python bench/ab.py p2 /tmp/base --pairs 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loads import LOADS, measure
from servers import raise_nofile, start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("load", choices=[load.name for load in LOADS])
    parser.add_argument("base", help="the other version's source tree (a git worktree)")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    raise_nofile()
    load = {item.name: item for item in LOADS}[args.load]
    work = Path(tempfile.mkdtemp(prefix="mailgate-ab-", dir="/var/tmp"))
    versions = [("base", args.base), ("head", None)]
    for pair in range(args.pairs):
        for name, tree in versions if pair % 2 == 0 else versions[::-1]:
            if tree:
                os.environ["PYTHONPATH"] = tree
            else:
                os.environ.pop("PYTHONPATH", None)
            os.sync()
            server = start("mailgate", "discard", work, 0)
            try:
                result = measure(load, server, pair)
            finally:
                server.stop()
            print(f"{name} {result.msgs_per_s:8.1f} msg/s {result.cpu_ms_per_msg:.3f} ms CPU/msg",
                  flush=True)


if __name__ == "__main__":
    main()
