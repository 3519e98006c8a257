"""What the benchmark reads about a server process from /proc."""

from __future__ import annotations

import os

_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a mailgate supervisor and its workers)."""
    tree = [pid]
    for parent in tree:  # grows while it is walked: breadth first
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                tree.extend(int(child) for child in f.read().split())
        except FileNotFoundError:
            continue
    return tree


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process and its live children, all threads."""
    total = 0.0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as f:
                text = f.read()
        except FileNotFoundError:
            continue
        # the command name (field 2) may hold spaces: count fields after its ")"
        fields = text.rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) / _TICKS  # fields 14 and 15 of stat
    return total


def memory_kb(pid: int, key: str) -> int:
    """A size line of /proc/<pid>/status, in KiB, added up over the process and its
    children: VmRSS (now) or VmHWM (peak; the sum of each process's peak, an upper
    bound of the tree's).  Pages the workers share with each other count once each."""
    total = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
        except (FileNotFoundError, StopIteration):
            continue
    return total


def machine() -> str:
    """One line: CPU model and count, memory, kernel."""
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = _meminfo_total_mb()
    return f"{os.cpu_count()} x {model}, {mem} MB RAM, Linux {os.uname().release}"


def _meminfo_total_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 0
