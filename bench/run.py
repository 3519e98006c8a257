"""Benchmark entry point: mailgate against aiosmtpd on uvloop, driven by smtp-source.

    .venv/bin/python bench/run.py            # full run (3 rounds, ~8 minutes on 2 cores)
    .venv/bin/python bench/run.py --quick    # 1 round, a tenth of the messages, ~2 minutes
    .venv/bin/python bench/run.py --part idle   # only the idle-connection test
    .venv/bin/python bench/run.py --part loads --floor   # with the floor responder too

Every measurement starts a fresh server process (so VmHWM is that load's peak) and the
servers take turns within each round, in an order that alternates between rounds.
Markdown tables go to stdout, raw numbers to <workdir>/results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers
from bigmsg import big_messages
from idle import rss_per_connection
from loads import LOADS, Measurement, measure, smtp_source_argv
from procstat import machine
from servers import check_tools, command, on_fresh_server, raise_nofile

SERVERS = ("mailgate", "aiosmtpd")
MODES = ("discard", "maildir")
# bench/floor_server.py, with --floor: an SMTP-shaped responder that parses and stores
# nothing, measured in discard mode as what any server on uvloop pays at the least.
FLOOR = "floor"


def run_loads(
    workdir: Path, rounds: int, scale: float, only: list[str], workers: int, floor: bool
) -> list[Measurement]:
    results: list[Measurement] = []
    for round_no in range(1, rounds + 1):
        order = SERVERS if round_no % 2 else tuple(reversed(SERVERS))
        for base in LOADS:
            if only and base.name not in only:
                continue
            for mode in MODES:
                load = base.scaled(scale)  # the sizes in both modes
                extra = (FLOOR,) if floor and mode == "discard" else ()
                for name in order + extra:
                    m = on_fresh_server(
                        name, mode, workdir, workers,
                        lambda server, load=load, r=round_no: measure(load, server, r),
                    )
                    results.append(m)
                    print(f"# round {round_no} {load.name} {mode} {name}: "
                          f"{m.msgs_per_s} msg/s, {m.cpu_ms_per_msg} ms CPU/msg, "
                          f"{m.peak_rss_mb} MB peak", file=sys.stderr, flush=True)
    return results


def loads_table(results: list[Measurement], scale: float) -> str:
    """The medians by load and mode; the ratio column is each server's msg/s over
    aiosmtpd's (the floor's too, when it ran)."""
    rows = ["| load | mode | messages | server | msg/s (median) | CPU ms/msg | peak RSS MB "
            "| ÷ aiosmtpd | by round |", "|---|---|---|---|---|---|---|---|---|"]
    for base in LOADS:
        for mode in MODES:
            medians = {}
            rates: dict[str, dict[int, float]] = {}
            for name in (*SERVERS, FLOOR):
                ms = [m for m in results if (m.load, m.mode, m.server) == (base.name, mode, name)]
                if ms:
                    medians[name] = (
                        statistics.median(m.msgs_per_s for m in ms),
                        statistics.median(m.cpu_ms_per_msg for m in ms),
                        max(m.peak_rss_mb for m in ms),
                    )
                    rates[name] = {m.round: m.msgs_per_s for m in ms}
            if "mailgate" not in medians or "aiosmtpd" not in medians:
                continue
            messages = base.scaled(scale).messages
            for name in medians:
                rate, cpu, rss = medians[name]
                shown = rounds = ""
                if name != "aiosmtpd":
                    shown = f"{rate / medians['aiosmtpd'][0]:.2f}x"
                    shown = f"**{shown}**" if name == "mailgate" else shown
                    # The ratio within each round too: on a shared VM the servers change
                    # speed from round to round, and medians can pair a fast round with a
                    # slow one.
                    rounds = " / ".join(
                        f"{rates[name][r] / rates['aiosmtpd'][r]:.2f}x"
                        for r in sorted(rates[name]) if r in rates["aiosmtpd"]
                    )
                rows.append(f"| {base.name} | {mode} | {messages} | {name} | {rate:.0f} "
                            f"| {cpu:.3f} | {rss:.1f} | {shown} | {rounds} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, a tenth of the mail")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--part", choices=["all", "loads", "idle", "big"], default="all")
    parser.add_argument("--load", action="append", default=[], help="only this load (p1..p4)")
    parser.add_argument("--workdir", default="/var/tmp/mailgate-bench")
    parser.add_argument("--floor", action="store_true",
                        help="measure bench/floor_server.py on the discard loads too")
    parser.add_argument("--workers", type=int, default=0,
                        help="mailgate's server.workers (0, the default: one per CPU)")
    parser.add_argument("--sync-method", choices=["fsync", "syncfs"], default="fsync",
                        help="mailgate's delivery.sync_method in durable mode")
    args = parser.parse_args()
    servers.SYNC_METHOD = args.sync_method
    check_tools()
    limit = raise_nofile()  # the idle test holds 10,000 client sockets
    results_dir = Path(args.workdir)
    # a directory per bench, removed at its end (see Server.stop)
    workdir = results_dir / f"run-{int(time.time())}"
    workdir.mkdir(parents=True, exist_ok=True)
    rounds, scale = (1, 0.1) if args.quick else (args.rounds, 1.0)
    started = time.monotonic()
    print(f"Machine: {machine()}; descriptor limit {limit}; mailgate workers = {args.workers}; "
          f"sync_method = {args.sync_method}\n")
    raw: dict[str, object] = {"machine": machine(), "quick": args.quick, "workers": args.workers,
                              "sync_method": args.sync_method}

    if args.part in ("all", "loads"):
        results = run_loads(workdir, rounds, scale, args.load, args.workers, args.floor)
        raw["loads"] = [asdict(m) for m in results]
        print(f"## Loads ({rounds} round(s), medians)\n\n{loads_table(results, scale)}\n")
        print("smtp-source commands (port varies):\n")
        for base in LOADS:
            print(f"    {' '.join(smtp_source_argv(base.scaled(scale), 0))}")
        print()

    if args.part in ("all", "idle"):
        counts = (1_000,) if args.quick else (1_000, 10_000)
        rows = ["| server | connections | RSS before MB | RSS after MB | KB per connection |",
                "|---|---|---|---|---|"]
        idle: list[dict[str, object]] = []
        for count in counts:
            for name in SERVERS:
                r = on_fresh_server(name, "discard", workdir, args.workers,
                                    lambda server, n=count: rss_per_connection(server, n))
                idle.append({"server": name, **r})
                rows.append(f"| {name} | {count} | {r['rss_before_mb']} | {r['rss_after_mb']} "
                            f"| {r['kb_per_connection']} |")
                print(f"# idle {name} {count}: {r}", file=sys.stderr, flush=True)
        raw["idle"] = idle
        print("## Idle connections (EHLO said, waiting)\n\n" + "\n".join(rows) + "\n")

    if args.part in ("all", "big"):
        count = 3 if args.quick else 10
        rows = ["| server | messages x MB | seconds | RSS before MB | RSS max MB | growth MB |",
                "|---|---|---|---|---|---|"]
        big: list[dict[str, object]] = []
        for name in SERVERS:
            r = on_fresh_server(name, "maildir", workdir, args.workers,
                                lambda server: big_messages(server, count))
            big.append({"server": name, **r})
            rows.append(f"| {name} | {count} x {r['size_mb']} | {r['seconds']} "
                        f"| {r['rss_before_mb']} | {r['rss_max_mb']} | {r['growth_mb']} |")
            print(f"# big {name}: {r}", file=sys.stderr, flush=True)
        raw["big"] = big
        print("## Big messages in parallel (durable Maildir mode)\n\n" + "\n".join(rows) + "\n")

    print("Server commands:\n")
    for name in SERVERS:
        print(f"    {' '.join(command(name, '<mode>', 0, workdir / '<run>'))}")
    print(f"\nTotal time: {time.monotonic() - started:.0f} s")
    (results_dir / "results.json").write_text(json.dumps(raw, indent=1))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
