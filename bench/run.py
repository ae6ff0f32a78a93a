"""Run the benchmarks: `python -m bench.run [workload ...]` (`make bench`).

Every workload measures the servers it compares in the same run, interleaved over several
rounds, and reports medians and the median of the per-round ratios: absolute rates swing by
a quarter from run to run on a small machine, ratios much less.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from bench.load import fan_out, open_room
from bench.servers import Server, chat_server, redis_server, temporary_db


@dataclass
class Report:
    workload: str
    rows: list[dict] = field(default_factory=list)  # one per server: medians of its rounds
    summary: dict = field(default_factory=dict)  # ratios and verdicts

    def lines(self) -> list[str]:
        return [json.dumps({"workload": self.workload, **row}) for row in self.rows] + [
            json.dumps({"workload": self.workload, "summary": self.summary})
        ]


def median_of(rounds: list[dict], key: str) -> float:
    return statistics.median(result[key] for result in rounds)


async def compare(
    servers: list[Server], rounds: int, run_once: Callable[[Server], Awaitable[dict]]
) -> dict[str, list[dict]]:
    """Run `run_once` against each server in turn, `rounds` times, alternating who goes first."""
    results: dict[str, list[dict]] = {server.name: [] for server in servers}
    for number in range(rounds):
        order = servers if number % 2 == 0 else list(reversed(servers))
        for server in order:
            results[server.name].append(await run_once(server))
    return results


# --- Workloads ---------------------------------------------------------------------------------


async def history_throughput(args: argparse.Namespace) -> Report:
    """Message throughput with the SQLite history on, against the same server with --no-history."""
    off = chat_server("--no-history", name="history off")
    on = chat_server("--db", temporary_db(), name="history on (SQLite)")
    servers = [off.start(), on.start()]
    messages = 300 if args.quick else 3000

    async def run_once(server: Server) -> dict:
        room = await open_room(server, 11)
        try:
            return await fan_out(room, messages=messages, window=50, cpu_seconds=server.cpu_seconds)
        finally:
            await room.close()

    try:
        results = await compare(servers, args.rounds, run_once)
    finally:
        for server in servers:
            server.stop()
    report = Report("history: 1 sender + 10 receivers, window 50")
    for name, rounds in results.items():
        report.rows.append(
            {
                "server": name,
                "messages_per_s": round(median_of(rounds, "messages_per_s")),
                "cpu_us_per_delivery": round(median_of(rounds, "cpu_us_per_delivery"), 2),
            }
        )
    ratios = [
        with_history["messages_per_s"] / without["messages_per_s"]
        for with_history, without in zip(results[on.name], results[off.name], strict=True)
    ]
    ratio = statistics.median(ratios)
    report.summary = {"throughput_on_vs_off": round(ratio, 3), "target": ">= 0.80", "met": ratio >= 0.8}
    return report


async def redis_scale(args: argparse.Namespace) -> Report:
    """Fan-out in one process against two processes sharing the room through Redis."""
    redis = redis_server().start()
    url = f"redis://127.0.0.1:{redis.port}/0"
    single = chat_server("--db", temporary_db(), name="1 process (SQLite history)").start()
    pair = [chat_server("--redis-url", url, name=f"redis process {n}").start() for n in (1, 2)]
    receivers = 20 if args.quick else 100
    messages = 100 if args.quick else 1000

    def cpu_of(servers: list[Server]) -> Callable[[], float]:
        return lambda: sum(server.cpu_seconds() for server in servers)

    results: dict[str, list[dict]] = {"1 process": [], "2 processes + Redis": []}
    try:
        for number in range(args.rounds):
            setups = [("1 process", [single], [single]), ("2 processes + Redis", pair, [*pair, redis])]
            for name, serving, measured in setups if number % 2 == 0 else reversed(setups):
                room = await open_room(serving, receivers + 1)
                try:
                    results[name].append(
                        await fan_out(room, messages, window=20, cpu_seconds=cpu_of(measured))
                    )
                finally:
                    await room.close()
    finally:
        for server in [single, *pair, redis]:
            server.stop()
    report = Report(f"redis: 1 sender + {receivers} receivers, {messages} messages, window 20")
    for name, rounds in results.items():
        report.rows.append(
            {
                "server": name,
                "deliveries_per_s": round(median_of(rounds, "deliveries_per_s")),
                "cpu_us_per_delivery": round(median_of(rounds, "cpu_us_per_delivery"), 2),
            }
        )
    ratios = [
        spread["deliveries_per_s"] / alone["deliveries_per_s"]
        for spread, alone in zip(results["2 processes + Redis"], results["1 process"], strict=True)
    ]
    report.summary = {"deliveries_two_vs_one": round(statistics.median(ratios), 3)}
    return report


WORKLOADS: dict[str, Callable[[argparse.Namespace], Awaitable[Report]]] = {
    "history": history_throughput,
    "redis": redis_scale,
}


def print_table(report: Report) -> None:
    print(f"\n== {report.workload}")
    columns = [key for key in report.rows[0] if key != "server"] if report.rows else []
    print(f"  {'server':<34}" + "".join(f"{column:>24}" for column in columns))
    for row in report.rows:
        print(f"  {row['server']:<34}" + "".join(f"{row[column]!s:>24}" for column in columns))
    print("  " + ", ".join(f"{key}: {value}" for key, value in report.summary.items()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("workloads", nargs="*", choices=[*WORKLOADS, []], help="default: all")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per workload")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check that it runs")
    args = parser.parse_args()
    chosen = args.workloads or list(WORKLOADS)

    started = datetime.now(timezone.utc)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"# {started:%Y-%m-%d %H:%M} UTC, {machine}")
    print(f"# {sys.executable} -m bench.run {' '.join(sys.argv[1:])}")
    lines = []
    for name in chosen:
        report = asyncio.run(WORKLOADS[name](args))
        print_table(report)
        lines += report.lines()
    print("\n# JSON, one line per server and per summary")
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
